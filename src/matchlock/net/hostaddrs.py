"""The addresses of this host, as the kernel knows them at the moment of a dial.

A sandbox must never reach the host itself: not its loopback, not the address of its main
interface, not the host side of a veth, not an address added a moment ago. The source of
truth is the kernel's `local` routing table (table 255: every address the host accepts as
its own, including prefixes such as 127.0.0.0/8 and AnyIP routes) plus the interface
addresses. `KernelHostAddresses` dumps both once over rtnetlink and keeps a netlink socket
subscribed to address and route changes; `is_local()` first drains that socket without
blocking, so a change the kernel made before the dial (the notification is queued before
`ip addr add` returns) is always seen. On overflow (ENOBUFS) it dumps again. The dumps
happen at start and after an overflow only; they block briefly (the kernel answers at once).

Hand-written rather than pyroute2: `IPRoute().route("get", ...)` measured ~570 µs per call
here, over ten times the budget of a whole dial check; draining an idle socket is ~3 µs.

The socket belongs to the network namespace of the thread that opens it; the supervisor
dials from its own (host) namespace, so opening it on a thread that entered another
namespace (`_setns.run_in_netns`) is refused.

`parse_messages` and `LocalTable` are the sans-I/O core (bytes in, state out).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NETLINK_ROUTE = 0
# message types <linux/rtnetlink.h>, <linux/netlink.h>
NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 2, 3, 4
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
# multicast groups (bitmask form for bind())
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
IFA_ADDRESS, IFA_LOCAL = 1, 2
RT_TABLE_LOCAL = 255
RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST = 2, 3, 4
# route types that mean "delivered to this host" (broadcast and anycast: to be safe)
LOCAL_TYPES = frozenset({RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST})

_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
RCVBUF = 1 << 20  # room for bursts of route changes between two dials
RECV_SIZE = 1 << 16
DUMP_TIMEOUT_S = 5.0


class HostAddresses(Protocol):
    """What the policy needs to know: does dialling any of these addresses ((IP version,
    value as an int) pairs: an address and the IPv4 it carries) reach this host?"""

    def local_any(self, addrs: Sequence[tuple[int, int]]) -> bool: ...

    def close(self) -> None: ...


# -- sans-I/O core --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    flags: int
    seq: int
    payload: bytes


def parse_messages(data: bytes) -> Iterator[Message]:
    """Split one netlink datagram into messages; stops at a malformed length."""
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, flags, seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            return
        yield Message(mtype, flags, seq, data[off + _NLMSG.size:off + length])
        off += (length + 3) & ~3


def _attrs(payload: bytes, start: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = start
    while off + _RTATTR.size <= len(payload):
        length, atype = _RTATTR.unpack_from(payload, off)
        if length < _RTATTR.size or off + length > len(payload):
            break
        out.setdefault(atype & 0x3FFF, payload[off + _RTATTR.size:off + length])
        off += (length + 3) & ~3
    return out


_FAMILY_BITS = {socket.AF_INET: (4, 32), socket.AF_INET6: (6, 128)}


# A key: (version, prefix length, network as int, discriminator); the discriminator keeps
# two routes/addresses for the same prefix (on two interfaces) apart.
Key = tuple[int, int, int, int]


def route_key(payload: bytes) -> Key | None:
    """The key of a local-table route of a "delivered here" type, else None."""
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, _proto, _scope, rtype, _fl = \
        _RTMSG.unpack_from(payload)
    if family not in _FAMILY_BITS or rtype not in LOCAL_TYPES:
        return None
    attrs = _attrs(payload, _RTMSG.size)
    if RTA_TABLE in attrs and len(attrs[RTA_TABLE]) == 4:
        table = struct.unpack("=I", attrs[RTA_TABLE])[0]
    if table != RT_TABLE_LOCAL:
        return None
    version, bits = _FAMILY_BITS[family]
    raw = attrs.get(RTA_DST, b"")
    if dst_len > bits or (dst_len and len(raw) != bits // 8):
        return None
    value = int.from_bytes(raw, "big") if dst_len else 0
    oif = struct.unpack("=I", attrs[RTA_OIF])[0] if len(attrs.get(RTA_OIF, b"")) == 4 else 0
    return (version, dst_len, value, oif)


def addr_key(payload: bytes) -> Key | None:
    """The key of an interface address (always one address: prefix length = all bits)."""
    if len(payload) < _IFADDRMSG.size:
        return None
    family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(payload)
    if family not in _FAMILY_BITS:
        return None
    version, bits = _FAMILY_BITS[family]
    attrs = _attrs(payload, _IFADDRMSG.size)
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)  # IFA_ADDRESS is the peer on p2p
    if raw is None or len(raw) != bits // 8:
        return None
    return (version, bits, int.from_bytes(raw, "big"), index)


class LocalTable:
    """The set of local prefixes, updated from netlink messages."""

    def __init__(self) -> None:
        self._routes: set[Key] = set()
        self._addrs: set[Key] = set()
        self._index: dict[int, list[tuple[int, frozenset[int]]]] = {4: [], 6: []}
        self._dirty = False

    def clear(self) -> None:
        self._routes.clear()
        self._addrs.clear()
        self._dirty = True

    def apply(self, msg: Message) -> None:
        if msg.type in (RTM_NEWROUTE, RTM_DELROUTE):
            key, into = route_key(msg.payload), self._routes
        elif msg.type in (RTM_NEWADDR, RTM_DELADDR):
            key, into = addr_key(msg.payload), self._addrs
        else:
            return
        if key is None:
            return
        if msg.type in (RTM_NEWROUTE, RTM_NEWADDR):
            into.add(key)
        else:
            into.discard(key)
        self._dirty = True

    def _rebuild(self) -> None:
        grouped: dict[tuple[int, int], set[int]] = {}
        for version, plen, value, _ in (*self._routes, *self._addrs):
            grouped.setdefault((version, plen), set()).add(value)
        index: dict[int, list[tuple[int, frozenset[int]]]] = {4: [], 6: []}
        for (version, plen), values in sorted(grouped.items(), key=lambda kv: -kv[0][1]):
            index[version].append((plen, frozenset(values)))
        self._index, self._dirty = index, False

    def contains(self, addr: IPAddress) -> bool:
        return self.contains_value(addr.version, int(addr))

    def contains_value(self, version: int, value: int) -> bool:
        if self._dirty:
            self._rebuild()
        bits = 32 if version == 4 else 128
        for plen, values in self._index[version]:
            if ((value >> (bits - plen)) << (bits - plen) if plen else 0) in values:
                return True
        return False

    def prefixes(self) -> list[str]:
        """Human-readable view, for logs and tests."""
        out = set()
        for version, plen, value, _ in (*self._routes, *self._addrs):
            addr = ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value)
            out.add(f"{addr}/{plen}")
        return sorted(out)


def _request(mtype: int, seq: int, body: bytes, flags: int = NLM_F_REQUEST | NLM_F_DUMP) -> bytes:
    return _NLMSG.pack(_NLMSG.size + len(body), mtype, flags, seq, 0) + body


def dump_requests(seq: int) -> list[tuple[int, bytes]]:
    """(seq, request) for a dump of every route and every address, all families."""
    return [
        (seq, _request(RTM_GETROUTE, seq, _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0))),
        (seq + 1, _request(RTM_GETADDR, seq + 1, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))),
    ]


# -- the kernel -----------------------------------------------------------------------------


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class HostAddressError(OSError):
    """The kernel's view of this host's addresses could not be read."""


class KernelHostAddresses:
    """`HostAddresses` from rtnetlink (see the module docstring). Thread-safe.

    Two sockets: `_mon` is subscribed to the address and route groups and drained at each
    check; `_dump` only carries full dumps (at start and after `_mon` overflowed), so a
    dump's own backpressure is never mistaken for lost changes. A resync empties `_mon`,
    dumps, then applies what `_mon` got meanwhile in order: for a key that changed since the
    drain the last change wins, for any other key the dump (taken later) is current."""

    def __init__(self, rcvbuf: int = RCVBUF) -> None:
        here = _netns_inode("/proc/thread-self/ns/net")
        if here is not None and here != _netns_inode("/proc/self/ns/net"):
            raise HostAddressError("the host address view must be opened in the host network "
                                   "namespace, not on a thread that entered another one")
        self._lock = threading.Lock()
        self._table = LocalTable()
        self._seq = 0
        self._resyncs = 0
        self._mon = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self._dump = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        try:
            for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
                try:
                    self._mon.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                    break
                except OSError:
                    continue
            self._mon.bind((0, GROUPS))  # subscribed before the first dump: nothing missed
            self._mon.setblocking(False)
            self._dump.bind((0, 0))
            self._dump.settimeout(DUMP_TIMEOUT_S)
            self._resync()
        except BaseException:
            self._mon.close()
            self._dump.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._mon.close()
            self._dump.close()

    def is_local(self, addr: IPAddress) -> bool:
        return self.local_value(addr.version, int(addr))

    def local_value(self, version: int, value: int) -> bool:
        return self.local_any(((version, value),))

    def local_any(self, addrs: Sequence[tuple[int, int]]) -> bool:
        with self._lock:
            self._drain()
            return any(self._table.contains_value(v, x) for v, x in addrs)

    def prefixes(self) -> list[str]:
        with self._lock:
            self._drain()
            return self._table.prefixes()

    @property
    def resyncs(self) -> int:
        """How many full dumps were needed (1 at start; more after overflows)."""
        return self._resyncs

    # -- internals (lock held) ------------------------------------------------------------

    def _recv_changes(self) -> list[bytes] | None:
        """Everything queued on the change socket; None if changes were lost (overflow)."""
        out = []
        while True:
            try:
                out.append(self._mon.recv(RECV_SIZE))
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return None
                raise HostAddressError(f"reading the kernel's address changes: {e}") from e

    def _drain(self) -> None:
        got = self._recv_changes()
        if got is None:  # we missed changes: start over
            self._resync()
            return
        for data in got:
            for msg in parse_messages(data):
                self._table.apply(msg)

    def _resync(self) -> None:
        self._resyncs += 1
        for _ in range(10):
            while self._recv_changes() is None:  # empty the change queue (and its error)
                pass
            self._table.clear()
            if not self._dump_all():
                continue
            got = self._recv_changes()
            if got is None:
                continue
            for data in got:
                for msg in parse_messages(data):
                    self._table.apply(msg)
            return
        raise HostAddressError("the kernel's addresses kept changing faster than we could "
                               "read them")

    def _dump_all(self) -> bool:
        """One full dump into the table; False if the kernel says it was interrupted."""
        intact = True
        for seq, req in dump_requests(self._seq + 1):
            self._seq = seq
            self._dump.send(req)
            done = False
            while not done:
                try:
                    data = self._dump.recv(RECV_SIZE)
                except TimeoutError:
                    raise HostAddressError("the kernel did not answer an address dump") \
                        from None
                except OSError as e:
                    if e.errno == errno.ENOBUFS:  # the dump's own backpressure; it goes on
                        continue
                    raise HostAddressError(f"dumping the kernel's addresses: {e}") from e
                for msg in parse_messages(data):
                    if msg.seq != seq:
                        continue
                    if msg.flags & NLM_F_DUMP_INTR:
                        intact = False
                    if msg.type == NLMSG_DONE:
                        done = True
                    elif msg.type == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", msg.payload)[0] if msg.payload else 0
                        if code:
                            raise HostAddressError(
                                f"the kernel refused an address dump: {os.strerror(code)}")
                        done = True
                    else:
                        self._table.apply(msg)
        return intact


class StaticHostAddresses:
    """A fixed set of host prefixes: for unit tests that must not depend on this machine."""

    def __init__(self, prefixes: tuple[str, ...] = ("127.0.0.0/8", "::1/128")) -> None:
        self._table = LocalTable()
        for i, p in enumerate(prefixes):
            net = ipaddress.ip_network(p)
            self._table._routes.add((net.version, net.prefixlen, int(net.network_address), i))
        self._table._dirty = True

    def is_local(self, addr: IPAddress) -> bool:
        return self._table.contains(addr)

    def local_any(self, addrs: Sequence[tuple[int, int]]) -> bool:
        return any(self._table.contains_value(v, x) for v, x in addrs)

    def close(self) -> None:
        pass

