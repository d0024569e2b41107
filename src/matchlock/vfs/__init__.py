"""The VFS: host-served file systems for the guest's workspace.

The guest's `fused` relays FUSE requests over the `matchlock.vfs` port; `VfsServer` serves
them from a `FuseFilesystem` (node table, mounts, hooks) whose mounts are providers:
`HostFS` (host_fs), `SnapshotFS` (overlay, the `-v` default), `MemoryFS`, `ReadOnly`.
"""

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

__all__ = [
    "DEFAULT_WORKSPACE",
    "DiskInUseError",
    "DiskSpec",
    "MountConfig",
    "MountSpec",
    "SandboxMounts",
    "Volume",
    "check_mounts",
    "copy_volume",
    "create_volume",
    "list_volumes",
    "mount_config",
    "parse_disk",
    "parse_volume",
    "remove_volume",
    "volumes_dir",
    "FileEvent",
    "FileOp",
    "FuseFilesystem",
    "HookEngine",
    "HookRule",
    "HostFS",
    "MemoryFS",
    "Mount",
    "ReadOnly",
    "SnapshotFS",
    "VfsServer",
]
