"""The per-VM budget of bytes the proxy may hold in memory at once, sans-I/O.

A hostile guest opens many connections; a per-connection cap alone multiplies by their
number. Each VM's proxy owns one `BufferBudget` that all its connections draw from before
they hold a body whole (a rewritten request body, a small response body being scrubbed).
When the budget cannot cover a body, the caller streams it instead and says so in an event.
"""

from __future__ import annotations

MAX_VM_BUFFERED = 64 * 1024 * 1024  # bytes held whole at once by one VM's proxy


class BufferBudget:
    __slots__ = ("limit", "used", "peak")

    def __init__(self, limit: int = MAX_VM_BUFFERED) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def take(self, n: int) -> bool:
        """Reserve n bytes; False (nothing reserved) when that would pass the limit."""
        if n < 0 or self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)
