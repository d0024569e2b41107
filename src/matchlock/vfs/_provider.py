"""The provider interface: what serves one mount's files, addressed by mount-relative path.

Paths are `str` (surrogate-escaped bytes, as `os.fsdecode` gives), relative to the mount
root, components joined by "/", "" for the root itself. The file system layer checks every
component (no "", ".", "..", "/" or NUL) before a provider sees it. Providers report errors
as `OSError` with an errno; anything else becomes EIO for the guest.

All methods are synchronous: the server runs them on its own thread (small ones inline,
big I/O on a worker pool), never on the supervisor's event loop.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from matchlock.vfs._fuse import Attr


def fail(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def split(path: str) -> tuple[str, str]:
    head, _, tail = path.rpartition("/")
    return head, tail


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    attr: Attr


@dataclass(frozen=True, slots=True)
class StatFs:
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


@dataclass(frozen=True, slots=True)
class SetAttr:
    """The changes one SETATTR asks for; None = leave alone. Times in ns, or "now"."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | str | None = None
    mtime_ns: int | str | None = None


class Handle:
    """An open file. `path` is fixed at open time (hooks and events report it)."""

    path: str = ""

    def read(self, offset: int, size: int) -> bytes:
        raise fail(errno.EBADF)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        raise fail(errno.EBADF)

    def fsync(self, datasync: bool) -> None:
        return None

    def truncate(self, size: int) -> None:
        raise fail(errno.EBADF)

    def getattr(self) -> Attr:
        raise fail(errno.EBADF)

    def allocate(self, offset: int, length: int, mode: int) -> None:
        raise fail(errno.EOPNOTSUPP)

    def setattr(self, change: SetAttr) -> Attr:
        """Change the open file itself (it may have no name left)."""
        raise fail(errno.ENOENT)

    def release(self) -> None:
        return None


class Provider:
    """Base class: a read-only, empty file system. Subclasses override what they serve."""

    #: Nothing but this VM changes the files (memory, snapshot): the guest kernel may cache
    #: names and attributes for long. A live host directory can change under it.
    exclusive = False
    readonly = False
    kind = "provider"

    def getattr(self, path: str) -> Attr:
        raise fail(errno.ENOENT, path)

    def readdir(self, path: str) -> list[DirEntry]:
        raise fail(errno.ENOTDIR, path)

    def open(self, path: str, flags: int) -> Handle:
        raise fail(errno.ENOENT, path)

    def create(self, path: str, flags: int, mode: int, uid: int, gid: int) -> tuple[Handle, Attr]:
        raise fail(errno.EROFS)

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        raise fail(errno.EROFS)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> Attr:
        raise fail(errno.EROFS)

    def symlink(self, target: str, path: str, uid: int, gid: int) -> Attr:
        raise fail(errno.EROFS)

    def link(self, old: str, new: str) -> Attr:
        raise fail(errno.EROFS)

    def readlink(self, path: str) -> str:
        raise fail(errno.EINVAL, path)

    def unlink(self, path: str) -> None:
        raise fail(errno.EROFS)

    def rmdir(self, path: str) -> None:
        raise fail(errno.EROFS)

    def rename(self, old: str, new: str, flags: int) -> None:
        raise fail(errno.EROFS)

    def setattr(self, path: str, change: SetAttr, handle: Handle | None) -> Attr:
        raise fail(errno.EROFS)

    def statfs(self) -> StatFs:
        return StatFs(0, 0, 0, 0, 0)

    def fsyncdir(self, path: str) -> None:
        """Make the directory's entries durable (after a create or rename in it)."""
        return None

    def getxattr(self, path: str, name: str) -> bytes:
        raise fail(errno.ENODATA)

    def listxattr(self, path: str) -> list[str]:
        return []

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        raise fail(errno.EROFS)

    def removexattr(self, path: str, name: str) -> None:
        raise fail(errno.EROFS)

    def close(self) -> None:
        """Release what the provider holds (fds, a snapshot's private copy)."""
        return None


def is_write_open(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_TRUNC | os.O_APPEND))


# Only user.* xattrs reach a host file: security.* (file capabilities, SELinux labels) and
# trusted.* on a host file would give the guest a say over how the host runs it.
XATTR_PREFIXES = ("user.",)


def check_xattr_name(name: str) -> None:
    if not name.startswith(XATTR_PREFIXES):
        raise fail(errno.EOPNOTSUPP, name)
