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

A regular file the guest creates starts in memory (a memfd, `_MemFile`), not in the upper
directory: giving a host file system a new inode is the dear part of a small file (here
0.5-1.1 ms of kernel CPU on ext4, against 15 us for a memfd), and a snapshot's files need no
name on the host. One moves to the upper directory (copy, then `dup2` onto every open
handle's fd, so handles never notice) when it grows past `MEM_FILE_MAX`, when the memory
files of the process would pass `MEM_TOTAL_MAX`, and before a hard link or an xattr change;
it keeps the inode number the guest saw. Each holds an fd: at most `_MemBudget.fds` of them.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import shutil
import stat
import threading

from matchlock.vfs._fuse import RENAME_EXCHANGE, RENAME_NOREPLACE, Attr
from matchlock.vfs._hostfs import (
    SAFE_MODE_BITS,
    HostHandle,
    Owners,
    apply_setattr,
    attr_from_stat,
    create_file,
    ino_of,
    setattr_fd,
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
MEM_FILE_MAX = 256 << 10  # a new file moves to the upper directory past this size...
MEM_TOTAL_MAX = 64 << 20  # ...or when all memory files of the process would pass this
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOFOLLOW | os.O_DIRECTORY | \
    os.O_NOCTTY


class _MemBudget:
    """What memory files may take, for the whole process (every snapshot in it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = MEM_TOTAL_MAX
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            try:  # as Go programs do at start; nothing here uses select()
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):
                pass
        soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
        self.fds = max(0, soft - 1024 - soft // 8)  # the rest for sockets, disks, handles

    def take(self, fds: int, nbytes: int) -> bool:
        with self.lock:
            if fds > self.fds or nbytes > self.bytes:
                return False
            self.fds -= fds
            self.bytes -= nbytes
            return True

    def give(self, fds: int, nbytes: int) -> None:
        with self.lock:
            self.fds += fds
            self.bytes += nbytes


_budget: _MemBudget | None = None
_budget_lock = threading.Lock()


def _mem_budget() -> _MemBudget:
    global _budget
    if _budget is None:
        with _budget_lock:  # VFS threads of several VMs may ask first at once
            if _budget is None:
                _budget = _MemBudget()
    return _budget


class _MemFile:
    """A created file still in memory: `fd` its memfd (None once unlinked), `size` the bytes
    it holds of the budget, `handles` the open handles on it."""

    __slots__ = ("path", "fd", "key", "size", "handles")

    def __init__(self, fd: int) -> None:
        self.path: str | None = None
        self.fd: int | None = fd
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)
        self.size = 0
        self.handles: set[_SnapHandle] = set()


class _SnapHandle(HostHandle):
    upper = False
    mem: _MemFile | None = None  # the memory file it is open on, until that moves to disk
    fs: SnapshotFS | None = None
    flags = 0

    def fsync(self, datasync: bool) -> None:
        return None  # the upper layer is thrown away with the VM: nothing to make durable

    # Changes to a memory file are serialised with its move to disk (READ/WRITE run on
    # worker threads too): a write to the memfd during the copy would be lost.
    def _locked(self, size: int | None, grow_only: bool, op, *args):  # noqa: ANN202
        """op(*args), for a memory file under mem_lock after accounting for it becoming
        `size` bytes (None: no change of size)."""
        if self.mem is None or self.fs is None:
            return op(*args)
        with self.fs.mem_lock:
            if self.mem is not None and size is not None:
                self.fs.mem_resize(self.mem, size, grow_only)
            return op(*args)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        return self._locked(offset + len(data), True, super().write, offset, data)

    def truncate(self, size: int) -> None:
        self._locked(size, False, super().truncate, size)

    def allocate(self, offset: int, length: int, mode: int) -> None:
        self._locked(None if mode else offset + length, True, super().allocate, offset, length,
                     mode)

    def setattr(self, change: SetAttr) -> Attr:
        return self._locked(change.size, False, super().setattr, change)

    def release(self) -> None:
        if self.fs is not None:
            with self.fs.mem_lock:
                if self.mem is not None:
                    self.fs.mem_closed(self.mem, self)
                super().release()
            return
        super().release()


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
        # Memory files (see the module's docstring). The index and every memfd are used
        # under mem_lock: a write on a worker thread may move a file to disk.
        self.mem_lock = threading.RLock()
        self._mem: dict[str, _MemFile] = {}
        self._mem_dirs: dict[str, dict[str, _MemFile]] = {}
        self._mem_on = single is None
        self._upper_dev = os.fstat(self.upper.rootfd).st_dev
        self._inos: dict[int, int] = {}  # upper inode -> the number it had in memory
        self._linked: set[tuple[int, int]] = set()  # (dev, ino) of memfds that have a name

    # -- layers --------------------------------------------------------------------------

    def _up(self, path: str) -> os.stat_result | None:
        if self._mem:
            with self.mem_lock:
                m = self._mem.get(path)
                if m is not None:
                    return os.fstat(m.fd)  # type: ignore[arg-type]
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
        a = attr_from_stat(st, self.owners.get(path), self.salt)
        if not st.st_nlink:
            if (st.st_dev, st.st_ino) in self._linked:
                a.nlink = 1  # a memfd never has a name on the host; the guest's file has one
        elif self._inos and st.st_dev == self._upper_dev:
            a.ino = self._inos.get(st.st_ino, a.ino)
        return a

    # -- memory files (called with mem_lock held) -----------------------------------------

    def _mem_index(self, m: _MemFile, path: str | None) -> None:
        """Move `m` to `path` in the index (None: out of it)."""
        if m.path is not None:
            del self._mem[m.path]
            parent, name = split(m.path)
            d = self._mem_dirs[parent]
            del d[name]
            if not d:
                del self._mem_dirs[parent]
        m.path = path
        if path is not None:
            self._mem[path] = m
            parent, name = split(path)
            self._mem_dirs.setdefault(parent, {})[name] = m

    def _mem_new(self, path: str, mode: int) -> _MemFile | None:
        if not self._mem_on or not _mem_budget().take(1, 0):
            return None
        fd = os.memfd_create("matchlock-vfs", os.MFD_CLOEXEC)
        try:
            os.fchmod(fd, mode & SAFE_MODE_BITS)
        except BaseException:
            os.close(fd)
            _mem_budget().give(1, 0)
            raise
        m = _MemFile(fd)
        self._mem_index(m, path)
        self._linked.add(m.key)
        return m

    def _mem_open(self, m: _MemFile, flags: int) -> _SnapHandle:
        nfd = os.open(f"/proc/self/fd/{m.fd}", (flags & ~_REOPEN_DROP) | os.O_CLOEXEC)
        h = self._handle(nfd, m.path or "", True)
        h.mem, h.fs, h.flags = m, self, flags
        m.handles.add(h)
        if flags & os.O_TRUNC:
            self.mem_resize(m, 0)
            if h.mem is not None:
                os.ftruncate(nfd, 0)
        return h

    def _mem_unlink(self, m: _MemFile) -> None:
        self._mem_index(m, None)
        self._linked.discard(m.key)
        fd, m.fd = m.fd, None
        if fd is not None:
            os.close(fd)
        _mem_budget().give(1, 0)
        if not m.handles:
            _mem_budget().give(0, m.size)
            m.size = 0

    def mem_closed(self, m: _MemFile, h: _SnapHandle) -> None:
        m.handles.discard(h)
        h.mem = None
        if m.fd is None and not m.handles:  # unlinked, and now closed: its bytes are free
            _mem_budget().give(0, m.size)
            m.size = 0

    def mem_resize(self, m: _MemFile, size: int, grow_only: bool = False) -> None:
        """Account for `m` becoming `size` bytes, or move it to disk first."""
        if grow_only and size <= m.size:
            return
        delta = size - m.size
        if size > MEM_FILE_MAX or (delta > 0 and not _mem_budget().take(0, delta)):
            self._mem_to_disk(m)
            return
        if delta < 0:
            _mem_budget().give(0, -delta)
        m.size = size

    def _mem_to_disk(self, m: _MemFile) -> None:
        """Copy `m` to the upper directory (to an unnamed file in the work dir if it was
        unlinked) and point every open handle at the copy."""
        src = m.fd if m.fd is not None else next(iter(m.handles)).fd
        st = os.fstat(src)
        if m.path is not None:
            fd, _ = create_file(self.upper, m.path, os.O_RDWR | os.O_EXCL, 0o600)
        else:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                         dir_fd=self.work.rootfd)
        try:
            os.lseek(src, 0, os.SEEK_SET)
            _copy_fd(src, fd)
            os.fchmod(fd, st.st_mode & SAFE_MODE_BITS)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            for h in m.handles:
                nfd = os.open(f"/proc/self/fd/{fd}", (h.flags & ~_REOPEN_DROP) | os.O_CLOEXEC)
                os.dup2(nfd, h.fd, inheritable=False)
                os.close(nfd)
        except BaseException:
            os.close(fd)
            if m.path is not None:
                self.upper.unlink(m.path)
            raise
        if m.path is not None:
            self._inos[os.fstat(fd).st_ino] = ino_of(st, self.salt)
        os.close(fd)
        for h in m.handles:
            h.mem = None
        m.handles.clear()
        if m.fd is not None:
            os.close(m.fd)
            m.fd = None
            _mem_budget().give(1, 0)
        self._mem_index(m, None)
        self._linked.discard(m.key)
        _mem_budget().give(0, m.size)
        m.size = 0

    def _upper_dir(self, path: str) -> None:
        """Make directory `path` exist in the upper layer (a memory file needs no host call
        that would refuse a parent that is not a directory: this checks it, before a
        copy-up that would be wasted)."""
        if not stat.S_ISDIR(self._find(path)[1].st_mode):
            raise fail(errno.ENOTDIR, path)
        self._copy_up(path)

    def _to_disk(self, path: str) -> None:
        """Before an operation that needs a name on the host (hard link, xattr)."""
        if self._mem:
            with self.mem_lock:
                m = self._mem.get(path)
                if m is not None:
                    self._mem_to_disk(m)

    def _drop_target(self, path: str) -> bool:
        """`path` (in the upper layer) goes: free what it holds. True if it was a memory
        file (nothing is left to remove on the host)."""
        with self.mem_lock:
            m = self._mem.get(path)
            if m is not None:
                self._mem_unlink(m)
                return True
        if self._inos:
            st = self._up(path)
            if st is not None and st.st_nlink <= 1:
                self._inos.pop(st.st_ino, None)
        return False

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
            if self._mem:
                with self.mem_lock:
                    names.update(dict.fromkeys(self._mem_dirs.get(path, ()), True))
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
                st = self._up(p) if up else self.lower.lstat(p)
            except FileNotFoundError:
                continue
            if st is None:
                continue
            out.append(DirEntry(name, self._attr(p, st)))
        return out

    def readlink(self, path: str) -> str:
        up, st = self._find(path)
        if not stat.S_ISLNK(st.st_mode):
            raise fail(errno.EINVAL, path)
        return (self.upper if up else self.lower).readlink(path)

    def open(self, path: str, flags: int) -> Handle:
        flags &= ~os.O_CREAT
        if self._mem:
            with self.mem_lock:
                m = self._mem.get(path)
                if m is not None:
                    return self._mem_open(m, flags)
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
        self._upper_dir(split(path)[0])

    def create(self, path: str, flags: int, mode: int, uid: int, gid: int) -> tuple[Handle, Attr]:
        if self._exists(path) is not None:
            if flags & os.O_EXCL:
                raise fail(errno.EEXIST, path)
            h = self.open(path, flags)
            return h, h.getattr()
        self._upper_dir(split(path)[0])
        with self.mem_lock:
            m = self._mem_new(path, mode)
            if m is not None:
                self.owners.set(path, uid, gid)
                h = self._mem_open(m, flags)
                return h, h.getattr()
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
        self._to_disk(old)
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
        if up is not None and not self._drop_target(path):
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
        if not is_dir and old in self._mem:
            with self.mem_lock:  # a write on a worker must not move `old` to disk meanwhile
                m = self._mem.get(old)
                if m is not None:
                    self._upper_dir(split(new)[0])
                    if dst is not None and self._up(new) is not None and \
                            not self._drop_target(new):
                        self.upper.unlink(new)
                    self._mem_index(m, new)
                    if self._low(old) is not None:
                        self._hide(old)
                    self.owners.move(old, new)
                    return
        if is_dir:
            self._copy_up_tree(old)  # the upper copy becomes complete: opaque at `new`
        else:
            self._copy_up(old)
        self._upper_dir(split(new)[0])
        if dst is not None and stat.S_ISDIR(dst.st_mode) and self._up(new) is None:
            self.upper.mkdir(new, 0o700)  # an empty lower dir: replace it in the upper layer
        elif dst is not None and not is_dir:
            self._drop_target(new)
        self.upper.rename(old, new)
        if is_dir and self._mem:
            with self.mem_lock:
                pre = old + "/"
                for m in [m for k, m in self._mem.items() if k.startswith(pre)]:
                    self._mem_index(m, new + m.path[len(old):])  # type: ignore[index]
        if self._low(old) is not None:
            self._hide(old)
        if is_dir:
            self._hide(new)
        self.owners.move(old, new)

    def setattr(self, path: str, change: SetAttr, handle: Handle | None) -> Attr:
        if self._mem:
            with self.mem_lock:
                m = self._mem.get(path)
                if m is not None and change.size is not None:
                    self.mem_resize(m, change.size)
                    m = self._mem.get(path)
                if m is not None:
                    setattr_fd(m.fd, change)  # type: ignore[arg-type]
                    if change.uid is not None or change.gid is not None:
                        self.owners.set(path, change.uid, change.gid)
                    return self.getattr(path)
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
        if path in self._mem:
            raise fail(errno.ENODATA)  # one that gets an xattr moves to disk first
        return xattr_get(self.upper if up else self.lower, path, name)

    def listxattr(self, path: str) -> list[str]:
        up, _ = self._find(path)
        if path in self._mem:
            return []
        return xattr_list(self.upper if up else self.lower, path)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        if not name.startswith("user."):
            raise fail(errno.EOPNOTSUPP, name)
        self._to_disk(path)
        self._copy_up(path)
        xattr_set(self.upper, path, name, value, flags)

    def removexattr(self, path: str, name: str) -> None:
        self._find(path)
        if path in self._mem:
            raise fail(errno.ENODATA)
        self._copy_up(path)
        xattr_remove(self.upper, path, name)

    def close(self) -> None:
        with self.mem_lock:
            for m in list(self._mem.values()):
                self._mem_unlink(m)
                for h in list(m.handles):  # their fds go with them; their bytes go back now
                    self.mem_closed(m, h)
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
