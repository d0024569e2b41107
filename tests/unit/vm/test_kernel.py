"""Guest kernel resolution: the .deb reader, fetch/cache logic, and one real fetch."""

from __future__ import annotations

import platform
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from matchlock.errors import DependencyError, NotFoundError
from matchlock.vm import _deb, kernel
from matchlock.vm.kernel import Kernel, bzimage_version, host_tsc_khz, resolve_kernel

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

@pytest.fixture(autouse=True)
def _prefer_our_build(monkeypatch):
    """The default resolution: our build preferred (test_kernel.py::
    test_default_kernel_debian_opts_out covers MATCHLOCK_DEFAULT_KERNEL=debian)."""
    monkeypatch.delenv("MATCHLOCK_DEFAULT_KERNEL", raising=False)



@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in (
        kernel.ENV_KERNEL,
        kernel.ENV_KERNEL_MODULES,
        kernel.ENV_APT_GET,
        kernel.ENV_APT_CACHE,
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))


def _need(tool: str, package: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.fail(f"{tool} not found: apt-get install {package}")
    return exe


def build_deb(tmp: Path, files: dict[str, bytes], compression: str = "xz", name="pkg") -> Path:
    """A real .deb made by dpkg-deb holding `files` (path -> contents)."""
    _need("dpkg-deb", "dpkg")
    root = tmp / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Test <t@example.com>\nDescription: test package\n"
    )
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    out = tmp / f"{name}_{compression}.deb"
    subprocess.run(
        ["dpkg-deb", f"-Z{compression}", "--root-owner-group", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


# --------------------------------------------------------------------------- _deb


@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd", "none"])
def test_deb_reader_round_trip(tmp_path, compression):
    files = {
        "boot/vmlinuz-1.2.3": b"\x01kernel" * 1000,
        "usr/share/doc/pkg/readme": b"hello\n",
        "lib/modules/1.2.3/kernel/a.ko": b"odd-size",  # odd sizes exercise ar padding
    }
    deb = build_deb(tmp_path, files, compression)
    with open(deb, "rb") as f:
        members = _deb.ar_members(f)
    names = [m.name for m in members]
    assert names[0] == "debian-binary"
    assert names[1].startswith("control.tar") and names[2].startswith("data.tar")
    with open(deb, "rb") as f:
        f.seek(members[0].offset)
        assert f.read(members[0].size) == b"2.0\n"

    dest = tmp_path / "out"
    got = _deb.extract_deb(deb, dest, lambda n: n if n.startswith(("boot/", "lib/")) else None)
    assert sorted(p.relative_to(dest).as_posix() for p in got) == [
        "boot/vmlinuz-1.2.3",
        "lib/modules/1.2.3/kernel/a.ko",
    ]
    assert (dest / "boot/vmlinuz-1.2.3").read_bytes() == files["boot/vmlinuz-1.2.3"]
    assert (dest / "lib/modules/1.2.3/kernel/a.ko").read_bytes() == b"odd-size"
    assert not (dest / "usr").exists()


def test_deb_reader_zstd_without_python_module(tmp_path, monkeypatch):
    """zstd data falls back to the `zstd` program when `zstandard` is not importable."""
    _need("zstd", "zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    deb = build_deb(tmp_path, {"boot/x": b"zzz"}, "zstd")
    got = _deb.extract_deb(deb, tmp_path / "o", lambda n: n if n == "boot/x" else None)
    assert [p.read_bytes() for p in got] == [b"zzz"]


def test_deb_reader_rejects_non_ar(tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(_deb.DebFormatError, match="not an ar archive"):
        _deb.extract_deb(bad, tmp_path / "o", lambda n: n)


def test_deb_reader_rejects_path_escape(tmp_path):
    deb = build_deb(tmp_path, {"boot/x": b"1"})
    with pytest.raises(_deb.DebFormatError, match="unsafe path"):
        _deb.extract_deb(deb, tmp_path / "o", lambda n: "../evil" if n == "boot/x" else None)


# --------------------------------------------------------------------------- user kernel


def test_missing_env_kernel_is_not_found(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-vmlinuz"
    monkeypatch.setenv(kernel.ENV_KERNEL, str(missing))
    with pytest.raises(NotFoundError) as ei:
        resolve_kernel()
    msg = str(ei.value)
    assert str(missing) in msg and "MATCHLOCK_KERNEL" in msg and "\n" not in msg


def test_missing_explicit_kernel_names_flag(tmp_path):
    with pytest.raises(NotFoundError, match="--kernel"):
        resolve_kernel(str(tmp_path / "nope"))


def test_explicit_kernel_wins_over_env(monkeypatch, tmp_path):
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 4096)
    monkeypatch.setenv(kernel.ENV_KERNEL, str(tmp_path / "missing"))
    k = resolve_kernel(str(image))
    assert k.image == image.resolve() and k.modules_dir is None
    assert k.module_path("virtio_blk") is None  # no modules dir: assume built in


def test_explicit_kernel_modules_from_env(monkeypatch, tmp_path):
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 4096)
    mods = tmp_path / "lib/modules/9.9.9-test"
    (mods / "kernel/drivers").mkdir(parents=True)
    (mods / "kernel/drivers/virtio-blk.ko").write_bytes(b"x")
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    monkeypatch.setenv(kernel.ENV_KERNEL_MODULES, str(mods))
    k = resolve_kernel(str(image))
    assert k.version == "9.9.9-test"  # no bzImage header: falls back to the modules dir
    assert k.module_path("virtio_blk") == mods / "kernel/drivers/virtio-blk.ko"
    assert k.module_path("ext4") is None
    with pytest.raises(NotFoundError, match="nosuchmod"):
        k.module_path("nosuchmod")
    monkeypatch.setenv(kernel.ENV_KERNEL_MODULES, str(tmp_path / "missing"))
    with pytest.raises(NotFoundError, match="MATCHLOCK_KERNEL_MODULES"):
        resolve_kernel(str(image))


# --------------------------------------------------------------------------- fetch (offline)


def test_no_network_is_dependency_error(monkeypatch, tmp_path):
    monkeypatch.setenv(kernel.ENV_APT_GET, "false")
    progress: list[str] = []
    with pytest.raises(DependencyError) as ei:
        resolve_kernel(progress=progress.append)
    msg = str(ei.value)
    assert "--kernel" in msg and "MATCHLOCK_KERNEL" in msg and "\n" not in msg
    assert "cannot fetch the guest kernel" in msg
    # nothing half-made is left behind, and the next call tries again
    kernels = tmp_path / "cache" / "kernels"
    assert [p.name for p in kernels.iterdir()] == [".lock"]


def test_no_apt_cache_is_dependency_error(monkeypatch):
    monkeypatch.setenv(kernel.ENV_APT_CACHE, "/nonexistent/apt-cache")
    with pytest.raises(DependencyError, match="--kernel"):
        resolve_kernel()


FAKE_VERSION = "9.9.9-1-cloud-" + ARCH


@pytest.fixture()
def fake_apt(monkeypatch, tmp_path):
    """apt-cache / apt-get stand-ins serving a tiny linux-image .deb; returns the call log."""
    ver = FAKE_VERSION
    deb = build_deb(
        tmp_path,
        {
            f"boot/vmlinuz-{ver}": b"fake-bzimage",
            f"boot/config-{ver}": b"CONFIG_EXT4_FS=y\n",
            f"boot/System.map-{ver}": b"skip me",
            f"lib/modules/{ver}/kernel/drivers/block/virtio_blk.ko": b"ko",
            f"lib/modules/{ver}/modules.builtin": b"kernel/fs/ext4/ext4.ko\n",
            "usr/share/doc/x/changelog": b"skip me",
        },
        name=f"linux-image-{ver}",
    )
    log = tmp_path / "apt.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    apt_cache = bindir / "apt-cache"
    apt_cache.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        echo "apt-cache $*" >> {log}
        case "$1" in
          depends) printf 'linux-image-cloud-{ARCH}\\n  Depends: linux-image-{ver}\\n' ;;
          show) printf 'Package: linux-image-{ver}\\nSize: 26700000\\n' ;;
        esac
        """)
    )
    apt_get = bindir / "apt-get"
    apt_get.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        echo "apt-get $*" >> {log}
        sleep 0.3
        echo "W: Download is performed unsandboxed as root" >&2
        cp {deb} ./linux-image-{ver}_1.0_all.deb
        """)
    )
    for p in (apt_cache, apt_get):
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(kernel.ENV_APT_CACHE, str(apt_cache))
    monkeypatch.setenv(kernel.ENV_APT_GET, str(apt_get))
    return log


def test_fetch_unpacks_and_caches(fake_apt, tmp_path, monkeypatch):
    progress: list[str] = []
    k = resolve_kernel(progress=progress.append)
    d = tmp_path / "cache" / "kernels" / FAKE_VERSION
    assert k == Kernel(FAKE_VERSION, d / "vmlinuz", d / "modules")
    assert k.image.read_bytes() == b"fake-bzimage"
    assert (d / "config").read_text() == "CONFIG_EXT4_FS=y\n"
    # No PVH vmlinux in a fake bzImage: remembered, so the next resolve does not retry.
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == [
        "config", "kernel.json", "modules", "vmlinux.none", "vmlinuz"]
    assert k.module_path("virtio-blk") == d / "modules/kernel/drivers/block/virtio_blk.ko"
    assert k.module_path("ext4") is None
    assert progress == [
        f"Fetching guest kernel linux-image-{FAKE_VERSION} (26.7 MB)…",
        "Unpacking kernel…",
        f"Kernel ready: {FAKE_VERSION}",
        kernel.BUILD_HINT,  # after the kernel is there: a failed fetch says one line only
    ]
    calls = fake_apt.read_text()
    # second call: served from the cache without running apt at all, even if it is broken
    monkeypatch.setenv(kernel.ENV_APT_GET, "false")
    monkeypatch.setenv(kernel.ENV_APT_CACHE, "false")
    progress.clear()
    assert resolve_kernel(progress=progress.append) == k
    assert progress == [kernel.BUILD_HINT] and fake_apt.read_text() == calls
    assert not list((tmp_path / "cache" / "kernels").glob(".fetch-*"))


def test_concurrent_fetches_download_once(fake_apt):
    results: list[Kernel] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve_kernel())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and len(set(results)) == 1
    assert fake_apt.read_text().count("apt-get download") == 1


def test_cache_picks_newest_and_ignores_partial(tmp_path):
    kernels = tmp_path / "cache" / "kernels"
    for ver in ("6.1.0-9-cloud-" + ARCH, "6.1.0-56-cloud-" + ARCH, "6.1.0-10-cloud-" + ARCH):
        d = kernels / ver
        (d / "modules").mkdir(parents=True)
        (d / "vmlinuz").write_bytes(b"k")
        (d / "kernel.json").write_text(
            f'{{"format": 1, "version": "{ver}", "package": "linux-image-{ver}", "arch": "{ARCH}"}}'
        )
    # a newer dir without kernel.json (half-made) and a staging dir must be ignored
    (kernels / ("7.0.0-1-cloud-" + ARCH)).mkdir()
    (kernels / ("7.0.0-1-cloud-" + ARCH) / "vmlinuz").write_bytes(b"k")
    (kernels / ".fetch-abc").mkdir()
    k = resolve_kernel()
    assert k.version == "6.1.0-56-cloud-" + ARCH


# --------------------------------------------------------------------------- misc


def test_host_tsc_khz():
    khz = host_tsc_khz()
    if platform.machine() in ("x86_64", "amd64"):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        if "constant_tsc" in cpuinfo:
            assert isinstance(khz, int) and 100_000 < khz < 10_000_000
    else:
        assert khz is None


# --------------------------------------------------------------------------- real fetch


@pytest.fixture(scope="module")
def real_kernel(tmp_path_factory) -> tuple[Kernel, float, list[str]]:
    cache = tmp_path_factory.mktemp("real-cache")
    with pytest.MonkeyPatch.context() as mp:
        for var in (kernel.ENV_KERNEL, kernel.ENV_APT_GET, kernel.ENV_APT_CACHE):
            mp.delenv(var, raising=False)
        mp.setenv("MATCHLOCK_CACHE_DIR", str(cache))
        progress: list[str] = []
        t0 = time.monotonic()
        k = resolve_kernel(progress=progress.append)
        return k, time.monotonic() - t0, progress


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks the amd64 bzImage")
def test_real_fetch(real_kernel, monkeypatch):
    k, seconds, progress = real_kernel
    print(f"first fetch+unpack: {seconds:.1f} s")
    assert k.version.endswith("-cloud-amd64")
    # The uncompressed PVH vmlinux is what boots; the bzImage stays beside it.
    assert k.image.name == "vmlinux" and k.image.stat().st_size > 4_000_000
    assert bzimage_version(k.image.with_name("vmlinuz")) == k.version
    assert k.modules_dir is not None and k.modules_dir.name == "modules"
    assert (k.modules_dir / "modules.builtin").is_file()
    assert (k.image.parent / "config").read_text().count("CONFIG_VIRTIO") > 0
    assert progress[0].startswith(f"Fetching guest kernel linux-image-{k.version} (")
    assert progress[-2] == f"Kernel ready: {k.version}"
    assert progress[-1] == kernel.BUILD_HINT  # an empty cache: no build of ours yet
    for mod in ("virtio_blk", "virtio_pci", "virtio_net", "overlay", "fuse", "virtio_ring"):
        p = k.module_path(mod)
        assert p is not None and p.suffix == ".ko" and p.is_file(), mod
    assert k.module_path("ext4") is None  # built in

    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(k.image.parent.parent.parent))
    monkeypatch.setenv(kernel.ENV_APT_GET, "false")
    monkeypatch.setenv(kernel.ENV_APT_CACHE, "false")
    t0 = time.perf_counter()
    assert resolve_kernel() == k
    ms = (time.perf_counter() - t0) * 1000
    print(f"cached resolve: {ms:.2f} ms")
    assert ms < 200


@pytest.mark.skipif(platform.machine() != "x86_64", reason="uses the amd64 kernel")
def test_modular_kernel_by_path_needs_its_modules(real_kernel, tmp_path, monkeypatch):
    """--kernel <Debian vmlinux> once booted without modules and failed late ("root disk
    not found"): now its modules come from a `modules` dir beside it, or it fails at once."""
    k, _seconds, _progress = real_kernel
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "empty-cache"))
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("vmlinux", "vmlinuz"):
        (alone / name).symlink_to(k.image.parent / name)
    for name in ("vmlinux", "vmlinuz"):
        with pytest.raises(NotFoundError) as ei:
            resolve_kernel(str(alone / name))
        msg = str(ei.value)
        assert "modules" in msg and str(alone / "modules") in msg and "\n" not in msg
    # In its cache dir the modules sit beside it: found.
    beside = resolve_kernel(str(k.image))
    assert beside.modules_dir == k.image.parent / "modules" and beside.version == k.version
    assert beside.module_path("virtio_blk") is not None
    # MATCHLOCK_KERNEL_MODULES still wins.
    monkeypatch.setenv(kernel.ENV_KERNEL_MODULES, str(k.modules_dir))
    assert resolve_kernel(str(alone / "vmlinux")).modules_dir == k.modules_dir


def test_default_kernel_debian_opts_out(monkeypatch, tmp_path):
    """Our build is the default once built; MATCHLOCK_DEFAULT_KERNEL=debian makes VMs boot
    Debian's kernel even with a build in the cache."""
    monkeypatch.delenv("MATCHLOCK_KERNEL", raising=False)
    monkeypatch.setattr(kernel, "best_built", lambda: "our-build")
    monkeypatch.setattr(kernel, "debian_kernel", lambda progress=None: "debian-kernel")
    assert kernel.prefer_built()
    assert kernel.resolve_kernel() == "our-build"
    monkeypatch.setenv("MATCHLOCK_DEFAULT_KERNEL", "debian")
    assert not kernel.prefer_built()
    monkeypatch.setattr(kernel, "best_built", lambda: pytest.fail("must not be consulted"))
    assert kernel.resolve_kernel() == "debian-kernel"


def test_host_tsc_khz_is_measured_once_per_host_boot(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel, "_machine", lambda: "x86_64")
    monkeypatch.setattr(kernel, "_sysfs_tsc_khz", lambda: None)
    boot = ["boot-a"]
    monkeypatch.setattr(kernel, "_boot_id", lambda: boot[0])
    measured = []

    def measure() -> int:
        measured.append(boot[0])
        return 2_400_000 + len(measured)

    monkeypatch.setattr(kernel, "_measured_tsc_khz", measure)
    fresh = host_tsc_khz.__wrapped__
    assert fresh() == 2_400_001
    assert fresh() == 2_400_001  # from the cache file: no second dmesg
    assert measured == ["boot-a"]
    cached = tmp_path / "cache" / "host-tsc-khz"
    assert cached.read_text() == "boot-a 2400001\n"
    boot[0] = "boot-b"  # the host rebooted: measure again
    assert fresh() == 2_400_002
    assert measured == ["boot-a", "boot-b"]
    cached.write_text("garbage")
    assert fresh() == 2_400_003
    assert cached.read_text() == "boot-b 2400003\n"


def test_host_tsc_khz_without_a_writable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(blocker / "cache"))  # mkdir fails
    monkeypatch.setattr(kernel, "_machine", lambda: "x86_64")
    monkeypatch.setattr(kernel, "_sysfs_tsc_khz", lambda: None)
    monkeypatch.setattr(kernel, "_boot_id", lambda: "boot-a")
    monkeypatch.setattr(kernel, "_measured_tsc_khz", lambda: 1_000_000)
    assert host_tsc_khz.__wrapped__() == 1_000_000
