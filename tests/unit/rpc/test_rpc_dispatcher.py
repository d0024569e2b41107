"""The dispatcher against the real guest agent (a host process, no VM): every exec mode,
input, cancel, errors, close, and a slow client that holds back nobody else."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time

import pytest
from agent_target import AgentTarget, agent_binary

from matchlock.rpc._codec import LineDecoder, decode_server_line, encode_request
from matchlock.rpc._dispatcher import Session
from matchlock.rpc.server import serve_stream
from matchlock.supervisor._socket import bind_unix, connect_unix

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return agent_binary(tmp_path_factory.mktemp("agent"))


class Client:
    """A session fed from the test, collecting what it sends."""

    def __init__(self, target) -> None:  # noqa: ANN001
        self.lines: list[dict] = []
        self.arrived = asyncio.Event()
        self.session = Session(target, self._send)
        self.gate: asyncio.Event | None = None  # set: sends wait for it (a slow reader)

    async def _send(self, data: bytes) -> None:
        if self.gate is not None:
            await self.gate.wait()
        for line in data.splitlines():
            self.lines.append(json.loads(line))
        self.arrived.set()

    async def send(self, method: str, params: dict | None = None, rid: int | None = None):
        await self.session.handle_line(encode_request(method, params, rid).rstrip())

    async def response(self, rid: int, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.lines:
                if m.get("id") == rid and ("result" in m or "error" in m):
                    return m
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), max(0.01, deadline - time.monotonic()))

    def data(self, method: str) -> bytes:
        return b"".join(base64.b64decode(m["params"]["data"]) for m in self.lines
                        if m.get("method") == method)


def run(binary, tmp_path, body) -> None:  # noqa: ANN001
    async def main() -> None:
        target = AgentTarget(binary, tmp_path / "vm.log")
        await target.start()
        try:
            await body(target)
        finally:
            await target.stop()

    asyncio.run(main())


def test_exec_buffered_stream_and_exit_codes(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        c = Client(t)
        await c.send("exec", {"command": "echo out; echo err >&2; exit 3"}, 1)
        r = (await c.response(1))["result"]
        assert (r["exit_code"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"])) \
            == (3, b"out\n", b"err\n")
        await c.send("exec_stream", {"argv": ["sh", "-c", "echo a; echo b >&2; kill -9 $$"]}, 2)
        r = (await c.response(2))["result"]
        assert (r["exit_code"], r["signal"]) == (137, 9)
        assert c.data("exec_stream.stdout") == b"a\n" and c.data("exec_stream.stderr") == b"b\n"
        # Notifications for a request all come before its response.
        idx = [i for i, m in enumerate(c.lines) if m.get("params", {}).get("id") == 2
               or m.get("id") == 2]
        assert c.lines[idx[-1]].get("id") == 2
        await c.send("exec", {"argv": ["/no/such/binary"]}, 3)
        r = (await c.response(3))["result"]
        assert r["exit_code"] == 127 and "/no/such/binary" in r["error"]
        await c.send("exec", {"command": "env", "env": {"X": "1"}, "working_dir": "/tmp"}, 4)
        out = base64.b64decode((await c.response(4))["result"]["stdout"])
        assert b"X=1\n" in out

    run(binary, tmp_path, body)


def test_exec_pipe_stdin_and_tty(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        c = Client(t)
        await c.send("exec_pipe", {"command": "sha256sum"}, 1)
        while not any(m.get("method") == "exec_pipe.ready" for m in c.lines):
            await asyncio.sleep(0.01)
        data = os.urandom(3 << 20)
        for i in range(0, len(data), 65536):
            # Python SDK style: a request id on input; never answered.
            await c.send("exec_pipe.stdin", {"id": 1, "data": base64.b64encode(
                data[i:i + 65536]).decode()}, 1000 + i)
        await c.send("exec_pipe.stdin_eof", {"id": 1})
        r = (await c.response(1))["result"]
        assert r["exit_code"] == 0
        assert c.data("exec_pipe.stdout").split()[0].decode() == hashlib.sha256(data).hexdigest()
        assert not any(m.get("id", 0) >= 1000 for m in c.lines)  # input is never answered
        await c.send("exec_tty", {"command": "stty size; echo $TERM", "rows": 33, "cols": 99},
                     2)
        r = (await c.response(2))["result"]
        assert r["exit_code"] == 0
        assert b"33 99" in c.data("exec_tty.stdout") and b"xterm" in c.data("exec_tty.stdout")

    run(binary, tmp_path, body)


def test_cancel_stops_the_process_and_answers_cancelled(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        c = Client(t)
        marker = tmp_path / "pid"
        await c.send("exec_stream", {"command": f"echo $$ > {marker}; exec sleep 100"}, 1)
        while not marker.exists() or not marker.read_text().strip():
            await asyncio.sleep(0.02)
        pid = int(marker.read_text())
        await c.send("cancel", {"id": 1}, 2)
        assert (await c.response(2))["result"] == {"cancelled": True}
        err = (await c.response(1))["error"]
        assert (err["code"], err["message"]) == (-32003, "context canceled")
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")
        await c.send("cancel", {"id": 99}, 3)
        assert (await c.response(3))["result"] == {"cancelled": False}

    run(binary, tmp_path, body)


def test_errors(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        c = Client(t)
        await c.session.handle_line(b"{nope")
        assert c.lines[-1] == {"jsonrpc": "2.0", "error": {"code": -32700,
                                                           "message": "Parse error"}}
        await c.send("frobnicate", {}, 1)
        assert (await c.response(1))["error"]["code"] == -32601
        await c.send("exec_pipe", {"command": "cat"})
        assert c.lines[-1]["error"] == {"code": -32600,
                                        "message": "exec_pipe requires request id"}
        await c.send("exec", {}, 2)
        assert (await c.response(2))["error"] == {"code": -32602,
                                                  "message": "command is required"}
        await c.send("allow_list_add", {"hosts": [" ", ""]}, 3)
        assert (await c.response(3))["error"]["message"] == "hosts is required"
        await c.send("allow_list_add", {"hosts": ["a.test, b.test", "a.test"]}, 4)
        assert (await c.response(4))["result"]["added"] == ["a.test", "b.test"]
        await c.send("port_forward", {"forwards": [{"local_port": 1, "remote_port": 2}]}, 5)
        assert "not available" in (await c.response(5))["error"]["message"]
        await c.send("create", {"image": "x"}, 6)
        assert (await c.response(6))["error"]["code"] == -32000

    run(binary, tmp_path, body)


def test_close_waits_for_inflight_then_stops_reading(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        c = Client(t)
        await c.send("exec", {"command": "sleep 0.3; echo done"}, 1)
        await c.send("close", {"timeout_seconds": 5}, 2)
        assert (await c.response(1))["result"]["exit_code"] == 0
        assert (await c.response(2))["result"] == {}
        assert t.closed == [5.0]
        assert not await c.session.handle_line(encode_request("exec", {"command": "x"}, 3))

    run(binary, tmp_path, body)


def test_log_and_events(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        (tmp_path / "vm.log").write_bytes(b"console line\n")
        c = Client(t)
        await c.send("log", None, 1)
        assert base64.b64decode((await c.response(1))["result"]["content"]) == b"console line\n"
        await c.send("events", None, 2)
        await c.response(2)
        assert [m["params"]["n"] for m in c.lines if m.get("method") == "event"] == [0, 1, 2]

    run(binary, tmp_path, body)


def test_slow_client_holds_back_only_itself(binary, tmp_path):
    """A client that stops reading: its producer stops (credit), another session's exec
    round trip is unaffected."""

    async def body(t) -> None:  # noqa: ANN001
        slow = Client(t)
        slow.gate = asyncio.Event()  # never set: every send waits
        await slow.send("exec_stream", {"command": "head -c 200000000 /dev/zero"}, 1)
        await asyncio.sleep(0.5)  # the producer has filled its window and is stuck now
        fast = Client(t)
        times = []
        for i in range(10):
            t0 = time.monotonic()
            await fast.send("exec", {"command": "true"}, 10 + i)
            await fast.response(10 + i)
            times.append(time.monotonic() - t0)
        assert max(times) < 0.5, times
        await slow.session.shutdown()  # the slow client goes away: its process stops

    run(binary, tmp_path, body)


def test_over_a_real_unix_socket(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        path = tmp_path / "c.sock"
        sock = bind_unix(path)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        server = await asyncio.start_unix_server(
            lambda r, w: serve_stream(r, w, t), sock=sock)
        try:
            def client() -> bytes:
                s = connect_unix(path, timeout=10)
                s.sendall(encode_request("exec_stream", {"command": "head -c 3000000 "
                                                         "/dev/zero"}, 1))
                dec, out = LineDecoder(), bytearray()
                while True:
                    data = s.recv(1 << 16)
                    assert data
                    dec.feed(data)
                    while (line := dec.next_line()) is not None:
                        msg = decode_server_line(line)
                        if getattr(msg, "data", None):
                            out += msg.data
                        elif getattr(msg, "id", None) == 1:
                            s.close()
                            return bytes(out)

            out = await asyncio.to_thread(client)
            assert out == b"\0" * 3000000
        finally:
            server.close()

    run(binary, tmp_path, body)


def test_long_socket_paths_work(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(str(path)) > 108
    s = bind_unix(path)
    c = connect_unix(path, timeout=5)
    c.close()
    s.close()


def test_raw_output_and_stdin(binary, tmp_path):
    async def body(t) -> None:  # noqa: ANN001
        from matchlock.rpc._codec import FrameDecoder, Raw, encode_raw

        sent: list[bytes] = []

        async def send(data: bytes) -> None:
            sent.append(data)

        s = Session(t, send)
        await s.handle_line(encode_request("exec_pipe", {"command": "cat", "raw": True},
                                           1).rstrip())
        while not any(b"exec_pipe.ready" in x for x in sent):
            await asyncio.sleep(0.01)
        payload = os.urandom(1 << 20)
        dec = FrameDecoder()
        dec.feed(encode_raw("exec_pipe.stdin", 1, payload))
        item = dec.next_item()
        assert isinstance(item, Raw)
        await s.handle_raw(item)
        await s.handle_line(encode_request("exec_pipe.stdin_eof", {"id": 1}, None).rstrip())
        while not any(b'"id":1}' in x and b"result" in x for x in sent):
            await asyncio.sleep(0.01)
        dec = FrameDecoder()
        out = bytearray()
        dec.feed(b"".join(sent))
        while (item := dec.next_item()) is not None:
            if isinstance(item, Raw):
                out += item.data
        assert bytes(out) == payload

    run(binary, tmp_path, body)
