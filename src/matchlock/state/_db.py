"""SQLite store of VMs: rows, lifecycle history and recorded resources.

Safe across processes: WAL, one short `BEGIN IMMEDIATE` transaction per write (a
transition is checked against the table and written in the same transaction), plain reads
that never write. `sqlite3.Error` never leaves this module: it becomes `StateError`.

Tables
    vms           one row per VM: status, owner (pid + start time), image, summary, config
                  (public view only: secret values never reach this file)
    vm_history    every status change with its time, owner pid and detail
    vm_resources  what the VM took, recorded before it was taken, in order, and whether
                  (and how) it was released; `gc` re-runs what is left
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matchlock._proc import ProcessId
from matchlock.errors import MatchlockError, VmNotFound
from matchlock.paths import state_dir
from matchlock.state._lifecycle import Status, check_transition, effective_status

SCHEMA_VERSION = 2
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
CREATE TABLE IF NOT EXISTS vm_history (
    vm_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    at TEXT NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (vm_id, seq)
);
CREATE TABLE IF NOT EXISTS vm_resources (
    vm_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    value_json TEXT NOT NULL DEFAULT '{}',
    taken_at TEXT NOT NULL,
    released_at TEXT,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (vm_id, kind)
);
"""
# Columns added to `vms` after version 1 (a state.db from an older matchlock gets them).
_VM_COLUMNS = {
    "pid_start": "TEXT NOT NULL DEFAULT ''",
    "cpus": "REAL NOT NULL DEFAULT 0",
    "memory_mib": "INTEGER NOT NULL DEFAULT 0",
    "ports_json": "TEXT NOT NULL DEFAULT '[]'",
    "last_error": "TEXT NOT NULL DEFAULT ''",
}
_VM_FIELDS = ("id, pid, pid_start, status, image, cpus, memory_mib, ports_json, config_json, "
              "last_error, created_at, updated_at")
BUSY_TIMEOUT_S = 15


class StateError(MatchlockError):
    """The state database could not be read or written."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class VmRecord:
    id: str
    pid: int
    pid_start: str
    stored_status: str  # as written; `status` also knows whether the owner still lives
    image: str
    cpus: float
    memory_mib: int
    ports: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    last_error: str = ""
    created_at: str = ""
    updated_at: str = ""
    owner_alive: bool = False

    @property
    def status(self) -> str:
        return effective_status(self.stored_status, self.owner_alive)

    @property
    def owner(self) -> ProcessId | None:
        return ProcessId(self.pid, self.pid_start) if self.pid else None

    @property
    def running(self) -> bool:
        return self.status == Status.RUNNING

    def public(self) -> dict[str, Any]:
        """The JSON `get` prints."""
        return {
            "id": self.id, "status": self.status,
            "pid": self.pid if self.owner_alive else 0,
            "image": self.image, "created_at": self.created_at,
            "updated_at": self.updated_at, "cpus": self.cpus, "memory_mb": self.memory_mib,
            "ports": self.ports, "last_error": self.last_error, "config": self.config,
        }


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    seq: int
    status: str
    at: str
    pid: int
    detail: str


@dataclass(frozen=True, slots=True)
class Resource:
    seq: int
    kind: str
    value: dict
    taken_at: str
    released_at: str | None
    error: str

    @property
    def released(self) -> bool:
        return self.released_at is not None


class StateDB:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "state.db"
        self._lock = threading.Lock()  # one connection, used serially from loop and threads
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
            self._init_schema()
        except (sqlite3.Error, OSError) as e:
            raise StateError(f"cannot open the state database {self.path}: {e}") from None

    def _init_schema(self) -> None:
        # Two first-time processes must not race on journal mode and schema changes.
        with open(self.path.with_name(self.path.name + ".init.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return
            self._db.execute("BEGIN IMMEDIATE")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(vms)")}
            for name, decl in _VM_COLUMNS.items():
                if name not in cols:
                    self._db.execute(f"ALTER TABLE vms ADD COLUMN {name} {decl}")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StateError(f"state database error: {e}") from None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several SELECTs; takes no write lock."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    yield self._db
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StateError(f"state database error: {e}") from None

    # -- writes -------------------------------------------------------------------------

    def create(self, vm_id: str, *, image: str, config: dict, owner: ProcessId,
               cpus: float = 0, memory_mib: int = 0, ports: list | None = None) -> bool:
        """Register a VM in `creating`; False if the id is taken (pick another)."""
        now = _now()
        try:
            with self._tx() as db:
                db.execute(
                    f"INSERT INTO vms({_VM_FIELDS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (vm_id, owner.pid, owner.start, Status.CREATING.value, image, cpus,
                     memory_mib, json.dumps(ports or []), json.dumps(config), "", now, now))
                self._history(db, vm_id, Status.CREATING.value, owner.pid, "", now)
        except StateError as e:
            if "UNIQUE" in str(e):
                return False
            raise
        return True

    def transition(self, vm_id: str, to: str, *, owner: ProcessId | None = None,
                   detail: str = "", error: str | None = None) -> None:
        """Check `current -> to` against the lifecycle table and write it, atomically.
        `owner` hands the VM to another process (e.g. `gc` while it reclaims)."""
        now = _now()
        with self._tx() as db:
            row = db.execute("SELECT status, pid, pid_start FROM vms WHERE id = ?",
                             (vm_id,)).fetchone()
            if row is None:
                raise VmNotFound(vm_id)
            check_transition(vm_id, row[0], to)
            pid, start = (owner.pid, owner.start) if owner else (row[1], row[2])
            db.execute(
                "UPDATE vms SET status = ?, pid = ?, pid_start = ?, updated_at = ?,"
                " last_error = COALESCE(?, last_error) WHERE id = ?",
                (to, pid, start, now, error, vm_id))
            self._history(db, vm_id, to, pid, detail or (error or ""), now)

    @staticmethod
    def _history(db: sqlite3.Connection, vm_id: str, status: str, pid: int, detail: str,
                 now: str) -> None:
        db.execute(
            "INSERT INTO vm_history(vm_id, seq, status, at, pid, detail) VALUES (?, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_history WHERE vm_id = ?), ?, ?, ?, ?)",
            (vm_id, vm_id, status, now, pid, detail))

    def take(self, vm_id: str, kind: str, value: dict | None = None) -> None:
        """Record a resource *before* taking it (again: update its value, keep its place)."""
        now = _now()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE vm_resources SET value_json = ?, released_at = NULL, error = ''"
                " WHERE vm_id = ? AND kind = ?", (json.dumps(value or {}), vm_id, kind))
            if cur.rowcount == 0:
                db.execute(
                    "INSERT INTO vm_resources(vm_id, seq, kind, value_json, taken_at) VALUES"
                    " (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_resources WHERE vm_id = ?),"
                    " ?, ?, ?)", (vm_id, vm_id, kind, json.dumps(value or {}), now))

    def released(self, vm_id: str, kind: str, error: str = "") -> None:
        """Mark a resource released (`error` empty), or record why releasing it failed."""
        with self._tx() as db:
            db.execute(
                "UPDATE vm_resources SET released_at = ?, error = ? WHERE vm_id = ? AND kind = ?",
                (None if error else _now(), error, vm_id, kind))

    def set_ports(self, vm_id: str, ports: list) -> None:
        with self._tx() as db:
            db.execute("UPDATE vms SET ports_json = ?, updated_at = ? WHERE id = ?",
                       (json.dumps(ports), _now(), vm_id))

    def delete(self, vm_id: str) -> None:
        """Forget the VM: its row, history and resource records."""
        with self._tx() as db:
            for table, col in (("vms", "id"), ("vm_history", "vm_id"),
                               ("vm_resources", "vm_id")):
                db.execute(f"DELETE FROM {table} WHERE {col} = ?", (vm_id,))

    # -- reads --------------------------------------------------------------------------

    def get(self, vm_id: str) -> VmRecord | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_VM_FIELDS} FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return self._record(row) if row else None

    def require(self, vm_id: str) -> VmRecord:
        rec = self.get(vm_id)
        if rec is None:
            raise VmNotFound(vm_id)
        return rec

    def list(self) -> list[VmRecord]:
        """All VMs, newest first. Reads only: a dead owner shows as `crashed` here, and it
        is `gc` that writes it down."""
        with self._read() as db:
            rows = db.execute(f"SELECT {_VM_FIELDS} FROM vms ORDER BY created_at DESC").fetchall()
        return [self._record(r) for r in rows]

    def history(self, vm_id: str) -> list[HistoryEntry]:
        with self._read() as db:
            rows = db.execute("SELECT seq, status, at, pid, detail FROM vm_history"
                              " WHERE vm_id = ? ORDER BY seq", (vm_id,)).fetchall()
        return [HistoryEntry(*r) for r in rows]

    def resources(self, vm_id: str) -> list[Resource]:
        with self._read() as db:
            rows = db.execute("SELECT seq, kind, value_json, taken_at, released_at, error"
                              " FROM vm_resources WHERE vm_id = ? ORDER BY seq",
                              (vm_id,)).fetchall()
        return [Resource(s, k, json.loads(v), t, r, e) for s, k, v, t, r, e in rows]

    def ids(self) -> set[str]:
        with self._read() as db:
            return {r[0] for r in db.execute("SELECT id FROM vms")}

    @staticmethod
    def _record(row: tuple) -> VmRecord:
        (vm_id, pid, pid_start, status, image, cpus, memory, ports, config, last_error,
         created, updated) = row
        alive = bool(pid) and ProcessId(pid, pid_start).alive()
        return VmRecord(vm_id, pid, pid_start, status, image, cpus, memory, json.loads(ports),
                        json.loads(config), last_error, created, updated, alive)
