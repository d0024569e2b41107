"""ensure_builtin, truncated streams, concurrency, and the non-root (fakeroot) path."""

from __future__ import annotations

import functools
import gzip
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from image_helpers import DEBUGFS, cat, d, docker_save, dstat, f, layer, leftovers, ls, sym

from matchlock.errors import DependencyError, MatchlockError
from matchlock.image import BUILTIN_IMAGE, ImageStore, _builtin

SRC = Path(__file__).resolve().parents[3] / "src"


@pytest.fixture(autouse=True)
def _tools() -> None:
    # Installed by scripts/install.sh: missing tools fail the run, they never skip it.
    if DEBUGFS is None:
        pytest.fail("debugfs not found: install e2fsprogs (./scripts/install.sh)", False)


def needs_busybox(fn):
    def wrapper(*args, **kwargs):
        if not _builtin.BUSYBOX.is_file():
            pytest.fail("busybox-static not installed (./scripts/install.sh)", False)
        return fn(*args, **kwargs)

    return functools.wraps(fn)(wrapper)


@needs_busybox
def test_ensure_builtin(store):
    t0 = time.monotonic()
    img = store.ensure_builtin()
    first = time.monotonic() - t0
    assert img.name == BUILTIN_IMAGE and img.source == "builtin"
    assert img.config.cmd == ("sh",)
    assert img.config.env == ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    disk = img.disk
    assert stat.S_IMODE(disk.stat().st_mode) == 0o444
    sh = dstat(disk, "/bin/sh")
    assert sh["type"] == "symlink" and '"/bin/busybox"' in sh["raw"]
    bb = dstat(disk, "/bin/busybox")
    assert bb["type"] == "regular" and bb["mode"] == 0o755
    assert cat(disk, "/bin/busybox") == _builtin.BUSYBOX.read_bytes()
    assert dstat(disk, "/usr/bin/awk")["type"] == "symlink"
    passwd = cat(disk, "/etc/passwd").decode()
    assert "root:x:0:0:" in passwd and "nobody:x:65534:65534:" in passwd
    assert "user:x:1000:1000:user:/home/user:" in passwd
    assert "user:x:1000:" in cat(disk, "/etc/group").decode()
    assert 'PRETTY_NAME="Matchlock busybox"' in cat(disk, "/etc/os-release").decode()
    tmp = dstat(disk, "/tmp")
    assert tmp["mode"] == 0o1777 and tmp["uid"] == 0
    home = dstat(disk, "/home/user")
    assert (home["uid"], home["gid"]) == (1000, 1000)
    assert dstat(disk, "/root")["type"] == "directory"

    t0 = time.monotonic()
    again = store.ensure_builtin()
    second = time.monotonic() - t0
    assert again == img
    assert second < 0.5 and second < first
    assert len(list((store.root / "disks").iterdir())) == 1
    assert store.get("matchlock/busybox") == img


@needs_busybox
def test_builtin_id_follows_busybox(store, monkeypatch, tmp_path):
    img = store.ensure_builtin()
    fake = tmp_path / "busybox"
    shutil.copy(_builtin.BUSYBOX, fake)
    with open(fake, "ab") as fh:
        fh.write(b"\0upgrade")
    monkeypatch.setattr(_builtin, "BUSYBOX", fake)
    new = store.ensure_builtin()
    assert new.id != img.id and not img.disk.exists() and new.disk.exists()


def test_builtin_needs_static_busybox(store, monkeypatch, tmp_path):
    monkeypatch.setattr(_builtin, "BUSYBOX", tmp_path / "nope")
    with pytest.raises(DependencyError, match="busybox-static"):
        store.ensure_builtin()
    monkeypatch.setattr(_builtin, "BUSYBOX", Path(sys.executable).resolve())
    with pytest.raises(DependencyError, match="dynamically linked.*busybox-static"):
        store.ensure_builtin()


@needs_busybox
def test_builtin_concurrent(tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from pathlib import Path; from matchlock.image import ImageStore;"
        "print(ImageStore(Path(sys.argv[2])).ensure_builtin().id)"
    )
    root = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(SRC), str(root)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(ids) == 1 and next(iter(ids)).startswith("sha256:")
    store = ImageStore(root)
    assert [i.name for i in store.list()] == [BUILTIN_IMAGE]
    assert len(list((root / "disks").iterdir())) == 1
    assert list((root / "tmp").iterdir()) == []


def test_missing_tools(store, monkeypatch):
    from matchlock.image import _disk

    monkeypatch.setattr(_disk, "find_tool", lambda name: None)
    with pytest.raises(DependencyError, match="e2fsprogs"):
        store.import_tar("x", io.BytesIO(docker_save([layer(f("a"))])))
    monkeypatch.setattr(_disk, "find_tool", lambda name: "/usr/sbin/mke2fs" * (name != "fakeroot"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DependencyError, match="fakeroot"):
        store.import_tar("x", io.BytesIO(docker_save([layer(f("a"))])))
    assert leftovers(store.root) == []


# ---- truncated layers -------------------------------------------------------------------

BIG = layer(*[f(f"file{i}", os.urandom(600)) for i in range(8)])


@pytest.mark.parametrize("how", ["plain-at-header", "plain-mid-header", "gzip", "zstd"])
def test_truncated_layer_detected(store, how):
    # each member: 512-byte header + 600 bytes of data padded to 1024
    if how == "plain-at-header":
        blob = BIG[: 2 * 1536]  # exactly after two members: a clean header boundary
    elif how == "plain-mid-header":
        blob = BIG[: 2 * 1536 + 200]
    elif how == "gzip":
        blob = gzip.compress(BIG)[:-100]
    else:
        zstandard = pytest.importorskip("zstandard")
        blob = zstandard.ZstdCompressor().compress(BIG)[:-100]
    tar = docker_save([layer(f("base")), blob])
    with pytest.raises(MatchlockError, match="corrupt image tarball: layer sha256:") as ei:
        store.import_tar("trunc", io.BytesIO(tar))
    assert "\n" not in str(ei.value)
    assert leftovers(store.root) == []


def test_truncated_outer_at_header_boundary(store):
    tar = docker_save([layer(f("a", "a"))])
    # cut right after the first member's data, on a 512-byte boundary
    with pytest.raises(MatchlockError, match="not a docker-save or OCI-layout tarball"):
        store.import_tar("t", io.BytesIO(tar[:1024]))
    assert leftovers(store.root) == []


# ---- non-root import through fakeroot --------------------------------------------------


def _nonroot_prefix() -> list[str] | None:
    if os.geteuid() != 0:
        return []  # already unprivileged
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    if os.path.exists(runuser):
        return [runuser, "-u", "nobody", "--"]
    return None


def _unprivileged_python() -> str | None:
    # pyenv/venv interpreters under /root are not readable by nobody; use the system one.
    fakeroot = shutil.which("fakeroot") or "fakeroot"
    for cand in (sys.executable, "/usr/bin/python3"):
        probe = [*(_nonroot_prefix() or []), fakeroot, "--", cand, "-c", "import sqlite3"]
        r = subprocess.run(probe, capture_output=True)
        if r.returncode == 0:
            return cand
    return None


def test_import_as_non_root_keeps_ownership():
    if shutil.which("fakeroot") is None:
        pytest.fail("fakeroot not installed (./scripts/install.sh)", False)
    prefix = _nonroot_prefix()
    if prefix is None:
        pytest.fail("no setpriv/runuser to drop privileges (util-linux)", False)
    python = _unprivileged_python()
    if python is None:
        pytest.fail("no python usable by an unprivileged user (install python3)", False)
    work = Path(tempfile.mkdtemp(prefix="matchlock-nonroot-"))
    try:
        os.chmod(work, 0o777)
        # A copy of the sources nobody can read, wherever the checkout lives.
        src = work / "src"
        shutil.copytree(SRC / "matchlock", src / "matchlock",
                        ignore=shutil.ignore_patterns("__pycache__", "_guest"))
        for p in [src, *src.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        lay1 = layer(
            d("home"),
            d("home/user", mode=0o750, uid=1000, gid=1000),
            f("home/user/notes", "n", mode=0o600, uid=1000, gid=1000),
            d("bin"),
            f("bin/su", "su", mode=0o4755),
            d("locked", mode=0o000),
            f("locked/inner", "i", mode=0o000, uid=5, gid=6),
            sym("lib", "usr/lib"),
        )
        lay2 = layer(f("locked/late", "l", uid=7, gid=8), f("locked/.wh.inner"))
        tarball = work / "img.tar"
        tarball.write_bytes(docker_save([lay1, lay2]))
        os.chmod(tarball, 0o644)
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            "from pathlib import Path; from matchlock.image import ImageStore;"
            "s = ImageStore(Path(sys.argv[2]));"
            "img = s.import_tar('nr:1', open(sys.argv[3], 'rb'), print);"
            "print('DISK', img.disk)"
        )
        r = subprocess.run(
            [*prefix, python, "-c", code, str(src), str(work / "store"), str(tarball)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(work)},
        )
        assert r.returncode == 0, r.stderr + r.stdout
        assert "applying layer 2/2" in r.stdout
        disk = Path(r.stdout.split("DISK ", 1)[1].strip())
        if os.geteuid() == 0:
            assert disk.stat().st_uid == 65534  # really built by the unprivileged user
        home = dstat(disk, "/home/user")
        assert (home["mode"], home["uid"], home["gid"]) == (0o750, 1000, 1000)
        notes = dstat(disk, "/home/user/notes")
        assert (notes["mode"], notes["uid"], notes["gid"]) == (0o600, 1000, 1000)
        su = dstat(disk, "/bin/su")
        assert (su["mode"], su["uid"], su["gid"]) == (0o4755, 0, 0)
        locked = dstat(disk, "/locked")
        assert (locked["mode"], locked["uid"]) == (0o000, 0)
        assert ls(disk, "/locked") == ["late"]
        late = dstat(disk, "/locked/late")
        assert (late["uid"], late["gid"], late["mode"]) == (7, 8, 0o644)
        root = dstat(disk, "/")
        assert (root["uid"], root["gid"]) == (0, 0)
        assert list((work / "store" / "tmp").iterdir()) == []

        # a hostile layer fails inside the fakeroot session; the message comes back intact
        evil = work / "evil.tar"
        evil.write_bytes(docker_save([lay1, layer(sym("up", "../.."), f("up/x", "x"))]))
        os.chmod(evil, 0o644)
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            "from pathlib import Path; from matchlock.image import ImageStore;"
            "from matchlock.errors import MatchlockError\n"
            "try: ImageStore(Path(sys.argv[2])).import_tar('evil', open(sys.argv[3], 'rb'))\n"
            "except MatchlockError as e: print('ERR', e); sys.exit(3)"
        )
        r = subprocess.run(
            [*prefix, python, "-c", code, str(src), str(work / "store"), str(evil)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(work)},
        )
        assert r.returncode == 3, r.stderr + r.stdout
        assert "ERR corrupt image tarball: layer sha256:" in r.stdout
        assert "leaves the tree" in r.stdout
        assert list((work / "store" / "tmp").iterdir()) == []
        assert len(list((work / "store" / "disks").iterdir())) == 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
