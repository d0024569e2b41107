"""Port-forward specs: `[LOCAL:]REMOTE` and listen addresses, parsed into typed values
with one-line errors. Pure: `run` parses them before any event loop exists."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from matchlock.errors import UsageError

DEFAULT_ADDRESS = "127.0.0.1"


class PortSpecError(UsageError):
    """A port-forward spec or listen address is malformed."""


@dataclass(frozen=True, slots=True)
class PortSpec:
    local: int  # host port; 0 = any free port (programmatic use only)
    remote: int  # guest port

    def __post_init__(self) -> None:
        if type(self.local) is not int or not 0 <= self.local <= 65535:
            raise PortSpecError(f"invalid local port {self.local!r}: use 1-65535")
        if type(self.remote) is not int or not 1 <= self.remote <= 65535:
            raise PortSpecError(f"invalid remote port {self.remote!r}: use 1-65535")


@dataclass(frozen=True, slots=True)
class Binding:
    address: str
    local_port: int
    remote_port: int


def _port(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    n = int(text)
    return n if 1 <= n <= 65535 else None


def parse_port_spec(text: str) -> PortSpec:
    """`[LOCAL:]REMOTE`, both in 1-65535; a single number forwards the same port."""
    parts = text.strip().split(":")
    ports = [_port(p) for p in parts]
    if len(parts) > 2 or None in ports:
        raise PortSpecError(
            f'invalid port-forward spec "{text}": use [LOCAL:]REMOTE with ports in 1-65535'
        )
    local, remote = (ports[0], ports[-1])
    assert local is not None and remote is not None
    return PortSpec(local, remote)


def parse_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """IP literals or `localhost` (= 127.0.0.1), de-duplicated in order; none = loopback."""
    out: list[str] = []
    for raw in addresses:
        text = raw.strip()
        if text.lower() == "localhost":
            addr = DEFAULT_ADDRESS
        else:
            try:
                addr = str(ipaddress.ip_address(text.strip("[]")))
            except ValueError:
                raise PortSpecError(
                    f'invalid listen address "{raw}": use an IP address or localhost'
                ) from None
        if addr not in out:
            out.append(addr)
    return tuple(out) or (DEFAULT_ADDRESS,)
