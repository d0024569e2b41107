"""The host's own addresses: the netlink codec (sans-I/O) and the real kernel's view."""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import subprocess

from matchlock.net.hostaddrs import (
    RT_TABLE_LOCAL,
    RTM_DELADDR,
    RTM_DELROUTE,
    RTM_NEWADDR,
    RTM_NEWROUTE,
    RTN_LOCAL,
    KernelHostAddresses,
    LocalTable,
    Message,
    parse_messages,
)

RTN_UNICAST = 1


def rta(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + b"\0" * (-len(raw) % 4)


def route(ip: str, plen: int | None = None, table: int = RT_TABLE_LOCAL,
          rtype: int = RTN_LOCAL, oif: int = 1) -> bytes:
    a = ipaddress.ip_address(ip)
    fam = socket.AF_INET if a.version == 4 else socket.AF_INET6
    plen = a.max_prefixlen if plen is None else plen
    body = struct.pack("=BBBBBBBBI", fam, plen, 0, 0, min(table, 255), 0, 0, rtype, 0)
    body += rta(1, a.packed) + rta(4, struct.pack("=I", oif))
    if table > 255:
        body += rta(15, struct.pack("=I", table))
    return body


def address(ip: str, index: int = 2) -> bytes:
    a = ipaddress.ip_address(ip)
    fam = socket.AF_INET if a.version == 4 else socket.AF_INET6
    return struct.pack("=BBBBI", fam, a.max_prefixlen, 0, 0, index) + rta(1, a.packed)


def nl(mtype: int, payload: bytes, seq: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), mtype, 0, seq, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def has(t: LocalTable, ip: str) -> bool:
    return t.contains(ipaddress.ip_address(ip))


def test_routes_and_addresses_applied():
    t = LocalTable()
    data = (nl(RTM_NEWROUTE, route("127.0.0.0", 8)) + nl(RTM_NEWROUTE, route("10.1.2.3"))
            + nl(RTM_NEWROUTE, route("2001:db8::7")) + nl(RTM_NEWADDR, address("192.0.2.9"))
            + nl(RTM_NEWROUTE, route("10.9.9.9", table=254))  # main table: not local
            + nl(RTM_NEWROUTE, route("10.8.8.8", rtype=RTN_UNICAST))
            + nl(RTM_NEWROUTE, route("10.7.7.7", table=1000)))
    for m in parse_messages(data):
        t.apply(m)
    for ip in ("127.0.0.1", "127.255.0.9", "10.1.2.3", "2001:db8::7", "192.0.2.9"):
        assert has(t, ip), ip
    for ip in ("10.1.2.4", "10.9.9.9", "10.8.8.8", "10.7.7.7", "128.0.0.1", "2001:db8::8",
               "::ffff:10.1.2.3"):
        assert not has(t, ip), ip
    t.apply(Message(RTM_DELROUTE, 0, 0, route("10.1.2.3")))
    t.apply(Message(RTM_DELADDR, 0, 0, address("192.0.2.9")))
    assert not has(t, "10.1.2.3") and not has(t, "192.0.2.9") and has(t, "127.0.0.1")


def test_same_address_on_two_interfaces_needs_two_removals():
    t = LocalTable()
    t.apply(Message(RTM_NEWROUTE, 0, 0, route("10.1.2.3", oif=1)))
    t.apply(Message(RTM_NEWROUTE, 0, 0, route("10.1.2.3", oif=2)))
    t.apply(Message(RTM_DELROUTE, 0, 0, route("10.1.2.3", oif=1)))
    assert has(t, "10.1.2.3")
    t.apply(Message(RTM_DELROUTE, 0, 0, route("10.1.2.3", oif=2)))
    assert not has(t, "10.1.2.3")


def test_garbage_never_raises():
    rng = random.Random(1)
    good = nl(RTM_NEWROUTE, route("10.1.2.3")) + nl(RTM_NEWADDR, address("fd00::1"))
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[:rng.randrange(len(data) + 1)])
        t = LocalTable()
        for m in parse_messages(data):
            t.apply(m)
        t.contains(ipaddress.ip_address("10.1.2.3"))


def test_kernel_view_has_every_interface_address():
    """The real kernel (this host namespace): every address `ip` lists, and loopback."""
    view = KernelHostAddresses()
    try:
        out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                             check=True).stdout
        listed = [line.split()[3].split("/")[0] for line in out.splitlines()]
        assert listed
        for ip in listed:
            assert view.is_local(ipaddress.ip_address(ip.split("%")[0])), ip
        assert view.is_local(ipaddress.ip_address("127.0.0.1"))
        assert view.is_local(ipaddress.ip_address("127.1.2.3"))  # the whole 127/8 route
        assert not view.is_local(ipaddress.ip_address("8.8.8.8"))
        assert view.resyncs == 1
    finally:
        view.close()
