"""Where matchlock keeps its cache (kernels, images) and state (VMs, DB)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Kernels, images, built initramfs: safe to delete, rebuilt on demand."""
    env = os.environ.get("MATCHLOCK_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "matchlock"


def images_dir() -> Path:
    """The image store (layers, root disks, names); `$MATCHLOCK_IMAGES_DIR` moves it."""
    env = os.environ.get("MATCHLOCK_IMAGES_DIR")
    return Path(env) if env else cache_dir() / "images"


def state_dir() -> Path:
    """Per-user state: the SQLite DB and one directory per VM."""
    env = os.environ.get("MATCHLOCK_HOME")
    return Path(env) if env else Path.home() / ".matchlock"


def vms_dir() -> Path:
    return state_dir() / "vms"
