"""The bounded network event log: rate limits, suppressed counters, rotation, cost."""

from __future__ import annotations

import asyncio
import json
import time

from matchlock.net.eventlog import EventLog, detail_class
from matchlock.net.types import NetEvent


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def make(tmp_path, **kw):
    clock = Clock()
    kw.setdefault("rate", 1e9)
    kw.setdefault("burst", 10**9)
    return EventLog(tmp_path / "net.jsonl", clock=clock, wall=lambda: 1.5, **kw), clock


def test_line_format_is_unchanged(tmp_path):
    ev, _ = make(tmp_path)
    ev.emit(NetEvent("blocked", "a.test", "not allowed", {"port": 443}))
    ev.close()
    assert lines(tmp_path / "net.jsonl") == [
        {"ts": 1.5, "kind": "blocked", "host": "a.test", "detail": "not allowed",
         "fields": {"port": 443}}]


def test_repeats_are_counted_and_summarised_when_the_window_ends(tmp_path):
    ev, clock = make(tmp_path, per_key=3, window_s=10)
    for i in range(1000):
        ev.emit(NetEvent("dns_blocked", "evil.test", f"query {i} not allowed"))
    ev.emit(NetEvent("dns_blocked", "other.test", "not allowed"))  # another key: in full
    got = lines(tmp_path / "net.jsonl")
    assert [e["host"] for e in got] == ["evil.test"] * 3 + ["other.test"]
    clock.t += 10  # the window ends; the next event writes the summary first
    ev.emit(NetEvent("dns_blocked", "evil.test", "query 5 not allowed"))
    got = lines(tmp_path / "net.jsonl")
    summary = got[4]
    assert summary["kind"] == "suppressed" and summary["host"] == "evil.test"
    assert summary["fields"] == {"event": "dns_blocked", "count": 997,
                                 "detail_class": "query # not allowed"}
    assert got[5]["kind"] == "dns_blocked"  # a new window: logged in full again
    assert ev.dropped == 997 and ev.written == 6


def test_close_writes_pending_summaries(tmp_path):
    ev, _ = make(tmp_path, per_key=1)
    for _ in range(5):
        ev.emit(NetEvent("blocked", "x.test", "no"))
    ev.close()
    ev.close()
    ev.emit(NetEvent("blocked", "x.test", "no"))  # after close: ignored
    got = lines(tmp_path / "net.jsonl")
    assert [e["kind"] for e in got] == ["blocked", "suppressed"]
    assert got[1]["fields"]["count"] == 4


def test_varying_hosts_hit_the_global_budget(tmp_path):
    # Random DNS labels make every key new: the token bucket still bounds the lines.
    ev, clock = make(tmp_path, rate=5, burst=20, window_s=10, max_summaries=3)
    for i in range(10_000):
        ev.emit(NetEvent("dns_blocked", f"r{i}.evil.test", "not allowed"))
        clock.t += 0.001  # 10 s of flood at 1000 events/s
    ev.close()
    got = lines(tmp_path / "net.jsonl")
    full = [e for e in got if e["kind"] == "dns_blocked"]
    summaries = [e for e in got if e["kind"] == "suppressed"]
    assert 20 <= len(full) <= 20 + 5 * 10 + 1
    assert len(summaries) <= 4  # three biggest keys + one for the rest
    assert sum(e["fields"]["count"] for e in summaries) == 10_000 - len(full)


def test_key_table_is_bounded(tmp_path):
    ev, _ = make(tmp_path, max_keys=100, per_key=1)
    for i in range(5000):
        ev.emit(NetEvent("dns_blocked", f"r{i}.test", "x"))
    assert len(ev._seen) == 100
    ev.close()
    got = lines(tmp_path / "net.jsonl")
    assert len([e for e in got if e["kind"] == "dns_blocked"]) == 100
    assert got[-1]["kind"] == "suppressed" and got[-1]["fields"]["count"] == 4900


def test_rotation_bounds_the_total_size(tmp_path):
    ev, _ = make(tmp_path, per_key=10**9, max_bytes=10_000, backups=2)
    for i in range(5000):
        ev.emit(NetEvent("blocked", "h.test", "x" * 50, {"i": i}))
    ev.close()
    files = sorted(tmp_path.glob("net.jsonl*"))
    assert [f.name for f in files] == ["net.jsonl", "net.jsonl.1", "net.jsonl.2"]
    assert all(f.stat().st_size <= 10_000 for f in files)
    # What is kept is the newest, in order, with no torn lines.
    kept = lines(files[2]) + lines(files[1]) + lines(files[0])
    idx = [e["fields"]["i"] for e in kept]
    assert idx == list(range(idx[0], 5000)) and len(idx) > 150


def test_long_lines_are_clipped(tmp_path):
    ev, _ = make(tmp_path)
    ev.emit(NetEvent("blocked", "h" * 5000, "d" * 5000, {"big": "x" * 10_000}))
    ev.close()
    (e,) = lines(tmp_path / "net.jsonl")
    assert len(e["host"]) == 512 and len(e["detail"]) == 512
    assert e["fields"] == {"truncated": True}


def test_detail_class_ignores_numbers():
    assert detail_class("relay failed: 10.0.0.1:443") == detail_class("relay failed: 1.2.3.4:8")
    assert detail_class("a") != detail_class("b")


def test_summary_is_written_by_a_timer_when_the_guest_goes_quiet(tmp_path):
    async def main():
        ev = EventLog(tmp_path / "net.jsonl", per_key=1, window_s=0.2)
        for _ in range(50):
            ev.emit(NetEvent("blocked", "q.test", "no"))
        assert [e["kind"] for e in lines(tmp_path / "net.jsonl")] == ["blocked"]
        for _ in range(100):  # no more events: the timer alone must write the summary
            await asyncio.sleep(0.02)
            if len(lines(tmp_path / "net.jsonl")) == 2:
                break
        got = lines(tmp_path / "net.jsonl")
        ev.close()
        return got

    got = asyncio.run(main())
    assert [e["kind"] for e in got] == ["blocked", "suppressed"]
    assert got[1]["fields"]["count"] == 49


def test_emit_is_cheap(tmp_path):
    # The event loop pays this per guest event; both paths must stay in microseconds.
    ev = EventLog(tmp_path / "net.jsonl")
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        ev.emit(NetEvent("dns_blocked", "same.test", "not allowed"))  # suppressed path
    suppressed = (time.perf_counter() - t0) / n
    ev.close()
    ev = EventLog(tmp_path / "net2.jsonl", per_key=10**9, rate=1e9, burst=10**9)
    t0 = time.perf_counter()
    for i in range(n):
        ev.emit(NetEvent("blocked", "h.test", "not allowed", {"i": i}))  # written path
    written = (time.perf_counter() - t0) / n
    ev.close()
    print(f"emit: suppressed {suppressed * 1e6:.1f} us, written {written * 1e6:.1f} us")
    assert suppressed < 50e-6 and written < 200e-6
