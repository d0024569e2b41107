"""Releasing what a VM took, from its records alone: what `gc`, `rm` and a failed
in-process release fall back to when the live objects are gone.

A VM records each resource before taking it (`StateDB.take`); releasing runs the
unreleased records newest first, one idempotent step per kind, and records each outcome,
so a step that failed (or a process that died half way) is simply run again later.
Nothing here trusts a bare PID: processes are identified by PID and start time, or by
their command line naming the VM's directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matchlock import _proc
from matchlock._log import get_logger
from matchlock.errors import VmRunning
from matchlock.state import ACTIVE, Resource, StateDB, Status, VmRecord

log = get_logger(__name__)

KILL_WAIT_S = 5.0

# Resource kinds, in the order a VM takes them (released in reverse).
VM_DIR = "vm_dir"  # {"path"}: removed only when the VM itself is removed
CONTROL_SOCKET = "control_socket"  # {"path"}
UPPER_DISK = "upper_disk"  # {"path"}
NETNS = "netns"  # {"name", "privileged"}
QEMU = "qemu"  # {"pid", "start", "marker"}: marker is a string only its argv holds


def is_qemu(argv: list[str]) -> bool:
    """QEMU's command line, or the `setpriv ... -- qemu-system-*` that execs it
    (vm/_spawn), which is what a just-spawned QEMU still looks like for a moment."""
    if not argv:
        return False
    if os.path.basename(argv[0]) == "setpriv" and "--" in argv:
        argv = argv[argv.index("--") + 1:]
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-system")


def qemu_processes(marker: str) -> list[int]:
    """PIDs of QEMU processes whose command line contains `marker` (the VM's directory)."""
    found = []
    for pid in _proc.pids():
        argv = _proc.cmdline(pid)
        if is_qemu(argv) and any(marker in a for a in argv):
            found.append(pid)
    return found


def kill_qemu(value: dict) -> None:
    """SIGKILL the VM's QEMU: the recorded (pid, start) if it is still that process, and
    any QEMU naming the VM's directory (spawned before its pid could be recorded)."""
    targets: set[int] = set()
    pid, start = value.get("pid"), value.get("start")
    if pid and start and _proc.ProcessId(int(pid), str(start)).alive():
        targets.add(int(pid))
    marker = value.get("marker")
    if marker:
        targets.update(qemu_processes(str(marker)))
    ids = [p for p in (_proc.ProcessId.of(t) for t in targets) if p is not None]
    for p in ids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while any(p.alive() for p in ids):
        if time.monotonic() > deadline:
            raise OSError(f"QEMU {[p.pid for p in ids if p.alive()]} survived SIGKILL")
        time.sleep(0.02)


def delete_netns(value: dict) -> None:
    if not value.get("privileged"):
        return  # a user namespace dies with the fds of the supervisor that held it
    from matchlock.net.netns import remove_namespace

    if not remove_namespace(str(value["name"])):
        raise OSError(f"cannot delete network namespace {value['name']}")


def unlink(value: dict) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(value["path"])


def remove_dir(value: dict) -> None:
    path = Path(value["path"])
    if path.exists():
        shutil.rmtree(path)


RELEASE: dict[str, Callable[[dict], None]] = {
    QEMU: kill_qemu,
    NETNS: delete_netns,
    UPPER_DISK: unlink,
    CONTROL_SOCKET: unlink,
    VM_DIR: remove_dir,
}


@dataclass(frozen=True, slots=True)
class StepResult:
    kind: str
    error: str = ""


def pending(resources: list[Resource], *, include_dir: bool) -> list[Resource]:
    """Unreleased resources, newest first (the VM dir last, and only when asked)."""
    left = [r for r in resources if not r.released and (include_dir or r.kind != VM_DIR)]
    return sorted(left, key=lambda r: r.seq, reverse=True)


def release_recorded(db: StateDB, vm_id: str, *, include_dir: bool) -> list[StepResult]:
    """Run every step left for `vm_id`, record each outcome; never raises for a step."""
    results = []
    for res in pending(db.resources(vm_id), include_dir=include_dir):
        fn = RELEASE.get(res.kind)
        error = ""
        if fn is None:
            error = f"unknown resource kind {res.kind!r}"
        else:
            try:
                fn(res.value)
            except Exception as e:  # noqa: BLE001 - recorded; gc runs it again
                error = f"{type(e).__name__}: {e}"
                log.warning("%s: releasing %s failed: %s", vm_id, res.kind, error)
        db.released(vm_id, res.kind, error)
        results.append(StepResult(res.kind, error))
    return results


def reclaim(db: StateDB, rec: VmRecord, *, remove: bool) -> list[StepResult]:
    """Finish a VM whose owner is gone (or that is stopped): write `crashed` if the owner
    died in an active state, release what is left (with this process as the owner while
    it does), and with `remove` forget the VM. Refuses a VM whose owner is alive."""
    if rec.status in ACTIVE:
        raise VmRunning(rec.id, rec.status)
    me = _proc.ProcessId.current()
    left = pending(db.resources(rec.id), include_dir=remove)
    stored = rec.stored_status
    if stored in ACTIVE:  # the owner died mid-way
        db.transition(rec.id, Status.CRASHED.value,
                      detail=f"owner pid {rec.pid} is gone; reclaimed by pid {me.pid}")
        stored = Status.CRASHED.value
    runtime_left = [r for r in left if r.kind != VM_DIR]
    moved = False
    if runtime_left and stored in (Status.CRASHED.value, Status.CLEANUP_FAILED.value):
        db.transition(rec.id, Status.STOPPING.value, owner=me, detail="gc")
        moved = True
    results = release_recorded(db, rec.id, include_dir=remove)
    errors = [f"{r.kind}: {r.error}" for r in results if r.error]
    if moved:
        db.transition(rec.id, (Status.CLEANUP_FAILED if errors else Status.STOPPED).value,
                      error="; ".join(errors) if errors else None)
    if remove and not errors:
        db.delete(rec.id)
    return results


def orphans(db: StateDB) -> dict[str, list[str]]:
    """What matchlock made that no VM row accounts for: VM directories, network
    namespaces of dead supervisors, QEMU processes naming a VM directory."""
    from matchlock.net.netns import leftover_namespaces
    from matchlock.paths import vms_dir

    ids = db.ids()
    root = vms_dir()
    dirs = sorted(str(p) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("vm-") and p.name not in ids) \
        if root.exists() else []
    known_ns = {"ml-" + i.removeprefix("vm-") for i in ids}
    namespaces = [n for n in leftover_namespaces() if n not in known_ns]
    qemus = []
    prefix = str(root) + "/vm-"
    for pid in _proc.pids():
        argv = _proc.cmdline(pid)
        if not is_qemu(argv):
            continue
        for a in argv:
            i = a.find(prefix)
            if i >= 0:
                vm = a[i + len(prefix) - 3:].split("/")[0]
                if vm not in ids:
                    qemus.append(str(pid))
                break
    return {"vm_dirs": dirs, "namespaces": namespaces, "qemu": qemus}


def remove_orphans(found: dict[str, list[str]]) -> list[str]:
    """Remove what `orphans` found; returns error lines."""
    from matchlock.net.netns import remove_namespace

    errs = []
    for pid in found["qemu"]:
        p = _proc.ProcessId.of(int(pid))
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    for name in found["namespaces"]:
        if not remove_namespace(name):
            errs.append(f"namespace {name}: cannot delete")
    for d in found["vm_dirs"]:
        try:
            shutil.rmtree(d)
        except OSError as e:
            errs.append(f"{d}: {e}")
    return errs
