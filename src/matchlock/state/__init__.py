"""Per-user VM state: SQLite (WAL) rows plus one directory per VM."""

from matchlock.state._db import StateDB, VmRecord

__all__ = ["StateDB", "VmRecord"]
