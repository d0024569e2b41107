"""The network event log stays bounded while a guest floods blocked DNS and HTTP.

The flood is bench/eventlog_flood.py's (python3 in the debian image: one thread of blocked
DNS for one name, one for ever-new names, three of blocked HTTP to an IP literal); the
guest counts its own attempts, which is what an unbounded log would have grown with.
"""

from __future__ import annotations

import pytest
from bench.eventlog_flood import run_flood

from matchlock.net import eventlog
from tests.conftest import ROOT
from tests.e2e.conftest import NO_RESIDUE, residue

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FLOOD_S = 12  # more than one rate-limit window, so one window's summaries are written


def test_flood_of_blocked_dns_and_http_keeps_the_log_bounded(debian_image, ml_env,
                                                             state_home):
    r = run_flood(ROOT / "src", FLOOD_S, state_home, ml_env)
    events, attempts = r["events"], r["guest_attempts"]
    diag = f"{r['kinds']} attempts {attempts} bytes {r['bytes']}"
    # The flood was real: thousands of blocked attempts, far beyond what is written.
    assert attempts["dns_same"] > 300 and attempts["dns_new"] > 300, diag
    assert attempts["http"] > 300, diag

    # Positive controls: each kind of blocked attempt is in the log, in full, first.
    full = [e for e in events if e["kind"] != "suppressed"]
    dns_same = [e for e in full if e["kind"] == "dns_blocked" and e["host"] == "evil.test"]
    dns_new = [e for e in full if e["kind"] == "dns_blocked" and e["host"] != "evil.test"]
    http = [e for e in full if e["kind"] == "blocked" and e["host"].startswith("203.0.113.7")]
    assert dns_same and dns_new and http, diag
    assert len(dns_same) <= eventlog.PER_KEY * 2 and len(http) <= eventlog.PER_KEY * 2, diag

    # The rest is counted, not lost: per key (the repeated ones) and all together.
    summaries = [e for e in events if e["kind"] == "suppressed"]
    by_event = {(e["fields"].get("event"), e["host"]): e["fields"]["count"] for e in summaries}
    assert by_event.get(("dns_blocked", "evil.test"), 0) > 100, summaries
    assert any(ev == "blocked" and n > 100 for (ev, _), n in by_event.items()), summaries
    seen = len(full) + r["suppressed_count"]
    caused = attempts["dns_same"] + attempts["dns_new"] + attempts["http"]
    assert seen <= caused * 2 + 100 and seen > caused // 4, diag  # DNS over its rate: no event

    # The bound: the global budget, not the guest, decides how much is written.
    max_lines = eventlog.BURST + eventlog.RATE * (FLOOD_S + 60) + 4 * (eventlog.MAX_SUMMARIES + 1)
    assert len(events) <= max_lines, diag
    assert r["bytes"] <= 600 * max_lines, diag
    assert r["bytes"] * 5 < seen * 150, diag  # less than a fifth of the unbounded log
    assert residue(state_home) == NO_RESIDUE
