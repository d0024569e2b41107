"""Snapshot isolation, read-only enforcement and confinement (no escape from a mount root),
through a real FUSE mount and against the providers directly."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from tests.unit.vfs.conftest import fuse_mount

from matchlock.vfs import HostFS, MemoryFS, Mount, ReadOnly, SnapshotFS

pytestmark = pytest.mark.timeout(120)


def manifest(root: Path) -> dict[str, tuple]:
    """Every path under root: (type, mode, size, sha256 or link target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def make_tree(src: Path) -> None:
    (src / "dir/sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "b.bin").write_bytes(os.urandom(300_000))
    (src / "dir/c.txt").write_text("gamma\n")
    (src / "dir/sub/d.txt").write_text("delta\n")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "run.sh", 0o755)
    os.symlink("a.txt", src / "link")
    os.link(src / "a.txt", src / "a-hard")


def test_snapshot_leaves_host_identical(tmp_path, guest_binary):
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    before = manifest(src)
    snap = tmp_path / "snap"
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("r", SnapshotFS(src, snap))]):
        m = tmp_path / "m/r"
        (m / "a.txt").write_text("changed\n")
        with open(m / "b.bin", "r+b") as f:
            f.seek(1000)
            f.write(b"XYZ")
        os.truncate(m / "dir/c.txt", 2)
        os.unlink(m / "dir/sub/d.txt")
        os.rename(m / "dir", m / "moved")
        (m / "new").mkdir()
        (m / "new/file").write_text("new\n")
        os.chmod(m / "run.sh", 0o700)
        os.utime(m / "a-hard", ns=(1, 1))
        os.unlink(m / "link")
        os.symlink("/etc/passwd", m / "link")
        os.mkdir(m / "dir")  # recreated where a lower dir was: must be empty (opaque)
        # what the guest sees: its own changes, for the life of the mount
        assert (m / "a.txt").read_text() == "changed\n"
        assert (m / "moved/c.txt").read_text() == "ga"
        assert not (m / "moved/sub/d.txt").exists()
        assert os.listdir(m / "dir") == []
        assert os.readlink(m / "link") == "/etc/passwd"
        assert sorted(os.listdir(m)) == sorted(
            ["a.txt", "a-hard", "b.bin", "run.sh", "link", "moved", "new", "dir"])
        shutil.rmtree(m / "moved")
        assert not (m / "moved").exists()
    assert manifest(src) == before
    assert not snap.exists(), "the snapshot's private copy outlived the mount"


def test_snapshot_is_lazy(tmp_path, guest_binary):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2000):
        (src / f"f{i}").write_bytes(b"x" * 1000)
    snap = tmp_path / "snap"
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("r", SnapshotFS(src, snap))]):
        assert len(os.listdir(tmp_path / "m/r")) == 2000
        (tmp_path / "m/r/f7").write_text("y")
        copied = [p for p in (snap / "upper").rglob("*")]
        assert [p.name for p in copied] == ["f7"], "only the written file is copied up"


def _ro_cases(m: Path) -> dict[str, callable]:
    return {
        "write": lambda: open(m / "a.txt", "w"),
        "append": lambda: open(m / "a.txt", "a"),
        "create": lambda: open(m / "new", "w"),
        "truncate": lambda: os.truncate(m / "a.txt", 0),
        "chmod": lambda: os.chmod(m / "a.txt", 0o777),
        "chown": lambda: os.chown(m / "a.txt", 1, 1),
        "utime": lambda: os.utime(m / "a.txt", (1, 1)),
        "unlink": lambda: os.unlink(m / "a.txt"),
        "rename": lambda: os.rename(m / "a.txt", m / "z"),
        "rename over": lambda: os.rename(m / "dir/c.txt", m / "a.txt"),
        "link": lambda: os.link(m / "a.txt", m / "hard2"),
        "mkdir": lambda: os.mkdir(m / "nd"),
        "rmdir": lambda: os.rmdir(m / "dir/sub"),
        "symlink": lambda: os.symlink("x", m / "sl"),
        "setxattr": lambda: os.setxattr(m / "a.txt", "user.x", b"1"),
        "mkfifo": lambda: os.mkfifo(m / "fifo"),
    }


def test_readonly_refuses_every_write(tmp_path, guest_binary):
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    before = manifest(src)
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("ro", ReadOnly(HostFS(src))),
                                                   Mount("rw", HostFS(src))]):
        m = tmp_path / "m/ro"
        assert (m / "a.txt").read_text() == "alpha\n"  # positive control: reads work
        for what, op in _ro_cases(m).items():
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EROFS, f"{what}: {e.value}"
        assert not os.access(m / "a.txt", os.W_OK)
        # the guest remounting read-write changes nothing: the host refuses
        subprocess.run(["mount", "-o", "remount,rw", str(tmp_path / "m")], capture_output=True)
        with pytest.raises(OSError) as e:
            os.open(m / "a.txt", os.O_WRONLY)
        assert e.value.errno == errno.EROFS
        # positive control: the same host directory through a read-write mount
        (tmp_path / "m/rw/ok").write_text("ok")
    (src / "ok").unlink()
    assert manifest(src) == before


# -- confinement: the providers never reach outside their root ------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("SECRET")
    (root / "real/f").write_text("inside")
    os.symlink(str(outside), root / "out")  # a symlinked dir pointing outside
    os.symlink(str(outside / "secret"), root / "sec")  # a symlinked file
    os.symlink("../outside/secret", root / "rel")
    return root, outside


@pytest.mark.parametrize("kind", ["host_fs", "overlay"])
def test_provider_never_follows_symlinks_out(tree, tmp_path, kind):
    root, outside = tree
    p = HostFS(root) if kind == "host_fs" else SnapshotFS(root, tmp_path / "snap")
    try:
        assert p.getattr("real/f").size == 6  # positive control
        # the links are data: their own attributes, their own text
        assert stat.S_ISLNK(p.getattr("out").mode)
        assert p.readlink("sec") == str(outside / "secret")
        for bad in ("out/secret", "sec", "rel", "out"):
            with pytest.raises(OSError):
                h = p.open(bad, os.O_RDONLY)
                h.release()
        for bad in ("out/secret", "out/new"):
            with pytest.raises(OSError):
                p.getattr(bad) if bad.endswith("secret") else p.create(bad, os.O_WRONLY, 0o644,
                                                                      0, 0)
        with pytest.raises(OSError):
            p.open("sec", os.O_WRONLY | os.O_TRUNC)
        with pytest.raises(OSError):
            p.mkdir("out/d", 0o755, 0, 0)
        with pytest.raises(OSError):
            p.readdir("out")
        for bad in ("..", "../outside/secret", "real/../../outside/secret"):
            with pytest.raises(OSError):
                p.getattr(bad)
    finally:
        p.close()
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "SECRET"


def test_symlink_swapped_in_between_check_and_use(tree):
    """A directory replaced by a symlink to outside after the guest looked it up: later
    operations through its path fail; they never reach the target."""
    root, outside = tree
    p = HostFS(root)
    try:
        assert p.getattr("real/f").size == 6
        stop = threading.Event()

        def swapper() -> None:
            while not stop.is_set():
                try:
                    os.rename(root / "real", root / "real.bak")
                    os.symlink(str(outside), root / "real")
                    os.unlink(root / "real")
                    os.rename(root / "real.bak", root / "real")
                except OSError:
                    pass

        t = threading.Thread(target=swapper)
        t.start()
        try:
            for _ in range(3000):
                for op in (lambda: p.getattr("real/secret"),
                           lambda: p.open("real/secret", os.O_RDONLY).release(),
                           lambda: p.create("real/planted", os.O_WRONLY, 0o644, 0, 0)[0]
                           .release()):
                    try:
                        op()
                    except OSError:
                        pass
        finally:
            stop.set()
            t.join()
    finally:
        p.close()
    assert sorted(os.listdir(outside)) == ["secret"], "a write escaped through the swap"


def test_guest_made_symlink_is_not_followed_by_the_host(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    target = tmp_path / "victim"
    target.write_text("host file")
    p = HostFS(root)
    try:
        p.symlink(str(target), "x", 0, 0)  # `ln -s /host/victim x` in the guest
        with pytest.raises(OSError) as e:
            p.open("x", os.O_WRONLY | os.O_TRUNC)
        assert e.value.errno in (errno.ELOOP, errno.EACCES)
        with pytest.raises(OSError):
            p.create("x", os.O_WRONLY | os.O_TRUNC, 0o644, 0, 0)
        from matchlock.vfs._provider import SetAttr

        with pytest.raises(OSError):
            p.setattr("x/../victim", SetAttr(size=0), None)
        p.setattr("x", SetAttr(mode=0o777), None)  # a symlink's mode: nothing to change
    finally:
        p.close()
    assert target.read_text() == "host file"
    assert stat.S_IMODE(target.stat().st_mode) != 0o777


def test_no_setuid_or_devices_on_host(tmp_path, guest_binary):
    src = tmp_path / "src"
    src.mkdir()
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("w", HostFS(src))]):
        f = tmp_path / "m/w/tool"
        f.write_text("#!/bin/sh\n")
        os.chmod(f, 0o6755)
        with pytest.raises(OSError) as e:
            os.mknod(tmp_path / "m/w/dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        assert e.value.errno == errno.EPERM
    assert stat.S_IMODE((src / "tool").stat().st_mode) == 0o755
    assert not (src / "dev").exists()


def test_memory_workspace_is_bounded(tmp_path, guest_binary):
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("", MemoryFS(max_bytes=4 << 20))]):
        with pytest.raises(OSError) as e:
            (tmp_path / "m/big").write_bytes(bytes(8 << 20))
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            os.truncate(tmp_path / "m/big", 1 << 40)
        assert e.value.errno == errno.ENOSPC


@pytest.mark.parametrize("kind", ["host_fs", "overlay"])
def test_single_file_mount(tmp_path, guest_binary, kind):
    src = tmp_path / "cfg.txt"
    src.write_text("host\n")
    (tmp_path / "sibling").write_text("not mounted")
    prov = HostFS(tmp_path, single="cfg.txt") if kind == "host_fs" else \
        SnapshotFS(tmp_path, tmp_path / "snap", single="cfg.txt")
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("cfg.txt", prov)]):
        f = tmp_path / "m/cfg.txt"
        assert f.read_text() == "host\n"
        assert sorted(os.listdir(tmp_path / "m")) == ["cfg.txt"]
        f.write_text("guest\n")
        assert f.read_text() == "guest\n"
    assert src.read_text() == ("guest\n" if kind == "host_fs" else "host\n")
