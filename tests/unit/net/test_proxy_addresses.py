"""The dial-time address check through the real proxy and relay, on loopback, no VM.

Listeners on 127.0.0.0/8 record every connection; the policy uses the kernel's own view of
this host's addresses (127/8 is the host's). What counts is what the listeners saw.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from matchlock.net.ca import CertificateAuthority
from matchlock.net.config import parse_private_exceptions
from matchlock.net.policy import Policy
from matchlock.net.proxy import InterceptProxy, TcpRelay
from matchlock.net.types import NetworkConfig


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events: list = []
        self.hits: list[tuple[str, int]] = []

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, cb, host, port=0):
        server = await asyncio.start_server(cb, host, port)
        return server.sockets[0].getsockname()[1]

    def recorder(self, ip: str, port: int = 0) -> int:
        """An HTTP/1.0 answerer on ip:port that records each connection."""
        async def cb(reader, writer):
            self.hits.append(writer.get_extra_info("sockname")[:2])
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                pass
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nreached")
            await writer.drain()
            writer.close()
        return self.call(self._serve(cb, ip, port))

    def listen(self, handler, dst_ip: str, dst_port: int) -> int:
        """A listener whose connections reach `handler` as if the guest dialled dst."""
        async def cb(reader, writer):
            await handler.handle(reader, writer, dst_ip, dst_port)
        return self.call(self._serve(cb, "127.0.0.1"))

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def lp():
    e = Loop()
    yield e
    e.close()


def _free_port(ip: str) -> int:
    s = socket.socket()
    s.bind((ip, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(port: int, host: str) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def intercept(lp: Loop, port: int, private=(), add=()) -> InterceptProxy:
    policy = Policy(NetworkConfig(mode="intercept", allow_hosts=(),
                                  add_hosts=tuple(add),
                                  allow_private=parse_private_exceptions(private)),
                    lp.events.append)
    proxy = InterceptProxy(policy, CertificateAuthority.generate(), lp.events.append)
    proxy.http_ports = frozenset({port})
    return proxy


def test_add_host_zero_never_reaches_a_loopback_listener(lp):
    """--add-host hole:0.0.0.0 and a Host header naming it: the proxy would dial 0.0.0.0,
    which Linux connects to the host's own loopback. Positive control in the same run: the
    listener is reachable through an exception naming exactly 127.0.0.1:PORT."""
    port = _free_port("127.0.0.1")
    lp.recorder("127.0.0.1", port)
    add = [("hole.test", "0.0.0.0"), ("hole6.test", "::"), ("mapped.test", "::ffff:0.0.0.0"),
           ("loop.test", "127.0.0.1")]
    lp.hits.clear()
    lp.events.clear()
    proxy = intercept(lp, port, private=[f"127.0.0.1:{port}"], add=add)
    front = lp.listen(proxy, "203.0.113.9", port)  # where the guest "dialled": irrelevant
    assert b"reached" in http_get(front, "loop.test")  # the positive control
    assert lp.hits == [("127.0.0.1", port)]
    for host in ("hole.test", "hole6.test", "mapped.test", "0.0.0.0", "[::]", "0",
                 f"0.0.0.0:{port}"):
        out = http_get(front, host)
        assert out.startswith(b"HTTP/1.1 403"), (host, out[:200])
        assert b"never dialled" in out, out
    assert lp.hits == [("127.0.0.1", port)]


def test_loopback_needs_the_exact_address_never_a_wider_network(lp):
    port = _free_port("127.0.0.1")
    lp.recorder("127.0.0.1", port)
    add = [("loop.test", "127.0.0.1")]
    for private in ((), ("127.0.0.0/8",), ("0.0.0.0/0",), ("loop.test",),
                    (f"127.0.0.1:{port + 1 if port < 65535 else port - 1}",)):
        lp.hits.clear()
        proxy = intercept(lp, port, private=private, add=add)
        front = lp.listen(proxy, "203.0.113.9", port)
        for host in ("loop.test", "127.0.0.1", "localhost", "2130706433", "0x7f.1",
                     "[::ffff:127.0.0.1]"):
            out = http_get(front, host)
            assert out.startswith(b"HTTP/1.1 403"), (private, host, out[:300])
        assert lp.hits == [], private
    lp.hits.clear()
    proxy = intercept(lp, port, private=[f"127.0.0.1:{port}"], add=add)
    front = lp.listen(proxy, "203.0.113.9", port)
    assert b"reached" in http_get(front, "loop.test")
    assert lp.hits == [("127.0.0.1", port)]


def test_relay_and_passthrough_check_the_host_itself(lp):
    """Open mode relay and the intercept passthrough: the host's loopback (a host-local
    address) by IP, and an explicit exact exception as the positive control."""
    port = _free_port("127.0.0.5")
    lp.recorder("127.0.0.5", port)
    for private, reached in (((), False), (("127.0.0.0/8",), False),
                             ((f"127.0.0.5:{port}",), True)):
        lp.hits.clear()
        lp.events.clear()
        cfg = NetworkConfig(mode="open", allow_private=parse_private_exceptions(private))
        relay = TcpRelay(Policy(cfg, lp.events.append), lp.events.append)
        proxy = InterceptProxy(Policy(NetworkConfig(
            mode="intercept", allow_hosts=("*",), add_hosts=(("me.test", "127.0.0.5"),),
            allow_private=cfg.allow_private), lp.events.append),
            CertificateAuthority.generate(), lp.events.append)
        for handler in (relay, proxy):
            front = lp.listen(handler, "127.0.0.5", port)
            s = socket.create_connection(("127.0.0.1", front), timeout=15)
            s.sendall(b"SSH-2.0-x\r\n\r\n")
            try:
                got = s.recv(100)
            except ConnectionResetError:  # closed with our bytes unread: refused
                got = b""
            s.close()
            assert (b"reached" in got) == reached, (private, handler, got)
        assert len(lp.hits) == (2 if reached else 0), lp.hits
        if not reached:
            blocked = [e for e in lp.events if e.kind == "blocked"]
            assert len(blocked) == 2 and all("address of this host" in e.detail
                                             for e in blocked), lp.events
