"""Named volumes (raw ext4 images under the state dir) and the locks that keep two VMs
from opening one read-write disk.

A VM holds a flock on every disk image it attaches, for its whole life: exclusive for a
read-write disk, shared for a read-only one. So a second VM gets a clear error before it
boots instead of two kernels corrupting one ext4; `volume rm`/`cp` refuse a volume in use.
Volumes are user data, so they live under the state dir (~/.matchlock/volumes), not the
cache the reference used.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from matchlock.errors import DependencyError, MatchlockError, NotFoundError, UsageError
from matchlock.paths import state_dir

DEFAULT_SIZE_MIB = 10240
MAX_SIZE_MIB = 1 << 24  # 16 TiB, sparse; catches a size typed in bytes


class DiskInUseError(MatchlockError):
    """A disk image is open read-write in another VM (or read-only, for a writer)."""


def volumes_dir() -> Path:
    return state_dir() / "volumes"


def check_volume_name(name: str) -> str:
    from matchlock.vfs._spec import VOLUME_NAME_RE

    if not VOLUME_NAME_RE.match(name) or len(name) > 128:
        raise UsageError(f"volume name {name!r} is invalid: use letters, digits, '_', '.' "
                         "and '-', starting with a letter or digit (no '/')")
    return name


def volume_path(name: str, base: Path | None = None) -> Path:
    return (base or volumes_dir()) / f"{check_volume_name(name)}.ext4"


@dataclass(frozen=True, slots=True)
class Volume:
    name: str
    path: Path
    size: int  # apparent size in bytes

    def to_json(self) -> dict:
        return {"name": self.name, "size": f"{self.size / (1 << 20):.1f} MB",
                "path": str(self.path)}


class DiskLock:
    """flock on a disk image: shared (read-only use) or exclusive (read-write)."""

    def __init__(self, path: str | os.PathLike, readonly: bool) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            how = "read-only" if readonly else "read-write"
            raise DiskInUseError(
                f"disk {self.path} is in use by another VM; it cannot be attached {how} "
                "until that VM stops" + ("" if readonly else " (or attach it with :ro)")
            ) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _in_use(path: Path) -> bool:
    try:
        DiskLock(path, readonly=False).release()
    except DiskInUseError:
        return True
    return False


def create_volume(name: str, size_mib: int = DEFAULT_SIZE_MIB) -> Volume:
    path = volume_path(name)
    if not 1 <= size_mib <= MAX_SIZE_MIB:
        raise UsageError(f"volume size must be between 1 and {MAX_SIZE_MIB} MB (got {size_mib})")
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs") or "/sbin/mke2fs"
    if not os.path.exists(mkfs):
        raise DependencyError("mkfs.ext4 not found: install e2fsprogs (apt-get install e2fsprogs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise UsageError(f"volume {name!r} already exists") from None
    try:
        os.ftruncate(fd, size_mib << 20)
        os.close(fd)
        fd = -1
        args = [mkfs, "-F", "-q"] + ([] if mkfs.endswith("mkfs.ext4") else ["-t", "ext4"])
        r = subprocess.run([*args, "-L", name[:16], str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise MatchlockError(f"cannot format volume {name!r}: {r.stderr.strip()}")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return Volume(name, path, path.stat().st_size)


def list_volumes() -> list[Volume]:
    d = volumes_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.ext4")):
        name = p.name[:-5]
        try:
            check_volume_name(name)
        except UsageError:
            continue
        out.append(Volume(name, p, p.stat().st_size))
    return out


def remove_volume(name: str) -> None:
    path = volume_path(name)
    if not path.is_file():
        raise NotFoundError(f"volume {name!r} does not exist (see `matchlock volume ls`)")
    if _in_use(path):
        raise DiskInUseError(f"volume {name!r} is in use by a running VM; stop it first")
    path.unlink()


def copy_volume(src: str, dest: str) -> Volume:
    sp, dp = volume_path(src), volume_path(dest)
    if src == dest:
        raise UsageError("volume cp: the source and the destination are the same")
    if not sp.is_file():
        raise NotFoundError(f"volume {src!r} does not exist (see `matchlock volume ls`)")
    lock = DiskLock(sp, readonly=True)  # no writer may change it while we copy
    try:
        try:
            out = os.open(dp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise UsageError(f"volume {dest!r} already exists") from None
        try:
            with open(sp, "rb") as f:
                _sparse_copy(f.fileno(), out)
            os.close(out)
            out = -1
            shutil.copystat(sp, dp)
            st = sp.stat()
            try:
                os.chown(dp, st.st_uid, st.st_gid)
            except PermissionError:
                pass
        except BaseException:
            if out >= 0:
                os.close(out)
            dp.unlink(missing_ok=True)
            raise
    finally:
        lock.release()
    return Volume(dest, dp, dp.stat().st_size)


def _sparse_copy(src: int, dst: int) -> None:
    """Copy only the data extents (SEEK_DATA/SEEK_HOLE): a 10 GB volume stays sparse."""
    size = os.fstat(src).st_size
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole left
                break
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        pos = data
        while pos < hole:
            n = os.copy_file_range(src, dst, hole - pos, pos, pos)
            if n <= 0:
                break
            pos += n
        off = hole
    os.ftruncate(dst, size)
