"""State DB and lifecycle table: transitions, history, resources, reads that never write,
and several processes at once (real SQLite files)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from matchlock._proc import ProcessId
from matchlock.errors import VmNotFound
from matchlock.state import (
    ACTIVE,
    TRANSITIONS,
    InvalidTransition,
    StateDB,
    Status,
    check_transition,
    effective_status,
)


def test_transition_table_is_closed_and_total():
    assert set(TRANSITIONS) == set(Status)
    for frm, tos in TRANSITIONS.items():
        for to in Status:
            if to in tos:
                check_transition("vm-x", frm, to)
            else:
                with pytest.raises(InvalidTransition):
                    check_transition("vm-x", frm, to)
    with pytest.raises(InvalidTransition):
        check_transition("vm-x", "bogus", "running")
    # Every active state can crash; nothing leaves `stopped`.
    assert all(Status.CRASHED in TRANSITIONS[s] for s in ACTIVE)
    assert TRANSITIONS[Status.STOPPED] == frozenset()


def test_effective_status():
    assert effective_status("running", owner_alive=False) == "crashed"
    assert effective_status("stopping", owner_alive=False) == "crashed"
    assert effective_status("running", owner_alive=True) == "running"
    assert effective_status("stopped", owner_alive=False) == "stopped"


@pytest.fixture
def db(tmp_path):
    d = StateDB(tmp_path / "state.db")
    yield d
    d.close()


def _dead_owner() -> ProcessId:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    me = ProcessId.of(p.pid)
    p.wait()
    assert me is not None and not me.alive()
    return me


def test_lifecycle_history_and_owner(db):
    me = ProcessId.current()
    assert db.create("vm-1", image="img", config={"a": 1}, owner=me, cpus=2, memory_mib=300)
    assert not db.create("vm-1", image="img", config={}, owner=me)  # the id is taken
    for s in ("starting", "running", "stopping", "stopped"):
        db.transition("vm-1", s, detail=f"to {s}")
    with pytest.raises(InvalidTransition):
        db.transition("vm-1", "running")
    rec = db.require("vm-1")
    assert (rec.status, rec.cpus, rec.memory_mib, rec.config) == ("stopped", 2, 300, {"a": 1})
    hist = db.history("vm-1")
    assert [h.status for h in hist] == ["creating", "starting", "running", "stopping",
                                        "stopped"]
    assert [h.seq for h in hist] == [1, 2, 3, 4, 5]
    assert all(h.pid == me.pid and h.at for h in hist)
    with pytest.raises(VmNotFound):
        db.transition("vm-none", "running")
    with pytest.raises(VmNotFound):
        db.require("vm-none")


def test_dead_owner_reads_as_crashed_without_any_write(db):
    assert db.create("vm-2", image="img", config={}, owner=_dead_owner())
    db.transition("vm-2", "starting")
    db.transition("vm-2", "running")
    before = db._db.total_changes
    recs = db.list()
    one = db.get("vm-2")
    assert db._db.total_changes == before  # list() and get() wrote nothing
    assert recs[0].status == one.status == "crashed"
    assert recs[0].stored_status == "running"
    assert not recs[0].owner_alive


def test_pid_reuse_is_not_liveness():
    me = ProcessId.current()
    assert me.alive()
    assert not ProcessId(me.pid, str(int(me.start) + 1)).alive()
    assert not ProcessId(me.pid, "").alive()


def test_resources_keep_their_order_and_release_state(db):
    db.create("vm-3", image="img", config={}, owner=ProcessId.current())
    db.take("vm-3", "vm_dir", {"path": "/x"})
    db.take("vm-3", "qemu", {"marker": "/x"})
    db.take("vm-3", "netns", {"name": "ml-3"})
    db.take("vm-3", "qemu", {"marker": "/x", "pid": 5})  # updated in place
    res = db.resources("vm-3")
    assert [(r.kind, r.seq) for r in res] == [("vm_dir", 1), ("qemu", 2), ("netns", 3)]
    assert res[1].value == {"marker": "/x", "pid": 5}
    db.released("vm-3", "qemu")
    db.released("vm-3", "netns", "EBUSY")
    res = {r.kind: r for r in db.resources("vm-3")}
    assert res["qemu"].released and not res["netns"].released
    assert res["netns"].error == "EBUSY"
    db.delete("vm-3")
    assert db.get("vm-3") is None and db.resources("vm-3") == [] and db.history("vm-3") == []


def _create_many(path: str, prefix: str, n: int) -> None:
    d = StateDB(Path(path))
    me = ProcessId.current()
    for i in range(n):
        assert d.create(f"vm-{prefix}{i:04d}", image="img", config={}, owner=me)
        d.take(f"vm-{prefix}{i:04d}", "vm_dir", {"path": "/x"})
        d.transition(f"vm-{prefix}{i:04d}", "starting")
        d.list()


def test_concurrent_processes(tmp_path):
    path = tmp_path / "state.db"  # created by the first writer, schema under a file lock
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_create_many, args=(str(path), p, 40)) for p in "abcd"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    d = StateDB(path)
    recs = d.list()
    assert len(recs) == 160
    assert all(len(d.history(r.id)) == 2 for r in recs[:10])


def test_old_schema_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "state.db"
    con = sqlite3.connect(path)
    con.executescript("""CREATE TABLE vms (id TEXT PRIMARY KEY, pid INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL, image TEXT NOT NULL DEFAULT '', config_json TEXT NOT NULL
        DEFAULT '{}', created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
        INSERT INTO vms VALUES ('vm-old', 0, 'stopped', 'img', '{}', 't', 't');""")
    con.close()
    d = StateDB(path)
    rec = d.require("vm-old")
    assert (rec.status, rec.ports, rec.pid_start) == ("stopped", [], "")
