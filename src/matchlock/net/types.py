"""Shared network types: the contract between config parsing, the namespace plumbing,
the DNS resolver, the policy and the proxy. Pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import asyncio  # annotations only: `run` parses its flags before asyncio is loaded

NetworkMode = Literal["none", "open", "intercept"]

# Addresses inside every VM's own namespace (namespaces are per VM, so they never clash).
GUEST_IP = "10.213.0.2"
GATEWAY_IP = "10.213.0.1"  # the TAP's address; the relay, proxy and DNS listen here
PREFIX_LEN = 30
TAP_NAME = "ml-tap0"
DEFAULT_DNS_SERVERS = ("8.8.8.8", "8.8.4.4")  # upstream resolvers the host-side DNS uses
DEFAULT_MTU = 1500


@dataclass(frozen=True, slots=True)
class Secret:
    name: str
    value: str  # the real value: host memory only, never persisted, logged or sent to the guest
    hosts: tuple[str, ...]  # globs the value may be sent to
    placeholder: str  # SANDBOX_SECRET_<32 hex>: what the guest sees

    def __repr__(self) -> str:  # keep the value out of logs and tracebacks
        return f"Secret(name={self.name!r}, hosts={self.hosts!r}, placeholder={self.placeholder!r})"


@dataclass(frozen=True, slots=True)
class PrivateException:
    """One explicit exception to the special-range block (`--allow-private`, the
    MATCHLOCK_ALLOW_PRIVATE variable, the RPC's network.allow_private list): an address or
    network (`net`, canonical CIDR) or a host name (`host`), optionally one `port` only.
    A host-local address is opened only by a `net` naming exactly that one address."""

    net: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:  # the flag syntax, canonical
        what = self.host or self.net or ""
        if self.net is not None and (what.endswith("/32") or what.endswith("/128")):
            what = what.rsplit("/", 1)[0]
        if self.port is None:
            return what
        return f"[{what}]:{self.port}" if ":" in what else f"{what}:{self.port}"


@dataclass(frozen=True, slots=True)
class HookRule:
    """One compiled network interception rule (spec/rpc-protocol.md §2.1.2): the wire's
    NetworkHookRule with defaults applied, keys trimmed, header names canonical, and the
    mutation fields of the other phase dropped. Matching and applying: net/proxy/_rules.py."""

    name: str = ""
    phase: str = "before"  # "before" | "after"
    hosts: tuple[str, ...] = ()  # normalised globs; empty = every host
    methods: tuple[str, ...] = ()  # upper-case; empty = every method
    path: str = ""  # Go path.Match glob on the URL path; empty = every path
    action: str = "allow"  # "allow" (only with a callback) | "block" | "mutate"
    callback_id: str = ""
    timeout_ms: int = 0
    set_headers: tuple[tuple[str, str], ...] = ()
    delete_headers: tuple[str, ...] = ()
    set_query: tuple[tuple[str, str], ...] = ()
    delete_query: tuple[str, ...] = ()
    rewrite_path: str = ""
    set_response_headers: tuple[tuple[str, str], ...] = ()
    delete_response_headers: tuple[str, ...] = ()
    body_replacements: tuple[tuple[str, str], ...] = ()  # (find, replace), literal

    @classmethod
    def from_wire(cls, d: dict) -> HookRule:
        kw = dict(d)
        for k in ("hosts", "methods", "delete_headers", "delete_query",
                  "delete_response_headers"):
            kw[k] = tuple(kw.get(k, ()))
        for k in ("set_headers", "set_query", "set_response_headers", "body_replacements"):
            kw[k] = tuple(tuple(p) for p in kw.get(k, ()))
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    mode: NetworkMode = "open"
    allow_hosts: tuple[str, ...] = ()  # globs; secret hosts are added to it
    add_hosts: tuple[tuple[str, str], ...] = ()  # (name, ip): answered by our DNS, /etc/hosts
    secrets: tuple[Secret, ...] = ()
    dns_servers: tuple[str, ...] = DEFAULT_DNS_SERVERS
    mtu: int = DEFAULT_MTU
    # explicit exceptions to the special-range block (see PrivateException)
    allow_private: tuple[PrivateException, ...] = ()
    # the reference's block_private_ips=false (RPC/SDK only): lifts its private set (RFC 1918,
    # link-local, ULA), never the other special ranges and never the host's own addresses
    allow_private_ranges: bool = False
    # interception rules from the RPC `create` (network.interception) and the SDK-owned Unix
    # socket their callbacks are asked over
    hook_rules: tuple[HookRule, ...] = ()
    callback_socket: str = ""

    def public_view(self) -> dict:
        """What may be stored (state DB) or shown (inspect): secrets without values."""
        return {
            "mode": self.mode,
            "allow_hosts": list(self.allow_hosts),
            "add_hosts": [f"{h}:{ip}" for h, ip in self.add_hosts],
            "secrets": [{"name": s.name, "hosts": list(s.hosts), "placeholder": s.placeholder}
                        for s in self.secrets],
            "dns_servers": list(self.dns_servers),
            "mtu": self.mtu,
            "allow_private": [str(e) for e in self.allow_private],
            "allow_private_ranges": self.allow_private_ranges,
            "hook_rules": [{"name": r.name, "phase": r.phase, "action": r.action,
                            "callback": bool(r.callback_id)} for r in self.hook_rules],
        }


class ConnectionHandler(Protocol):
    """Handles one guest TCP connection that the namespace listener accepted.

    dst_ip/dst_port: where the guest was trying to go (SO_ORIGINAL_DST). The handler
    decides (policy), dials upstream from the host namespace if allowed, relays, and
    closes `writer` when done. It must never raise for network errors.
    """

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     dst_ip: str, dst_port: int) -> None: ...


@dataclass(slots=True)
class NetEvent:
    """One line of the VM's network event log (blocked requests, secret use, errors)."""

    kind: str  # e.g. "blocked", "allowed", "secret_injected", "dns_blocked", "error"
    host: str = ""
    detail: str = ""
    fields: dict = field(default_factory=dict)


class EventSink(Protocol):
    def __call__(self, event: NetEvent) -> None: ...
