"""NDJSON JSON-RPC 2.0 codec (spec/rpc-protocol.md §1.2-1.3). Sans-I/O: bytes in,
messages out, messages in, bytes out; no asyncio, no sockets, no clock.

One JSON object per line, `\\n` terminated (a trailing `\\r` is tolerated, empty lines
are skipped). Binary payloads are standard base64. Output notifications
(`exec_stream.stdout` and friends) are the bulk of the traffic, so they have a fixed
layout that `encode_data` writes without json.dumps and `decode_server_line` reads back
without json.loads; any other spelling of the same message is still accepted.

Raw payloads (ours, for throughput: CPython's base64 runs at ~150-300 MB/s, slower than
a guest can write): a client that sends `"raw": true` in an exec request gets its output
notifications as `{"jsonrpc":"2.0","method":M,"params":{"id":N,"bytes":K}}\\n` followed
by exactly K raw bytes, and may send stdin the same way. Only that exact compact layout
announces a payload; clients that never ask (the reference SDKs) never see one.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import namedtuple

TYPE_CHECKING = False  # typing itself is not imported at run time (see below)
if TYPE_CHECKING:
    from typing import Any, NamedTuple


# Longest line a peer may send (the reference server's limit): bounds the buffer.
MAX_LINE = 10 << 20

_JSONRPC = "2.0"
_DATA_HEAD = b'{"jsonrpc":"2.0","method":"'
_DATA_MID = b'","params":{"id":'
_DATA_DATA = b',"data":"'
_DATA_TAIL = b'"}}'
_RAW_BYTES = b',"bytes":'
_RAW_TAIL = b"}}"
# Largest raw payload a peer may announce: the same bound as a line.
MAX_RAW = MAX_LINE


class ProtocolError(Exception):
    """The peer broke the framing (a line longer than MAX_LINE): end the session."""


# Messages are immutable named tuples rather than dataclasses: `matchlock exec` imports
# this module on its start-up path, and dataclasses (with inspect) cost ~20 ms there, and
# typing (for typing.NamedTuple) another ~4 ms; so type checkers read the typed classes
# below and the runtime builds the same tuples with collections.namedtuple.

if TYPE_CHECKING:

    class Request(NamedTuple):
        """Client -> server. `id` None: a notification (no response is expected)."""

        method: str
        params: dict[str, Any]
        id: int | None = None

    class Response(NamedTuple):
        """Server -> client: `error` is (code, message) or None."""

        id: int | None
        result: dict[str, Any] | None = None
        error: tuple[int, str] | None = None

    class Notification(NamedTuple):
        """Server -> client, no id. `data` holds the decoded bytes of a data notification."""

        method: str
        params: dict[str, Any]
        data: bytes | None = None

    class Raw(NamedTuple):
        """A raw-payload message: `method` with params {"id": id} and `data` bytes."""

        method: str
        id: int
        data: bytes

    class Invalid(NamedTuple):
        """A line that is not a valid message; the server answers -32700 and goes on."""

        reason: str

else:
    Request = namedtuple("Request", "method params id", defaults=(None,))
    Response = namedtuple("Response", "id result error", defaults=(None, None))
    Notification = namedtuple("Notification", "method params data", defaults=(None,))
    Raw = namedtuple("Raw", "method id data")
    Invalid = namedtuple("Invalid", "reason")


class LineDecoder:
    """Split a byte stream into lines. `feed()` buffers; `next_line()` returns one
    complete line (without the terminator), or None when more bytes are needed."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._scan = 0  # bytes already searched for b"\n"
        self._max = max_line

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        while True:
            i = self._buf.find(b"\n", self._scan)
            if i < 0:
                self._scan = len(self._buf)
                if self._scan > self._max:
                    raise ProtocolError(f"line longer than {self._max} bytes")
                return None
            if i > self._max:
                raise ProtocolError(f"line longer than {self._max} bytes")
            line = bytes(memoryview(self._buf)[:i])
            del self._buf[: i + 1]
            self._scan = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if line and not line.isspace():
                return line

    @property
    def buffered(self) -> int:
        return len(self._buf)


def _raw_header(line: bytes | bytearray) -> tuple[str, int, int] | None:
    """(method, id, size) if `line` is exactly a raw-payload header."""
    if not (line.startswith(_DATA_HEAD) and line.endswith(_RAW_TAIL)):
        return None
    m_end = line.find(_DATA_MID, len(_DATA_HEAD))
    b_at = line.find(_RAW_BYTES, m_end) if m_end >= 0 else -1
    if b_at < 0:
        return None
    method = bytes(line[len(_DATA_HEAD):m_end])
    rid = bytes(line[m_end + len(_DATA_MID):b_at])
    size = bytes(line[b_at + len(_RAW_BYTES):-len(_RAW_TAIL)])
    if not (rid.isdigit() and size.isdigit()) or b'"' in method or b"\\" in method:
        return None
    return method.decode(), int(rid), int(size)


class FrameDecoder:
    """Like LineDecoder, and also reads the raw payload a raw header announces.
    `next_item()` returns a line (bytes), a `Raw`, or None when more bytes are needed."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._max = max_line
        self._raw: tuple[str, int, int] | None = None  # a header whose payload is due

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_item(self) -> bytes | Raw | None:
        while True:
            if self._raw is not None:
                method, rid, size = self._raw
                if len(self._buf) < size:
                    return None
                data = bytes(memoryview(self._buf)[:size])
                del self._buf[:size]
                self._raw = None
                return Raw(method, rid, data)
            i = self._buf.find(b"\n", self._scan)
            if i < 0:
                self._scan = len(self._buf)
                if self._scan > self._max:
                    raise ProtocolError(f"line longer than {self._max} bytes")
                return None
            if i > self._max:
                raise ProtocolError(f"line longer than {self._max} bytes")
            line = bytes(memoryview(self._buf)[:i])
            del self._buf[: i + 1]
            self._scan = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            hdr = _raw_header(line) if line.startswith(_DATA_HEAD) else None
            if hdr is not None:
                if hdr[2] > MAX_RAW:
                    raise ProtocolError(f"raw payload of {hdr[2]} bytes (max {MAX_RAW})")
                self._raw = hdr
                continue
            if line and not line.isspace():
                return line


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _valid_id(v: object) -> bool:
    return type(v) is int and v >= 0


# -- server side -------------------------------------------------------------------------


def decode_request(line: bytes) -> Request | Invalid:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return Invalid("not JSON")
    if not isinstance(obj, dict):
        return Invalid("not a JSON object")
    method = obj.get("method")
    params = obj.get("params")
    rid = obj.get("id")
    if not isinstance(method, str):
        return Invalid("no method")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return Invalid("params must be an object")
    if rid is not None and not _valid_id(rid):
        return Invalid("id must be an unsigned integer")
    return Request(method, params, rid)


def encode_result(rid: int | None, result: dict[str, Any]) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": _JSONRPC, "result": result}
    if rid is not None:
        msg["id"] = rid
    return _dumps(msg)


def encode_error(rid: int | None, code: int, message: str) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": _JSONRPC, "error": {"code": int(code), "message": message}}
    if rid is not None:
        msg["id"] = rid
    return _dumps(msg)


def encode_notification(method: str, params: dict[str, Any]) -> bytes:
    return _dumps({"jsonrpc": _JSONRPC, "method": method, "params": params})


def encode_raw(method: str, rid: int, data: bytes) -> bytes:
    """A raw-payload message: the header line, then the bytes as they are."""
    return b"".join((_DATA_HEAD, method.encode(), _DATA_MID, str(rid).encode(), _RAW_BYTES,
                     str(len(data)).encode(), _RAW_TAIL, b"\n", data))


def encode_data(method: str, rid: int, data: bytes) -> bytes:
    """`{"jsonrpc":"2.0","method":M,"params":{"id":N,"data":B64}}` without json.dumps."""
    return b"".join((_DATA_HEAD, method.encode(), _DATA_MID, str(rid).encode(), _DATA_DATA,
                     base64.b64encode(data), _DATA_TAIL, b"\n"))


# -- client side -------------------------------------------------------------------------


def encode_request(method: str, params: dict[str, Any] | None, rid: int | None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": _JSONRPC, "method": method}
    if params:
        msg["params"] = params
    if rid is not None:
        msg["id"] = rid
    return _dumps(msg)


def encode_input(method: str, target: int, data: bytes) -> bytes:
    """An exec stdin message as a true notification (no top-level id, never answered)."""
    return encode_data(method, target, data)


def _fast_data(line: bytes) -> Notification | None:
    if not (line.startswith(_DATA_HEAD) and line.endswith(_DATA_TAIL)):
        return None
    m_end = line.find(_DATA_MID, len(_DATA_HEAD))
    if m_end < 0:
        return None
    d_start = line.find(_DATA_DATA, m_end)
    if d_start < 0:
        return None
    method = line[len(_DATA_HEAD):m_end]
    rid = line[m_end + len(_DATA_MID):d_start]
    if not rid.isdigit() or b'"' in method or b"\\" in method:
        return None
    b64 = line[d_start + len(_DATA_DATA):-len(_DATA_TAIL)]
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    return Notification(method.decode(), {"id": int(rid)}, data)


def decode_server_line(line: bytes) -> Response | Notification | None:
    """A line from the server; None for lines clients ignore (not JSON, not a message)."""
    fast = _fast_data(line)
    if fast is not None:
        return fast
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    rid = obj.get("id")
    if rid is None:
        method, params = obj.get("method"), obj.get("params")
        if not isinstance(method, str):
            # A response without id: a parse error or an id-less request's answer.
            err = obj.get("error")
            if isinstance(err, dict):
                return Response(None, None, (int(err.get("code", 0)), str(err.get("message"))))
            return None
        params = params if isinstance(params, dict) else {}
        data = None
        if isinstance(params.get("data"), str):
            try:
                data = base64.b64decode(params["data"], validate=True)
            except (binascii.Error, ValueError):
                data = None
        return Notification(method, params, data)
    if not _valid_id(rid):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        return Response(rid, None, (int(err.get("code", 0)), str(err.get("message", ""))))
    res = obj.get("result")
    return Response(rid, res if isinstance(res, dict) else {}, None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object) -> bytes:
    """Standard base64 with padding; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from None
