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
from itertools import chain
from typing import TYPE_CHECKING, Literal

import h11

if TYPE_CHECKING:  # cryptography costs ~40 ms to import; open mode never needs it
    from ..ca import CertificateAuthority
from ..types import EventSink, HookRule, NetEvent
from ._budget import BufferBudget
from ._callbacks import ask
from ._framing import MAX_HEAD, FramingError, check_head, head_end, split_authority, split_target
from ._http import (
    MAX_BUFFERED_BODY,
    SecretRules,
    block_message,
    normalize_host,
    rewrite_head,
    rewritten_content_type,
    simple_response,
    sniff_protocol,
    valid_hostname,
)
from ._rules import (
    CallbackFailed,
    RequestView,
    ResponsePlan,
    RuleSet,
    SseRewriter,
    apply_static_after,
    apply_static_before,
    apply_verdict_after,
    apply_verdict_before,
    callback_request,
    callback_timeout,
    replace_all,
)
from ._scrub import DECODABLE, InflateError, Inflater, Scrubber, content_codings

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024  # one read from a socket, one chunk relayed
CONNECT_TIMEOUT = 10.0  # per upstream address tried
HANDSHAKE_TIMEOUT = 10.0  # guest-side TLS handshake, and the wait for its first bytes
IDLE_TIMEOUT = 600.0  # no byte read in either direction for this long → both sides closed
# Ports other than 80/443, towards an address raw TCP may reach: while the guest is silent
# this long, dial the upstream so a server-speaks-first protocol (SMTP, FTP, MySQL) can speak.
# It only decides when the dial happens; what is done is decided by who sends the first byte.
PREDIAL_DELAY = 0.05
BLOCKED_REQUEST_WAIT = 5.0  # after a blocked TLS handshake, wait this long for a request
MAX_INCOMPLETE_EVENT = MAX_HEAD  # h11's own limit on an incomplete head (ours: check_head)
SMALL_RESPONSE = 64 * 1024  # a scrubbed Content-Length body up to this is held whole
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


async def _pipe(a: _Stream, b: _Stream, b_to_a=None) -> None:
    """Relay bytes both ways until both directions ended; an end in one direction is passed
    on as a half-close where the transport can (plain TCP), an error aborts both. `b_to_a`
    (feed/finish, e.g. a `ScrubStream`) filters what b sends to a."""

    async def pump(src: _Stream, dst: _Stream, f) -> None:
        try:
            while True:
                data = await src.read()
                if not data:
                    break
                if f is not None:
                    data = f.feed(data)
                if data:
                    dst.write(data)
                    await dst.drain()
            if f is not None:
                dst.write(f.finish())
            dst.write_eof()
        except (OSError, ssl.SSLError, RuntimeError):
            a.abort()
            b.abort()

    await asyncio.gather(pump(a, b, None), pump(b, a, b_to_a))


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
                 mode: Literal["open", "intercept"] = "intercept",
                 budget: BufferBudget | None = None, rules: RuleSet | None = None) -> None:
        self.policy = policy
        # interception rules (RPC `create`): None or inactive = no per-request rule work
        self.rules = rules if rules is not None and rules.active else None
        self.ca = ca
        self.emit = emit
        self.mode = mode
        self.relay = TcpRelay(policy, emit)
        # One proxy per VM: its budget is shared by all of the VM's connections.
        self.budget = budget if budget is not None else BufferBudget()
        self.scrubber = Scrubber(policy.all_secrets())
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
        up: _Stream | None = None
        _nodelay(writer)
        try:
            http = dst_port in self.http_ports
            other = not http and dst_port != 443
            if other:
                ok, host, reason = self._passthrough_verdict(dst_ip, dst_port)
            else:
                ok, host, reason = False, None, ""
            # http ports and allowed raw destinations wait for the guest as long as the idle
            # timer lets them; elsewhere a silent guest is dropped after the handshake timeout.
            verdict, first, up = await self._sniff(
                raw, dst_ip, dst_port, idle, predial=ok,
                deadline=None if http or ok else HANDSHAKE_TIMEOUT)
            raw.unread(first)
            if verdict == "tls":
                if up is not None:
                    up.close()
                    up = None
                guest = await self._tls(raw, dst_ip, dst_port, idle)
            elif verdict == "closed":
                pass
            elif http:
                await _Session(self, guest, dst_ip, dst_port, None, idle).run()
            elif dst_port == 443:
                if verdict == "plain":
                    self._event("blocked", dst_ip, "port 443 without TLS", ip=dst_ip)
            elif not ok:
                self._event("blocked", host or f"{dst_ip}:{dst_port}", reason,
                            ip=dst_ip, port=dst_port)
            elif up is not None:  # the guest or the server spoke first, not TLS: raw relay
                await _pipe(raw, up)
            elif verdict == "plain":
                await self.relay.relay_to(raw, dst_ip, dst_port, idle, host=host or "")
        except Exception as e:  # never raise out of a handler
            self._event("error", dst_ip, f"proxy error: {type(e).__name__}: {e}"[:300],
                        ip=dst_ip, port=dst_port)
            log.debug("proxy connection failed", exc_info=True)
        finally:
            idle.cancel()
            if up is not None:
                up.close()
            guest.close()
            for s in idle.streams:
                s.close()

    async def _sniff(self, raw: _Stream, dst_ip: str, dst_port: int, idle: _Idle, *,
                     predial: bool, deadline: float | None
                     ) -> tuple[str, bytes, _Stream | None]:
        """Read until the protocol is decided, by bytes and never by a timing window:
        the guest's first bytes are TLS (a whole 5-byte record header) or not; or, where
        `predial`, the upstream (dialled once the guest was silent for PREDIAL_DELAY) spoke
        before the guest sent a byte: a server-speaks-first protocol, relayed raw (a TLS
        server never speaks first). Returns (verdict, the guest's bytes, the dialled
        upstream or None); verdict: "tls", "plain", "server", "closed" (the guest ended
        before deciding) or "timeout" (silent past `deadline` seconds)."""
        loop = asyncio.get_running_loop()
        buf = b""
        up: _Stream | None = None
        cread: asyncio.Future | None = None
        uread: asyncio.Future | None = None
        dial: asyncio.Future | None = None
        until = None if deadline is None else loop.time() + deadline
        dial_at = loop.time() + PREDIAL_DELAY if predial else None
        try:
            while True:
                verdict = sniff_protocol(buf)
                if verdict is not None:
                    return verdict, buf, up
                if cread is None:
                    cread = asyncio.ensure_future(raw.read())
                waits = {cread}
                for t in (uread, dial):
                    if t is not None:
                        waits.add(t)
                now = loop.time()
                timeout = None if until is None else max(0.0, until - now)
                if dial_at is not None:
                    timeout = max(0.0, dial_at - now) if timeout is None \
                        else min(timeout, max(0.0, dial_at - now))
                done, _ = await asyncio.wait(waits, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if cread in done:
                    data = cread.result()
                    cread = None
                    if not data:
                        return "closed", buf, up
                    buf += data
                    continue
                if dial is not None and dial in done:
                    task, dial = dial, None
                    try:
                        up = task.result()
                    except (OSError, TimeoutError) as e:
                        self._event("error", f"{dst_ip}:{dst_port}",
                                    f"could not connect to {dst_ip}:{dst_port}: "
                                    f"{type(e).__name__}")
                        until = loop.time() + HANDSHAKE_TIMEOUT
                        continue
                    if not buf:
                        uread = asyncio.ensure_future(up.read())
                    continue
                if uread is not None and uread in done:
                    data = uread.result()
                    uread = None
                    if data:
                        up.unread(data)
                        if not buf:
                            return "server", b"", up
                    continue  # the guest spoke first: its bytes decide
                if until is not None and loop.time() >= until:
                    return "timeout", buf, up
                if dial_at is not None and loop.time() >= dial_at:
                    dial_at = None
                    dial = asyncio.ensure_future(self.relay.dial(dst_ip, dst_port, idle))
        finally:
            for t in (cread, uread, dial):
                if t is not None and not t.done():
                    t.cancel()
            if dial is not None:  # it may have connected while we decided: close that
                dial.add_done_callback(_close_dialled)

    def _passthrough_verdict(self, dst_ip: str, dst_port: int) -> tuple[bool, str | None, str]:
        """Raw TCP (not TLS, not HTTP) may go to an address our DNS gave for an allowed host."""
        try:
            host = self.policy.host_for_ip(dst_ip)
            ok = host is not None and self.policy.host_allowed(host) and \
                self.policy.ip_allowed(dst_ip, dst_port, host)
            reason = ""
            if not ok:
                reason = (self.policy.block_reason_host(host) if host is not None
                          and not self.policy.host_allowed(host)
                          else self.policy.block_reason_ip(dst_ip, dst_port, host))
        except Exception as e:
            ok, host, reason = False, None, f"policy error: {type(e).__name__}"
        return ok, host, reason

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


def _close_dialled(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


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


# Towards a host a secret is bound to, responses must come back in a form we can scrub:
# these asks are dropped (and Accept-Encoding: identity sent).
_ASKS = frozenset({b"accept-encoding", b"sec-websocket-extensions"})


class _Plan:
    """What `_Session._check` decided about one request."""

    __slots__ = ("host", "rules", "target", "headers", "used", "length", "chunked", "ctype",
                 "encoded", "view")

    def __init__(self) -> None:
        self.host = ""
        self.rules: SecretRules
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.used: set[str] = set()
        self.length: int | None = None
        self.chunked = False
        self.ctype: bytes | None = None
        self.encoded = False
        self.view: RequestView | None = None  # what interception rules saw (None: no rules)


class _Chain:
    """Body filters (feed/finish) applied one after another."""

    def __init__(self, *filters) -> None:
        self.fs = [f for f in filters if f is not None]

    def feed(self, data: bytes) -> bytes:
        for f in self.fs:
            data = f.feed(data)
        return data

    def finish(self) -> bytes:
        out = b""
        for f in self.fs:
            out = (f.feed(out) if out else b"") + f.finish()
        return out


class _Session:
    """One guest connection speaking HTTP/1.1 (plain, or inside TLS for `sni_host`)."""

    def __init__(self, proxy: InterceptProxy, guest: _Stream, dst_ip: str, dst_port: int,
                 sni_host: str | None, idle: _Idle) -> None:
        self.proxy = proxy
        self.policy = proxy.policy
        self.scrubber = proxy.scrubber
        self.budget = proxy.budget
        self.guest = guest
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.sni_host = sni_host
        self.tls = sni_host is not None
        self.idle = idle
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_INCOMPLETE_EVENT)
        self.upstream: _Upstream | None = None
        self._rules: dict[str, SecretRules] = {}
        self._held = 0  # bytes of the VM's budget the current request holds
        self._t0 = 0.0  # when the current request's head arrived (event duration_ms)

    async def _guest_event(self):
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await self.guest.read())
                continue
            return ev

    async def _next_request(self):
        """The guest's next event while a request head is awaited. The raw head bytes (the
        pipelined ones h11 already holds included) pass `check_head` before h11 parses them,
        so its size limit and framing rules hold however the bytes arrive."""
        conn = self.conn
        head = conn.trailing_data[0]
        checked = False
        while True:
            if not checked:
                end = head_end(head)
                if end is not None:
                    check_head(head[:end])
                    checked, head = True, b""
                elif len(head) > MAX_HEAD:
                    raise FramingError(431, f"request head over {MAX_HEAD >> 10} KiB")
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await self.guest.read()
                if not checked:
                    head += data
                conn.receive_data(data)
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

    async def _bad_request(self, status: int, reason: str, host: str = "") -> None:
        host = host or self.sni_host or self.dst_ip
        reason = f"bad request: {reason}"[:300]
        self.proxy._event("blocked", host, reason, status=status)
        await self._refuse(status, block_message(host, reason))

    async def run(self) -> None:
        try:
            while True:
                try:
                    ev = await self._next_request()
                except FramingError as e:
                    await self._bad_request(e.status, e.reason)
                    return
                except h11.RemoteProtocolError as e:
                    await self._bad_request(e.error_status_hint, str(e))
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

    def _check(self, req: h11.Request) -> _Plan:
        """Policy and secret decisions on the request head, one pass over its headers.
        Raises _Blocked or FramingError."""
        policy = self.policy
        authority, target = split_target(req.method, req.target, self.tls)
        plan = _Plan()
        host_values = []
        kept = []  # framing headers are always ours to write
        asks = False
        for h in req.headers.raw_items():
            k = h[0].lower()
            if k == b"content-length":
                plan.length = int(h[1])
                continue
            if k == b"transfer-encoding":
                plan.chunked = True
                continue
            kept.append(h)
            if k == b"host":
                host_values.append(h[1])
            elif k == b"content-type":
                plan.ctype = h[1]
            elif k == b"content-encoding":
                plan.encoded = plan.encoded or h[1].strip().lower() != b"identity"
            elif k in _ASKS:
                asks = True
        if len(host_values) > 1:
            raise _Blocked(400, "blocked", self.sni_host or self.dst_ip,
                           "more than one Host header")
        if host_values:
            host = normalize_host(host_values[0])
            if authority is not None:
                try:
                    named = split_authority(host_values[0], 443 if self.tls else 80)
                except FramingError:
                    named = None
                if named != authority:
                    raise _Blocked(400, "blocked", host,
                                   f"bad request: absolute-form target names "
                                   f"{authority[0][:100]}:{authority[1]}, not the Host header")
        elif authority is not None:
            host = authority[0]
        else:  # HTTP/1.0 without Host
            host = self.sni_host or policy.host_for_ip(self.dst_ip) or self.dst_ip
        if plan.chunked and req.http_version == b"1.0":
            raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if self.tls and host != self.sni_host:
            raise _Blocked(421, "sni_host_mismatch", self.sni_host,
                           f"Host header {host!r} does not match the TLS server name "
                           f"{self.sni_host!r}", host_header=host)
        if not valid_hostname(host) or not policy.host_allowed(host):
            raise _Blocked(403, "blocked", host, policy.block_reason_host(host))
        plan.host = host
        plan.rules = rules = self._secret_rules(host)
        # Towards a host a secret is bound to, no asks that would make the response
        # unscannable.
        if asks and rules.rewrites:
            kept = [h for h in kept if h[0].lower() not in _ASKS]
        if rules.active:
            leaked = rules.leaks(req.method)  # a placeholder is a valid method token too
            target, headers = rewrite_head(target, kept, rules, plan.used, leaked)
            if leaked:
                raise _Blocked(403, "secret_leak_blocked", host,
                               f"request carries the placeholder or value of secret "
                               f"{leaked[0]}, which is not bound to host {host}",
                               secret=leaked[0])
        else:
            headers = kept
        if not host_values:
            headers.insert(0, (b"Host", host.encode()))
        if rules.rewrites:
            headers.append((b"Accept-Encoding", b"identity"))
        plan.target, plan.headers = target, headers
        return plan

    async def _request(self, req: h11.Request) -> bool:
        """Handle one request/response; False when the guest connection must close."""
        self._t0 = asyncio.get_running_loop().time()
        try:
            plan = self._check(req)
            if self.proxy.rules is not None:
                view = self._view(req, plan.host)
                if self.proxy.rules.before:
                    await self._before_rules(view)
                    if view.changed:
                        # the edited request passes every check again: allow-list,
                        # placeholders (replaced or a leak), framing
                        req = self._edited(req, view)
                        plan = self._check(req)
                plan.view = view
        except FramingError as e:
            await self._bad_request(e.status, e.reason)
            return False
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

        # Body plan. Every body is scanned for foreign placeholders and values; bodies of the
        # rewritten types also get bound placeholders replaced (held whole when they have a
        # Content-Length, as its value changes; streamed chunked past the limits).
        host, rules, length, chunked = plan.host, plan.rules, plan.length, plan.chunked
        has_body = chunked or bool(length)
        scan = has_body and rules.active
        rewrite = scan and rules.rewrites and rewritten_content_type(plan.ctype) \
            and not plan.encoded
        buffered = rewrite and not chunked
        if buffered:
            assert length is not None
            if length <= MAX_BUFFERED_BODY and self.budget.take(length):
                self._held = length
            else:
                buffered = False
                why = (f"over the {MAX_BUFFERED_BODY >> 20} MiB per-request limit"
                       if length > MAX_BUFFERED_BODY else
                       f"the VM's {self.budget.limit >> 20} MiB buffer budget is in use")
                self.proxy._event("buffer_limit", host,
                                  f"request body streamed chunked instead of held: {why}",
                                  length=length)
        # Upstream framing: exactly one framing header, written by us.
        out = plan.headers
        if chunked or (rewrite and not buffered):
            out.append((b"Transfer-Encoding", b"chunked"))
        elif length is not None and not buffered:
            out.append((b"Content-Length", str(length).encode()))

        try:
            return await self._send(req, plan, out, scan, rewrite, buffered)
        finally:
            if self._held:  # a held body that never went out
                self.budget.give(self._held)
                self._held = 0

    async def _send(self, req: h11.Request, plan: _Plan, out: list[tuple[bytes, bytes]],
                    scan: bool, rewrite: bool, buffered: bool) -> bool:
        host, rules, used = plan.host, plan.rules, plan.used
        parts: list[bytes] = []
        try:
            if buffered:
                parts, total = await self._buffer_body(host, rules, used)
                out = [(k, v) for k, v in out if k.lower() != b"expect"]
                out.append((b"Content-Length", str(total).encode()))
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

        up_req = h11.Request(method=req.method, target=plan.target, headers=out)
        up.stream.write(up.conn.send(up_req))
        pump: asyncio.Task | None = None
        if buffered:
            conn, stream = up.conn, up.stream
            parts.reverse()
            while parts:  # piece by piece, so the body is not copied whole once more
                stream.writelines(conn.send_with_data_passthrough(h11.Data(data=parts.pop())))
                await stream.drain()
            stream.write(conn.send(h11.EndOfMessage()))
            await stream.drain()
            self.budget.give(self._held)  # the held body went out
            self._held = 0
        else:
            ev = self.conn.next_event()  # no body: EndOfMessage is already there
            if type(ev) is h11.EndOfMessage:
                up.stream.write(up.conn.send(h11.EndOfMessage()))
                await up.stream.drain()
            else:
                up.stream.flush()
                rewriter = rules.stream(rewrite=rewrite) if scan else None
                pump = asyncio.get_running_loop().create_task(
                    self._pump_body(up, ev, rewriter, host), name="matchlock-proxy-body")
        try:
            return await self._response(up, host, req, pump, rules, plan.view)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump

    async def _buffer_body(self, host: str, rules: SecretRules,
                           used: set[str]) -> tuple[list[bytes], int]:
        """The whole request body, rewritten, as pieces (their total length)."""
        if self.conn.client_is_waiting_for_100_continue:
            self.guest.write(self.conn.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
            await self.guest.drain()
        rewriter = rules.stream()
        parts: list[bytes] = []
        total = 0
        while True:
            ev = await self._guest_event()
            if type(ev) is h11.Data:
                data = rewriter.feed(ev.data)
            elif type(ev) is h11.EndOfMessage:
                data = rewriter.finish()
            else:
                raise _Blocked(400, "blocked", host, "request body ended early")
            if rewriter.leaked:
                raise _Blocked(403, "secret_leak_blocked", host,
                               f"request body carries the placeholder or value of secret "
                               f"{rewriter.leaked[0]}, which is not bound to host {host}",
                               secret=rewriter.leaked[0])
            if data:
                parts.append(data)
                total += len(data)
            if type(ev) is h11.EndOfMessage:
                break
        used |= rewriter.used
        return parts, total

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
                                       "request body carries the placeholder or value of "
                                       f"secret {rewriter.leaked[0]}, which is not bound to "
                                       f"host {host}", secret=rewriter.leaked[0])
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
                        pump: asyncio.Task | None, rules: SecretRules,
                        view: RequestView | None = None) -> bool:
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
                    shaped = None
                    if view is not None and self.proxy.rules is not None and \
                            self.proxy.rules.after:
                        # rules and callbacks see the head as the guest would: scrubbed
                        shaped = await self._after_rules(view, self._scrubbed(ev))
                        if shaped.headers_changed:
                            ev = h11.Response(status_code=ev.status_code, reason=ev.reason,
                                              headers=shaped.header_bytes(),
                                              http_version=ev.http_version)
                    self._allowed_event(host, req, ev)
                    if shaped is not None and shaped.shapes_body and req.method != b"HEAD" \
                            and ev.status_code not in (204, 304):
                        await self._forward_shaped(up, host, ev, shaped)
                    else:
                        await self._forward_response(up, host, req, ev, rules)
                    break
                if t is h11.InformationalResponse:
                    if ev.status_code == 101:
                        await self._upgrade(up, host, ev)
                        return False
                    guest.write(gconn.send(self._scrubbed(ev)))
                    await guest.drain()
                else:  # ConnectionClosed before a response
                    raise _UpstreamError(f"{host} closed the connection without a response")
        except _Blocked as b:
            self.proxy._event(b.kind, b.host, b.reason, **b.fields)
            self._close_upstream()
            await self._refuse(b.status, block_message(b.host, b.reason))
            return False
        except (_UpstreamError, InflateError, h11.ProtocolError, OSError, ssl.SSLError) as e:
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

    # -- interception rules --------------------------------------------------------------

    def _view(self, req: h11.Request, host: str) -> RequestView:
        _, target = split_target(req.method, req.target, self.tls)
        return RequestView.parse(host, req.method, target, req.headers.raw_items())

    def _edited(self, req: h11.Request, view: RequestView) -> h11.Request:
        """The request as the rules left it (absolute-form stays absolute-form)."""
        authority, _ = split_target(req.method, req.target, self.tls)
        target = view.target()
        if authority is not None:
            h, port = authority
            h = f"[{h}]" if ":" in h else h
            target = f"{'https' if self.tls else 'http'}://{h}:{port}".encode() + target
        try:
            return h11.Request(method=req.method, target=target, headers=view.header_bytes(),
                               http_version=req.http_version)
        except h11.LocalProtocolError as e:
            raise _Blocked(403, "blocked", view.host,
                           f"interception rules produced an invalid request: {e}"[:300]) from None

    def _rule_blocked(self, rule: HookRule, host: str, why: str = "") -> _Blocked:
        reason = f"request blocked by policy (interception rule {rule.name or '?'!r}"
        reason += f": {why})" if why else ")"
        return _Blocked(403, "blocked", host, reason[:400], rule=rule.name)

    async def _callback(self, rule: HookRule, view: RequestView,
                        resp: ResponsePlan | None):
        """The SDK's verdict; any failure blocks (fail closed, unlike the reference)."""
        try:
            verdict = await ask(self.proxy.rules.callback_socket,
                                callback_request(rule, view, resp), callback_timeout(rule))
        except CallbackFailed as e:
            raise self._rule_blocked(rule, view.host, f"callback failed, fail closed: {e}"
                                     ) from None
        if verdict.action == "block":
            raise self._rule_blocked(rule, view.host, "callback said block")
        return verdict

    async def _before_rules(self, view: RequestView) -> None:
        for rule in self.proxy.rules.before:
            # each rule sees the request as the rules before it left it
            if not self.proxy.rules.matches(rule, view.host, view.method, view.paths()):
                continue
            if rule.action == "block":
                raise self._rule_blocked(rule, view.host)
            apply_static_before(rule, view)
            if rule.callback_id:
                apply_verdict_before(await self._callback(rule, view, None), view)

    async def _after_rules(self, view: RequestView, resp: h11.Response) -> ResponsePlan:
        plan = ResponsePlan.parse(resp.status_code, resp.headers.raw_items())
        for rule in self.proxy.rules.matching("after", view.host, view.method, view.paths()):
            if rule.action == "block":
                raise self._rule_blocked(rule, view.host)
            apply_static_after(rule, plan)
            if rule.callback_id:
                apply_verdict_after(await self._callback(rule, view, plan), plan)
        return plan

    def _allowed_event(self, host: str, req: h11.Request, resp: h11.Response) -> None:
        loop = asyncio.get_running_loop()
        path = req.target.split(b"?", 1)[0][:200].decode("latin-1")
        if not path.startswith("/"):  # absolute-form: keep only its path
            _, origin = split_target(req.method, req.target, self.tls)
            path = origin.split(b"?", 1)[0][:200].decode("latin-1")
        fields = {"method": req.method.decode(), "target": req.target[:200].decode("latin-1"),
                  "status": resp.status_code, "status_code": resp.status_code,
                  "url": f"{'https' if self.tls else 'http'}://{host}{path}",
                  "duration_ms": int((loop.time() - self._t0) * 1000)}
        for name, key in ((req.headers, "request_bytes"), (resp.headers, "response_bytes")):
            for k, v in name.raw_items():
                if k.lower() == b"content-length" and v.isdigit():
                    fields[key] = int(v)
        self.proxy._event("allowed", host, **fields)

    async def _forward_shaped(self, up: _Upstream, host: str, resp: h11.Response,
                              plan: ResponsePlan) -> None:
        """A response whose body after-rules replace or rewrite; then scrubbed as usual."""
        guest, gconn, sc = self.guest, self.conn, self.scrubber
        resp = self._scrubbed(resp)
        raw = resp.headers.raw_items()
        headers = [(k, v) for k, v in raw
                   if k.lower() not in (b"content-length", b"transfer-encoding")]
        if plan.set_body is not None:
            # the upstream's body is never read: that connection cannot be reused
            self._close_upstream()
            body = replace_all(plan.set_body, plan.replacements)
            if sc.active and sc.found(body):
                body = sc.scrub(body)
            headers = [(k, v) for k, v in headers if k.lower() != b"content-encoding"]
            headers.append((b"Content-Length", str(len(body)).encode()))
            guest.write(gconn.send(h11.Response(status_code=resp.status_code,
                                                reason=resp.reason, headers=headers)))
            if body:
                guest.write(gconn.send(h11.Data(data=body)))
            guest.write(gconn.send(h11.EndOfMessage()))
            await guest.drain()
            return
        codings = content_codings(raw)
        inflater = None
        if codings:
            if len(codings) != 1 or codings[0] not in DECODABLE:
                raise _Blocked(502, "blocked", host,
                               f"response from {host} has Content-Encoding "
                               f"{b','.join(codings).decode('latin-1')[:60]}, which body "
                               "replacements cannot be applied to")
            inflater = Inflater(codings[0])
            headers = [(k, v) for k, v in headers if k.lower() != b"content-encoding"]
        if plan.is_sse:
            guest.write(gconn.send(h11.Response(status_code=resp.status_code,
                                                reason=resp.reason, headers=headers)))
            await self._relay_body(up, _Chain(SseRewriter(plan.replacements),
                                              sc.stream() if sc.active else None), inflater)
            return
        # any other type: held whole (bounded by the VM's budget), replaced, re-framed
        parts: list[bytes] = []
        held = 0
        try:
            while True:
                ev = await self._upstream_event(up)
                if type(ev) is h11.Data:
                    pieces = inflater.feed(ev.data) if inflater is not None else (ev.data,)
                    for piece in pieces:
                        if held + len(piece) > MAX_BUFFERED_BODY or \
                                not self.budget.take(len(piece)):
                            raise _Blocked(502, "blocked", host,
                                           f"response from {host} is too large to apply body "
                                           f"replacements to (limit "
                                           f"{MAX_BUFFERED_BODY >> 20} MiB or the VM's budget)")
                        held += len(piece)
                        parts.append(piece)
                elif type(ev) is h11.EndOfMessage:
                    if inflater is not None:
                        parts.append(inflater.finish())
                    break
                else:
                    raise _UpstreamError(f"{host} closed the connection mid-response")
            body = replace_all(b"".join(parts), plan.replacements)
        finally:
            self.budget.give(held)
        if sc.active and sc.found(body):
            body = sc.scrub(body)
        headers.append((b"Content-Length", str(len(body)).encode()))
        guest.write(gconn.send(h11.Response(status_code=resp.status_code, reason=resp.reason,
                                            headers=headers)))
        if body:
            guest.write(gconn.send(h11.Data(data=body)))
        guest.write(gconn.send(h11.EndOfMessage()))
        await guest.drain()

    # -- responses: every real secret value is scrubbed before the guest sees it ------------

    def _scrubbed(self, ev):
        """A response head (final or interim) as HTTP/1.1 with real values scrubbed from the
        header names, values and reason phrase."""
        ev = _as_http11(ev)
        sc = self.scrubber
        if not sc.active:
            return ev
        raw = ev.headers.raw_items()
        if not sc.found(b"\n".join(chain(chain.from_iterable(raw), (ev.reason,)))):
            return ev
        return type(ev)(status_code=ev.status_code, reason=sc.scrub(ev.reason),
                        headers=[(sc.scrub(k), sc.scrub(v)) for k, v in raw])

    async def _forward_response(self, up: _Upstream, host: str, req: h11.Request,
                                resp: h11.Response, rules: SecretRules) -> None:
        """Response head and body to the guest, scrubbed. Bodies: a small Content-Length one
        is held whole (placeholders, Content-Length recomputed); a larger one is streamed
        with same-length fillers (its announced length stays true); a chunked or
        close-delimited one is streamed with placeholders; gzip/deflate from a host a secret
        is bound to is decoded first."""
        guest, gconn, sc = self.guest, self.conn, self.scrubber
        resp = self._scrubbed(resp)
        if not sc.active or req.method == b"HEAD" or resp.status_code in (204, 304):
            guest.write(gconn.send(resp))
            await self._relay_body(up)
            return
        raw = resp.headers.raw_items()
        length: int | None = None
        codings: list[bytes] = []
        for k, v in raw:
            k = k.lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"content-encoding":
                codings = content_codings(raw)
        if codings:
            if not rules.rewrites:  # no secret is ever sent to this host: passed on as is
                guest.write(gconn.send(resp))
                await self._relay_body(up)
                return
            if len(codings) != 1 or codings[0] not in DECODABLE:
                raise _Blocked(502, "blocked", host,
                               f"response from {host} has Content-Encoding "
                               f"{b','.join(codings).decode('latin-1')[:60]}, which the proxy "
                               "cannot scan for secret values")
            headers = [(k, v) for k, v in resp.headers.raw_items()
                       if k.lower() not in (b"content-encoding", b"content-length")]
            guest.write(gconn.send(h11.Response(status_code=resp.status_code,
                                                reason=resp.reason, headers=headers)))
            await self._relay_body(up, sc.stream(), Inflater(codings[0]))
            return
        if length is not None and length <= SMALL_RESPONSE and self.budget.take(length):
            try:
                parts: list[h11.Data] = []
                while True:
                    ev = await self._upstream_event(up)
                    if type(ev) is h11.Data:
                        parts.append(ev)
                    elif type(ev) is h11.EndOfMessage:
                        break
                    else:
                        raise _UpstreamError(f"{host} closed the connection mid-response")
            finally:
                self.budget.give(length)
            body = parts[0].data if len(parts) == 1 else b"".join(d.data for d in parts)
            if sc.found(body):
                body = sc.scrub(body)
                parts = [h11.Data(data=body)]
                headers = [(k, v) for k, v in raw if k.lower() != b"content-length"]
                headers.append((b"Content-Length", str(len(body)).encode()))
                resp = h11.Response(status_code=resp.status_code, reason=resp.reason,
                                    headers=headers)
            guest.write(gconn.send(resp))
            for d in parts:
                guest.writelines(gconn.send_with_data_passthrough(d))
            guest.write(gconn.send(ev))  # no trailers: Content-Length framing has none
            await guest.drain()
            return
        guest.write(gconn.send(resp))
        await self._relay_body(up, sc.stream(same_length=length is not None))

    async def _relay_body(self, up: _Upstream, filt=None, inflater: Inflater | None = None
                          ) -> None:
        """Response body upstream → guest, flushed as it arrives (SSE, chunked)."""
        guest, gconn = self.guest, self.conn
        while True:
            ev = await self._upstream_event(up)
            t = type(ev)
            if t is h11.Data:
                if filt is None:
                    guest.writelines(gconn.send_with_data_passthrough(ev))
                    await guest.drain()
                    continue
                pieces = inflater.feed(ev.data) if inflater is not None else (ev.data,)
                for piece in pieces:
                    data = filt.feed(piece)
                    if data:
                        guest.writelines(gconn.send_with_data_passthrough(h11.Data(data=data)))
                        await guest.drain()
            elif t is h11.EndOfMessage:
                if filt is not None:
                    tail = filt.feed(inflater.finish()) if inflater is not None else b""
                    tail += filt.finish()
                    if tail:
                        guest.writelines(gconn.send_with_data_passthrough(h11.Data(data=tail)))
                if ev.headers and self.scrubber.active:  # trailers
                    scrubbed = self.scrubber.scrub_headers(ev.headers.raw_items())
                    if scrubbed is not None:
                        ev = h11.EndOfMessage(headers=scrubbed)
                guest.write(gconn.send(ev))
                await guest.drain()
                return
            else:
                raise _UpstreamError(f"{up.host} closed the connection mid-response")

    async def _upgrade(self, up: _Upstream, host: str, resp: h11.InformationalResponse) -> None:
        """101 Switching Protocols: pass it on, then relay raw bytes both ways. What the
        upstream sends is masked (same-length fillers: frames keep their lengths); towards
        hosts a secret is bound to the WebSocket compression offer was removed, so frames
        arrive readable."""
        gconn = self.conn
        if gconn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            raise _UpstreamError(f"{host} switched protocols without an upgrade request")
        self.proxy._event("upgraded", host, detail="101 Switching Protocols")
        self.guest.write(gconn.send(self._scrubbed(resp)))
        await self.guest.drain()
        self.guest.unread(gconn.trailing_data[0])
        up.stream.unread(up.conn.trailing_data[0])
        self.upstream = None  # the relay owns it now
        filt = self.scrubber.stream(same_length=True) if self.scrubber.active else None
        try:
            await _pipe(self.guest, up.stream, b_to_a=filt)
        finally:
            up.stream.close()
