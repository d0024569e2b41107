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

from matchlock.net.addrs import Kind, classify_value, parse_ip
from matchlock.net.hostaddrs import HostAddresses, KernelHostAddresses
from matchlock.net.types import PrivateException

log = logging.getLogger(__name__)

FLAG = "--allow-private"

Resolver = Callable[[str], Sequence[str] | None]  # normalised name -> addresses it has
Normaliser = Callable[[str], str | None]


class Blocked:
    """A refusal: `rule` ("invalid", "never", "host-local", "host-unknown", "private",
    "special", "no-network") and `reason`, one line saying what, which rule, and how to
    open it (if anything can). The reason is built only when asked for: a plain
    `ip_allowed` refusal costs no string formatting."""

    __slots__ = ("rule", "_make", "_reason")

    def __init__(self, rule: str, reason: str | Callable[[], str]) -> None:
        self.rule = rule
        self._make = reason if callable(reason) else None
        self._reason = reason if isinstance(reason, str) else None

    @property
    def reason(self) -> str:
        if self._reason is None:
            assert self._make is not None
            self._reason = self._make()
        return self._reason

    def __repr__(self) -> str:
        return f"Blocked({self.rule!r}, {self.reason!r})"


def _ip(version: int, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _where(text: str, port: int | None) -> str:
    if port is None:
        return text
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _entry(version: int, value: int, port: int | None) -> str:
    """The narrowest exception naming this address (and port)."""
    return _where(str(_ip(version, value)), port)


def _what(entry, via, tv: int, tval: int) -> str:
    """`is in NET (label)`, or for an embedded form `carries V4 (VIA), which is in ...`."""
    what = f"is in {entry.net} ({entry.label})"
    if via is not None:
        what = f"carries {_ip(tv, tval)} ({via.net} ({via.label})), which {what}"
    return what


# An exception network, flattened for the hot path: (version, shift, value >> shift, exact,
# port or None).
_Net = tuple[int, int, int, bool, int | None]


def _net(e: PrivateException) -> _Net:
    n = ipaddress.ip_network(e.net or "")
    shift = n.max_prefixlen - n.prefixlen
    return (n.version, shift, int(n.network_address) >> shift, shift == 0, e.port)


class DialCheck:
    """The check for one sandbox. `host_addresses` defaults to the kernel's view, opened on
    first use and owned (closed by `close`). Thread-safe."""

    def __init__(self, exceptions: Sequence[PrivateException] = (), *,
                 allow_private_ranges: bool = False,
                 host_addresses: HostAddresses | None = None,
                 resolve: Resolver | None = None,
                 normalise: Normaliser | None = None) -> None:
        self._nets = tuple(_net(e) for e in exceptions if e.net is not None)
        self._hosts = tuple((e.host, e.port) for e in exceptions if e.host is not None)
        self._legacy = allow_private_ranges
        self._host_addrs = host_addresses
        self._owned = host_addresses is None
        self._closed = False
        self._warned = False
        self._resolve = resolve
        self._normalise = normalise
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
        `host` is the name the address came from, if any. The allowed path makes no
        objects beyond a few tuples: it runs before every connect."""
        parsed = parse_ip(ip)
        if parsed is None:
            return Blocked("invalid", f"address {ip!r} is not a valid IP address; it is blocked")
        version, value = parsed
        kind, entry, via, tv, tval = classify_value(version, value)
        if kind is Kind.NEVER:
            assert entry is not None
            return Blocked("never", lambda: self._never(_where(str(_ip(version, value)), port),
                                                        _what(entry, via, tv, tval), entry.net))
        embedded = (tv, tval) != parsed
        try:
            local = self._is_local((parsed, (tv, tval)) if embedded else (parsed,))
        except OSError as e:  # fail closed: without the host's addresses nothing is dialled
            return Blocked("host-unknown", f"address {_where(str(_ip(version, value)), port)} "
                           f"is refused: this host's own addresses cannot be read from the "
                           f"kernel ({e})")
        if local:
            if self._covered(version, value, port, exact=True) or \
                    (embedded and self._covered(tv, tval, port, exact=True)):
                return None
            return Blocked("host-local", lambda: (
                f"address {_where(str(_ip(version, value)), port)} is an address of this "
                "host, which a sandbox may not reach; allow exactly this address with "
                f"{FLAG} {_entry(tv, tval, port)}"))
        if kind is Kind.GLOBAL:
            return None
        if kind is Kind.PRIVATE and self._legacy:
            return None
        if self._covered(version, value, port) or (embedded and self._covered(tv, tval, port)):
            return None
        if self._hosts and self._host_covers(parsed, (tv, tval), port, host):
            return None
        assert entry is not None
        private = kind is Kind.PRIVATE

        def reason() -> str:
            return (f"address {_where(str(_ip(version, value)), port)} "
                    f"{_what(entry, via, tv, tval)}, a {'private' if private else 'special-use'}"
                    f" range this sandbox may not reach; allow it with "
                    f"{FLAG} {_entry(tv, tval, port)}")
        return Blocked("private" if private else "special", reason)

    def _covered(self, version: int, value: int, port: int | None, exact: bool = False) -> bool:
        for v, shift, net, is_exact, want in self._nets:
            if (v == version and value >> shift == net and (is_exact or not exact)
                    and (want is None or port is None or want == port)):
                return True
        return False

    @staticmethod
    def _never(where: str, what: str, net: str) -> str:
        msg = f"address {where} {what} and is never dialled"
        if net in ("0.0.0.0/8", "::/128"):
            msg += (f"; to reach a service on the host's loopback name it exactly, "
                    f"e.g. {FLAG} 127.0.0.1:PORT")
        return msg

    def _host_covers(self, addr: tuple[int, int], target: tuple[int, int], port: int | None,
                     host: str | None) -> bool:
        name = None
        if host is not None:
            name = self._normalise(host) if self._normalise is not None else host
        for entry_name, want in self._hosts:
            if want is not None and port is not None and want != port:
                continue
            if name is not None and name == entry_name:
                return True
            known = self._resolve(entry_name) if self._resolve is not None else None
            for text in known or ():
                if parse_ip(text) in (addr, target):
                    return True
        return False

    def _is_local(self, addrs: tuple[tuple[int, int], ...]) -> bool:
        """Raises OSError when the kernel's view cannot be had (the caller refuses)."""
        try:
            with self._lock:
                if self._closed:
                    raise OSError("the host address view is closed")
                if self._host_addrs is None:
                    self._host_addrs = KernelHostAddresses()
                view = self._host_addrs
            return view.local_any(addrs)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot read this host's addresses from the kernel (%s): every "
                            "dial is refused", e)
            raise
