"""DNS codec (round trips, hostile input, fuzz) and the guest resolver end to end on
127.0.0.1 against a fake upstream server."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import struct

import pytest

from matchlock.net.config import parse_private_exceptions
from matchlock.net.dns import GuestResolver
from matchlock.net.dns._codec import (
    CLASS_IN,
    FLAG_QR,
    FLAG_RD,
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_MX,
    TYPE_PTR,
    TYPE_TXT,
    DnsFormatError,
    Message,
    Question,
    build_error,
    build_query,
    build_response,
    labels_to_name,
    name_to_labels,
    parse_message,
)
from matchlock.net.policy import Policy
from matchlock.net.types import NetEvent, NetworkConfig

# -- helpers ---------------------------------------------------------------------------------


def enc_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in name_to_labels(name)) + b"\x00"


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = CLASS_IN) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def a(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def header(ident=1, flags=0, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def upstream_reply(query: Message, answers: list[bytes], rcode: int = NOERROR) -> bytes:
    q = query.questions[0]
    return (header(query.id, FLAG_QR | FLAG_RD | 0x80 | rcode, 1, len(answers))
            + enc_name(q.name) + struct.pack("!HH", q.qtype, q.qclass) + b"".join(answers))


# -- codec -----------------------------------------------------------------------------------


def test_query_round_trip():
    m = parse_message(build_query(0xBEEF, "Api.Example.com", TYPE_AAAA))
    assert m.id == 0xBEEF and not m.is_response and m.flags & FLAG_RD
    assert m.questions == (Question((b"Api", b"Example", b"com"), TYPE_AAAA, CLASS_IN),)
    assert m.questions[0].name == "Api.Example.com"


def test_response_round_trip():
    q = parse_message(build_query(7, "a.com"))
    r = parse_message(build_response(q, addresses=["1.2.3.4", "5.6.7.8"], ttl=42))
    assert r.is_response and r.rcode == NOERROR and r.id == 7 and r.flags & FLAG_RD
    assert [(x.name, x.rtype, x.ttl, x.value) for x in r.answers] == [
        ("a.com", TYPE_A, 42, "1.2.3.4"), ("a.com", TYPE_A, 42, "5.6.7.8")]
    for code in (NXDOMAIN, REFUSED, SERVFAIL, NOTIMP):
        e = parse_message(build_response(q, code))
        assert e.rcode == code and e.answers == () and e.questions == q.questions
    empty = parse_message(build_response(q, NOERROR))
    assert empty.rcode == NOERROR and empty.answers == ()
    fe = parse_message(build_error(9, FLAG_RD, FORMERR))
    assert fe.rcode == FORMERR and fe.questions == () and fe.id == 9
    aaaa = parse_message(build_response(q, addresses=["2001:db8::1"], ttl=1))
    assert aaaa.answers[0].rtype == TYPE_AAAA and aaaa.answers[0].value == "2001:db8::1"


def test_compression_and_cname():
    # answer owner is a pointer to the question; CNAME target compressed against it
    msg = (header(1, FLAG_QR, 1, 2) + enc_name("www.example.com") + struct.pack("!HH", 1, 1)
           + rr(b"\xc0\x0c", TYPE_CNAME, 300, b"\x03cdn\xc0\x10")
           + rr(b"\x03cdn\xc0\x10", TYPE_A, 20, a("93.184.216.34")))
    m = parse_message(msg)
    assert m.answers[0].value == "cdn.example.com"
    assert m.answers[1].name == "cdn.example.com" and m.answers[1].value == "93.184.216.34"


def test_escaped_presentation():
    assert labels_to_name((b"a.b", b"c\x00", b"OK_-")) == "a\\046b.c\\000.OK_-"


@pytest.mark.parametrize("data", [
    b"",
    b"\x00" * 11,
    header(qd=1) + b"\x03abc",  # name runs off the end
    header(qd=1) + b"\xc0\x0c" + b"\x00\x01\x00\x01",  # pointer to itself
    header(qd=1) + b"\xc0\x20" + b"\x00" * 40,  # forward pointer
    header(qd=1) + b"\xc0",  # truncated pointer
    header(qd=1) + b"\x40abc\x00\x00\x01\x00\x01",  # extended label type
    header(qd=1) + b"\x01a\x00\x00",  # truncated question
    header(qd=0xFFFF) + b"\x00" * 50,  # huge counts
    header(qd=1, an=1000) + enc_name("a") + b"\x00\x01\x00\x01",
    header(qd=0, an=1) + b"\x00" + struct.pack("!HHIH", 1, 1, 0, 5) + b"\x01\x02\x03\x04\x05",
    header(qd=0, an=1) + b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x01",
    header(qd=0, an=1) + b"\x00" + struct.pack("!HHIH", 5, 1, 0, 4) + b"\x01a\x00\x00",
    header(qd=1) + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63
    + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01",  # name > 255 octets
    header(qd=1) + b"\x01a\xc0\x0c\x00\x01\x00\x01",  # a.a.a.… loop via a backwards pointer
])
def test_hostile_inputs(data):
    with pytest.raises(DnsFormatError):
        parse_message(data)


def chain_message(hops: int) -> bytes:
    """A record whose owner name is reached through `hops` strictly-backwards pointers:
    each is legal on its own; the chain is stored as the rdata of an unknown-type record."""
    qsec = b"\x00" + struct.pack("!HH", 1, 1)  # question: the root name, at offset 12
    chain_start = 12 + len(qsec) + 1 + 10  # after record 1's root owner and fixed fields
    chain = b"".join(struct.pack("!H", 0xC000 | (12 if i == 0 else chain_start + 2 * (i - 1)))
                     for i in range(hops))
    rec1 = b"\x00" + struct.pack("!HHIH", 99, 1, 0, len(chain)) + chain
    last = chain_start + 2 * (hops - 1)
    rec2 = struct.pack("!H", 0xC000 | last) + struct.pack("!HHIH", 1, 1, 0, 4) + a("1.2.3.4")
    return header(qd=1, an=2) + qsec + rec1 + rec2


def test_pointer_chain_bounded():
    assert parse_message(chain_message(20)).answers[1].value == "1.2.3.4"
    with pytest.raises(DnsFormatError, match="too many compression pointers"):
        parse_message(chain_message(40))


def test_fuzz_seeded():
    rng = random.Random(1234)
    seeds = [
        build_query(1, "a.example.com"),
        build_response(parse_message(build_query(2, "x.y")), addresses=["1.1.1.1"], ttl=5),
        header(1, FLAG_QR, 1, 2) + enc_name("www.example.com") + struct.pack("!HH", 1, 1)
        + rr(b"\xc0\x0c", TYPE_CNAME, 300, b"\x03cdn\xc0\x10")
        + rr(b"\x03cdn\xc0\x10", TYPE_A, 20, a("93.184.216.34")),
    ]
    parsed = 0
    for i in range(20000):
        if i % 4 == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                op = rng.randrange(3)
                if op == 0 and data:
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                elif op == 1:
                    data = data[:rng.randrange(len(data) + 1)]
                else:
                    data += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 8)))
            data = bytes(data)
        try:
            parse_message(data)
            parsed += 1
        except DnsFormatError:
            pass
    assert parsed > 100


def test_fuzz_resolver_decide():
    """Hostile guest bytes through the resolver's core: a reply, None, never an exception
    (and never an upstream query: the policy allows nothing here)."""
    r = GuestResolver(Policy(NetworkConfig(mode="intercept", allow_hosts=("a.com",))), [])
    rng = random.Random(99)
    seed = build_query(3, "zz.example")
    for _ in range(5000):
        data = bytearray(seed)
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        out = r._decide(bytes(data))
        assert out is None or isinstance(out, bytes | tuple)
        if isinstance(out, tuple):
            assert out[1] == "a.com"


# -- resolver end to end ---------------------------------------------------------------------


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers A queries from `table`: name → list of answer RRs (bytes) or an rcode int."""

    def __init__(self, table):
        self.table = table
        self.log: list[tuple[str, int]] = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        q = parse_message(data)
        name = q.questions[0].name.lower()
        self.log.append((name, q.questions[0].qtype))
        entry = self.table.get(name, NXDOMAIN)
        if entry == "silent":
            return
        if isinstance(entry, int):
            self.transport.sendto(upstream_reply(q, [], entry), addr)
        else:
            self.transport.sendto(upstream_reply(q, entry(q) if callable(entry) else entry),
                                  addr)


def owner(name):
    return enc_name(name)


UPSTREAM_TABLE = {
    "api.example.com": [rr(owner("api.example.com"), TYPE_A, 300, a("93.184.216.34")),
                        rr(owner("api.example.com"), TYPE_A, 10, a("93.184.216.35"))],
    "www.example.com": [rr(owner("www.example.com"), TYPE_CNAME, 30,
                           enc_name("edge.cdn.example.net")),
                        rr(owner("edge.cdn.example.net"), TYPE_CNAME, 45,
                           enc_name("x.cdn.example.net")),
                        rr(owner("x.cdn.example.net"), TYPE_A, 20, a("93.184.215.7")),
                        rr(owner("other.example.net"), TYPE_A, 20, a("93.184.215.99"))],
    "rebind.example.com": [rr(owner("rebind.example.com"), TYPE_A, 30, a("10.0.0.5"))],
    "local.example.com": [rr(owner("local.example.com"), TYPE_A, 30, a("127.0.0.1"))],
    "mixed.example.com": [rr(owner("mixed.example.com"), TYPE_A, 30, a("169.254.169.254")),
                          rr(owner("mixed.example.com"), TYPE_A, 30, a("93.184.215.4"))],
    "broken.example.com": SERVFAIL,
    "slow.example.com": "silent",
}


async def query(port: int, name: str, qtype: int = TYPE_A, *, raw: bytes | None = None,
                timeout: float = 5.0) -> Message | None:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(raw if raw is not None else build_query(0x1234, name, qtype))
        try:
            return parse_message(await asyncio.wait_for(got, timeout))
        except TimeoutError:
            return None
    finally:
        transport.close()


async def with_resolver(config: NetworkConfig, body, table=None, **kw):
    loop = asyncio.get_running_loop()
    fake = FakeUpstream(UPSTREAM_TABLE if table is None else table)
    up_transport, _ = await loop.create_datagram_endpoint(
        lambda: fake, local_addr=("127.0.0.1", 0))
    up_port = up_transport.get_extra_info("sockname")[1]
    events: list[NetEvent] = []
    policy = Policy(config, events.append)
    resolver = GuestResolver(policy, ["127.0.0.1"], events.append, upstream_port=up_port, **kw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = asyncio.create_task(resolver.serve(sock))
    await asyncio.sleep(0.05)  # let serve() take the socket (a task cancelled unstarted cannot)
    try:
        return await body(port, fake, policy, events, resolver)
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        assert sock.fileno() == -1  # serve closed the socket it was given
        up_transport.close()


def intercept(*allow, add=(), private=()):
    return NetworkConfig(mode="intercept", allow_hosts=tuple(allow), add_hosts=tuple(add),
                         allow_private=parse_private_exceptions(private))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_allowed_name_answered_and_recorded():
    async def body(port, fake, policy, events, _):
        m = await query(port, "API.example.com")
        assert m.rcode == NOERROR and m.id == 0x1234
        assert m.questions[0].name == "API.example.com"  # question echoed as asked
        assert [r.value for r in m.answers] == ["93.184.216.34", "93.184.216.35"]
        assert {r.ttl for r in m.answers} == {10}
        assert fake.log == [("api.example.com", TYPE_A)]
        assert policy.ips_for_host("api.example.com") == ["93.184.216.34", "93.184.216.35"]
        assert policy.host_for_ip("93.184.216.35") == "api.example.com"
        assert events == []
    run(with_resolver(intercept("*.example.com"), body))


def test_not_allowed_never_forwarded():
    async def body(port, fake, policy, events, _):
        m = await query(port, "c2VjcmV0.evil.test")
        assert m.rcode == NXDOMAIN and m.answers == ()
        m = await query(port, "c2VjcmV0.evil.test", TYPE_AAAA)
        assert m.rcode == NXDOMAIN
        assert fake.log == []
        assert [(e.kind, e.host, e.fields["reason"]) for e in events] == [
            ("dns_blocked", "c2vjcmv0.evil.test", "not allowed")] * 2
        assert policy.ips_for_host("c2vjcmv0.evil.test") is None
    run(with_resolver(intercept("*.example.com"), body))


def test_add_host_answer():
    async def body(port, fake, policy, events, _):
        m = await query(port, "db.internal")
        assert [r.value for r in m.answers] == ["10.1.2.3"] and m.rcode == NOERROR
        m = await query(port, "db.internal", TYPE_AAAA)
        assert m.rcode == NOERROR and m.answers == ()
        m = await query(port, "v6only")
        assert m.rcode == NOERROR and m.answers == ()
        assert fake.log == []
        # the guest is told what --add-host says, but the address gets no pass at dial time
        assert not policy.ip_allowed("10.1.2.3", 80, "db.internal")
    run(with_resolver(intercept("*.example.com",
                                add=[("db.internal", "10.1.2.3"), ("v6only", "2001:db8::5")]),
                      body))


def test_aaaa_of_allowed_name_is_empty_without_upstream():
    async def body(port, fake, *_):
        m = await query(port, "api.example.com", TYPE_AAAA)
        assert m.rcode == NOERROR and m.answers == ()
        assert fake.log == []
    run(with_resolver(intercept("*.example.com"), body))


def test_cname_chain_flattened():
    async def body(port, fake, policy, *_):
        m = await query(port, "www.example.com")
        assert m.rcode == NOERROR
        assert [(r.name, r.rtype, r.value, r.ttl) for r in m.answers] == [
            ("www.example.com", TYPE_A, "93.184.215.7", 20)]
        assert policy.ips_for_host("www.example.com") == ["93.184.215.7"]
    run(with_resolver(intercept("*.example.com"), body))


@pytest.mark.parametrize("name", ["rebind.example.com", "local.example.com"])
def test_private_answers_dropped(name):
    async def body(port, fake, policy, events, _):
        m = await query(port, name)
        assert m.rcode == NXDOMAIN and m.answers == ()
        assert fake.log == [(name, TYPE_A)]
        assert policy.ips_for_host(name) is None
        assert [(e.kind, e.fields["reason"]) for e in events] == [
            ("dns_blocked", "private address")]
    run(with_resolver(intercept("*.example.com"), body))


@pytest.mark.parametrize("private,kept", [
    ((), []),
    (("rebind.example.com",), ["10.0.0.5"]),  # a name entry opens what that name resolves to
    (("10.0.0.5:443",), ["10.0.0.5"]),  # a port entry: answered, each dial checks the port
    (("10.0.0.0/8",), ["10.0.0.5"]),
    (("10.0.0.6",), []),
    (("other.example.com",), []),
])
def test_private_answer_needs_an_exception(private, kept):
    async def body(port, fake, policy, events, _):
        m = await query(port, "rebind.example.com")
        assert [r.value for r in m.answers] == kept
        if not kept:
            assert m.rcode == NXDOMAIN
            assert "10.0.0.0/8 (private-use)" in events[0].detail, events
            assert "--allow-private 10.0.0.5" in events[0].detail, events
    run(with_resolver(intercept("*.example.com", private=private), body))


def test_host_local_answer_needs_the_exact_address():
    async def body(port, fake, policy, events, _):
        m = await query(port, "local.example.com")
        assert m.rcode == NXDOMAIN
        assert "is an address of this host" in events[0].detail, events
    for private in ((), ("127.0.0.0/8",), ("local.example.com",)):
        run(with_resolver(intercept("*.example.com", private=private), body))

    async def exact(port, fake, policy, events, _):
        m = await query(port, "local.example.com")
        assert [r.value for r in m.answers] == ["127.0.0.1"]
    run(with_resolver(intercept("*.example.com", private=("127.0.0.1:8080",)), exact))


def test_mixed_answer_filtered():
    async def body(port, fake, policy, events, _):
        m = await query(port, "mixed.example.com")
        assert [r.value for r in m.answers] == ["93.184.215.4"]
        assert events[0].fields["dropped"] == ["169.254.169.254"]
        assert policy.ips_for_host("mixed.example.com") == ["93.184.215.4"]
    run(with_resolver(intercept("*.example.com"), body))


@pytest.mark.parametrize("qtype", [TYPE_TXT, TYPE_PTR, TYPE_MX, 255, 65])
def test_other_types_refused(qtype):
    async def body(port, fake, policy, events, _):
        m = await query(port, "api.example.com", qtype)
        assert m.rcode == REFUSED and m.answers == ()
        assert fake.log == []
        assert events[0].kind == "dns_blocked" and events[0].fields["reason"] == \
            "unsupported type"
    run(with_resolver(intercept("*.example.com"), body))


def test_upstream_failures():
    async def body(port, fake, policy, events, _):
        assert (await query(port, "nope.example.com")).rcode == NXDOMAIN
        assert (await query(port, "broken.example.com")).rcode == SERVFAIL
        m = await query(port, "slow.example.com")
        assert m.rcode == SERVFAIL
        assert [e.kind for e in events] == ["dns_error", "dns_error"]
    run(with_resolver(intercept("*.example.com"), body, timeout=0.3))


def test_open_mode_forwards_everything_but_filters():
    async def body(port, fake, policy, events, _):
        assert (await query(port, "api.example.com")).answers[0].value == "93.184.216.34"
        assert (await query(port, "rebind.example.com")).rcode == NXDOMAIN
    run(with_resolver(NetworkConfig(mode="open"), body))


def test_malformed_and_bounds():
    async def body(port, fake, policy, events, _):
        # garbage query with a header → FORMERR carrying the id
        m = await query(port, "", raw=b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05")
        assert m.rcode == FORMERR and m.id == 0xABCD
        # oversized, multi-question, response-flagged, short: silence
        big = build_query(1, "api.example.com") + b"\x00" * 600
        assert await query(port, "", raw=big, timeout=0.3) is None
        two = header(5, FLAG_RD, 2) + (enc_name("a.example.com") + b"\x00\x01\x00\x01") * 2
        assert await query(port, "", raw=two, timeout=0.3) is None
        resp = build_response(parse_message(build_query(1, "api.example.com")))
        assert await query(port, "", raw=resp, timeout=0.3) is None
        assert await query(port, "", raw=b"\x00\x01", timeout=0.3) is None
        # a non-QUERY opcode → NOTIMP
        notify = bytearray(build_query(6, "api.example.com"))
        notify[2] |= 4 << 3
        assert (await query(port, "", raw=bytes(notify))).rcode == NOTIMP
        # a label with a dot inside it or odd bytes is not a host name: NXDOMAIN, no upstream
        dotted = header(8, FLAG_RD) + b"\x0fapi.example.com\x00\x00\x01\x00\x01"
        m = await query(port, "", raw=dotted)
        assert m.rcode == NXDOMAIN and events[-1].fields["reason"] == "invalid name"
        assert fake.log == []
    run(with_resolver(intercept("*"), body))


def test_rate_limited():
    now = [0.0]

    async def body(port, fake, policy, events, resolver):
        q = build_query(1, "db.internal")
        replies = [await resolver.handle_query(q) for _ in range(5)]
        assert [r is not None for r in replies] == [True, True, True, False, False]
        assert [e.kind for e in events] == ["dns_rate_limited"]
        now[0] += 1.0
        assert await resolver.handle_query(q) is not None
    run(with_resolver(intercept("*", add=[("db.internal", "10.1.2.3")]), body,
                      rate=1.0, burst=3.0, clock=lambda: now[0]))


def test_runtime_allow_list_change_applies_to_dns():
    async def body(port, fake, policy, events, _):
        assert (await query(port, "api.example.com")).rcode == NXDOMAIN
        policy.add_allowed(["api.example.com"])
        assert (await query(port, "api.example.com")).rcode == NOERROR
    run(with_resolver(intercept("other.test"), body))
