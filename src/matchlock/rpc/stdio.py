"""`matchlock rpc`: one session on stdin/stdout (spec/rpc-protocol.md §1).

`StdioTarget.create` starts a `Supervisor` in this process, so the VM is an ordinary one
with a control socket (`matchlock list/exec/kill` see it); every other method goes to
that supervisor's target. `close` stops the VM and keeps its record (the SDK's
`remove()` runs `matchlock rm`, as with the reference); stdin EOF without `close`, or
SIGINT/SIGTERM, removes it (the reference leaks it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from matchlock._aio import spawn
from matchlock.errors import MatchlockError, UsageError
from matchlock.net.config import ALLOW_PRIVATE_ENV
from matchlock.rpc._create import plan_create
from matchlock.rpc.server import serve_stream
from matchlock.sandbox import ExecRequest, PortSpec, Process

log = logging.getLogger(__name__)

# Above the reference's 10 MiB: a 10 MiB write_file (base64: 13.3 MiB) fits on one line.
STDIO_MAX_LINE = 16 << 20
ENTRYPOINT_SETTLE_S = 0.5  # as the reference: an entrypoint that fails this fast fails create


class VmNotCreated(MatchlockError):
    """A request that needs the session's VM before `create` (-32000, the reference's)."""


class StdioTarget:
    """The dispatcher's Target for `matchlock rpc`: no VM until `create`."""

    def __init__(self, progress: Callable[[str], None] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self._progress = progress
        self._env = os.environ if env is None else env
        self.supervisor: Any = None  # matchlock.supervisor.Supervisor, once created
        self._entrypoint: asyncio.Task | None = None
        self._creating = False

    @property
    def vm_id(self) -> str | None:
        return self.supervisor.id if self.supervisor is not None else None

    def _vm(self) -> Any:
        if self.supervisor is None:
            raise VmNotCreated("VM not created")
        return self.supervisor.target

    async def create(self, params: dict[str, Any]) -> str:
        if self.supervisor is not None or self._creating:
            raise UsageError(f"this session already created VM {self.vm_id}; one VM per "
                             "`matchlock rpc` session: start another process for another VM")
        plan = plan_create(params, env_allow_private=self._env.get(ALLOW_PRIVATE_ENV, ""))
        from matchlock.supervisor import Supervisor  # the server side, only when needed

        sup = Supervisor(plan.config, self._progress)
        sup.sandbox.vfs_hooks.set_rules(plan.vfs_rules)
        sup.sandbox.file_events = plan.file_events
        self._creating = True
        try:
            await sup.start()
            if plan.launch_entrypoint:
                await self._launch(sup)
        except BaseException:
            await asyncio.shield(sup.remove())  # nothing half-created left behind
            self._creating = False
            raise
        self.supervisor = sup
        return sup.id

    async def _launch(self, sup: Any) -> None:
        """The image's ENTRYPOINT/CMD, detached, until `close` (§2.1.4 step 5)."""
        proc = await sup.sandbox.exec(ExecRequest(argv=(), image_command=True))
        self._entrypoint = spawn(_drain(proc), name=f"entrypoint-{sup.id}")
        done, _ = await asyncio.wait({self._entrypoint}, timeout=ENTRYPOINT_SETTLE_S)
        if done:
            code = self._entrypoint.result()
            if code != 0:
                raise MatchlockError(f"start image entrypoint: exit code {code}")

    async def exec(self, request: ExecRequest) -> Process:
        return await self._vm().exec(request)

    async def allow_list_add(self, hosts: Sequence[str]) -> dict[str, Any]:
        return await self._vm().allow_list_add(hosts)

    async def allow_list_delete(self, hosts: Sequence[str]) -> dict[str, Any]:
        return await self._vm().allow_list_delete(hosts)

    async def port_forward(self, forwards: Sequence[PortSpec],
                           addresses: Sequence[str]) -> list[dict[str, Any]]:
        return await self._vm().port_forward(forwards, addresses)

    async def write_file(self, path: str, data: bytes, mode: int) -> None:
        await self._vm().write_file(path, data, mode)

    async def read_file(self, path: str) -> bytes:
        return await self._vm().read_file(path)

    async def list_files(self, path: str) -> list[dict[str, Any]]:
        return await self._vm().list_files(path)

    def log_paths(self) -> Sequence[Path]:
        return self._vm().log_paths()

    def events(self) -> AsyncIterator[dict[str, Any]]:
        return self._vm().events()

    def info(self) -> dict[str, Any]:
        if self.supervisor is None:
            return {"id": None, "status": "not created"}
        return self._vm().info()

    def _stop_entrypoint(self) -> None:
        if self._entrypoint is not None:
            self._entrypoint.cancel()

    async def close(self, timeout: float) -> None:
        self._stop_entrypoint()
        if self.supervisor is not None:
            await self._vm().close(timeout)

    async def teardown(self) -> None:
        """The session ended without `close` (EOF, a signal): the VM goes entirely.
        After `close` the stopped VM's record stays for `matchlock rm`."""
        self._stop_entrypoint()
        sup = self.supervisor
        if sup is None:
            return
        if sup.stopping:
            await sup.stop()
            await sup.finish_clients(0.2)
            return
        await sup.remove()


async def _drain(proc: Process) -> int:
    try:
        while await proc.read() is not None:
            pass
        return (await proc.wait()).exit_code
    except asyncio.CancelledError:
        with contextlib.suppress(MatchlockError):
            await proc.cancel()
        raise


_PIPE_FILES: list[Any] = []
_COPIERS: list[threading.Thread] = []


def _copy(src: int, dst: int) -> None:
    try:
        while chunk := os.read(src, 1 << 18):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
    except OSError as e:
        log.debug("stdio copy stopped: %s", e)
    finally:
        os.close(src)
        os.close(dst)


def _pipe_fd(fd: int, reading: bool) -> int:
    """A dup of `fd` the pipe transports accept. A regular file (`matchlock rpc <
    requests.ndjson > out`) is not one: a thread copies between it and a pipe."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        return os.dup(fd)
    r, w = os.pipe()
    src, dst, mine = (os.dup(fd), w, r) if reading else (r, os.dup(fd), w)
    t = threading.Thread(target=_copy, args=(src, dst), name=f"rpc-copy-{fd}", daemon=True)
    t.start()
    _COPIERS.append(t)
    return mine


async def _stdio_streams(limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams on fds 0/1 (dups, so closing them leaves the process's fds alone)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    rfile = os.fdopen(_pipe_fd(0, True), "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
    wfile = os.fdopen(_pipe_fd(1, False), "wb", buffering=0)
    # A StreamReaderProtocol (on an unused reader) gives the writer drain() and
    # wait_closed(); FlowControlMixin alone lacks the close waiter.
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), wfile)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    # uvloop keeps only the fds: the file objects must outlive the transports (a
    # collected one closes its fd under the loop, which aborts).
    _PIPE_FILES.extend((rfile, wfile))
    return reader, writer


def _quiet_stdout() -> None:
    """Nothing but the protocol may reach fd 1: Python-level prints go to stderr."""
    sys.stdout = sys.stderr


async def serve_stdio(progress: Callable[[str], None] | None = None) -> int:
    """Serve stdin/stdout until `close`, EOF or a signal; tear the VM down; exit 0."""
    loop = asyncio.get_running_loop()
    target = StdioTarget(progress)
    reader, writer = await _stdio_streams(STDIO_MAX_LINE)
    _quiet_stdout()
    served = spawn(serve_stream(reader, writer, target, max_line=STDIO_MAX_LINE),
                   name="rpc-stdio")
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        signalled.append(sig)
        served.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await served
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.shield(target.teardown())
        for t in _COPIERS:  # stdout's copier: everything written reaches the file
            if t.name.endswith("-1"):
                await asyncio.to_thread(t.join, 5.0)
    return 128 + signalled[0] if signalled else 0


__all__ = ["STDIO_MAX_LINE", "StdioTarget", "VmNotCreated", "serve_stdio"]
