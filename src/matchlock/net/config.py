"""CLI network flags → NetworkConfig. Pure: the only outside input is the `host_env`
mapping the caller passes (for `--secret NAME@host`). Every error is a one-line UsageError
that never contains a secret's value. The policy, address classes and `secrets` load only
for the flags that need them (`run --no-network` pays for none)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from matchlock.errors import UsageError
from matchlock.net.types import (
    DEFAULT_DNS_SERVERS,
    NetworkConfig,
    NetworkMode,
    PrivateException,
    Secret,
)

PLACEHOLDER_PREFIX = "SANDBOX_SECRET_"
# Exceptions to the special-range block for every VM this process creates (CLI and RPC):
# read by the face that builds the config, never by the lower layers.
ALLOW_PRIVATE_ENV = "MATCHLOCK_ALLOW_PRIVATE"
MIN_MTU = 576  # the IPv4 minimum every host must accept (RFC 791)
MAX_MTU = 65535

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ADD_HOST_NAME_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")


def new_placeholder() -> str:
    """What the guest sees instead of a secret: SANDBOX_SECRET_ + 32 lowercase hex."""
    import secrets

    return PLACEHOLDER_PREFIX + secrets.token_hex(16)


def _items(values: Iterable[str]) -> list[str]:
    """Comma-split every flag value, trim, drop empty items."""
    out = []
    for v in values:
        out.extend(p.strip() for p in v.split(","))
    return [p for p in out if p]


def _dedup(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _parse_add_host(raw: str) -> tuple[str, str]:
    bad = UsageError(f"malformed --add-host {raw!r}: use HOST:IP (e.g. db.internal:10.1.2.3)")
    host, sep, ip = raw.partition(":")  # the FIRST ':' so IPv6 addresses work
    host, ip = host.strip().lower(), ip.strip()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not sep or not host or not ip or not _ADD_HOST_NAME_RE.match(host):
        raise bad
    if ip.startswith("[") and ip.endswith("]"):
        ip = ip[1:-1]
    try:
        return host, str(ipaddress.ip_address(ip))
    except ValueError:
        raise bad from None


def _parse_secret(raw: str, host_env: Mapping[str, str]) -> Secret:
    """One --secret value: NAME@h1,h2 or NAME=VALUE@h1,h2. The hosts follow the LAST '@'
    (so a value may contain '@' and ','); one secret per flag value, like the reference."""
    spec, at, hosts_part = raw.rpartition("@")
    name, eq, value = spec.partition("=")
    name = name.strip()
    shown = name if _ENV_NAME_RE.match(name) else "…"
    if not at:
        # no '@' at all: `raw` may be NAME=VALUE, so show only what precedes '='
        shown_raw = raw.partition("=")[0].strip()
        raise UsageError(f"malformed --secret {shown_raw!r}: use NAME@HOST[,HOST…] "
                         "(value from the environment) or NAME=VALUE@HOST[,HOST…]")
    if not _ENV_NAME_RE.match(name):
        # `name` is what precedes the first '=', so it never holds the value
        raise UsageError(f"--secret: {name!r} is not a valid environment variable name; use "
                         "NAME@HOST or NAME=VALUE@HOST (one secret per --secret flag)")
    hosts = _items([hosts_part])
    if not hosts:
        raise UsageError(f"--secret {shown}: no hosts after '@'; use {shown}@HOST[,HOST…]")
    from matchlock.net.policy import normalise_glob

    globs = _dedup(normalise_glob(h, f"--secret {shown} host") for h in hosts)
    if eq:
        if not value:
            raise UsageError(f"--secret {name}: the value after '=' is empty; "
                             f"use {name}=VALUE@HOST or {name}@HOST")
    else:
        value = host_env.get(name, "")
        if not value:
            raise UsageError(f"--secret {name}: {name} is not set in the host environment; "
                             f"export it or use {name}=VALUE@host")
    return Secret(name=name, value=value, hosts=globs, placeholder=new_placeholder())


_ENTRY_SYNTAX = ("use IP, CIDR or HOST, optionally with :PORT "
                 "(e.g. 10.1.2.3, 10.0.0.0/8, db.internal:5432, [fd00::1]:80)")
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_PORT_SUFFIX_RE = re.compile(r"(.+):(\d{1,5})\Z")


def _split_port(raw: str) -> tuple[str, str | None]:
    """`[v6]:80`, `[v6]`, `v6`, `v6/64`, `v4:80`, `v4/8:80`, `name:80`, `name`."""
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            return raw, None
        rest = raw[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            return raw[1:end], rest[1:]
        return (raw[1:end], None) if not rest else (raw, None)
    if raw.count(":") == 1:
        m = _PORT_SUFFIX_RE.match(raw)
        if m:
            return m.group(1), m.group(2)
    return raw, None


def parse_private_exception(raw: str, source: str = "--allow-private") -> PrivateException:
    """One IP|CIDR|HOST[:PORT] entry; UsageError naming `source` when it is not one."""
    shown = raw.strip()

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid {source} entry {shown!r}: {why}")

    from matchlock.net.addrs import Kind, classify
    from matchlock.net.policy import normalise_host

    what, port_text = _split_port(shown)
    port = None
    if port_text is not None:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise bad("the port must be 1 to 65535")
    if not what:
        raise bad(_ENTRY_SYNTAX)
    try:
        net = ipaddress.ip_network(what, strict=False)
    except ValueError:
        net = None
    if net is not None:
        try:
            ipaddress.ip_network(what)
        except ValueError:
            raise bad(f"it has host bits set; did you mean {net}?") from None
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_V4_MAPPED):
            # ::ffff:a.b.c.d is dialled as a.b.c.d: store the IPv4 form, which covers both
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF,
                                         net.prefixlen - 96))
        first, last = classify(net.network_address), classify(net.broadcast_address)
        if first.kind is Kind.NEVER and last.kind is Kind.NEVER and first.net == last.net:
            hint = ("; to reach a service on the host's loopback name it exactly, "
                    "e.g. 127.0.0.1:PORT") if first.net in ("0.0.0.0/8", "::/128") else ""
            raise bad(f"{first.net} ({first.label}) is never dialled, whatever the "
                      f"exceptions{hint}")
        return PrivateException(net=str(net), port=port)
    if "/" in what or "*" in what:
        raise bad(_ENTRY_SYNTAX)
    host = normalise_host(what)
    if host is None or ":" in host or host.rsplit(".", 1)[-1].isdigit():
        raise bad(_ENTRY_SYNTAX)  # all-digit last label: a malformed IP, not a name
    if host == "localhost" or host.endswith(".localhost"):
        raise bad("a host name never opens an address of this host; name the address "
                  "exactly, e.g. 127.0.0.1:PORT")
    return PrivateException(host=host, port=port)


def parse_private_exceptions(values: Iterable[str],
                             source: str = "--allow-private") -> tuple[PrivateException, ...]:
    """Comma lists of IP|CIDR|HOST[:PORT] (flag values, the environment variable, the RPC
    list), validated, deduplicated, in order."""
    return _dedup(parse_private_exception(v, source) for v in _items(values))


def host_resolvers(path: str | None = None) -> tuple[str, ...]:
    """The host's own resolvers: our DNS runs on the host, so it asks what the host asks
    (a corporate or local resolver works as it does for every other host program).
    Falls back to DEFAULT_DNS_SERVERS when the file names none."""
    # MATCHLOCK_RESOLV_CONF: the test suite points it at a loopback-only file.
    path = path or os.environ.get("MATCHLOCK_RESOLV_CONF") or "/etc/resolv.conf"
    found = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        found.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
                    except ValueError:
                        continue
    except OSError:
        pass
    return tuple(dict.fromkeys(found)) or DEFAULT_DNS_SERVERS


def parse_network_flags(*, no_network: bool, allow_hosts: Sequence[str],
                        add_hosts: Sequence[str], secrets: Sequence[str],
                        dns_servers: Sequence[str], network_intercept: bool, mtu: int,
                        host_env: Mapping[str, str], allow_private: Sequence[str] = (),
                        env_allow_private: str = "") -> NetworkConfig:
    """Validate and combine the `run` network flags (see the module docstring).
    `env_allow_private`: the face's MATCHLOCK_ALLOW_PRIVATE value (applies to every VM)."""
    allow_items = _items(allow_hosts)
    secret_items = [s for s in secrets if s.strip()]

    if no_network:
        for given, flag in ((allow_items, "--allow-host"), (secret_items, "--secret"),
                            (network_intercept, "--network-intercept"),
                            (_items(allow_private), "--allow-private")):
            if given:
                raise UsageError(f"--no-network cannot be combined with {flag}; "
                                 f"drop one of them")

    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise UsageError(f"invalid --mtu {mtu!r}: use a number from {MIN_MTU} to {MAX_MTU}")

    globs = []
    if allow_items:
        from matchlock.net.policy import normalise_glob

        globs = [normalise_glob(h) for h in allow_items]

    parsed: list[Secret] = []
    for raw in secret_items:
        sec = _parse_secret(raw.strip(), host_env)
        if any(p.name == sec.name for p in parsed):
            raise UsageError(f"--secret {sec.name} is given more than once; "
                             "give each secret once, with all its hosts")
        parsed.append(sec)
        globs.extend(sec.hosts)

    pairs = _dedup(_parse_add_host(h) for h in _items(add_hosts))

    servers = []
    for s in _items(dns_servers):
        try:
            servers.append(str(ipaddress.ip_address(s.strip("[]"))))
        except ValueError:
            raise UsageError(f"invalid --dns-servers entry {s!r}: use IP addresses "
                             "(e.g. 1.1.1.1,9.9.9.9)") from None

    exceptions = () if no_network else _dedup((
        *parse_private_exceptions([env_allow_private], ALLOW_PRIVATE_ENV),
        *parse_private_exceptions(allow_private)))

    mode: NetworkMode
    if no_network:
        mode = "none"
    elif globs or parsed or network_intercept:
        mode = "intercept"
    else:
        mode = "open"

    return NetworkConfig(
        mode=mode,
        allow_hosts=_dedup(globs),
        add_hosts=pairs,
        secrets=tuple(parsed),
        dns_servers=_dedup(servers) or host_resolvers(),
        mtu=mtu,
        allow_private=exceptions,
    )
