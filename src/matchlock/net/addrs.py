"""Which destination addresses are globally routable: a sans-I/O classifier.

`classify(addr)` answers from the IANA special-purpose address registries (IPv4 and IPv6,
as of 2025), the multicast ranges, and, for IPv6, the rule that only 2000::/3 is allocated
as global unicast. Longest prefix wins, so the registry's globally reachable exceptions
(192.0.0.9, 2001:1::1, 2001:20::/28, ...) stay global inside a blocked range.

Forms that carry an IPv4 address are decoded and judged by it: IPv4-mapped
(::ffff:0:0/96, dialled as the IPv4 address itself by a dual-stack socket), NAT64
(64:ff9b::/96) and 6to4 (2002::/16). The address that counts is then the embedded one
(`AddrClass.target`).

Kinds:
- GLOBAL: dialled by default.
- PRIVATE: the reference's private set (RFC 1918, loopback, link-local, ULA); blocked
  unless an explicit exception or the legacy block_private_ips=false lifts it.
- SPECIAL: every other special-use range; blocked unless an explicit exception lifts it.
- NEVER: no exception opens it: 0.0.0.0/8 and :: (connecting to "this host" reaches the
  host's own loopback services), IPv4-compatible ::/96 (deprecated), multicast, broadcast.

Pure: no sockets, no clock. The addresses of the host itself are a separate question
(`hostaddrs`), decided from the kernel at dial time.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Kind(enum.Enum):
    GLOBAL = "global"
    PRIVATE = "private"
    SPECIAL = "special"
    NEVER = "never"
    EMBEDDED = "embedded"  # table entries only: decode the IPv4 inside and judge that


@dataclass(frozen=True, slots=True)
class AddrClass:
    kind: Kind  # never EMBEDDED: embedded forms are resolved to their IPv4's kind
    net: str  # the range that decided it ("" for an ordinary global address)
    label: str  # what the range is, e.g. "benchmarking"
    target: IPAddress  # the address the kernel would really dial (embedded IPv4, or itself)
    via: str = ""  # for embedded forms: the IPv6 range that carried the IPv4 address


# (network, kind, label). Exceptions inside a blocked range are listed as GLOBAL.
_TABLE: tuple[tuple[str, Kind, str], ...] = (
    # --- IPv4 -----------------------------------------------------------------------------
    ("0.0.0.0/8", Kind.NEVER, '"this network": dialling it reaches the host itself'),
    ("10.0.0.0/8", Kind.PRIVATE, "private-use"),
    ("100.64.0.0/10", Kind.SPECIAL, "shared address space, carrier-grade NAT"),
    ("127.0.0.0/8", Kind.PRIVATE, "loopback"),
    ("169.254.0.0/16", Kind.PRIVATE, "link-local, cloud metadata"),
    ("172.16.0.0/12", Kind.PRIVATE, "private-use"),
    ("192.0.0.0/24", Kind.SPECIAL, "IETF protocol assignments"),
    ("192.0.0.9/32", Kind.GLOBAL, "port control protocol anycast"),
    ("192.0.0.10/32", Kind.GLOBAL, "TURN anycast"),
    ("192.0.2.0/24", Kind.SPECIAL, "documentation, TEST-NET-1"),
    ("192.88.99.0/24", Kind.SPECIAL, "deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", Kind.PRIVATE, "private-use"),
    ("198.18.0.0/15", Kind.SPECIAL, "benchmarking"),
    ("198.51.100.0/24", Kind.SPECIAL, "documentation, TEST-NET-2"),
    ("203.0.113.0/24", Kind.SPECIAL, "documentation, TEST-NET-3"),
    ("224.0.0.0/4", Kind.NEVER, "multicast"),
    ("240.0.0.0/4", Kind.SPECIAL, "reserved"),
    ("255.255.255.255/32", Kind.NEVER, "limited broadcast"),
    # --- IPv6 -----------------------------------------------------------------------------
    ("::/0", Kind.SPECIAL, "reserved, outside 2000::/3 global unicast"),
    ("2000::/3", Kind.GLOBAL, "global unicast"),
    ("::/128", Kind.NEVER, "unspecified: dialling it reaches the host itself"),
    ("::1/128", Kind.PRIVATE, "loopback"),
    ("::/96", Kind.NEVER, "deprecated IPv4-compatible"),
    ("::ffff:0:0/96", Kind.EMBEDDED, "IPv4-mapped"),
    ("64:ff9b::/96", Kind.EMBEDDED, "NAT64"),
    ("64:ff9b:1::/48", Kind.SPECIAL, "local-use NAT64"),
    ("100::/64", Kind.SPECIAL, "discard-only"),
    ("100:0:0:1::/64", Kind.SPECIAL, "dummy prefix"),
    ("2001::/23", Kind.SPECIAL, "IETF protocol assignments"),
    ("2001::/32", Kind.SPECIAL, "Teredo"),
    ("2001:1::1/128", Kind.GLOBAL, "port control protocol anycast"),
    ("2001:1::2/128", Kind.GLOBAL, "TURN anycast"),
    ("2001:1::3/128", Kind.GLOBAL, "DNS-SD service registration protocol anycast"),
    ("2001:2::/48", Kind.SPECIAL, "benchmarking"),
    ("2001:3::/32", Kind.GLOBAL, "automatic multicast tunneling"),
    ("2001:4:112::/48", Kind.GLOBAL, "AS112-v6"),
    ("2001:10::/28", Kind.SPECIAL, "deprecated ORCHID"),
    ("2001:20::/28", Kind.GLOBAL, "ORCHIDv2"),
    ("2001:30::/28", Kind.GLOBAL, "drone remote ID"),
    ("2001:db8::/32", Kind.SPECIAL, "documentation"),
    ("2002::/16", Kind.EMBEDDED, "6to4"),
    ("3fff::/20", Kind.SPECIAL, "documentation"),
    ("5f00::/16", Kind.SPECIAL, "segment routing SIDs"),
    ("fc00::/7", Kind.PRIVATE, "unique-local"),
    ("fe80::/10", Kind.PRIVATE, "link-local"),
    ("fec0::/10", Kind.SPECIAL, "deprecated site-local"),
    ("ff00::/8", Kind.NEVER, "multicast"),
)


@dataclass(frozen=True, slots=True)
class _Entry:
    net: str
    kind: Kind
    label: str


def _build() -> dict[int, list[tuple[int, dict[int, _Entry]]]]:
    """version -> [(prefix length, {network as int: entry})], longest prefix first: a
    lookup is one shift and one dict probe per distinct prefix length."""
    by_len: dict[tuple[int, int], dict[int, _Entry]] = {}
    for text, kind, label in _TABLE:
        net = ipaddress.ip_network(text)
        by_len.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = \
            _Entry(str(net), kind, label)
    out: dict[int, list[tuple[int, dict[int, _Entry]]]] = {4: [], 6: []}
    for (version, plen), entries in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
        out[version].append((plen, entries))
    return out


_LOOKUP = _build()
_BITS = {4: 32, 6: 128}
_MAPPED, _NAT64, _6TO4 = "::ffff:0:0/96", "64:ff9b::/96", "2002::/16"


def parse_ip(text: str) -> tuple[int, int] | None:
    """(version, value) of an IP literal, or None. The fast path for canonical text (what
    the kernel, getaddrinfo and our own config produce); `ipaddress` for the rest (scope
    ids such as fe80::1%eth0)."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError, ValueError):
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, TypeError, ValueError):
        pass
    try:
        addr = ipaddress.ip_address(text)
    except (ValueError, TypeError):
        return None
    return addr.version, int(addr)


def _lookup(version: int, value: int) -> _Entry | None:
    bits = _BITS[version]
    for plen, entries in _LOOKUP[version]:
        found = entries.get((value >> (bits - plen)) << (bits - plen) if plen else 0)
        if found is not None:
            return found
    return None


def embedded_ipv4(addr: ipaddress.IPv6Address, via: str) -> ipaddress.IPv4Address:
    """The IPv4 address inside an IPv4-mapped, NAT64 (/96) or 6to4 address."""
    return ipaddress.IPv4Address(_embedded(int(addr), via))


def _embedded(value: int, via: str) -> int:
    return (value >> 80) & 0xFFFFFFFF if via == _6TO4 else value & 0xFFFFFFFF


# (kind, deciding entry or None, carrying entry or None, target version, target value)
Verdict = tuple[Kind, "_Entry | None", "_Entry | None", int, int]


def classify_value(version: int, value: int) -> Verdict:
    """The hot path of `classify`, on (version, value): no objects made for the common
    case."""
    entry = _lookup(version, value)
    if entry is None or entry.kind is Kind.GLOBAL:
        return Kind.GLOBAL, None, None, version, value
    if entry.kind is Kind.EMBEDDED:
        inner = _embedded(value, entry.net)
        found = _lookup(4, inner)
        if found is None or found.kind is Kind.GLOBAL:
            return Kind.GLOBAL, None, entry, 4, inner
        return found.kind, found, entry, 4, inner
    return entry.kind, entry, None, version, value


def _addr(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def classify(addr: IPAddress) -> AddrClass:
    """What `addr` is (see the module docstring). Never raises for a parsed address."""
    kind, entry, via, tv, tval = classify_value(addr.version, int(addr))
    target = addr if (tv, tval) == (addr.version, int(addr)) else _addr(tv, tval)
    return AddrClass(kind, entry.net if entry else "", entry.label if entry else "", target,
                     via=f"{via.net} ({via.label})" if via else "")


def ranges() -> list[tuple[str, str, str]]:
    """(network, kind, label) for every table row: for docs and tests."""
    return [(n, k.value, label) for n, k, label in _TABLE]
