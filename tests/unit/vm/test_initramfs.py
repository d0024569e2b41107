"""Initramfs: cpio writer, .modinfo parsing, module closure, caching, and one real boot."""

from __future__ import annotations

import io
import os
import platform
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from matchlock.vm import kernel as kernel_mod
from matchlock.vm.initramfs import (
    DEFAULT_MODULES,
    CpioEntry,
    build_initramfs,
    module_closure,
    module_depends,
    read_modinfo,
    strip_signature,
    write_cpio,
)
from matchlock.vm.kernel import Kernel, resolve_kernel


def parse_newc(blob: bytes) -> list[dict]:
    """Independent newc reader; checks alignment as it goes."""
    out = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at unaligned offset {pos}"
        hdr = blob[pos : pos + 110]
        assert hdr[:6] == b"070701", hdr[:6]
        f = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = f
        name_end = pos + 110 + namesize
        assert blob[name_end - 1] == 0
        name = blob[pos + 110 : name_end - 1].decode()
        data_start = (name_end + 3) & ~3
        assert blob[name_end:data_start] == b"\0" * (data_start - name_end)
        data = blob[data_start : data_start + size]
        pos = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            assert blob[pos:] == b"\0" * (len(blob) - pos)
            return out
        out.append(
            dict(name=name, ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime,
                 data=data, rdev=(rmaj, rmin), check=check)
        )  # fmt: skip


def test_cpio_round_trip(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"from a file" * 7)
    entries = [
        CpioEntry.dir("/dir"),
        CpioEntry.file("dir/a", b"x"),  # 1-byte data: padding
        CpioEntry.file("dir/bb", b"12345678"),  # aligned data
        CpioEntry.file("exe", source=src, perm=0o755),
        CpioEntry.file("empty"),
        CpioEntry.symlink("dir/link", "../exe"),
        CpioEntry.dir("sticky", 0o1777),
        CpioEntry.chardev("console", 5, 1),
    ]
    buf = io.BytesIO()
    write_cpio(entries, buf)
    blob = buf.getvalue()
    assert len(blob) % 512 == 0

    got = parse_newc(blob)
    assert [e["name"] for e in got] == [
        "dir", "dir/a", "dir/bb", "exe", "empty", "dir/link", "sticky", "console",
    ]  # fmt: skip
    by = {e["name"]: e for e in got}
    assert by["dir"]["mode"] == stat.S_IFDIR | 0o755 and by["dir"]["nlink"] == 2
    assert by["dir/a"]["data"] == b"x" and by["dir/a"]["mode"] == stat.S_IFREG | 0o644
    assert by["dir/bb"]["data"] == b"12345678"
    assert by["exe"]["data"] == src.read_bytes() and by["exe"]["mode"] == stat.S_IFREG | 0o755
    assert by["empty"]["data"] == b""
    assert by["dir/link"]["mode"] == stat.S_IFLNK | 0o777 and by["dir/link"]["data"] == b"../exe"
    assert by["sticky"]["mode"] == stat.S_IFDIR | 0o1777
    assert by["console"]["mode"] == stat.S_IFCHR | 0o600 and by["console"]["rdev"] == (5, 1)
    assert all(e["uid"] == e["gid"] == e["mtime"] == e["check"] == 0 for e in got)
    assert len({e["ino"] for e in got}) == len(got)

    # reproducible
    buf2 = io.BytesIO()
    write_cpio(entries, buf2)
    assert buf2.getvalue() == blob


def test_cpio_readable_by_gnu_cpio(tmp_path):
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.fail("cpio not found: apt-get install cpio")
    buf = io.BytesIO()
    write_cpio(
        [
            CpioEntry.dir("d"),
            CpioEntry.file("d/f", b"hello\n", perm=0o600),
            CpioEntry.symlink("l", "d/f"),
        ],
        buf,
    )
    listing = subprocess.run(
        [cpio, "-it", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["d", "d/f", "l"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        [cpio, "-idm", "--quiet", "--no-absolute-filenames"],
        input=buf.getvalue(),
        cwd=out,
        capture_output=True,
        check=True,
    )
    assert (out / "d/f").read_bytes() == b"hello\n"
    assert stat.S_IMODE((out / "d/f").stat().st_mode) == 0o600
    assert os.readlink(out / "l") == "d/f"


def test_cpio_rejects_bad_names():
    with pytest.raises(ValueError):
        write_cpio([CpioEntry.file("/", b"")], io.BytesIO())
    with pytest.raises(ValueError):
        write_cpio([CpioEntry.file("TRAILER!!!", b"")], io.BytesIO())


def test_closure_without_modules_dir_is_empty(tmp_path):
    k = Kernel("custom", tmp_path / "bzImage", None)
    assert module_closure(k, DEFAULT_MODULES) == []


# --------------------------------------------------------------------------- real kernel


@pytest.fixture(scope="module")
def real_kernel(tmp_path_factory) -> Kernel:
    """The Debian cloud kernel, fetched into a throw-away cache (a few seconds)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        for var in (kernel_mod.ENV_KERNEL, kernel_mod.ENV_APT_GET, kernel_mod.ENV_APT_CACHE):
            mp.delenv(var, raising=False)
        mp.setenv("MATCHLOCK_CACHE_DIR", str(cache))
        return resolve_kernel()


@pytest.fixture()
def cache(monkeypatch, tmp_path) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(d))
    return d


def test_read_modinfo_real_module(real_kernel):
    ko = real_kernel.module_path("virtio_blk")
    assert ko is not None
    info = read_modinfo(ko)
    keys = [k for k, _ in info]
    assert ("name", "virtio_blk") in info
    assert ("vermagic" in keys) and ("license" in keys)
    assert sorted(module_depends(ko)) == ["virtio", "virtio_ring"]
    vermagic = dict(info)["vermagic"]
    assert vermagic.split()[0] == real_kernel.version


def test_module_closure_order(real_kernel):
    paths = module_closure(real_kernel, DEFAULT_MODULES)
    names = [p.name.removesuffix(".ko") for p in paths]
    assert len(names) == len(set(names))
    for before, after in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_blk"),
        ("virtio", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
    ]:
        assert names.index(before) < names.index(after), (before, after, names)
    assert set(DEFAULT_MODULES) <= set(names)
    # every module's dependencies come before it
    for i, p in enumerate(paths):
        for dep in module_depends(p):
            assert dep in names[:i], (p.name, dep)
    # built-ins are skipped, not errors
    assert module_closure(real_kernel, ["ext4", "virtio_blk"])[-1].name == "virtio_blk.ko"


def test_build_initramfs_layout_and_cache(real_kernel, cache, tmp_path):
    guest = tmp_path / "guest"
    guest.write_bytes(b"\x7fELF fake guest binary")
    t0 = time.perf_counter()
    out = build_initramfs(real_kernel, guest)
    ms = (time.perf_counter() - t0) * 1000
    print(f"initramfs build: {ms:.1f} ms, {out.stat().st_size} bytes")
    assert out.parent == cache / "initramfs" and out.suffix == ".cpio"
    assert not [p for p in out.parent.iterdir() if p != out]  # no temp files left

    got = {e["name"]: e for e in parse_newc(out.read_bytes())}
    for d in ("dev", "proc", "sys", "run", "tmp", "modules"):
        assert stat.S_ISDIR(got[d]["mode"]), d
    assert got["init"]["mode"] == stat.S_IFREG | 0o755
    assert got["init"]["data"] == guest.read_bytes()
    order = got["modules/order"]["data"].decode().splitlines()
    closure = module_closure(real_kernel, DEFAULT_MODULES)
    assert order == [p.name for p in closure]
    for p in closure:
        assert got[f"modules/{p.name}"]["data"] == strip_signature(p.read_bytes())

    # cached: same inputs -> same file, not rewritten
    mtime = out.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_initramfs(real_kernel, guest) == out
    print(f"initramfs cached: {(time.perf_counter() - t0) * 1000:.1f} ms")
    assert out.stat().st_mtime_ns == mtime
    # different inputs -> different file
    assert build_initramfs(real_kernel, guest, ["virtio_blk"]) != out
    guest.write_bytes(b"\x7fELF another guest")
    assert build_initramfs(real_kernel, guest) != out


def test_build_initramfs_missing_module(real_kernel, cache, tmp_path):
    from matchlock.errors import NotFoundError

    guest = tmp_path / "guest"
    guest.write_bytes(b"g")
    with pytest.raises(NotFoundError, match="no_such_module"):
        build_initramfs(real_kernel, guest, ["no_such_module"])
    with pytest.raises(NotFoundError, match="guest binary"):
        build_initramfs(real_kernel, tmp_path / "missing")


INIT_C = r"""
#include <sys/reboot.h>
#include <unistd.h>
int main(void) {
    static const char msg[] = "MATCHLOCK-BOOT-OK\n";
    write(1, msg, sizeof msg - 1);
    sync();
    reboot(RB_POWER_OFF);
    for (;;) pause();
}
"""


@pytest.mark.e2e
@pytest.mark.skipif(platform.machine() != "x86_64", reason="boots the amd64 kernel")
def test_boot_tiny_init(real_kernel, cache, tmp_path):
    musl = shutil.which("musl-gcc")
    if musl is None:
        pytest.fail("musl-gcc not found: apt-get install musl-tools")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    (tmp_path / "init.c").write_text(INIT_C)
    init = tmp_path / "init"
    subprocess.run(
        [musl, "-static", "-Os", "-o", str(init), str(tmp_path / "init.c")],
        check=True,
        capture_output=True,
    )
    cpio = build_initramfs(real_kernel, init)
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [
                qemu, "-M", "q35", "-accel", "tcg", "-m", "256", "-nodefaults",
                "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                "-kernel", str(real_kernel.image), "-initrd", str(cpio),
                "-append", "console=ttyS0 panic=-1 quiet",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        pytest.fail(f"guest did not power off within 60 s; console:\n{out[-3000:]}")
    seconds = time.monotonic() - t0
    console = r.stdout.decode(errors="replace")
    print(f"boot to poweroff: {seconds:.2f} s")
    assert "MATCHLOCK-BOOT-OK" in console, console[-3000:] + r.stderr.decode(errors="replace")
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def test_strip_signature():
    body = b"\x7fELF-module-body"
    sig = b"S" * 20
    info = b"\0" * 8 + len(sig).to_bytes(4, "big")
    signed = body + sig + info + b"~Module signature appended~\n"
    assert strip_signature(signed) == body
    assert strip_signature(body) == body
