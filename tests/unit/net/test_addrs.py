"""The special-purpose address classifier: the table, embedded IPv4, and the docs."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest

from matchlock.net.addrs import Kind, classify, embedded_ipv4, ranges

DOCS = Path(__file__).resolve().parents[3] / "docs" / "network.md"


def kind(ip: str) -> Kind:
    return classify(ipaddress.ip_address(ip)).kind


ROWS = [(ipaddress.ip_network(n), k, label) for n, k, label in ranges()]


@pytest.mark.parametrize("net,k,label", ranges())
def test_every_row_decides_its_own_range(net, k, label):
    """Addresses of each row that no more specific row claims are classified by it."""
    n = ipaddress.ip_network(net)
    inner = [m for m, _, _ in ROWS if m.version == n.version and m != n and m.subnet_of(n)]
    rng = random.Random(net)
    picked = [a for a in (n.network_address, n.broadcast_address,
                          *(n.network_address + rng.randrange(n.num_addresses)
                            for _ in range(200)))
              if not any(a in m for m in inner)]
    assert picked, net
    for addr in picked:
        c = classify(addr)
        if k == "global":
            assert c.kind is Kind.GLOBAL, (net, addr)
        elif k == "embedded":
            assert c.via.startswith(net) and c.target.version == 4, (net, addr, c)
        else:
            assert c.kind.value == k and c.net == net and c.label == label, (net, addr, c)


def test_ipv4_agrees_with_the_stdlib_where_it_is_right():
    """Python 3.11's is_global differs on a few rows (192.0.0.9 and 192.0.0.10 are global
    in the registry; it counts 192.88.99/24 and multicast as global and 100.64/10 as
    neither); elsewhere we agree."""
    rng = random.Random(6)
    ours_only = [ipaddress.ip_network(n) for n in
                 ("192.0.0.9/32", "192.0.0.10/32", "192.88.99.0/24", "100.64.0.0/10",
                  "224.0.0.0/4")]
    for _ in range(20000):
        a = ipaddress.IPv4Address(rng.getrandbits(32))
        if any(a in n for n in ours_only):
            continue
        assert (kind(str(a)) is Kind.GLOBAL) == a.is_global, a


@pytest.mark.parametrize("v6,v4", [
    ("::ffff:10.0.0.1", "10.0.0.1"), ("::ffff:8.8.8.8", "8.8.8.8"),
    ("64:ff9b::a00:1", "10.0.0.1"), ("64:ff9b::808:808", "8.8.8.8"),
    ("2002:0a00:0001::1", "10.0.0.1"), ("2002:0808:0808:1234::1", "8.8.8.8"),
    ("::ffff:0.0.0.0", "0.0.0.0"), ("64:ff9b::ffff:ffff", "255.255.255.255"),
])
def test_embedded_ipv4_is_judged(v6, v4):
    c = classify(ipaddress.ip_address(v6))
    assert c.target == ipaddress.ip_address(v4)
    assert c.kind is classify(ipaddress.ip_address(v4)).kind
    assert c.via


def test_embedded_decoding():
    assert embedded_ipv4(ipaddress.IPv6Address("2002:c000:0204::"), "2002::/16") == \
        ipaddress.IPv4Address("192.0.2.4")
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4"), "::ffff:0:0/96") == \
        ipaddress.IPv4Address("1.2.3.4")


@pytest.mark.parametrize("ip,k", [
    ("0.0.0.0", Kind.NEVER), ("0.255.255.255", Kind.NEVER), ("::", Kind.NEVER),
    ("::2", Kind.NEVER), ("::10.0.0.1", Kind.NEVER), ("224.0.0.251", Kind.NEVER),
    ("255.255.255.255", Kind.NEVER), ("ff02::fb", Kind.NEVER),
    ("::1", Kind.PRIVATE), ("127.0.0.1", Kind.PRIVATE), ("fe80::1%eth0", Kind.PRIVATE),
    ("100::1", Kind.SPECIAL), ("2001:db8::1", Kind.SPECIAL), ("fec0::1", Kind.SPECIAL),
    ("4000::", Kind.SPECIAL), ("::1:0:0:0", Kind.SPECIAL), ("2001::1", Kind.SPECIAL),
    ("2001:1::1", Kind.GLOBAL), ("2a00::1", Kind.GLOBAL), ("3fff:1000::", Kind.GLOBAL),
    ("3ffe::1", Kind.GLOBAL), ("192.0.0.9", Kind.GLOBAL), ("192.0.0.11", Kind.SPECIAL),
    ("255.255.255.254", Kind.SPECIAL),
])
def test_kinds(ip, k):
    assert kind(ip) is k


def test_docs_list_every_blocked_range():
    text = DOCS.read_text()
    missing = [n for n, k, _ in ranges()
               if k not in ("global",) and n not in ("::/0",) and f"`{n}`" not in text]
    assert missing == [], f"docs/network.md does not list {missing}"
