"""Proxy benchmark: HTTPS through InterceptProxy (secret injected in a header) vs mitmproxy
(mitmdump in reverse mode with a header-replacing addon) vs direct to the upstream.

    python3 bench/proxy.py [--requests 2000] [--seconds 10] [--mb 200] [--mitmdump PATH]

Three processes besides this client: the upstream (127.0.0.1, minimal HTTPS server with its
own CA), the matchlock proxy, and mitmdump (skipped when not installed; it is not a project
dependency: `pip install mitmproxy` into any environment and pass --mitmdump). All traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PH = "SANDBOX_SECRET_" + "0123456789abcdef" * 2
REAL = "bench-real-secret-value"
HOST = "api.test"
CHUNK = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def make_upstream_ca(tmp: Path) -> tuple[Path, Path, Path]:
    from matchlock.net.testing import write_test_pki

    return write_test_pki(tmp, [HOST], ips=["127.0.0.1"])


# ------------------------------------------------------------------------- server roles

def run_upstream(port: int, leaf: str, key: str) -> None:
    """Minimal keep-alive HTTPS server: GET /download/<MB> streams, anything else → 'ok'.
    Counts requests that arrived with the real secret (printed at exit)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf, key)
    block = os.urandom(CHUNK)
    stats = {"with_secret": 0, "requests": 0}
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                stats["requests"] += 1
                if REAL.encode() in head:
                    stats["with_secret"] += 1
                target = head.split(b" ", 2)[1]
                if target.startswith(b"/download/"):
                    mb = int(target.rsplit(b"/", 1)[1])
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (mb * CHUNK))
                    for _ in range(mb):
                        writer.write(block)
                        await writer.drain()
                else:
                    writer.write(ok)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", port, ssl=ctx)
        async with server:
            await asyncio.sleep(3600)

    def stop(*_):
        print(f"upstream: {stats}", file=sys.stderr, flush=True)
        os._exit(0)

    import signal
    signal.signal(signal.SIGTERM, stop)
    asyncio.run(main())


def run_matchlock(port: int, up_port: int, up_ca: str, ca_out: str, profile: str) -> None:
    from matchlock.net.ca import CertificateAuthority
    from matchlock.net.policy import Policy
    from matchlock.net.proxy import InterceptProxy
    from matchlock.net.types import NetworkConfig, Secret

    policy = Policy(NetworkConfig(
        mode="intercept", allow_hosts=(HOST,), add_hosts=((HOST, "127.0.0.1"),),
        secrets=(Secret("TOKEN", REAL, (HOST,), PH),)))
    ca = CertificateAuthority.generate()
    Path(ca_out).write_bytes(ca.cert_pem)
    proxy = InterceptProxy(policy, ca, lambda e: None, upstream_ca_file=up_ca)

    async def cb(reader, writer):
        await proxy.handle(reader, writer, "127.0.0.1", up_port)

    async def main():
        server = await asyncio.start_server(cb, "127.0.0.1", port)
        async with server:
            await asyncio.sleep(3600)

    import signal
    if profile:
        import cProfile
        prof = cProfile.Profile()

        def stop(*_):
            prof.disable()
            prof.dump_stats(profile)
            os._exit(0)
        signal.signal(signal.SIGTERM, stop)
        prof.enable()
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    from matchlock._aio import run as aio_run

    aio_run(main())  # the same event loop the matchlock CLI runs


MITM_ADDON = f'''
PH, REAL = {PH!r}, {REAL!r}
def request(flow):
    v = flow.request.headers.get("authorization")
    if v and PH in v:
        flow.request.headers["authorization"] = v.replace(PH, REAL)
'''


# ------------------------------------------------------------------------------- client

def _connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(s, server_hostname=HOST)


def _request(sock: ssl.SSLSocket, buf: bytearray) -> None:
    """One GET with the placeholder; reads a Content-Length response (buf keeps leftovers)."""
    sock.sendall(b"GET /x HTTP/1.1\r\nhost: " + HOST.encode()
                 + b"\r\nauthorization: Bearer " + PH.encode() + b"\r\n\r\n")
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15:].split(b"\r\n", 1)[0])
            if len(buf) >= end + 4 + n:
                assert head.startswith(b"http/1.1 200"), head[:60]
                del buf[:end + 4 + n]
                return
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data


def bench_keepalive(port, ctx, n, seconds):
    sock = _connect(port, ctx)
    buf = bytearray()
    lat = []
    start = time.perf_counter()
    while len(lat) < n and time.perf_counter() - start < seconds:
        t = time.perf_counter()
        _request(sock, buf)
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    sock.close()
    return len(lat) / total, lat


def bench_newconn(port, ctx, n, seconds):
    lat = []
    start = time.perf_counter()
    while len(lat) < n and time.perf_counter() - start < seconds:
        t = time.perf_counter()
        sock = _connect(port, ctx)
        _request(sock, bytearray())
        sock.close()
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return len(lat) / total, lat


def bench_stream(port, ctx, mb):
    sock = _connect(port, ctx)
    sock.sendall(b"GET /download/%d HTTP/1.1\r\nhost: %s\r\n\r\n" % (mb, HOST.encode()))
    t = time.perf_counter()
    want = None
    got = 0
    buf = b""
    while want is None or got < want:
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed early")
        if want is None:
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            want = mb * CHUNK
            got = len(buf) - end - 4
        else:
            got += len(data)
    sock.close()
    return mb / (time.perf_counter() - t)


def _pct(lat, p):
    s = sorted(lat)
    return s[min(len(s) - 1, int(len(s) * p))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--newconn-requests", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--mitmdump", default=shutil.which("mitmdump") or "/tmp/mitm-venv/bin/mitmdump")
    ap.add_argument("--profile", default="", help="cProfile output file for the proxy")
    ap.add_argument("--role", default="", help=argparse.SUPPRESS)
    ap.add_argument("--args", nargs="*", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "upstream":
        run_upstream(int(a.args[0]), a.args[1], a.args[2])
        return
    if a.role == "matchlock":
        run_matchlock(int(a.args[0]), int(a.args[1]), a.args[2], a.args[3],
                      a.args[4] if len(a.args) > 4 else "")
        return

    tmp = Path(tempfile.mkdtemp(prefix="ml-bench-proxy-"))
    up_ca, leaf, key = make_upstream_ca(tmp)
    up_port, ml_port, mitm_port = _free_port(), _free_port(), _free_port()
    me = [sys.executable, __file__, "--role"]
    procs = [subprocess.Popen([*me, "upstream", "--args", str(up_port), str(leaf), str(key)])]
    procs.append(subprocess.Popen([*me, "matchlock", "--args", str(ml_port), str(up_port),
                                   str(up_ca), str(tmp / "ml-ca.pem"), a.profile]))
    have_mitm = Path(a.mitmdump).exists()
    if have_mitm:
        (tmp / "addon.py").write_text(MITM_ADDON)
        procs.append(subprocess.Popen(
            [a.mitmdump, "-q", "--mode", f"reverse:https://127.0.0.1:{up_port}",
             "--listen-host", "127.0.0.1", "--listen-port", str(mitm_port),
             "--set", f"confdir={tmp / 'mitm'}", "--set", f"ssl_verify_upstream_trusted_ca={up_ca}",
             "--set", "stream_large_bodies=1m", "--set", "connection_strategy=lazy",
             "-s", str(tmp / "addon.py")], stdout=subprocess.DEVNULL))
    try:
        _wait_port(up_port)
        _wait_port(ml_port)
        direct_ctx = ssl.create_default_context(cafile=str(up_ca))
        ml_ctx = ssl.create_default_context(cafile=str(tmp / "ml-ca.pem"))
        targets = [("direct", up_port, direct_ctx), ("matchlock", ml_port, ml_ctx)]
        if have_mitm:
            _wait_port(mitm_port)
            mitm_ctx = ssl.create_default_context(
                cafile=str(tmp / "mitm" / "mitmproxy-ca-cert.pem"))
            targets.append(("mitmproxy", mitm_port, mitm_ctx))
        res = {}
        for name, port, ctx in targets:
            bench_keepalive(port, ctx, 200, 2)  # warm up (leaf certs, upstream connections)
            rps, lat = bench_keepalive(port, ctx, a.requests, a.seconds)
            nrps, nlat = bench_newconn(port, ctx, a.newconn_requests, a.seconds)
            mbs = bench_stream(port, ctx, a.mb) if name != "mitmproxy" else float("nan")
            res[name] = (rps, lat, nrps, nlat, mbs)
            print(f"{name:10s} keep-alive {rps:7.0f} req/s p50 {_pct(lat, .5):6.2f} ms "
                  f"p99 {_pct(lat, .99):6.2f} ms | new conn {nrps:6.0f} req/s "
                  f"p50 {_pct(nlat, .5):6.2f} ms p99 {_pct(nlat, .99):6.2f} ms | "
                  f"stream {mbs:6.0f} MB/s", flush=True)
        d, m = res["direct"], res["matchlock"]
        print(f"matchlock p50 overhead over direct (keep-alive): "
              f"{_pct(m[1], .5) - _pct(d[1], .5):.2f} ms; streaming ratio {m[4] / d[4]:.2f}")
        if "mitmproxy" in res:
            x = res["mitmproxy"]
            print(f"matchlock / mitmproxy: keep-alive {m[0] / x[0]:.1f}x, "
                  f"new connection {m[2] / x[2]:.1f}x")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
