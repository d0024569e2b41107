"""SQLite store of VMs. One short transaction per call; safe across processes."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from matchlock.paths import state_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    image TEXT NOT NULL DEFAULT '',
    config_json TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS vms_status ON vms(status);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class VmRecord:
    id: str
    pid: int
    status: str
    image: str
    config: dict
    created_at: str
    updated_at: str


class StateDB:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "state.db"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One connection used serially from the loop and its worker threads.
        self._db = sqlite3.connect(
            self.path, timeout=15, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def register(self, vm_id: str, pid: int, image: str, config: dict) -> None:
        now = _now()
        self._db.execute(
            "INSERT INTO vms(id, pid, status, image, config_json, created_at, updated_at)"
            " VALUES (?, ?, 'running', ?, ?, ?, ?)",
            (vm_id, pid, image, json.dumps(config), now, now),
        )

    def set_status(self, vm_id: str, status: str, pid: int = 0) -> None:
        self._db.execute(
            "UPDATE vms SET status = ?, pid = ?, updated_at = ? WHERE id = ?",
            (status, pid, _now(), vm_id),
        )

    def remove(self, vm_id: str) -> None:
        self._db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    def get(self, vm_id: str) -> VmRecord | None:
        row = self._db.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return self._record(row) if row else None

    def list(self) -> list[VmRecord]:
        """All VMs, newest first; a 'running' VM whose owner is dead is marked 'crashed'."""
        rows = self._db.execute("SELECT * FROM vms ORDER BY created_at DESC").fetchall()
        out = []
        for row in rows:
            rec = self._record(row)
            if rec.status == "running" and not pid_alive(rec.pid):
                self.set_status(rec.id, "crashed", rec.pid)
                rec = replace(rec, status="crashed")
            out.append(rec)
        return out

    @staticmethod
    def _record(row: tuple) -> VmRecord:
        vm_id, pid, status, image, config_json, created, updated = row
        return VmRecord(vm_id, pid, status, image, json.loads(config_json), created, updated)
