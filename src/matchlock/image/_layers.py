"""Apply OCI/docker layer tarballs, in order, onto a directory.

Layer tarballs are hostile input. Every path is resolved component by component inside the
tree: absolute names and ".." are refused, symlinks met on the way are followed only while
they stay inside the tree (absolute targets are taken relative to the tree's root, like in a
chroot), and a final path component is never followed. Whiteouts (".wh.NAME") and opaque
markers (".wh..wh..opq") are applied as the OCI image spec describes. Device nodes are
skipped (the guest mounts devtmpfs); fifos are created.

Ownership is applied with lchown/fchown; run this as root or under fakeroot.
Directory modes and mtimes are applied last (see `finish`), deepest first, so that a
read-only directory in a lower layer does not stop later writes and adding children does not
disturb recorded mtimes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

from matchlock.errors import MatchlockError
from matchlock.image._tario import decompress_errors, iter_tar

_WH = ".wh."
_OPAQUE = ".wh..wh..opq"
_MAX_HOPS = 40


class LayerError(MatchlockError):
    """A layer is malformed or hostile."""


class NoSpaceError(MatchlockError):
    """The filesystem the layers are unpacked on is full."""


def _clean(name: str, what: str) -> list[str]:
    """Split an archive path into components; refuse absolute paths and '..'."""
    if name.startswith("/"):
        raise LayerError(f"refusing absolute path {what} {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"refusing path traversal in {what} {name!r}")
    return parts


def _remove(path: str) -> bool:
    """Remove whatever is at `path`; True if it was a directory or a symlink (something a
    cached directory resolution may have gone through)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
        return True
    os.unlink(path)
    return stat.S_ISLNK(st.st_mode)


class RootfsBuilder:
    """Accumulates layers into `root` (an empty directory we own)."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)
        # canonical rel path -> (inode, mode, uid, gid, mtime) for directories
        self._dirs: dict[tuple[str, ...], tuple[int, int, int, int, float]] = {}
        self._layer_paths: set[tuple[str, ...]] = set()
        # Directory resolutions already done: entries of a layer mostly share parents.
        # Valid while no directory or symlink is removed (see `_forget`).
        self._resolved: dict[tuple[str, ...], list[str]] = {}
        self.skipped_devices = 0

    # ---- path resolution -------------------------------------------------------------

    def _host(self, parts: list[str] | tuple[str, ...]) -> str:
        return "/".join((self.root, *parts))

    def _rm(self, path: str) -> None:
        if _remove(path):
            self._resolved.clear()

    def _resolve_dir(self, parts: list[str], *, create: bool) -> list[str] | None:
        """Canonical components of directory `parts`, following in-tree symlinks.

        Missing directories are created (mode 0755) when `create`, else None is returned.
        """
        key = tuple(parts)
        hit = self._resolved.get(key)
        if hit is not None:
            return list(hit)
        stack = self._walk(parts, create=create)
        if stack is not None:
            self._resolved[key] = list(stack)
        return stack

    def _walk(self, parts: list[str], *, create: bool) -> list[str] | None:
        stack: list[str] = []
        todo = list(reversed(parts))
        hops = 0
        while todo:
            c = todo.pop()
            if c in ("", "."):
                continue
            if c == "..":
                if not stack:
                    raise LayerError(
                        f"refusing path {'/'.join(parts)!r}: a symlink on it leaves the tree"
                    )
                stack.pop()
                continue
            host = self._host([*stack, c])
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(host, 0o755)
                stack.append(c)
                self._mark(stack)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_HOPS:
                    raise LayerError(f"too many symlinks resolving {'/'.join(parts)!r}")
                target = os.readlink(host)
                if target.startswith("/"):
                    stack = []
                todo.extend(reversed(target.split("/")))
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(c)
                continue
            raise LayerError(
                f"path {'/'.join(parts)!r}: {'/'.join([*stack, c])!r} is not a directory"
            )
        return stack

    def _mark(self, parts: list[str]) -> None:
        """Remember that the current layer provides `parts` (and its ancestors)."""
        key = tuple(parts)
        while key and key not in self._layer_paths:
            self._layer_paths.add(key)
            key = key[:-1]

    # ---- layers ------------------------------------------------------------------------

    def apply(self, blob: Path, label: str, diff_id: str | None = None) -> int:
        """Apply one layer blob (tar, tar+gzip, tar+zstd, ...). Returns the member count.

        With `diff_id` ("sha256:<hex>" of the uncompressed tar, from the image config) the
        decompressed bytes are checked against it."""
        self._layer_paths = set()
        self._resolved.clear()
        count = 0
        errs = decompress_errors()
        h = hashlib.sha256() if diff_id else None
        try:
            with open(blob, "rb") as f:
                for tf, member in iter_tar(f, label, h):
                    self._entry(tf, member)
                    count += 1
        except LayerError as e:
            raise LayerError(f"corrupt image tarball: {label}: {e}") from None
        except errs as e:
            raise LayerError(f"corrupt image tarball: {label}: {e or type(e).__name__}") from None
        except OSError as e:
            if e.errno is None:
                raise LayerError(f"corrupt image tarball: {label}: {e}") from None
            if e.errno == errno.ENOSPC:
                raise NoSpaceError(
                    f"no space left while unpacking {label}; free disk space and retry"
                ) from None
            raise MatchlockError(f"cannot unpack {label}: {e.strerror}: {e.filename}") from None
        if h is not None and "sha256:" + h.hexdigest() != diff_id:
            raise LayerError(
                f"{label} unpacks to sha256:{h.hexdigest()}, but the image config says "
                f"{diff_id}; the image is inconsistent: push or save it again"
            )
        return count

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _clean(m.name, "entry")
        if not parts:
            return  # the root directory itself
        *parent, name = parts

        if name.startswith(_WH):
            pstack = self._resolve_dir(parent, create=False)
            if pstack is None:
                return
            if name == _OPAQUE:
                self._opaque(pstack)
            elif name.startswith(_WH + _WH):
                return  # other aufs metadata (.wh..wh.plnk etc.)
            else:
                victim = name[len(_WH) :]
                if victim in ("", ".", ".."):
                    raise LayerError(f"bad whiteout {m.name!r}")
                self._rm(self._host([*pstack, victim]))
            return

        pstack = self._resolve_dir(parent, create=True)
        assert pstack is not None
        rel = [*pstack, name]
        host = self._host(rel)
        self._mark(rel)

        if m.isdir():
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                if st is not None:
                    self._rm(host)
                os.mkdir(host, 0o700)
                st = os.lstat(host)
            self._dirs[tuple(rel)] = (st.st_ino, m.mode & 0o7777, m.uid, m.gid, m.mtime)
            self._xattrs(host, m)
            return

        if m.ischr() or m.isblk():
            self.skipped_devices += 1
            return

        if m.islnk():
            tparts = _clean(m.linkname, "hardlink target")
            if not tparts:
                raise LayerError(f"hardlink {m.name!r} points at the root directory")
            tstack = self._resolve_dir(tparts[:-1], create=False)
            target = None if tstack is None else self._host([*tstack, tparts[-1]])
            if target is None or not os.path.lexists(target):
                raise LayerError(f"hardlink {m.name!r} -> {m.linkname!r}: target missing")
            tst = os.lstat(target)
            if stat.S_ISDIR(tst.st_mode):
                raise LayerError(f"hardlink {m.name!r} -> {m.linkname!r}: target is a directory")
            try:
                if os.path.samestat(tst, os.lstat(host)):
                    return  # already that very file
            except FileNotFoundError:
                pass
            self._rm(host)
            os.link(target, host, follow_symlinks=False)
            return

        self._rm(host)
        if m.issym():
            os.symlink(m.linkname, host)
            os.lchown(host, m.uid, m.gid)
            os.utime(host, (m.mtime, m.mtime), follow_symlinks=False)
            return

        if m.isfifo():
            os.mkfifo(host, 0o600)
            os.lchown(host, m.uid, m.gid)
            os.chmod(host, m.mode & 0o7777)
            os.utime(host, (m.mtime, m.mtime), follow_symlinks=False)
            return

        if m.isreg():
            fd = os.open(
                host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                src = tf.extractfile(m)
                if src is not None:
                    with os.fdopen(os.dup(fd), "wb", buffering=0) as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                os.fchown(fd, m.uid, m.gid)  # before chmod: chown clears setuid/setgid
                os.fchmod(fd, m.mode & 0o7777)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)
            self._xattrs(host, m)
            return
        # Anything else (GNU volume headers, unknown types): ignore.

    def _xattrs(self, host: str, m: tarfile.TarInfo) -> None:
        for key, value in (m.pax_headers or {}).items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr.") :]
            if not attr.startswith(("security.capability", "user.", "trusted.")):
                continue
            try:
                os.setxattr(
                    host, attr, value.encode("utf-8", "surrogateescape"), follow_symlinks=False
                )
            except OSError:
                pass  # best effort: not every host filesystem takes every xattr

    def _opaque(self, pstack: list[str]) -> None:
        """Hide everything below `pstack` that lower layers provided."""

        def prune(rel: tuple[str, ...]) -> None:
            with os.scandir(self._host(rel)) as it:
                entries = list(it)
            for e in entries:
                key = (*rel, e.name)
                if key in self._layer_paths:
                    if e.is_dir(follow_symlinks=False):
                        prune(key)
                    continue
                self._rm(e.path)

        prune(tuple(pstack))

    # ---- finishing -------------------------------------------------------------------

    def finish(self) -> None:
        """Apply recorded directory ownership, modes and mtimes, deepest first."""
        for rel in sorted(self._dirs, key=len, reverse=True):
            ino, mode, uid, gid, mtime = self._dirs[rel]
            host = self._host(rel)
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                continue
            if st.st_ino != ino or not stat.S_ISDIR(st.st_mode):
                continue  # replaced or removed by a later layer
            os.lchown(host, uid, gid)
            os.chmod(host, mode)
            os.utime(host, (mtime, mtime), follow_symlinks=False)


ProgressFn = Callable[[str], None]


def apply_layers(
    root: Path, layers: list[tuple[Path, str, str | None]], progress: ProgressFn
) -> None:
    """Apply `layers` [(blob path, label, diff_id or None)] in order into the empty
    directory `root`."""
    b = RootfsBuilder(root)
    n = len(layers)
    for i, (blob, label, diff_id) in enumerate(layers, 1):
        mb = blob.stat().st_size / 1e6
        progress(f"applying layer {i}/{n} ({label}, {mb:.1f} MB)")
        b.apply(blob, label, diff_id)
    b.finish()
