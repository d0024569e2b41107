"""The asyncio shell of the proxy: the only code here that reads or writes sockets or dials
upstream. Policy and secret decisions come from `Policy` and the sans-I/O helpers in `_http`.

Fail closed: an exception while deciding (policy, secret rules) answers 502/403, emits an
event and closes the connection; no byte the decision was about is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING, Literal

import h11

if TYPE_CHECKING:  # cryptography costs ~40 ms to import; open mode never needs it
    from ..ca import CertificateAuthority
from ..types import EventSink, NetEvent
from ._http import (
    MAX_BUFFERED_BODY,
    SecretRules,
    block_message,
    is_tls_client_hello,
    normalize_host,
    rewrite_head,
    scanned_content_type,
    simple_response,
    valid_hostname,
)

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024  # one read from a socket, one chunk relayed
CONNECT_TIMEOUT = 10.0  # per upstream address tried
HANDSHAKE_TIMEOUT = 10.0  # guest-side TLS handshake, and the wait for its first bytes
IDLE_TIMEOUT = 600.0  # no byte read in either direction for this long → both sides closed
PEEK_TIMEOUT = 0.3  # non-80/443 ports: wait this long for a ClientHello before relaying raw
# (server-speaks-first protocols such as SSH or SMTP send nothing until the server does)
BLOCKED_REQUEST_WAIT = 5.0  # after a blocked TLS handshake, wait this long for a request
MAX_INCOMPLETE_EVENT = 16 * 1024  # h11's default: largest request/response head we accept
UPSTREAM_CA_ENV = "MATCHLOCK_UPSTREAM_CA"


class _Blocked(Exception):
    """Refuse the request: status for the guest, event kind, host and one-line reason."""

    def __init__(self, status: int, kind: str, host: str, reason: str, **fields) -> None:
        super().__init__(reason)
        self.status, self.kind, self.host, self.reason, self.fields = (
            status, kind, host, reason, fields)


class _UpstreamError(Exception):
    pass


# ------------------------------------------------------------------------------ streams

class _Idle:
    """One idle timer per guest connection: any read on any of its streams counts as
    activity; after IDLE_TIMEOUT without one, every stream is aborted (their reads then end)."""

    __slots__ = ("_loop", "_timeout", "_handle", "last", "streams")

    def __init__(self, timeout: float = IDLE_TIMEOUT) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self.last = self._loop.time()
        self.streams: list[_Stream] = []
        self._handle = self._loop.call_at(self.last + timeout, self._check)

    def _check(self) -> None:
        due = self.last + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        for s in self.streams:
            s.abort()

    def cancel(self) -> None:
        self._handle.cancel()


class _Stream:
    """A byte stream over an asyncio reader/writer pair; `pending` are bytes already read
    (a peek) that the next read returns first."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 idle: _Idle, pending: bytes = b"") -> None:
        self.reader, self.writer, self._idle, self._pending = reader, writer, idle, pending
        self._out: list = []
        idle.streams.append(self)

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        data = await self.reader.read(READ_SIZE)
        self._idle.last = self._idle._loop.time()
        return data

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending

    # Writes are corked: buffered until flush()/drain(), so a response head and a small body
    # leave in one segment (one TLS record on the guest side) instead of two.
    def write(self, data) -> None:
        if data:
            self._out.append(data)

    def writelines(self, parts) -> None:
        self._out.extend(parts)

    def flush(self) -> None:
        out = self._out
        if out:
            self.writer.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()

    def write_eof(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
            if self.writer.can_write_eof():
                self.writer.write_eof()

    def is_stale(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        with contextlib.suppress(Exception):
            self.writer.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


class _TlsServerStream(_Stream):
    """Guest-side TLS over a `_Stream` with `ssl.SSLObject` + memory BIOs, so bytes we peeked
    at (the ClientHello) are fed to TLS as well; asyncio's start_tls cannot take them."""

    def __init__(self, raw: _Stream, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._tls_out, server_side=True)
        self._pending = b""
        self._plain: list = []
        self._eof = False

    def _flush(self) -> None:
        """Encrypt corked plaintext and push all TLS output to the socket."""
        if self._plain:
            self.obj.write(b"".join(self._plain))
            self._plain.clear()
        if self._tls_out.pending:
            self.raw.write(self._tls_out.read())
        self.raw.flush()

    flush = _flush

    async def _fill(self) -> bool:
        self._flush()
        data = await self.raw.read()
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if not await self._fill():
                    raise ConnectionResetError("guest closed during the TLS handshake") from None
        self._flush()
        await self.raw.drain()

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._eof:
            return b""
        obj = self.obj
        while True:
            try:
                data = obj.read(READ_SIZE)
                break
            except ssl.SSLWantReadError:
                if not await self._fill():
                    self._eof = True
                    return b""  # EOF without close_notify: treated as EOF
            except ssl.SSLZeroReturnError:
                self._eof = True
                return b""
        # drain what the last network read already decrypted (a 64 KiB read holds ~4 records)
        parts = [data]
        size = len(data)
        while size < READ_SIZE and self._in.pending:
            try:
                more = obj.read(READ_SIZE - size)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            parts.append(more)
            size += len(more)
        if self._tls_out.pending:  # post-handshake messages (key update, tickets)
            self._flush()
        return data if len(parts) == 1 else b"".join(parts)

    def write(self, data) -> None:
        if data:
            self._plain.append(data)

    def writelines(self, parts) -> None:
        self._plain.extend(parts)

    async def drain(self) -> None:
        self._flush()
        await self.raw.drain()

    def write_eof(self) -> None:
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._flush()
            self.obj.unwrap()  # close_notify; raises wanting the peer's, which we don't wait for
        self._flush()
        self.raw.write_eof()

    def is_stale(self) -> bool:
        return self._eof or self.raw.is_stale()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._flush()
            self.obj.unwrap()
        with contextlib.suppress(Exception):
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()


async def _pipe(a: _Stream, b: _Stream) -> None:
    """Relay bytes both ways until both directions ended; an end in one direction is passed
    on as a half-close where the transport can (plain TCP), an error aborts both."""

    async def pump(src: _Stream, dst: _Stream) -> None:
        try:
            while True:
                data = await src.read()
                if not data:
                    break
                dst.write(data)
                await dst.drain()
            dst.write_eof()
        except (OSError, ssl.SSLError, RuntimeError):
            a.abort()
            b.abort()

    await asyncio.gather(pump(a, b), pump(b, a))


# -------------------------------------------------------------------------------- relay

class TcpRelay:
    """Open mode: relay any TCP connection whose destination address passes
    `policy.ip_allowed`. Also the one relay implementation the intercepting proxy uses for
    passthrough ports and upgraded (WebSocket) connections."""

    def __init__(self, policy, emit: EventSink, *, connect_timeout: float = CONNECT_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.policy = policy
        self.emit = emit
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    def _event(self, kind: str, host: str = "", detail: str = "", **fields) -> None:
        try:
            self.emit(NetEvent(kind=kind, host=host, detail=detail, fields=fields))
        except Exception:
            log.exception("network event sink failed")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     dst_ip: str, dst_port: int) -> None:
        idle = _Idle(self.idle_timeout)
        guest = _Stream(reader, writer, idle)
        try:
            try:
                allowed = self.policy.ip_allowed(dst_ip, dst_port)
                reason = "" if allowed else self.policy.block_reason_ip(dst_ip, dst_port)
            except Exception as e:  # fail closed
                allowed, reason = False, f"policy error: {type(e).__name__}"
            if not allowed:
                self._event("blocked", f"{dst_ip}:{dst_port}", reason, ip=dst_ip, port=dst_port)
                return
            await self.relay_to(guest, dst_ip, dst_port, idle)
        except Exception as e:
            self._event("error", f"{dst_ip}:{dst_port}", f"relay failed: {type(e).__name__}")
        finally:
            idle.cancel()
            guest.close()

    async def dial(self, ip: str, port: int, idle: _Idle) -> _Stream:
        async with asyncio.timeout(self.connect_timeout):
            r, w = await asyncio.open_connection(ip, port, limit=READ_SIZE)
        _nodelay(w)
        return _Stream(r, w, idle)

    async def relay_to(self, guest: _Stream, ip: str, port: int, idle: _Idle,
                       host: str = "") -> None:
        """Dial ip:port (the caller has checked policy) and relay until both sides end."""
        try:
            upstream = await self.dial(ip, port, idle)
        except (OSError, TimeoutError) as e:
            self._event("error", host or f"{ip}:{port}",
                        f"could not connect to {ip}:{port}: {type(e).__name__}")
            return
        try:
            await _pipe(guest, upstream)
        finally:
            upstream.close()

    async def pipe(self, a: _Stream, b: _Stream) -> None:
        await _pipe(a, b)


def _nodelay(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ------------------------------------------------------------------------------- proxy

class _Upstream:
    __slots__ = ("host", "port", "stream", "conn")

    def __init__(self, host: str, port: int, stream: _Stream) -> None:
        self.host, self.port, self.stream = host, port, stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_INCOMPLETE_EVENT)


class InterceptProxy:
    """ConnectionHandler for intercept mode (HTTP on 80, TLS anywhere, passthrough by name),
    or, with mode="open", a plain `TcpRelay`."""

    def __init__(self, policy, ca: CertificateAuthority, emit: EventSink,
                 upstream_ca_file: str | None = None,
                 mode: Literal["open", "intercept"] = "intercept") -> None:
        self.policy = policy
        self.ca = ca
        self.emit = emit
        self.mode = mode
        self.relay = TcpRelay(policy, emit)
        self._guest_ctx = ca.sni_context(self._select_leaf)
        ctx = ssl.create_default_context()
        for extra in (upstream_ca_file, os.environ.get(UPSTREAM_CA_ENV)):
            if extra:
                ctx.load_verify_locations(cafile=extra)
        ctx.set_alpn_protocols(["http/1.1"])
        self._upstream_ctx = ctx

    # Ports whose non-TLS traffic is parsed as HTTP (tests point this at their own port).
    http_ports: frozenset[int] = frozenset({80})

    _event = TcpRelay._event

    # -- TLS name selection (runs inside the handshake) ------------------------------------

    def _select_leaf(self, sslobj, server_name: str | None) -> ssl.SSLContext | None:
        state: dict = sslobj.matchlock
        if server_name is not None:
            name = normalize_host(server_name)
            if not valid_hostname(name):
                return None
            state["sni"] = name
            return self.ca.leaf_context(name)
        host = self.policy.host_for_ip(state["dst_ip"])
        state["sni"] = None
        return self.ca.leaf_context(host or state["dst_ip"])

    # -- entry ------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     dst_ip: str, dst_port: int) -> None:
        if self.mode == "open":
            await self.relay.handle(reader, writer, dst_ip, dst_port)
            return
        idle = _Idle()
        raw = _Stream(reader, writer, idle)
        guest: _Stream = raw
        _nodelay(writer)
        try:
            first = b""
            try:
                http = dst_port in self.http_ports
                wait = HANDSHAKE_TIMEOUT if http or dst_port == 443 else PEEK_TIMEOUT
                async with asyncio.timeout(wait):
                    first = await raw.read()
            except TimeoutError:
                pass
            raw.unread(first)
            if is_tls_client_hello(first):
                guest = await self._tls(raw, dst_ip, dst_port, idle)
            elif http:
                await _Session(self, guest, dst_ip, dst_port, None, idle).run()
            elif dst_port == 443:
                if first:
                    self._event("blocked", dst_ip, "port 443 without TLS", ip=dst_ip)
            else:
                await self._passthrough(raw, dst_ip, dst_port, idle)
        except Exception as e:  # never raise out of a handler
            self._event("error", dst_ip, f"proxy error: {type(e).__name__}: {e}"[:300],
                        ip=dst_ip, port=dst_port)
            log.debug("proxy connection failed", exc_info=True)
        finally:
            idle.cancel()
            guest.close()
            for s in idle.streams:
                s.close()

    async def _passthrough(self, raw: _Stream, dst_ip: str, dst_port: int, idle: _Idle) -> None:
        try:
            host = self.policy.host_for_ip(dst_ip)
            ok = host is not None and self.policy.host_allowed(host) and \
                self.policy.ip_allowed(dst_ip, dst_port, host)
            if not ok:
                reason = (self.policy.block_reason_host(host) if host is not None
                          and not self.policy.host_allowed(host)
                          else self.policy.block_reason_ip(dst_ip, dst_port, host))
        except Exception as e:
            ok, host, reason = False, None, f"policy error: {type(e).__name__}"
        if not ok:
            self._event("blocked", host or f"{dst_ip}:{dst_port}", reason,
                        ip=dst_ip, port=dst_port)
            return
        await self.relay.relay_to(raw, dst_ip, dst_port, idle, host=host)

    async def _tls(self, raw: _Stream, dst_ip: str, dst_port: int, idle: _Idle) -> _Stream:
        tls = _TlsServerStream(raw, self._guest_ctx)
        state = {"dst_ip": dst_ip, "sni": None}
        tls.obj.matchlock = state
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await tls.handshake()
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self._event("tls_failed", state["sni"] or dst_ip,
                        f"guest TLS handshake failed: {type(e).__name__}: {e}"[:300],
                        ip=dst_ip, port=dst_port)
            return raw
        host = state["sni"]
        try:
            if host is None:
                host = self.policy.host_for_ip(dst_ip)
            if host is None:
                reason = (f"TLS without SNI to {dst_ip}:{dst_port}, an address our DNS did not "
                          "hand out; " + self.policy.block_reason_ip(dst_ip, dst_port))
            elif not self.policy.host_allowed(host):
                reason = self.policy.block_reason_host(host)
            else:
                reason = ""
        except Exception as e:
            reason = f"policy error: {type(e).__name__}"
        if reason:
            shown = host or dst_ip
            self._event("blocked", shown, reason, ip=dst_ip, port=dst_port, sni=state["sni"])
            await _refuse_http(tls, 403, block_message(shown, reason))
            return tls
        await _Session(self, tls, dst_ip, dst_port, host, idle).run()
        return tls

    # -- upstream ---------------------------------------------------------------------------

    async def _dial(self, host: str, port: int, tls: bool, idle: _Idle) -> _Stream:
        policy = self.policy
        ips = policy.ips_for_host(host)
        if not ips:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise _UpstreamError(f"cannot resolve {host}: {e}") from None
            ips = list(dict.fromkeys(info[4][0] for info in infos))
        allowed = [ip for ip in ips if policy.ip_allowed(ip, port, host)]
        if not allowed:
            raise _Blocked(403, "blocked", host, policy.block_reason_ip(ips[0], port, host),
                           ip=ips[0])
        last: Exception | None = None
        for ip in allowed:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    if tls:
                        r, w = await asyncio.open_connection(
                            ip, port, ssl=self._upstream_ctx, server_hostname=host,
                            ssl_handshake_timeout=HANDSHAKE_TIMEOUT, limit=READ_SIZE)
                    else:
                        r, w = await asyncio.open_connection(ip, port, limit=READ_SIZE)
                _nodelay(w)
                return _Stream(r, w, idle)
            except ssl.SSLCertVerificationError as e:
                raise _UpstreamError(
                    f"upstream {host} ({ip}:{port}) failed TLS verification: "
                    f"{e.verify_message}") from None
            except (OSError, TimeoutError, ssl.SSLError) as e:
                last = e
        raise _UpstreamError(f"could not connect to {host} port {port}: "
                             f"{type(last).__name__}: {last}")


def _as_http11(ev):
    """The guest always talks HTTP/1.1 to us (h11 only sends 1.1): an HTTP/1.0 upstream's
    response is passed on as 1.1; h11 re-frames its body (chunked, or close-delimited for an
    HTTP/1.0 guest) when the upstream gave no Content-Length."""
    if ev.http_version == b"1.1":
        return ev
    return type(ev)(status_code=ev.status_code, headers=ev.headers, reason=ev.reason)


async def _refuse_http(guest: _Stream, status: int, text: str) -> None:
    """After a blocked TLS handshake: if the guest then speaks HTTP, answer `status`."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_INCOMPLETE_EVENT)
    try:
        async with asyncio.timeout(BLOCKED_REQUEST_WAIT):
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await guest.read()
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(ev, h11.Request):
                    guest.write(simple_response(status, text))
                    await guest.drain()
                return
    except (h11.RemoteProtocolError, OSError, TimeoutError, ssl.SSLError):
        return


class _Session:
    """One guest connection speaking HTTP/1.1 (plain, or inside TLS for `sni_host`)."""

    def __init__(self, proxy: InterceptProxy, guest: _Stream, dst_ip: str, dst_port: int,
                 sni_host: str | None, idle: _Idle) -> None:
        self.proxy = proxy
        self.policy = proxy.policy
        self.guest = guest
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.sni_host = sni_host
        self.tls = sni_host is not None
        self.idle = idle
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_INCOMPLETE_EVENT)
        self.upstream: _Upstream | None = None
        self._rules: dict[str, SecretRules] = {}

    async def _guest_event(self):
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await self.guest.read())
                continue
            return ev

    async def _upstream_event(self, up: _Upstream):
        conn = up.conn
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await up.stream.read())
                continue
            return ev

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.stream.close()
            self.upstream = None

    async def _refuse(self, status: int, text: str) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.guest.write(simple_response(status, text))
            with contextlib.suppress(Exception):
                await self.guest.drain()

    async def run(self) -> None:
        try:
            while True:
                try:
                    ev = await self._guest_event()
                except h11.RemoteProtocolError as e:
                    status = e.error_status_hint
                    await self._refuse(status, f"matchlock: bad request: {e}")
                    return
                if not isinstance(ev, h11.Request):
                    return  # ConnectionClosed (or a protocol switch we did not agree to)
                if not await self._request(ev):
                    return
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                else:
                    return
        finally:
            self._close_upstream()

    def _secret_rules(self, host: str) -> SecretRules:
        rules = self._rules.get(host)
        if rules is None:
            rules = self._rules[host] = SecretRules.for_host(self.policy, host)
        return rules

    def _check(self, req: h11.Request) -> tuple[str, h11.Request, SecretRules, set[str]]:
        """Policy and secret decisions on the request head. Raises _Blocked."""
        policy = self.policy
        host_values = [v for k, v in req.headers if k == b"host"]
        if len(host_values) > 1:
            raise _Blocked(400, "blocked", self.sni_host or self.dst_ip,
                           "more than one Host header")
        if host_values:
            host = normalize_host(host_values[0])
        else:  # HTTP/1.0 without Host
            host = self.sni_host or policy.host_for_ip(self.dst_ip) or self.dst_ip
        if self.tls and host != self.sni_host:
            raise _Blocked(421, "sni_host_mismatch", self.sni_host,
                           f"Host header {host!r} does not match the TLS server name "
                           f"{self.sni_host!r}", host_header=host)
        if not valid_hostname(host) or not policy.host_allowed(host):
            raise _Blocked(403, "blocked", host, policy.block_reason_host(host))
        rules = self._secret_rules(host)
        used: set[str] = set()
        if rules.active:
            leaked: list[str] = []
            target, headers = rewrite_head(req.target, req.headers.raw_items(), rules, used,
                                           leaked)
            if leaked:
                raise _Blocked(403, "secret_leak_blocked", host,
                               f"request carries the placeholder of secret {leaked[0]}, "
                               f"which is not bound to host {host}", secret=leaked[0])
        else:
            target, headers = req.target, req.headers.raw_items()
        if not host_values:
            headers = [(b"Host", host.encode()), *headers]
        req = h11.Request(method=req.method, target=target, headers=headers)
        return host, req, rules, used

    async def _request(self, req: h11.Request) -> bool:
        """Handle one request/response; False when the guest connection must close."""
        try:
            host, up_req, rules, used = self._check(req)
        except _Blocked as b:
            self.proxy._event(b.kind, b.host, b.reason, method=req.method.decode(), **b.fields)
            await self._refuse(b.status, block_message(b.host, b.reason))
            return False
        except Exception as e:  # fail closed
            self.proxy._event("error", self.sni_host or self.dst_ip,
                              f"policy error: {type(e).__name__}")
            log.debug("policy error", exc_info=True)
            await self._refuse(502, "matchlock: internal policy error; request not sent")
            return False

        # Body plan: scanned types are rewritten (bound secrets) and checked (foreign ones).
        headers = up_req.headers
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in headers) \
            and not any(k == b"content-length" and v.strip() == b"0" for k, v in headers)
        ctype = next((v for k, v in headers if k == b"content-type"), None)
        encoded = any(k == b"content-encoding" and v.strip().lower() != b"identity"
                      for k, v in headers)
        scan = has_body and rules.active and scanned_content_type(ctype) and not encoded
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        body: bytes | None = None
        try:
            if scan and rules.rewrites and not chunked:
                body, up_req = await self._buffer_body(host, up_req, rules, used)
        except _Blocked as b:
            self.proxy._event(b.kind, b.host, b.reason, **b.fields)
            await self._refuse(b.status, block_message(b.host, b.reason))
            return False
        for name in sorted(used):
            self.proxy._event("secret_injected", host, secret=name)

        try:
            up = await self._upstream_for(host)
        except _Blocked as b:
            self.proxy._event(b.kind, b.host, b.reason, **b.fields)
            await self._refuse(b.status, block_message(b.host, b.reason))
            return False
        except _UpstreamError as e:
            self.proxy._event("upstream_error", host, str(e))
            await self._refuse(502, f"matchlock: {e}")
            return False

        up.stream.write(up.conn.send(up_req))
        pump: asyncio.Task | None = None
        if body is not None:
            if body:
                up.stream.writelines(up.conn.send_with_data_passthrough(h11.Data(data=body)))
            up.stream.write(up.conn.send(h11.EndOfMessage()))
            await up.stream.drain()
        else:
            ev = self.conn.next_event()  # no body: EndOfMessage is already there
            if type(ev) is h11.EndOfMessage:
                up.stream.write(up.conn.send(h11.EndOfMessage()))
                await up.stream.drain()
            else:
                up.stream.flush()
                rewriter = rules.stream() if scan else None
                pump = asyncio.get_running_loop().create_task(
                    self._pump_body(up, ev, rewriter, host), name="matchlock-proxy-body")
        try:
            return await self._response(up, host, req, pump)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump

    async def _buffer_body(self, host: str, req: h11.Request, rules: SecretRules,
                           used: set[str]) -> tuple[bytes, h11.Request]:
        if self.conn.client_is_waiting_for_100_continue:
            self.guest.write(self.conn.send(h11.InformationalResponse(status_code=100)))
            await self.guest.drain()
        parts: list[bytes] = []
        size = 0
        while True:
            ev = await self._guest_event()
            if type(ev) is h11.Data:
                size += len(ev.data)
                if size > MAX_BUFFERED_BODY:
                    raise _Blocked(413, "blocked", host,
                                   f"request body over {MAX_BUFFERED_BODY >> 20} MiB with a "
                                   "secret to substitute; send it chunked")
                parts.append(ev.data)
            elif type(ev) is h11.EndOfMessage:
                break
            else:
                raise _Blocked(400, "blocked", host, "request body ended early")
        leaked: list[str] = []
        body = rules.rewrite(b"".join(parts), used, leaked)
        if leaked:
            raise _Blocked(403, "secret_leak_blocked", host,
                           f"request body carries the placeholder of secret {leaked[0]}, "
                           f"which is not bound to host {host}", secret=leaked[0])
        headers = [(k, v) for k, v in req.headers.raw_items()
                   if k.lower() not in (b"content-length", b"expect")]
        headers.append((b"Content-Length", str(len(body)).encode()))
        return body, h11.Request(method=req.method, target=req.target, headers=headers)

    async def _pump_body(self, up: _Upstream, ev, rewriter, host: str) -> None:
        """Stream the request body guest → upstream (runs beside the response reader)."""
        stream, conn = up.stream, up.conn
        if ev is h11.NEED_DATA:
            ev = await self._guest_event()
        while True:
            if type(ev) is h11.Data:
                data = ev.data
                if rewriter is not None:
                    data = rewriter.feed(data)
                    if rewriter.leaked:
                        raise _Blocked(403, "secret_leak_blocked", host,
                                       "request body carries the placeholder of secret "
                                       f"{rewriter.leaked[0]}, which is not bound to host "
                                       f"{host}", secret=rewriter.leaked[0])
                if data:
                    stream.writelines(conn.send_with_data_passthrough(h11.Data(data=data)))
                    await stream.drain()
            elif type(ev) is h11.EndOfMessage:
                if rewriter is not None:
                    tail = rewriter.finish()
                    if tail:
                        stream.writelines(conn.send_with_data_passthrough(h11.Data(data=tail)))
                    for name in sorted(rewriter.used):
                        self.proxy._event("secret_injected", host, secret=name)
                stream.write(conn.send(h11.EndOfMessage()))
                await stream.drain()
                return
            else:
                raise _UpstreamError("request body ended early")
            ev = await self._guest_event()

    @staticmethod
    def _pump_result(pump: asyncio.Task) -> None:
        exc = pump.exception()
        if exc is not None:
            raise exc

    async def _upstream_for(self, host: str) -> _Upstream:
        up = self.upstream
        if up is not None:
            if (up.host == host and up.conn.our_state is h11.IDLE
                    and up.conn.their_state is h11.IDLE and not up.stream.is_stale()):
                return up
            self._close_upstream()
        stream = await self.proxy._dial(host, self.dst_port, self.tls, self.idle)
        self.upstream = up = _Upstream(host, self.dst_port, stream)
        return up

    async def _response(self, up: _Upstream, host: str, req: h11.Request,
                        pump: asyncio.Task | None) -> bool:
        guest, gconn = self.guest, self.conn
        next_up: asyncio.Future | None = None
        try:
            while True:
                if pump is None or pump.done():
                    if pump is not None:
                        self._pump_result(pump)
                        pump = None
                    ev = await self._upstream_event(up)
                else:
                    # the next upstream event, but fail fast if the body pump fails
                    next_up = asyncio.ensure_future(self._upstream_event(up))
                    while not next_up.done() and not pump.done():
                        await asyncio.wait({next_up, pump}, return_when=asyncio.FIRST_COMPLETED)
                    if pump.done():
                        self._pump_result(pump)
                        pump = None
                    ev = await next_up
                    next_up = None
                t = type(ev)
                if t is h11.Response:
                    self.proxy._event("allowed", host, method=req.method.decode(),
                                      target=req.target[:200].decode("latin-1"),
                                      status=ev.status_code)
                    guest.write(gconn.send(_as_http11(ev)))
                    break
                if t is h11.InformationalResponse:
                    if ev.status_code == 101:
                        await self._upgrade(up, host, ev)
                        return False
                    guest.write(gconn.send(_as_http11(ev)))
                    await guest.drain()
                else:  # ConnectionClosed before a response
                    raise _UpstreamError(f"{host} closed the connection without a response")
            # body: flushed to the guest as it arrives (SSE, chunked)
            while True:
                ev = await self._upstream_event(up)
                t = type(ev)
                if t is h11.Data:
                    guest.writelines(gconn.send_with_data_passthrough(ev))
                    await guest.drain()
                elif t is h11.EndOfMessage:
                    guest.write(gconn.send(ev))
                    await guest.drain()
                    break
                else:
                    raise _UpstreamError(f"{host} closed the connection mid-response")
        except _Blocked as b:
            self.proxy._event(b.kind, b.host, b.reason, **b.fields)
            self._close_upstream()
            await self._refuse(b.status, block_message(b.host, b.reason))
            return False
        except (_UpstreamError, h11.ProtocolError, OSError, ssl.SSLError) as e:
            self.proxy._event("upstream_error", host, f"{type(e).__name__}: {e}"[:300])
            self._close_upstream()
            await self._refuse(502, f"matchlock: upstream {host} failed: {type(e).__name__}")
            return False
        finally:
            if next_up is not None and not next_up.done():
                next_up.cancel()
        if pump is not None:
            try:
                await pump
            except Exception as e:
                self.proxy._event("upstream_error", host, f"request body: {type(e).__name__}")
                self._close_upstream()
                return False
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
        else:
            self._close_upstream()
        return True

    async def _upgrade(self, up: _Upstream, host: str, resp: h11.InformationalResponse) -> None:
        """101 Switching Protocols: pass it on, then relay raw bytes both ways."""
        gconn = self.conn
        if gconn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            raise _UpstreamError(f"{host} switched protocols without an upgrade request")
        self.proxy._event("upgraded", host, detail="101 Switching Protocols")
        self.guest.write(gconn.send(_as_http11(resp)))
        await self.guest.drain()
        self.guest.unread(gconn.trailing_data[0])
        up.stream.unread(up.conn.trailing_data[0])
        self.upstream = None  # the relay owns it now
        try:
            await _pipe(self.guest, up.stream)
        finally:
            up.stream.close()
