"""Channel frames: constants, errors, events, and one encoder/decoder per frame type.

Events are frozen, slotted dataclasses that validate themselves at construction and must not
be subclassed. A constructor rejects what the protocol forbids with `LocalChannelError`; the
decoders relabel that as `RemoteChannelError` because there the bytes came from the peer.
See docs/channel-protocol.md for the wire format.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from matchlock.errors import GuestError

# Version spoken in HELLO; a mismatch ends the connection (there is no negotiation: host
# and guest ship together). 2: an OPEN request may span several frames (F_MORE).
PROTOCOL_VERSION = 2
# Largest frame payload: a 64 KiB DATA frame amortises the header and bounds each read.
MAX_PAYLOAD = 65536
# Initial per-stream credit: enough to keep a virtio-serial link busy, small enough that
# neither side ever buffers more than this per stream.
DEFAULT_WINDOW = 262144
# type u8, flags u8, reserved u16, stream id u32, length u32.
HEADER_SIZE = 12
# JSON frames (HELLO, EXIT, REPLY, GOAWAY) must fit one frame; no reassembly.
MAX_JSON_PAYLOAD = MAX_PAYLOAD
# OPEN flag: more of this request follows in the next OPEN frame (same stream id, nothing
# else in between). A request (an exec's argv and env) may reach the guest's ARG_MAX, and
# its JSON escaping may make it up to 6x that: 16 MiB bounds the guest's reassembly buffer.
F_MORE = 0x01
MAX_REQUEST = 16 << 20
# Credit and window sizes stay below 2^31 so that neither end ever overflows a signed int.
MAX_WINDOW = 2**31 - 1
# Stream ids are u32; 0 is the connection itself.
MAX_STREAM_ID = 2**32 - 1
# Open streams the guest accepts at once (the C agent has a table of this size).
MAX_OPEN_STREAMS = 256

T_HELLO = 0x01
T_OPEN = 0x02
T_DATA = 0x03
T_WINDOW = 0x04
T_EOF = 0x05
T_RESIZE = 0x06
T_SIGNAL = 0x07
T_EXIT = 0x08
T_RESET = 0x09
T_REPLY = 0x0A
T_GOAWAY = 0x0B

_HEADER = struct.Struct(">BBHII")


class ChannelError(GuestError):
    """The channel broke; the connection is unusable afterwards."""


class LocalChannelError(ChannelError):
    """We (the caller of the channel core) misused it."""


class RemoteChannelError(ChannelError):
    """The peer sent something the protocol forbids."""


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:  # bool is not an int here
        raise LocalChannelError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def _check_stream(stream_id: object) -> None:
    _check_int("stream_id", stream_id, 1, MAX_STREAM_ID)


# Do not subclass events: the decoder table and the state machine dispatch on exact types.


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    window: int
    uptime_ns: int | None = None

    def __post_init__(self) -> None:
        _check_int("version", self.version, 0, MAX_WINDOW)
        _check_int("window", self.window, 1, MAX_WINDOW)
        if self.uptime_ns is not None:
            _check_int("uptime_ns", self.uptime_ns, 0, 2**63 - 1)


@dataclass(frozen=True, slots=True)
class Open:
    stream_id: int
    request: dict[str, Any]

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        if not isinstance(self.request, dict) or not isinstance(self.request.get("op"), str):
            raise LocalChannelError('OPEN request must be a JSON object with a string "op"')


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    fd: int
    data: bytes

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        _check_int("fd", self.fd, 0, 2)
        if not isinstance(self.data, bytes):
            raise LocalChannelError("Data.data must be bytes")
        if not 0 < len(self.data) <= MAX_PAYLOAD:
            raise LocalChannelError(f"Data must hold 1..{MAX_PAYLOAD} bytes, got {len(self.data)}")


@dataclass(frozen=True, slots=True)
class Window:
    stream_id: int
    increment: int

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        _check_int("increment", self.increment, 1, MAX_WINDOW)


@dataclass(frozen=True, slots=True)
class Eof:
    stream_id: int
    fd: int

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        _check_int("fd", self.fd, 0, 2)


@dataclass(frozen=True, slots=True)
class Resize:
    stream_id: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        _check_int("rows", self.rows, 0, 65535)
        _check_int("cols", self.cols, 0, 65535)


@dataclass(frozen=True, slots=True)
class Signal:
    stream_id: int
    signum: int

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        _check_int("signum", self.signum, 1, 255)


@dataclass(frozen=True, slots=True)
class Exit:
    stream_id: int
    code: int | None = None
    signal: int | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        given = [x for x in (self.code, self.signal, self.error) if x is not None]
        if len(given) != 1:
            raise LocalChannelError("Exit needs exactly one of code, signal, error")
        if self.code is not None:
            _check_int("code", self.code, 0, 255)
        if self.signal is not None:
            _check_int("signal", self.signal, 1, 255)
        if self.error is not None and not isinstance(self.error, str):
            raise LocalChannelError("Exit.error must be a str")


@dataclass(frozen=True, slots=True)
class Reset:
    stream_id: int

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)


@dataclass(frozen=True, slots=True)
class Reply:
    stream_id: int
    body: dict[str, Any]

    def __post_init__(self) -> None:
        _check_stream(self.stream_id)
        if not isinstance(self.body, dict) or not isinstance(self.body.get("ok"), bool):
            raise LocalChannelError('Reply body must be a JSON object with a bool "ok"')


@dataclass(frozen=True, slots=True)
class GoAway:
    error: str

    def __post_init__(self) -> None:
        if not isinstance(self.error, str):
            raise LocalChannelError("GoAway.error must be a str")


Event = Hello | Open | Data | Window | Eof | Resize | Signal | Exit | Reset | Reply | GoAway


# ---- encoding ---------------------------------------------------------------------------


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise LocalChannelError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(ftype, flags, 0, stream_id, len(payload)) + payload


def _json(obj: dict[str, Any], limit: int = MAX_JSON_PAYLOAD) -> bytes:
    try:
        raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False).encode()
    except (TypeError, ValueError) as e:  # UnicodeEncodeError: a lone surrogate
        raise LocalChannelError(f"not JSON-serialisable: {e}") from None
    if len(raw) > limit:
        raise LocalChannelError(f"JSON payload of {len(raw)} bytes exceeds {limit}")
    return raw


def _open_frames(stream_id: int, request: dict[str, Any]) -> bytes:
    raw = _json(request, MAX_REQUEST)
    last = max(0, (len(raw) - 1) // MAX_PAYLOAD)
    return b"".join(
        _frame(T_OPEN, F_MORE if i < last else 0, stream_id,
               raw[i * MAX_PAYLOAD:(i + 1) * MAX_PAYLOAD])
        for i in range(last + 1))


def encode(event: Event) -> bytes:
    """Encode one event as one frame, an OPEN as one or more (no state checks; see
    ChannelConnection.send)."""
    match event:
        case Hello(version=v, window=w, uptime_ns=u):
            body: dict[str, Any] = {"version": v, "window": w}
            if u is not None:
                body["uptime_ns"] = u
            return _frame(T_HELLO, 0, 0, _json(body))
        case Open(stream_id=s, request=r):
            return _open_frames(s, r)
        case Data(stream_id=s, fd=fd, data=d):
            return _frame(T_DATA, fd, s, d)
        case Window(stream_id=s, increment=i):
            return _frame(T_WINDOW, 0, s, struct.pack(">I", i))
        case Eof(stream_id=s, fd=fd):
            return _frame(T_EOF, fd, s, b"")
        case Resize(stream_id=s, rows=r, cols=c):
            return _frame(T_RESIZE, 0, s, struct.pack(">HH", r, c))
        case Signal(stream_id=s, signum=n):
            return _frame(T_SIGNAL, 0, s, bytes([n]))
        case Exit(stream_id=s, code=c, signal=sig, error=err):
            if c is not None:
                body = {"code": c}
            elif sig is not None:
                body = {"signal": sig}
            else:
                body = {"error": err}
            return _frame(T_EXIT, 0, s, _json(body))
        case Reset(stream_id=s):
            return _frame(T_RESET, 0, s, b"")
        case Reply(stream_id=s, body=b):
            return _frame(T_REPLY, 0, s, _json(b))
        case GoAway(error=e):
            return _frame(T_GOAWAY, 0, 0, _json({"error": e}))
    raise LocalChannelError(f"not a channel event: {event!r}")


# ---- decoding ---------------------------------------------------------------------------
# Each decoder gets (flags, stream_id, payload) with the header already checked for
# reserved == 0 and length <= MAX_PAYLOAD; it raises LocalChannelError on bad content,
# which the connection relabels as RemoteChannelError.


def _load_obj(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LocalChannelError("invalid JSON payload") from None
    if not isinstance(obj, dict):
        raise LocalChannelError("JSON payload is not an object")
    return obj


def _need(flags: int, stream_id: int, payload: bytes, *, sid: bool, size: int | None) -> None:
    if flags != 0:
        raise LocalChannelError(f"nonzero flags {flags}")
    if sid and stream_id == 0:
        raise LocalChannelError("stream id 0 on a stream frame")
    if not sid and stream_id != 0:
        raise LocalChannelError("connection frame with nonzero stream id")
    if size is not None and len(payload) != size:
        raise LocalChannelError(f"payload must be {size} bytes, got {len(payload)}")


def _d_hello(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=False, size=None)
    o = _load_obj(payload)
    return Hello(version=o.get("version"), window=o.get("window"), uptime_ns=o.get("uptime_ns"))  # type: ignore[arg-type]


def _d_open(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=True, size=None)
    return Open(sid, _load_obj(payload))


def _d_data(flags: int, sid: int, payload: bytes) -> Event:
    _need(0, sid, payload, sid=True, size=None)
    return Data(sid, flags, bytes(payload))


def _d_window(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=True, size=4)
    return Window(sid, struct.unpack(">I", payload)[0])


def _d_eof(flags: int, sid: int, payload: bytes) -> Event:
    _need(0, sid, payload, sid=True, size=0)
    return Eof(sid, flags)


def _d_resize(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=True, size=4)
    rows, cols = struct.unpack(">HH", payload)
    return Resize(sid, rows, cols)


def _d_signal(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=True, size=1)
    return Signal(sid, payload[0])


def _d_exit(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=True, size=None)
    o = _load_obj(payload)
    return Exit(sid, code=o.get("code"), signal=o.get("signal"), error=o.get("error"))


def _d_reset(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=True, size=0)
    return Reset(sid)


def _d_reply(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=True, size=None)
    return Reply(sid, _load_obj(payload))


def _d_goaway(flags: int, sid: int, payload: bytes) -> Event:
    _need(flags, sid, payload, sid=False, size=None)
    err = _load_obj(payload).get("error")
    if not isinstance(err, str):
        raise LocalChannelError('GOAWAY needs a string "error"')
    return GoAway(err)


DECODERS: dict[int, Callable[[int, int, bytes], Event]] = {
    T_HELLO: _d_hello,
    T_OPEN: _d_open,
    T_DATA: _d_data,
    T_WINDOW: _d_window,
    T_EOF: _d_eof,
    T_RESIZE: _d_resize,
    T_SIGNAL: _d_signal,
    T_EXIT: _d_exit,
    T_RESET: _d_reset,
    T_REPLY: _d_reply,
    T_GOAWAY: _d_goaway,
}


def parse_header(buf: bytes | bytearray | memoryview, offset: int) -> tuple[int, int, int, int]:
    """Return (type, flags, stream_id, length); raise RemoteChannelError on a bad header."""
    ftype, flags, reserved, sid, length = _HEADER.unpack_from(buf, offset)
    if ftype not in DECODERS:
        raise RemoteChannelError(f"unknown frame type 0x{ftype:02x}")
    if reserved != 0:
        raise RemoteChannelError(f"reserved header field is {reserved}, not 0")
    if length > MAX_PAYLOAD:
        raise RemoteChannelError(f"frame length {length} exceeds {MAX_PAYLOAD}")
    return ftype, flags, sid, length


def decode(ftype: int, flags: int, sid: int, payload: bytes) -> Event:
    try:
        return DECODERS[ftype](flags, sid, payload)
    except LocalChannelError as e:
        raise RemoteChannelError(f"bad frame type 0x{ftype:02x}: {e}") from None
