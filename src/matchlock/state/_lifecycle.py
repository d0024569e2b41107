"""A VM's lifecycle: its states and the one table of allowed transitions. Pure.

    creating ─► starting ─► running ─► stopping ─► stopped
        │           │          │          │  └──► cleanup_failed ─► stopping (gc retries)
        └───────────┴──────────┴──────────┴──► crashed ─► stopping (gc reclaims)

`creating`: the row and the VM directory exist, disks and network are being made.
`starting`: QEMU runs, the guest has not said hello yet. `running`: it accepts exec.
`stopping`: the recorded resources are being released, newest first.
`stopped`: they all were; the directory (logs) stays until `rm`.
`cleanup_failed`: a release step failed; `gc` re-runs the steps left.
`crashed`: the owner (supervisor) died in an active state; `gc` writes it and reclaims.

Active states need a live owner: a VM whose owner is gone *is* crashed, whether or not
anyone has written that down yet (`effective_status`), so reading never has to write.
"""

from __future__ import annotations

from enum import StrEnum

from matchlock.errors import MatchlockError


class Status(StrEnum):
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CLEANUP_FAILED = "cleanup_failed"
    CRASHED = "crashed"


ACTIVE = frozenset({Status.CREATING, Status.STARTING, Status.RUNNING, Status.STOPPING})

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CREATING: frozenset({Status.STARTING, Status.STOPPING, Status.CRASHED}),
    Status.STARTING: frozenset({Status.RUNNING, Status.STOPPING, Status.CRASHED}),
    Status.RUNNING: frozenset({Status.STOPPING, Status.CRASHED}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.CLEANUP_FAILED, Status.CRASHED}),
    Status.STOPPED: frozenset(),
    Status.CLEANUP_FAILED: frozenset({Status.STOPPING}),
    Status.CRASHED: frozenset({Status.STOPPING}),
}


class InvalidTransition(MatchlockError):
    def __init__(self, vm_id: str, frm: str, to: str) -> None:
        super().__init__(f"VM {vm_id} cannot go from {frm} to {to}", vm_id=vm_id)
        self.frm, self.to = frm, to


def check_transition(vm_id: str, frm: str, to: str) -> None:
    try:
        allowed = TRANSITIONS[Status(frm)]
        target = Status(to)
    except ValueError:
        raise InvalidTransition(vm_id, frm, to) from None
    if target not in allowed:
        raise InvalidTransition(vm_id, frm, to)


def effective_status(status: str, owner_alive: bool) -> str:
    """What the status is, given whether the owner still lives."""
    if status in ACTIVE and not owner_alive:
        return Status.CRASHED.value
    return status
