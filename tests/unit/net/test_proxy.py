"""InterceptProxy / TcpRelay end to end on 127.0.0.0/8, no VM.

A background event loop runs the proxy (behind plain listeners whose `handle()` gets a fixed
dst_ip/dst_port, as the namespace redirect would) and the upstreams: an HTTPS server on
127.0.0.2 with its own test CA, a plain HTTP server and a TCP echo server on 127.0.0.3. The
tests are synchronous clients using `ssl` with the proxy's CA.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import socket
import ssl
import threading
import time

import h11
import pytest

from matchlock.net.ca import CertificateAuthority
from matchlock.net.config import parse_private_exceptions
from matchlock.net.policy import Policy
from matchlock.net.proxy import (
    InterceptProxy,
    TcpRelay,
    foreign_placeholders,
    replace_placeholders,
)
from matchlock.net.proxy._http import SecretRules, is_tls_client_hello, normalize_host
from matchlock.net.testing import write_test_pki
from matchlock.net.types import NetworkConfig, Secret

UP_IP = "127.0.0.2"
PLAIN_IP = "127.0.0.3"
# addresses of this host: reachable only through exceptions naming exactly them
UPSTREAMS = parse_private_exceptions([UP_IP, PLAIN_IP])
PH = "SANDBOX_SECRET_" + "0123456789abcdef" * 2
PH_OTHER = "SANDBOX_SECRET_" + "fedcba9876543210" * 2
REAL = "real-value-Zq9!"
REAL_OTHER = "other-real-value-Xy7"
SECRETS = (Secret("API_TOKEN", REAL, ("api.test",), PH),
           Secret("OTHER_TOKEN", REAL_OTHER, ("else.test",), PH_OTHER))
BLOCK = 1 << 20


def _block(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (BLOCK // 32)


# ------------------------------------------------------------------------ test upstream CA

# --------------------------------------------------------------------------- test upstream

def _echo_doc(ev, kept: bytes) -> bytes:
    return json.dumps({"headers": {k.decode(): v.decode() for k, v in ev.headers},
                       "body": kept.decode("latin-1"), "target": ev.target.decode()}).encode()


class Upstream:
    """h11 server. Records each request. Routes: /sse, /download/<MB>, /upload (sha256 of the
    body), /ws (101, then echo), /echo* (reflect the request: see `_echo`), anything else →
    200 ok."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.connections = 0

    async def serve(self, reader, writer):
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        cid = self.connections

        async def event():
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                return ev

        try:
            while True:
                ev = await event()
                if not isinstance(ev, h11.Request):
                    return
                target = ev.target.decode()
                body = hashlib.sha256()
                kept = bytearray()
                while True:
                    b = await event()
                    if isinstance(b, h11.Data):
                        body.update(b.data)
                        if len(kept) < 65536:
                            kept += b.data
                    else:
                        break
                self.seen.append({"conn": cid, "method": ev.method.decode(), "target": target,
                                  "headers": {k.decode(): v.decode() for k, v in ev.headers},
                                  "body": bytes(kept), "sha256": body.hexdigest()})
                if target.startswith("/echo"):
                    await self._echo(writer, conn, ev, bytes(kept), target)
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                    continue
                if target == "/ws-echo":  # reflects the Authorization header after the 101
                    auth = dict(ev.headers).get(b"authorization", b"")
                    writer.write(conn.send(h11.InformationalResponse(
                        status_code=101, headers=[("upgrade", "echo"),
                                                  ("connection", "upgrade"),
                                                  ("x-auth", auth)])))
                    writer.write(b"auth=" + auth + b"\n")
                    await writer.drain()
                    while data := await reader.read(65536):
                        writer.write(data)
                        await writer.drain()
                    return
                if target == "/ws":
                    writer.write(conn.send(h11.InformationalResponse(
                        status_code=101, headers=[("upgrade", "echo"),
                                                  ("connection", "upgrade")])))
                    writer.write(b"hello from upstream\n")
                    data = conn.trailing_data[0]
                    while True:
                        if data:
                            writer.write(data.upper())
                            await writer.drain()
                        data = await reader.read(65536)
                        if not data:
                            return
                if target == "/sse":
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("content-type", "text/event-stream"),
                        ("transfer-encoding", "chunked")])))
                    for i in range(4):
                        writer.write(conn.send(h11.Data(data=b"data: %d\n\n" % i)))
                        await writer.drain()
                        await asyncio.sleep(0.3)
                    writer.write(conn.send(h11.EndOfMessage()))
                elif target.startswith("/download/"):
                    mb = int(target.rsplit("/", 1)[1])
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("content-length", str(mb * BLOCK))])))
                    for i in range(mb):
                        writer.write(conn.send(h11.Data(data=_block(i))))
                        await writer.drain()
                    writer.write(conn.send(h11.EndOfMessage()))
                else:
                    out = body.hexdigest().encode() if target == "/upload" else b"ok"
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("content-length", str(len(out)))])))
                    writer.write(conn.send(h11.Data(data=out)))
                    writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()


    @staticmethod
    async def _echo(writer, conn, ev, kept: bytes, target: str) -> None:
        """The request reflected, the way httpbin and chatty error pages do: in a header, the
        reason phrase and the body (Content-Length; chunked in 5-byte chunks; a 200 KB
        Content-Length body; gzip whatever was asked; br; a trailer)."""
        auth = dict(ev.headers).get(b"authorization", b"-")
        doc = _echo_doc(ev, kept)
        head = [("x-echo-auth", auth), ("content-type", "application/json")]
        reason = b"echo " + auth
        if target == "/echo-chunked" or target == "/echo-trailer":
            writer.write(conn.send(h11.Response(status_code=200, reason=reason, headers=[
                *head, ("transfer-encoding", "chunked")])))
            for i in range(0, len(doc), 5):
                writer.write(conn.send(h11.Data(data=doc[i:i + 5])))
                await writer.drain()
            trailers = [("x-trailer", auth)] if target == "/echo-trailer" else []
            writer.write(conn.send(h11.EndOfMessage(headers=trailers)))
        else:
            if target == "/echo-big":
                doc = b" " * (200 * 1024) + doc + b" " * 1000
            elif target == "/echo-gzip":
                doc = gzip.compress(doc)
                head.append(("content-encoding", "gzip"))
            elif target == "/echo-br":
                head.append(("content-encoding", "br"))
            writer.write(conn.send(h11.Response(status_code=200, reason=reason, headers=[
                *head, ("content-length", str(len(doc)))])))
            writer.write(conn.send(h11.Data(data=doc)))
            writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


class Env:
    def __init__(self, tmp) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events: list = []
        self.ca = CertificateAuthority.generate()
        self.ca_file = tmp / "proxy-ca.pem"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.up_ca, leaf, key = write_test_pki(tmp, ["api.test", "other.test", "else.test"])
        self.upstream = Upstream()
        up_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        up_ctx.load_cert_chain(leaf, key)
        self.up_port = self.call(self._serve(self.upstream.serve, UP_IP, up_ctx))
        self.plain_port = self.call(self._serve(self.upstream.serve, PLAIN_IP, None))
        self.echo_port = self.call(self._serve(self._echo, PLAIN_IP, None))
        self.banner_port = self.call(self._serve(self._banner, PLAIN_IP, None))

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, cb, host, ctx, port=0):
        server = await asyncio.start_server(cb, host, port, ssl=ctx)
        return server.sockets[0].getsockname()[1]

    @staticmethod
    async def _echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    @staticmethod
    async def _banner(reader, writer):
        """A server-speaks-first protocol (SMTP-like): greets, then echoes."""
        writer.write(b"220 banner.test ready\r\n")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    def policy(self, **kw) -> Policy:
        cfg = dict(mode="intercept",
                   allow_hosts=("api.test", "other.test", "else.test", "plain.test"),
                   add_hosts=(("api.test", UP_IP), ("other.test", UP_IP), ("else.test", UP_IP),
                              ("plain.test", PLAIN_IP), ("evil.test", UP_IP)),
                   secrets=SECRETS, allow_private=UPSTREAMS)
        cfg.update(kw)
        return Policy(NetworkConfig(**cfg))

    def proxy(self, policy=None, **kw) -> InterceptProxy:
        kw.setdefault("upstream_ca_file", str(self.up_ca))
        p = InterceptProxy(policy or self.policy(), self.ca, self.events.append, **kw)
        p.http_ports = frozenset({self.plain_port})
        return p

    def listen(self, handler, dst_ip: str, dst_port: int) -> int:
        """A listener on 127.0.0.1 whose connections reach handler as if redirected."""
        async def cb(reader, writer):
            await handler.handle(reader, writer, dst_ip, dst_port)
        return self.call(self._serve(cb, "127.0.0.1", None))

    def events_of(self, kind):
        return [e for e in self.events if e.kind == kind]

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("proxy"))
    yield e
    e.close()


@pytest.fixture()
def https(env):
    """Listener port for an InterceptProxy reached as if the guest dialled UP_IP:up_port."""
    env.events.clear()
    return env.listen(env.proxy(), UP_IP, env.up_port)


# ---------------------------------------------------------------------------- test client

class Client:
    def __init__(self, port: int, sni: str | None, cafile, *, ctx=None, timeout=30) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if sni is None and ctx is None:
            self.sock = raw
        else:
            if ctx is None:
                ctx = ssl.create_default_context(cafile=str(cafile))
            self.sock = ctx.wrap_socket(raw, server_hostname=sni)
        self.conn = h11.Connection(h11.CLIENT)

    def send(self, method, target, host, headers=(), body=None, chunks=None, pause=0.0):
        hdrs = [("host", host), *headers]
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
        if chunks is not None:
            hdrs.append(("transfer-encoding", "chunked"))
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=target,
                                                     headers=hdrs)))
        if body:
            self.sock.sendall(self.conn.send(h11.Data(data=body)))
        for c in chunks or ():
            self.sock.sendall(self.conn.send(h11.Data(data=c)))
            if pause:
                time.sleep(pause)
        self.sock.sendall(self.conn.send(h11.EndOfMessage()))

    def event(self):
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(1 << 20))
                continue
            return ev

    def response(self, on_data=None):
        ev = self.event()
        while isinstance(ev, h11.InformationalResponse):
            ev = self.event()
        assert isinstance(ev, h11.Response), ev
        body = bytearray()
        while True:
            d = self.event()
            if isinstance(d, h11.Data):
                if on_data:
                    on_data(d.data)
                else:
                    body += d.data
            else:
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return ev.status_code, dict((k.decode(), v.decode()) for k, v in ev.headers), bytes(body)

    def request(self, *a, **kw):
        self.send(*a, **kw)
        return self.response()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------------------------- cases

def test_keepalive_two_requests_one_upstream_connection(env, https):
    before = env.upstream.connections
    c = Client(https, "api.test", env.ca_file)
    assert c.request("GET", "/one", "api.test")[::2] == (200, b"ok")
    assert c.request("GET", "/two", "API.test:443")[::2] == (200, b"ok")
    c.close()
    assert [s["target"] for s in env.upstream.seen[-2:]] == ["/one", "/two"]
    assert env.upstream.connections == before + 1  # upstream connection reused
    assert env.upstream.seen[-1]["conn"] == env.upstream.seen[-2]["conn"]


def test_not_allowed_host_gets_403_naming_host_and_flag(env, https):
    c = Client(https, "evil.test", env.ca_file)
    status, _, body = c.request("GET", "/", "evil.test")
    assert status == 403
    text = body.decode()
    assert "evil.test" in text and "--allow-host evil.test" in text
    assert c.closed()
    (ev,) = env.events_of("blocked")
    assert ev.host == "evil.test" and "--allow-host" in ev.detail


def test_sni_host_mismatch_blocked(env, https):
    n = len(env.upstream.seen)
    c = Client(https, "api.test", env.ca_file)
    status, _, body = c.request("GET", "/", "other.test")
    assert status == 421 and b"other.test" in body
    assert c.closed()
    assert env.events_of("sni_host_mismatch")
    assert len(env.upstream.seen) == n


def _no_real_values(env):
    for e in env.events:
        assert REAL not in repr(e) and REAL_OTHER not in repr(e)


def test_secret_replaced_in_header_query_and_json_body(env, https):
    c = Client(https, "api.test", env.ca_file)
    body = json.dumps({"token": PH, "n": 1}).encode()
    status, headers, resp = c.request(
        "POST", f"/v1?key={PH}&x=1", "api.test",
        headers=[("authorization", f"Bearer {PH}"), ("content-type", "application/json")],
        body=body)
    assert status == 200 and REAL.encode() not in resp
    seen = env.upstream.seen[-1]
    assert seen["target"] == f"/v1?key={REAL}&x=1"
    assert seen["headers"]["authorization"] == f"Bearer {REAL}"
    assert json.loads(seen["body"]) == {"token": REAL, "n": 1}
    assert seen["headers"]["content-length"] == str(len(seen["body"]))
    assert {e.fields["secret"] for e in env.events_of("secret_injected")} == {"API_TOKEN"}
    _no_real_values(env)


@pytest.mark.parametrize("where", ["header", "query", "body"])
def test_placeholder_to_unbound_host_blocked(env, https, where):
    n = len(env.upstream.seen)
    c = Client(https, "other.test", env.ca_file)
    kw = {}
    target = "/"
    if where == "header":
        kw["headers"] = [("x-key", PH)]
    elif where == "query":
        target = f"/?k={PH}"
    else:
        kw["headers"] = [("content-type", "text/plain")]
        kw["body"] = f"token={PH}".encode()
    status, _, body = c.request("POST", target, "other.test", **kw)
    assert status == 403 and b"API_TOKEN" in body and REAL.encode() not in body
    (ev,) = env.events_of("secret_leak_blocked")
    assert ev.host == "other.test" and ev.fields["secret"] == "API_TOKEN"
    assert len(env.upstream.seen) == n
    _no_real_values(env)


def test_placeholder_split_across_chunks_in_chunked_upload(env, https):
    c = Client(https, "api.test", env.ca_file)
    data = b"prefix-" + PH.encode() + b"-middle-" + PH.encode() + b"-end"
    cut1, cut2 = 10, len(b"prefix-" + PH.encode() + b"-middle-") + 20
    chunks = [data[:cut1], data[cut1:cut2], data[cut2:]]
    status, _, _ = c.request("POST", "/chunked", "api.test",
                             headers=[("content-type", "text/plain")], chunks=chunks, pause=0.05)
    assert status == 200
    got = env.upstream.seen[-1]["body"]
    assert got == data.replace(PH.encode(), REAL.encode())


def test_leak_in_chunked_body_to_unbound_host(env, https):
    n = len(env.upstream.seen)
    c = Client(https, "other.test", env.ca_file)
    status, _, _ = c.request("POST", "/chunked", "other.test",
                             headers=[("content-type", "application/json")],
                             chunks=[b'{"a": "' + PH.encode()[:20], PH.encode()[20:] + b'"}'],
                             pause=0.05)
    assert status == 403
    assert env.events_of("secret_leak_blocked")
    assert all(PH not in s["body"].decode() for s in env.upstream.seen[n:])


def test_sse_is_streamed(env, https):
    c = Client(https, "api.test", env.ca_file)
    start = time.monotonic()
    c.send("GET", "/sse", "api.test")
    times = []
    c.response(on_data=lambda d: times.append((time.monotonic() - start, d)))
    assert len(times) >= 4
    assert times[0][0] < 0.5 and times[-1][0] >= 0.9


def test_large_download_and_chunked_upload(env, https):
    mb = 200
    c = Client(https, "api.test", env.ca_file, timeout=120)
    h = hashlib.sha256()
    t = time.monotonic()
    c.send("GET", f"/download/{mb}", "api.test")
    status, _, _ = c.response(on_data=h.update)
    down = time.monotonic() - t
    expect = hashlib.sha256()
    for i in range(mb):
        expect.update(_block(i))
    assert status == 200 and h.hexdigest() == expect.hexdigest()

    t = time.monotonic()
    status, _, body = c.request("POST", "/upload", "api.test",
                                headers=[("content-type", "application/octet-stream")],
                                chunks=(_block(i) for i in range(mb)))
    up = time.monotonic() - t
    assert status == 200 and body.decode() == expect.hexdigest()
    print(f"\n{mb} MB via proxy: download {mb / down:.0f} MB/s, upload {mb / up:.0f} MB/s")


def test_upgrade_relays_raw_bytes(env, https):
    c = Client(https, "api.test", env.ca_file)
    c.send("GET", "/ws", "api.test", headers=[("connection", "upgrade"), ("upgrade", "echo")])
    ev = c.event()
    assert isinstance(ev, h11.InformationalResponse) and ev.status_code == 101
    buf = c.conn.trailing_data[0]
    c.sock.sendall(b"ping one\n")
    while b"PING ONE\n" not in buf:
        buf += c.sock.recv(65536)
    assert buf.startswith(b"hello from upstream\n")
    c.close()
    assert env.events_of("upgraded")


def test_plain_http_port(env):
    env.events.clear()
    port = env.listen(env.proxy(), PLAIN_IP, env.plain_port)
    c = Client(port, None, None)
    assert c.request("GET", "/p", "plain.test")[::2] == (200, b"ok")
    assert env.upstream.seen[-1]["target"] == "/p"
    status, _, body = c.request("GET", "/", "evil.test")
    assert status == 403
    assert body.decode().strip() == (
        "matchlock: blocked request to evil.test: host evil.test is not allowed by this "
        "sandbox's network policy; allow it with --allow-host evil.test")
    assert env.events_of("blocked")[0].host == "evil.test"


def test_http10_upstream_answered_as_http11(env):
    """Python's http.server speaks HTTP/1.0 with a close-delimited body: the guest still gets
    a valid HTTP/1.1 response (re-framed as chunked), and a second request works."""
    async def http10(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6\r\n"
                     b"Content-Type: text/plain\r\n\r\nhello from 1.0")
        await writer.drain()
        writer.close()

    env.events.clear()
    up_port = env.call(env._serve(http10, PLAIN_IP, None))
    proxy = env.proxy()
    proxy.http_ports = frozenset({up_port})
    port = env.listen(proxy, PLAIN_IP, up_port)
    c = Client(port, None, None)
    for _ in range(2):
        status, headers, body = c.request("GET", "/", "plain.test")
        assert (status, body) == (200, b"hello from 1.0")
        assert headers.get("transfer-encoding") == "chunked"
    assert c.conn.their_http_version == b"1.1"
    c.close()
    assert not env.events_of("upstream_error") and not env.events_of("error")


def test_plain_http_foreign_placeholder_blocked(env):
    env.events.clear()
    port = env.listen(env.proxy(), PLAIN_IP, env.plain_port)
    c = Client(port, None, None)
    status, _, _ = c.request("GET", f"/p?k={PH}", "plain.test")
    assert status == 403  # plain.test is not API_TOKEN's host
    assert env.events_of("secret_leak_blocked")


def test_upstream_tls_is_verified(env):
    env.events.clear()
    port = env.listen(env.proxy(upstream_ca_file=None), UP_IP, env.up_port)
    c = Client(port, "api.test", env.ca_file)
    status, _, body = c.request("GET", "/", "api.test")
    assert status == 502
    assert any("verification" in e.detail for e in env.events_of("upstream_error"))


def test_policy_exception_fails_closed(env):
    class Broken(Policy):
        def secrets_for_host(self, host):
            raise RuntimeError(REAL)

    env.events.clear()
    n = len(env.upstream.seen)
    pol = Broken(NetworkConfig(mode="intercept", allow_hosts=("api.test",),
                               add_hosts=(("api.test", UP_IP),), secrets=SECRETS,
                               allow_private=UPSTREAMS))
    port = env.listen(env.proxy(pol), UP_IP, env.up_port)
    c = Client(port, "api.test", env.ca_file)
    status, _, body = c.request("GET", "/", "api.test")
    assert status == 502 and REAL.encode() not in body
    assert len(env.upstream.seen) == n
    assert env.events_of("error")
    _no_real_values(env)


def test_no_sni_uses_address_name(env):
    env.events.clear()
    port = env.listen(env.proxy(), UP_IP, env.up_port)
    ctx = ssl.create_default_context(cafile=str(env.ca_file))
    ctx.check_hostname = False  # no SNI is sent for an IP server_hostname… so send none
    c = Client(port, None, None, ctx=ctx)
    # UP_IP maps to several --add-host names; host_for_ip picks one of them
    name = env.proxy().policy.host_for_ip(UP_IP)
    status, _, _ = c.request("GET", "/", name)
    assert status in (200, 403)


def test_tls12_seclevel0_client(env, https):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(env.ca_file))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:@SECLEVEL=0")
    c = Client(https, "api.test", env.ca_file, ctx=ctx)
    assert c.sock.version() == "TLSv1.2"
    assert c.request("GET", "/", "api.test")[::2] == (200, b"ok")


def _client_hello_without_sigalgs(sni: bytes) -> bytes:
    """TLS 1.2 ClientHello like busybox wget's: no signature_algorithms extension."""
    def ext(t, body):
        return t.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    name = b"\x00" + len(sni).to_bytes(2, "big") + sni
    exts = (ext(0, (len(name)).to_bytes(2, "big") + name)
            + ext(10, b"\x00\x02\x00\x17")  # supported_groups: secp256r1
            + ext(11, b"\x01\x00"))  # ec_point_formats: uncompressed
    suites = b"\xc0\x2b\xc0\x2f\x00\x9c"
    body = (b"\x03\x03" + bytes(32) + b"\x00" + len(suites).to_bytes(2, "big") + suites
            + b"\x01\x00" + len(exts).to_bytes(2, "big") + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_tls12_hello_without_signature_algorithms_gets_server_hello(env, https):
    s = socket.create_connection(("127.0.0.1", https), timeout=10)
    s.sendall(_client_hello_without_sigalgs(b"api.test"))
    data = b""
    while len(data) < 6:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data[:1] == b"\x16" and data[5:6] == b"\x02", data[:16]  # handshake: ServerHello


def test_passthrough_port_by_name(env):
    env.events.clear()
    port = env.listen(env.proxy(), PLAIN_IP, env.echo_port)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"SSH-2.0-test\r\n")
    assert s.recv(100) == b"SSH-2.0-test\r\n"
    s.close()
    port = env.listen(env.proxy(), "127.0.0.9", env.echo_port)  # no name for this address
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"x")
    assert s.recv(100) == b""
    assert env.events_of("blocked")


def test_tcp_relay_open_mode(env, monkeypatch):
    env.events.clear()
    relay = TcpRelay(env.policy(mode="open", allow_hosts=(), secrets=()), env.events.append)
    dialled = []
    orig = relay.dial

    async def dial(ip, port, idle):
        dialled.append(ip)
        return await orig(ip, port, idle)

    monkeypatch.setattr(relay, "dial", dial)
    port = env.listen(relay, "10.0.0.1", 443)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert s.recv(10) == b""
    assert dialled == []
    (ev,) = env.events_of("blocked")
    assert "10.0.0.1" in ev.detail
    # an address named by an exception is dialled; half-close passes through
    port = env.listen(relay, PLAIN_IP, env.echo_port)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"abc" * 1000)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    assert got == b"abc" * 1000 and dialled == [PLAIN_IP]


# ------------------------------------------------------------------------ sans-I/O helpers

def test_stream_rewriter_every_split():
    rules = SecretRules([SECRETS[0]], [SECRETS[1]])
    data = b"a" + PH.encode() + b"bc" + PH.encode()
    for cut in range(len(data) + 1):
        w = rules.stream()
        out = w.feed(data[:cut]) + w.feed(data[cut:]) + w.finish()
        assert out == data.replace(PH.encode(), REAL.encode()), cut
        assert w.used == {"API_TOKEN"} and w.leaked == []
    for size in (1, 3, 7):
        w = rules.stream()
        bad = b"xx" + PH_OTHER.encode() + b"yy"
        for i in range(0, len(bad), size):
            w.feed(bad[i:i + size])
        w.finish()
        assert w.leaked == ["OTHER_TOKEN"]


def test_helpers():
    pol = Policy(NetworkConfig(mode="intercept", allow_hosts=("api.test",), secrets=SECRETS))
    assert replace_placeholders(b"x" + PH.encode(), SECRETS) == b"x" + REAL.encode()
    assert foreign_placeholders(PH.encode() + PH_OTHER.encode(), "api.test", pol) == \
        ["OTHER_TOKEN"]
    assert foreign_placeholders(PH.encode(), "api.test", pol) == []
    assert normalize_host(b"API.Test:443") == "api.test"
    assert normalize_host("[::1]:443") == "::1"
    assert is_tls_client_hello(b"\x16\x03\x01") and not is_tls_client_hello(b"GET /")


# ------------------------------------------------------------- sealing: framing, detection

def _send_first_flight(sock, data: bytes, split: int | None, pause: float) -> None:
    if split:
        sock.sendall(data[:split])
        time.sleep(pause)  # the stimulus: a ClientHello split and delayed
        sock.sendall(data[split:])
    elif data:
        sock.sendall(data)


def tls_raw(port: int, sni: str, cafile, data: bytes, *, split: int | None = None,
            pause: float = 0.0, timeout: float = 15) -> bytes:
    """TLS through memory BIOs over a plain socket, so the ClientHello can be split after any
    byte and delayed; sends `data` and returns all the proxy sends until it closes."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    first = True
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                _send_first_flight(sock, out.read(), split if first else None, pause)
                first = False
                got = sock.recv(65536)
                if not got:
                    raise ConnectionError("closed during the handshake") from None
                inc.write(got)
        obj.write(data)
        sock.sendall(out.read())
        resp = b""
        while True:
            try:
                chunk = obj.read(65536)
            except ssl.SSLWantReadError:
                got = sock.recv(65536)
                if not got:
                    break
                inc.write(got)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            resp += chunk
        return resp
    finally:
        sock.close()


def plain_raw(port: int, data: bytes, timeout: float = 15) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        resp = b""
        while chunk := sock.recv(65536):
            resp += chunk
        return resp
    finally:
        sock.close()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else 0


def test_absolute_form_must_name_the_host(env, https):
    n = len(env.upstream.seen)
    bad = (b"GET https://evil.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n",
           b"GET https://api.test:8443/x HTTP/1.1\r\nHost: api.test\r\n\r\n",
           b"GET http://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n",  # scheme
           b"GET https://x@api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n",
           b"CONNECT evil.test:443 HTTP/1.1\r\nHost: api.test\r\n\r\n")
    for raw in bad:
        resp = tls_raw(https, "api.test", env.ca_file, raw)
        assert _status(resp) in (400, 405), (raw, resp[:200])
    assert len(env.upstream.seen) == n  # none of them reached the upstream
    assert len([e for e in env.events_of("blocked") if "bad request" in e.detail]) == len(bad)
    # positive control: an absolute-form target that names the Host goes out in origin-form
    resp = tls_raw(https, "api.test", env.ca_file,
                   b"GET https://API.test/abs?k=" + PH.encode()
                   + b" HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
    assert _status(resp) == 200, resp[:200]
    assert env.upstream.seen[-1]["target"] == f"/abs?k={REAL}"
    # plain HTTP port: the same rule
    port = env.listen(env.proxy(), PLAIN_IP, env.plain_port)
    n = len(env.upstream.seen)
    resp = plain_raw(port, b"GET http://evil.test/ HTTP/1.1\r\nHost: plain.test\r\n\r\n")
    assert _status(resp) == 400 and len(env.upstream.seen) == n


SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: api.test\r\nX-K: " + PH.encode() + b"\r\n\r\n"


@pytest.mark.parametrize("framing", [
    b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(SMUGGLE)),
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
])
def test_ambiguous_framing_is_400_and_reaches_nothing(env, https, framing):
    n = len(env.upstream.seen)
    resp = tls_raw(https, "api.test", env.ca_file,
                   b"POST /p HTTP/1.1\r\nHost: api.test\r\n" + framing + b"\r\n0\r\n\r\n"
                   + SMUGGLE)
    assert _status(resp) == 400, resp[:200]
    assert len(env.upstream.seen) == n
    # positive control, same connection setup: one framing header is relayed (canonical)
    resp = tls_raw(https, "api.test", env.ca_file,
                   b"POST /p HTTP/1.1\r\nHost: api.test\r\nContent-Length: 05\r\n"
                   b"Connection: close\r\n\r\nhello")
    assert _status(resp) == 200
    seen = env.upstream.seen[-1]
    assert seen["target"] == "/p" and seen["body"] == b"hello"
    assert seen["headers"]["content-length"] == "5" and "transfer-encoding" not in seen["headers"]


def test_http10_with_transfer_encoding_is_400(env):
    port = env.listen(env.proxy(), PLAIN_IP, env.plain_port)
    n = len(env.upstream.seen)
    resp = plain_raw(port, b"POST / HTTP/1.0\r\nHost: plain.test\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert _status(resp) == 400 and len(env.upstream.seen) == n


def test_head_size_limit_holds_in_one_write(env, https):
    n = len(env.upstream.seen)
    pad = b"X-Pad: " + b"a" * (20 * 1024) + b"\r\n"
    resp = tls_raw(https, "api.test", env.ca_file,
                   b"GET /big-head HTTP/1.1\r\nHost: api.test\r\n" + pad + b"\r\n")
    assert _status(resp) == 431 and len(env.upstream.seen) == n
    pad = b"X-Pad: " + b"a" * (15 * 1024) + b"\r\n"  # under the limit: relayed
    resp = tls_raw(https, "api.test", env.ca_file,
                   b"GET /ok-head HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n" + pad
                   + b"\r\n")
    assert _status(resp) == 200 and env.upstream.seen[-1]["target"] == "/ok-head"


@pytest.mark.parametrize("split,pause", [(None, 1.0), (1, 1.0), (3, 0.7)])
def test_client_hello_after_a_pause_is_judged_by_sni(env, https, split, pause):
    """The listener's port is not 443: a late or split ClientHello still gets the SNI check."""
    n = len(env.upstream.seen)
    req = b"GET /late HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
    resp = tls_raw(https, "evil.test", env.ca_file, req % b"evil.test", split=split,
                   pause=pause)
    assert _status(resp) == 403 and b"evil.test" in resp, resp[:300]
    assert len(env.upstream.seen) == n
    assert [e for e in env.events_of("blocked") if e.fields.get("sni") == "evil.test"]
    # positive control: an allowed SNI, the same timing, is intercepted (secrets injected)
    resp = tls_raw(https, "api.test", env.ca_file,
                   b"GET /late?k=" + PH.encode() + b" HTTP/1.1\r\nHost: api.test\r\n"
                   b"Connection: close\r\n\r\n", split=split, pause=pause)
    assert _status(resp) == 200, resp[:300]
    assert env.upstream.seen[-1]["target"] == f"/late?k={REAL}"


def test_server_speaks_first_protocol_is_relayed(env):
    """A silent guest towards an allowed name's address: the upstream is dialled and its
    greeting decides (raw relay), as for SMTP or MySQL."""
    env.events.clear()
    port = env.listen(env.proxy(), PLAIN_IP, env.banner_port)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert s.recv(100) == b"220 banner.test ready\r\n"
    s.sendall(b"EHLO guest\r\n")
    assert s.recv(100) == b"EHLO guest\r\n"
    s.close()
    # not an allowed name's address: nothing is dialled, the guest's bytes are refused
    port = env.listen(env.proxy(), "127.0.0.9", env.banner_port)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"EHLO guest\r\n")
    assert s.recv(100) == b""
    assert [e for e in env.events_of("blocked") if "127.0.0.9" in e.host]


# --------------------------------------------------------------------- sealing: secrets

@pytest.mark.parametrize("route", ["/echo", "/echo-chunked", "/echo-trailer", "/echo-big",
                                   "/echo-gzip"])
def test_reflected_secret_never_reaches_the_guest(env, https, route):
    c = Client(https, "api.test", env.ca_file)
    c.send("POST", route, "api.test",
           headers=[("authorization", f"Bearer {PH}"), ("content-type", "application/json"),
                    ("accept-encoding", "gzip")],
           body=json.dumps({"token": PH}).encode())
    ev = c.event()
    assert isinstance(ev, h11.Response) and ev.status_code == 200
    headers = dict(ev.headers)
    body = bytearray()
    while isinstance(d := c.event(), h11.Data):
        body += d.data
    trailers = dict(d.headers)
    c.close()
    seen = env.upstream.seen[-1]
    # positive control: the upstream got the real value (and was asked for identity)
    assert seen["headers"]["authorization"] == f"Bearer {REAL}"
    assert json.loads(seen["body"]) == {"token": REAL}
    assert seen["headers"]["accept-encoding"] == "identity"
    guest_saw = bytes(body) + ev.reason + repr(ev.headers).encode() + repr(trailers).encode()
    assert REAL.encode() not in guest_saw
    assert headers[b"x-echo-auth"] == f"Bearer {PH}".encode()
    assert ev.reason == f"echo Bearer {PH}".encode()
    if route == "/echo-big":  # announced length kept: same-length filler instead
        assert int(headers[b"content-length"]) == len(body)
        assert b"SANDBOX_SECRET_" in body
    else:
        doc = json.loads(bytes(body))
        assert doc["headers"]["authorization"] == f"Bearer {PH}"
        assert json.loads(doc["body"]) == {"token": PH}
        assert b"content-encoding" not in headers
    if route == "/echo-trailer":
        assert trailers[b"x-trailer"] == f"Bearer {PH}".encode()


def test_unscannable_encoding_from_a_secret_host_is_refused(env, https):
    c = Client(https, "api.test", env.ca_file)
    status, _, body = c.request("GET", "/echo-br", "api.test",
                                headers=[("authorization", f"Bearer {PH}")])
    assert status == 502 and b"cannot scan" in body and REAL.encode() not in body
    assert env.upstream.seen[-1]["headers"]["authorization"] == f"Bearer {REAL}"


def test_reflection_over_an_upgrade_is_masked(env, https):
    c = Client(https, "api.test", env.ca_file)
    c.send("GET", "/ws-echo", "api.test", headers=[
        ("connection", "upgrade"), ("upgrade", "echo"), ("authorization", PH),
        ("sec-websocket-extensions", "permessage-deflate")])
    ev = c.event()
    assert isinstance(ev, h11.InformationalResponse) and ev.status_code == 101
    assert dict(ev.headers)[b"x-auth"] == PH.encode()
    buf = c.conn.trailing_data[0]
    while b"\n" not in buf:
        buf += c.sock.recv(65536)
    c.close()
    assert buf.startswith(b"auth=SANDBOX_SECRET_") and REAL.encode() not in buf
    assert len(buf.split(b"\n")[0]) == len(b"auth=" + REAL.encode())  # same length
    seen = env.upstream.seen[-1]
    assert seen["headers"]["authorization"] == REAL
    assert "sec-websocket-extensions" not in seen["headers"]


@pytest.mark.parametrize("case", ["real_header", "real_body", "ph_octet", "ph_multipart",
                                  "ph_header_name", "ph_gzip_labelled", "ph_method"])
def test_every_request_byte_is_scanned_towards_unbound_hosts(env, https, case):
    n = len(env.upstream.seen)
    c = Client(https, "other.test", env.ca_file)
    headers, body, method = [], b"x" * 100, "POST"
    if case == "real_header":
        headers = [("x-k", f"v={REAL}")]
    elif case == "real_body":
        headers, body = [("content-type", "application/octet-stream")], REAL.encode() * 3
    elif case == "ph_octet":
        headers = [("content-type", "application/octet-stream")]
        body = os.urandom(70000) + PH.encode() + os.urandom(100)
    elif case == "ph_multipart":
        headers = [("content-type", "multipart/form-data; boundary=BB")]
        body = (b"--BB\r\nContent-Disposition: form-data; name=f; filename=a.bin\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n" + PH.encode()
                + b"\r\n--BB--\r\n")
    elif case == "ph_header_name":
        headers = [(f"x-{PH}", "1")]
    elif case == "ph_method":
        method = PH
    else:  # a Content-Encoding label does not stop the scan of the bytes as sent
        headers = [("content-encoding", "gzip"), ("content-type", "application/json")]
        body = PH.encode()
    status, _, resp = c.request(method, "/scan", "other.test", headers=headers, body=body)
    assert status == 403 and b"API_TOKEN" in resp, resp
    assert len(env.upstream.seen) == n
    (ev,) = env.events_of("secret_leak_blocked")
    assert ev.fields["secret"] == "API_TOKEN"
    _no_real_values(env)
    # positive control: the same request without the secret goes through
    c = Client(https, "other.test", env.ca_file)
    clean = [(k.replace(PH, "plain"), v.replace(REAL, "plain")) for k, v in headers]
    status, _, _ = c.request("POST", "/scan", "other.test", headers=clean,
                             body=body.replace(PH.encode(), b"p").replace(REAL.encode(), b"p"))
    assert status == 200 and env.upstream.seen[-1]["target"] == "/scan"


def test_binary_body_to_the_bound_host_keeps_placeholders(env, https):
    """Only the rewritten types get values; a binary upload is scanned, not rewritten."""
    c = Client(https, "api.test", env.ca_file)
    body = os.urandom(1000) + PH.encode()
    status, _, _ = c.request("POST", "/bin", "api.test",
                             headers=[("content-type", "application/octet-stream")], body=body)
    assert status == 200
    seen = env.upstream.seen[-1]
    assert seen["body"] == body and seen["headers"]["content-length"] == str(len(body))


def test_expect_100_continue_with_a_held_body(env, https):
    c = Client(https, "api.test", env.ca_file)
    body = (b"token=" + PH.encode() + b"&") * 50000  # ~2.6 MB, held whole and rewritten
    c.sock.sendall(c.conn.send(h11.Request(method="POST", target="/upload", headers=[
        ("host", "api.test"), ("content-type", "application/x-www-form-urlencoded"),
        ("content-length", str(len(body))), ("expect", "100-continue")])))
    ev = c.event()
    assert isinstance(ev, h11.InformationalResponse) and ev.status_code == 100
    c.sock.sendall(c.conn.send(h11.Data(data=body)) + c.conn.send(h11.EndOfMessage()))
    status, _, resp = c.response()
    expect = body.replace(PH.encode(), REAL.encode())
    assert status == 200 and resp.decode() == hashlib.sha256(expect).hexdigest()
    seen = env.upstream.seen[-1]
    assert seen["headers"]["content-length"] == str(len(expect))
    assert "expect" not in seen["headers"]


def test_vm_buffer_budget_is_shared_and_streams_past_it(env):
    from matchlock.net.proxy._budget import BufferBudget

    env.events.clear()
    proxy = env.proxy(budget=BufferBudget(1 << 20))
    port = env.listen(proxy, UP_IP, env.up_port)
    body = (b"k=" + PH.encode() + b";") * 14000  # ~690 KB each
    expect = hashlib.sha256(body.replace(PH.encode(), REAL.encode())).hexdigest()
    a = Client(port, "api.test", env.ca_file)
    a.sock.sendall(a.conn.send(h11.Request(method="POST", target="/upload", headers=[
        ("host", "api.test"), ("content-type", "text/plain"),
        ("content-length", str(len(body)))])))
    a.sock.sendall(a.conn.send(h11.Data(data=body[:-1])))
    deadline = time.monotonic() + 10
    while proxy.budget.used != len(body):  # A's body is held (reserved from the head)
        assert time.monotonic() < deadline, proxy.budget.used
        time.sleep(0.01)
    b = Client(port, "api.test", env.ca_file)
    status, _, resp = b.request("POST", "/upload", "api.test",
                                headers=[("content-type", "text/plain")], body=body)
    assert status == 200 and resp.decode() == expect  # B streamed, rewritten
    seen_b = env.upstream.seen[-1]
    assert seen_b["headers"].get("transfer-encoding") == "chunked"
    (ev,) = env.events_of("buffer_limit")
    assert "budget" in ev.detail and ev.fields["length"] == len(body)
    a.sock.sendall(a.conn.send(h11.Data(data=body[-1:])) + a.conn.send(h11.EndOfMessage()))
    status, _, resp = a.response()
    assert status == 200 and resp.decode() == expect
    assert env.upstream.seen[-1]["headers"]["content-length"] == str(
        len(body.replace(PH.encode(), REAL.encode())))
    # held bodies and small scrubbed responses draw from the one budget, never past it
    assert proxy.budget.used == 0 and len(body) <= proxy.budget.peak <= 1 << 20
