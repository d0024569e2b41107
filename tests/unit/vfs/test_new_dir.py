"""NEW_DIR (docs/channel-protocol.md, "VFS port"): in a directory the guest made on an
exclusive mount, `fused` answers the LOOKUP of a name it never sent for creation ENOENT
itself (the LOOKUP before every open(O_CREAT)). Through a real FUSE mount: the host's
LOOKUP count is the evidence, host_fs and a pre-existing directory are the positive
controls, and with entry timeouts of 0 (every path walk asks again) each way a name can
appear is still found."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest
from tests.unit.vfs.conftest import fuse_mount, provider

from matchlock.vfs import HookEngine, HookRule, MemoryFS, Mount, SnapshotFS

pytestmark = pytest.mark.timeout(120)

N = 60


def _lookups(fs) -> int:
    return fs.counts.get("lookup", 0)


def _create_files(d: Path, n: int) -> None:
    for i in range(n):
        with open(d / f"f{i}", "w") as f:
            f.write("\n")


@pytest.mark.parametrize("kind", ["memory", "overlay"])
def test_creating_in_a_new_directory_asks_no_lookup(tmp_path, guest_binary, kind):
    with fuse_mount(guest_binary, tmp_path / "mnt",
                    [Mount("w", provider(kind, tmp_path))]) as fs:
        d = tmp_path / "mnt" / "w" / "new"
        d.mkdir()
        before = _lookups(fs)
        _create_files(d, N)
        assert _lookups(fs) - before == 0
        assert sorted(os.listdir(d)) == sorted(f"f{i}" for i in range(N))
        assert all((d / f"f{i}").read_text() == "\n" for i in range(N))
        with pytest.raises(FileNotFoundError):
            os.stat(d / "never")


@pytest.mark.parametrize("where", ["host_fs", "existing"])
def test_lookups_still_reach_the_host_elsewhere(tmp_path, guest_binary, where):
    """Positive controls: host_fs may change under the guest, and a directory the guest
    did not make may hold names it never saw: there, every create asks the host first."""
    kind = "host_fs" if where == "host_fs" else "overlay"
    prov = provider(kind, tmp_path)
    (tmp_path / "src" / "old").mkdir()
    (tmp_path / "src" / "old" / "there").write_text("x")
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", prov)]) as fs:
        d = tmp_path / "mnt" / "w" / ("new" if where == "host_fs" else "old")
        if where == "host_fs":
            d.mkdir()
        before = _lookups(fs)
        _create_files(d, N)
        assert _lookups(fs) - before >= N
        if where == "existing":
            assert (d / "there").read_text() == "x"


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.mark.parametrize("kind", ["memory", "overlay"])
def test_every_way_a_name_appears_is_found(tmp_path, guest_binary, kind):
    """Entry timeouts 0: each stat below walks the path with a fresh LOOKUP, so a name
    `fused` failed to note would come back ENOENT."""
    m = Mount("w", provider(kind, tmp_path))
    m.ttl = 0.0
    with fuse_mount(guest_binary, tmp_path / "mnt", [m]) as fs:
        w = tmp_path / "mnt" / "w"
        other = w / "other"
        other.mkdir()
        d = w / "new"
        d.mkdir()
        pin = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # the directory's node stays known
        try:
            (d / "created").write_text("c")
            (d / "sub").mkdir()
            os.mkfifo(d / "fifo")
            os.symlink("renamed", d / "link")  # made below
            (other / "a").write_text("a")
            os.link(other / "a", d / "hard")
            (other / "b").write_text("b")
            os.rename(other / "b", d / "moved")
            os.rename(d / "created", d / "renamed")
            os.open(d / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            names = {"sub", "fifo", "link", "hard", "moved", "renamed", "excl"}
            if kind == "memory":
                (other / "x").write_text("x")
                (d / "y").write_text("y")
                _renameat2(other / "x", d / "y", 2)  # RENAME_EXCHANGE
                assert (d / "y").read_text() == "x" and (other / "x").read_text() == "y"
                names.add("y")
            before = _lookups(fs)
            for name in names:
                os.lstat(d / name)
            assert _lookups(fs) - before >= len(names)  # the ttl 0 made each ask again
            assert set(os.listdir(d)) == names
            assert (d / "renamed").read_text() == "c" and (d / "link").read_text() == "c"
            assert (d / "hard").read_text() == "a" and (d / "moved").read_text() == "b"
            for gone in ("created", "never"):
                with pytest.raises(FileNotFoundError):
                    os.lstat(d / gone)
            # removed, then made again: found again
            os.unlink(d / "hard")
            with pytest.raises(FileNotFoundError):
                os.lstat(d / "hard")
            (d / "hard").write_text("again")
            assert (d / "hard").read_text() == "again"
            # in a directory made inside the new one, too
            (d / "sub" / "deep").write_text("d")
            assert (d / "sub" / "deep").read_text() == "d"
        finally:
            os.close(pin)


def test_a_directory_made_again_over_a_snapshot_one_is_empty(tmp_path, guest_binary):
    """The host tree's old names must not show through a directory removed and made
    again (and its LOOKUPs are answered in the guest)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"old{i}").write_text("o")
    with fuse_mount(guest_binary, tmp_path / "mnt",
                    [Mount("w", SnapshotFS(src, tmp_path / "snap"))]) as fs:
        d = tmp_path / "mnt" / "w" / "d"
        assert len(os.listdir(d)) == 5
        for i in range(5):
            os.unlink(d / f"old{i}")
        d.rmdir()
        d.mkdir()
        assert os.listdir(d) == []
        before = _lookups(fs)
        for i in range(5):
            with pytest.raises(FileNotFoundError):
                os.stat(d / f"old{i}")
        assert _lookups(fs) - before == 0
    assert sorted(os.listdir(src / "d")) == [f"old{i}" for i in range(5)]  # host untouched


def test_a_before_hook_keeps_lookups_on_the_host(tmp_path, guest_binary):
    """A stat rule can answer a lookup with its own errno: then nothing is answered in the
    guest (and the rule's errno is what the guest sees)."""
    hooks = HookEngine([HookRule(name="hide", phase="before", ops=["stat"],
                                 path="/workspace/w/new/secret*", action="block",
                                 errno=errno.EACCES)])
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", MemoryFS())],
                    hooks=hooks) as fs:
        d = tmp_path / "mnt" / "w" / "new"
        d.mkdir()
        before = _lookups(fs)
        _create_files(d, 10)
        assert _lookups(fs) - before >= 10
        with pytest.raises(PermissionError):
            os.stat(d / "secret-plans")
