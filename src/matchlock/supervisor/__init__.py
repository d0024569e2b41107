"""One supervisor per VM: it owns the Sandbox and serves `<vm dir>/control.sock`.

`Supervisor` (the owner, in `_supervisor`), `spawn_detached` / `daemon_main` (the
`run -d` daemon, in `_daemon`), and `client` (the blocking client other processes use).
Imported lazily so that the client side does not pay for the server side.
"""

from __future__ import annotations

TYPE_CHECKING = False  # no typing import on the exec start-up path
if TYPE_CHECKING:
    from typing import Any


__all__ = ["Supervisor", "VmTarget", "daemon_main", "spawn_detached"]


def __getattr__(name: str) -> Any:
    if name in ("Supervisor", "VmTarget"):
        from matchlock.supervisor import _supervisor

        return getattr(_supervisor, name)
    if name in ("daemon_main", "spawn_detached"):
        from matchlock.supervisor import _daemon

        return getattr(_daemon, name)
    raise AttributeError(name)
