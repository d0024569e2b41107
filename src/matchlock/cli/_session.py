"""Running one command with the host terminal attached: output, stdin, PTY, signals.

Output reaches the terminal through `FdWriter`s (a thread per fd), so a slow terminal or
`| less` holds back the guest process only, never the event loop that also runs the VM's
network. Signals: the first SIGINT/SIGTERM asks the guest to stop the process (SIGTERM,
then SIGKILL); if it has not gone `CANCEL_GRACE_S` later, or on a second signal, `force`
is called (the caller tears the VM down).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import sys
import termios
import threading
import time
import tty as ttymod
from collections.abc import Callable, Iterator

from matchlock._aio import spawn
from matchlock._fdio import FdWriter
from matchlock.errors import UsageError
from matchlock.sandbox import (
    ExecRequest,
    ExecResult,
    Process,
    Sandbox,
    SandboxConfig,
    VmLaunch,
    VmStopped,
    compose_request,
)
from matchlock.supervisor._supervisor import Supervisor

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


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(0)
    try:
        ttymod.setraw(0)
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0)
        return size.lines, size.columns
    except OSError:
        return 24, 80


class Attached:
    """One process with this terminal's stdio attached to it."""

    def __init__(self, process: Process, *, stdin: bool, tty: bool,
                 force: Callable[[], None]) -> None:
        self.proc = process
        self.stdin, self.tty = stdin, tty
        self._force = force
        self.signalled = 0
        self._cancelled = False

    def on_signal(self, sig: int) -> None:
        self.signalled = sig
        if not self._cancelled:
            self._cancelled = True
            spawn(self.proc.cancel(), name="cancel-on-signal")
            asyncio.get_running_loop().call_later(CANCEL_GRACE_S, self._force)
        else:
            self._force()

    def _on_winch(self) -> None:
        rows, cols = terminal_size()
        spawn(self.proc.resize(rows, cols), name="resize")

    async def _pump_stdin(self) -> None:
        reader = StdinReader(asyncio.get_running_loop())
        while chunk := await reader.read():
            await self.proc.write(chunk)
        await self.proc.close_stdin()

    async def _pump_output(self) -> None:
        writers = {1: FdWriter(1), 2: FdWriter(2)}
        broken = False
        try:
            async for fd, data in self.proc:
                if broken:
                    continue
                try:
                    await writers[fd].write(data)
                except BrokenPipeError:
                    broken = True  # the reader went away (`| head`): stop the process
                    await self.proc.cancel()
            for w in writers.values():
                with contextlib.suppress(OSError):
                    await w.flush()
        finally:
            for w in writers.values():
                w.close()

    async def run(self) -> ExecResult:
        loop = asyncio.get_running_loop()
        stdin_task = spawn(self._pump_stdin(), name="stdin") if self.stdin else None
        if self.tty:
            loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
        try:
            with raw_terminal(self.tty):
                await self._pump_output()
                return await self.proc.wait()
        finally:
            if self.tty:
                loop.remove_signal_handler(signal.SIGWINCH)
            if stdin_task is not None:
                stdin_task.cancel()


def exec_request(args: list[str], *, entrypoint: str | None, workdir: str | None,
                 interactive: bool, tty: bool) -> ExecRequest:
    """`run`'s own command: ENTRYPOINT ++ (args or CMD)."""
    rows, cols = terminal_size() if tty else (24, 80)
    return ExecRequest(argv=tuple(args), image_command=True, entrypoint=entrypoint,
                       cwd=workdir, tty=tty, stdin=interactive, rows=rows, cols=cols,
                       term=os.environ.get("TERM") or "xterm")


async def run_attached(sandbox: Sandbox, request: ExecRequest, force: Callable[[], None],
                       on_start: Callable[[Attached], None] | None = None) -> ExecResult:
    proc = await sandbox.exec(request)
    att = Attached(proc, stdin=request.stdin, tty=request.tty, force=force)
    if on_start is not None:
        on_start(att)
    return await att.run()


def report(result: ExecResult) -> None:
    if result.error is not None:
        print(f"matchlock: {result.error}", file=sys.stderr)


class RunSession:
    """A foreground `run`: the VM's supervisor lives in this process (same class, same
    control socket as a detached one), the command runs attached to this terminal.

    `--rm` (default): the VM goes with the command. `--rm=false`: it stays up after the
    command until SIGINT/SIGTERM, `matchlock kill` or `--timeout`, and is kept (stopped).
    """

    def __init__(self, config: SandboxConfig, request: ExecRequest, *, rm: bool = True,
                 timeout: float | None = None, progress: Callable[[str], None] | None = None,
                 launch: VmLaunch, spent: float = 0.0,
                 early_signals: list[int] | None = None) -> None:
        self.config = config
        self.request = request
        self.rm = rm
        self.timeout = timeout
        self.spent = spent  # of the timeout, before this session (`launch` was made)
        self.supervisor = Supervisor(config, progress, launch=launch)
        # SIGINT/SIGTERM that came before the loop ran (cli/_run_core.prelaunch wrote them down).
        self._early = early_signals if early_signals is not None else []
        self._main: asyncio.Task | None = None
        self._att: Attached | None = None
        self._signalled = 0
        self._keeping = False  # the command is over; waiting for a stop

    @property
    def sandbox(self) -> Sandbox:
        return self.supervisor.sandbox

    def _force(self) -> None:
        if self._main is not None and not self._main.done():
            self._main.cancel()

    def _on_signal(self, sig: int) -> None:
        self._signalled = sig
        if self._att is not None and not self._keeping:
            self._att.on_signal(sig)
        else:
            self._force()

    def _killed(self) -> bool:
        sup = self.supervisor
        return sup.stopping and sup.stop_reason == "stopped by request"

    def _has_command(self) -> bool:
        try:
            compose_request(self.sandbox.defaults, self.request)
        except UsageError:
            return False
        return True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # One that came since QEMU's spawn is handled now, as if it came now.
        while self._early:
            loop.call_soon(self._on_signal, self._early.pop(0))
        sup = self.supervisor
        left = None if self.timeout is None else max(self.timeout - self.spent, 0.0)
        try:
            async with asyncio.timeout(left):
                return await self._run(sup)
        except TimeoutError:
            if self._keeping:
                return 0  # --rm=false: the VM's time is up, a normal stop
            print(f"error: timed out after {self.timeout:g} s"
                  + ("; sandbox removed" if self.rm else ""), file=sys.stderr)
            return 1
        except asyncio.CancelledError:
            if self._keeping:
                return 0  # --rm=false: a signal is the normal way to stop
            word = "terminated" if self._signalled == signal.SIGTERM else "interrupted"
            print(f"error: {word}" + (", sandbox removed" if self.rm else ""),
                  file=sys.stderr)
            return 128 + (self._signalled or signal.SIGINT)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if self.rm:
                await asyncio.shield(sup.remove())
            else:
                await asyncio.shield(sup.stop(graceful=True, reason="run ended"))
                await asyncio.shield(sup.finish_clients())
            self.sandbox.marks["torn_down"] = time.monotonic()
            self._dump_timings()

    async def _run(self, sup: Supervisor) -> int:
        await sup.start()
        if not self.rm:
            print(f"Sandbox {sup.id} is running\n  Connect: matchlock exec {sup.id} -it sh\n"
                  f"  Stop:    matchlock kill {sup.id}", file=sys.stderr)
        code = 0
        if self.rm or self._has_command():
            try:
                self.sandbox.marks["exec_sent"] = time.monotonic()
                result = await run_attached(self.sandbox, self.request, self._force,
                                            lambda a: setattr(self, "_att", a))
                self.sandbox.marks["exec_done"] = time.monotonic()
            except VmStopped:
                if not self._killed():
                    raise
                result = None
            if self._killed() and self.rm:
                # `matchlock kill` (the control socket's close) ends a foreground run too.
                print(f"error: sandbox {sup.id} was stopped (matchlock kill)",
                      file=sys.stderr)
                return 128 + signal.SIGTERM
            if result is None:
                return 0
            report(result)
            code = 128 + self._signalled if self._signalled else result.exit_code
        if self.rm:
            return code
        self._keeping = True
        self._att = None
        await sup.wait_stopped()
        return 0

    def _dump_timings(self) -> None:
        # For bench/: where a run's time went, from its own clock.
        path = os.environ.get("MATCHLOCK_TIMINGS")
        if path:
            import json

            with open(path, "w") as f:
                json.dump({**self.sandbox.timings, "marks": self.sandbox.marks}, f)
