"""`memory`: a file system in host RAM, lost with the VM (the bare `--workspace`).

A real inode tree: hard links share an inode, an unlinked file stays readable through
its open handles, O_TRUNC truncates. Bounded: file data beyond `max_bytes` or more than
`max_inodes` inodes give ENOSPC, so a guest cannot grow the host's memory without end.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time

from matchlock.vfs._fuse import RENAME_EXCHANGE, RENAME_NOREPLACE, Attr
from matchlock.vfs._provider import (
    DirEntry,
    Handle,
    Provider,
    SetAttr,
    StatFs,
    fail,
    split,
)

DEFAULT_MAX_BYTES = 2 << 30
DEFAULT_MAX_INODES = 1 << 20
_BLOCK = 4096


class _Inode:
    __slots__ = ("ino", "mode", "uid", "gid", "nlink", "atime", "mtime", "ctime", "data",
                 "children", "target", "xattrs", "rdev")

    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        t = time.time_ns()
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.atime = self.mtime = self.ctime = t
        self.data = bytearray() if stat.S_ISREG(mode) else None
        self.children: dict[str, _Inode] | None = {} if stat.S_ISDIR(mode) else None
        self.target = ""
        self.xattrs: dict[str, bytes] = {}
        self.rdev = 0

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.children is not None:
            return _BLOCK
        return len(self.target.encode(errors="surrogateescape"))

    def attr(self) -> Attr:
        size = self.size()
        return Attr(ino=self.ino, mode=self.mode, nlink=self.nlink, uid=self.uid, gid=self.gid,
                    size=size, blocks=(size + 511) // 512, atime_ns=self.atime,
                    mtime_ns=self.mtime, ctime_ns=self.ctime, rdev=self.rdev)

    def touch(self) -> None:
        self.mtime = self.ctime = time.time_ns()


class _MemHandle(Handle):
    def __init__(self, fs: MemoryFS, node: _Inode, path: str) -> None:
        self.fs, self.node, self.path = fs, node, path

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.node.data[offset:offset + size])

    def write(self, offset: int, data: bytes | memoryview) -> int:
        d = self.node.data
        end = offset + len(data)
        if end > len(d):
            self.fs._grow(end - len(d))
            if offset > len(d):
                d.extend(bytes(offset - len(d)))
        d[offset:end] = data
        self.node.touch()
        return len(data)

    def truncate(self, size: int) -> None:
        self.fs._resize(self.node, size)

    def allocate(self, offset: int, length: int, mode: int) -> None:
        if mode:
            raise fail(errno.EOPNOTSUPP)
        if offset + length > len(self.node.data):
            self.fs._resize(self.node, offset + length)

    def getattr(self) -> Attr:
        return self.node.attr()

    def setattr(self, change: SetAttr) -> Attr:
        return self.fs._apply(self.node, change)


class MemoryFS(Provider):
    kind = "memory"
    exclusive = True

    def __init__(self, *, uid: int = 0, gid: int = 0, mode: int = 0o755,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_inodes: int = DEFAULT_MAX_INODES,
                 salt: int = 0) -> None:
        self._inos = itertools.count(salt + 1)
        self.max_bytes, self.max_inodes = max_bytes, max_inodes
        self.used_bytes = 0
        self.inodes = 1
        self.root = _Inode(next(self._inos), stat.S_IFDIR | mode, uid, gid)

    # -- accounting ----------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        if self.used_bytes + n > self.max_bytes:
            raise fail(errno.ENOSPC, "memory workspace is full")
        self.used_bytes += n

    def _resize(self, node: _Inode, size: int) -> None:
        d = node.data
        if d is None:
            raise fail(errno.EISDIR)
        if size > len(d):
            self._grow(size - len(d))
            d.extend(bytes(size - len(d)))
        else:
            self.used_bytes -= len(d) - size
            del d[size:]
        node.touch()

    def _new(self, mode: int, uid: int, gid: int) -> _Inode:
        if self.inodes >= self.max_inodes:
            raise fail(errno.ENOSPC, "memory workspace has too many files")
        self.inodes += 1
        return _Inode(next(self._inos), mode, uid, gid)

    def _drop(self, node: _Inode) -> None:
        """One name of a file is gone; the last one frees it."""
        node.nlink -= 1
        if node.nlink <= 0:
            self.inodes -= 1
            if node.data is not None:
                # Open handles keep reading it (POSIX); the bytes go with the last handle.
                self.used_bytes -= len(node.data)

    # -- lookup --------------------------------------------------------------------------

    def _node(self, path: str) -> _Inode:
        node = self.root
        if not path:
            return node
        for comp in path.split("/"):
            if node.children is None:
                raise fail(errno.ENOTDIR, path)
            nxt = node.children.get(comp)
            if nxt is None:
                raise fail(errno.ENOENT, path)
            node = nxt
        return node

    def _dir(self, path: str) -> tuple[_Inode, str]:
        head, name = split(path)
        parent = self._node(head)
        if parent.children is None:
            raise fail(errno.ENOTDIR, head)
        return parent, name

    def _add(self, path: str, node_factory) -> _Inode:
        parent, name = self._dir(path)
        if name in parent.children:
            raise fail(errno.EEXIST, path)
        node = node_factory()
        parent.children[name] = node
        if node.children is not None:
            parent.nlink += 1
        parent.touch()
        return node

    # -- provider ------------------------------------------------------------------------

    def getattr(self, path: str) -> Attr:
        return self._node(path).attr()

    def readdir(self, path: str) -> list[DirEntry]:
        node = self._node(path)
        if node.children is None:
            raise fail(errno.ENOTDIR, path)
        return [DirEntry(n, c.attr()) for n, c in node.children.items()]

    def open(self, path: str, flags: int) -> Handle:
        node = self._node(path)
        if node.children is not None:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise fail(errno.EISDIR, path)
        elif node.data is None:
            raise fail(errno.EACCES, path)  # a FIFO or symlink: nothing to serve
        if flags & os.O_TRUNC and node.data:
            self._resize(node, 0)
        return _MemHandle(self, node, path)

    def create(self, path: str, flags: int, mode: int, uid: int, gid: int) -> tuple[Handle, Attr]:
        parent, name = self._dir(path)
        if name in parent.children:
            if flags & os.O_EXCL:
                raise fail(errno.EEXIST, path)
            h = self.open(path, flags)
            return h, h.getattr()
        node = self._add(path, lambda: self._new(stat.S_IFREG | (mode & 0o7777), uid, gid))
        return _MemHandle(self, node, path), node.attr()

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        fmt = stat.S_IFMT(mode)
        if fmt not in (stat.S_IFREG, stat.S_IFIFO):
            raise fail(errno.EPERM, "only regular files and FIFOs can be created here")
        node = self._add(path, lambda: self._new(fmt | (mode & 0o7777), uid, gid))
        return node.attr()

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> Attr:
        return self._add(path, lambda: self._new(stat.S_IFDIR | (mode & 0o7777), uid,
                                                 gid)).attr()

    def symlink(self, target: str, path: str, uid: int, gid: int) -> Attr:
        def make() -> _Inode:
            n = self._new(stat.S_IFLNK | 0o777, uid, gid)
            n.target = target
            return n

        return self._add(path, make).attr()

    def link(self, old: str, new: str) -> Attr:
        node = self._node(old)
        if node.children is not None:
            raise fail(errno.EPERM, old)
        parent, name = self._dir(new)
        if name in parent.children:
            raise fail(errno.EEXIST, new)
        parent.children[name] = node
        node.nlink += 1
        node.ctime = time.time_ns()
        parent.touch()
        return node.attr()

    def readlink(self, path: str) -> str:
        node = self._node(path)
        if not stat.S_ISLNK(node.mode):
            raise fail(errno.EINVAL, path)
        return node.target

    def unlink(self, path: str) -> None:
        parent, name = self._dir(path)
        node = parent.children.get(name)
        if node is None:
            raise fail(errno.ENOENT, path)
        if node.children is not None:
            raise fail(errno.EISDIR, path)
        del parent.children[name]
        parent.touch()
        self._drop(node)

    def rmdir(self, path: str) -> None:
        if not path:
            raise fail(errno.EBUSY)
        parent, name = self._dir(path)
        node = parent.children.get(name)
        if node is None:
            raise fail(errno.ENOENT, path)
        if node.children is None:
            raise fail(errno.ENOTDIR, path)
        if node.children:
            raise fail(errno.ENOTEMPTY, path)
        del parent.children[name]
        parent.nlink -= 1
        parent.touch()
        self.inodes -= 1

    def rename(self, old: str, new: str, flags: int) -> None:
        if not old or not new:
            raise fail(errno.EBUSY)
        op, oname = self._dir(old)
        np_, nname = self._dir(new)
        node = op.children.get(oname)
        if node is None:
            raise fail(errno.ENOENT, old)
        if new.startswith(old + "/"):
            raise fail(errno.EINVAL, new)
        dst = np_.children.get(nname)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise fail(errno.ENOENT, new)
            op.children[oname], np_.children[nname] = dst, node
            if (node.children is None) != (dst.children is None) and op is not np_:
                d = 1 if node.children is not None else -1
                op.nlink -= d
                np_.nlink += d
            op.touch()
            np_.touch()
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise fail(errno.EEXIST, new)
            if dst is node:
                return
            if node.children is not None and dst.children is None:
                raise fail(errno.ENOTDIR, new)
            if node.children is None and dst.children is not None:
                raise fail(errno.EISDIR, new)
            if dst.children:
                raise fail(errno.ENOTEMPTY, new)
            if dst.children is not None:
                np_.nlink -= 1
                self.inodes -= 1
            else:
                self._drop(dst)
        del op.children[oname]
        np_.children[nname] = node
        if node.children is not None:
            op.nlink -= 1
            np_.nlink += 1
        node.ctime = time.time_ns()
        op.touch()
        np_.touch()

    def setattr(self, path: str, change: SetAttr, handle: Handle | None) -> Attr:
        node = handle.node if isinstance(handle, _MemHandle) else self._node(path)
        return self._apply(node, change)

    def _apply(self, node: _Inode, change: SetAttr) -> Attr:
        now = time.time_ns()
        if change.mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (change.mode & 0o7777)
        if change.uid is not None:
            node.uid = change.uid
        if change.gid is not None:
            node.gid = change.gid
        if change.size is not None:
            self._resize(node, change.size)
        if change.atime_ns is not None:
            node.atime = now if change.atime_ns == "now" else int(change.atime_ns)
        if change.mtime_ns is not None:
            node.mtime = now if change.mtime_ns == "now" else int(change.mtime_ns)
        node.ctime = now
        return node.attr()

    def statfs(self) -> StatFs:
        total = self.max_bytes // _BLOCK
        free = max(0, total - self.used_bytes // _BLOCK)
        return StatFs(blocks=total, bfree=free, bavail=free, files=self.max_inodes,
                      ffree=max(0, self.max_inodes - self.inodes))

    def getxattr(self, path: str, name: str) -> bytes:
        v = self._node(path).xattrs.get(name)
        if v is None:
            raise fail(errno.ENODATA)
        return v

    def listxattr(self, path: str) -> list[str]:
        return list(self._node(path).xattrs)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        node = self._node(path)
        if not name.startswith("user.") or stat.S_ISLNK(node.mode):
            raise fail(errno.EOPNOTSUPP, name)
        if flags == 1 and name in node.xattrs:  # XATTR_CREATE
            raise fail(errno.EEXIST)
        if flags == 2 and name not in node.xattrs:  # XATTR_REPLACE
            raise fail(errno.ENODATA)
        if len(node.xattrs) >= 64:
            raise fail(errno.ENOSPC)
        node.xattrs[name] = bytes(value)

    def removexattr(self, path: str, name: str) -> None:
        node = self._node(path)
        if node.xattrs.pop(name, None) is None:
            raise fail(errno.ENODATA)

    def ensure_dir(self, path: str) -> None:
        """mkdir -p (the server's placeholders for mount points)."""
        node = self.root
        for comp in path.split("/") if path else ():
            nxt = node.children.get(comp)
            if nxt is None:
                nxt = self._new(stat.S_IFDIR | 0o755, self.root.uid, self.root.gid)
                node.children[comp] = nxt
                node.nlink += 1
            node = nxt

    def ensure_file(self, path: str) -> None:
        head, name = split(path)
        self.ensure_dir(head)
        parent = self._node(head)
        if name not in parent.children:
            parent.children[name] = self._new(stat.S_IFREG | 0o644, self.root.uid, self.root.gid)
