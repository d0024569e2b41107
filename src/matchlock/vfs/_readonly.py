"""`ro`: any provider, read-only. Enforced here, on the host: the guest can remount its
FUSE mount read-write, chmod, rename or link as root and still gets EROFS."""

from __future__ import annotations

import errno

from matchlock.vfs._fuse import Attr
from matchlock.vfs._provider import (
    DirEntry,
    Handle,
    Provider,
    SetAttr,
    StatFs,
    fail,
    is_write_open,
)


class ReadOnly(Provider):
    readonly = True

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.kind = f"{inner.kind},ro"
        self.exclusive = inner.exclusive

    def getattr(self, path: str) -> Attr:
        return self.inner.getattr(path)

    def readdir(self, path: str) -> list[DirEntry]:
        return self.inner.readdir(path)

    def readlink(self, path: str) -> str:
        return self.inner.readlink(path)

    def open(self, path: str, flags: int) -> Handle:
        if is_write_open(flags):
            raise fail(errno.EROFS, path)
        return _ReadOnlyHandle(self.inner.open(path, flags))

    def statfs(self) -> StatFs:
        return self.inner.statfs()

    def fsyncdir(self, path: str) -> None:
        return None

    def getxattr(self, path: str, name: str) -> bytes:
        return self.inner.getxattr(path, name)

    def listxattr(self, path: str) -> list[str]:
        return self.inner.listxattr(path)

    def setattr(self, path: str, change: SetAttr, handle: Handle | None) -> Attr:
        raise fail(errno.EROFS, path)

    def close(self) -> None:
        self.inner.close()


class _ReadOnlyHandle(Handle):
    def __init__(self, inner: Handle) -> None:
        self.inner = inner
        self.path = inner.path

    def read(self, offset: int, size: int) -> bytes:
        return self.inner.read(offset, size)

    def getattr(self) -> Attr:
        return self.inner.getattr()

    def write(self, offset: int, data: bytes | memoryview) -> int:
        raise fail(errno.EROFS)

    def truncate(self, size: int) -> None:
        raise fail(errno.EROFS)

    def allocate(self, offset: int, length: int, mode: int) -> None:
        raise fail(errno.EROFS)

    def setattr(self, change: SetAttr) -> Attr:
        raise fail(errno.EROFS)

    def fsync(self, datasync: bool) -> None:
        return None

    def release(self) -> None:
        self.inner.release()
