"""Port forwarding: host TCP listeners whose connections are relayed over the guest channel
to 127.0.0.1:REMOTE inside the guest (so it works without a guest NIC).

The specs and their parsers are in `_portspec` (pure, no event loop).
`PortForwarder` owns its listeners and every connection they accepted: `close()` ends them
all, and `close_when(aw)` does so on its own when `aw` (e.g. the channel's end) completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from matchlock.errors import GuestError, MatchlockError
from matchlock.sandbox._portspec import (
    DEFAULT_ADDRESS,
    Binding,
    PortSpec,
    parse_addresses,
)

log = logging.getLogger(__name__)

# Connections relayed at once per forwarder: the channel has 256 stream slots in all and
# exec must keep some. Further clients wait in the listen backlog until one ends.
MAX_CONNECTIONS = 128
# Bytes read from a host client per channel write (one DATA frame's worth).
CHUNK = 65536
# How long a reset guest connection may take to confirm before it is dropped anyway.
ABORT_WAIT_S = 2.0


class PortForwardError(MatchlockError):
    """A listener could not be opened (port in use, no permission, bad address)."""


class GuestStream(Protocol):
    """What `connect` returns (channel.client.TcpStream has this shape)."""

    async def read(self) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def write_eof(self) -> None: ...
    async def abort(self) -> None: ...
    async def wait_closed(self) -> object: ...


Connect = Callable[[int], Awaitable[GuestStream]]


def _bind_error(addr: str, port: int, e: OSError) -> PortForwardError:
    if e.errno == errno.EADDRINUSE:
        return PortForwardError(f"port {port} is already in use on {addr}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return PortForwardError(f"no permission to listen on {addr}:{port} (ports below 1024 "
                                "need root or CAP_NET_BIND_SERVICE)")
    if e.errno == errno.EADDRNOTAVAIL:
        return PortForwardError(f"cannot listen on {addr}:{port}: the host has no such address")
    return PortForwardError(f"cannot listen on {addr}:{port}: {e.strerror or e}")


class PortForwarder:
    """Host listeners -> channel streams -> guest 127.0.0.1:REMOTE.

    `connect(remote_port)` opens one guest stream (GuestChannel.open_tcp). `on_error` gets
    one line per failed connection (e.g. nothing listens on the guest port).
    """

    def __init__(self, connect: Connect, *, on_error: Callable[[str], None] | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._connect = connect
        self._on_error = on_error or (lambda msg: log.warning("%s", msg))
        self._slots = asyncio.Semaphore(max_connections)
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None
        self._closed = False
        self._closed_event = asyncio.Event()
        self.bindings: list[Binding] = []

    async def add(self, specs: Sequence[PortSpec],
                  addresses: Sequence[str] = (DEFAULT_ADDRESS,)) -> list[Binding]:
        """Listen on every spec x address; all or nothing. Returns the new bindings in
        spec-major, address-minor order, with the ports actually bound."""
        if self._closed:
            raise PortForwardError("the port forwarder is closed")
        addrs = parse_addresses(addresses)
        seen = {(b.address, b.local_port) for b in self.bindings}
        for spec in specs:
            for addr in addrs:
                key = (addr, spec.local)
                if spec.local and key in seen:
                    raise PortForwardError(f"port {spec.local} is forwarded twice on {addr}")
                seen.add(key)
        new: list[tuple[asyncio.Server, Binding]] = []
        try:
            for spec in specs:
                for addr in addrs:
                    try:
                        server = await asyncio.start_server(
                            lambda r, w, remote=spec.remote: self._accepted(r, w, remote),
                            host=addr, port=spec.local, backlog=128,
                        )
                    except OSError as e:
                        raise _bind_error(addr, spec.local, e) from None
                    port = server.sockets[0].getsockname()[1]
                    new.append((server, Binding(addr, port, spec.remote)))
        except BaseException:
            for server, _ in new:
                server.close()
            raise
        for server, binding in new:
            self._servers.append(server)
            self.bindings.append(binding)
        return [b for _, b in new]

    def close_when(self, event: Awaitable[object]) -> None:
        """Close everything once `event` completes (the VM went away)."""

        async def watch() -> None:
            with contextlib.suppress(Exception):
                await event
            await self.close()

        self._watch = asyncio.ensure_future(watch())

    async def close(self) -> None:
        """Stop listening and end every relayed connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self.bindings.clear()
        self._closed_event.set()
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    # -- one connection ------------------------------------------------------------------

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  remote: int) -> None:
        if self._closed:
            writer.transport.abort()
            return
        task = asyncio.ensure_future(self._serve(reader, writer, remote))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     remote: int) -> None:
        stream: GuestStream | None = None
        clean = False
        try:
            async with self._slots:
                try:
                    stream = await self._connect(remote)
                except (GuestError, OSError) as e:
                    self._on_error(f"port-forward connection error: {e}")
                    return
                clean = await self._relay(reader, writer, stream, remote)
        finally:
            if clean:
                writer.close()
            else:
                writer.transport.abort()
            if stream is not None and not clean:
                await stream.abort()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(stream.wait_closed(), ABORT_WAIT_S)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     stream: GuestStream, remote: int) -> bool:
        """Relay both ways with half-close. True when both ends finished cleanly."""

        async def to_guest() -> None:
            while data := await reader.read(CHUNK):
                await stream.write(data)
            await stream.write_eof()

        async def to_host() -> None:
            while data := await stream.read():
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        up = asyncio.ensure_future(to_guest())
        down = asyncio.ensure_future(to_host())
        try:
            pending = {up, down}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    err = task.exception()
                    if err is not None:
                        if isinstance(err, GuestError):
                            self._on_error(f"port-forward connection error: {err}")
                        else:
                            log.debug("port-forward to %d: client gone: %s", remote, err)
                        return False
            status = await stream.wait_closed()
            error = getattr(status, "error", None)
            if error:
                self._on_error(f"port-forward connection error: {error}")
                return False
            return True
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
