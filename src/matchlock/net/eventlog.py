"""The VM's network event log (`<vm dir>/logs/net.jsonl`), bounded against a hostile guest.

A guest decides how many events it causes (every blocked DNS query or connection is one), so
the log must not grow with it:

- Repeated events are rate-limited: per key (kind, host, detail class) the first
  `per_key` events of a window are written; the rest are counted and, when the window ends,
  written as one `suppressed` line per key (the biggest `max_summaries` keys; one line sums
  up the others).
- All written lines share a token bucket (`rate` lines/s, `burst` at once), so a guest that
  varies the host name (random DNS labels) still cannot flood it.
- By size the file rotates: net.jsonl -> net.jsonl.1 (... `.{backups}`), so the log never
  takes more than about (backups + 1) * max_bytes on disk.

Writes are one line-buffered write(2) per line, no fsync: cheap enough for the event loop.
The line format is unchanged: {"ts", "kind", "host", "detail", "fields"}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from matchlock.net.types import NetEvent

log = logging.getLogger(__name__)

WINDOW_S = 10.0
PER_KEY = 10  # events per key and window written in full
RATE = 20.0  # lines/s sustained, all keys together
BURST = 200  # lines at once
MAX_KEYS = 4096  # keys tracked per window (bounded memory); more share one counter
MAX_SUMMARIES = 20  # `suppressed` lines per window, the biggest keys first
MAX_BYTES = 4 << 20  # per file before it rotates
BACKUPS = 1  # rotated files kept: net.jsonl.1
MAX_LINE = 4096  # a longer line loses its fields (hosts and details are clipped before)
_CLIP = 512

_DIGITS = re.compile(r"\d+")

Key = tuple[str, str, str]
_OTHER: Key = ("", "", "")  # events whose key did not fit the table


def detail_class(detail: str) -> str:
    """What makes two details "the same" for rate limiting: numbers (ports, counts,
    addresses) do not count, and only the start matters."""
    return _DIGITS.sub("#", detail[:80])


class EventLog:
    def __init__(self, path: Path, *, window_s: float = WINDOW_S, per_key: int = PER_KEY,
                 rate: float = RATE, burst: int = BURST, max_keys: int = MAX_KEYS,
                 max_summaries: int = MAX_SUMMARIES, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS, label: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.window_s, self.per_key = window_s, per_key
        self.rate, self.burst = rate, burst
        self.max_keys, self.max_summaries = max_keys, max_summaries
        self.max_bytes, self.backups = max_bytes, backups
        self.label = label  # for the INFO log line (the VM id)
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()  # emit() may come from worker threads too
        self._file = None
        self._size = 0
        self._window_end = 0.0
        self._seen: dict[Key, int] = {}
        self._suppressed: dict[Key, int] = {}
        self._tokens = float(burst)
        self._refilled = clock()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.written = 0  # lines written (summaries included)
        self.dropped = 0  # events not written in full

    # -- public --------------------------------------------------------------------------

    def emit(self, event: NetEvent) -> None:
        now = self._clock()
        with self._lock:
            if self._closed:
                return
            self._roll(now)
            key: Key = (event.kind, event.host[:_CLIP], detail_class(event.detail))
            n = self._seen.get(key, 0)
            if n == 0 and len(self._seen) >= self.max_keys:
                key = _OTHER
            else:
                self._seen[key] = n + 1
            if key is not _OTHER and n < self.per_key and self._take(now):
                self._write_event(event)
                return
            self.dropped += 1
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
        self._arm_timer(now)

    def flush(self) -> None:
        """Write the pending `suppressed` lines if the window has ended."""
        with self._lock:
            self._timer = None
            if not self._closed:
                self._roll(self._clock())

    def close(self) -> None:
        """Write what is pending (the window is cut short) and close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._summarise()
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- rate limiting -------------------------------------------------------------------

    def _take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _roll(self, now: float) -> None:
        if now < self._window_end:
            return
        self._summarise()
        self._seen.clear()
        self._window_end = now + self.window_s

    def _summarise(self) -> None:
        if not self._suppressed:
            return
        items = sorted(self._suppressed.items(), key=lambda kv: -kv[1])
        self._suppressed = {}
        shown, rest = items[: self.max_summaries], items[self.max_summaries:]
        rest_count = sum(n for _, n in rest)
        for key, n in shown:
            if key is _OTHER:
                rest_count += n
                continue
            kind, host, dclass = key
            self._write_record("suppressed", host,
                               f"{n} more {kind} events like this were not logged",
                               {"event": kind, "count": n, "detail_class": dclass})
        if rest_count:
            self._write_record("suppressed", "",
                               f"{rest_count} more events of other kinds or hosts were not "
                               "logged", {"count": rest_count})

    def _arm_timer(self, now: float) -> None:
        # The window's `suppressed` lines are due when it ends, even if the guest goes quiet.
        if self._timer is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop in this thread: the next emit() or close() writes them
        self._timer = loop.call_later(max(0.0, self._window_end - now) + 0.001, self.flush)

    # -- writing -------------------------------------------------------------------------

    def _write_event(self, event: NetEvent) -> None:
        self._write_record(event.kind, event.host, event.detail, event.fields)

    def _write_record(self, kind: str, host: str, detail: str, fields: dict) -> None:
        rec = {"ts": round(self._wall(), 3), "kind": kind, "host": host[:_CLIP],
               "detail": detail[:_CLIP], "fields": fields}
        line = json.dumps(rec, separators=(",", ":"), default=str)
        if len(line) > MAX_LINE:
            rec["fields"] = {"truncated": True}
            line = json.dumps(rec, separators=(",", ":"), default=str)
        log.info("net %s: %s %s %s", self.label, kind, rec["host"], rec["detail"])
        data = (line + "\n").encode()
        try:
            if self._file is not None and self._size + len(data) > self.max_bytes:
                self._rotate()
            if self._file is None:
                self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115
                self._size = self._file.seek(0, os.SEEK_END)
            self._file.write(data)  # unbuffered: one write(2) per line, as before
            self._size += len(data)
            self.written += 1
        except OSError as e:
            log.debug("cannot write %s: %s", self.path, e)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.backups < 1:
            os.unlink(self.path)
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

