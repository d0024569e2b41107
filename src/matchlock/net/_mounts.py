"""Find every mount of one file in this mount namespace, whatever path it sits at.

`ip netns delete` unmounts `/run/netns/<name>` and unlinks it. When a chroot has bound
`/run` (a CI or install root, `fresh-machine.sh`), a namespace created inside it is mounted
at `<root>/run/netns/<name>`: the same file seen through another path. The kernel refuses to
unlink a file that is a mount point anywhere in the caller's mount namespace (EBUSY), so a
namespace the chroot left behind could never be deleted from outside it. `mounts_of` finds
those mounts from /proc/self/mountinfo (device and path inside the filesystem, not the
path we see), so that they can be detached first.
"""

from __future__ import annotations

import ctypes
import os
import posixpath
import re
from dataclasses import dataclass

MNT_DETACH = 2


@dataclass(frozen=True)
class Mount:
    id: int
    parent: int
    dev: str  # "major:minor"
    root: str  # the mounted directory's path inside its filesystem
    point: str  # where it is mounted, as this process sees it


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        out.append(Mount(int(f[0]), int(f[1]), f[2], _unescape(f[3]), _unescape(f[4])))
    return out


def _under(path: str, point: str) -> str | None:
    """`path` relative to mount point `point`, or None if it is not below it."""
    if point == "/":
        return path.lstrip("/")
    if path == point:
        return ""
    if path.startswith(point + "/"):
        return path[len(point) + 1:]
    return None


def _fs_path(mounts: list[Mount], path: str) -> tuple[str, str] | None:
    """(device, path inside the filesystem) of `path` as seen through the mount holding it."""
    best: Mount | None = None
    for m in mounts:  # the last, longest match is the mount that is on top
        if _under(path, m.point) is not None and (best is None or len(m.point) >= len(best.point)):
            best = m
    if best is None:
        return None
    rel = _under(path, best.point) or ""
    return best.dev, posixpath.normpath(posixpath.join(best.root, rel))


def mounts_of(mounts: list[Mount], path: str) -> list[Mount]:
    """Every mount whose mount point is the same file as `path` (its parent directory is
    resolved as this process sees it), at any path. Top-most first."""
    where = _fs_path(mounts, posixpath.dirname(path))
    if where is None:
        return []
    dev, fs_dir = where
    target = posixpath.join(fs_dir, posixpath.basename(path))
    by_id = {m.id: m for m in mounts}
    found = []
    for m in mounts:
        parent = by_id.get(m.parent)
        if parent is None or parent.dev != dev:
            continue
        rel = _under(m.point, parent.point)
        if rel is None:
            continue
        if posixpath.normpath(posixpath.join(parent.root, rel)) == target:
            found.append(m)
    return list(reversed(found))


def detach_all(path: str) -> list[str]:
    """Lazily unmount every mount of the file at `path`; returns the mount points detached."""
    with open("/proc/self/mountinfo") as f:
        found = mounts_of(parse_mountinfo(f.read()), path)
    libc = ctypes.CDLL(None, use_errno=True)
    done = []
    for m in found:
        if libc.umount2(os.fsencode(m.point), MNT_DETACH) == 0:
            done.append(m.point)
    return done
