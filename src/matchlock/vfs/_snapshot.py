"""`overlay` (the `-v` default): a lazy copy-on-write snapshot over a host directory.

The host directory is the read-only lower layer and is never written. The upper layer is a
private directory of this VM (0700, under the VM's directory) that receives a file the first
time the guest changes it (copy-up), and every file the guest creates. Deletions are kept
in memory as `hidden` paths: the lower layer is invisible at a hidden path and below it (a
whiteout; an upper directory at a hidden path is an opaque directory). Nothing is copied at
start, so mounting a 2 GB tree costs what mounting an empty one does; the upper layer is
deleted with the provider.

What the guest has not written is read from the host directory as it is now: host edits to
such files show through; the guest's writes never reach the host.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat

from matchlock.vfs._fuse import RENAME_EXCHANGE, RENAME_NOREPLACE, Attr
from matchlock.vfs._hostfs import (
    SAFE_MODE_BITS,
    HostHandle,
    Owners,
    apply_setattr,
    attr_from_stat,
    create_file,
    statfs_of,
    xattr_get,
    xattr_list,
    xattr_remove,
    xattr_set,
)
from matchlock.vfs._hosttree import HostTree
from matchlock.vfs._provider import (
    DirEntry,
    Handle,
    Provider,
    SetAttr,
    StatFs,
    fail,
    is_write_open,
    join,
    split,
)

_COPY_CHUNK = 1 << 30


class _SnapHandle(HostHandle):
    upper = False

    def fsync(self, datasync: bool) -> None:
        return None  # the upper layer is thrown away with the VM: nothing to make durable


class SnapshotFS(Provider):
    kind = "overlay"
    exclusive = True

    def __init__(self, source: str | os.PathLike, private_dir: str | os.PathLike, *,
                 single: str | None = None, uid: int = 0, gid: int = 0, salt: int = 0) -> None:
        self.lower = HostTree(source, single)
        self.private_dir = os.fspath(private_dir)
        os.mkdir(self.private_dir, 0o700)
        up, work = os.path.join(self.private_dir, "upper"), os.path.join(self.private_dir, "work")
        os.mkdir(work, 0o700)
        os.mkdir(up, 0o700)
        if single is None:
            st = self.lower.lstat("")
            os.chmod(up, st.st_mode & SAFE_MODE_BITS)
            os.utime(up, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.upper = HostTree(up, single)
        self.work = HostTree(work)
        self.hidden: set[str] = set()
        self.owners = Owners(uid, gid)
        self.salt = salt
        self._tmp = itertools.count()

    # -- layers --------------------------------------------------------------------------

    def _up(self, path: str) -> os.stat_result | None:
        try:
            return self.upper.lstat(path)
        except FileNotFoundError:
            return None

    def _visible(self, path: str) -> bool:
        hidden = self.hidden
        if not hidden:
            return True
        if path in hidden:
            return False
        i = path.find("/")
        while i >= 0:
            if path[:i] in hidden:
                return False
            i = path.find("/", i + 1)
        return True

    def _low(self, path: str) -> os.stat_result | None:
        if not self._visible(path):
            return None
        try:
            return self.lower.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _find(self, path: str) -> tuple[bool, os.stat_result]:
        """(in upper, stat) for a path that exists in the merged view."""
        st = self._up(path)
        if st is not None:
            return True, st
        st = self._low(path)
        if st is None:
            raise fail(errno.ENOENT, path)
        return False, st

    def _exists(self, path: str) -> os.stat_result | None:
        try:
            return self._find(path)[1]
        except FileNotFoundError:
            return None

    def _attr(self, path: str, st: os.stat_result) -> Attr:
        return attr_from_stat(st, self.owners.get(path), self.salt)

    # -- copy-up -------------------------------------------------------------------------

    def _copy_up(self, path: str, data: bool = True) -> None:
        """Make `path` exist in the upper layer (its parents first)."""
        if self._up(path) is not None:
            return
        low = self._low(path)
        if low is None:
            raise fail(errno.ENOENT, path)
        if path:
            self._copy_up(split(path)[0])
        fmt = stat.S_IFMT(low.st_mode)
        perm = low.st_mode & SAFE_MODE_BITS
        if fmt == stat.S_IFDIR:
            self.upper.mkdir(path, 0o700)
            self.upper.chmod(path, perm)
        elif fmt == stat.S_IFREG:
            self._copy_file(path, perm, data)
        elif fmt == stat.S_IFLNK:
            self.upper.symlink(self.lower.readlink(path), path)
        elif fmt == stat.S_IFIFO:
            self.upper.mkfifo(path, perm)
        else:
            raise fail(errno.EPERM, f"{path}: device nodes are not copied")
        self.upper.utime(path, low.st_atime_ns, low.st_mtime_ns)

    def _copy_file(self, path: str, perm: int, data: bool) -> None:
        # Into the work dir first, then renamed into place: a failed copy (ENOSPC) leaves
        # nothing half-written in the upper layer.
        tmp = f"c{next(self._tmp)}"
        dst = self.work.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if data:
                src = self.lower.open(path, os.O_RDONLY)
                try:
                    _copy_fd(src, dst)
                finally:
                    os.close(src)
            os.fchmod(dst, perm)
            with self.upper.at(path) as (pfd, name):
                os.rename(tmp, name, src_dir_fd=self.work.rootfd, dst_dir_fd=pfd)
        except BaseException:
            try:
                self.work.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            os.close(dst)

    def _copy_up_tree(self, path: str) -> None:
        self._copy_up(path)
        for ent in self.readdir(path):
            child = join(path, ent.name)
            if stat.S_ISDIR(ent.attr.mode):
                self._copy_up_tree(child)
            else:
                self._copy_up(child)

    def _hide(self, path: str) -> None:
        pre = path + "/"
        stale = [h for h in self.hidden if h.startswith(pre)]
        self.hidden.difference_update(stale)
        self.hidden.add(path)

    # -- reads ---------------------------------------------------------------------------

    def getattr(self, path: str) -> Attr:
        return self._attr(path, self._find(path)[1])

    def _names(self, path: str) -> dict[str, bool]:
        up, st = self._find(path)
        if not stat.S_ISDIR(st.st_mode):
            raise fail(errno.ENOTDIR, path)
        names: dict[str, bool] = {}
        ust = st if up else None
        if ust is not None:
            names = dict.fromkeys(self.upper.listdir(path), True)
        low = self._low(path)
        if low is not None and stat.S_ISDIR(low.st_mode):
            for n in self.lower.listdir(path):
                if n not in names and self._visible(join(path, n)):
                    names[n] = False
        return names

    def readdir(self, path: str) -> list[DirEntry]:
        out = []
        for name, up in self._names(path).items():
            p = join(path, name)
            try:
                st = (self.upper if up else self.lower).lstat(p)
            except FileNotFoundError:
                continue
            out.append(DirEntry(name, self._attr(p, st)))
        return out

    def readlink(self, path: str) -> str:
        up, _ = self._find(path)
        return (self.upper if up else self.lower).readlink(path)

    def open(self, path: str, flags: int) -> Handle:
        flags &= ~os.O_CREAT
        if is_write_open(flags):
            if self._up(path) is None:
                self._copy_up(path, data=not flags & os.O_TRUNC)
            return self._handle(self.upper.open(path, flags), path, True)
        up, _ = self._find(path)
        if up:
            return self._handle(self.upper.open(path, flags), path, True)
        return self._handle(self.lower.open(path, os.O_RDONLY), path, False)

    def _handle(self, fd: int, path: str, upper: bool) -> _SnapHandle:
        h = _SnapHandle(fd, path, lambda st: self._attr(path, st))
        h.upper = upper
        return h

    # -- writes --------------------------------------------------------------------------

    def _prepare_new(self, path: str) -> None:
        if self._exists(path) is not None:
            raise fail(errno.EEXIST, path)
        self._copy_up(split(path)[0])

    def create(self, path: str, flags: int, mode: int, uid: int, gid: int) -> tuple[Handle, Attr]:
        if self._exists(path) is not None:
            if flags & os.O_EXCL:
                raise fail(errno.EEXIST, path)
            h = self.open(path, flags)
            return h, h.getattr()
        self._copy_up(split(path)[0])
        fd, _ = create_file(self.upper, path, flags | os.O_EXCL, mode)
        self.owners.set(path, uid, gid)
        h = self._handle(fd, path, True)
        return h, h.getattr()

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        self._prepare_new(path)
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFREG:
            os.close(self.upper.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                     mode & SAFE_MODE_BITS))
        elif fmt == stat.S_IFIFO:
            self.upper.mkfifo(path, mode & SAFE_MODE_BITS)
        else:
            raise fail(errno.EPERM, "device nodes are not allowed on host mounts")
        self.owners.set(path, uid, gid)
        return self.getattr(path)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> Attr:
        self._prepare_new(path)
        self.upper.mkdir(path, mode & SAFE_MODE_BITS)
        self.owners.set(path, uid, gid)
        return self.getattr(path)

    def symlink(self, target: str, path: str, uid: int, gid: int) -> Attr:
        self._prepare_new(path)
        self.upper.symlink(target, path)
        self.owners.set(path, uid, gid)
        return self.getattr(path)

    def link(self, old: str, new: str) -> Attr:
        st = self._find(old)[1]
        if stat.S_ISDIR(st.st_mode):
            raise fail(errno.EPERM, old)
        self._prepare_new(new)
        self._copy_up(old)
        self.upper.link(old, new)
        self.owners.set(new, *self.owners.get(old))
        return self.getattr(new)

    def unlink(self, path: str) -> None:
        up, low = self._up(path), self._low(path)
        if up is None and low is None:
            raise fail(errno.ENOENT, path)
        if stat.S_ISDIR((up or low).st_mode):
            raise fail(errno.EISDIR, path)
        if up is not None:
            self.upper.unlink(path)
        if low is not None:
            self._hide(path)
        self.owners.drop(path)

    def rmdir(self, path: str) -> None:
        up, low = self._up(path), self._low(path)
        if up is None and low is None:
            raise fail(errno.ENOENT, path)
        if not stat.S_ISDIR((up or low).st_mode):
            raise fail(errno.ENOTDIR, path)
        if not path:
            raise fail(errno.EBUSY)
        if self._names(path):
            raise fail(errno.ENOTEMPTY, path)
        if up is not None:
            self.upper.rmdir(path)
        if low is not None:
            self._hide(path)
        self.owners.drop(path)

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags & RENAME_EXCHANGE:
            raise fail(errno.EINVAL, "RENAME_EXCHANGE is not supported on snapshot mounts")
        if not old or not new:
            raise fail(errno.EBUSY)
        src = self._find(old)[1]
        dst = self._exists(new)
        is_dir = stat.S_ISDIR(src.st_mode)
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise fail(errno.EEXIST, new)
            if old == new:
                return
            if is_dir and not stat.S_ISDIR(dst.st_mode):
                raise fail(errno.ENOTDIR, new)
            if not is_dir and stat.S_ISDIR(dst.st_mode):
                raise fail(errno.EISDIR, new)
            if stat.S_ISDIR(dst.st_mode) and self._names(new):
                raise fail(errno.ENOTEMPTY, new)
        if new.startswith(old + "/"):
            raise fail(errno.EINVAL, new)
        if is_dir:
            self._copy_up_tree(old)  # the upper copy becomes complete: opaque at `new`
        else:
            self._copy_up(old)
        self._copy_up(split(new)[0])
        if dst is not None and stat.S_ISDIR(dst.st_mode) and self._up(new) is None:
            self.upper.mkdir(new, 0o700)  # an empty lower dir: replace it in the upper layer
        self.upper.rename(old, new)
        if self._low(old) is not None:
            self._hide(old)
        if is_dir:
            self._hide(new)
        self.owners.move(old, new)

    def setattr(self, path: str, change: SetAttr, handle: Handle | None) -> Attr:
        up_handle = handle if isinstance(handle, _SnapHandle) and handle.upper \
            and handle.fd >= 0 else None
        if self._up(path) is None:
            self._copy_up(path, data=change.size != 0)
        apply_setattr(self.upper, path, change, up_handle)
        if change.uid is not None or change.gid is not None:
            self.owners.set(path, change.uid, change.gid)
        return self.getattr(path)

    def statfs(self) -> StatFs:
        return statfs_of(self.upper)

    def fsyncdir(self, path: str) -> None:
        return None  # the upper layer is thrown away with the VM: nothing to make durable

    def getxattr(self, path: str, name: str) -> bytes:
        up, _ = self._find(path)
        return xattr_get(self.upper if up else self.lower, path, name)

    def listxattr(self, path: str) -> list[str]:
        up, _ = self._find(path)
        return xattr_list(self.upper if up else self.lower, path)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        if not name.startswith("user."):
            raise fail(errno.EOPNOTSUPP, name)
        self._copy_up(path)
        xattr_set(self.upper, path, name, value, flags)

    def removexattr(self, path: str, name: str) -> None:
        self._copy_up(path)
        xattr_remove(self.upper, path, name)

    def close(self) -> None:
        for t in (self.lower, self.upper, self.work):
            t.close()
        shutil.rmtree(self.private_dir, ignore_errors=True)


def _copy_fd(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, _COPY_CHUNK):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    off = os.lseek(dst, 0, os.SEEK_CUR)
    os.lseek(src, off, os.SEEK_SET)
    while True:
        buf = os.read(src, 1 << 20)
        if not buf:
            return
        view = memoryview(buf)
        while view:
            view = view[os.write(dst, view):]
