"""The namespace's nftables ruleset text (pure; applied for real in tests/e2e/test_network.py)."""

from __future__ import annotations

import pytest

from matchlock.net.nft import ruleset
from matchlock.net.types import GATEWAY_IP, TAP_NAME


def _chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"chain {name} {{")
    body = []
    for line in lines[start + 1:]:
        if line.strip() == "}":
            break
        body.append(line.strip())
    return body


def test_all_tcp_goes_to_the_relay_and_dns_to_the_resolver():
    text = ruleset(41234)
    pre = _chain(text, "prerouting")
    assert pre[0] == "type nat hook prerouting priority dstnat; policy accept;"
    # Every TCP connection, whatever its destination address or port: no daddr/dport match.
    assert pre[1] == (f'iifname "{TAP_NAME}" meta nfproto ipv4 meta l4proto tcp '
                      f"dnat ip to {GATEWAY_IP}:41234")
    assert pre[2] == (f'iifname "{TAP_NAME}" meta nfproto ipv4 udp dport 53 '
                      f"dnat ip to {GATEWAY_IP}:53")
    assert len(pre) == 3


def test_input_accepts_only_the_relay_and_dns():
    inp = _chain(ruleset(41234), "input")
    assert inp == [
        "type filter hook input priority filter; policy drop;",
        'iifname "lo" accept',
        "ct state established,related accept",
        f'iifname "{TAP_NAME}" ip daddr {GATEWAY_IP} tcp dport 41234 accept',
        f'iifname "{TAP_NAME}" ip daddr {GATEWAY_IP} udp dport 53 accept',
    ]


def test_nothing_is_forwarded():
    assert _chain(ruleset(1), "forward") == [
        "type filter hook forward priority filter; policy drop;"]


def test_reapplying_replaces_the_table():
    text = ruleset(5000, 5353, tap="tap9", gateway="10.9.0.1")
    assert text.startswith("table inet matchlock\ndelete table inet matchlock\n")
    assert "dnat ip to 10.9.0.1:5353" in text
    assert 'iifname "tap9" ip daddr 10.9.0.1 udp dport 5353 accept' in text
    assert text.count("table inet matchlock {") == 1


@pytest.mark.parametrize("kwargs", [
    {"relay_port": 0}, {"relay_port": 65536}, {"relay_port": "80"},
    {"relay_port": 80, "dns_port": 0},
    {"relay_port": 80, "tap": 'x" accept; #'}, {"relay_port": 80, "tap": "a" * 16},
    {"relay_port": 80, "gateway": "1.2.3.4; flush ruleset"},
    {"relay_port": 80, "gateway": "::1"},
])
def test_bad_input_is_refused(kwargs):
    with pytest.raises(ValueError):
        ruleset(**kwargs)
