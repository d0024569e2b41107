"""The network policy engine: which hosts and addresses a sandbox may reach, which secrets
go where, and what our DNS told the guest. Pure: no sockets; the clock is injectable.

Glob semantics (also used for secret hosts), always case-insensitive, on a normalised host
(lowercase, no trailing dot, no port):

- ``*`` matches every host.
- ``*.example.com`` matches any name ending in ``.example.com`` at any depth, never the apex
  ``example.com`` itself.
- ``example.*`` matches any name starting with ``example.``.
- Any other pattern with ``*`` (``api-*.example.com``, ``*.*.example.com``): each ``*``
  matches zero or more characters **within one label** (it never spans a dot). The reference
  let ``*`` span dots here; we do not, so ``api.*.com`` cannot match ``api.evil.attacker.com``.
- Without ``*`` the match is exact.

The allow-list in intercept mode: an allow-list that was empty when the sandbox started and
was never edited (``--network-intercept`` alone) allows every host. Once a list has been in
force, removing its last entry allows *no* host (the reference reopened egress to all hosts,
a fail-open surprise).

Addresses are a separate question, asked at dial time for every address whatever its source
(`ip_allowed`, see `dialcheck`): only globally routable addresses, never the host itself,
never 0.0.0.0, unless an explicit exception (`NetworkConfig.allow_private`) names them. The
policy's DNS bookkeeping tells the check which name an address came from.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from matchlock.errors import UsageError
from matchlock.net.dialcheck import Blocked, DialCheck
from matchlock.net.hostaddrs import HostAddresses
from matchlock.net.types import EventSink, NetEvent, NetworkConfig, Secret

# DNS bookkeeping bounds: a hostile guest can make us record at most this many names, and we
# keep an answer this long after its TTL (guest stub caches may outlive the TTL we gave).
MAX_RECORDED_NAMES = 4096
RECORD_GRACE_S = 300.0

_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_GLOB_LABEL_RE = re.compile(r"[a-z0-9*-]{1,63}\Z")
_PORT_RE = re.compile(r"(.*):(\d{1,5})\Z")


def _strip_port(host: str) -> str:
    """`host:443` → `host`, `[::1]:443` → `::1`, `[::1]` → `::1`; a bare IPv6 stays as is."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0 and (end == len(host) - 1 or _PORT_RE.match("x" + host[end + 1:])):
            return host[1:end]
        return host
    if host.count(":") == 1:
        m = _PORT_RE.match(host)
        if m:
            return m.group(1)
    return host


def normalise_host(host: str) -> str | None:
    """Lowercase, strip port and trailing dot. Returns None unless the result is a
    syntactically valid DNS name (letters, digits, '-', '_', labels 1..63, ≤ 253) or an IP
    literal (returned in canonical form). Fail closed: garbage never matches a glob."""
    if not isinstance(host, str) or len(host) > 300:
        return None
    h = _strip_port(host.strip()).lower()
    if h.endswith(".") and not h.endswith(".."):
        h = h[:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if not h or len(h) > 253:
        return None
    if not all(_LABEL_RE.match(label) for label in h.split(".")):
        return None
    return h


def normalise_glob(raw: str, flag: str = "--allow-host") -> str:
    """Validate and normalise one allow-list glob; raise UsageError naming `flag`."""
    g = _strip_port(raw.strip()).lower()
    if g.endswith(".") and g != ".":
        g = g[:-1]

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid {flag} glob {raw.strip()!r}: {why}")

    if not g:
        raise bad("it is empty")
    if g == "*":
        return g
    if len(g) > 253:
        raise bad("it is longer than 253 characters")
    if "**" in g:
        raise bad("'**' is not allowed; use '*.example.com' for any depth")
    bad_chars = sorted({c for c in g if not (c.isascii() and (c.isalnum() or c in "-.*"))})
    if bad_chars:
        shown = "".join(bad_chars)
        raise bad(f"only letters, digits, '-', '.' and '*' are allowed (found {shown!r})")
    labels = g.split(".")
    if any(not label for label in labels):
        raise bad("it has an empty label (two dots in a row, or a leading dot)")
    if any(not _GLOB_LABEL_RE.match(label) for label in labels):
        raise bad("a label is longer than 63 characters")
    return g


def _label_wildcard_re(glob: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in glob.split("*")]
    return re.compile("[^.]*".join(parts) + r"\Z")


def match_glob(glob: str, host: str) -> bool:
    """Match a normalised glob against a normalised host (see the module docstring)."""
    if glob == "*":
        return True
    if "*" not in glob:
        return glob == host
    if glob.startswith("*.") and "*" not in glob[2:]:
        return host.endswith(glob[1:])
    if glob.endswith(".*") and "*" not in glob[:-2]:
        return host.startswith(glob[:-1]) and len(host) > len(glob) - 1
    return _label_wildcard_re(glob).match(host) is not None


class Policy:
    """One sandbox's network policy. All methods are synchronous and cheap; mutation is
    guarded by a lock, reads see immutable snapshots, so asyncio tasks and the odd thread
    can share one instance."""

    def __init__(self, config: NetworkConfig, emit: EventSink | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 host_addresses: HostAddresses | None = None) -> None:
        self._config = config
        self._emit = emit
        self._clock = clock
        self._lock = threading.Lock()
        self._allow: tuple[str, ...] = tuple(dict.fromkeys(
            normalise_glob(g) for g in config.allow_hosts))
        # an allow-list that was never in force allows everything (see module docstring)
        self._allow_all_when_empty = not self._allow
        self._add_hosts: dict[str, tuple[str, ...]] = {}
        for name, ip in config.add_hosts:
            n = normalise_host(name) or name.lower().rstrip(".")
            canon = str(ipaddress.ip_address(ip))
            self._add_hosts[n] = (*self._add_hosts.get(n, ()), canon)
        # --add-host addresses get no pass: they face the same dial-time check as any other
        self._dial = DialCheck(config.allow_private,
                               allow_private_ranges=config.allow_private_ranges,
                               host_addresses=host_addresses, resolve=self._known_ips,
                               normalise=normalise_host)
        self._secret_globs = tuple(
            (s, tuple(normalise_glob(g, f"--secret {s.name}") for g in s.hosts))
            for s in config.secrets)
        self._answers: OrderedDict[str, tuple[tuple[str, ...], float]] = OrderedDict()
        self._reverse: OrderedDict[str, str] = OrderedDict()

    # -- allow-list -------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._config.mode

    @property
    def allow_hosts(self) -> tuple[str, ...]:
        return self._allow

    @property
    def allow_all(self) -> bool:
        """True when every (syntactically valid) host name is allowed."""
        mode = self._config.mode
        return mode == "open" or (mode == "intercept" and not self._allow
                                  and self._allow_all_when_empty)

    def host_allowed(self, host: str) -> bool:
        """May the guest talk to this host name (HTTP Host, TLS SNI, DNS name, or an IP
        literal on a passthrough port)? Addresses are checked separately by `ip_allowed`."""
        if self._config.mode == "none":
            return False
        h = normalise_host(host)
        if h is None:
            return False
        if self.allow_all:
            return True
        return any(match_glob(g, h) for g in self._allow)

    def _require_intercept(self) -> None:
        if self._config.mode != "intercept":
            raise UsageError("the allow-list can only be changed for a sandbox started with "
                             "network interception; start it with --allow-host or "
                             "--network-intercept")

    def add_allowed(self, hosts: Sequence[str]) -> list[str]:
        """Add globs (validated like --allow-host); returns those not already present."""
        self._require_intercept()
        globs = [normalise_glob(h) for h in hosts if h.strip()]
        with self._lock:
            added = [g for g in dict.fromkeys(globs) if g not in self._allow]
            self._allow = self._allow + tuple(added)
            self._allow_all_when_empty = False
        if added:
            self._event("allow_list_changed", detail="added " + ",".join(added),
                        added=added, allow_hosts=list(self._allow))
        return added

    def remove_allowed(self, hosts: Sequence[str]) -> list[str]:
        """Remove globs; returns those that were present. Emptying the list blocks all."""
        self._require_intercept()
        wanted = set()
        for h in hosts:
            if not h.strip():
                continue
            try:
                wanted.add(normalise_glob(h))
            except UsageError:
                wanted.add(h.strip().lower())  # cannot be present; nothing to remove
        with self._lock:
            removed = [g for g in self._allow if g in wanted]
            self._allow = tuple(g for g in self._allow if g not in wanted)
            self._allow_all_when_empty = False
        if removed:
            self._event("allow_list_changed", detail="removed " + ",".join(removed),
                        removed=removed, allow_hosts=list(self._allow))
        return removed

    # -- addresses --------------------------------------------------------------------------

    def _check_ip(self, ip: str, port: int | None, host: str | None) -> Blocked | None:
        if self._config.mode == "none":
            return Blocked("no-network", f"address {ip} is not reachable: this sandbox has no "
                           "network")
        return self._dial.check(ip, port, host or None)

    def ip_allowed(self, ip: str, port: int, host: str | None = None) -> bool:
        """May we dial ip:port now? Asked right before every connect, for every address
        whatever its source; `host`: the name it was resolved from, if any (see
        `dialcheck` for the rule)."""
        return self._check_ip(ip, port, host) is None

    def answer_allowed(self, ip: str, name: str) -> bool:
        """May our DNS hand `ip` out for `name`? (It could be dialled on some port; each
        dial is checked again.)"""
        return self._check_ip(ip, None, name) is None

    def close(self) -> None:
        """Release the kernel view of the host's addresses (if this policy opened it)."""
        self._dial.close()

    def block_reason_host(self, host: str) -> str:
        h = normalise_host(host)
        if h is None:
            return f"host {host!r} is not a valid host name; it is blocked by this sandbox's " \
                   "network policy"
        if self._config.mode == "none":
            return f"host {h} is not reachable: this sandbox has no network"
        return (f"host {h} is not allowed by this sandbox's network policy; "
                f"allow it with --allow-host {h}")

    def block_reason_ip(self, ip: str, port: int | None, host: str | None = None) -> str:
        """Why ip:port may not be dialled: the rule that blocks it and how to open it."""
        found = self._check_ip(ip, port, host)
        if found is not None:
            return found.reason
        addr = ipaddress.ip_address(ip)
        where = str(addr) if port is None else f"[{addr}]:{port}" if addr.version == 6 \
            else f"{addr}:{port}"
        return (f"address {where} is not allowed by this sandbox's network policy; "
                f"allow it with --allow-host {addr}")

    # -- secrets ----------------------------------------------------------------------------

    def secrets_for_host(self, host: str) -> list[Secret]:
        """Secrets whose host globs match `host`. A secret with no hosts matches nothing
        (the reference sent it everywhere)."""
        h = normalise_host(host)
        if h is None:
            return []
        return [s for s, globs in self._secret_globs if any(match_glob(g, h) for g in globs)]

    def all_secrets(self) -> tuple[Secret, ...]:
        return self._config.secrets

    # -- DNS bookkeeping --------------------------------------------------------------------

    def record_answer(self, name: str, ips: Sequence[str], ttl: float) -> None:
        """Remember what our DNS told the guest, so the proxy dials the same addresses."""
        n = normalise_host(name)
        if n is None:
            return
        canon = tuple(dict.fromkeys(str(ipaddress.ip_address(ip)) for ip in ips))
        expiry = self._clock() + max(0.0, float(ttl)) + RECORD_GRACE_S
        with self._lock:
            self._answers.pop(n, None)
            self._answers[n] = (canon, expiry)
            while len(self._answers) > MAX_RECORDED_NAMES:
                self._answers.popitem(last=False)
            for ip in canon:
                self._reverse.pop(ip, None)
                self._reverse[ip] = n
            while len(self._reverse) > MAX_RECORDED_NAMES * 4:
                self._reverse.popitem(last=False)

    def add_host_ips(self, name: str) -> list[str] | None:
        n = normalise_host(name)
        if n is None:
            return None
        found = self._add_hosts.get(n)
        return list(found) if found else None

    def ips_for_host(self, name: str) -> list[str] | None:
        """The --add-host addresses for `name`, else the unexpired recorded answer."""
        n = normalise_host(name)
        if n is None:
            return None
        if n in self._add_hosts:
            return list(self._add_hosts[n])
        with self._lock:
            entry = self._answers.get(n)
            if entry is None:
                return None
            ips, expiry = entry
            if self._clock() >= expiry:
                del self._answers[n]
                return None
        return list(ips)

    def _known_ips(self, n: str) -> list[str] | None:
        """`ips_for_host` for a name that is already normalised (the dial check's hot path)."""
        found = self._add_hosts.get(n)
        if found:
            return list(found)
        with self._lock:
            entry = self._answers.get(n)
            if entry is None or self._clock() >= entry[1]:
                return None
            return list(entry[0])

    def host_for_ip(self, ip: str) -> str | None:
        """The last name we answered with this address (or its --add-host name)."""
        try:
            canon = str(ipaddress.ip_address(ip))
        except ValueError:
            return None
        with self._lock:
            name = self._reverse.get(canon)
            if name is not None:
                entry = self._answers.get(name)
                if entry is not None and canon in entry[0] and self._clock() < entry[1]:
                    return name
        for n, addrs in self._add_hosts.items():
            if canon in addrs:
                return n
        return None

    # -- events -----------------------------------------------------------------------------

    def _event(self, kind: str, host: str = "", detail: str = "", **fields) -> None:
        if self._emit is not None:
            self._emit(NetEvent(kind=kind, host=host, detail=detail, fields=fields))
