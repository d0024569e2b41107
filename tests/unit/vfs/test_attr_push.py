"""ATTR_PUSH (docs/channel-protocol.md, "VFS port"): after a WRITE on an exclusive mount the
host pushes the node's attributes and `fused` answers the kernel's next GETATTR itself.
Through a real FUSE mount: the round trip is saved where it is exact, and what `stat`
shows is always what the host holds (checked against the provider after every change
that could make a pushed answer stale)."""

from __future__ import annotations

import os
import stat

import pytest
from tests.unit.vfs.conftest import fuse_mount, provider

from matchlock.vfs import HookEngine, HookRule, MemoryFS, Mount

pytestmark = pytest.mark.timeout(120)


def _getattrs(fs) -> int:
    return fs.counts.get("getattr", 0)


@pytest.mark.parametrize("kind", ["memory", "overlay"])
def test_stat_after_write_is_answered_in_the_guest(tmp_path, guest_binary, kind):
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", provider(kind, tmp_path))]) as fs:
        d = tmp_path / "mnt" / "w"
        for i in range(20):
            (d / f"f{i}").write_bytes(b"x" * (i + 1))
        before = _getattrs(fs)
        for i in range(20):
            st = os.stat(d / f"f{i}")
            assert st.st_size == i + 1 and stat.S_ISREG(st.st_mode)
        # every one of these stats was the kernel's post-write GETATTR: none reached the host
        assert _getattrs(fs) - before == 0
        # and a second, uncached stat still goes to the host (one-shot)
        os.utime(d / "f0", ns=(1_000_000_000, 2_000_000_000))
        assert os.stat(d / "f0").st_mtime_ns == 2_000_000_000


def test_shared_mount_still_asks_the_host(tmp_path, guest_binary):
    """Positive control: host_fs may change under the guest, so nothing is pushed."""
    prov = provider("host_fs", tmp_path)
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", prov)]) as fs:
        d = tmp_path / "mnt" / "w"
        for i in range(5):
            (d / f"f{i}").write_bytes(b"x")
        before = _getattrs(fs)
        for i in range(5):
            os.stat(d / f"f{i}")
        assert _getattrs(fs) - before >= 5


@pytest.mark.parametrize("kind", ["memory", "overlay"])
def test_pushed_attributes_never_go_stale(tmp_path, guest_binary, kind):
    """Each change after a write that a pushed answer would miss: the guest's stat agrees
    with the provider's own view."""
    prov = provider(kind, tmp_path)
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", prov)]):
        d = tmp_path / "mnt" / "w"

        def check(name: str) -> os.stat_result:
            st = os.stat(d / name)
            a = prov.getattr(name)
            assert (st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode)) == \
                (a.size, a.nlink, stat.S_IMODE(a.mode)), name
            return st

        # The kernel GETATTRs again only after it invalidated its own copy: each case
        # changes the node after the write, then makes the kernel ask without a new write.
        (d / "b").write_bytes(b"hello")
        os.link(d / "b", d / "b2")  # LINK names the node in its body only
        os.link(d / "b", d / "b3")
        os.unlink(d / "b3")  # the kernel invalidates b's attributes
        assert check("b").st_nlink == 2
        (d / "a").write_bytes(b"hello")
        os.truncate(d / "a", 2)  # SETATTR on the node itself
        os.link(d / "a", d / "a2")
        os.unlink(d / "a2")
        assert check("a").st_size == 2
        with open(d / "e", "wb") as f:  # two writes, stat between and after
            f.write(b"1")
            f.flush()
            assert check("e").st_size == 1
            f.write(b"234")
            f.flush()
            assert check("e").st_size == 4
        (d / "h").write_bytes(b"hello")
        os.rename(d / "h", d / "h2")
        assert check("h2").st_size == 5
        if kind == "memory":  # user xattrs: the memory provider has them everywhere
            (d / "c").write_bytes(b"hello")
            os.truncate(d / "c", 3)
            os.setxattr(d / "c", "user.k", b"v")  # the kernel invalidates c's ctime
            assert check("c").st_size == 3


def test_stat_hooks_see_every_stat(tmp_path, guest_binary):
    """A "stat" hook or subscriber must not miss the saved GETATTR: with hooks active the
    host pushes nothing."""
    hooks = HookEngine()
    seen: list[str] = []
    hooks.set_rules([HookRule(name="audit", phase="after", ops=["stat"], path="*",
                              callback=lambda op: seen.append(op.path))])
    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", MemoryFS())], hooks) as fs:
        d = tmp_path / "mnt" / "w"
        (d / "f").write_bytes(b"x")
        before = _getattrs(fs)
        os.stat(d / "f")
        assert _getattrs(fs) - before == 1
    hooks.close()
    assert "/workspace/w/f" in seen


@pytest.mark.parametrize("kind", ["memory", "host_fs"])
def test_release_answered_in_the_guest_still_reaches_the_host(tmp_path, guest_binary, kind):
    """LOCAL_RELEASE: fused answers RELEASE itself; the host must still get every one and
    close every handle (else handles and host fds would leak for the VM's life)."""
    import time

    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", provider(kind, tmp_path))]) as fs:
        d = tmp_path / "mnt" / "w"
        for i in range(30):
            (d / f"f{i}").write_bytes(b"x")
            (d / f"f{i}").read_bytes()
        os.listdir(d)
        deadline = time.monotonic() + 10
        while fs.files and time.monotonic() < deadline:  # RELEASE is async in the kernel
            time.sleep(0.01)
        assert not fs.files, f"{len(fs.files)} handles left open on the host"
        assert fs.counts.get("release", 0) >= 60 and fs.counts.get("releasedir", 0) >= 1


def test_held_back_forgets_reach_the_host(tmp_path, guest_binary):
    """After an rm -rf with nothing sent after it, the host has forgotten every node (no
    leak for the VM's life). Guards any batching of FORGETs in fused (one was tried:
    held back for the next request or 20 ms idle; no measurable gain, reverted)."""
    import shutil
    import time

    with fuse_mount(guest_binary, tmp_path / "mnt", [Mount("w", MemoryFS())]) as fs:
        d = tmp_path / "mnt" / "w"
        os.stat(d)  # the mount root's node
        base = len(fs.nodes)
        (d / "s").mkdir()
        for i in range(50):
            (d / "s" / f"f{i}").write_bytes(b"x")
        assert len(fs.nodes) >= base + 50
        shutil.rmtree(d / "s")
        deadline = time.monotonic() + 10
        while len(fs.nodes) > base and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(fs.nodes) <= base, f"{len(fs.nodes) - base} nodes never forgotten"
        assert fs.counts.get("forget", 0) + fs.counts.get("batch_forget", 0) >= 1
