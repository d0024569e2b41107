"""`SandboxMounts`: everything one sandbox's MountConfig takes on the host, with one owner.

prepare() (before QEMU starts): disk locks, providers (a snapshot's private copy lives in
the VM's directory), the VFS port's socket pair and the bounce file (READ data on its way
to the guest, which sees it as a read-only disk: _wire.FLAG_BOUNCE). start() (QEMU
running): the VFS server. close(): the server, every handle and provider (snapshots
deleted), the bounce file, the locks. Blocking calls throughout: the sandbox runs them in
a worker thread. The FUSE server, providers and disk locks load when a config uses them:
a VM without mounts imports none of them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from matchlock._log import get_logger
from matchlock.vfs._spec import MountConfig, MountSpec

if TYPE_CHECKING:
    from matchlock.vfs._fs import FuseFilesystem
    from matchlock.vfs._hooks import HookEngine
    from matchlock.vfs._provider import Provider
    from matchlock.vfs._volumes import DiskLock
    from matchlock.vfs.server import VfsServer

log = get_logger(__name__)

DISK_SERIAL_PREFIX = "ml-disk"
# Kernel modules the guest needs for a config (besides the VM's base set).
FUSE_MODULES = ("fuse",)


@dataclass(frozen=True, slots=True)
class DiskAttachment:
    path: str
    serial: str
    readonly: bool


def provider_for(spec: MountSpec, private_dir: Path, index: int) -> Provider:
    from matchlock.vfs._hostfs import HostFS
    from matchlock.vfs._memory import MemoryFS
    from matchlock.vfs._readonly import ReadOnly
    from matchlock.vfs._snapshot import SnapshotFS

    salt = (index + 1) << 56  # inode numbers of different mounts never collide
    single = None
    root = spec.host_path
    if spec.host_path and os.path.isfile(spec.host_path):
        root, single = os.path.split(spec.host_path)
    if spec.type == "memory":
        prov: Provider = MemoryFS(uid=spec.uid, gid=spec.gid, salt=salt)
    elif spec.type == "overlay":
        prov = SnapshotFS(root, private_dir / f"mount-{index}", single=single, uid=spec.uid,
                          gid=spec.gid, salt=salt)
    else:
        prov = HostFS(root, single=single, uid=spec.uid, gid=spec.gid, salt=salt)
    return ReadOnly(prov) if spec.readonly else prov


class SandboxMounts:
    def __init__(self, config: MountConfig, vm_dir: Path,
                 hooks: HookEngine | None = None) -> None:
        self.config = config
        self.vm_dir = vm_dir
        self.hooks = hooks  # made with the VFS when None
        self.fs: FuseFilesystem | None = None
        self.server: VfsServer | None = None
        self._locks: list[DiskLock] = []
        self._host_sock: socket.socket | None = None
        self._guest_sock: socket.socket | None = None
        self.disks: list[DiskAttachment] = []  # --disk images, in config order
        self.bounce: DiskAttachment | None = None
        self._bounce_fd: int | None = None

    # -- before the VM -------------------------------------------------------------------

    def prepare(self) -> None:
        try:
            if self.config.disks:
                self._lock_disks()
            if self.config.vfs:
                self._prepare_vfs()
        except BaseException:
            self.close()
            raise

    def _lock_disks(self) -> None:
        from matchlock.vfs._volumes import DiskLock

        for i, d in enumerate(self.config.disks):
            self._locks.append(DiskLock(d.host_path, d.readonly))
            self.disks.append(DiskAttachment(d.host_path, f"{DISK_SERIAL_PREFIX}{i}",
                                             d.readonly))

    def _prepare_vfs(self) -> None:
        from matchlock.vfs._fs import FuseFilesystem, Mount
        from matchlock.vfs._hooks import HookEngine

        if self.hooks is None:
            self.hooks = HookEngine()
        ws = self.config.workspace
        private = self.vm_dir / "vfs"
        private.mkdir(mode=0o700, exist_ok=True)
        mounts = []
        try:
            for i, spec in enumerate(self.config.mounts):
                rel = spec.guest_path[len(ws):].strip("/")
                m = Mount(rel, provider_for(spec, private, i))
                mounts.append(m)
            self.fs = FuseFilesystem(ws, mounts, self.hooks)
        except BaseException:
            for m in mounts:
                m.provider.close()
            raise
        self._host_sock, self._guest_sock = socket.socketpair(socket.AF_UNIX,
                                                              socket.SOCK_STREAM)
        self._make_bounce(private / "bounce.buf")

    def _make_bounce(self, path: Path) -> None:
        from matchlock.vfs._wire import BOUNCE_SERIAL, BOUNCE_SLOT, BOUNCE_SLOTS

        # Sparse: only slots a READ used take host disk (page cache, mostly).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, BOUNCE_SLOTS * BOUNCE_SLOT)
        except BaseException:
            os.close(fd)
            raise
        self._bounce_fd = fd
        self.bounce = DiskAttachment(str(path), BOUNCE_SERIAL, True)

    @property
    def attachments(self) -> list[DiskAttachment]:
        """Every disk QEMU attaches for the mounts: --disk images, then the bounce file."""
        return [*self.disks, *([self.bounce] if self.bounce is not None else [])]

    @property
    def guest_fd(self) -> int | None:
        """The VFS port's guest end, for QEMU to inherit (None: no VFS)."""
        return self._guest_sock.fileno() if self._guest_sock is not None else None

    def cmdline(self) -> list[str]:
        args = [f"matchlock.disk={d.serial}:{spec.guest_path}{':ro' if d.readonly else ''}"
                for d, spec in zip(self.disks, self.config.disks, strict=True)]
        if self.config.vfs:
            args.append(f"matchlock.workspace={self.config.workspace}")
        if self.bounce is not None:
            args.append(f"matchlock.vfsbuf={self.bounce.serial}")
        return args

    def modules(self) -> tuple[str, ...]:
        return FUSE_MODULES if self.config.vfs else ()

    # -- with the VM ---------------------------------------------------------------------

    def start(self) -> None:
        """QEMU holds the guest end now: serve the VFS on ours."""
        if self._guest_sock is not None:
            self._guest_sock.close()
            self._guest_sock = None
        if self.fs is not None and self._host_sock is not None:
            from matchlock.vfs.server import VfsServer

            self.server = VfsServer(self.fs, self._bounce_fd)
            sock, self._host_sock = self._host_sock, None
            self.server.start(sock)

    def close(self) -> None:
        """Idempotent; never raises."""
        for s in (self._guest_sock, self._host_sock):
            if s is not None:
                s.close()
        self._guest_sock = self._host_sock = None
        try:
            if self.server is not None:
                self.server.stop()
            elif self.fs is not None:
                self.fs.hooks.close()
                self.fs.close()
        except Exception as e:  # noqa: BLE001 - cleanup goes on
            log.warning("VFS shutdown failed: %s", e)
        self.server = None
        self.fs = None
        if self._bounce_fd is not None:
            os.close(self._bounce_fd)
            self._bounce_fd = None
        if self.bounce is not None:  # only in-flight READ data: nothing to keep
            try:
                os.unlink(self.bounce.path)
            except OSError:
                pass
        for lock in self._locks:
            lock.release()
        self._locks = []
