"""CLI network flags → NetworkConfig. Pure: the only outside input is the `host_env`
mapping the caller passes (for `--secret NAME@host`). Every error is a one-line UsageError
that never contains a secret's value."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets as _secrets
from collections.abc import Iterable, Mapping, Sequence

from matchlock.errors import UsageError
from matchlock.net.policy import normalise_glob
from matchlock.net.types import DEFAULT_DNS_SERVERS, NetworkConfig, NetworkMode, Secret

PLACEHOLDER_PREFIX = "SANDBOX_SECRET_"
MIN_MTU = 576  # the IPv4 minimum every host must accept (RFC 791)
MAX_MTU = 65535

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ADD_HOST_NAME_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")


def new_placeholder() -> str:
    """What the guest sees instead of a secret: SANDBOX_SECRET_ + 32 lowercase hex."""
    return PLACEHOLDER_PREFIX + _secrets.token_hex(16)


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
                        host_env: Mapping[str, str]) -> NetworkConfig:
    """Validate and combine the `run` network flags (see the module docstring)."""
    allow_items = _items(allow_hosts)
    secret_items = [s for s in secrets if s.strip()]

    if no_network:
        for given, flag in ((allow_items, "--allow-host"), (secret_items, "--secret"),
                            (network_intercept, "--network-intercept")):
            if given:
                raise UsageError(f"--no-network cannot be combined with {flag}; "
                                 f"drop one of them")

    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise UsageError(f"invalid --mtu {mtu!r}: use a number from {MIN_MTU} to {MAX_MTU}")

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
    )
