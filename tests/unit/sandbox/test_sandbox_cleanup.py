"""Recorded cleanup: newest first, idempotent, failures kept for the next run, and never
a signal to a process that only shares a PID with what was recorded."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from matchlock._proc import ProcessId
from matchlock.errors import VmRunning
from matchlock.sandbox import _cleanup as cleanup
from matchlock.state import StateDB


@pytest.fixture
def db(tmp_path):
    d = StateDB(tmp_path / "state.db")
    yield d
    d.close()


def _fake_qemu(marker: str) -> subprocess.Popen:
    # argv[0] named like QEMU, with the VM directory in its argv: what gc looks for.
    return subprocess.Popen(["bash", "-c", "exec -a qemu-system-x86_64 \"$0\" -c "
                             "'import time; time.sleep(300)' \"$1\"", sys.executable, marker])


def _wait_gone(p: subprocess.Popen) -> int:
    return p.wait(5)


def test_release_newest_first_and_rerun(db, tmp_path):
    vm_dir = tmp_path / "vm-1"
    (vm_dir / "logs").mkdir(parents=True)
    disk = vm_dir / "upper.ext4"
    disk.write_bytes(b"x")
    sock = vm_dir / "control.sock"
    sock.write_bytes(b"")
    owner = ProcessId.current()
    db.create("vm-1", image="i", config={}, owner=owner)
    db.take("vm-1", cleanup.VM_DIR, {"path": str(vm_dir)})
    db.take("vm-1", cleanup.CONTROL_SOCKET, {"path": str(sock)})
    db.take("vm-1", cleanup.UPPER_DISK, {"path": str(disk)})
    db.take("vm-1", "mystery", {})  # an unknown kind fails and stays pending
    order = [r.kind for r in cleanup.pending(db.resources("vm-1"), include_dir=True)]
    assert order == ["mystery", cleanup.UPPER_DISK, cleanup.CONTROL_SOCKET, cleanup.VM_DIR]
    res = cleanup.release_recorded(db, "vm-1", include_dir=False)
    assert [(r.kind, bool(r.error)) for r in res] == [
        ("mystery", True), (cleanup.UPPER_DISK, False), (cleanup.CONTROL_SOCKET, False)]
    assert not disk.exists() and not sock.exists() and vm_dir.exists()
    # Run again: only what failed is tried again.
    res = cleanup.release_recorded(db, "vm-1", include_dir=False)
    assert [r.kind for r in res] == ["mystery"]
    res = cleanup.release_recorded(db, "vm-1", include_dir=True)
    assert [r.kind for r in res] == ["mystery", cleanup.VM_DIR]
    assert not vm_dir.exists()


def test_kill_qemu_by_record_and_by_marker(tmp_path):
    marker = str(tmp_path / "vm-abcdef01")
    a = _fake_qemu(marker)
    b = _fake_qemu(marker)
    time.sleep(0.2)
    pa = ProcessId.of(a.pid)
    assert pa is not None
    cleanup.kill_qemu({"pid": a.pid, "start": pa.start, "marker": marker})
    assert _wait_gone(a) == -9 and _wait_gone(b) == -9  # b: found by its argv


def test_kill_qemu_never_signals_a_reused_pid(tmp_path):
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        time.sleep(0.1)
        me = ProcessId.of(bystander.pid)
        assert me is not None
        stale = str(int(me.start) - 1)  # same PID, another process's start time
        cleanup.kill_qemu({"pid": bystander.pid, "start": stale,
                           "marker": str(tmp_path / "vm-none")})
        time.sleep(0.1)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_reclaim_refuses_a_live_owner_and_finishes_a_dead_one(db, tmp_path):
    vm_dir = tmp_path / "vm-2"
    vm_dir.mkdir()
    db.create("vm-2", image="i", config={}, owner=ProcessId.current())
    db.take("vm-2", cleanup.VM_DIR, {"path": str(vm_dir)})
    db.transition("vm-2", "starting")
    with pytest.raises(VmRunning):
        cleanup.reclaim(db, db.require("vm-2"), remove=True)
    # Hand it to a process that is gone: now it is crashed, and reclaimable.
    p = subprocess.Popen(["true"])
    dead = ProcessId.of(p.pid) or ProcessId(p.pid, "1")
    p.wait()
    db.transition("vm-2", "running", owner=dead)
    rec = db.require("vm-2")
    assert rec.status == "crashed"
    cleanup.reclaim(db, rec, remove=True)
    assert db.get("vm-2") is None and not vm_dir.exists()


def test_orphans_finds_unrecorded_dirs_and_qemu(db, tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHLOCK_HOME", str(tmp_path))
    # Namespaces are machine-wide: another run's leftovers are not this test's to remove
    # (their gc is e2e: test_network's killed-supervisor test).
    import matchlock.net.netns as netns

    monkeypatch.setattr(netns, "leftover_namespaces", lambda: [])
    vms = tmp_path / "vms"
    (vms / "vm-0000dead").mkdir(parents=True)
    (vms / "vm-0000live").mkdir()
    db.create("vm-0000live", image="i", config={}, owner=ProcessId.current())
    q = _fake_qemu(str(vms / "vm-0000dead" / "logs" / "vm.log"))
    try:
        time.sleep(0.2)
        found = cleanup.orphans(db)
        assert found["vm_dirs"] == [str(vms / "vm-0000dead")]
        assert found["qemu"] == [str(q.pid)]
        assert cleanup.remove_orphans(found) == []
        assert _wait_gone(q) == -9
        assert not (vms / "vm-0000dead").exists() and (vms / "vm-0000live").exists()
    finally:
        if q.poll() is None:
            q.kill()
            q.wait()
    assert os.path.exists(vms)
