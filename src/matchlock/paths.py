"""Where matchlock keeps its cache (kernels, images) and state (VMs, DB).

pathlib is imported on first use: `matchlock exec` needs only `state_dir_str` (pathlib
and what it pulls in are ~2 ms of an exec's start-up)."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # no typing import on the exec start-up path

if TYPE_CHECKING:
    from pathlib import Path


def cache_dir() -> Path:
    """Kernels, images, built initramfs: safe to delete, rebuilt on demand."""
    from pathlib import Path

    env = os.environ.get("MATCHLOCK_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "matchlock"


def images_dir() -> Path:
    """The image store (layers, root disks, names); `$MATCHLOCK_IMAGES_DIR` moves it."""
    from pathlib import Path

    env = os.environ.get("MATCHLOCK_IMAGES_DIR")
    return Path(env) if env else cache_dir() / "images"


def state_dir_str() -> str:
    """Per-user state: the SQLite DB and one directory per VM."""
    env = os.environ.get("MATCHLOCK_HOME")
    return env if env else os.path.join(os.path.expanduser("~"), ".matchlock")


def state_dir() -> Path:
    from pathlib import Path

    return Path(state_dir_str())


def vms_dir() -> Path:
    return state_dir() / "vms"
