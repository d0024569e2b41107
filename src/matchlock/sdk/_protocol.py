"""Sans-I/O core of the SDK's JSON-RPC client (spec/rpc-protocol.md §1).

Requests in, bytes out; bytes in, events out; no sockets, threads or event loop. Both
`Client` (threads) and `AsyncClient` (asyncio) drive one `ClientProtocol` each:

    rid, line = proto.request("exec", {"command": "true"}, waiter)   # write `line`
    for ev in proto.receive_data(chunk): ...                           # Completed, Output,
                                                                       # Ready, ServerEvent
`waiter` is whatever the shell uses to wake the caller; the core hands it back in the
events of that request and never looks inside it.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from matchlock.rpc._codec import FrameDecoder, Raw
from matchlock.rpc._codec import ProtocolError as CodecError
from matchlock.sdk._errors import ProtocolError, RPCError

W = TypeVar("W")

# A response line can be big: a 16 MiB read_file is ~22.4 MiB of base64, buffered exec
# output has no protocol limit. The cap only stops a server that never sends "\n" from
# taking all memory.
MAX_LINE = 512 << 20

STDOUT, STDERR = 1, 2

# Request-scoped notifications (spec §1.5): method -> output stream; routed by params.id
# to the pending request whose method is the part before the dot.
_OUTPUTS = {
    "exec_stream.stdout": STDOUT, "exec_stream.stderr": STDERR,
    "exec_pipe.stdout": STDOUT, "exec_pipe.stderr": STDERR,
    "exec_tty.stdout": STDOUT,
    "log_stream.data": STDOUT,
}
_READY = frozenset({"exec_pipe.ready", "exec_tty.ready"})


@dataclass(frozen=True, slots=True)
class Completed(Generic[W]):
    """The final response of a request: exactly one of `result`/`error` is meaningful."""

    waiter: W
    result: Any
    error: RPCError | None


@dataclass(frozen=True, slots=True)
class Output(Generic[W]):
    """A chunk of a request's output (already base64-decoded)."""

    waiter: W
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ready(Generic[W]):
    """exec_pipe/exec_tty may now receive input."""

    waiter: W


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """An `event` notification's params (spec §2.16)."""

    params: dict[str, Any]


Incoming = Completed[W] | Output[W] | Ready[W] | ServerEvent


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class LineSplitter:
    """NDJSON framing with a bounded partial line, plus the raw payloads our server sends
    when an exec asks for them (`"raw": true`, rpc/_codec.py): items are lines (bytes)
    or `Raw` (method, id, data)."""

    __slots__ = ("_frames", "_max")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._frames = FrameDecoder(max_line)
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes | Raw]:
        frames = self._frames
        frames.feed(data)
        items: list[bytes | Raw] = []
        try:
            while (item := frames.next_item()) is not None:
                items.append(item)
        except CodecError:
            raise ProtocolError(f"server sent a line longer than {self._max} bytes "
                                "(or a bad raw payload)") from None
        return items


class ClientProtocol(Generic[W]):
    """Ids, pending requests and routing of responses and notifications."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._last_id = 0
        self._pending: dict[int, tuple[str, W]] = {}
        self._splitter = LineSplitter(max_line)

    # outgoing

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def request(self, method: str, params: dict[str, Any] | None,
                waiter: W) -> tuple[int, bytes]:
        """Register a request that expects a response; returns its id and line."""
        rid = self._next_id()
        self._pending[rid] = (method, waiter)
        return rid, self._line(method, params, rid)

    def message(self, method: str, params: dict[str, Any] | None) -> bytes:
        """A fire-and-forget message (stdin, eof, resize, timeout cancel). Like the
        reference Python SDK it carries a fresh id; the server never answers it."""
        return self._line(method, params, self._next_id())

    def forget(self, rid: int) -> None:
        """Stop routing anything for `rid` (the caller gave up on it)."""
        self._pending.pop(rid, None)

    def pending(self) -> dict[int, str]:
        return {rid: method for rid, (method, _) in self._pending.items()}

    @staticmethod
    def _line(method: str, params: dict[str, Any] | None, rid: int) -> bytes:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params:
            msg["params"] = params
        return encode(msg)

    # incoming

    def receive_data(self, data: bytes) -> list[Incoming[W]]:
        events: list[Incoming[W]] = []
        for item in self._splitter.feed(data):
            ev = self._raw(item) if type(item) is Raw else self._receive_line(item)
            if ev is not None:
                events.append(ev)
        return events

    def connection_lost(self) -> list[W]:
        """Every waiter still pending; the shell fails them."""
        waiters = [w for _, w in self._pending.values()]
        self._pending.clear()
        return waiters

    def _receive_line(self, line: bytes) -> Incoming[W] | None:
        if not line.strip():
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            return None  # not JSON: ignored, as every reference client does
        if not isinstance(msg, dict):
            return None
        rid = msg.get("id")
        if rid is None:
            return self._notification(msg)
        if isinstance(rid, bool) or not isinstance(rid, int):
            return None
        entry = self._pending.pop(rid, None)
        if entry is None:
            return None  # late answer to a request we gave up on
        err = msg.get("error")
        if err:
            return Completed(entry[1], None, _rpc_error(err))
        return Completed(entry[1], msg.get("result"), None)

    def _raw(self, raw: Raw) -> Output[W] | None:
        """Output as raw bytes: no base64 (CPython decodes it at ~150-250 MB/s, slower
        than a guest writes)."""
        stream = _OUTPUTS.get(raw.method)
        entry = self._pending.get(raw.id)
        if stream is None or entry is None or raw.method.partition(".")[0] != entry[0]:
            return None
        return Output(entry[1], stream, raw.data)

    def _notification(self, msg: dict[str, Any]) -> Output[W] | Ready[W] | ServerEvent | None:
        method = msg.get("method")
        params = msg.get("params")
        if not isinstance(method, str) or not isinstance(params, dict):
            return None
        if method == "event":
            return ServerEvent(params)
        stream = _OUTPUTS.get(method)
        if stream is None and method not in _READY:
            return None
        rid = params.get("id")
        entry = self._pending.get(rid) if isinstance(rid, int) else None
        if entry is None or method.partition(".")[0] != entry[0]:
            return None
        if stream is None:
            return Ready(entry[1])
        data = params.get("data", "")
        if not isinstance(data, str):
            return None
        try:
            chunk = binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            return None
        return Output(entry[1], stream, chunk)


def _rpc_error(err: Any) -> RPCError:
    if not isinstance(err, dict):
        return RPCError(RPCError.INTERNAL_ERROR, f"malformed error response: {err!r}")
    code = err.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        code = RPCError.INTERNAL_ERROR
    return RPCError(code, str(err.get("message", "")))
