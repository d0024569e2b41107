"""The VFS: host-served file systems for the guest's workspace.

The guest's `fused` relays FUSE requests over the `matchlock.vfs` port; `VfsServer` serves
them from a `FuseFilesystem` (node table, mounts, hooks) whose mounts are providers:
`HostFS` (host_fs), `SnapshotFS` (overlay, the `-v` default), `MemoryFS`, `ReadOnly`.

Names load on first use (PEP 562): a VM without mounts (and the CLI parsing `-v`) does not
pay for the FUSE server and its providers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "SandboxMounts": "_attach",
    "FuseFilesystem": "_fs", "Mount": "_fs",
    "FileEvent": "_hooks", "FileOp": "_hooks", "HookEngine": "_hooks", "HookRule": "_hooks",
    "HostFS": "_hostfs", "MemoryFS": "_memory", "ReadOnly": "_readonly",
    "SnapshotFS": "_snapshot",
    "DEFAULT_WORKSPACE": "_spec", "DiskSpec": "_spec", "MountConfig": "_spec",
    "MountSpec": "_spec", "check_mounts": "_spec", "mount_config": "_spec",
    "parse_disk": "_spec", "parse_volume": "_spec",
    "DiskInUseError": "_volumes", "Volume": "_volumes", "copy_volume": "_volumes",
    "create_volume": "_volumes", "list_volumes": "_volumes", "remove_volume": "_volumes",
    "volumes_dir": "_volumes",
    "VfsServer": "server",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'matchlock.vfs' has no attribute {name!r}")
    value = getattr(import_module(f"matchlock.vfs.{mod}"), name)
    globals()[name] = value
    return value
