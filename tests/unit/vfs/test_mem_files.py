"""Memory files of a snapshot: a file the guest creates starts as a memfd and moves to the
upper directory when it grows, when the budget runs out, or before a hard link or an xattr.
Judged by what is really on the host (the upper directory's inodes, this process's fds) and
by what a reader sees, never by the index alone."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest
from tests.unit.vfs.conftest import fuse_mount

from matchlock.vfs import Mount, SnapshotFS, _snapshot
from matchlock.vfs._fuse import RENAME_NOREPLACE
from matchlock.vfs._provider import SetAttr

MAX = _snapshot.MEM_FILE_MAX
RW = os.O_RDWR


def _memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:matchlock-vfs")
        except OSError:
            pass
    return n


def _upper(snap: Path) -> list[str]:
    return sorted(str(p.relative_to(snap / "upper")) for p in (snap / "upper").rglob("*"))


@pytest.fixture
def fs(tmp_path):
    """A snapshot over src/ (low.txt, lowdir/old.txt); afterwards every memfd is closed and
    the process-wide budget is whole again."""
    budget = _snapshot._mem_budget()
    before = (budget.fds, budget.bytes, _memfds())
    src = tmp_path / "src"
    (src / "lowdir").mkdir(parents=True)
    (src / "low.txt").write_bytes(b"lower\n")
    (src / "lowdir/old.txt").write_bytes(b"old\n")
    p = SnapshotFS(src, tmp_path / "snap")
    yield p, tmp_path / "snap"
    p.close()
    assert (budget.fds, budget.bytes, _memfds()) == before, "memory files leaked"
    assert (src / "low.txt").read_bytes() == b"lower\n", "the host directory was written"


def _new(p: SnapshotFS, path: str, data: bytes = b""):
    h, _ = p.create(path, RW, 0o644, 0, 0)
    if data:
        assert h.write(0, data) == len(data)
    return h


def _read(p: SnapshotFS, path: str) -> bytes:
    h = p.open(path, os.O_RDONLY)
    try:
        return h.read(0, 1 << 22)
    finally:
        h.release()


def test_small_file_stays_in_memory(fs):
    p, snap = fs
    fds = _memfds()
    _new(p, "a.txt", b"hello").release()
    assert _memfds() == fds + 1, "positive control: it is a memfd"
    assert _upper(snap) == [], "no inode in the upper directory"
    a = p.getattr("a.txt")
    assert (a.size, a.nlink, stat.S_IMODE(a.mode)) == (5, 1, 0o644)
    assert stat.S_ISREG(a.mode)
    assert _read(p, "a.txt") == b"hello"
    assert "a.txt" in {e.name for e in p.readdir("")}
    assert p.getattr("a.txt").ino == a.ino, "a stable inode number"
    with pytest.raises(OSError) as e:
        p.readlink("a.txt")
    assert e.value.errno == errno.EINVAL


def test_growing_past_the_limit_moves_to_disk_under_open_handles(fs):
    p, snap = fs
    w = _new(p, "big", b"head")
    r = p.open("big", os.O_RDONLY)
    ino = p.getattr("big").ino
    assert _upper(snap) == []
    w.write(MAX, b"tail")  # one past the limit
    assert _upper(snap) == ["big"], "moved to the upper directory"
    assert os.path.getsize(snap / "upper/big") == MAX + 4
    assert p.getattr("big").ino == ino, "the guest's inode number survives the move"
    assert r.read(0, 4) == b"head" and r.read(MAX, 10) == b"tail", "old handle sees the copy"
    w.write(0, b"HEAD")
    assert r.read(0, 4) == b"HEAD", "both handles are on the same host file now"
    assert (snap / "upper/big").read_bytes()[:4] == b"HEAD"
    assert w.getattr().size == MAX + 4
    w.release()
    r.release()


@pytest.mark.parametrize("how", ["truncate", "setattr", "handle-setattr", "allocate"])
def test_every_way_of_growing_is_accounted(fs, how):
    p, snap = fs
    h = _new(p, "f", b"x")
    size = MAX + 1
    if how == "truncate":
        h.truncate(size)
    elif how == "setattr":
        p.setattr("f", SetAttr(size=size), None)
    elif how == "handle-setattr":
        h.setattr(SetAttr(size=size))
    else:
        h.allocate(0, size, 0)
    assert _upper(snap) == ["f"]
    assert p.getattr("f").size == size
    assert _read(p, "f")[:1] == b"x"
    h.release()


def test_shrinking_gives_bytes_back(fs):
    p, _ = fs
    budget = _snapshot._mem_budget()
    start = budget.bytes
    h = _new(p, "f", b"y" * 1000)
    assert budget.bytes == start - 1000
    h.truncate(10)
    assert budget.bytes == start - 10
    h.release()
    p.unlink("f")
    assert budget.bytes == start


def test_open_truncate_of_a_memory_file(fs):
    p, _ = fs
    _new(p, "f", b"content").release()
    h = p.open("f", os.O_WRONLY | os.O_TRUNC)
    assert p.getattr("f").size == 0
    h.write(0, b"new")
    h.release()
    assert _read(p, "f") == b"new"
    h, a = p.create("f", os.O_WRONLY | os.O_TRUNC, 0o600, 0, 0)  # create of an existing one
    assert a.size == 0
    h.release()


def test_rename_over_every_kind_of_target(fs):
    p, snap = fs
    _new(p, "m1", b"one").release()
    _new(p, "m2", b"two").release()
    _new(p, "m3", b"three").release()
    fds = _memfds()
    p.rename("m1", "m2", 0)  # over a memory file: its memfd goes
    assert _memfds() == fds - 1
    assert _read(p, "m2") == b"one"
    p.rename("m2", "low.txt", 0)  # over a lower file: hidden, host untouched
    assert _read(p, "low.txt") == b"one"
    h = p.open("lowdir/old.txt", os.O_WRONLY | os.O_APPEND)  # a copied-up (named) file
    h.release()
    assert "lowdir/old.txt" in _upper(snap)
    p.rename("m3", "lowdir/old.txt", 0)  # over a named upper file: it is removed
    assert _read(p, "lowdir/old.txt") == b"three"
    assert _upper(snap) == ["lowdir"], "the replaced upper file is gone; the new one in memory"
    names = {e.name for e in p.readdir("")}
    assert {"low.txt", "lowdir"} <= names and not names & {"m1", "m2", "m3"}
    assert [e.name for e in p.readdir("lowdir")] == ["old.txt"]
    with pytest.raises(OSError) as e:
        p.rename("lowdir/old.txt", "low.txt", RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST


def test_rename_into_a_lower_dir_and_of_a_dir_holding_memory_files(fs):
    p, snap = fs
    _new(p, "x", b"X").release()
    p.rename("x", "lowdir/x", 0)  # the lower parent is copied up (as a directory)
    assert _read(p, "lowdir/x") == b"X"
    p.mkdir("d", 0o755, 0, 0)
    _new(p, "d/a", b"A").release()
    p.mkdir("d/sub", 0o755, 0, 0)
    _new(p, "d/sub/b", b"B").release()
    p.rename("d", "e", 0)
    assert _read(p, "e/a") == b"A" and _read(p, "e/sub/b") == b"B"
    assert sorted(e.name for e in p.readdir("e")) == ["a", "sub"]
    for gone in ("d", "d/a", "d/sub/b"):
        with pytest.raises(FileNotFoundError):
            p.getattr(gone)
    p.rename("lowdir", "moved", 0)  # a lower dir with a memory child
    assert _read(p, "moved/x") == b"X" and _read(p, "moved/old.txt") == b"old\n"
    assert not {"e/a", "e/sub/b", "moved/x"} & set(_upper(snap)), "still in memory"


def test_unlinked_while_open_then_grown(fs):
    p, snap = fs
    h = _new(p, "f", b"data")
    p.unlink("f")
    with pytest.raises(FileNotFoundError):
        p.getattr("f")
    assert h.read(0, 4) == b"data", "an open handle keeps the file"
    h.write(MAX, b"!")  # moves to an unnamed file in the work dir
    assert h.read(0, 4) == b"data" and h.read(MAX, 1) == b"!"
    assert _upper(snap) == [] and os.listdir(snap / "work") == []
    h.release()


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_open_file_after_its_unlink_has_no_links(fs, monkeypatch, where):
    p, snap = fs
    if where == "disk":
        monkeypatch.setattr(_snapshot._mem_budget(), "fds", 0)
    h = _new(p, "f", b"x")
    assert h.getattr().nlink == 1, "positive control: one name"
    assert _upper(snap) == ([] if where == "memory" else ["f"])
    p.unlink("f")
    assert h.getattr().nlink == 0, "fstat after unlink says 0, as on any file system"
    h.release()


def test_hard_link_moves_to_disk(fs):
    p, snap = fs
    _new(p, "a", b"linked").release()
    ino = p.getattr("a").ino
    b = p.link("a", "b")
    assert _upper(snap) == ["a", "b"]
    assert (snap / "upper/a").stat().st_ino == (snap / "upper/b").stat().st_ino
    assert b.nlink == 2 and p.getattr("a").nlink == 2
    assert b.ino == ino == p.getattr("a").ino
    assert _read(p, "b") == b"linked"
    p.unlink("a")
    assert p.getattr("b").nlink == 1


def test_xattr_moves_to_disk(fs):
    p, snap = fs
    _new(p, "a", b"x").release()
    assert p.listxattr("a") == []
    with pytest.raises(OSError) as e:
        p.getxattr("a", "user.k")
    assert e.value.errno == errno.ENODATA
    p.setxattr("a", "user.k", b"v", 0)
    assert _upper(snap) == ["a"]
    assert p.getxattr("a", "user.k") == b"v" and p.listxattr("a") == ["user.k"]
    assert os.getxattr(snap / "upper/a", "user.k") == b"v"


def test_chmod_utime_and_owner_of_a_memory_file(fs):
    p, snap = fs
    _new(p, "a", b"x").release()
    a = p.setattr("a", SetAttr(mode=0o700, uid=1000, gid=1000, atime_ns=5, mtime_ns=7), None)
    assert (stat.S_IMODE(a.mode), a.uid, a.gid, a.mtime_ns) == (0o700, 1000, 1000, 7)
    assert _upper(snap) == []
    h = p.open("a", RW)
    h.write(MAX, b"y")  # the move keeps them
    h.release()
    a = p.getattr("a")
    assert (stat.S_IMODE(a.mode), a.uid, a.gid, a.size) == (0o700, 1000, 1000, MAX + 1)


def test_create_under_a_file_fails_as_on_disk(fs):
    p, snap = fs
    _new(p, "a", b"x").release()
    for bad in ("a/b", "low.txt/b"):
        with pytest.raises(OSError) as e:
            p.create(bad, RW, 0o644, 0, 0)
        assert e.value.errno == errno.ENOTDIR
    for make in (lambda: p.mkdir("low.txt/d", 0o755, 0, 0),
                 lambda: p.symlink("x", "low.txt/l", 0, 0)):
        with pytest.raises(OSError) as e:
            make()
        assert e.value.errno == errno.ENOTDIR
    assert _upper(snap) == [], "nothing copied up for a call that fails"


def test_byte_budget_exhausted_falls_back_to_disk(fs, monkeypatch):
    p, snap = fs
    budget = _snapshot._mem_budget()
    monkeypatch.setattr(budget, "bytes", 100)
    h = _new(p, "small", b"s" * 60)
    assert _upper(snap) == [], "positive control: within the budget"
    h2 = _new(p, "over", b"o" * 60)  # 60 more do not fit
    assert _upper(snap) == ["over"]
    assert _read(p, "over") == b"o" * 60 and _read(p, "small") == b"s" * 60
    h.release()
    h2.release()
    p.unlink("small")
    assert budget.bytes == 100


def test_fd_budget_exhausted_creates_on_disk(fs, monkeypatch):
    p, snap = fs
    budget = _snapshot._mem_budget()
    monkeypatch.setattr(budget, "fds", 1)
    _new(p, "a", b"1").release()
    _new(p, "b", b"2").release()
    assert _upper(snap) == ["b"]
    p.unlink("a")
    assert budget.fds == 1
    _new(p, "c", b"3").release()
    assert _upper(snap) == ["b"], "the freed fd is used again"
    assert _read(p, "b") == b"2" and _read(p, "c") == b"3"
    p.unlink("c")


def test_close_releases_memfds_even_with_handles_open(tmp_path):
    budget = _snapshot._mem_budget()
    before = (budget.fds, budget.bytes)
    fds = _memfds()
    p = SnapshotFS(tmp_path, tmp_path / "snap")
    hs = [_new(p, f"f{i}", b"z" * 100) for i in range(20)]
    assert _memfds() == fds + 40  # the memfd and the open handle's fd
    p.close()
    for h in hs:
        h.release()
    assert _memfds() == fds
    assert (budget.fds, budget.bytes) == before


def test_concurrent_writers_across_the_move_lose_nothing(guest_binary, tmp_path):
    """Writers on several threads (the server's workers) while the file crosses the limit:
    every byte written is in the host file."""
    src = tmp_path / "src"
    src.mkdir()
    snap = tmp_path / "snap"
    chunk, n = 8192, 4 * (MAX // 8192)
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("r", SnapshotFS(src, snap))]):
        path = tmp_path / "m/r/f"
        path.write_bytes(b"")

        def writer(k: int) -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                for i in range(k, n, 4):
                    os.pwrite(fd, bytes([i % 251]) * chunk, i * chunk)
            finally:
                os.close(fd)

        ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        want = b"".join(bytes([i % 251]) * chunk for i in range(n))
        assert path.read_bytes() == want
        assert (snap / "upper/f").read_bytes() == want, "the host copy has every byte"
        # many small files: all in memory, all listed and read back through the kernel
        for i in range(200):
            (tmp_path / f"m/r/s{i}").write_bytes(b"%d" % i)
        assert _upper(snap) == ["f"]
        assert len(os.listdir(tmp_path / "m/r")) == 201
        assert all((tmp_path / f"m/r/s{i}").read_bytes() == b"%d" % i for i in range(200))
