"""Mount specifications: what a sandbox's workspace, volumes and raw disks are, parsed and
validated before anything boots. Pure functions; each error is one line that names the
offending value (`what`, given by the face: "-v ./x:/y", "mounts[2]") and says what to do.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from matchlock.errors import UsageError

DEFAULT_WORKSPACE = "/workspace"
MOUNT_TYPES = ("overlay", "host_fs", "memory")
MODE_ALIASES = {"": "overlay", "overlay": "overlay", "snapshot": "overlay",
                "host_fs": "host_fs", "rw": "host_fs", "ro": "ro", "readonly": "ro"}
_GUEST_RE = re.compile(r"^/[a-zA-Z0-9/_.-]+$")
# The workspace is a FUSE mount over part of the guest's root: never where init and the
# agent need the guest's own file systems.
_RESERVED = ("proc", "sys", "dev", "run", "bin", "sbin", "lib", "lib64", "usr", "etc")
VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class MountSpec:
    """One VFS mount: `guest_path` (absolute, inside the workspace) served by a provider."""

    guest_path: str
    type: str = "overlay"  # overlay (snapshot) | host_fs | memory
    host_path: str = ""  # absolute; "" for memory
    readonly: bool = False
    uid: int = 0
    gid: int = 0

    def __post_init__(self) -> None:
        if self.type not in MOUNT_TYPES:
            raise UsageError(f"mount {self.guest_path}: unknown type {self.type!r}")
        if self.type != "memory" and not self.host_path:
            raise UsageError(f"mount {self.guest_path}: {self.type} needs a host path")


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A raw ext4 image attached as virtio-blk and mounted by init at `guest_path`."""

    host_path: str
    guest_path: str
    readonly: bool = False
    volume: str = ""  # the named volume it came from, if any


@dataclass(frozen=True, slots=True)
class MountConfig:
    """Everything a sandbox mounts besides its root: the VFS (workspace + mounts) and
    raw disks. An empty workspace means no VFS (no FUSE, no `fuse` module)."""

    workspace: str = ""
    mounts: tuple[MountSpec, ...] = ()
    disks: tuple[DiskSpec, ...] = field(default_factory=tuple)

    @property
    def vfs(self) -> bool:
        return bool(self.workspace)


def _clean_guest(path: str, what: str, label: str) -> str:
    norm = posixpath.normpath(path)
    if not path.startswith("/") or ".." in path.split("/") or not _GUEST_RE.match(norm):
        raise UsageError(f"{what}: {label} {path!r} must be an absolute path of letters, "
                         "digits and '/_.-' (no '..')")
    return norm


def check_workspace(path: str, what: str = "workspace") -> str:
    ws = _clean_guest(path, what, "workspace")
    first = ws.strip("/").split("/")[0]
    if ws == "/" or first in _RESERVED:
        raise UsageError(f"{what}: the workspace cannot be {ws} (the guest needs it); "
                         f"use a path such as {DEFAULT_WORKSPACE}")
    return ws


def parse_volume(value: str, workspace: str, *, what: str | None = None,
                 cwd: str | None = None) -> MountSpec:
    """`HOST:GUEST[:MODE[,uid=N][,gid=N]]` -> MountSpec. MODE: overlay (default, a
    snapshot), host_fs (alias rw), ro (alias readonly)."""
    what = what or value
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(f"{what}: use HOST:GUEST[:MODE], e.g. ./src:/workspace/src:ro")
    host, guest = parts[0], parts[1]
    opts = parts[2].split(",") if len(parts) == 3 else [""]
    mode_word = opts[0].strip().lower() if "=" not in opts[0] else ""
    extra = opts[1:] if "=" not in opts[0] else opts
    mode = MODE_ALIASES.get(mode_word)
    if mode is None:
        raise UsageError(f"{what}: unknown mode {opts[0]!r}: use overlay (the default, a "
                         "snapshot), host_fs (rw) or ro")
    uid = gid = 0
    for opt in extra:
        key, sep, val = opt.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("uid", "gid") or not val.isdigit() or int(val) > 2**32 - 2:
            raise UsageError(f"{what}: bad option {opt!r}: use uid=N and gid=N")
        if key == "uid":
            uid = int(val)
        else:
            gid = int(val)
    host_abs = os.path.abspath(os.path.join(cwd or os.getcwd(), os.path.expanduser(host)))
    if not os.path.lexists(host_abs):
        raise UsageError(f"{what}: host path {host_abs} does not exist")
    real = os.path.realpath(host_abs)
    if not (os.path.isdir(real) or os.path.isfile(real)):
        raise UsageError(f"{what}: host path {host_abs} is not a directory or a regular file")
    if not guest.startswith("/"):
        guest = posixpath.join(workspace, guest)
    g = _clean_guest(guest, what, "guest path")
    if g != workspace and not g.startswith(workspace.rstrip("/") + "/"):
        raise UsageError(f"{what}: guest path {g} is outside the workspace {workspace}; "
                         f"put it under {workspace} or change the workspace")
    return MountSpec(guest_path=g, type="host_fs" if mode == "ro" else mode, host_path=real,
                     readonly=mode == "ro", uid=uid, gid=gid)


def check_mounts(mounts: list[MountSpec] | tuple[MountSpec, ...]) -> None:
    """Mounts must not share or nest guest paths (each serves a subtree alone)."""
    paths = sorted(m.guest_path for m in mounts)
    for a, b in zip(paths, paths[1:], strict=False):
        if a == b or b.startswith(a.rstrip("/") + "/"):
            raise UsageError(f"mounts overlap: {a} and {b}; give each its own guest path, "
                             "not one inside another")


def parse_disk(value: str, *, what: str | None = None, cwd: str | None = None,
               volumes_dir: Path | None = None) -> DiskSpec:
    """`HOST_PATH:GUEST_MOUNT[:ro]` or `@VOLUME:GUEST_MOUNT[:ro]` -> DiskSpec."""
    what = what or value
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(f"{what}: use HOST_PATH:GUEST_MOUNT[:ro] or @VOLUME:GUEST_MOUNT[:ro]")
    ro = False
    if len(parts) == 3:
        if parts[2].lower() not in ("ro", "readonly", "rw"):
            raise UsageError(f"{what}: unknown mode {parts[2]!r}: use ro, or nothing")
        ro = parts[2].lower() != "rw"
    src, volume = parts[0], ""
    if src.startswith("@"):
        from matchlock.vfs._volumes import volume_path

        volume = src[1:]
        path = volume_path(volume, volumes_dir)
        if not path.is_file():
            raise UsageError(f"{what}: volume {volume!r} does not exist; create it with "
                             f"`matchlock volume create {volume}`")
        host = str(path)
    else:
        host = os.path.abspath(os.path.join(cwd or os.getcwd(), os.path.expanduser(src)))
        if not os.path.exists(host):
            raise UsageError(f"{what}: disk image {host} does not exist")
        if not os.path.isfile(host):
            raise UsageError(f"{what}: disk image {host} is not a regular file")
        host = os.path.realpath(host)
    g = _clean_guest(parts[1], what, "guest mount")
    if g == "/" or g.strip("/").split("/")[0] in ("proc", "sys", "dev", "run"):
        raise UsageError(f"{what}: cannot mount a disk on {g}")
    return DiskSpec(host_path=host, guest_path=g, readonly=ro, volume=volume)


def mount_config(volumes: list[str] | tuple[str, ...], workspace: str | None,
                 disks: list[str] | tuple[str, ...], *, cwd: str | None = None,
                 volume_label: str = "-v", disk_label: str = "--disk",
                 volumes_dir: Path | None = None) -> MountConfig:
    """The CLI's `-v`, `--workspace` and `--disk` values -> MountConfig (all checks).

    `-v` without a workspace uses /workspace; a workspace without `-v` is an empty
    in-memory file system.
    """
    ws = ""
    if workspace or volumes:
        ws = check_workspace(workspace or DEFAULT_WORKSPACE,
                             f"--workspace {workspace}" if workspace else "workspace")
    specs = [parse_volume(v, ws, what=f"{volume_label} {v}", cwd=cwd) for v in volumes]
    check_mounts(specs)
    dspecs = [parse_disk(d, what=f"{disk_label} {d}", cwd=cwd, volumes_dir=volumes_dir)
              for d in disks]
    seen: dict[str, str] = {}
    for d in dspecs:
        if d.guest_path in seen:
            raise UsageError(f"{disk_label}: two disks at {d.guest_path}")
        seen[d.guest_path] = d.host_path
        if ws and (d.guest_path == ws or d.guest_path.startswith(ws.rstrip("/") + "/")
                   or ws.startswith(d.guest_path.rstrip("/") + "/")):
            raise UsageError(f"{disk_label} {d.host_path}:{d.guest_path}: the workspace {ws} "
                             "would shadow it (or it the workspace); mount it elsewhere")
    hosts = [d.host_path for d in dspecs]
    if len(set(hosts)) != len(hosts):
        raise UsageError(f"{disk_label}: the same image is attached twice")
    return MountConfig(workspace=ws, mounts=tuple(specs), disks=tuple(dspecs))
