"""The VFS: host-served file systems for the guest's workspace.

The guest's `fused` relays FUSE requests over the `matchlock.vfs` port; `VfsServer` serves
them from a `FuseFilesystem` (node table, mounts, hooks) whose mounts are providers:
`HostFS` (host_fs), `SnapshotFS` (overlay, the `-v` default), `MemoryFS`, `ReadOnly`.
"""

from matchlock.vfs._fs import FuseFilesystem, Mount
from matchlock.vfs._hooks import FileEvent, FileOp, HookEngine, HookRule
from matchlock.vfs._hostfs import HostFS
from matchlock.vfs._memory import MemoryFS
from matchlock.vfs._readonly import ReadOnly
from matchlock.vfs._snapshot import SnapshotFS
from matchlock.vfs.server import VfsServer

__all__ = [
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
