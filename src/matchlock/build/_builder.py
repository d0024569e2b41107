"""The builder image: Debian bookworm with Buildah, made offline by matchlock itself
(`mmdebstrap` from the Debian mirror), imported once into the image store as
`matchlock/builder:<recipe>` and reused by every build.

The recipe (suite + packages) names the image, so changing it makes a new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from matchlock.errors import DependencyError, MatchlockError, NotFoundError
from matchlock.image import Image, ImageStore
from matchlock.paths import cache_dir

SUITE = "bookworm"
# buildah: the engine; fuse-overlayfs: its overlay driver where the kernel's is refused;
# uidmap: newuidmap for USER-namespaced steps; ca-certificates: the VM's trust store, to
# which the sandbox CA is added (RUN steps mount it for the sealed network's proxy).
PACKAGES = ("buildah", "fuse-overlayfs", "uidmap", "ca-certificates")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MIRROR_ENV = "MATCHLOCK_DEBIAN_MIRROR"
MMDEBSTRAP_TIMEOUT_S = 1800

Progress = Callable[[str], None]


def recipe_id() -> str:
    return hashlib.sha256(f"{SUITE}:{','.join(PACKAGES)}:1".encode()).hexdigest()[:12]


def builder_name() -> str:
    return f"matchlock/builder:{recipe_id()}"


def builder_status(store: ImageStore | None = None) -> Image | None:
    """The stored builder image, or None when the next build must make it."""
    try:
        return (store or ImageStore()).get(builder_name())
    except NotFoundError:
        return None


def _mmdebstrap(out: Path, progress: Progress) -> None:
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise DependencyError("mmdebstrap not found: the builder image is made with it "
                              "(apt-get install mmdebstrap)")
    cmd = [exe, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(out)]
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        cmd.append(mirror)
    progress(f"Making the builder image ({SUITE} + {', '.join(PACKAGES)}) with mmdebstrap; "
             "this happens once")
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=MMDEBSTRAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise MatchlockError(f"mmdebstrap did not finish within {MMDEBSTRAP_TIMEOUT_S} s"
                             ) from None
    if r.returncode != 0:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        raise MatchlockError(
            f"mmdebstrap failed (exit {r.returncode}) making the builder image: {tail}; is "
            f"the Debian mirror reachable (set {MIRROR_ENV} to use another)?")


def ensure_builder(store: ImageStore | None = None, progress: Progress | None = None) -> Image:
    """The builder image, made (once, under a lock) when it is not stored yet."""
    from matchlock.image.testimages import make_docker_save

    store = store or ImageStore()
    progress = progress or (lambda _m: None)
    img = builder_status(store)
    if img is not None:
        return img
    work_root = cache_dir() / "build"
    work_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_root / "builder.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        img = builder_status(store)  # made by another build while we waited
        if img is not None:
            return img
        with tempfile.TemporaryDirectory(prefix="builder-", dir=work_root) as td:
            rootfs = Path(td) / "rootfs.tar"
            _mmdebstrap(rootfs, progress)
            save = Path(td) / "image.tar"
            make_docker_save(rootfs, save, {"Env": [PATH_ENV], "Cmd": ["bash"]},
                             tag=builder_name())
            rootfs.unlink()
            with open(save, "rb") as f:
                return store.import_tar(builder_name(), f, progress)
    finally:
        os.close(fd)
