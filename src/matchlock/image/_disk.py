"""Turn layer blobs into a read-only ext4 root disk.

Extraction and `mke2fs -d` must see the same (possibly faked) ownership, so when we are not
root both run inside ONE `fakeroot` session: `fakeroot -- python -m matchlock.image._build
SPEC`. As root they run in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matchlock
from matchlock.errors import DependencyError, MatchlockError

MiB = 1 << 20
BLOCK = 4096
LABEL = "matchlock-root"
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_tool(name: str) -> str | None:
    """`shutil.which`, also looking in sbin dirs (not on a normal user's PATH on Debian)."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def require_mke2fs() -> str:
    exe = find_tool("mke2fs")
    if not exe:
        raise DependencyError(
            "mke2fs not found; install e2fsprogs (apt-get install e2fsprogs) to build image disks"
        )
    return exe


def require_fakeroot() -> str | None:
    """The fakeroot binary when we need one (not root), else None."""
    if os.geteuid() == 0:
        return None
    exe = find_tool("fakeroot")
    if not exe:
        raise DependencyError(
            "fakeroot not found; install fakeroot (apt-get install fakeroot) to build image "
            "disks as a non-root user, or run as root"
        )
    return exe


def measure(root: Path) -> tuple[int, int]:
    """(bytes of content in 4 KiB blocks, number of inodes) of the tree at `root`."""
    blocks = 0
    inodes = 1
    seen: set[int] = set()
    stack = [str(root)]
    while stack:
        d = stack.pop()
        entries = 0
        with os.scandir(d) as it:
            for e in it:
                entries += 1
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                    inodes += 1
                    continue
                if st.st_nlink > 1:
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                inodes += 1
                if stat.S_ISREG(st.st_mode):
                    blocks += -(-st.st_size // BLOCK)
                    # one extent-tree block per ~128 MiB of file
                    blocks += st.st_size // (128 * MiB)
                elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                    blocks += 1
        # directory blocks: ~ 1 block per 64 entries (names average < 48 bytes)
        blocks += 1 + entries // 64
    return blocks * BLOCK, inodes


def make_ext4(root: Path, out: Path) -> int:
    """mke2fs -d `root` into the new file `out`; returns the content size measured."""
    exe = require_mke2fs()
    content, inodes = measure(root)
    n_inodes = inodes + max(256, inodes // 10)
    size = int(content * 1.2) + n_inodes * 256 + 16 * MiB
    size = -(-size // MiB) * MiB
    cmd = [
        exe, "-q", "-t", "ext4", "-O", "^has_journal", "-E", "root_owner=0:0",
        "-b", str(BLOCK), "-I", "256", "-N", str(n_inodes), "-m", "0",
        "-d", str(root), "-L", LABEL, str(out), f"{size // 1024}k",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        detail = msg[-1] if msg else f"exit status {r.returncode}"
        if "No space left" in (r.stderr or ""):
            detail += f" (estimated {size // MiB} MiB for {content // MiB} MiB of content)"
        raise MatchlockError(f"mke2fs failed building the image disk: {detail}")
    return content


Progress = Callable[[str], None]


def build_inprocess(spec: dict, progress: Progress) -> dict:
    """Apply layers then mke2fs; both as the current (real or faked) root."""
    from matchlock.image._layers import apply_layers

    rootfs = Path(spec["rootfs"])
    disk = Path(spec["disk"])
    layers = [(Path(e[0]), e[1], e[2] if len(e) > 2 else None) for e in spec["layers"]]
    t0 = time.perf_counter()
    apply_layers(rootfs, layers, progress)
    t1 = time.perf_counter()
    progress("building disk (mke2fs)")
    content = make_ext4(rootfs, disk)
    return {"content": content, "unpack_s": t1 - t0, "mkfs_s": time.perf_counter() - t1}


# ---- where layers are unpacked -----------------------------------------------------------
# The unpacked tree only lives until mke2fs has copied it into the disk image. Creating ten
# thousand small files is several times faster on tmpfs than on a disk filesystem, so it goes
# to /dev/shm when that has ample room; otherwise (or if tmpfs fills up after all) into the
# store's own staging directory. Its path is recorded in the staging directory first, so that
# the sweep of a killed process's staging directory also frees the tmpfs.

SHM = Path("/dev/shm")
SHM_PREFIX = "matchlock-unpack-"
STAGING_NOTE = "unpack-dir"


def unpack_estimate(sizes: list[tuple[int, bool]]) -> int:
    """Bytes an unpacked tree may need: (blob size, compressed?) per layer."""
    return sum(size * (5 if compressed else 1) for size, compressed in sizes) + 64 * MiB


def make_unpack_dir(work: Path, estimate: int, prefer_tmpfs: bool = True) -> Path:
    if prefer_tmpfs and os.environ.get("MATCHLOCK_UNPACK_TMPFS", "1") != "0":
        try:
            st = os.statvfs(SHM)
            free = st.f_bavail * st.f_frsize
            if os.access(SHM, os.W_OK) and free >= 2 * estimate:
                path = SHM / f"{SHM_PREFIX}{os.urandom(8).hex()}"
                # Recorded before it exists, so that a sweep always finds it.
                (work / STAGING_NOTE).write_text(str(path))
                os.mkdir(path, 0o700)
                return path
        except OSError:
            pass
    path = work / "rootfs"
    path.mkdir()
    return path


def remove_unpack_dir(work: Path) -> None:
    """Remove what `make_unpack_dir` recorded for `work` (the tmpfs tree), if anything."""
    note = work / STAGING_NOTE
    try:
        target = Path(note.read_text().strip())
    except OSError:
        return
    if target.parent == SHM and target.name.startswith(SHM_PREFIX):
        rmtree_any(target)
    note.unlink(missing_ok=True)


def rmtree_any(path: Path) -> None:
    """rmtree that also copes with read-only directories (image trees have them)."""

    def onerror(func, p, exc_info):  # noqa: ANN001
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(p), 0o700)
                func(p)
                return
        raise exc

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


def build(spec: dict, progress: Progress) -> dict:
    """Run `build_inprocess`, under fakeroot when not root."""
    require_mke2fs()
    fakeroot = require_fakeroot()
    if fakeroot is None:
        return build_inprocess(spec, progress)

    spec_path = Path(spec["disk"]).parent / "build-spec.json"
    spec_path.write_text(json.dumps(spec))
    pkg_parent = str(Path(matchlock.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    cmd = [fakeroot, "--", sys.executable, "-m", "matchlock.image._build", str(spec_path)]
    # Own process group: on interrupt we signal fakeroot, its python and mke2fs together;
    # SIGINT (not SIGKILL) so fakeroot's trap also stops its faked daemon.
    # stderr goes to a file, not a pipe: no deadlock on a chatty child.
    err_path = spec_path.with_name("build-stderr.txt")
    result: dict | None = None
    error: str | None = None
    error_kind = ""
    try:
        with open(err_path, "w+") as err_file:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
                env=env,
                start_new_session=True,
            )
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if "progress" in msg:
                        progress(msg["progress"])
                    elif "error" in msg:
                        error = msg["error"]
                        error_kind = msg.get("kind", "")
                    elif "done" in msg:
                        result = msg["done"]
                rc = proc.wait()
            except BaseException:
                _stop_group(proc)
                raise
            err_file.seek(0)
            stderr = err_file.read()
    finally:
        err_path.unlink(missing_ok=True)
        spec_path.unlink(missing_ok=True)
    if error is not None:
        if error_kind == "nospace":
            from matchlock.image._layers import NoSpaceError

            raise NoSpaceError(error)
        raise MatchlockError(error)
    if rc != 0 or result is None:
        lines = stderr.strip().splitlines()
        detail = lines[-1] if lines else f"exit status {rc}"
        raise MatchlockError(f"building the image disk under fakeroot failed: {detail}")
    return result


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
