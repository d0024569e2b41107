"""The sans-I/O protocol core: framing under every chunking, ids, routing of responses
and notifications, errors, and what it ignores."""

from __future__ import annotations

import base64
import json

import pytest

from matchlock import ProtocolError, RPCError
from matchlock.sdk._protocol import (
    STDERR,
    STDOUT,
    ClientProtocol,
    Completed,
    LineSplitter,
    Output,
    Ready,
    ServerEvent,
)


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def feed(proto: ClientProtocol, data: bytes, chunking: str) -> list:
    if chunking == "whole":
        return proto.receive_data(data)
    if chunking == "bytewise":
        events = []
        for i in range(len(data)):
            events += proto.receive_data(data[i:i + 1])
        return events
    mid = len(data) // 2
    return proto.receive_data(data[:mid]) + proto.receive_data(data[mid:])


CHUNKINGS = ["whole", "bytewise", "halves"]


def test_request_lines_and_ids():
    p: ClientProtocol[str] = ClientProtocol()
    rid, data = p.request("exec", {"command": "true"}, "w1")
    assert rid == 1
    assert json.loads(data) == {"jsonrpc": "2.0", "method": "exec", "id": 1,
                                "params": {"command": "true"}}
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    rid2, data2 = p.request("log", None, "w2")
    assert rid2 == 2 and "params" not in json.loads(data2)
    msg = json.loads(p.message("exec_pipe.stdin_eof", {"id": 1}))
    assert msg["id"] == 3 and msg["params"] == {"id": 1}
    assert p.pending() == {1: "exec", 2: "log"}


def test_newline_in_params_stays_one_line():
    p: ClientProtocol[str] = ClientProtocol()
    _, data = p.request("exec", {"command": "printf 'a\nb'\r\n"}, "w")
    assert data.count(b"\n") == 1


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_out_of_order_responses_reach_their_waiters(chunking):
    p: ClientProtocol[str] = ClientProtocol()
    a, _ = p.request("exec", {}, "A")
    b, _ = p.request("exec", {}, "B")
    data = line({"jsonrpc": "2.0", "result": {"n": "b"}, "id": b}) + \
        line({"jsonrpc": "2.0", "result": {"n": "a"}, "id": a})
    events = feed(p, data, chunking)
    assert events == [Completed("B", {"n": "b"}, None), Completed("A", {"n": "a"}, None)]
    assert p.pending() == {}


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_notifications_routed_by_params_id(chunking):
    p: ClientProtocol[str] = ClientProtocol()
    s, _ = p.request("exec_stream", {}, "S")
    t, _ = p.request("exec_pipe", {}, "P")
    data = b"".join([
        line({"jsonrpc": "2.0", "method": "exec_pipe.ready", "params": {"id": t}}),
        line({"jsonrpc": "2.0", "method": "exec_stream.stdout",
              "params": {"id": s, "data": b64(b"\x00out")}}),
        line({"jsonrpc": "2.0", "method": "exec_pipe.stderr",
              "params": {"id": t, "data": b64(b"err")}}),
        line({"jsonrpc": "2.0", "method": "event", "params": {"type": "file"}}),
    ])
    assert feed(p, data, chunking) == [
        Ready("P"), Output("S", STDOUT, b"\x00out"), Output("P", STDERR, b"err"),
        ServerEvent({"type": "file"})]


def test_error_response_becomes_rpc_error():
    p: ClientProtocol[str] = ClientProtocol()
    rid, _ = p.request("create", {}, "C")
    (ev,) = p.receive_data(line({"jsonrpc": "2.0", "id": rid,
                                 "error": {"code": -32000, "message": "VM not created"}}))
    assert isinstance(ev, Completed) and ev.result is None
    assert isinstance(ev.error, RPCError)
    assert (ev.error.code, ev.error.message, str(ev.error)) == (
        -32000, "VM not created", "[-32000] VM not created")
    assert ev.error.is_vm_error()


def test_null_error_means_success_and_malformed_error_is_internal():
    p: ClientProtocol[str] = ClientProtocol()
    a, _ = p.request("x", {}, "A")
    b, _ = p.request("y", {}, "B")
    ev_a, ev_b = p.receive_data(
        line({"id": a, "error": None, "result": {"ok": 1}}) + line({"id": b, "error": "boom"}))
    assert ev_a == Completed("A", {"ok": 1}, None)
    assert ev_b.error.code == RPCError.INTERNAL_ERROR


def test_ignored_lines():
    p: ClientProtocol[str] = ClientProtocol()
    s, _ = p.request("exec_stream", {}, "S")
    data = b"".join([
        b"not json\n", b"\n", b"   \r\n", b"[1, 2]\n", b"\"str\"\n",
        line({"jsonrpc": "2.0", "result": {}, "id": 4242}),          # unknown id
        line({"jsonrpc": "2.0", "result": {}, "id": "1"}),           # non-integer id
        line({"jsonrpc": "2.0", "result": {}, "id": True}),          # bool is not an id
        line({"method": "exec_stream.stdout", "params": {"id": 99, "data": "eA=="}}),
        line({"method": "exec_pipe.stdout", "params": {"id": s, "data": "eA=="}}),  # wrong family
        line({"method": "exec_stream.stdout", "params": {"id": s, "data": "!!bad"}}),
        line({"method": "exec_stream.stdout", "params": {"id": s, "data": 5}}),
        line({"method": "something.new", "params": {"id": s}}),
        line({"method": "event", "params": "not an object"}),
        line({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}}),
    ])
    assert p.receive_data(data) == []
    assert p.pending() == {1: "exec_stream"}


def raw(method: str, rid: int, data: bytes) -> bytes:
    """What our server sends for an exec that asked for `"raw": true` (rpc/_codec.py)."""
    return (b'{"jsonrpc":"2.0","method":"%s","params":{"id":%d,"bytes":%d}}\n'
            % (method.encode(), rid, len(data)) + data)


def test_raw_payloads_under_every_chunking():
    """Raw output is the exact bytes (newlines and JSON-looking bytes included), mixed
    with base64 notifications and the response, however the stream is cut."""
    p0: ClientProtocol[str] = ClientProtocol()
    rid, _ = p0.request("exec_stream", {"raw": True}, "S")
    tricky = b'x\n{"id": 1, "result": {}}\n\x00\xff'
    data = b"".join([
        raw("exec_stream.stdout", rid, tricky),
        line({"jsonrpc": "2.0", "method": "exec_stream.stderr",
              "params": {"id": rid, "data": b64(b"err")}}),
        raw("exec_stream.stderr", rid, b""),
        raw("exec_stream.stdout", rid, b"end"),
        line({"jsonrpc": "2.0", "id": rid, "result": {"exit_code": 0}}),
    ])
    want = [Output("S", STDOUT, tricky), Output("S", STDERR, b"err"),
            Output("S", STDERR, b""), Output("S", STDOUT, b"end"),
            Completed("S", {"exit_code": 0}, None)]
    for step in (1, 2, 3, 7, 64, len(data)):
        p: ClientProtocol[str] = ClientProtocol()
        p.request("exec_stream", {"raw": True}, "S")
        got = []
        for i in range(0, len(data), step):
            got += p.receive_data(data[i:i + step])
        assert got == want, step


def test_raw_payload_for_no_one_is_skipped_whole():
    """A payload for an unknown id or the wrong family is consumed, not parsed as lines."""
    p: ClientProtocol[str] = ClientProtocol()
    rid, _ = p.request("exec_stream", {}, "S")
    fake_response = line({"jsonrpc": "2.0", "id": rid, "result": {"exit_code": 9}})
    data = (raw("exec_stream.stdout", 99, fake_response)
            + raw("exec_pipe.stdout", rid, fake_response)
            + raw("log_stream.nope", rid, fake_response))
    assert p.receive_data(data) == []
    assert p.pending() == {rid: "exec_stream"}


def test_raw_payload_larger_than_allowed_ends_the_session():
    p: ClientProtocol[str] = ClientProtocol()
    rid, _ = p.request("exec_stream", {}, "S")
    with pytest.raises(ProtocolError):
        p.receive_data(b'{"jsonrpc":"2.0","method":"exec_stream.stdout",'
                       b'"params":{"id":%d,"bytes":%d}}\n' % (rid, 1 << 40))


def test_crlf_and_trailing_partial_line():
    p: ClientProtocol[str] = ClientProtocol()
    rid, _ = p.request("x", {}, "X")
    assert p.receive_data(b'{"id": 1, "result": {}}\r\n{"id": 2') == [Completed("X", {}, None)]


def test_forget_drops_late_response_and_output():
    p: ClientProtocol[str] = ClientProtocol()
    rid, _ = p.request("exec_stream", {}, "S")
    p.forget(rid)
    data = line({"method": "exec_stream.stdout", "params": {"id": rid, "data": "eA=="}}) + \
        line({"id": rid, "result": {}})
    assert p.receive_data(data) == []


def test_connection_lost_returns_every_waiter():
    p: ClientProtocol[str] = ClientProtocol()
    p.request("a", {}, "A")
    p.request("b", {}, "B")
    assert sorted(p.connection_lost()) == ["A", "B"]
    assert p.pending() == {}


def test_line_limit():
    s = LineSplitter(max_line=10)
    assert s.feed(b"0123456789\n") == [b"0123456789"]
    with pytest.raises(ProtocolError, match="longer than 10 bytes"):
        s.feed(b"0123456789A")
    s = LineSplitter(max_line=10)
    s.feed(b"01234")
    with pytest.raises(ProtocolError):
        s.feed(b"5678901\n")


def test_big_line_in_many_chunks_is_linear():
    """20 MiB in 64 KiB chunks: bytes are scanned once (no quadratic rescans)."""
    payload = b"y" * (20 << 20)
    p: ClientProtocol[str] = ClientProtocol()
    rid, _ = p.request("read_file", {}, "R")
    data = line({"id": rid, "result": {"content": b64(payload)}})
    events = []
    for i in range(0, len(data), 65536):
        events += p.receive_data(data[i:i + 65536])
    (ev,) = events
    assert base64.b64decode(ev.result["content"]) == payload
