"""The NDJSON codec: framing under every chunking, message validation, the fast path."""

from __future__ import annotations

import base64
import json
import os

import pytest

from matchlock.rpc._codec import (
    MAX_RAW,
    FrameDecoder,
    Invalid,
    LineDecoder,
    Notification,
    ProtocolError,
    Raw,
    Request,
    Response,
    decode_request,
    decode_server_line,
    encode_data,
    encode_error,
    encode_input,
    encode_notification,
    encode_raw,
    encode_request,
    encode_result,
)

LINES = [b'{"a":1}', b'{"jsonrpc":"2.0","method":"x","id":3}', b"[1,2]"]
STREAM = b'{"a":1}\n\n{"jsonrpc":"2.0","method":"x","id":3}\r\n  \n[1,2]\n'


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [len(STREAM), 1, 2, 7])
def test_lines_whole_bytewise_and_chunked(size):
    dec = LineDecoder()
    got = []
    for chunk in _split(STREAM, size):
        dec.feed(chunk)
        while (line := dec.next_line()) is not None:
            got.append(line)
    assert got == LINES


def test_trailing_partial_line_waits():
    dec = LineDecoder()
    dec.feed(b'{"a":1}\n{"b"')
    assert dec.next_line() == b'{"a":1}'
    assert dec.next_line() is None
    dec.feed(b':2}\n')
    assert dec.next_line() == b'{"b":2}'


def test_line_limit_is_enforced_without_a_newline_and_with_one():
    dec = LineDecoder(max_line=16)
    dec.feed(b"x" * 17)
    with pytest.raises(ProtocolError):
        dec.next_line()
    dec = LineDecoder(max_line=16)
    dec.feed(b"y" * 20 + b"\n")
    with pytest.raises(ProtocolError):
        dec.next_line()
    dec = LineDecoder(max_line=16)
    dec.feed(b"z" * 16 + b"\n")
    assert dec.next_line() == b"z" * 16


@pytest.mark.parametrize("line,why", [
    (b"not json", "not JSON"), (b"[1]", "object"), (b'{"params":{}}', "method"),
    (b'{"method":"x","params":[1]}', "params"), (b'{"method":"x","id":-1}', "id"),
    (b'{"method":"x","id":"7"}', "id"), (b'{"method":"x","id":1.5}', "id"),
    (b'{"method":"x","id":true}', "id"), (b"\xff\xfe", "JSON"),
])
def test_invalid_requests(line, why):
    msg = decode_request(line)
    assert isinstance(msg, Invalid) and why in msg.reason


def test_requests_and_notifications():
    assert decode_request(b'{"jsonrpc":"2.0","method":"exec","params":{"command":"ls"},'
                          b'"id":7}') == Request("exec", {"command": "ls"}, 7)
    assert decode_request(b'{"method":"exec_pipe.stdin_eof","params":{"id":1}}') == \
        Request("exec_pipe.stdin_eof", {"id": 1}, None)
    assert decode_request(b'{"method":"close"}') == Request("close", {}, None)


def test_responses_shape():
    assert json.loads(encode_result(3, {"a": 1})) == {"jsonrpc": "2.0", "result": {"a": 1},
                                                      "id": 3}
    assert json.loads(encode_error(None, -32700, "Parse error")) == {
        "jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}}
    assert encode_result(1, {}).endswith(b"\n") and encode_result(1, {}).count(b"\n") == 1


@pytest.mark.parametrize("data", [b"", b"x", os.urandom(65536), b"\n\"\\" * 100])
def test_data_fast_path_round_trip_and_is_valid_json(data):
    line = encode_data("exec_stream.stdout", 12, data).rstrip(b"\n")
    assert json.loads(line) == {"jsonrpc": "2.0", "method": "exec_stream.stdout",
                                "params": {"id": 12, "data": base64.b64encode(data).decode()}}
    msg = decode_server_line(line)
    assert msg == Notification("exec_stream.stdout", {"id": 12}, data)


def test_data_slow_path_gives_the_same_message():
    data = os.urandom(100)
    other = json.dumps({"params": {"data": base64.b64encode(data).decode(), "id": 4},
                        "method": "exec_pipe.stderr", "jsonrpc": "2.0"}).encode()
    msg = decode_server_line(other)
    assert isinstance(msg, Notification)
    assert (msg.method, msg.params["id"], msg.data) == ("exec_pipe.stderr", 4, data)


def test_fast_path_refuses_lookalikes():
    # A broken base64 payload or an odd id must not be half-parsed by the fast path.
    bad = b'{"jsonrpc":"2.0","method":"m","params":{"id":1,"data":"!!!"}}'
    msg = decode_server_line(bad)
    assert isinstance(msg, Notification) and msg.data is None
    odd = b'{"jsonrpc":"2.0","method":"m","params":{"id":-1,"data":"AA=="}}'
    assert decode_server_line(odd).params["id"] == -1  # slow path, as JSON says


def test_server_lines_clients_ignore():
    assert decode_server_line(b"garbage") is None
    assert decode_server_line(b"[1]") is None
    assert decode_server_line(b'{"id":"x","result":{}}') is None
    assert decode_server_line(encode_result(5, {"x": 1}).rstrip()) == Response(5, {"x": 1})
    assert decode_server_line(encode_error(None, -32700, "Parse error").rstrip()) == \
        Response(None, None, (-32700, "Parse error"))
    n = decode_server_line(encode_notification("event", {"type": "network"}).rstrip())
    assert n == Notification("event", {"type": "network"}, None)


def test_client_encoders():
    assert json.loads(encode_request("exec", {"command": "ls"}, 1)) == {
        "jsonrpc": "2.0", "method": "exec", "params": {"command": "ls"}, "id": 1}
    assert "params" not in json.loads(encode_request("close", {}, 2))
    assert "id" not in json.loads(encode_request("exec_tty.resize", {"id": 1}, None))
    stdin = json.loads(encode_input("exec_pipe.stdin", 9, b"hi"))
    assert stdin == {"jsonrpc": "2.0", "method": "exec_pipe.stdin",
                     "params": {"id": 9, "data": "aGk="}}
    assert decode_request(encode_input("exec_pipe.stdin", 9, b"hi").rstrip()).id is None


RAW_STREAM = (encode_raw("exec_stream.stdout", 1, b"line\nwith\nnewlines\n")
              + b'{"jsonrpc":"2.0","result":{},"id":1}\n'
              + encode_raw("exec_stream.stderr", 1, b"")
              + encode_raw("exec_pipe.stdin", 7, bytes(range(256)) * 3))


@pytest.mark.parametrize("size", [len(RAW_STREAM), 1, 3, 100])
def test_raw_payloads_under_every_chunking(size):
    dec = FrameDecoder()
    got = []
    for chunk in _split(RAW_STREAM, size):
        dec.feed(chunk)
        while (item := dec.next_item()) is not None:
            got.append(item)
    assert got == [Raw("exec_stream.stdout", 1, b"line\nwith\nnewlines\n"),
                   b'{"jsonrpc":"2.0","result":{},"id":1}',
                   Raw("exec_stream.stderr", 1, b""),
                   Raw("exec_pipe.stdin", 7, bytes(range(256)) * 3)]


def test_only_the_exact_raw_layout_announces_a_payload():
    # The same message spelled differently (an SDK's json.dumps) is an ordinary line.
    spaced = b'{"jsonrpc": "2.0", "method": "m", "params": {"id": 1, "bytes": 5}}\n'
    dec = FrameDecoder()
    dec.feed(spaced + b"hello\n")
    assert dec.next_item() == spaced.rstrip(b"\n")
    assert dec.next_item() == b"hello"
    dec = FrameDecoder()
    dec.feed(b'{"jsonrpc":"2.0","method":"m","params":{"id":1,"bytes":-5}}\n')
    assert isinstance(dec.next_item(), bytes)  # not a valid size: a plain line


def test_raw_payload_size_is_capped():
    dec = FrameDecoder()
    dec.feed(b'{"jsonrpc":"2.0","method":"m","params":{"id":1,"bytes":%d}}\n' % (MAX_RAW + 1))
    with pytest.raises(ProtocolError):
        dec.next_item()
