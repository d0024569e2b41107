"""The VM's writable root layer: a fresh journal-less ext4 file per VM.

mke2fs costs ~50 ms a VM (it writes and syncs ~2.6 MiB of metadata for the default 5 GiB
disk). A template made once per size under the cache dir and copied extent by extent (a
reflink where the file system has them) costs a few ms. The copies are byte for byte what
mke2fs made, so every VM's upper disk shares one file-system UUID: harmless, a guest sees
one upper disk and the host never mounts it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

from matchlock._log import get_logger
from matchlock.errors import DependencyError, VmStartError
from matchlock.paths import cache_dir

log = get_logger(__name__)

TEMPLATE_VERSION = 1  # bump when the mke2fs arguments change
# A template with more data than this means the file system reports no holes (SEEK_DATA
# unsupported): copying would write the whole disk, so mke2fs is cheaper.
MAX_TEMPLATE_DATA = 64 << 20
_COPY_CHUNK = 1 << 20


def make_upper_disk(path: Path, size_mib: int) -> None:
    """Create `path`: an empty ext4 of `size_mib` MiB, sparse. Raises DependencyError or
    VmStartError."""
    try:
        template = _template(size_mib)
        extents = data_extents(template)
    except OSError as e:
        log.debug("no upper-disk template (%s): mke2fs per VM", e)
        template = None
    if template is None or sum(n for _, n in extents) > MAX_TEMPLATE_DATA:
        _mkfs(path, size_mib)
        return
    copy_extents(template, path, extents)


def _template(size_mib: int) -> Path:
    d = cache_dir() / "upper"
    final = d / f"ext4-v{TEMPLATE_VERSION}-{size_mib}m.img"
    if final.exists():
        return final
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        _mkfs(tmp, size_mib)
        os.replace(tmp, final)  # atomic: a racing VM uses either whole file
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _mkfs(path: Path, size_mib: int) -> None:
    mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
    if not os.path.exists(mke2fs):
        raise DependencyError("mke2fs not found: install e2fsprogs (apt-get install e2fsprogs)")
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    # No journal: the disk is thrown away with the VM, crash consistency buys nothing.
    r = subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "matchlock-upper",
         str(path)],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        raise VmStartError(f"cannot create the VM's writable disk: {r.stderr.strip()}")


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every data region of a sparse file."""
    out = []
    with open(path, "rb") as f:
        fd, size, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            off = end
    return out


def copy_extents(src: Path, dst: Path, extents: list[tuple[int, int]]) -> None:
    """Make `dst` a sparse copy of `src` that has data only at `extents`."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(os.fstat(fi.fileno()).st_size)
        for off, n in extents:
            _copy_range(fi.fileno(), fo.fileno(), off, n)


def _copy_range(fi: int, fo: int, off: int, n: int) -> None:
    end = off + n
    try:
        while off < end:
            done = os.copy_file_range(fi, fo, end - off, off, off)
            if done == 0:
                raise OSError(errno.EIO, "short copy")
            off += done
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while off < end:  # file systems without copy_file_range between them
        chunk = os.pread(fi, min(_COPY_CHUNK, end - off), off)
        if not chunk:
            raise OSError(errno.EIO, "short read")
        off += os.pwrite(fo, chunk, off)
