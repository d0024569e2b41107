"""The POSIX surface through a real FUSE mount (host kernel -> fused -> VfsServer), for
each provider: what a program in the guest sees."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tests.unit.vfs.conftest import fuse_mount

from matchlock.vfs import HostFS, MemoryFS, Mount, SnapshotFS

pytestmark = pytest.mark.timeout(120)


class MountDir(type(Path())):  # a Path that also says what serves it
    kind: str
    src: Path


@pytest.fixture(params=["memory", "host_fs", "overlay"])
def mnt(request, tmp_path, guest_binary):
    src = tmp_path / "src"
    src.mkdir()
    (src / "seed.txt").write_text("seed\n")
    kind = request.param
    if kind == "memory":
        prov = MemoryFS()
    elif kind == "host_fs":
        prov = HostFS(src)
    else:
        prov = SnapshotFS(src, tmp_path / "snap")
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", prov)]) as fs:
        d = MountDir(tmp_path / "mnt" / "w")
        d.kind, d.src, d.fs = kind, src, fs
        yield d


def test_create_write_read_append(mnt: Path):
    f = mnt / "a.txt"
    f.write_bytes(b"hello")
    with open(f, "ab") as h:
        h.write(b" world")
    assert f.read_bytes() == b"hello world"
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"!")  # O_APPEND: at the end whatever the offset
    os.close(fd)
    assert f.read_bytes() == b"hello world!"
    f.write_bytes(b"x")  # O_TRUNC
    assert f.read_bytes() == b"x"


def test_truncate_any_size(mnt: Path):
    f = mnt / "t"
    f.write_bytes(b"0123456789")
    os.truncate(f, 4)
    assert f.read_bytes() == b"0123"
    os.truncate(f, 10_000)
    assert f.stat().st_size == 10_000
    assert f.read_bytes() == b"0123" + bytes(9996)
    with open(f, "r+b") as h:
        h.truncate(2)
    assert f.read_bytes() == b"01"


def test_dirs_and_listing(mnt: Path):
    (mnt / "d/e").mkdir(parents=True)
    for i in range(300):
        (mnt / "d" / f"f{i:03}").write_text(str(i))
    names = sorted(os.listdir(mnt / "d"))
    assert names == sorted(["e", *[f"f{i:03}" for i in range(300)]])
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "d")
    assert e.value.errno == errno.ENOTEMPTY
    out = subprocess.run(["ls", "-la", str(mnt / "d")], capture_output=True, text=True)
    assert out.returncode == 0 and "f299" in out.stdout
    shutil.rmtree(mnt / "d")
    assert not (mnt / "d").exists()


def test_rename_over_existing_and_dirs(mnt: Path):
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    os.rename(mnt / "a", mnt / "b")
    assert (mnt / "b").read_text() == "A" and not (mnt / "a").exists()
    (mnt / "d1/sub").mkdir(parents=True)
    (mnt / "d1/sub/x").write_text("x")
    (mnt / "d2").mkdir()
    os.rename(mnt / "d1", mnt / "d2")  # over an empty dir
    assert (mnt / "d2/sub/x").read_text() == "x" and not (mnt / "d1").exists()
    (mnt / "d3").mkdir()
    (mnt / "d3/y").write_text("y")
    with pytest.raises(OSError) as e:
        os.rename(mnt / "d2", mnt / "d3")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rename(mnt / "d2", mnt / "d2/sub/inside")
    assert e.value.errno == errno.EINVAL


def test_rename_noreplace(mnt: Path):
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    r = libc.renameat2(AT_FDCWD, os.fsencode(mnt / "a"), AT_FDCWD, os.fsencode(mnt / "b"), 1)
    assert r == -1 and ctypes.get_errno() == errno.EEXIST
    assert (mnt / "b").read_text() == "B"


def test_symlink_readlink_hardlink(mnt: Path):
    (mnt / "target").write_text("T")
    os.symlink("target", mnt / "ln")
    assert os.readlink(mnt / "ln") == "target"
    assert (mnt / "ln").read_text() == "T"
    assert stat.S_ISLNK(os.lstat(mnt / "ln").st_mode)
    os.symlink("/etc/shadow-not-here", mnt / "abs")
    assert os.readlink(mnt / "abs") == "/etc/shadow-not-here"
    os.link(mnt / "target", mnt / "hard")
    assert os.stat(mnt / "target").st_nlink == 2
    with open(mnt / "hard", "a") as h:
        h.write("2")
    assert (mnt / "target").read_text() == "T2"
    os.unlink(mnt / "target")
    assert (mnt / "hard").read_text() == "T2"
    assert os.stat(mnt / "hard").st_nlink == 1


def test_chmod_exec_chown_utimens(mnt: Path):
    s = mnt / "run.sh"
    s.write_text("#!/bin/sh\necho ran $1\n")
    os.chmod(s, 0o755)
    assert stat.S_IMODE(os.stat(s).st_mode) == 0o755
    # Through sh, not directly: CPython's subprocess may vfork, which holds this thread
    # (and the GIL with it) until the child has exec'd; an exec of a file on the mount
    # would wait on the server this process runs, and could deadlock (it hung for 600 s).
    out = subprocess.run(["sh", "-c", 'exec "$0" ok', str(s)], capture_output=True, text=True)
    assert out.stdout == "ran ok\n"
    os.chmod(s, 0o600)
    assert stat.S_IMODE(os.stat(s).st_mode) == 0o600
    os.chown(s, 1234, 2345)
    st = os.stat(s)
    assert (st.st_uid, st.st_gid) == (1234, 2345)
    os.utime(s, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(s)
    assert st.st_mtime_ns == 2_000_000_456 and st.st_atime_ns == 1_000_000_123


def test_fsync_file_and_dir_statfs(mnt: Path):
    fd = os.open(mnt / "s", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 100)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    v = os.statvfs(mnt)
    assert v.f_bsize > 0 and v.f_blocks > 0


def test_unlinked_open_file_stays_readable(mnt: Path):
    f = mnt / "gone"
    f.write_bytes(b"still here")
    with open(f, "rb") as h:
        os.unlink(f)
        assert not f.exists()
        assert h.read() == b"still here"


def test_xattr_user_namespace(mnt: Path):
    f = mnt / "x"
    f.write_text("x")
    try:
        os.setxattr(f, "user.k", b"v")
    except OSError as e:
        if mnt.kind != "memory" and e.errno == errno.EOPNOTSUPP:  # type: ignore[attr-defined]
            pytest.fail("the host file system refuses user xattrs", False)
        raise
    assert os.getxattr(f, "user.k") == b"v"
    assert "user.k" in os.listxattr(f)
    os.removexattr(f, "user.k")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.k")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(f, "security.capability", b"\x00\x00\x00\x02" + bytes(16))  # v2, no caps
    assert e.value.errno in (errno.EOPNOTSUPP, errno.EPERM)


def test_big_file_digest(mnt: Path):
    data = os.urandom(48 << 20)
    (mnt / "big").write_bytes(data)
    h = hashlib.sha256()
    with open(mnt / "big", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


SQLITE_SCRIPT = """
import sqlite3, sys
path = sys.argv[1]
db = sqlite3.connect(path)
db.execute("create table t (k integer primary key, v text)")
with db:
    db.executemany("insert into t (v) values (?)", [(str(i),) for i in range(2000)])
db.close()
db = sqlite3.connect(path)
assert db.execute("select count(*), sum(k) from t").fetchone() == (2000, 2001000)
assert db.execute("pragma integrity_check").fetchone() == ("ok",)
assert db.execute("pragma journal_mode=wal").fetchone() == ("wal",)
with db:
    db.execute("insert into t (v) values ('wal')")
assert db.execute("select count(*) from t").fetchone() == (2001,)
db.close()
"""


def test_sqlite(mnt: Path):
    # In a child process: WAL mode mmaps the -shm file, and a page fault on a FUSE mapping
    # holds this process's mmap lock until the read is served, while the server thread
    # here needs that lock to allocate (mprotect): a deadlock no guest can hit, since
    # the guest's pages are served by the host.
    subprocess.run([sys.executable, "-c", SQLITE_SCRIPT, str(mnt / "t.db")], check=True,
                   timeout=60)
    # the file as the mount serves it, read without mmap: a database in WAL mode
    # (header bytes 18-19 are 2), with no -wal or -shm left after the last close
    head = (mnt / "t.db").read_bytes()[:100]
    assert head[:16] == b"SQLite format 3\0" and head[18:20] == b"\x02\x02"
    assert sorted(p.name for p in mnt.iterdir() if p.name.startswith("t.db")) == ["t.db"]


def test_cross_mount_rename_is_exdev(tmp_path, guest_binary):
    with fuse_mount(guest_binary, tmp_path / "m", [Mount("a", MemoryFS()),
                                                   Mount("b", MemoryFS())]):
        (tmp_path / "m/a/f").write_text("f")
        with pytest.raises(OSError) as e:
            os.rename(tmp_path / "m/a/f", tmp_path / "m/b/f")
        assert e.value.errno == errno.EXDEV
        with pytest.raises(OSError) as e:
            os.rmdir(tmp_path / "m/a")
        assert e.value.errno == errno.EBUSY
        # the workspace root itself is an in-memory directory
        (tmp_path / "m/top").write_text("t")
        assert sorted(os.listdir(tmp_path / "m")) == ["a", "b", "top"]
