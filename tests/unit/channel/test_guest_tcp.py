"""Interop: the C guest agent's "tcp" streams (port forwarding), driven by ChannelConnection.

The agent runs as a plain process (see test_guest_interop.py), so "127.0.0.1 inside the
guest" is this host's loopback: the servers here are real TCP servers in threads, and each
test checks what the server itself received.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from test_guest_interop import Guest, guest_binary  # noqa: F401 - fixture

from matchlock.channel import DEFAULT_WINDOW, Data, Eof, Exit, Reply, Reset, Window

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def guest(guest_binary):  # noqa: F811
    g = Guest(guest_binary)
    yield g
    g.close()


class Server:
    """A one-connection-at-a-time TCP server on 127.0.0.1 running `handler(conn)` per client,
    recording what each handler returns."""

    def __init__(self, handler, *, backlog: int = 64):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.results: list = []
        self._handler = handler
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, conn):
        conn.settimeout(30)
        try:
            self.results.append(self._handler(conn))
        except Exception as e:  # noqa: BLE001 - recorded for the test to inspect
            self.results.append(e)
        finally:
            conn.close()

    def wait(self, n: int, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            assert time.monotonic() < deadline, f"server saw {len(self.results)} of {n} clients"
            time.sleep(0.01)
        return self.results

    def close(self):
        self.sock.close()


def read_all(conn) -> bytes:
    buf = bytearray()
    while chunk := conn.recv(1 << 16):
        buf += chunk
    return bytes(buf)


def echo(conn) -> int:
    n = 0
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)
        n += len(chunk)
    return n


@pytest.fixture
def server_factory():
    made: list[Server] = []

    def make(handler, **kw) -> Server:
        s = Server(handler, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_half_close_reaches_the_server_and_the_reply_comes_back(guest, server_factory):
    def handler(conn):
        got = read_all(conn)  # returns only once the host's EOF arrived as a FIN
        conn.sendall(hashlib.sha256(got).hexdigest().encode())
        return got

    srv = server_factory(handler)
    sid = guest.open({"op": "tcp", "port": srv.port})
    out, err, ex, events = guest.collect(sid, stdin=b"port-forward-payload")
    assert srv.wait(1) == [b"port-forward-payload"]
    assert out == hashlib.sha256(b"port-forward-payload").hexdigest().encode()
    assert err == b"" and ex == Exit(sid, code=0)
    assert [type(e) for e in events][-2:] == [Eof, Exit]
    assert not guest.conn.is_open(sid)


def test_5mb_full_duplex_echo(guest, server_factory):
    srv = server_factory(echo)
    payload = os.urandom(5 << 20)
    sid = guest.open({"op": "tcp", "port": srv.port})
    out, _, ex, events = guest.collect(sid, stdin=payload)
    assert ex.code == 0
    assert out == payload
    assert srv.wait(1) == [len(payload)]
    assert all(e.fd == 1 for e in events if isinstance(e, Data))


def test_server_speaks_first_and_client_half_closes_later(guest, server_factory):
    def handler(conn):
        conn.sendall(b"220 hello\r\n")
        conn.shutdown(socket.SHUT_WR)
        return read_all(conn)

    srv = server_factory(handler)
    sid = guest.open({"op": "tcp", "port": srv.port})
    buf = bytearray()
    while True:  # the banner and its EOF arrive before the host has sent anything
        ev = guest.event()
        if isinstance(ev, Eof):
            break
        assert isinstance(ev, Data), ev
        buf += ev.data
    assert bytes(buf) == b"220 hello\r\n"
    guest.sock.sendall(guest.conn.send_data(sid, 0, b"QUIT\r\n"))
    guest.send(Eof(sid, 0))
    ev = guest.event()
    while isinstance(ev, Window):  # credit back for the 6 bytes
        ev = guest.event()
    assert ev == Exit(sid, code=0)
    assert srv.wait(1) == [b"QUIT\r\n"]


def test_refused_is_exit_error_and_channel_stays_usable(guest):
    port = closed_port()
    sid = guest.open({"op": "tcp", "port": port})
    guest.sock.sendall(guest.conn.send_data(sid, 0, b"early bytes"))  # pipelined with connect
    ev = guest.event()
    while isinstance(ev, Window):
        ev = guest.event()
    assert ev == Exit(sid, error=f"connect 127.0.0.1:{port}: Connection refused")
    ping = guest.open({"op": "ping"})
    assert guest.event() == Reply(ping, {"ok": True})


@pytest.mark.parametrize("port", [0, 65536, -1, "80", 8.5, None])
def test_bad_port_is_exit_error(guest, port):
    req = {"op": "tcp"} if port is None else {"op": "tcp", "port": port}
    sid = guest.open(req)
    ev = guest.event()
    assert isinstance(ev, Exit) and ev.stream_id == sid
    assert ev.error.startswith("bad request: port")


def test_reset_aborts_the_guest_connection_with_rst(guest, server_factory):
    accepted = threading.Event()

    def handler(conn):
        accepted.set()
        try:
            return ("data", conn.recv(100))
        except ConnectionResetError:
            return ("reset",)

    srv = server_factory(handler)
    sid = guest.open({"op": "tcp", "port": srv.port})
    assert accepted.wait(10)
    guest.send(Reset(sid))
    ev = guest.event()
    while not isinstance(ev, Exit):
        assert isinstance(ev, Eof | Window), ev
        ev = guest.event()
    assert ev.stream_id == sid
    assert srv.wait(1) == [("reset",)]  # an RST, not an orderly FIN


def test_guest_sends_no_more_than_the_credit(guest, server_factory):
    total = 4 * DEFAULT_WINDOW
    srv = server_factory(lambda conn: conn.sendall(b"z" * total))
    sid = guest.open({"op": "tcp", "port": srv.port})
    srv.wait(1)  # the server has handed all of it to its kernel
    got = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        ev = guest.poll_event()
        if isinstance(ev, Data):
            got += len(ev.data)
        elif ev is None:
            time.sleep(0.01)
    assert got == DEFAULT_WINDOW  # the window exactly, not a byte more
    guest.send(Window(sid, total - DEFAULT_WINDOW))
    out, _, ex, _ = guest.collect(sid, stdin=b"")
    assert got + len(out) == total and ex.code == 0


def test_server_that_closes_at_once_while_the_host_writes(guest, server_factory):
    srv = server_factory(lambda conn: None)  # accept, close
    sid = guest.open({"op": "tcp", "port": srv.port})
    srv.wait(1)
    out, _, ex, _ = guest.collect(sid, stdin=os.urandom(2 << 20), timeout=30)
    assert out == b"" and isinstance(ex, Exit)  # ended (EPIPE/RST), no protocol error
    ping = guest.open({"op": "ping"})
    assert guest.event() == Reply(ping, {"ok": True})


def test_64_concurrent_streams(guest, server_factory):
    srv = server_factory(echo)
    payloads = {}
    for i in range(64):
        sid = guest.open({"op": "tcp", "port": srv.port})
        payloads[sid] = f"stream {i} ".encode() * (1000 + i)
        guest.sock.sendall(guest.conn.send_data(sid, 0, payloads[sid]))
        guest.send(Eof(sid, 0))
    got = {sid: bytearray() for sid in payloads}
    exits = {}
    while len(exits) < len(payloads):
        ev = guest.event()
        if isinstance(ev, Data):
            got[ev.stream_id] += ev.data
            guest.send(Window(ev.stream_id, len(ev.data)))
        elif isinstance(ev, Exit):
            exits[ev.stream_id] = ev
    assert all(ex.code == 0 for ex in exits.values())
    assert {sid: bytes(b) for sid, b in got.items()} == payloads
    assert sorted(srv.wait(64)) == sorted(len(p) for p in payloads.values())


def test_host_disconnect_resets_guest_connections(guest, server_factory):
    accepted = threading.Event()

    def handler(conn):
        accepted.set()
        try:
            return ("data", conn.recv(100))
        except ConnectionResetError:
            return ("reset",)

    srv = server_factory(handler)
    guest.open({"op": "tcp", "port": srv.port})
    assert accepted.wait(10)
    guest.sock.shutdown(socket.SHUT_RDWR)
    assert guest.proc.wait(5) == 0
    assert srv.wait(1) == [("reset",)]


def test_tcp_and_exec_streams_interleave(guest, server_factory):
    srv = server_factory(echo)
    t = guest.open({"op": "tcp", "port": srv.port})
    e = guest.exec(["sh", "-c", "echo from-exec"])
    guest.sock.sendall(guest.conn.send_data(t, 0, b"from-tcp"))
    guest.send(Eof(t, 0))
    got = {t: bytearray(), e: bytearray()}
    exits = {}
    while len(exits) < 2:
        ev = guest.event()
        if isinstance(ev, Data):
            got[ev.stream_id] += ev.data
        elif isinstance(ev, Exit):
            exits[ev.stream_id] = ev
    assert bytes(got[t]) == b"from-tcp" and bytes(got[e]) == b"from-exec\n"
    assert exits[t].code == 0 and exits[e].code == 0
