"""The dial-time address check: may the supervisor connect to this address, right now?

One rule for every address, whatever told us about it (the guest's destination, a DNS
answer, an --add-host entry, an HTTP Host header or TLS SNI resolved on the host):

1. 0.0.0.0/8, ::, IPv4-compatible ::/96, multicast and broadcast are never dialled
   (`addrs.Kind.NEVER`): connecting to "this host" reaches the host's loopback services.
2. An address of this host (the kernel's local table, asked at the moment of the dial;
   for IPv4-mapped, NAT64 and 6to4 forms, the embedded IPv4 too) is dialled only if an
   exception names exactly that address (a /32 or /128, optionally with its port); never
   through a wider network, a host name, or the legacy private-range switch.
3. Globally routable addresses are dialled.
4. Anything else (private and special-use ranges, `addrs`) only through an exception
   covering it: a network containing it, or a host name it was resolved from; or, for the
   reference's private set only, the legacy `allow_private_ranges` switch.

Messages name the rule and the narrowest `--allow-private` entry that would open it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matchlock.net.addrs import AddrClass, IPAddress, Kind, classify
from matchlock.net.hostaddrs import HostAddresses, KernelHostAddresses
from matchlock.net.types import PrivateException

log = logging.getLogger(__name__)

FLAG = "--allow-private"

Resolver = Callable[[str], Sequence[str] | None]  # name -> addresses we know it has


@dataclass(frozen=True, slots=True)
class Blocked:
    rule: str  # "invalid", "never", "host-local", "private", "special"
    reason: str  # one line: what, which rule, and how to open it (if anything can)


def _where(addr: IPAddress, port: int | None) -> str:
    if port is None:
        return str(addr)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _entry(addr: IPAddress, port: int | None) -> str:
    """The narrowest exception naming this address (and port)."""
    return str(PrivateException(net=f"{addr}/{addr.max_prefixlen}", port=port))


class _Net:
    __slots__ = ("version", "network", "shift", "exact", "port")

    def __init__(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                 port: int | None) -> None:
        self.version = net.version
        self.shift = net.max_prefixlen - net.prefixlen
        self.network = int(net.network_address) >> self.shift
        self.exact = net.prefixlen == net.max_prefixlen
        self.port = port

    def covers(self, addr: IPAddress, port: int | None) -> bool:
        return (addr.version == self.version and int(addr) >> self.shift == self.network
                and (self.port is None or port is None or self.port == port))


class DialCheck:
    """The check for one sandbox. `host_addresses` defaults to the kernel's view, opened on
    first use and owned (closed by `close`). Thread-safe."""

    def __init__(self, exceptions: Sequence[PrivateException] = (), *,
                 allow_private_ranges: bool = False,
                 host_addresses: HostAddresses | None = None,
                 resolve: Resolver | None = None) -> None:
        self._nets = [_Net(ipaddress.ip_network(e.net), e.port)
                      for e in exceptions if e.net is not None]
        self._hosts = [(e.host, e.port) for e in exceptions if e.host is not None]
        self._legacy = allow_private_ranges
        self._host_addrs = host_addresses
        self._owned = host_addresses is None
        self._closed = False
        self._resolve = resolve
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._owned and self._host_addrs is not None:
                self._host_addrs.close()
            self._host_addrs = None

    # -- the rule ---------------------------------------------------------------------------

    def check(self, ip: str, port: int | None, host: str | None = None) -> Blocked | None:
        """None if `ip` may be dialled on `port` (None: on some port, for DNS answers);
        `host` is the name the address came from, if any."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return Blocked("invalid", f"address {ip!r} is not a valid IP address; it is blocked")
        c = classify(addr)
        where = _where(addr, port)
        if c.kind is Kind.NEVER:
            return Blocked("never", self._never(addr, where, c))
        targets = (addr,) if c.target == addr else (addr, c.target)
        if any(self._is_local(a) for a in targets):
            if any(n.exact and n.covers(a, port) for n in self._nets for a in targets):
                return None
            return Blocked("host-local", f"address {where} is an address of this host, which a "
                           "sandbox may not reach; allow exactly this address with "
                           f"{FLAG} {_entry(c.target, port)}")
        if c.kind is Kind.GLOBAL:
            return None
        if c.kind is Kind.PRIVATE and self._legacy:
            return None
        if any(n.covers(a, port) for n in self._nets for a in targets):
            return None
        if self._hosts and self._host_covers(targets, port, host):
            return None
        kind = "private" if c.kind is Kind.PRIVATE else "special-use"
        return Blocked("private" if c.kind is Kind.PRIVATE else "special",
                       f"address {where} {self._inside(addr, c)}, a {kind} range this "
                       f"sandbox may not reach; allow it with {FLAG} {_entry(c.target, port)}")

    @staticmethod
    def _inside(addr: IPAddress, c: AddrClass) -> str:
        text = f"is in {c.net} ({c.label})"
        if c.target != addr:
            text = f"carries {c.target} ({c.via}), which {text}"
        return text

    def _never(self, addr: IPAddress, where: str, c: AddrClass) -> str:
        msg = f"address {where} {self._inside(addr, c)} and is never dialled"
        if c.net in ("0.0.0.0/8", "::/128"):
            msg += (f"; to reach a service on the host's loopback name it exactly, "
                    f"e.g. {FLAG} 127.0.0.1:PORT")
        return msg

    def _host_covers(self, targets: tuple[IPAddress, ...], port: int | None,
                     host: str | None) -> bool:
        texts = {str(a) for a in targets}
        for name, want in self._hosts:
            if want is not None and port is not None and want != port:
                continue
            if host is not None and host == name:
                return True
            known = self._resolve(name) if self._resolve is not None else None
            if known and texts.intersection(known):
                return True
        return False

    def _is_local(self, addr: IPAddress) -> bool:
        try:
            with self._lock:
                if self._closed:
                    raise OSError("the host address view is closed")
                if self._host_addrs is None:
                    self._host_addrs = KernelHostAddresses()
                view = self._host_addrs
            return view.is_local(addr)
        except OSError as e:  # fail closed: an unknown host view blocks everything special
            log.warning("cannot read this host's addresses (%s); treating %s as local", e, addr)
            return True
