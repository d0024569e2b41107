"""Test upstreams for the intercept e2e tests; run inside a test network namespace:

    ip netns exec NS python3 _upstream.py CONFIG.json

CONFIG: {"log": path, "cert": pem, "key": pem, "https": [ip...], "http": [ip...],
"raw": [[ip, port]...], "udp": [[ip, port]...], "dns": [ip, {name: ip}], "ready": path,
"https_ports": [443, ...] (optional)}.

Every event is one JSON line appended to `log` (the test reads it): "conn" (a TCP
connection, any listener; HTTPS ones once the handshake is done, with the SNI), "req" (an
HTTP request: server, method, target, headers, body prefix, body sha256 and length),
"raw" (HTTPS and plain HTTP: every byte a connection received, up to 64 KiB, as latin-1,
logged when it ends), "udp" (a datagram), "dns" (a query name).

HTTPS (h11, HTTP/1.1, keep-alive) routes: /sse (4 events, 1 s apart), /big/<MB>
(deterministic bytes: block i = sha256(str(i)) * 32768), /upload (answers sha256 and length
of the body), /ws (101, then echo in upper case), /echo (the request reflected like httpbin:
headers and body as JSON, the Authorization header in `x-echo-auth`; /echo-chunked sends it
in 7-byte chunks, /echo-gzip gzip-encoded whatever was asked), anything else: "hello from
<ip>". Plain HTTP (port 80) is Python's http.server: HTTP/1.0, close-delimited bodies.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.server
import json
import socket
import ssl
import sys
import threading
import time

import h11

BLOCK = 1 << 20
RAW_KEEP = 64 * 1024
_lock = threading.Lock()


class _Tap:
    """A StreamReader stand-in that keeps a copy of the first bytes read."""

    def __init__(self, reader) -> None:
        self.reader, self.kept = reader, bytearray()

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        if len(self.kept) < RAW_KEEP:
            self.kept += data[:RAW_KEEP - len(self.kept)]
        return data


def block(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (BLOCK // 32)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    logf = open(cfg["log"], "a", buffering=1)  # noqa: SIM115

    def record(**rec) -> None:
        rec["t"] = time.time()
        with _lock:
            logf.write(json.dumps(rec) + "\n")

    # --- plain HTTP: http.server (HTTP/1.0) ---------------------------------------------
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            record(kind="req", server=self.server.server_address[0] + ":80", method="GET",
                   target=self.path, headers={k.lower(): v for k, v in self.headers.items()},
                   body=body.decode("latin-1"), sha256=hashlib.sha256(body).hexdigest(),
                   length=len(body))
            record(kind="raw", dst=self.server.server_address[0] + ":80",
                   data=(self.raw_requestline + bytes(self.headers) + body).decode("latin-1"))
            out = f"plain hello from {self.server.server_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()  # no Content-Length: the body ends when the connection does
            self.wfile.write(out)

        do_POST = do_GET

        def log_message(self, *a) -> None:
            pass

    for ip in cfg["http"]:
        srv = http.server.ThreadingHTTPServer((ip, 80), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()

    # --- UDP sinks and the fake upstream DNS --------------------------------------------
    def udp_sink(ip: str, port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, port))
        while True:
            data, peer = s.recvfrom(4096)
            record(kind="udp", dst=f"{ip}:{port}", peer=str(peer), data=data.hex())

    for ip, port in cfg["udp"]:
        threading.Thread(target=udp_sink, args=(ip, port), daemon=True).start()

    def dns_server(ip: str, answers: dict) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 53))
        while True:
            q, peer = s.recvfrom(4096)
            try:
                labels, i = [], 12
                while q[i]:
                    labels.append(q[i + 1:i + 1 + q[i]].decode("latin-1"))
                    i += 1 + q[i]
                name = ".".join(labels).lower()
                qtype = int.from_bytes(q[i + 1:i + 3], "big")
                qend = i + 5
            except IndexError:
                continue
            record(kind="dns", name=name, qtype=qtype, peer=str(peer))
            addr = answers.get(name)
            flags = 0x8180 if addr else 0x8183  # NOERROR / NXDOMAIN
            ans = b""
            if addr and qtype == 1:
                ans = (b"\xc0\x0c\x00\x01\x00\x01" + (30).to_bytes(4, "big") + b"\x00\x04"
                       + socket.inet_aton(addr))
            head = q[:2] + flags.to_bytes(2, "big") + b"\x00\x01" \
                + (1 if ans else 0).to_bytes(2, "big") + b"\x00\x00\x00\x00"
            s.sendto(head + q[12:qend] + ans, peer)

    if cfg.get("dns"):
        threading.Thread(target=dns_server, args=tuple(cfg["dns"]), daemon=True).start()

    # --- HTTPS (h11) and raw TCP ----------------------------------------------------------
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    sni: dict[int, str | None] = {}

    def on_sni(sslobj, name, _ctx) -> None:
        sni[id(sslobj)] = name

    ctx.sni_callback = on_sni

    async def https(reader, writer, ip: str, port: int = 443) -> None:
        obj = writer.get_extra_info("ssl_object")
        record(kind="conn", dst=f"{ip}:{port}", sni=sni.pop(id(obj), None))
        reader = _Tap(reader)
        conn = h11.Connection(h11.SERVER)

        async def event():
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await reader.read(1 << 16))
                    continue
                return ev

        def send(*evs) -> None:
            for ev in evs:
                writer.write(conn.send(ev))

        try:
            while True:
                ev = await event()
                if not isinstance(ev, h11.Request):
                    return
                target = ev.target.decode()
                digest, kept, size = hashlib.sha256(), bytearray(), 0
                while isinstance(b := await event(), h11.Data):
                    digest.update(b.data)
                    size += len(b.data)
                    if len(kept) < 65536:
                        kept += b.data[:65536]
                headers = {k.decode(): v.decode("latin-1") for k, v in ev.headers}
                record(kind="req", server=f"{ip}:{port}", method=ev.method.decode(),
                       target=target, headers=headers, body=kept.decode("latin-1"),
                       sha256=digest.hexdigest(), length=size)
                if target == "/ws":
                    send(h11.InformationalResponse(status_code=101, headers=[
                        ("upgrade", "echo"), ("connection", "upgrade")]))
                    writer.write(b"hello from upstream\n")
                    data = conn.trailing_data[0]
                    while True:
                        if data:
                            writer.write(data.upper())
                            await writer.drain()
                        data = await reader.read(1 << 16)
                        if not data:
                            return
                if target.startswith("/echo"):
                    await echo(writer, conn, ev, bytes(kept), target, headers)
                elif target == "/sse":
                    send(h11.Response(status_code=200, headers=[
                        ("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                        ("transfer-encoding", "chunked")]))
                    for i in range(4):
                        if i:
                            await asyncio.sleep(1.0)
                        send(h11.Data(data=b"data: event %d %.3f\n\n" % (i, time.time())))
                        await writer.drain()
                    send(h11.EndOfMessage())
                elif target.startswith("/big/"):
                    mb = int(target.rsplit("/", 1)[1])
                    send(h11.Response(status_code=200, headers=[
                        ("content-length", str(mb * BLOCK)),
                        ("content-type", "application/octet-stream")]))
                    for i in range(mb):
                        send(h11.Data(data=block(i)))
                        await writer.drain()
                    send(h11.EndOfMessage())
                else:
                    if target == "/upload":
                        out = f"{digest.hexdigest()} {size}\n".encode()
                    else:
                        # the path only: a query (secrets) is never echoed
                        out = f"hello from {ip} {target.split('?')[0]}\n".encode()
                    send(h11.Response(status_code=200, headers=[
                        ("content-length", str(len(out))), ("content-type", "text/plain")]),
                         h11.Data(data=out), h11.EndOfMessage())
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, ssl.SSLError):
            pass
        finally:
            record(kind="raw", dst=f"{ip}:{port}", data=reader.kept.decode("latin-1"))
            writer.close()

    async def echo(writer, conn, ev, body: bytes, target: str, headers: dict) -> None:
        doc = json.dumps({"target": ev.target.decode(), "headers": headers,
                          "body": body.decode("latin-1")}).encode()
        head = [("content-type", "application/json"),
                ("x-echo-auth", headers.get("authorization", "-"))]
        if target.startswith("/echo-chunked"):
            writer.write(conn.send(h11.Response(status_code=200, headers=[
                *head, ("transfer-encoding", "chunked")])))
            for i in range(0, len(doc), 7):
                writer.write(conn.send(h11.Data(data=doc[i:i + 7])))
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            return
        if target.startswith("/echo-gzip"):  # whatever Accept-Encoding said
            doc = gzip.compress(doc)
            head.append(("content-encoding", "gzip"))
        writer.write(conn.send(h11.Response(status_code=200, headers=[
            *head, ("content-length", str(len(doc)))])))
        writer.write(conn.send(h11.Data(data=doc)))
        writer.write(conn.send(h11.EndOfMessage()))

    async def raw(reader, writer, dst: str) -> None:
        record(kind="conn", dst=dst)
        writer.write(b"raw hello\n")
        await writer.drain()
        writer.close()

    async def serve() -> None:
        servers = []
        for ip in cfg["https"]:
            for port in cfg.get("https_ports", [443]):
                servers.append(await asyncio.start_server(
                    lambda r, w, ip=ip, port=port: https(r, w, ip, port), ip, port, ssl=ctx))
        for ip, port in cfg["raw"]:
            servers.append(await asyncio.start_server(
                lambda r, w, d=f"{ip}:{port}": raw(r, w, d), ip, port))
        open(cfg["ready"], "w").close()
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
