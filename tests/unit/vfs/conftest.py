"""A real FUSE mount on the host: the C guest's `fused` (as in the VM) relays the host
kernel's FUSE requests over a socketpair to VfsServer. Exercises the whole VFS but the VM.
Fails (never skips) without /dev/fuse or musl-gcc."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from matchlock.guest_build import build_guest
from matchlock.vfs import (
    FuseFilesystem,
    HookEngine,
    HostFS,
    MemoryFS,
    Mount,
    SnapshotFS,
    VfsServer,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def guest_binary(tmp_path_factory) -> Path:
    return build_guest(ROOT / "guest", tmp_path_factory.mktemp("guest") / "matchlock-guest")


def provider(kind: str, tmp_path: Path):  # noqa: ANN201 - a Provider
    """memory, host_fs over tmp_path/src, or overlay (a snapshot of tmp_path/src)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    if kind == "memory":
        return MemoryFS()
    if kind == "host_fs":
        return HostFS(src)
    return SnapshotFS(src, tmp_path / "snap")


def _mounted(path: Path) -> bool:
    want = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mounts", "rb") as f:
        return any(line.split()[1] == want for line in f)


@contextlib.contextmanager
def fuse_mount(guest: Path, mountpoint: Path, mounts: list[Mount],
               hooks: HookEngine | None = None,
               workspace: str = "/workspace",
               bounce: Path | None = None) -> Iterator[FuseFilesystem]:
    """`bounce`: a bounce file for READ data (the VM's bounce disk), shared by fused and
    the server as in the VM."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: load the fuse module (modprobe fuse)", False)
    fs = FuseFilesystem(workspace, mounts, hooks)
    bounce_fd = None
    extra: list[str] = []
    if bounce is not None:
        from matchlock.vfs._wire import BOUNCE_SLOT, BOUNCE_SLOTS

        bounce_fd = os.open(bounce, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(bounce_fd, BOUNCE_SLOTS * BOUNCE_SLOT)
        extra = ["--bounce", str(bounce)]
    server = VfsServer(fs, bounce_fd)
    host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(guest), "fused", "--fd", str(guest_end.fileno()), "--mount",
                             str(mountpoint), *extra], pass_fds=(guest_end.fileno(),))
    guest_end.close()
    server.start(host)
    try:
        deadline = time.monotonic() + 10
        while not _mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fused did not mount {mountpoint} (rc {proc.poll()})")
            time.sleep(0.01)
        fs.server = server  # type: ignore[attr-defined]
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.stop()
        if bounce_fd is not None:
            os.close(bounce_fd)
