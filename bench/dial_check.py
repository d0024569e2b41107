"""Dial-time address check: what it costs per new connection.

    python3 bench/dial_check.py [--n 20000] [--rounds 7]

Measured in this run, per call (median of rounds):
- baseline: a bare `ipaddress.ip_address` parse, the least any address check does;
- the classifier alone (special-purpose ranges, embedded IPv4), as the check calls it;
- the kernel view alone (drain the idle netlink socket, look up);
- the whole `Policy.ip_allowed(ip, port)` for a public IPv4 address (every rule runs),
  for an IPv4-mapped IPv6 form (two kernel lookups), for a blocked special-range address
  with 16 exceptions to scan, and for a host-local address (a refusal also builds its
  one-line reason);
- for scale: one TCP connect+close to a listener on 127.0.0.1.
The budget is 50 µs per new connection. Only the host's own network namespace is read.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matchlock.net.addrs import classify_value  # noqa: E402
from matchlock.net.config import parse_private_exceptions  # noqa: E402
from matchlock.net.hostaddrs import KernelHostAddresses  # noqa: E402
from matchlock.net.policy import Policy  # noqa: E402
from matchlock.net.types import NetworkConfig  # noqa: E402

BUDGET_US = 50.0


def per_call_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        results.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()

    view = KernelHostAddresses()
    policy = Policy(NetworkConfig(mode="open"))
    many = Policy(NetworkConfig(mode="open", allow_private=parse_private_exceptions(
        [f"10.{i}.0.0/16:{1000 + i}" for i in range(12)]
        + ["db.internal", "cache.internal:6379", "[fd00::/8]:443", "100.64.0.1"])))
    public, mapped = "93.184.216.34", "::ffff:93.184.216.34"
    value = int(ipaddress.ip_address(public))
    assert policy.ip_allowed(public, 443) and policy.ip_allowed(mapped, 443)
    assert not many.ip_allowed("198.18.0.5", 80) and not policy.ip_allowed("127.0.0.1", 80)

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    target = srv.getsockname()

    def connect() -> None:
        c = socket.create_connection(target)
        c.close()
        srv.accept()[0].close()

    cases: list[tuple[str, Callable[[], object], int]] = [
        ("baseline: ipaddress.ip_address(ip)", lambda: ipaddress.ip_address(public), a.n),
        ("classify_value(4, value)", lambda: classify_value(4, value), a.n),
        ("kernel view local_value(4, value)", lambda: view.local_value(4, value), a.n),
        ("Policy.ip_allowed, public IPv4", lambda: policy.ip_allowed(public, 443), a.n),
        ("Policy.ip_allowed, IPv4-mapped IPv6", lambda: policy.ip_allowed(mapped, 443), a.n),
        ("Policy.ip_allowed, blocked, 16 exceptions",
         lambda: many.ip_allowed("198.18.0.5", 80), a.n),
        ("Policy.ip_allowed, host-local 127.0.0.1", lambda: policy.ip_allowed("127.0.0.1", 80),
         a.n),
        ("for scale: TCP connect+accept on loopback", connect, max(1, a.n // 20)),
    ]
    base = None
    worst = 0.0
    print(f"{'case':46} {'µs/call':>9} {'× baseline':>11}")
    for name, fn, n in cases:
        us = per_call_us(fn, n, a.rounds)
        base = base if base is not None else us
        if name.startswith("Policy."):
            worst = max(worst, us)
        print(f"{name:46} {us:9.2f} {us / base:11.1f}")
    srv.close()
    view.close()
    policy.close()
    many.close()
    verdict = "within" if worst < BUDGET_US else "OVER"
    print(f"dial-time check: worst {worst:.1f} µs per new connection "
          f"({worst / base:.1f}× the baseline parse), {verdict} the {BUDGET_US:.0f} µs budget")
    return 0 if worst < BUDGET_US else 1


if __name__ == "__main__":
    raise SystemExit(main())
