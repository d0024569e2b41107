"""Port forwarding: spec parsing, and PortForwarder + GuestChannel.open_tcp end to end through
the real C guest agent (run as a plain process on a socketpair, so the "guest's" 127.0.0.1
is this host's loopback). Servers are real TCP/HTTP servers; assertions look at what they
received."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import http.client
import http.server
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from matchlock._aio import run
from matchlock.channel.client import GuestChannel
from matchlock.guest_build import build_guest
from matchlock.sandbox import (
    Binding,
    PortForwarder,
    PortForwardError,
    PortSpec,
    PortSpecError,
    parse_addresses,
    parse_port_spec,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[3]


# ---- parsing (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [("8080", PortSpec(8080, 8080)), ("18080:8080", PortSpec(18080, 8080)),
     (" 80 ", PortSpec(80, 80)), ("1:65535", PortSpec(1, 65535))],
)
def test_parse_port_spec(text, spec):
    assert parse_port_spec(text) == spec


@pytest.mark.parametrize(
    "text", ["1:2:3", "0", "65536", "80:0", "a", "", ":80", "80:", "-1", "+80", "\uff18\uff10",
             "8080/tcp", "0x50", "123456"],
)
def test_parse_port_spec_rejects(text):
    with pytest.raises(PortSpecError) as e:
        parse_port_spec(text)
    assert str(e.value) == (
        f'invalid port-forward spec "{text}": use [LOCAL:]REMOTE with ports in 1-65535'
    )


def test_parse_addresses():
    assert parse_addresses([]) == ("127.0.0.1",)
    assert parse_addresses(["localhost", "127.0.0.1", " 0.0.0.0 "]) == ("127.0.0.1", "0.0.0.0")
    assert parse_addresses(["[::1]", "::1"]) == ("::1",)


@pytest.mark.parametrize("addr", ["example.com", "127.1", "", "1.2.3.4.5", "1.2.3.4:80"])
def test_parse_addresses_rejects(addr):
    with pytest.raises(PortSpecError, match="invalid listen address .*use an IP address"):
        parse_addresses([addr])


def test_port_spec_validates():
    assert PortSpec(0, 80).local == 0  # any free port, for programmatic callers
    for bad in ((1, 0), (-1, 80), (65536, 80), (True, 80)):
        with pytest.raises(PortSpecError):
            PortSpec(*bad)


# ---- the real agent ------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory) -> Path:
    return build_guest(ROOT / "guest", tmp_path_factory.mktemp("guest") / "matchlock-guest")


@contextlib.asynccontextmanager
async def agent(binary: Path):
    host, theirs = socket.socketpair()
    proc = subprocess.Popen([str(binary), "agent", "--fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    chan = GuestChannel(host)
    chan.start()
    try:
        await asyncio.wait_for(chan.wait_ready(), 10)
        yield chan, proc
    finally:
        await chan.close()
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait)


async def settle(fwd: PortForwarder) -> None:
    """Wait until every relayed connection has finished its teardown."""
    await asyncio.gather(*list(fwd._conns), return_exceptions=True)


class Http(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def http_server():
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - stdlib name
            seen.append(self.path)
            body = body_for(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = Http(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], seen
    srv.shutdown()
    srv.server_close()


def body_for(path: str) -> bytes:
    return hashlib.sha256(path.encode()).hexdigest().encode() * (1 + len(path) * 500)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_20_concurrent_http_requests(agent_binary, http_server):
    guest_port, seen = http_server

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp)
            [b] = await fwd.add([PortSpec(0, guest_port)])
            assert b.address == "127.0.0.1" and b.remote_port == guest_port
            paths = [f"/file-{i}" for i in range(20)]
            results = await asyncio.gather(
                *(asyncio.to_thread(http_get, b.local_port, p) for p in paths)
            )
            await settle(fwd)
            assert chan._conn.open_streams == [] and chan._streams == {}
            await fwd.close()
            assert refused(b.local_port)
            return paths, results

    paths, results = run(main())
    for p, (status, body) in zip(paths, results, strict=True):
        assert status == 200 and body == body_for(p)
    assert sorted(seen) == sorted(paths)


def echo_server():
    """Echo until EOF, then close (like `nc -l -e cat`); records the bytes per client."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    got: list[bytes] = []

    def one(conn):
        buf = bytearray()
        with conn:
            while chunk := conn.recv(65536):
                buf += chunk
                conn.sendall(chunk)
        got.append(bytes(buf))

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv, got


def client_half_close(port: int, payload: bytes, *, may_close_first: bool = False) -> bytes:
    """Send, half-close, read to EOF. `may_close_first`: the forwarder may close the
    connection before we half-close (nothing listens in the guest); that reads as EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        try:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
        except OSError as e:
            if may_close_first and e.errno in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                return b""
            raise
        buf = bytearray()
        try:
            while chunk := c.recv(65536):
                buf += chunk
        except ConnectionResetError:
            if not may_close_first:
                raise
        return bytes(buf)


def test_client_half_close_reaches_guest_and_echo_returns(agent_binary):
    srv, got = echo_server()

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp)
            [b] = await fwd.add([PortSpec(0, srv.getsockname()[1])])
            out = await asyncio.to_thread(client_half_close, b.local_port, b"port-forward-payload")
            await settle(fwd)
            await fwd.close()
            return out

    try:
        assert run(main()) == b"port-forward-payload"
        assert got == [b"port-forward-payload"]
    finally:
        srv.close()


def test_20mib_each_way_and_more_clients_than_slots(agent_binary):
    srv, got = echo_server()
    big = os.urandom(20 << 20)
    small = [os.urandom(10000 + i) for i in range(12)]

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp, max_connections=4)
            [b] = await fwd.add([PortSpec(0, srv.getsockname()[1])])
            outs = await asyncio.gather(
                asyncio.to_thread(client_half_close, b.local_port, big),
                *(asyncio.to_thread(client_half_close, b.local_port, p) for p in small),
            )
            await settle(fwd)
            assert chan._conn.open_streams == []
            await fwd.close()
            return outs

    try:
        outs = run(main())
        assert hashlib.sha256(outs[0]).digest() == hashlib.sha256(big).digest()
        assert outs[1:] == small
        assert sorted(map(len, got)) == sorted(map(len, [big, *small]))
    finally:
        srv.close()


def test_port_in_use_is_a_typed_error_and_nothing_stays_bound(agent_binary):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    free = free_port()

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp)
            with pytest.raises(PortForwardError) as e:
                await fwd.add([PortSpec(free, 80), PortSpec(busy_port, 80)])
            assert str(e.value) == f"port {busy_port} is already in use on 127.0.0.1"
            assert fwd.bindings == []
            assert refused(free)  # the first listener was closed again: all or nothing
            # Positive control: the free port alone binds.
            assert await fwd.add([PortSpec(free, 80)]) == [Binding("127.0.0.1", free, 80)]
            assert not refused(free)
            with pytest.raises(PortForwardError, match=f"port {free} is forwarded twice"):
                await fwd.add([PortSpec(free, 81)])
            await fwd.close()
            assert refused(free)

    try:
        run(main())
    finally:
        busy.close()


def test_nothing_listening_in_guest_reports_and_closes_client(agent_binary):
    guest_port = free_port()
    errors: list[str] = []

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp, on_error=errors.append)
            [b] = await fwd.add([PortSpec(0, guest_port)])
            out = await asyncio.to_thread(client_half_close, b.local_port, b"hello?",
                                        may_close_first=True)
            await settle(fwd)
            assert chan._conn.open_streams == []
            # The channel still works for the next connection.
            ping = await chan.request({"op": "ping"})
            await fwd.close()
            return out, ping

    out, ping = run(main())
    assert out == b"" and ping == {"ok": True}
    assert errors == [
        f"port-forward connection error: connect 127.0.0.1:{guest_port}: Connection refused"
    ]


def held_server():
    """Accepts and holds each connection; records 'reset' or 'eof' for how it ended."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    ends: list[str] = []
    accepted = threading.Semaphore(0)

    def one(conn):
        accepted.release()
        with conn:
            try:
                while conn.recv(65536):
                    pass
                ends.append("eof")
            except ConnectionResetError:
                ends.append("reset")

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv, ends, accepted


def test_close_ends_listeners_and_live_connections(agent_binary):
    srv, ends, accepted = held_server()

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp)
            [b] = await fwd.add([PortSpec(0, srv.getsockname()[1])])
            r, w = await asyncio.open_connection("127.0.0.1", b.local_port)
            w.write(b"x")
            await w.drain()
            assert await asyncio.to_thread(accepted.acquire, True, 10)
            assert fwd.active_connections == 1
            await fwd.close()
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            assert refused(b.local_port)
            assert chan._conn.open_streams == []
            await asyncio.to_thread(wait_for, lambda: ends, 10)

    try:
        run(main())
        assert ends == ["reset"]  # the guest-side connection was aborted, not left open
    finally:
        srv.close()


def test_client_reset_aborts_guest_connection(agent_binary):
    srv, ends, accepted = held_server()

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp)
            [b] = await fwd.add([PortSpec(0, srv.getsockname()[1])])
            c = socket.create_connection(("127.0.0.1", b.local_port))
            c.sendall(b"x")
            assert await asyncio.to_thread(accepted.acquire, True, 10)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            c.close()  # RST
            await asyncio.to_thread(wait_for, lambda: ends, 10)
            await settle(fwd)
            assert chan._conn.open_streams == []
            await fwd.close()

    try:
        run(main())
        assert ends == ["reset"]
    finally:
        srv.close()


def wait_for(cond, timeout: float) -> None:
    ev = threading.Event()
    for _ in range(int(timeout * 100)):
        if cond():
            return
        ev.wait(0.01)
    raise AssertionError("condition not met in time")


def test_listeners_close_when_the_channel_goes(agent_binary, http_server):
    guest_port, _ = http_server

    async def main():
        async with agent(agent_binary) as (chan, proc):
            fwd = PortForwarder(chan.open_tcp)
            [b] = await fwd.add([PortSpec(0, guest_port)])
            fwd.close_when(chan.wait_closed())
            status, _ = await asyncio.to_thread(http_get, b.local_port, "/before")
            assert status == 200  # positive control
            proc.send_signal(signal.SIGKILL)  # the "VM" dies
            await asyncio.wait_for(fwd.wait_closed(), 10)
            assert refused(b.local_port)

    run(main())


def test_ipv6_loopback_listener(agent_binary, http_server):
    if not socket.has_ipv6:
        pytest.fail("this host has no IPv6 loopback", False)
    guest_port, _ = http_server

    async def main():
        async with agent(agent_binary) as (chan, _):
            fwd = PortForwarder(chan.open_tcp)
            [v4, v6] = await fwd.add([PortSpec(0, guest_port)], ["127.0.0.1", "::1"])
            assert v6.address == "::1"
            c = http.client.HTTPConnection("::1", v6.local_port, timeout=30)
            await asyncio.to_thread(c.request, "GET", "/v6")
            resp = await asyncio.to_thread(c.getresponse)
            body = await asyncio.to_thread(resp.read)
            c.close()
            await settle(fwd)
            await fwd.close()
            return resp.status, body

    status, body = run(main())
    assert status == 200 and body == body_for("/v6")


def test_a_guest_without_tcp_streams_is_a_connect_error():
    """An older guest answers the "tcp" OPEN with REPLY unknown op (docs: History)."""
    from matchlock.channel import (
        DEFAULT_WINDOW,
        NEED_DATA,
        PROTOCOL_VERSION,
        ChannelConnection,
        Hello,
        Open,
        Reply,
    )
    from matchlock.channel.client import GuestConnectError

    host_sock, guest_sock = socket.socketpair()

    def old_guest():
        conn = ChannelConnection("guest")
        guest_sock.sendall(conn.send(Hello(PROTOCOL_VERSION, DEFAULT_WINDOW, uptime_ns=1)))
        while data := guest_sock.recv(65536):
            conn.receive_data(data)
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Open):
                    op = ev.request["op"]
                    guest_sock.sendall(conn.send(Reply(ev.stream_id, {
                        "ok": False, "error": f"unknown op {op}"})))

    threading.Thread(target=old_guest, daemon=True).start()

    async def main():
        chan = GuestChannel(host_sock)
        chan.start()
        await asyncio.wait_for(chan.wait_ready(), 10)
        stream = await chan.open_tcp(80)
        with pytest.raises(GuestConnectError, match="unknown op tcp"):
            await stream.read()
        assert (await stream.wait_closed()).error == "unknown op tcp"
        assert await chan.request({"op": "ping"}) == {"ok": False, "error": "unknown op ping"}
        await chan.close()

    run(main())
    guest_sock.close()
