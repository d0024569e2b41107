"""`ChannelConnection`: the sans-I/O state machine for one host<->guest channel.

Bytes in (`receive_data`), events out (`next_event`), events in (`send`), bytes out. No
sockets, no asyncio, no clock. Every state change lives in this file: the per-stream table
`_STREAM_RULES` says which side may send what, and `_apply` is the only function that
mutates a stream.

Stream states (the C guest uses the same names):
  OPEN    after OPEN;
  RESET   the host sent RESET; the guest still sends remaining DATA/EOF and then EXIT;
  CLOSED  after EXIT, REPLY, or a RESET sent by the guest. Closed streams are dropped from
          the table; a frame that arrives for one later (a race, e.g. WINDOW crossing EXIT) is
          ignored. Stream ids only grow, so "closed" = "known id not in the table".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from matchlock.channel._frames import (
    DEFAULT_WINDOW,
    F_MORE,
    HEADER_SIZE,
    MAX_OPEN_STREAMS,
    MAX_PAYLOAD,
    MAX_REQUEST,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PROTOCOL_VERSION,
    T_OPEN,
    ChannelError,
    Data,
    Eof,
    Event,
    Exit,
    GoAway,
    Hello,
    LocalChannelError,
    Open,
    RemoteChannelError,
    Reply,
    Reset,
    Resize,
    Signal,
    Window,
    decode,
    encode,
    parse_header,
)

Role = Literal["host", "guest"]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""next_event(): no complete frame buffered; feed more bytes with receive_data()."""
CLOSED = _Sentinel("CLOSED")
"""next_event(): the transport ended cleanly (or the peer sent GOAWAY and it was delivered)."""

OPEN, RESET = "OPEN", "RESET"

_EVENT_TYPES = (Hello, Open, Data, Window, Eof, Resize, Signal, Exit, Reset, Reply, GoAway)

# Which role may send each stream-level event type, and for DATA/EOF which fds.
_SENDER: dict[type, Role] = {
    Open: "host",
    Resize: "host",
    Signal: "host",
    Exit: "guest",
    Reply: "guest",
}
_FDS: dict[Role, frozenset[int]] = {"host": frozenset({0}), "guest": frozenset({1, 2})}

# Compact the receive buffer once this many consumed bytes sit before the read offset
# (and they are more than half of it): keeps parsing O(n) without unbounded growth.
_COMPACT_AT = 1 << 16


@dataclass(slots=True)
class _Stream:
    state: str
    send_credit: int  # DATA bytes we may still send
    recv_window: int  # DATA bytes the peer may still send us
    eof_sent: set[int] = field(default_factory=set)
    eof_recv: set[int] = field(default_factory=set)


class ChannelConnection:
    """One end of the channel. `role` is "host" or "guest"; `window` is the per-stream credit
    we grant the peer in our HELLO (how many DATA bytes it may send before we return credit).

    Usage (host)::

        conn = ChannelConnection("host")
        sock.sendall(conn.send(Hello(PROTOCOL_VERSION, conn.window)))
        conn.receive_data(sock.recv(65536))
        ev = conn.next_event()          # Hello from the guest, or NEED_DATA
        op = conn.open({"op": "ping"})
        sock.sendall(conn.send(op))

    After any ChannelError the connection is in ERROR: every further call raises
    LocalChannelError, except one `send(GoAway(...))` to tell the peer why.
    """

    def __init__(self, role: Role, window: int = DEFAULT_WINDOW) -> None:
        if role not in ("host", "guest"):
            raise LocalChannelError(f"role must be 'host' or 'guest', not {role!r}")
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            raise LocalChannelError(f"window must be in [1, {MAX_WINDOW}]")
        self.role: Role = role
        self.peer_role: Role = "guest" if role == "host" else "host"
        self.window = window
        self.peer_hello: Hello | None = None
        self.hello_sent = False
        self.errored = False
        self._goaway_sent = False
        self._goaway_received = False
        self._streams: dict[int, _Stream] = {}
        self._highest_id = 0  # highest stream id ever opened (ids only grow)
        self._next_id = 1
        self._buf = bytearray()
        self._off = 0
        self._eof = False
        # A fragmented OPEN being received (guest role): its stream id and parts so far.
        self._open_sid = 0
        self._open_parts: list[bytes] | None = None
        self._open_len = 0

    # ---- public API -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the transport; b"" means the transport reached EOF."""
        self._check_usable()
        if self._eof:
            if data:
                self._fail(LocalChannelError("receive_data() after EOF"))
            return
        if not data:
            self._eof = True
            return
        self._buf += data

    def next_event(self) -> Event | _Sentinel:
        """The next complete event, or NEED_DATA, or CLOSED. Raises RemoteChannelError."""
        self._check_usable()
        try:
            while True:
                if self._goaway_received:
                    return CLOSED
                ev = self._parse_one()
                if ev is None:
                    continue  # a late frame for a closed stream
                return ev
        except ChannelError as e:
            self._fail(e)
            raise

    def send(self, event: Event) -> bytes:
        """Check `event` against the protocol state, record it, and return its frame."""
        if isinstance(event, GoAway):
            if self._goaway_sent:
                self._fail(LocalChannelError("GOAWAY already sent"))
            self._goaway_sent = True
            return encode(event)
        self._check_usable()
        if self._goaway_sent:
            self._fail(LocalChannelError("cannot send after GOAWAY"))
        if not isinstance(event, _EVENT_TYPES):
            self._fail(LocalChannelError(f"not a channel event: {event!r}"))
        # Encoding first: a payload that cannot be sent (too big, not JSON) is refused before
        # anything is recorded, so the connection stays usable for other requests.
        raw = encode(event)
        try:
            if not self._apply(event, local=True):
                return b""
            return raw
        except ChannelError as e:
            self._fail(e)
            raise

    def send_data(self, stream_id: int, fd: int, data: bytes) -> bytes:
        """Encode `data` as as many DATA frames as needed (each <= MAX_PAYLOAD)."""
        if len(data) > self.credit(stream_id):
            self._fail(LocalChannelError(f"{len(data)} bytes exceed credit on stream {stream_id}"))
        return b"".join(
            self.send(Data(stream_id, fd, bytes(data[i : i + MAX_PAYLOAD])))
            for i in range(0, len(data), MAX_PAYLOAD)
        )

    def open(self, request: dict) -> Open:
        """Allocate the next stream id (host only); pass the result to send()."""
        self._check_usable()
        if self.role != "host":
            self._fail(LocalChannelError("only the host opens streams"))
        if self._next_id > MAX_STREAM_ID:
            self._fail(LocalChannelError("stream ids exhausted"))
        ev = Open(self._next_id, request)
        self._next_id += 1
        return ev

    def credit(self, stream_id: int) -> int:
        """DATA bytes we may still send on `stream_id` (0 for closed streams)."""
        self._check_usable()
        if self.peer_hello is None:
            self._fail(LocalChannelError("no credit before the peer's HELLO"))
        st = self._streams.get(stream_id)
        return st.send_credit if st is not None else 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> list[int]:
        return sorted(self._streams)

    # ---- internals ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.errored:
            raise LocalChannelError("channel connection is in ERROR state")

    def _fail(self, err: ChannelError) -> None:
        self.errored = True
        raise err

    def _parse_one(self) -> Event | None | _Sentinel:
        buf, off = self._buf, self._off
        avail = len(buf) - off
        if avail < HEADER_SIZE:
            return self._need(avail)
        ftype, flags, sid, length = parse_header(buf, off)
        if avail < HEADER_SIZE + length:
            return self._need(avail)
        start = off + HEADER_SIZE
        payload = bytes(buf[start : start + length])
        self._off = start + length
        if self._off >= _COMPACT_AT and self._off * 2 >= len(buf):
            del buf[: self._off]
            self._off = 0
        if self._open_parts is not None or (ftype == T_OPEN and flags & F_MORE):
            whole = self._reassemble(ftype, flags, sid, payload)
            if whole is None:
                return None  # more of the OPEN to come
            flags, payload = 0, whole
        ev = decode(ftype, flags, sid, payload)
        return ev if self._apply(ev, local=False) else None

    def _need(self, avail: int) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if avail:
            raise RemoteChannelError(f"transport closed inside a frame ({avail} bytes left)")
        if self._open_parts is not None:
            raise RemoteChannelError("transport closed inside a fragmented OPEN")
        return CLOSED

    def _reassemble(self, ftype: int, flags: int, sid: int, payload: bytes) -> bytes | None:
        """One frame of a fragmented OPEN: None while more follows, then the whole request.
        The fragments are contiguous: any other frame in between is a protocol error."""
        if self._open_parts is not None and (ftype != T_OPEN or sid != self._open_sid):
            raise RemoteChannelError(
                f"frame type 0x{ftype:02x} for stream {sid} inside the fragmented OPEN of "
                f"stream {self._open_sid}")
        if self.peer_role != "host":
            raise RemoteChannelError("Open may only be sent by the host")
        if self.peer_hello is None:
            raise RemoteChannelError("Open before HELLO")
        if flags & ~F_MORE:
            raise RemoteChannelError(f"bad frame type 0x{ftype:02x}: nonzero flags {flags}")
        if self._open_parts is None:
            if sid <= self._highest_id:
                raise RemoteChannelError(f"stream id {sid} reused or not increasing")
            self._open_sid, self._open_parts, self._open_len = sid, [], 0
        self._open_len += len(payload)
        if self._open_len > MAX_REQUEST:
            raise RemoteChannelError(f"OPEN request of stream {sid} exceeds {MAX_REQUEST} bytes")
        self._open_parts.append(payload)
        if flags & F_MORE:
            return None
        whole = b"".join(self._open_parts)
        self._open_parts = None
        return whole

    def _apply(self, ev: Event, *, local: bool) -> bool:
        """Validate and record `ev`. Returns False when it is a no-op (closed stream)."""
        err = LocalChannelError if local else RemoteChannelError
        sender: Role = self.role if local else self.peer_role

        if isinstance(ev, Hello):
            if local:
                if self.hello_sent:
                    raise err("HELLO already sent")
                self.hello_sent = True
            else:
                if self.peer_hello is not None:
                    raise err("duplicate HELLO")
                if ev.version != PROTOCOL_VERSION:
                    raise err(f"protocol version {ev.version}, we speak {PROTOCOL_VERSION}")
                self.peer_hello = ev
            return True
        if local and not self.hello_sent:
            raise err("HELLO must be the first frame sent")
        if isinstance(ev, GoAway):  # only reached for received GOAWAY
            self._goaway_received = True
            return True
        if not local and self.peer_hello is None:
            raise err(f"{type(ev).__name__} before HELLO")

        allowed = _SENDER.get(type(ev))
        if allowed is not None and allowed != sender:
            raise err(f"{type(ev).__name__} may only be sent by the {allowed}")
        if isinstance(ev, Data | Eof) and ev.fd not in _FDS[sender]:
            raise err(f"{type(ev).__name__} on fd {ev.fd} may not be sent by the {sender}")

        sid = ev.stream_id
        if isinstance(ev, Open):
            if self.peer_hello is None:
                raise err("OPEN before the guest's HELLO")
            if sid <= self._highest_id:
                raise err(f"stream id {sid} reused or not increasing")
            if len(self._streams) >= MAX_OPEN_STREAMS:
                raise err(f"more than {MAX_OPEN_STREAMS} open streams")
            self._highest_id = sid
            self._streams[sid] = _Stream(OPEN, self.peer_hello.window, self.window)
            if local:
                self._next_id = max(self._next_id, sid + 1)
            return True

        st = self._streams.get(sid)
        if st is None:
            if sid > self._highest_id:
                raise err(f"{type(ev).__name__} for stream {sid}, which was never opened")
            if local and isinstance(ev, Data):
                raise err(f"DATA on closed stream {sid}")
            return False  # closed stream: late frames both ways are dropped
        if st.state == RESET and self.role == "guest" and not local:
            return False  # the host reset it; whatever else it says is moot

        if isinstance(ev, Data):
            if ev.fd in (st.eof_sent if local else st.eof_recv):
                raise err(f"DATA on fd {ev.fd} of stream {sid} after EOF")
            n = len(ev.data)
            if local:
                if st.state == RESET and self.role == "host":
                    raise err(f"DATA on stream {sid} after RESET")
                if n > st.send_credit:
                    raise err(f"DATA of {n} bytes exceeds credit {st.send_credit} on {sid}")
                st.send_credit -= n
            else:
                if n > st.recv_window:
                    raise err(f"DATA of {n} bytes exceeds window {st.recv_window} on {sid}")
                st.recv_window -= n
        elif isinstance(ev, Window):
            if local:
                if st.recv_window + ev.increment > MAX_WINDOW:
                    raise err(f"WINDOW would grow stream {sid} past {MAX_WINDOW}")
                st.recv_window += ev.increment
            else:
                if st.send_credit + ev.increment > MAX_WINDOW:
                    raise err(f"WINDOW grows credit of stream {sid} past {MAX_WINDOW}")
                st.send_credit += ev.increment
        elif isinstance(ev, Eof):
            (st.eof_sent if local else st.eof_recv).add(ev.fd)
        elif isinstance(ev, Exit | Reply):
            del self._streams[sid]
        elif isinstance(ev, Reset):
            if sender == "guest":
                del self._streams[sid]
            else:
                st.state = RESET
        # Resize, Signal: no state change.
        return True
