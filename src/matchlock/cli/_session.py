"""One `matchlock run`: boot, exec with the host terminal attached, tear down.

Signals: the first SIGINT/SIGTERM asks the guest to stop the process (SIGTERM, then
SIGKILL); if it has not gone 2 s later, or on a second signal, the VM is torn down.
Either way `run` returns within ~5 s and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
import termios
import threading
import time
import tty as ttymod
from collections.abc import Sequence

from matchlock.channel import ChannelError
from matchlock.channel.client import ExecHandle
from matchlock.errors import GuestError, MatchlockError, UsageError
from matchlock.sandbox import (
    ImageDefaults,
    Sandbox,
    SandboxConfig,
    check_exec_size,
    compose_argv,
    compose_env,
)

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 2.0
STDIN_CHUNK = 65536


class StdinReader:
    """Reads host stdin in a daemon thread (works for ttys, pipes and regular files)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        threading.Thread(target=self._run, name="stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(0, STDIN_CHUNK)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                chunk = b""
            fut = asyncio.run_coroutine_threadsafe(self._queue.put(chunk), self._loop)
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - loop closed: stop reading
                return
            if not chunk:
                return

    async def read(self) -> bytes:
        return await self._queue.get()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [])
            continue
        view = view[n:]


class RunSession:
    def __init__(
        self,
        config: SandboxConfig,
        args: Sequence[str],
        *,
        env: Sequence[str] = (),
        env_files: Sequence[str] = (),
        workdir: str | None = None,
        user: str | None = None,
        entrypoint: str | None = None,
        interactive: bool = False,
        tty: bool = False,
        progress=None,
    ) -> None:
        self.config = config
        self.args = list(args)
        self.env, self.env_files = env, env_files
        self.workdir, self.user, self.entrypoint = workdir, user, entrypoint
        self.interactive, self.tty = interactive, tty
        self.progress = progress
        self.sandbox: Sandbox | None = None
        self.handle: ExecHandle | None = None
        self._signalled = 0
        self._main: asyncio.Task | None = None
        # Validate what we can before booting anything (so bad input costs nothing).
        self._host_env = dict(os.environ)
        check_exec_size(compose_argv(ImageDefaults(), self.args, entrypoint),
                        compose_env(ImageDefaults(), env_files, env, self._host_env))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.sandbox = Sandbox(self.config, self.progress)
        try:
            await self.sandbox.start()
            return await self._exec()
        except asyncio.CancelledError:
            sig = self._signalled or signal.SIGINT
            print("error: interrupted, sandbox removed", file=sys.stderr)
            return 128 + sig
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await asyncio.shield(self.sandbox.close(remove=True))
            self._dump_timings()

    def _dump_timings(self) -> None:
        # For bench/: where a run's time went, from its own clock.
        path = os.environ.get("MATCHLOCK_TIMINGS")
        if path and self.sandbox is not None:
            import json

            with open(path, "w") as f:
                json.dump(self.sandbox.timings, f)

    def _on_signal(self, sig: int) -> None:
        self._signalled = sig
        if self.handle is not None and self._signalled_once is False:
            self._signalled_once = True
            asyncio.ensure_future(self.handle.cancel())
            asyncio.get_running_loop().call_later(CANCEL_GRACE_S, self._force)
        else:
            self._force()

    _signalled_once = False

    def _force(self) -> None:
        if self._main is not None and not self._main.done():
            self._main.cancel()

    def _request(self) -> dict:
        assert self.sandbox is not None and self.sandbox.image is not None
        cfg = self.sandbox.image.config
        defaults = ImageDefaults(
            env=cfg.env, entrypoint=cfg.entrypoint, cmd=cfg.cmd,
            working_dir=cfg.working_dir, user=cfg.user,
        )
        argv = compose_argv(defaults, self.args, self.entrypoint)
        if not argv:
            raise UsageError(
                "no command given and the image has no CMD/ENTRYPOINT: add a command"
            )
        env = compose_env(defaults, self.env_files, self.env, self._host_env, tty=self.tty)
        env.update(self.sandbox.extra_env())
        req = {
            "argv": argv,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": self.workdir or defaults.working_dir or self.config.mounts.workspace or "/",
            "user": self.user if self.user is not None else defaults.user,
            "tty": self.tty,
            "stdin": self.interactive,
        }
        if self.tty:
            size = os.get_terminal_size(0)
            req["rows"], req["cols"] = size.lines, size.columns
        return req

    async def _exec(self) -> int:
        assert self.sandbox is not None
        loop = asyncio.get_running_loop()
        request = self._request()
        stdin = StdinReader(loop).read if self.interactive else None
        broken = False

        def on_output(fd: int, data: bytes) -> None:
            nonlocal broken
            if broken:
                return
            try:
                _write_all(2 if fd == 2 else 1, data)
            except BrokenPipeError:
                broken = True
                asyncio.ensure_future(self.handle.cancel()) if self.handle else None

        with self._terminal():
            try:
                t0 = time.monotonic()
                self.handle = await self.sandbox.exec(request, on_output, stdin)
                if self.tty:
                    loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
                status = await self.handle.wait()
                self.sandbox.timings["exec"] = time.monotonic() - t0
            except ChannelError as e:
                raise GuestError(f"{self.sandbox.crashed_reason()} ({e})") from None
            finally:
                if self.tty:
                    loop.remove_signal_handler(signal.SIGWINCH)
        if status.error is not None:
            print(f"matchlock: {status.error}", file=sys.stderr)
        if self._signalled:
            return 128 + self._signalled
        return status.shell_code

    def _on_winch(self) -> None:
        if self.handle is None:
            return
        try:
            size = os.get_terminal_size(0)
        except OSError:
            return
        asyncio.ensure_future(self.handle.resize(size.lines, size.columns))

    @contextlib.contextmanager
    def _terminal(self):
        if not self.tty:
            yield
            return
        saved = termios.tcgetattr(0)
        try:
            ttymod.setraw(0)
            yield
        finally:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


__all__ = ["MatchlockError", "RunSession"]
