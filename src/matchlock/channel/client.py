"""asyncio shell around the sans-I/O ChannelConnection: the host end of the guest channel.

This is the only module in `channel/` that awaits. One reader task turns bytes from the
virtio-serial socket into events and routes them to per-stream queues; writes go through
one lock so frames never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from matchlock.channel import (
    CLOSED,
    MAX_OPEN_STREAMS,
    MAX_PAYLOAD,
    NEED_DATA,
    ChannelConnection,
    ChannelError,
    Data,
    Eof,
    Exit,
    GoAway,
    Hello,
    Reply,
    Reset,
    Resize,
    Signal,
    Window,
)
from matchlock.errors import GuestError

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
# Credit the host grants per stream for guest output. Larger than the protocol default:
# under TCG one WINDOW round trip costs milliseconds, and the window must cover it.
HOST_WINDOW = 4 << 20
# Most bytes one ExecHandle.read() joins from already buffered frames.
MAX_READ = 256 * 1024


class ChannelClosed(ChannelError):
    """The guest end went away (VM powered off or crashed)."""


class GuestConnectError(GuestError):
    """A guest TCP connection failed (refused, reset); the channel itself is fine."""


class ChannelBusy(GuestError):
    """Every stream slot of the channel is in use; try again when one is free."""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int | None = None
    signal: int | None = None
    error: str | None = None

    @property
    def shell_code(self) -> int:
        """Exit code as a shell reports it: signal death is 128+n, a failed start 127."""
        if self.error is not None:
            return 127
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 255


class _Stream:
    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.events: asyncio.Queue = asyncio.Queue()
        self.credit_changed = asyncio.Event()


class GuestChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._conn = ChannelConnection(role="host", window=HOST_WINDOW)
        self._write_lock = asyncio.Lock()
        self._streams: dict[int, _Stream] = {}
        self._hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self._closed_error: BaseException | None = None
        self._reader: asyncio.Task | None = None
        self._closed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    # -- connection ---------------------------------------------------------------------

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read_loop())

    async def wait_ready(self) -> Hello:
        hello = await asyncio.shield(self._hello)
        return hello

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._write_lock:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self._sock, READ_SIZE)
                self._conn.receive_data(data)
                while True:
                    ev = self._conn.next_event()
                    if ev is NEED_DATA:
                        break
                    if ev is CLOSED:
                        raise ChannelClosed("the guest closed the channel")
                    await self._dispatch(ev)
                if not data:
                    raise ChannelClosed("the guest closed the channel")
        except asyncio.CancelledError:
            self._fail(ChannelClosed("channel closed by host"))
            raise
        except (ChannelError, OSError) as e:
            self._fail(e if isinstance(e, ChannelError) else ChannelClosed(str(e)))

    def _fail(self, err: BaseException) -> None:
        self._closed_error = err
        if not self._closed.done():
            self._closed.set_result(err)
        if not self._hello.done():
            self._hello.set_exception(err)
            self._hello.exception()  # mark retrieved
        for st in self._streams.values():
            st.events.put_nowait(err)
            st.credit_changed.set()

    async def _dispatch(self, ev: object) -> None:
        if isinstance(ev, Hello):
            reply = Hello(version=ev.version, window=self._conn.window)
            await self._write(self._conn.send(reply))
            if not self._hello.done():
                self._hello.set_result(ev)
            return
        if isinstance(ev, GoAway):
            raise ChannelClosed(f"guest reported a protocol error: {ev.error}")
        st = self._streams.get(getattr(ev, "stream_id", 0))
        if st is None:
            return
        if isinstance(ev, Window | Exit | Reset):
            st.credit_changed.set()  # a stdin writer waiting for credit rechecks
            if isinstance(ev, Window):
                return
        st.events.put_nowait(ev)
        if isinstance(ev, Exit | Reset | Reply):
            st.credit_changed.set()  # a writer waiting for credit must see the stream end

    async def wait_closed(self) -> BaseException:
        """Until the channel is gone (guest powered off or crashed, or close()); why."""
        return await asyncio.shield(self._closed)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        if self._closed_error is None:
            self._fail(ChannelClosed("channel closed by host"))
        self._sock.close()

    # -- streams ------------------------------------------------------------------------

    def _open(self, request: dict) -> tuple[_Stream, bytes]:
        if self._closed_error is not None:
            raise ChannelClosed(str(self._closed_error))
        ev = self._conn.open(request)
        st = _Stream(ev.stream_id)
        self._streams[st.id] = st
        return st, self._conn.send(ev)

    async def request(self, request: dict, timeout: float = 10.0) -> dict:
        st, wire = self._open(request)
        try:
            await self._write(wire)
            ev = await asyncio.wait_for(st.events.get(), timeout)
            if isinstance(ev, BaseException):
                raise ev
            if not isinstance(ev, Reply):
                raise ChannelError(f"unexpected reply to {request.get('op')}: {ev!r}")
            return ev.body
        finally:
            self._streams.pop(st.id, None)

    async def exec(self, request: dict) -> ExecHandle:
        """Start a process; its output is pulled with `ExecHandle.read` (backpressure)."""
        st, wire = self._open(request)
        await self._write(wire)
        return ExecHandle(self, st)

    async def open_tcp(self, port: int) -> TcpStream:
        """A byte stream to 127.0.0.1:`port` inside the guest (port forwarding).

        Returns at once: bytes written before the guest has connected wait in the guest
        (within credit). A refused or failed connection surfaces as GuestConnectError
        from read()/write()/wait_closed().
        """
        if type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        if len(self._conn.open_streams) >= MAX_OPEN_STREAMS:
            # Checked here: the connection core treats one more OPEN as a fatal misuse.
            raise ChannelBusy(f"all {MAX_OPEN_STREAMS} channel streams are in use")
        st, wire = self._open({"op": "tcp", "port": port})
        await self._write(wire)
        return TcpStream(self, st, port)

    async def _send_stdin(self, st: _Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._conn.is_open(st.id):
                return  # the process is gone: its stdin is moot
            credit = self._conn.credit(st.id)
            if credit <= 0:
                st.credit_changed.clear()
                if self._closed_error is not None:
                    raise ChannelClosed(str(self._closed_error))
                await st.credit_changed.wait()
                continue
            n = min(credit, len(view), 65536)
            await self._write(self._conn.send(Data(st.id, 0, bytes(view[:n]))))
            view = view[n:]


class ExecHandle:
    """A running guest process: pull its output, feed stdin, resize, signal, wait.

    Output is pulled, never pushed: credit for a chunk goes back to the guest only once
    `read()` has handed it out, so a consumer that stops reading stops the guest process
    (and nothing else) after at most one window of buffered output.
    """

    def __init__(self, chan: GuestChannel, st: _Stream) -> None:
        self._chan = chan
        self._st = st
        self._unacked = 0
        self._pending: object | None = None  # an event taken while coalescing
        self._status: ExitStatus | None = None
        self._stdin_closed = False

    @property
    def done(self) -> bool:
        return self._status is not None

    async def _next_event(self) -> object:
        if self._pending is not None:
            ev, self._pending = self._pending, None
            return ev
        return await self._st.events.get()

    def _finish(self, status: ExitStatus) -> None:
        self._status = status
        self._chan._streams.pop(self._st.id, None)

    async def read(self, max_bytes: int = MAX_READ) -> tuple[int, bytes] | None:
        """The next output chunk as (fd, bytes), or None once the process has exited.

        Chunks of the same fd that are already buffered are joined up to `max_bytes`, so a
        fast producer costs one consumer wake-up per `max_bytes`, not per frame.
        """
        if self._status is not None:
            return None
        chan = self._chan
        while True:
            ev = await self._next_event()
            if isinstance(ev, BaseException):
                self._finish(ExitStatus(error=str(ev)))
                raise ev
            if isinstance(ev, Data):
                fd, parts, size = ev.fd, [ev.data], len(ev.data)
                queue = self._st.events
                while size < max_bytes and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, Data) and nxt.fd == fd:
                        parts.append(nxt.data)
                        size += len(nxt.data)
                    else:
                        self._pending = nxt
                        break
                # Return credit in quarter-window batches: each WINDOW wakes the guest,
                # and the guest still holds >= 3/4 of the window meanwhile.
                self._unacked += size
                if self._unacked >= chan._conn.window // 4:
                    n, self._unacked = self._unacked, 0
                    await chan._write(chan._conn.send(Window(self._st.id, n)))
                return fd, parts[0] if len(parts) == 1 else b"".join(parts)
            if isinstance(ev, Exit):
                self._finish(ExitStatus(ev.code, ev.signal, ev.error))
                return None
            if isinstance(ev, Reset):
                self._finish(ExitStatus(error="the guest dropped the process"))
                return None
            # Eof of stdout/stderr needs no action: Exit follows it.

    async def write(self, data: bytes) -> None:
        """Send stdin bytes; waits for the guest's credit (the guest's pipe pushes back)."""
        if self._status is None and not self._stdin_closed and data:
            await self._chan._send_stdin(self._st, data)

    async def close_stdin(self) -> None:
        if self._status is None and not self._stdin_closed:
            self._stdin_closed = True
            await self._chan._write(self._chan._conn.send(Eof(self._st.id, 0)))

    async def resize(self, rows: int, cols: int) -> None:
        if self._status is None:
            await self._chan._write(self._chan._conn.send(Resize(self._st.id, rows, cols)))

    async def signal(self, signum: int) -> None:
        if self._status is None:
            await self._chan._write(self._chan._conn.send(Signal(self._st.id, signum)))

    async def cancel(self) -> None:
        """Ask the guest to stop the process (SIGTERM, then SIGKILL after 5 s)."""
        if self._status is None and self._chan._conn.is_open(self._st.id):
            await self._chan._write(self._chan._conn.send(Reset(self._st.id)))

    async def wait(self) -> ExitStatus:
        """Discard any output not read yet and return how the process ended."""
        while await self.read() is not None:
            pass
        assert self._status is not None
        return self._status


class TcpStream:
    """One guest TCP connection over the channel: read, write, half-close, abort.

    Not safe for two concurrent readers or two concurrent writers; one of each is fine.
    """

    def __init__(self, chan: GuestChannel, st: _Stream, port: int) -> None:
        self._chan = chan
        self._st = st
        self.port = port
        self._pending = bytearray()  # guest bytes taken from the queue, not yet read()
        self._read_eof = False  # the guest's side of the connection ended (EOF fd 1)
        self._write_eof = False  # we sent EOF fd 0
        self._reset = False
        self._status: ExitStatus | None = None
        self._unacked = 0

    @property
    def done(self) -> bool:
        return self._status is not None

    def _take(self, ev: object) -> None:
        if isinstance(ev, BaseException):
            self._finish(ExitStatus(error=str(ev)))
            raise ev
        if isinstance(ev, Data):
            self._pending += ev.data
        elif isinstance(ev, Eof):
            self._read_eof = True
        elif isinstance(ev, Exit):
            self._read_eof = True
            self._finish(ExitStatus(ev.code, ev.signal, ev.error))
        elif isinstance(ev, Reset):
            self._read_eof = True
            self._finish(ExitStatus(error="the guest dropped the connection"))
        elif isinstance(ev, Reply):  # a guest without the "tcp" op answers REPLY
            self._read_eof = True
            self._finish(ExitStatus(error=str(ev.body.get("error") or "not supported")))

    def _finish(self, status: ExitStatus) -> None:
        if self._status is None:
            self._status = status
            self._chan._streams.pop(self._st.id, None)

    def _raise_if_failed(self) -> None:
        st = self._status
        if st is not None and st.error is not None and not self._reset:
            raise GuestConnectError(st.error)

    async def read(self) -> bytes:
        """The next bytes from the guest; b"" once the guest's side has ended."""
        while not self._pending and not self._read_eof:
            ev = await self._st.events.get()
            if isinstance(ev, Data):  # the common case: hand it over without a copy
                await self._ack(len(ev.data))
                return ev.data
            self._take(ev)
        if not self._pending:
            self._raise_if_failed()
            return b""
        data = bytes(self._pending)
        self._pending.clear()
        await self._ack(len(data))
        return data

    async def _ack(self, n: int) -> None:
        # Credit goes back in quarter-window batches (each WINDOW wakes the guest); the
        # guest still holds at least 3/4 of the window meanwhile.
        self._unacked += n
        conn = self._chan._conn
        if self._unacked >= conn.window // 4 and conn.is_open(self._st.id):
            n, self._unacked = self._unacked, 0
            await self._chan._write(conn.send(Window(self._st.id, n)))

    async def write(self, data: bytes) -> None:
        """Send bytes to the guest connection, waiting for credit (backpressure)."""
        if self._write_eof:
            raise GuestConnectError("write after write_eof()")
        chan, sid = self._chan, self._st.id
        view = memoryview(data)
        while view:
            self._raise_if_failed()
            if self._reset or not chan._conn.is_open(sid) or chan._closed_error is not None:
                if chan._closed_error is not None:
                    raise ChannelClosed(str(chan._closed_error))
                raise GuestConnectError("the guest connection is closed")
            credit = chan._conn.credit(sid)
            if credit <= 0:
                self._st.credit_changed.clear()
                await self._st.credit_changed.wait()
                continue
            n = min(credit, len(view), MAX_PAYLOAD)
            # send() runs before the await: no frame can slip in between check and send.
            await chan._write(chan._conn.send(Data(sid, 0, bytes(view[:n]))))
            view = view[n:]

    async def write_eof(self) -> None:
        """Half-close: the guest's socket sees EOF; reading goes on."""
        if self._write_eof or self._reset:
            return
        self._write_eof = True
        conn = self._chan._conn
        if conn.is_open(self._st.id) and self._chan._closed_error is None:
            await self._chan._write(conn.send(Eof(self._st.id, 0)))

    async def abort(self) -> None:
        """Reset the connection (the guest side gets RST). Idempotent."""
        if self._reset or self.done:
            return
        self._reset = True
        conn = self._chan._conn
        if conn.is_open(self._st.id) and self._chan._closed_error is None:
            try:
                await self._chan._write(conn.send(Reset(self._st.id)))
            except (ChannelError, OSError) as e:
                log.debug("reset of tcp stream %d failed: %s", self._st.id, e)

    async def wait_closed(self) -> ExitStatus:
        """Wait for the guest's EXIT. Unread guest bytes stay readable (bounded by credit)."""
        while self._status is None:
            self._take(await self._st.events.get())
        return self._status
