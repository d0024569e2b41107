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
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matchlock import _proc
from matchlock.state import Resource, StateDB

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0

# Resource kinds, in the order a VM takes them (released in reverse).
VM_DIR = "vm_dir"  # {"path"}: removed only when the VM itself is removed
CONTROL_SOCKET = "control_socket"  # {"path"}
UPPER_DISK = "upper_disk"  # {"path"}
NETNS = "netns"  # {"name", "privileged"}
QEMU = "qemu"  # {"pid", "start", "marker"}: marker is a string only its argv holds


def qemu_processes(marker: str) -> list[int]:
    """PIDs of QEMU processes whose command line contains `marker` (the VM's directory)."""
    found = []
    for pid in _proc.pids():
        argv = _proc.cmdline(pid)
        if argv and os.path.basename(argv[0]).startswith("qemu-system") and \
                any(marker in a for a in argv):
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
