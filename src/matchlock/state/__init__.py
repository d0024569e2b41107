"""Per-user VM state: SQLite (WAL) rows, history and resource records, one dir per VM."""

from matchlock.state._db import HistoryEntry, Resource, StateDB, StateError, VmRecord
from matchlock.state._lifecycle import (
    ACTIVE,
    TRANSITIONS,
    InvalidTransition,
    Status,
    check_transition,
    effective_status,
)

__all__ = [
    "ACTIVE",
    "TRANSITIONS",
    "HistoryEntry",
    "InvalidTransition",
    "Resource",
    "StateDB",
    "StateError",
    "Status",
    "VmRecord",
    "check_transition",
    "effective_status",
]
