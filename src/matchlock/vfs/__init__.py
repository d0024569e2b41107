"""The VFS: host-served file systems for the guest's workspace.

The guest's `fused` relays FUSE requests over the `matchlock.vfs` port; `VfsServer` serves
them from a `FuseFilesystem` (node table, mounts, hooks) whose mounts are providers:
`HostFS` (host_fs), `SnapshotFS` (overlay, the `-v` default), `MemoryFS`, `ReadOnly`.

Names load on first use (PEP 562): a VM without mounts (and the CLI parsing `-v`) does not
pay for the FUSE server and its providers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matchlock._lazy import lazy_names

if TYPE_CHECKING:  # the names as type checkers see them
    from matchlock.vfs._attach import SandboxMounts
    from matchlock.vfs._fs import FuseFilesystem, Mount
    from matchlock.vfs._hooks import FileEvent, FileOp, HookEngine, HookRule
    from matchlock.vfs._hostfs import HostFS
    from matchlock.vfs._memory import MemoryFS
    from matchlock.vfs._readonly import ReadOnly
    from matchlock.vfs._snapshot import SnapshotFS
    from matchlock.vfs._spec import (
        DEFAULT_WORKSPACE,
        DiskSpec,
        MountConfig,
        MountSpec,
        check_mounts,
        mount_config,
        parse_disk,
        parse_volume,
    )
    from matchlock.vfs._volumes import (
        DiskInUseError,
        Volume,
        copy_volume,
        create_volume,
        list_volumes,
        remove_volume,
        volumes_dir,
    )
    from matchlock.vfs.server import VfsServer


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

__all__ = [
    "DEFAULT_WORKSPACE", "DiskInUseError", "DiskSpec", "FileEvent", "FileOp", "FuseFilesystem",
    "HookEngine", "HookRule", "HostFS", "MemoryFS", "Mount", "MountConfig", "MountSpec",
    "ReadOnly", "SandboxMounts", "SnapshotFS", "VfsServer", "Volume", "check_mounts",
    "copy_volume", "create_volume", "list_volumes", "mount_config", "parse_disk",
    "parse_volume", "remove_volume", "volumes_dir",
]


__getattr__ = lazy_names(__name__, _WHERE, globals())
