"""`host_fs`: a live host directory (or file), read-write, confined by HostTree.

Ownership is virtual: files keep their host owner on the host; the guest sees the mount's
owner (`uid=`/`gid=` options, default root) and any chown it made, for the VM's life.
Setuid/setgid bits never reach a host file. Only `user.*` xattrs do.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from matchlock.vfs._fuse import Attr
from matchlock.vfs._hosttree import HostTree
from matchlock.vfs._provider import (
    DirEntry,
    Handle,
    Provider,
    SetAttr,
    StatFs,
    fail,
    join,
)

SAFE_MODE_BITS = 0o1777  # what a host file may get: no setuid/setgid
_INO_MASK = (1 << 64) - 1


class Owners:
    """Virtual owners: a default plus the paths the guest created or chowned."""

    def __init__(self, uid: int, gid: int) -> None:
        self.default = (uid, gid)
        self._map: dict[str, tuple[int, int]] = {}

    def get(self, path: str) -> tuple[int, int]:
        return self._map.get(path, self.default) if self._map else self.default

    def set(self, path: str, uid: int | None, gid: int | None) -> None:
        cur = self.get(path)
        new = (cur[0] if uid is None else uid, cur[1] if gid is None else gid)
        if new == self.default:
            self._map.pop(path, None)
        else:
            self._map[path] = new

    def drop(self, path: str) -> None:
        if not self._map:
            return
        self._map.pop(path, None)
        pre = path + "/"
        for k in [k for k in self._map if k.startswith(pre)]:
            del self._map[k]

    def move(self, old: str, new: str) -> None:
        if not self._map:
            return
        self.drop(new)
        pre = old + "/"
        for k in [k for k in self._map if k == old or k.startswith(pre)]:
            self._map[new + k[len(old):]] = self._map.pop(k)


def ino_of(st: os.stat_result, salt: int) -> int:
    """The inode number the guest sees for a host file."""
    return ((st.st_ino ^ (st.st_dev << 40)) + salt) & _INO_MASK or 2


def attr_from_stat(st: os.stat_result, owner: tuple[int, int], salt: int) -> Attr:
    return Attr(
        ino=ino_of(st, salt),
        mode=st.st_mode, nlink=st.st_nlink, uid=owner[0], gid=owner[1], size=st.st_size,
        blocks=st.st_blocks, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns, rdev=0, blksize=4096,
    )


def now_ns() -> int:
    return time.time_ns()


def setattr_fd(fd: int, change: SetAttr) -> None:
    """Apply `change` (but owners: those are virtual) to the open file `fd`."""
    if change.mode is not None:
        os.fchmod(fd, change.mode & SAFE_MODE_BITS)
    if change.size is not None:
        os.ftruncate(fd, change.size)
    if change.atime_ns is not None or change.mtime_ns is not None:
        st = os.fstat(fd)
        now = now_ns()
        a = st.st_atime_ns if change.atime_ns is None else \
            now if change.atime_ns == "now" else int(change.atime_ns)
        m = st.st_mtime_ns if change.mtime_ns is None else \
            now if change.mtime_ns == "now" else int(change.mtime_ns)
        os.utime(fd, ns=(a, m))


class HostHandle(Handle):
    def __init__(self, fd: int, path: str, attr) -> None:
        self.fd = fd
        self.path = path
        self._attr = attr  # callable: stat_result -> Attr

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        return os.pwrite(self.fd, data, offset)

    def fsync(self, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def allocate(self, offset: int, length: int, mode: int) -> None:
        if mode:
            raise fail(errno.EOPNOTSUPP)
        os.posix_fallocate(self.fd, offset, length)

    def getattr(self) -> Attr:
        return self._attr(os.fstat(self.fd))

    def setattr(self, change: SetAttr) -> Attr:
        setattr_fd(self.fd, change)
        return self.getattr()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HostFS(Provider):
    kind = "host_fs"

    def __init__(self, root: str | os.PathLike, *, single: str | None = None, uid: int = 0,
                 gid: int = 0, salt: int = 0) -> None:
        self.tree = HostTree(root, single)
        self.owners = Owners(uid, gid)
        self.salt = salt

    def _attr(self, path: str, st: os.stat_result) -> Attr:
        return attr_from_stat(st, self.owners.get(path), self.salt)

    def getattr(self, path: str) -> Attr:
        return self._attr(path, self.tree.lstat(path))

    def readdir(self, path: str) -> list[DirEntry]:
        out = []
        for name in self.tree.listdir(path):
            p = join(path, name)
            try:
                out.append(DirEntry(name, self._attr(p, self.tree.lstat(p))))
            except FileNotFoundError:
                continue  # removed on the host while we listed
        return out

    def _handle(self, fd: int, path: str) -> HostHandle:
        return HostHandle(fd, path, lambda st: self._attr(path, st))

    def open(self, path: str, flags: int) -> Handle:
        return self._handle(self.tree.open(path, flags & ~os.O_CREAT), path)

    def create(self, path: str, flags: int, mode: int, uid: int, gid: int) -> tuple[Handle, Attr]:
        fd, created = create_file(self.tree, path, flags, mode)
        if created:
            self.owners.set(path, uid, gid)
        h = self._handle(fd, path)
        return h, h.getattr()

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFREG:
            os.close(self.tree.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                    mode & SAFE_MODE_BITS))
        elif fmt == stat.S_IFIFO:
            self.tree.mkfifo(path, mode & SAFE_MODE_BITS)
        else:
            raise fail(errno.EPERM, "device nodes are not allowed on host mounts")
        self.owners.set(path, uid, gid)
        return self.getattr(path)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> Attr:
        self.tree.mkdir(path, mode & SAFE_MODE_BITS)
        self.owners.set(path, uid, gid)
        return self.getattr(path)

    def symlink(self, target: str, path: str, uid: int, gid: int) -> Attr:
        self.tree.symlink(target, path)
        self.owners.set(path, uid, gid)
        return self.getattr(path)

    def link(self, old: str, new: str) -> Attr:
        self.tree.link(old, new)
        owner = self.owners.get(old)
        self.owners.set(new, *owner)
        return self.getattr(new)

    def readlink(self, path: str) -> str:
        return self.tree.readlink(path)

    def unlink(self, path: str) -> None:
        self.tree.unlink(path)
        self.owners.drop(path)

    def rmdir(self, path: str) -> None:
        self.tree.rmdir(path)
        self.owners.drop(path)

    def rename(self, old: str, new: str, flags: int) -> None:
        self.tree.rename(old, new, flags)
        self.owners.move(old, new)

    def setattr(self, path: str, change: SetAttr, handle: Handle | None) -> Attr:
        apply_setattr(self.tree, path, change, handle)
        if change.uid is not None or change.gid is not None:
            self.owners.set(path, change.uid, change.gid)
        if isinstance(handle, HostHandle) and handle.fd >= 0:
            return handle.getattr()
        return self.getattr(path)

    def statfs(self) -> StatFs:
        return statfs_of(self.tree)

    def fsyncdir(self, path: str) -> None:
        self.tree.fsyncdir(path)

    def getxattr(self, path: str, name: str) -> bytes:
        return xattr_get(self.tree, path, name)

    def listxattr(self, path: str) -> list[str]:
        return xattr_list(self.tree, path)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        xattr_set(self.tree, path, name, value, flags)

    def removexattr(self, path: str, name: str) -> None:
        xattr_remove(self.tree, path, name)

    def close(self) -> None:
        self.tree.close()


# -- helpers shared with the snapshot provider ----------------------------------------------


def create_file(tree: HostTree, path: str, flags: int, mode: int) -> tuple[int, bool]:
    """Open `path`, creating it if missing: (fd, whether this call created it)."""
    try:
        return tree.open(path, flags | os.O_CREAT | os.O_EXCL, mode & SAFE_MODE_BITS), True
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
    return tree.open(path, flags & ~os.O_CREAT), False


def apply_setattr(tree: HostTree, path: str, change: SetAttr, handle: Handle | None) -> None:
    if change.mode is not None:
        tree.chmod(path, change.mode & SAFE_MODE_BITS)
    if change.size is not None:
        if isinstance(handle, HostHandle) and handle.fd >= 0:
            handle.truncate(change.size)
        else:
            tree.truncate(path, change.size)
    if change.atime_ns is not None or change.mtime_ns is not None:
        st = tree.lstat(path)
        now = now_ns()

        def pick(v: int | str | None, cur: int) -> int:
            return cur if v is None else now if v == "now" else int(v)

        tree.utime(path, pick(change.atime_ns, st.st_atime_ns),
                   pick(change.mtime_ns, st.st_mtime_ns))


def statfs_of(tree: HostTree) -> StatFs:
    v = tree.statvfs()
    return StatFs(blocks=v.f_blocks, bfree=v.f_bfree, bavail=v.f_bavail, files=v.f_files,
                  ffree=v.f_ffree, bsize=v.f_bsize, namelen=min(v.f_namemax, 255),
                  frsize=v.f_frsize)


def _xattr_target(tree: HostTree, path: str) -> tuple[int, str]:
    fd, p = tree.xattr_path(path)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise fail(errno.EPERM)  # Linux allows no user.* xattrs on symlinks
    return fd, p


def xattr_get(tree: HostTree, path: str, name: str) -> bytes:
    if not name.startswith("user."):
        raise fail(errno.ENODATA)
    try:
        fd, p = _xattr_target(tree, path)
    except PermissionError:
        raise fail(errno.ENODATA) from None
    try:
        return os.getxattr(p, name)
    finally:
        os.close(fd)


def xattr_list(tree: HostTree, path: str) -> list[str]:
    try:
        fd, p = _xattr_target(tree, path)
    except PermissionError:
        return []
    try:
        return [n for n in os.listxattr(p) if n.startswith("user.")]
    finally:
        os.close(fd)


def xattr_set(tree: HostTree, path: str, name: str, value: bytes, flags: int) -> None:
    if not name.startswith("user."):
        raise fail(errno.EOPNOTSUPP, name)
    fd, p = _xattr_target(tree, path)
    try:
        os.setxattr(p, name, value, flags)
    finally:
        os.close(fd)


def xattr_remove(tree: HostTree, path: str, name: str) -> None:
    if not name.startswith("user."):
        raise fail(errno.ENODATA)
    fd, p = _xattr_target(tree, path)
    try:
        os.removexattr(p, name)
    finally:
        os.close(fd)
