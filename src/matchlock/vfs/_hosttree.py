"""Confined access to one host directory: every path resolves beneath its root, with no
symlink followed and no `..`, so nothing the guest names can reach outside it.

Each operation opens the parent directory with openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) (or, without openat2, one O_NOFOLLOW openat
per component) and then acts on the last component with a *at call that does not follow
it. A symlink swapped in for a directory between the guest's lookup and the operation
makes the operation fail (ELOOP/ENOTDIR); it never redirects it. Symlinks themselves are
data: readlink returns their text and the guest kernel resolves it inside the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
from collections.abc import Iterator

from matchlock.vfs._provider import fail

_O_PATH = getattr(os, "O_PATH", 0)
_DIR_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_have_openat2 = _SYS_OPENAT2 is not None


def _openat2(dirfd: int, path: bytes, flags: int) -> int:
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(path),
                  ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


class HostTree:
    """A host directory (or one file: `single` names it inside `root`)."""

    def __init__(self, root: str | os.PathLike, single: str | None = None) -> None:
        self.root = os.fspath(root)
        self.single = single
        self.rootfd = os.open(self.root, _DIR_FLAGS)

    def close(self) -> None:
        if self.rootfd >= 0:
            os.close(self.rootfd)
            self.rootfd = -1

    # -- resolution ----------------------------------------------------------------------

    def _components(self, path: str) -> tuple[str, str]:
        """(parent dir relative to root, last name); ("", "") is the root itself."""
        if self.single is not None:
            if path:
                raise fail(errno.ENOTDIR, path)
            return "", self.single
        head, _, tail = path.rpartition("/")
        if path and tail in ("", ".", ".."):
            # The file system layer never sends these; a bug must not reach the parent.
            raise fail(errno.EACCES, path)
        return head, tail

    def _open_dir(self, rel: str) -> int:
        global _have_openat2
        if not rel:
            return os.dup(self.rootfd)
        raw = os.fsencode(rel)
        if _have_openat2:
            try:
                return _openat2(self.rootfd, raw, _DIR_FLAGS)
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    if e.errno == errno.EXDEV:  # RESOLVE_BENEATH: would have left the root
                        raise fail(errno.EACCES, rel) from None
                    raise
                _have_openat2 = False
        fd = os.dup(self.rootfd)
        try:
            for comp in raw.split(b"/"):
                if comp in (b"", b".", b".."):
                    raise fail(errno.EACCES, rel)
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def at(self, path: str) -> Iterator[tuple[int, str]]:
        """(dirfd, name) for `path`; name "" means the root directory itself (use dirfd)."""
        head, name = self._components(path)
        fd = self._open_dir(head)
        try:
            yield fd, name
        finally:
            os.close(fd)

    # -- operations ----------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        with self.at(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False) if name else os.stat(fd)

    def exists(self, path: str) -> bool:
        try:
            self.lstat(path)
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        with self.at(path) as (fd, name):
            if self.single is not None:
                raise fail(errno.ENOTDIR, path)
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd) if name else os.open(".", os.O_RDONLY | os.O_CLOEXEC,
                                                          dir_fd=fd)
            try:
                return os.listdir(dfd)
            finally:
                os.close(dfd)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """An fd for a regular file (never through a symlink; never a device or FIFO
        opened for I/O: O_NONBLOCK keeps a FIFO from hanging the server)."""
        with self.at(path) as (fd, name):
            if not name:
                raise fail(errno.EISDIR, path)
            if not flags & os.O_CREAT or not flags & os.O_EXCL:
                # Refuse devices and FIFOs before open() can reach a driver.
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not flags & os.O_CREAT:
                        raise
                else:
                    if stat.S_ISLNK(st.st_mode):
                        raise fail(errno.ELOOP, path)
                    if not stat.S_ISREG(st.st_mode):
                        raise fail(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EACCES,
                                   path)
            flags = (flags & ~(os.O_NOCTTY | getattr(os, "O_ASYNC", 0))) | os.O_NOFOLLOW \
                | os.O_CLOEXEC | os.O_NOCTTY
            nfd = os.open(name, flags | os.O_NONBLOCK, mode, dir_fd=fd)
        try:
            st = os.fstat(nfd)
            if not stat.S_ISREG(st.st_mode):
                raise fail(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EACCES, path)
            if not flags & os.O_NONBLOCK:
                os.set_blocking(nfd, True)
        except BaseException:
            os.close(nfd)
            raise
        return nfd

    def open_path(self, path: str) -> int:
        """An O_PATH fd for the object itself (a symlink stays a symlink)."""
        with self.at(path) as (fd, name):
            if not name:
                return os.dup(fd)
            return os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)

    def mkdir(self, path: str, mode: int) -> None:
        with self.at(path) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def mkfifo(self, path: str, mode: int) -> None:
        with self.at(path) as (fd, name):
            os.mkfifo(name, mode, dir_fd=fd)

    def symlink(self, target: str, path: str) -> None:
        with self.at(path) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def readlink(self, path: str) -> str:
        with self.at(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def unlink(self, path: str) -> None:
        with self.at(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def rmdir(self, path: str) -> None:
        with self.at(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        with self.at(old) as (ofd, oname), self.at(new) as (nfd, nname):
            if not oname or not nname:
                raise fail(errno.EBUSY)
            if flags:
                _renameat2(ofd, oname, nfd, nname, flags)
            else:
                os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)

    def link(self, old: str, new: str) -> None:
        with self.at(old) as (ofd, oname), self.at(new) as (nfd, nname):
            os.link(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd, follow_symlinks=False)

    def chmod(self, path: str, mode: int) -> None:
        pfd = self.open_path(path)
        try:
            if stat.S_ISLNK(os.fstat(pfd).st_mode):
                return  # Linux has no symlink modes
            # chmod through the fd's magic link: the very inode opened without following.
            os.chmod(f"/proc/self/fd/{pfd}", mode)
        finally:
            os.close(pfd)

    def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        with self.at(path) as (fd, name):
            if name:
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)
            else:
                os.utime(f"/proc/self/fd/{fd}", ns=(atime_ns, mtime_ns))

    def truncate(self, path: str, size: int) -> None:
        fd = self.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def fsyncdir(self, path: str) -> None:
        with self.at(path) as (fd, name):
            dfd = os.open(name or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                          | os.O_CLOEXEC, dir_fd=fd)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(f"/proc/self/fd/{self.rootfd}")

    def xattr_path(self, path: str) -> tuple[int, str]:
        """(fd, path string) naming the object for the *xattr calls, without following."""
        pfd = self.open_path(path)
        return pfd, f"/proc/self/fd/{pfd}"


_renameat2_fn = getattr(_libc, "renameat2", None)


def _renameat2(ofd: int, oname: str, nfd: int, nname: str, flags: int) -> None:
    if _renameat2_fn is None:
        raise fail(errno.EINVAL)
    r = _renameat2_fn(ctypes.c_int(ofd), ctypes.c_char_p(os.fsencode(oname)), ctypes.c_int(nfd),
                      ctypes.c_char_p(os.fsencode(nname)), ctypes.c_uint(flags))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
