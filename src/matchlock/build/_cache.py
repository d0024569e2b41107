"""The build cache: the engine's storage on a persistent ext4 disk under the cache dir,
used by one build at a time (flock), grown in place, never shrunk; `prune` deletes it.

    <cache>/build/cache.ext4        the disk (sparse)
    <cache>/build/cache.ext4.lock   held exclusively by the build using it
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from matchlock.errors import DependencyError, MatchlockError
from matchlock.paths import cache_dir

DEFAULT_SIZE_MIB = 10240


def cache_root() -> Path:
    return cache_dir() / "build"


def disk_path() -> Path:
    return cache_root() / "cache.ext4"


def _tool(name: str, package: str = "e2fsprogs") -> str:
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None)
    if path is None:
        raise DependencyError(f"{name} not found: install {package} (apt-get install {package})")
    return path


def _run(argv: list[str], what: str, ok: tuple[int, ...] = (0,)) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode not in ok:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise MatchlockError(f"cannot {what} the build cache disk {argv[-1]}: {tail[0]}")


@contextlib.contextmanager
def locked(wait: Callable[[], None] | None = None, *, block: bool = True) -> Iterator[Path]:
    """Hold the build cache exclusively; `wait()` is called once if another build has it.
    With `block=False` a held cache raises instead of waiting."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "cache.ext4.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not block:
                raise MatchlockError("the build cache is in use by another build; wait for "
                                     "it to finish") from None
            if wait is not None:
                wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield disk_path()
    finally:
        os.close(fd)


class CacheLock:
    """The cache lock for async callers: `try_acquire()` never blocks (a waiting build
    polls it, so a Ctrl-C while waiting is never stuck in flock(2)); `release()`."""

    def __init__(self) -> None:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(root / "cache.ext4.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ensure_disk(size_mib: int) -> Path:
    """Create the cache disk, or grow it to `size_mib` (call with the lock held)."""
    path = disk_path()
    want = size_mib << 20
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".new")
        with open(tmp, "wb") as f:
            f.truncate(want)
        try:
            _run([_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-L", "matchlock-build",
                  "-E", "lazy_itable_init=1", str(tmp)], "create")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return path
    if path.stat().st_size < want:
        with open(path, "r+b") as f:
            f.truncate(want)
        e2fsck = shutil.which("e2fsck") or (
            "/sbin/e2fsck" if os.path.exists("/sbin/e2fsck") else None)
        if e2fsck:
            _run([e2fsck, "-fy", str(path)], "check", ok=(0, 1, 2))
        _run([_tool("resize2fs"), "-f", str(path)], "grow")
    return path


def size_bytes() -> int:
    """Allocated bytes of the cache disk (0 when there is none)."""
    try:
        return disk_path().stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def prune(wait: Callable[[], None] | None = None) -> int:
    """Delete the cache disk (waiting for a build that uses it); the bytes it freed."""
    with locked(wait):
        freed = size_bytes()
        try:
            disk_path().unlink()
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise MatchlockError(f"cannot remove {disk_path()}: {e.strerror}") from None
        return freed
