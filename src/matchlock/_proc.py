"""Process identity that survives PID reuse: a PID plus its kernel start time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None if there is no such
    process. Two processes with the same PID never share it."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has finished already
        return None
    return fields[19]


@dataclass(frozen=True, slots=True)
class ProcessId:
    pid: int
    start: str

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(pid, start_time(pid) or "")

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        st = start_time(pid)
        return cls(pid, st) if st is not None else None

    def alive(self) -> bool:
        """The very process this names is still running (not a later one with its PID)."""
        return bool(self.start) and start_time(self.pid) == self.start


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]
