"""The guest-facing DNS resolver: the only DNS the guest can reach.

It answers from policy, never from the guest's bytes: a name the policy does not allow gets
NXDOMAIN without any upstream query (so `<data>.attacker.example` carries nothing out),
only A queries are ever forwarded — rebuilt from the parsed name, with a fresh id, from the
host namespace — and the answer is filtered (no address the proxy could not dial:
`Policy.answer_allowed`), flattened (CNAME chains become A records under the asked name)
and recorded in the policy so the proxy dials exactly what the guest was told.

What the guest gets:

- A for an --add-host name: its IPv4 addresses (NOERROR, possibly empty); AAAA: NOERROR
  with no records (the guest has no IPv6), for add-host and allowed names alike.
- A for an allowed name: the upstream's filtered A records, TTL min(ttl, 60); NXDOMAIN if
  the upstream says so or every address was filtered out; SERVFAIL if no upstream answered.
- A/AAAA for a name the policy does not allow, or for a name that is not a plain host name:
  NXDOMAIN.
- Any other type (PTR, TXT, MX, ANY, HTTPS, ...) or class: REFUSED; another opcode: NOTIMP.
- Oversized (> 512 bytes), non-query, multi-question, over-rate packets: no reply at all.

Events (NetEvent kinds): "dns_blocked" (fields["reason"]: "not allowed", "invalid name",
"unsupported type", "private address"), "dns_error" (no upstream answered),
"dns_rate_limited" (at most one per second while dropping).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable, Sequence

from matchlock.net.dns._codec import (
    CLASS_IN,
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    OPCODE_QUERY,
    REFUSED,
    SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    DnsFormatError,
    Message,
    build_error,
    build_query,
    build_response,
    parse_message,
)
from matchlock.net.policy import Policy, normalise_host
from matchlock.net.types import EventSink, NetEvent

MAX_QUERY = 512  # classic UDP DNS limit; we never advertise EDNS, so a larger query is abuse
MAX_ANSWER = 512  # our replies stay within classic UDP DNS too
MAX_UPSTREAM_RESPONSE = 65535
MAX_TTL = 60  # short: the policy may change at runtime and guests should re-ask
MAX_CNAME_CHAIN = 16
MAX_IN_FLIGHT = 64  # concurrent upstream lookups per VM; beyond it queries are dropped
DEFAULT_RATE = 200.0  # queries per second, token bucket
DEFAULT_BURST = 200.0
UPSTREAM_TIMEOUT_S = 2.0  # per server


class _TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class GuestResolver:
    """Answer the guest's DNS queries from policy (see the module docstring)."""

    def __init__(self, policy: Policy, upstreams: Sequence[str], emit: EventSink | None = None,
                 upstream_port: int = 53, *, rate: float = DEFAULT_RATE,
                 burst: float = DEFAULT_BURST, timeout: float = UPSTREAM_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._upstreams = tuple(upstreams)
        self._emit = emit
        self._port = upstream_port
        self._timeout = timeout
        self._clock = clock
        self._bucket = _TokenBucket(rate, burst, clock)
        self._last_rate_event = float("-inf")
        self._in_flight = 0

    # -- the decision core (no I/O) ---------------------------------------------------------

    def _decide(self, data: bytes) -> bytes | tuple[Message, str] | None:
        """Reply bytes, None (drop), or (query, name) to be forwarded upstream as an A query."""
        if len(data) > MAX_QUERY or len(data) < 12:
            return None
        try:
            query = parse_message(data)
        except DnsFormatError:
            flags = int.from_bytes(data[2:4], "big")
            if flags & 0x8000:  # a response: never answer those
                return None
            return build_error(int.from_bytes(data[0:2], "big"), flags, FORMERR)
        if query.is_response or len(query.questions) != 1:
            return None
        if query.opcode != OPCODE_QUERY:
            return build_response(query, NOTIMP)
        q = query.questions[0]
        if q.qclass != CLASS_IN or q.qtype not in (TYPE_A, TYPE_AAAA):
            self._event("dns_blocked", q.name, "unsupported type",
                        f"query type {q.qtype} class {q.qclass} is not answered")
            return build_response(query, REFUSED)
        name = normalise_host(q.name)
        if name is None or ":" in name:
            self._event("dns_blocked", q.name, "invalid name", "not a plain host name")
            return build_response(query, NXDOMAIN)
        fixed = self._policy.add_host_ips(name)
        if fixed is not None:
            v4 = [ip for ip in fixed if ":" not in ip] if q.qtype == TYPE_A else []
            return build_response(query, NOERROR, addresses=v4, ttl=MAX_TTL)
        if not self._policy.host_allowed(name):
            self._event("dns_blocked", name, "not allowed", self._policy.block_reason_host(name))
            return build_response(query, NXDOMAIN)
        if q.qtype == TYPE_AAAA:
            return build_response(query, NOERROR)
        return query, name

    def _finish(self, query: Message, name: str, upstream: Message) -> bytes:
        """Turn the upstream's answer into the guest's: flatten, filter, record."""
        if upstream.rcode == NXDOMAIN:
            return build_response(query, NXDOMAIN)
        target, ttl = name, MAX_TTL
        for _ in range(MAX_CNAME_CHAIN):
            cname = next((r for r in upstream.answers if r.rtype == TYPE_CNAME
                          and r.name.lower() == target and r.value is not None), None)
            if cname is None:
                break
            ttl = min(ttl, cname.ttl)
            target = cname.value.lower()
        found = [r for r in upstream.answers
                 if r.rtype == TYPE_A and r.rclass == CLASS_IN and r.name.lower() == target]
        ips = list(dict.fromkeys(r.value for r in found if r.value is not None))
        ttl = min([ttl, *(r.ttl for r in found)])
        allowed = [ip for ip in ips if self._policy.answer_allowed(ip, name)]
        dropped = [ip for ip in ips if ip not in allowed]
        if dropped:
            self._event("dns_blocked", name, "private address",
                        "dropped answers: " + "; ".join(
                            self._policy.block_reason_ip(ip, None, name) for ip in dropped),
                        dropped=dropped)
            if not allowed:
                return build_response(query, NXDOMAIN)
        room = (MAX_ANSWER - len(build_response(query, NOERROR))) // 16
        allowed = allowed[:max(0, room)]
        if allowed:
            self._policy.record_answer(name, allowed, ttl)
        return build_response(query, NOERROR, addresses=allowed, ttl=ttl)

    # -- the asyncio shell ------------------------------------------------------------------

    async def handle_query(self, data: bytes) -> bytes | None:
        """One guest datagram in, the reply datagram (or None: send nothing) out. Never
        raises for anything the guest or an upstream sends."""
        if not self._bucket.take():
            now = self._clock()
            if now - self._last_rate_event >= 1.0:
                self._last_rate_event = now
                self._event("dns_rate_limited", "", "rate limited",
                            "guest DNS queries over the rate limit are dropped")
            return None
        decision = self._decide(bytes(data))
        if decision is None or isinstance(decision, bytes):
            return decision
        query, name = decision
        if self._in_flight >= MAX_IN_FLIGHT:
            return None
        self._in_flight += 1
        try:
            upstream = await self._ask_upstreams(name)
        finally:
            self._in_flight -= 1
        if upstream is None:
            self._event("dns_error", name, "no answer",
                        f"no upstream DNS server answered for {name}")
            return build_response(query, SERVFAIL)
        return self._finish(query, name, upstream)

    async def _ask_upstreams(self, name: str) -> Message | None:
        for server in self._upstreams:
            msg = await self._ask(server, name)
            if msg is not None and msg.rcode in (NOERROR, NXDOMAIN):
                return msg
        return None

    async def _ask(self, server: str, name: str) -> Message | None:
        loop = asyncio.get_running_loop()
        ident = secrets.randbelow(0x10000)
        query = build_query(ident, name, TYPE_A)
        answer: asyncio.Future[Message] = loop.create_future()

        class _Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                if answer.done() or len(data) > MAX_UPSTREAM_RESPONSE:
                    return
                try:
                    msg = parse_message(data)
                except DnsFormatError:
                    return
                if (msg.id != ident or not msg.is_response or len(msg.questions) != 1
                        or msg.questions[0].name.lower() != name
                        or msg.questions[0].qtype != TYPE_A):
                    return  # not the answer to our question: ignore, keep waiting
                answer.set_result(msg)

            def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
                if not answer.done():
                    answer.set_exception(exc)

        transport = None
        try:
            transport, _ = await loop.create_datagram_endpoint(
                _Upstream, remote_addr=(server, self._port))
            transport.sendto(query)
            return await asyncio.wait_for(answer, self._timeout)
        except (OSError, TimeoutError):
            return None
        finally:
            if transport is not None:
                transport.close()
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()  # mark retrieved

    async def serve(self, sock: socket.socket) -> None:
        """Serve guest queries on an already bound UDP socket until cancelled. The socket
        becomes ours: it is closed when serving ends."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        closed: asyncio.Future[None] = loop.create_future()
        resolver = self

        class _Guest(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr) -> None:
                task = loop.create_task(self._reply(data, addr))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            async def _reply(self, data: bytes, addr) -> None:
                try:
                    reply = await resolver.handle_query(data)
                except Exception as e:  # a bug: fail closed, keep serving
                    resolver._event("error", "", "dns resolver", f"{type(e).__name__}: {e}")
                    return
                if reply is not None and not self.transport.is_closing():
                    self.transport.sendto(reply, addr)

            def connection_lost(self, exc) -> None:
                if not closed.done():
                    closed.set_result(None)

        transport, _ = await loop.create_datagram_endpoint(_Guest, sock=sock)
        try:
            await closed
        finally:
            transport.close()
            for task in list(tasks):
                task.cancel()
            # let the cancelled replies and the transport's close (it closes `sock`) finish
            await asyncio.wait([*tasks, closed], timeout=1.0)

    def _event(self, kind: str, host: str, reason: str, detail: str, **fields) -> None:
        if self._emit is not None:
            self._emit(NetEvent(kind=kind, host=host, detail=detail,
                                fields={"reason": reason, **fields}))
