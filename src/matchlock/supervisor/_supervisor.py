"""The supervisor: the one owner of one VM. It holds the Sandbox (QEMU, channel, network)
and serves the VM's control socket, `<vm dir>/control.sock` (mode 0600), with the RPC
dispatcher. A foreground `run` hosts it in its own process; `run -d` starts it as a
daemon (`_daemon`). Either way it is this class, serving the same socket.

    start()   create the VM (row, dir), open the control socket, boot; `ready` then
    stop()    close the socket to new clients, stop the VM, release what it took
    remove()  also delete the VM's directory and rows

Clients that connect while the VM boots wait for it: `exec` right after `run -d`
returned (or even before) never fails with "not ready".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from matchlock._aio import spawn
from matchlock.errors import MatchlockError, NotAvailable, VmNotRunning
from matchlock.rpc.server import serve_stream
from matchlock.sandbox import (
    ExecRequest,
    PortSpec,
    Process,
    Sandbox,
    SandboxConfig,
    VmLaunch,
)
from matchlock.sandbox import _cleanup as cleanup
from matchlock.sandbox import _files as files
from matchlock.sandbox._ports import PortForwarder
from matchlock.sandbox._portspec import Binding
from matchlock.supervisor._socket import CONTROL_SOCKET, bind_unix

log = logging.getLogger(__name__)

CLIENT_FLUSH_S = 2.0  # after the VM stopped, how long clients get to read their answers


class Supervisor:
    def __init__(self, config: SandboxConfig, progress=None, *,  # noqa: ANN001
                 vm_id: str | None = None, launch: VmLaunch | None = None) -> None:
        self.sandbox = Sandbox(config, progress, vm_id=vm_id, launch=launch)
        self.config = config
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()
        self._ready: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._stop_task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self.stop_reason = ""
        self._forwarders: set[PortForwarder] = set()  # open ones; all closed by _stop()
        self._fwd: PortForwarder | None = None  # `-p` at start
        self.target = VmTarget(self)

    @property
    def id(self) -> str:
        return self.sandbox.id

    @property
    def control_path(self) -> Path:
        return self.sandbox.dir / CONTROL_SOCKET

    def _events(self) -> tuple[asyncio.Future[None], asyncio.Event]:
        if self._ready is None or self._stopped is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._stopped = asyncio.Event()
        return self._ready, self._stopped

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, before_boot: Callable[[Supervisor], None] | None = None) -> None:
        """Create, listen, boot. `before_boot` runs once the VM is registered and its
        directory exists (the image is known). On failure the error is raised and the
        caller stops or removes the VM."""
        ready, _ = self._events()
        try:
            await self.sandbox.create()
            await self._listen()
            if before_boot is not None:
                before_boot(self)
            await self.sandbox.boot()
            if self.config.publish:
                await self.port_forward(self.config.publish, self.config.addresses)
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e if isinstance(e, MatchlockError) else VmNotRunning(
                    self.id, "failed to start"))
                ready.exception()  # retrieved: waiting clients get it
            raise
        ready.set_result(None)
        self._watch = spawn(self._watch_vm(), name=f"supervisor-watch-{self.id}")
        log.info("%s ready: %s", self.id, {k: round(v, 3) for k, v in
                                            self.sandbox.timings.items()})

    async def _listen(self) -> None:
        path = self.control_path
        await asyncio.to_thread(self.sandbox.record, cleanup.CONTROL_SOCKET, {"path": str(path)})
        sock = await asyncio.to_thread(bind_unix, path)
        self._server = await asyncio.start_unix_server(self._client, sock=sock,
                                                       limit=1 << 20)

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        target = VmTarget(self)  # per client: its port forwards end with its connection
        try:
            await serve_stream(reader, writer, target)
        finally:
            self._clients.discard(task)
            await target.release()

    async def _watch_vm(self) -> None:
        """The VM went away by itself (guest crash, poweroff, QEMU killed): clean up."""
        reason = await self.sandbox.wait_stopped()
        if self._stop_task is None:
            log.warning("%s: %s", self.id, reason)
            await self.stop(graceful=False, reason=reason)

    async def wait_ready(self) -> None:
        ready, _ = self._events()
        await asyncio.shield(ready)

    async def wait_stopped(self) -> str:
        _, stopped = self._events()
        await stopped.wait()
        return self.stop_reason

    @property
    def stopping(self) -> bool:
        return self._stop_task is not None

    async def stop(self, *, graceful: bool = True, timeout: float = 5.0,
                   reason: str = "") -> None:
        """Idempotent; concurrent callers share one teardown; never raises."""
        if self._stop_task is None:
            self.stop_reason = reason
            self._stop_task = asyncio.ensure_future(self._stop(graceful, timeout, reason))
        await asyncio.shield(self._stop_task)

    async def _stop(self, graceful: bool, timeout: float, reason: str) -> None:
        _, stopped = self._events()
        if self._server is not None:
            self._server.close()  # no new clients; connected ones keep their answers
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()
            await asyncio.to_thread(self.sandbox.released, cleanup.CONTROL_SOCKET)
        for fwd in list(self._forwarders):
            await fwd.close()
        self._forwarders.clear()
        await self.sandbox.stop(graceful=graceful, timeout=timeout, reason=reason)
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        stopped.set()
        log.info("%s stopped%s", self.id, f": {reason}" if reason else "")

    async def finish_clients(self, grace: float = CLIENT_FLUSH_S) -> None:
        """Let connected clients read their last answers, then hang up on them."""
        tasks = [t for t in self._clients if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)

    async def remove(self) -> None:
        await self.stop(graceful=False)
        await self.finish_clients(0.2)
        await self.sandbox.remove()

    # -- hooks the target calls ----------------------------------------------------------

    def new_forwarder(self) -> PortForwarder:
        """Host listener -> channel stream -> guest TCP; closed at the latest in _stop()."""

        async def connect(port: int):  # noqa: ANN202 - a channel TcpStream
            chan = self.sandbox.channel
            if chan is None or self.stopping:
                raise VmNotRunning(self.id, "stopping" if self.stopping else "stopped")
            return await chan.open_tcp(port)

        fwd = PortForwarder(connect, on_error=lambda msg: log.warning("%s: %s", self.id, msg))
        self._forwarders.add(fwd)
        return fwd

    async def close_forwarder(self, fwd: PortForwarder) -> None:
        self._forwarders.discard(fwd)
        await fwd.close()

    async def port_forward(self, forwards: Sequence[PortSpec],
                           addresses: Sequence[str]) -> list[dict[str, Any]]:
        """`-p` at start: forwards that live as long as the VM."""
        if self._fwd is None:
            self._fwd = self.new_forwarder()
        return _bindings(await self._fwd.add(forwards, addresses))


def _bindings(found: Sequence[Binding]) -> list[dict[str, Any]]:
    return [{"address": b.address, "local_port": b.local_port, "remote_port": b.remote_port}
            for b in found]


class VmTarget:
    """The dispatcher's view of the supervisor's VM (rpc._dispatcher.Target)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._fwd: PortForwarder | None = None  # this client's forwards (replaced per call)

    async def release(self) -> None:
        """The client left: its port forwards end."""
        if self._fwd is not None:
            fwd, self._fwd = self._fwd, None
            await self._sup.close_forwarder(fwd)

    @property
    def vm_id(self) -> str:
        return self._sup.id

    async def _running(self) -> Sandbox:
        sup = self._sup
        if not sup.stopping:
            await sup.wait_ready()
        if sup.stopping or not sup.sandbox.running:
            raise VmNotRunning(sup.id, "stopping" if sup.stopping else "stopped")
        return sup.sandbox

    async def create(self, params: dict[str, Any]) -> str:
        raise NotAvailable(f"this connection drives VM {self.vm_id}; create a VM with "
                           "`matchlock rpc`", vm_id=self.vm_id)

    async def exec(self, request: ExecRequest) -> Process:
        return await (await self._running()).exec(request)

    async def allow_list_add(self, hosts: Sequence[str]) -> dict[str, Any]:
        return (await self._running()).allow_list_add(hosts)

    async def allow_list_delete(self, hosts: Sequence[str]) -> dict[str, Any]:
        return (await self._running()).allow_list_delete(hosts)

    async def port_forward(self, forwards: Sequence[PortSpec],
                           addresses: Sequence[str]) -> list[dict[str, Any]]:
        await self._running()
        # A new call replaces this client's earlier forwards (the reference SDK's semantics).
        if self._fwd is not None:
            await self.release()
        self._fwd = self._sup.new_forwarder()
        return _bindings(await self._fwd.add(forwards, addresses))

    async def write_file(self, path: str, data: bytes, mode: int) -> None:
        await files.write_file(await self._running(), path, data, mode)

    async def read_file(self, path: str) -> bytes:
        return await files.read_file(await self._running(), path)

    async def list_files(self, path: str) -> list[dict[str, Any]]:
        return await files.list_files(await self._running(), path)

    def log_paths(self) -> Sequence[Path]:
        return self._sup.sandbox.log_paths

    def events(self) -> AsyncIterator[dict[str, Any]]:
        return self._sup.sandbox.events()

    async def close(self, timeout: float) -> None:
        await self._sup.stop(graceful=True, timeout=timeout, reason="stopped by request")

    def info(self) -> dict[str, Any]:
        sup = self._sup
        status = "stopping" if sup.stopping else ("running" if sup.sandbox.running
                                                   else "starting")
        return {"id": sup.id, "status": status, "pid": sup.sandbox.owner.pid}
