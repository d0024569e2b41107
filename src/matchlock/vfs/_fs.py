"""The file system the guest's FUSE mount sees: a node table, the mount router, open
handles, hooks, and one method per FUSE opcode. Sans-I/O and synchronous: `handle()`
takes one parsed request and returns the reply bytes (or None for FORGET/INTERRUPT).

Nodes are paths, not host inodes: each node is (parent, name) in a tree of the names the
kernel has looked up, counted by the kernel's lookups and dropped on FORGET. A node's path
inside its mount is found by walking up to the mount's root, so a rename moves one node and
every open handle, cached child and later request follows it. Mounts never nest; the base
(a memory file system, unless a mount sits at the workspace itself) holds placeholder
directories for the mount points, and a request that would cross a mount boundary gets
EXDEV, or EBUSY for the mount point itself.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from matchlock.vfs import _fuse as F
from matchlock.vfs._fuse import Attr, FuseProtocolError, Request
from matchlock.vfs._hooks import HookEngine
from matchlock.vfs._memory import MemoryFS
from matchlock.vfs._provider import DirEntry, Handle, Provider, SetAttr, fail, join
from matchlock.vfs._wire import attr_push, new_dir

log = logging.getLogger(__name__)

# Cache lifetimes the guest kernel gets. Exclusive mounts (memory, snapshot) change only
# through this kernel, so its caches are always right; a live host directory can change
# under it, so names and attributes are rechecked after a second (as the reference does).
EXCLUSIVE_TTL = 3600.0
SHARED_TTL = 1.0
# Bounds against a guest that talks raw FUSE at us (a killed fused, a root guest).
MAX_HANDLES = 4096
MAX_NODES = 1 << 20
MAX_XATTR_SIZE = 65536
BIG_IO = 128 << 10  # READ/WRITE above this run on a worker thread (see server.py)

_DT = {stat.S_IFREG: 8, stat.S_IFDIR: 4, stat.S_IFLNK: 10, stat.S_IFIFO: 1, stat.S_IFSOCK: 12,
       stat.S_IFCHR: 2, stat.S_IFBLK: 6}


@dataclass(eq=False)
class Mount:
    """One provider at `path` (relative to the workspace; "" is the workspace itself)."""

    path: str
    provider: Provider
    guest_path: str = ""
    ttl: float = field(init=False)

    def __post_init__(self) -> None:
        self.ttl = EXCLUSIVE_TTL if self.provider.exclusive else SHARED_TTL


class Node:
    """A file the kernel knows. (parent, name) is its path; a hard-linked file has one
    node for all its names (the others in `aliases`), so the kernel sees one inode and its
    caches stay coherent. `unlinked`: no name left (still open, or not yet forgotten)."""

    __slots__ = ("id", "parent", "name", "aliases", "nlookup", "mount", "mroot", "children",
                 "fmt", "unlinked", "ino")

    def __init__(self, nid: int, parent: Node | None, name: str, mount: Mount, mroot: bool,
                 fmt: int, ino: int = 0) -> None:
        self.id, self.parent, self.name = nid, parent, name
        self.aliases: list[tuple[Node, str]] = []
        self.nlookup = 0
        self.mount, self.mroot = mount, mroot
        self.children: dict[str, Node] = {}
        self.fmt = fmt
        self.unlinked = False
        self.ino = ino


@dataclass(eq=False)
class OpenFile:
    handle: Handle | None  # None: a directory
    node: Node
    path: str  # guest absolute path at open time (hooks, events)
    flags: int
    entries: list | None = None  # directories: the listing, taken at the first READDIR
    busy: int = 0  # requests in flight on a worker thread
    closing: bool = False


class FuseFilesystem:
    def __init__(self, workspace: str, mounts: list[Mount],
                 hooks: HookEngine | None = None) -> None:
        self.workspace = workspace.rstrip("/") or "/"
        by_path = {m.path: m for m in mounts}
        if len(by_path) != len(mounts):
            raise ValueError("two mounts at one path")
        base = by_path.get("")
        self._own_base = base is None
        if base is None:
            base = Mount("", MemoryFS(mode=0o755))
        self.base = base
        self.mounts = [base] + [m for m in mounts if m.path]
        for m in self.mounts:
            m.guest_path = self._guest(m.path)
        self.mount_points = {m.path: m for m in mounts if m.path}
        # Ancestors of mount points (not mount points themselves): rename/rmdir -> EBUSY.
        self._pinned = {m.path.rsplit("/", 1)[0] if "/" in m.path else ""
                        for m in self.mount_points.values()}
        for p in list(self._pinned):
            while "/" in p:
                p = p.rsplit("/", 1)[0]
                self._pinned.add(p)
        self._pinned.discard("")
        if self.mount_points and not isinstance(base.provider, MemoryFS):
            raise ValueError("mounts cannot nest inside another mount")
        for m in self.mount_points.values():
            try:
                is_dir = stat.S_ISDIR(m.provider.getattr("").mode)
            except OSError:
                is_dir = True
            assert isinstance(base.provider, MemoryFS)
            (base.provider.ensure_dir if is_dir else base.provider.ensure_file)(m.path)
        self.hooks = hooks or HookEngine()
        self._ids = itertools.count(F.ROOT_ID + 1)
        self._fhs = itertools.count(1)
        self.root = Node(F.ROOT_ID, None, "", base, True, stat.S_IFDIR)
        self.root.nlookup = 1
        self.nodes: dict[int, Node] = {F.ROOT_ID: self.root}
        self._by_ino: dict[tuple[int, int], Node] = {}  # hard-linked files
        self.files: dict[int, OpenFile] = {}
        self.initialized = False
        self.push_attrs = False  # the guest takes ATTR_PUSH messages (_wire.FLAG_ATTR_PUSH)
        self.push_new_dirs = False  # ... and NEW_DIR messages (_wire.FLAG_NEW_DIR)
        self.writeback_cache = False  # ask for it at INIT (bench/vfs.py --writeback)
        self.writeback = False
        self.minor = 0
        self.counts: dict[str, int] = {}  # requests per opcode (bench/vfs.py reports them)
        self._ops: dict[int, Callable[[Request], bytes | None]] = {
            F.INIT: self._init, F.DESTROY: self._destroy, F.LOOKUP: self._lookup,
            F.FORGET: self._forget, F.BATCH_FORGET: self._batch_forget,
            F.GETATTR: self._getattr, F.SETATTR: self._setattr, F.READLINK: self._readlink,
            F.SYMLINK: self._symlink, F.MKNOD: self._mknod, F.MKDIR: self._mkdir,
            F.UNLINK: self._unlink, F.RMDIR: self._rmdir, F.RENAME: self._rename,
            F.RENAME2: self._rename2, F.LINK: self._link, F.OPEN: self._open,
            F.READ: self._read, F.WRITE: self._write, F.STATFS: self._statfs,
            F.RELEASE: self._release, F.RELEASEDIR: self._release, F.FSYNC: self._fsync,
            F.FSYNCDIR: self._fsyncdir, F.SETXATTR: self._setxattr,
            F.GETXATTR: self._getxattr, F.LISTXATTR: self._listxattr,
            F.REMOVEXATTR: self._removexattr, F.OPENDIR: self._opendir,
            F.READDIR: self._readdir, F.READDIRPLUS: self._readdirplus,
            F.ACCESS: self._access, F.CREATE: self._create, F.INTERRUPT: self._interrupt,
            F.FALLOCATE: self._fallocate, F.SYNCFS: self._syncfs,
        }

    # -- entry point ---------------------------------------------------------------------

    def handle(self, req: Request) -> bytes | list[bytes] | None:
        """Serve one request; the reply as bytes or buffers, or None (no reply)."""
        name = req.name
        self.counts[name] = self.counts.get(name, 0) + 1
        if not self.initialized and req.opcode != F.INIT:
            raise FuseProtocolError(f"FUSE {name} before INIT")
        op = self._ops.get(req.opcode)
        if op is None:
            return F.reply_error(req.unique, errno.ENOSYS)
        try:
            out = op(req)
        except FuseProtocolError:
            raise
        except OSError as e:
            code = e.errno if isinstance(e.errno, int) and 0 < e.errno < 4096 else errno.EIO
            return F.reply_error(req.unique, code)
        except (ValueError, struct.error, UnicodeError) as e:
            raise FuseProtocolError(f"bad FUSE {name} request: {e}") from None
        except Exception:  # noqa: BLE001 - a provider bug must not kill the workspace
            log.exception("VFS %s failed", name)
            return F.reply_error(req.unique, errno.EIO)
        if out is None or isinstance(out, list):
            return out
        return F.reply(req.unique, out)

    def close(self) -> None:
        for f in list(self.files.values()):
            if f.handle is not None:
                try:
                    f.handle.release()
                except OSError:
                    pass
        self.files.clear()
        for m in self.mounts:
            try:
                m.provider.close()
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                log.warning("closing VFS mount %s failed: %s", m.guest_path, e)

    # -- nodes and paths -----------------------------------------------------------------

    def _guest(self, path: str) -> str:
        if not path:
            return self.workspace
        return ("" if self.workspace == "/" else self.workspace) + "/" + path

    def _node(self, nid: int) -> Node:
        node = self.nodes.get(nid)
        if node is None:
            raise fail(errno.ESTALE)
        return node

    @staticmethod
    def _rel(node: Node) -> str:
        """Path inside the node's mount."""
        parts = []
        while not node.mroot:
            parts.append(node.name)
            node = node.parent  # type: ignore[assignment]
        return "/".join(reversed(parts))

    @staticmethod
    def _full(node: Node) -> str:
        """Path relative to the workspace."""
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))

    def _where(self, node: Node) -> tuple[Mount, str]:
        if node.unlinked:
            raise fail(errno.ENOENT)
        return node.mount, self._rel(node)

    def _child(self, parent: Node, name: str) -> tuple[Mount, str, bool]:
        """(mount, path in it, is the mount's root) for `name` in directory `parent`."""
        _check_name(name)
        if parent.unlinked:
            raise fail(errno.ENOENT)
        if parent.mount is self.base and self.mount_points:
            full = join(self._full(parent), name)
            m = self.mount_points.get(full)
            if m is not None:
                return m, "", True
        return parent.mount, join(self._rel(parent), name), False

    def _child_path(self, parent: Node, name: str) -> str:
        return self._guest(join(self._full(parent), name))

    def _remember(self, parent: Node, name: str, mount: Mount, mroot: bool, attr: Attr) -> Node:
        fmt = stat.S_IFMT(attr.mode)
        node = parent.children.get(name)
        if node is not None and (node.fmt != fmt or node.ino and node.ino != attr.ino):
            self._unname(node, parent, name)  # replaced by another file: a new inode for it
            self._maybe_free(node)
            node = None
        if node is None and fmt != stat.S_IFDIR and attr.nlink > 1:
            node = self._by_ino.get((id(mount), attr.ino))
            if node is not None and node.fmt == fmt and not node.unlinked:
                self._name(node, parent, name)
            else:
                node = None
        if node is None:
            if len(self.nodes) >= MAX_NODES:
                raise fail(errno.ENFILE)
            node = Node(next(self._ids), parent, name, mount, mroot, fmt, attr.ino)
            parent.children[name] = node
            self.nodes[node.id] = node
            if fmt != stat.S_IFDIR and attr.nlink > 1:
                self._by_ino[(id(mount), attr.ino)] = node
        node.nlookup += 1
        return node

    def _name(self, node: Node, parent: Node, name: str) -> None:
        """Give `node` the name `name` in `parent` (a hard link, or after a rename)."""
        parent.children[name] = node
        if node.unlinked:
            node.parent, node.name, node.unlinked = parent, name, False
        elif (node.parent, node.name) != (parent, name):
            node.aliases.append((parent, name))

    def _unname(self, node: Node, parent: Node, name: str) -> None:
        if parent.children.get(name) is node:
            del parent.children[name]
        if node.parent is parent and node.name == name:
            if node.aliases:
                node.parent, node.name = node.aliases.pop()
            else:
                node.unlinked = True
        else:
            node.aliases = [a for a in node.aliases if a != (parent, name)]

    def _entry(self, parent: Node, name: str, mount: Mount, mroot: bool, attr: Attr) -> bytes:
        node = self._remember(parent, name, mount, mroot, attr)
        return F.entry_out(node.id, attr, mount.ttl, mount.ttl)

    def _detach(self, parent: Node, name: str) -> None:
        node = parent.children.get(name)
        if node is not None:
            self._unname(node, parent, name)
            self._maybe_free(node)

    def _maybe_free(self, node: Node) -> None:
        todo = [node]
        while todo:
            node = todo.pop()
            if node.nlookup > 0 or node.children or node.id == F.ROOT_ID \
                    or node.id not in self.nodes:
                continue
            del self.nodes[node.id]
            if node.ino and self._by_ino.get((id(node.mount), node.ino)) is node:
                del self._by_ino[(id(node.mount), node.ino)]
            names = [(node.parent, node.name), *node.aliases] if not node.unlinked else []
            for parent, name in names:
                if parent is not None and parent.children.get(name) is node:
                    del parent.children[name]
                    todo.append(parent)
            if node.unlinked and node.parent is not None:
                todo.append(node.parent)

    def _file(self, fh: int) -> OpenFile:
        f = self.files.get(fh)
        if f is None or f.closing:
            raise fail(errno.EBADF)
        return f

    def _add_file(self, f: OpenFile) -> int:
        if len(self.files) >= MAX_HANDLES:
            if f.handle is not None:
                f.handle.release()
            raise fail(errno.EMFILE)
        fh = next(self._fhs)
        self.files[fh] = f
        return fh

    def _same_mount(self, a: Mount, b: Mount) -> None:
        if a is not b:
            raise fail(errno.EXDEV)

    def _guard(self, full: str) -> None:
        """A mount point or an ancestor of one cannot be removed or renamed."""
        if full in self.mount_points or full in self._pinned:
            raise fail(errno.EBUSY)

    # -- INIT / DESTROY ------------------------------------------------------------------

    def _init(self, req: Request) -> bytes:
        major, minor, max_readahead, flags = F.need(req.body, F.INIT_IN)
        if major != F.KERNEL_MAJOR or minor < F.MIN_KERNEL_MINOR:
            log.warning("guest FUSE %d.%d is too old (need 7.%d)", major, minor,
                        F.MIN_KERNEL_MINOR)
            raise fail(errno.EPROTO)
        # Not WRITEBACK_CACHE: measured slower here (bench/vfs.py): close() still waits
        # for the data, each file then costs two more SETATTRs (times), and FUSE's strict
        # dirty limit throttles a sequential writer to a third of write-through.
        want = (F.ASYNC_READ | F.ATOMIC_O_TRUNC | F.BIG_WRITES | F.AUTO_INVAL_DATA
                | F.DO_READDIRPLUS | F.READDIRPLUS_AUTO | F.PARALLEL_DIROPS
                | F.MAX_PAGES_FLAG | F.CACHE_SYMLINKS | F.ASYNC_DIO)
        if self.writeback_cache:
            want |= F.WRITEBACK_CACHE
        self.minor = min(minor, F.KERNEL_MINOR)
        self.writeback = bool(flags & F.WRITEBACK_CACHE)
        self.initialized = True
        return F.INIT_OUT.pack(F.KERNEL_MAJOR, self.minor, max(max_readahead, F.MAX_WRITE),
                               flags & want, 64, 48, F.MAX_WRITE, 1, F.MAX_PAGES, 0, 0)

    def _destroy(self, req: Request) -> bytes:
        return b""

    def _interrupt(self, req: Request) -> None:
        return None  # every request finishes quickly; the reply is the answer

    # -- lookups and attributes ----------------------------------------------------------

    def _lookup(self, req: Request) -> bytes:
        parent = self._node(req.nodeid)
        name = _name(req.body)
        mount, rel, mroot = self._child(parent, name)
        gpath = self._child_path(parent, name) if self.hooks.active else ""
        self.hooks.before("stat", gpath, req)
        try:
            attr = mount.provider.getattr(rel)
        except FileNotFoundError:
            if mount.provider.exclusive:
                # A negative entry the kernel may keep: only it can create the name.
                return F.entry_out(0, None, mount.ttl, 0)
            raise
        out = self._entry(parent, name, mount, mroot, attr)
        self.hooks.after("stat", gpath, req, attr=attr)
        return out

    def _forget(self, req: Request) -> None:
        (n,) = F.need(req.body, F.FORGET_IN)
        self._forget_one(req.nodeid, n)
        return None

    def _batch_forget(self, req: Request) -> None:
        count, _ = F.need(req.body, F.BATCH_FORGET_IN)
        body = req.body[F.BATCH_FORGET_IN.size:]
        if count * F.FORGET_ONE.size > len(body):
            raise FuseProtocolError("BATCH_FORGET count exceeds the message")
        for i in range(count):
            nid, n = F.FORGET_ONE.unpack_from(body, i * F.FORGET_ONE.size)
            self._forget_one(nid, n)
        return None

    def _forget_one(self, nid: int, n: int) -> None:
        node = self.nodes.get(nid)
        if node is None or nid == F.ROOT_ID:
            return
        node.nlookup -= n
        self._maybe_free(node)

    def _getattr(self, req: Request) -> bytes:
        flags, _, fh = F.need(req.body, F.GETATTR_IN)
        node = self._node(req.nodeid)
        handle = None
        if flags & F.GETATTR_FH and fh in self.files:
            handle = self.files[fh].handle
        if handle is None and node.unlinked:
            handle = self._any_handle(node)
        if handle is not None:
            return F.attr_out(handle.getattr(), node.mount.ttl)
        mount, rel = self._where(node)
        gpath = self._guest(self._full(node)) if self.hooks.active else ""
        self.hooks.before("stat", gpath, req)
        attr = mount.provider.getattr(rel)
        self.hooks.after("stat", gpath, req, attr=attr)
        return F.attr_out(attr, mount.ttl)

    def _attr_push(self, req: Request, f: OpenFile) -> bytes | None:
        """After a WRITE: what a GETATTR of the node would answer now, for the guest to
        answer the kernel's next GETATTR itself. Only where it stays exactly right: the
        guest negotiated it, the mount is exclusive (its attributes change only through
        this guest's requests, which the guest watches), and no hook or subscriber would
        miss the "stat" it saves."""
        node = f.node
        if not self.push_attrs or self.hooks.active or not node.mount.provider.exclusive \
                or req.nodeid != node.id:
            return None
        try:
            if node.unlinked:
                handle = f.handle or self._any_handle(node)
                if handle is None:
                    return None
                attr = handle.getattr()
            else:
                mount, rel = self._where(node)
                attr = mount.provider.getattr(rel)
        except OSError:
            return None
        return attr_push(node.id, req.unique, F.attr_out(attr, node.mount.ttl))

    def _setattr(self, req: Request) -> bytes:
        (valid, _, fh, size, _lock, atime, mtime, _ctime, atimensec, mtimensec, _cns, mode, _u4,
         uid, gid, _u5) = F.need(req.body, F.SETATTR_IN)
        node = self._node(req.nodeid)
        handle = None
        if valid & F.FATTR_FH:
            f = self.files.get(fh)
            handle = f.handle if f is not None else None
        if node.unlinked:
            # No name left, still open (the kernel's writeback updates its times).
            handle = handle or self._any_handle(node)
            if handle is None:
                raise fail(errno.ENOENT)
        change = SetAttr(
            mode=mode & 0o7777 if valid & F.FATTR_MODE else None,
            uid=uid if valid & F.FATTR_UID else None,
            gid=gid if valid & F.FATTR_GID else None,
            size=size if valid & F.FATTR_SIZE else None,
            atime_ns="now" if valid & F.FATTR_ATIME_NOW else
            atime * 1_000_000_000 + atimensec if valid & F.FATTR_ATIME else None,
            mtime_ns="now" if valid & F.FATTR_MTIME_NOW else
            mtime * 1_000_000_000 + mtimensec if valid & F.FATTR_MTIME else None,
        )
        gpath = self._guest(self._full(node)) if self.hooks.active else ""
        ops = _setattr_ops(change)
        for op in ops:
            self.hooks.before(op, gpath, req, size=change.size or 0, mode=change.mode or 0)
        if node.unlinked:
            attr = handle.getattr() if change == SetAttr() else handle.setattr(change)
        elif change == SetAttr():
            attr = handle.getattr() if handle is not None else \
                node.mount.provider.getattr(self._rel(node))
        else:
            attr = node.mount.provider.setattr(self._rel(node), change, handle)
        for op in ops:
            self.hooks.after(op, gpath, req, attr=attr, size=change.size or 0)
        return F.attr_out(attr, node.mount.ttl)

    def _any_handle(self, node: Node) -> Handle | None:
        for f in self.files.values():
            if f.node is node and f.handle is not None and not f.closing:
                return f.handle
        return None

    def _statfs(self, req: Request) -> bytes:
        node = self.nodes.get(req.nodeid, self.root)
        s = node.mount.provider.statfs()
        return F.KSTATFS.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize,
                              s.namelen, s.frsize)

    def _access(self, req: Request) -> bytes:
        mask, _ = F.need(req.body, F.ACCESS_IN)
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        mount.provider.getattr(rel)
        if mask & os.W_OK and mount.provider.readonly:
            raise fail(errno.EROFS)
        return b""

    # -- names ---------------------------------------------------------------------------

    def _new_entry(self, req: Request, op: str, parent: Node, name: str,
                   make: Callable[[Provider, str], Attr]) -> bytes:
        mount, rel, mroot = self._child(parent, name)
        if mroot:
            raise fail(errno.EEXIST)
        gpath = self._child_path(parent, name) if self.hooks.active else ""
        self.hooks.before(op, gpath, req)
        attr = make(mount.provider, rel)
        out = self._entry(parent, name, mount, mroot, attr)
        self.hooks.after(op, gpath, req, attr=attr)
        return out

    def _mkdir(self, req: Request) -> bytes | list[bytes]:
        mode, _umask = F.need(req.body, F.MKDIR_IN)
        name = _name(req.body[F.MKDIR_IN.size:])
        parent = self._node(req.nodeid)
        out = self._new_entry(req, "mkdir", parent, name,
                              lambda p, rel: p.mkdir(rel, mode & 0o7777, req.uid, req.gid))
        # NEW_DIR: names appear in it only by this guest's requests, which fused sees; a
        # before-hook could answer a lookup in it other than ENOENT, so not then.
        node = parent.children.get(name)
        if not self.push_new_dirs or self.hooks.active_before or node is None \
                or not node.mount.provider.exclusive:
            return out
        return [new_dir(node.id), F.reply(req.unique, out)]

    def _mknod(self, req: Request) -> bytes:
        mode, rdev, _umask, _ = F.need(req.body, F.MKNOD_IN)
        name = _name(req.body[F.MKNOD_IN.size:])
        parent = self._node(req.nodeid)
        return self._new_entry(req, "create", parent, name,
                               lambda p, rel: p.mknod(rel, mode, rdev, req.uid, req.gid))

    def _symlink(self, req: Request) -> bytes:
        raw, off = F.cstring(req.body)
        target, _ = F.cstring(req.body, off)
        name = os.fsdecode(raw)
        if not target or len(target) > F.MAX_SYMLINK:
            raise fail(errno.ENAMETOOLONG if target else errno.ENOENT)
        parent = self._node(req.nodeid)
        t = os.fsdecode(target)
        return self._new_entry(req, "symlink", parent, name,
                               lambda p, rel: p.symlink(t, rel, req.uid, req.gid))

    def _readlink(self, req: Request) -> bytes:
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        gpath = self._guest(self._full(node))
        self.hooks.before("readlink", gpath, req)
        target = mount.provider.readlink(rel)
        self.hooks.after("readlink", gpath, req)
        return os.fsencode(target)

    def _link(self, req: Request) -> bytes:
        (old_id,) = F.need(req.body, F.LINK_IN)
        name = _name(req.body[F.LINK_IN.size:])
        old = self._node(old_id)
        parent = self._node(req.nodeid)
        omount, orel = self._where(old)
        if old.mroot:
            raise fail(errno.EPERM)
        mount, rel, mroot = self._child(parent, name)
        self._same_mount(omount, mount)
        if mroot:
            raise fail(errno.EEXIST)
        gpath = self._child_path(parent, name)
        self.hooks.before("link", gpath, req, new_path=self._guest(self._full(old)))
        attr = mount.provider.link(orel, rel)
        # The same node under a second name: the kernel must see one inode.
        if parent.children.get(name) is not None:
            self._detach(parent, name)
        self._name(old, parent, name)
        old.ino = attr.ino
        self._by_ino[(id(mount), attr.ino)] = old
        old.nlookup += 1
        self.hooks.after("link", gpath, req, attr=attr)
        return F.entry_out(old.id, attr, mount.ttl, mount.ttl)

    def _unlink(self, req: Request) -> bytes:
        return self._remove(req, dir_=False)

    def _rmdir(self, req: Request) -> bytes:
        return self._remove(req, dir_=True)

    def _remove(self, req: Request, dir_: bool) -> bytes:
        parent = self._node(req.nodeid)
        name = _name(req.body)
        mount, rel, mroot = self._child(parent, name)
        self._guard(join(self._full(parent), name))
        gpath = self._child_path(parent, name) if self.hooks.active else ""
        self.hooks.before("remove", gpath, req)
        (mount.provider.rmdir if dir_ else mount.provider.unlink)(rel)
        self._detach(parent, name)
        self.hooks.after("remove", gpath, req)
        return b""

    def _rename(self, req: Request) -> bytes:
        (newdir,) = F.need(req.body, F.RENAME_IN)
        return self._do_rename(req, newdir, 0, req.body[F.RENAME_IN.size:])

    def _rename2(self, req: Request) -> bytes:
        newdir, flags, _ = F.need(req.body, F.RENAME2_IN)
        if flags & ~(F.RENAME_NOREPLACE | F.RENAME_EXCHANGE):
            raise fail(errno.EINVAL)
        return self._do_rename(req, newdir, flags, req.body[F.RENAME2_IN.size:])

    def _do_rename(self, req: Request, newdir: int, flags: int, names: memoryview) -> bytes:
        raw_old, off = F.cstring(names)
        raw_new, _ = F.cstring(names, off)
        oldname, newname = os.fsdecode(raw_old), os.fsdecode(raw_new)
        oparent, nparent = self._node(req.nodeid), self._node(newdir)
        omount, orel, _ = self._child(oparent, oldname)
        nmount, nrel, _ = self._child(nparent, newname)
        self._guard(join(self._full(oparent), oldname))
        self._guard(join(self._full(nparent), newname))
        self._same_mount(omount, nmount)
        gold, gnew = self._child_path(oparent, oldname), self._child_path(nparent, newname)
        self.hooks.before("rename", gold, req, new_path=gnew)
        omount.provider.rename(orel, nrel, flags)
        moved = oparent.children.get(oldname)
        displaced = nparent.children.get(newname)
        if displaced is not None and displaced is moved:
            pass  # two names of one file: rename does nothing
        elif flags & F.RENAME_EXCHANGE:
            if moved is not None:
                self._unname(moved, oparent, oldname)
            if displaced is not None:
                self._unname(displaced, nparent, newname)
                self._name(displaced, oparent, oldname)
            if moved is not None:
                self._name(moved, nparent, newname)
        else:
            if displaced is not None:
                self._unname(displaced, nparent, newname)
                self._maybe_free(displaced)
            if moved is not None:
                self._unname(moved, oparent, oldname)
                self._name(moved, nparent, newname)
        self._maybe_free(oparent)
        self.hooks.after("rename", gold, req, new_path=gnew)
        return b""

    # -- files ---------------------------------------------------------------------------

    def _open_out(self, mount: Mount, fh: int, gpath: str) -> bytes:
        if self.hooks.intercepts_writes(gpath):
            # Write hooks see the program's own writes, one by one, and a blocked write
            # fails in write(2): no page cache for this file.
            flags = F.FOPEN_DIRECT_IO
        else:
            flags = F.FOPEN_KEEP_CACHE if mount.provider.exclusive else 0
        return F.OPEN_OUT.pack(fh, flags, 0)

    def _io_flags(self, flags: int) -> int:
        """Flags for the provider's open: with the writeback cache the kernel positions
        appends itself and may read pages of a file opened write-only."""
        if not self.writeback:
            return flags
        flags &= ~os.O_APPEND
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _open(self, req: Request) -> bytes:
        flags, _ = F.need(req.body, F.OPEN_IN)
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        gpath = self._guest(self._full(node))
        self.hooks.before("open", gpath, req, flags=flags)
        handle = mount.provider.open(rel, self._io_flags(flags))
        handle.path = gpath
        fh = self._add_file(OpenFile(handle, node, gpath, flags))
        self.hooks.after("open", gpath, req)
        return self._open_out(mount, fh, gpath)

    def _create(self, req: Request) -> bytes:
        flags, mode, _umask, _ = F.need(req.body, F.CREATE_IN)
        name = _name(req.body[F.CREATE_IN.size:])
        parent = self._node(req.nodeid)
        mount, rel, mroot = self._child(parent, name)
        if mroot:
            raise fail(errno.EEXIST)
        gpath = self._child_path(parent, name)
        self.hooks.before("create", gpath, req, flags=flags, mode=mode)
        handle, attr = mount.provider.create(rel, self._io_flags(flags), mode & 0o7777,
                                             req.uid, req.gid)
        handle.path = gpath
        try:
            node = self._remember(parent, name, mount, False, attr)
            fh = self._add_file(OpenFile(handle, node, gpath, flags))
        except OSError:
            handle.release()
            raise
        self.hooks.after("create", gpath, req, attr=attr)
        return F.entry_out(node.id, attr, mount.ttl, mount.ttl) + self._open_out(mount, fh,
                                                                                  gpath)

    def read_args(self, req: Request) -> tuple[OpenFile, int, int]:
        fh, offset, size, _rf, _lo, _fl, _ = F.need(req.body, F.READ_IN)
        f = self._file(fh)
        if f.handle is None:
            raise fail(errno.EISDIR)
        if size > F.MAX_WRITE:
            raise FuseProtocolError(f"READ of {size} bytes exceeds max_write")
        self.hooks.before("read", f.path, req, size=size, offset=offset)
        return f, offset, size

    def finish_read(self, req: Request, f: OpenFile, data: bytes) -> list[bytes]:
        self.hooks.after("read", f.path, req, size=len(data))
        return F.reply_parts(req.unique, [data])

    def _read(self, req: Request) -> list[bytes]:
        f, offset, size = self.read_args(req)
        return self.finish_read(req, f, f.handle.read(offset, size))  # type: ignore[union-attr]

    def write_args(self, req: Request) -> tuple[OpenFile, int, memoryview, int, bool]:
        fh, offset, size, _wf, _lo, _fl, _ = F.need(req.body, F.WRITE_IN)
        data = req.body[F.WRITE_IN.size:]
        if len(data) != size:
            raise FuseProtocolError(f"WRITE says {size} bytes, carries {len(data)}")
        f = self._file(fh)
        if f.handle is None:
            raise fail(errno.EISDIR)
        out = self.hooks.before("write", f.path, req, size=size, offset=offset, data=data)
        if out is None:
            return f, offset, data, size, False
        return f, offset, memoryview(out), size, True

    def finish_write(self, req: Request, f: OpenFile, written: int, data_len: int, size: int,
                     mutated: bool) -> list[bytes]:
        self.hooks.after("write", f.path, req, size=written)
        if mutated and written == data_len:
            written = size  # a hook changed the bytes: the guest's own length was written
        out = F.reply(req.unique, F.WRITE_OUT.pack(written, 0))
        push = self._attr_push(req, f)
        return [out] if push is None else [push, out]

    def _write(self, req: Request) -> list[bytes]:
        f, offset, data, size, mutated = self.write_args(req)
        n = f.handle.write(offset, data)  # type: ignore[union-attr]
        return self.finish_write(req, f, n, len(data), size, mutated)

    def _fallocate(self, req: Request) -> bytes:
        fh, offset, length, mode, _ = F.need(req.body, F.FALLOCATE_IN)
        f = self._file(fh)
        if f.handle is None:
            raise fail(errno.EISDIR)
        self.hooks.before("write", f.path, req, size=length, offset=offset)
        f.handle.allocate(offset, length, mode)
        return b""

    def _fsync(self, req: Request) -> bytes:
        fh, flags, _ = F.need(req.body, F.FSYNC_IN)
        f = self._file(fh)
        self.hooks.before("sync", f.path, req)
        if f.handle is not None:
            f.handle.fsync(bool(flags & F.FSYNC_FDATASYNC))
        self.hooks.after("sync", f.path, req)
        return b""

    def _fsyncdir(self, req: Request) -> bytes:
        fh, _flags, _ = F.need(req.body, F.FSYNC_IN)
        f = self._file(fh)
        mount, rel = self._where(f.node)
        self.hooks.before("sync", f.path, req)
        mount.provider.fsyncdir(rel)
        self.hooks.after("sync", f.path, req)
        return b""

    def _syncfs(self, req: Request) -> bytes:
        return b""

    def _release(self, req: Request) -> bytes:
        fh, _flags, _rf, _lo = F.need(req.body, F.RELEASE_IN)
        f = self.files.get(fh)
        if f is None or f.closing:
            return b""
        f.closing = True
        if f.busy == 0:
            self.drop_file(fh)
        if f.handle is not None:
            self.hooks.after("close", f.path, req)
        return b""

    def drop_file(self, fh: int) -> None:
        f = self.files.pop(fh, None)
        if f is not None and f.handle is not None:
            try:
                f.handle.release()
            except OSError as e:
                log.debug("release of %s failed: %s", f.path, e)

    # -- directories ---------------------------------------------------------------------

    def _opendir(self, req: Request) -> bytes:
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        attr = mount.provider.getattr(rel)
        if not stat.S_ISDIR(attr.mode):
            raise fail(errno.ENOTDIR)
        fh = self._add_file(OpenFile(None, node, self._guest(self._full(node)), 0))
        return F.OPEN_OUT.pack(fh, F.FOPEN_KEEP_CACHE | F.FOPEN_CACHE_DIR
                               if mount.provider.exclusive else 0, 0)

    def _listing(self, req: Request, f: OpenFile) -> list[tuple[str, Attr | None]]:
        if f.entries is None:
            node = f.node
            mount, rel = self._where(node)
            self.hooks.before("readdir", f.path, req)
            ents: list[DirEntry] = mount.provider.readdir(rel)
            listing: list[tuple[str, Attr | None]] = [(".", None), ("..", None)]
            for e in ents:
                if not _valid_name(e.name):
                    continue
                attr = e.attr
                if mount is self.base and self.mount_points:
                    m = self.mount_points.get(join(self._full(node), e.name))
                    if m is not None:
                        try:
                            attr = m.provider.getattr("")
                        except OSError:
                            continue
                listing.append((e.name, attr))
            f.entries = listing
            self.hooks.after("readdir", f.path, req, size=len(ents))
        return f.entries

    def _readdir(self, req: Request) -> bytes:
        fh, offset, size, *_ = F.need(req.body, F.READ_IN)
        f = self._file(fh)
        listing = self._listing(req, f)
        out, used = [], 0
        for i in range(offset, len(listing)):
            name, attr = listing[i]
            raw = os.fsencode(name)
            if attr is None:
                ino, dtype = (f.node.id if name == "." else 1), 4
            else:
                ino, dtype = attr.ino, _DT.get(stat.S_IFMT(attr.mode), 0)
            ent = F.dirent(ino, i + 1, raw, dtype)
            if used + len(ent) > size:
                break
            out.append(ent)
            used += len(ent)
        return b"".join(out)

    def _readdirplus(self, req: Request) -> bytes:
        fh, offset, size, *_ = F.need(req.body, F.READ_IN)
        f = self._file(fh)
        listing = self._listing(req, f)
        node = f.node
        out, used = [], 0
        for i in range(offset, len(listing)):
            name, attr = listing[i]
            raw = os.fsencode(name)
            dtype = 4 if attr is None else _DT.get(stat.S_IFMT(attr.mode), 0)
            ino = node.id if attr is None else attr.ino
            dent = F.dirent(ino, i + 1, raw, dtype)
            need = F.ENTRY.size + F.ATTR.size + len(dent)
            if used + need > size:
                break
            if attr is None:
                entry = bytes(F.ENTRY.size + F.ATTR.size)  # "." and "..": no lookup
            else:
                mount, _, mroot = self._child(node, name)
                child = self._remember(node, name, mount, mroot, attr)
                entry = F.entry_out(child.id, attr, mount.ttl, mount.ttl)
            out.append(entry + dent)
            used += need
        return b"".join(out)

    # -- xattrs --------------------------------------------------------------------------

    def _setxattr(self, req: Request) -> bytes:
        size, flags = F.need(req.body, F.SETXATTR_IN)
        raw, off = F.cstring(req.body, F.SETXATTR_IN.size)
        value = bytes(req.body[off:off + size])
        if len(value) != size or size > MAX_XATTR_SIZE:
            raise fail(errno.E2BIG)
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        gpath = self._guest(self._full(node))
        self.hooks.before("setxattr", gpath, req, size=size)
        mount.provider.setxattr(rel, os.fsdecode(raw), value, flags)
        self.hooks.after("setxattr", gpath, req, size=size)
        return b""

    def _getxattr(self, req: Request) -> bytes:
        size, _ = F.need(req.body, F.GETXATTR_IN)
        raw, _ = F.cstring(req.body, F.GETXATTR_IN.size)
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        value = mount.provider.getxattr(rel, os.fsdecode(raw))
        return _sized(value, size)

    def _listxattr(self, req: Request) -> bytes:
        size, _ = F.need(req.body, F.GETXATTR_IN)
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        names = b"".join(os.fsencode(n) + b"\0" for n in mount.provider.listxattr(rel))
        return _sized(names, size)

    def _removexattr(self, req: Request) -> bytes:
        raw, _ = F.cstring(req.body)
        node = self._node(req.nodeid)
        mount, rel = self._where(node)
        gpath = self._guest(self._full(node))
        self.hooks.before("setxattr", gpath, req)
        mount.provider.removexattr(rel, os.fsdecode(raw))
        return b""


# -- helpers ----------------------------------------------------------------------------------


def _valid_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _check_name(name: str) -> None:
    if not _valid_name(name):
        raise fail(errno.EINVAL if name else errno.ENOENT, repr(name))
    if len(os.fsencode(name)) > F.MAX_NAME:
        raise fail(errno.ENAMETOOLONG)


def _name(body: memoryview) -> str:
    raw, _ = F.cstring(body)
    return os.fsdecode(raw)


def _sized(value: bytes, size: int) -> bytes:
    if size == 0:
        return F.XATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise fail(errno.ERANGE)
    return value


def _setattr_ops(change: SetAttr) -> list[str]:
    ops = []
    if change.mode is not None:
        ops.append("chmod")
    if change.uid is not None or change.gid is not None:
        ops.append("chown")
    if change.size is not None:
        ops.append("truncate")
    if change.atime_ns is not None or change.mtime_ns is not None:
        ops.append("utimens")
    return ops


def now_ms() -> int:
    return time.time_ns() // 1_000_000
