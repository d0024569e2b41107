"""Locate the static guest runtime binary (`matchlock-guest`)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from matchlock.errors import DependencyError
from matchlock.paths import cache_dir

_PACKAGED = Path(__file__).parent / "_guest" / "matchlock-guest"
# In a source checkout (editable install) the C sources sit beside src/.
_SOURCE_DIR = Path(__file__).resolve().parents[2] / "guest"


def guest_binary() -> Path:
    """$MATCHLOCK_GUEST, else a build of the checkout's sources, else the packaged binary."""
    env = os.environ.get("MATCHLOCK_GUEST")
    if env:
        p = Path(env)
        if not p.is_file():
            raise DependencyError(f"MATCHLOCK_GUEST={env} does not exist")
        return p
    if _SOURCE_DIR.is_dir() and any(_SOURCE_DIR.glob("*.c")):
        return _build_from_source()
    if _PACKAGED.is_file():
        return _PACKAGED
    raise DependencyError(
        "the guest runtime matchlock-guest is missing: reinstall matchlock (pip install .)"
    )


def locate() -> tuple[str, Path | None]:
    """Where guest_binary() would take the runtime from, without building it:
    ("env" | "source" | "packaged" | "missing", path)."""
    env = os.environ.get("MATCHLOCK_GUEST")
    if env:
        return "env", Path(env)
    if _SOURCE_DIR.is_dir() and any(_SOURCE_DIR.glob("*.c")):
        return "source", _SOURCE_DIR
    if _PACKAGED.is_file():
        return "packaged", _PACKAGED
    return "missing", None


def _build_from_source() -> Path:
    from matchlock.guest_build import build_guest, source_digest

    out = cache_dir() / "guest" / source_digest(_SOURCE_DIR) / "matchlock-guest"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            try:
                build_guest(_SOURCE_DIR, out.with_suffix(".tmp"))
            except RuntimeError as e:
                raise DependencyError(str(e)) from None
            os.replace(out.with_suffix(".tmp"), out)
    return out
