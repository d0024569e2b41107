"""The nftables ruleset of a VM's network namespace, as text for `nft -f -`. Pure.

The namespace holds only `lo` and the TAP, and has no route out. Every guest TCP
connection, to any address and port, is DNATed to the supervisor's relay listener on the
gateway address (the relay reads the original destination with SO_ORIGINAL_DST and
decides); guest DNS to any address goes to our resolver. Everything else — other UDP,
ICMP (ping to the gateway included), IPv6 — is dropped, and nothing is ever forwarded.
"""

from __future__ import annotations

import ipaddress

from matchlock.net.types import GATEWAY_IP, TAP_NAME

TABLE = "matchlock"
DNS_PORT = 53


def _check_port(port: int, what: str) -> None:
    if not (isinstance(port, int) and 0 < port < 65536):
        raise ValueError(f"{what} must be a TCP/UDP port (1-65535), got {port!r}")


def _check_ifname(name: str) -> None:
    if not name or len(name) > 15 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"bad interface name {name!r}")


def ruleset(relay_port: int, dns_port: int = DNS_PORT, *, tap: str = TAP_NAME,
            gateway: str = GATEWAY_IP) -> str:
    """The whole ruleset; applying it replaces any previous `inet matchlock` table."""
    _check_port(relay_port, "relay_port")
    _check_port(dns_port, "dns_port")
    _check_ifname(tap)
    gw = str(ipaddress.IPv4Address(gateway))
    return f"""\
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname "{tap}" meta nfproto ipv4 meta l4proto tcp dnat ip to {gw}:{relay_port}
\t\tiifname "{tap}" meta nfproto ipv4 udp dport 53 dnat ip to {gw}:{dns_port}
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy drop;
\t\tiifname "lo" accept
\t\tct state established,related accept
\t\tiifname "{tap}" ip daddr {gw} tcp dport {relay_port} accept
\t\tiifname "{tap}" ip daddr {gw} udp dport {dns_port} accept
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t}}
}}
"""
