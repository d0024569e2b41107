"""`matchlock kernel build`: the recipe run against a stand-in kernel source (a Makefile
that answers tinyconfig / olddefconfig / vmlinux like Kbuild does), the cache key, the
lock, and resolution of the built kernel. The real 6.1 build is exercised by the e2e suite
(tests/e2e/conftest.py builds it once, then every VM boots it)."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from matchlock.cli._main import main
from matchlock.errors import DependencyError, NotFoundError
from matchlock.vm import kernel, kernel_build

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                                reason="configs exist for x86_64 and arm64 only")

ARCH = kernel_build.host_arch()

# Kbuild's targets, faked: tinyconfig writes a base config, olddefconfig keeps what was
# appended and drops one option (as an unmet dependency would), the image target prints
# progress lines like Kbuild's and counts how often it ran.
MAKEFILE = r"""
tinyconfig:
	@printf 'CONFIG_64BIT=y\n# CONFIG_SMP is not set\n' > .config
olddefconfig:
	@grep -v '^CONFIG_IKCONFIG_PROC=' .config > .config.new; mv .config.new .config
	@mkdir -p include/config; echo 6.1.999-matchlock > include/config/kernel.release
vmlinux Image:
	@echo '  CC      kernel/fork.o'; echo '  CC      kernel/exit.o'; echo '  LD      vmlinux'
	@sleep $${FAKE_BUILD_SLEEP:-0}
	@echo built >> $(COUNTER)
	@mkdir -p arch/arm64/boot; printf '\177ELF-fake-kernel' > vmlinux
	@if [ -f patched.txt ]; then cat patched.txt >> vmlinux; fi
	@cp vmlinux arch/arm64/boot/Image
"""

@pytest.fixture(autouse=True)
def _prefer_our_build(monkeypatch):
    """The default resolution: our build preferred (test_kernel.py::
    test_default_kernel_debian_opts_out covers MATCHLOCK_DEFAULT_KERNEL=debian)."""
    monkeypatch.delenv("MATCHLOCK_DEFAULT_KERNEL", raising=False)



def config_copy(dest: Path, patches: bool = False) -> Path:
    if not dest.exists():
        dest.mkdir()
        for f in REAL_CONFIG_DIR.iterdir():
            if f.suffix == ".config" or (patches and f.suffix == ".patch"):
                (dest / f.name).write_bytes(f.read_bytes())
    return dest


REAL_CONFIG_DIR = kernel_build.config_dir()


@pytest.fixture()
def fake_source(tmp_path, monkeypatch) -> Path:
    counter = tmp_path / "builds.txt"
    tar_path = tmp_path / "linux-source-fake.tar.xz"
    data = MAKEFILE.replace("$(COUNTER)", str(counter)).encode()
    with tarfile.open(tar_path, "w:xz") as tar:
        info = tarfile.TarInfo("linux-source-fake/Makefile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv(kernel_build.ENV_SOURCE, str(tar_path))
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    # The real fragments, without the real patches (they need the real source tree).
    cfg = config_copy(tmp_path / "kcfg")
    monkeypatch.setattr(kernel_build, "config_dir", lambda: cfg)
    for var in (kernel.ENV_KERNEL, kernel.ENV_KERNEL_MODULES):
        monkeypatch.delenv(var, raising=False)
    return counter


class Recorder(kernel_build.BuildProgress):
    def __init__(self) -> None:
        self.phases: list[str] = []
        self.last: tuple[int, int] = (0, 0)
        self.messages: list[str] = []

    def phase(self, text: str) -> None:
        self.phases.append(text)

    def steps(self, done: int, total: int) -> None:
        self.last = (done, total)

    def message(self, text: str) -> None:
        self.messages.append(text)


def test_build_then_cache_hit(fake_source, tmp_path):
    rec = Recorder()
    res = kernel_build.build_kernel(rec, jobs=1)
    assert not res.cached
    assert res.name.startswith("matchlock-linux-source-fake+")
    assert res.name.endswith("-" + kernel_build.config_digest(ARCH))
    d = tmp_path / "cache" / "kernels" / res.name
    assert res.path == d and res.image == d / ARCH.out
    assert res.image.read_bytes() == b"\x7fELF-fake-kernel"
    assert sorted(p.name for p in d.iterdir()) == sorted(["config", "kernel.json", ARCH.out])
    meta = json.loads((d / "kernel.json").read_text())
    assert meta["kind"] == "matchlock" and meta["version"] == "6.1.999-matchlock"
    assert meta["steps"] == 3 and rec.last == (3, 3)
    # The fragments were appended after tinyconfig's base, in order.
    config = (d / "config").read_text()
    assert config.startswith("CONFIG_64BIT=y\n") and "CONFIG_VIRTIO_BLK=y" in config
    assert config.index("common.config") < config.index(f"{ARCH.name}.config")
    # The option olddefconfig dropped is reported, not silently lost.
    assert res.dropped == ("CONFIG_IKCONFIG_PROC=y (got n)",)
    assert any(p.startswith("Unpacking linux-source-fake") for p in rec.phases)
    # No staging dirs or source trees left behind.
    assert [p.name for p in (tmp_path / "cache" / "kernels").iterdir()
            if p.name.startswith(".") and p.name != ".build.lock"] == []

    t0 = time.monotonic()
    again = kernel_build.build_kernel(Recorder())
    assert again.cached and again.name == res.name and time.monotonic() - t0 < 1.0
    assert fake_source.read_text() == "built\n"  # make ran once
    # force rebuilds in place
    assert not kernel_build.build_kernel(Recorder(), force=True).cached
    assert fake_source.read_text() == "built\nbuilt\n"


def test_built_kernel_is_the_default(fake_source, tmp_path):
    hints: list[str] = []
    res = kernel_build.build_kernel()
    k = kernel.resolve_kernel(progress=hints.append)
    assert (k.kind, k.name, k.image, k.modules_dir) == ("matchlock", res.name, res.image, None)
    assert hints == []  # no Debian fallback hint when our kernel is there
    # by name and by alias, as `kernel ls` prints it
    assert kernel.resolve_kernel(res.name) == k
    assert kernel.resolve_kernel("matchlock") == k
    entries = kernel.list_kernels()
    assert [(e.kernel.name, e.default, e.current) for e in entries] == [(res.name, True, True)]
    # A path to it: drivers built in, nothing refused.
    assert kernel.resolve_kernel(str(res.image)).modules_dir is None
    kernel.remove_kernel(res.name)
    assert kernel.list_kernels() == [] and not res.path.exists()
    with pytest.raises(NotFoundError, match="kernel ls"):
        kernel.remove_kernel(res.name)


def test_build_of_an_older_config_is_used_but_not_current(fake_source, tmp_path):
    res = kernel_build.build_kernel()
    d = tmp_path / "cache" / "kernels"
    old = d / (res.name.rsplit("-", 1)[0] + "-000000000000")
    os.rename(res.path, old)
    meta = json.loads((old / "kernel.json").read_text())
    meta["config_digest"] = "000000000000"
    (old / "kernel.json").write_text(json.dumps(meta))
    k = kernel.resolve_kernel()
    assert k.name == old.name and not kernel.built_is_current(k)
    # Once the current config is built, it wins.
    new = kernel_build.build_kernel()
    assert not new.cached and kernel.resolve_kernel().name == new.name


def test_unknown_kernel_name_is_one_line(fake_source):
    with pytest.raises(NotFoundError) as ei:
        kernel.resolve_kernel("no-such-kernel")
    msg = str(ei.value)
    assert "no-such-kernel" in msg and "kernel ls" in msg and "\n" not in msg
    with pytest.raises(NotFoundError, match="matchlock kernel build"):
        kernel.resolve_kernel("matchlock")


def test_concurrent_builds_do_not_collide(fake_source, tmp_path):
    """Two builders at once: one builds, the other waits on the lock, then finds it."""
    env = {**os.environ, "FAKE_BUILD_SLEEP": "1.5"}
    code = ("import json, sys\nfrom pathlib import Path\n"
            "from matchlock.vm import kernel_build as kb\n"
            f"kb.config_dir = lambda: Path({str(tmp_path / 'kcfg')!r})\n"
            "class P(kb.BuildProgress):\n"
            "    def message(self, t): print('MSG', t, flush=True)\n"
            "r = kb.build_kernel(P())\n"
            "print(json.dumps({'cached': r.cached, 'name': r.name}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["name"] == results[1]["name"]
    assert fake_source.read_text() == "built\n"  # compiled once
    waited = [o for o, r in zip(outs, results, strict=True) if r["cached"]][0]
    # The waiter either saw the finished build at once or said it waited: naming the
    # holder's pid, or "another process" if it looked before the holder wrote it.
    assert waited.count("\n") == 1 or "MSG Waiting for another kernel build (" in waited


def test_missing_source_package_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(kernel_build.ENV_SOURCE, raising=False)
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_build, "SOURCE_TARBALL", tmp_path / "linux-source-6.1.tar.xz")
    with pytest.raises(SystemExit) as ei:
        main(["kernel", "build"])
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot build the guest kernel")
    assert "apt-get install linux-source-6.1" in err
    assert not (tmp_path / "cache" / "kernels").exists()  # nothing half-made


def test_missing_build_tools_are_named(fake_source, monkeypatch):
    monkeypatch.setattr(kernel_build, "_TOOLS", {"make": "make", "no-such-flex": "flex"})
    with pytest.raises(DependencyError) as ei:
        kernel_build.build_kernel()
    assert "missing flex" in str(ei.value) and "apt-get install flex" in str(ei.value)


def test_failed_build_keeps_its_log(fake_source, tmp_path):
    src = Path(os.environ[kernel_build.ENV_SOURCE])
    bad = b"tinyconfig:\n\t@echo 'scripts/kconfig: *** broken Kconfig'; exit 2\n"
    with tarfile.open(src, "w:xz") as tar:
        info = tarfile.TarInfo("x/Makefile")
        info.size = len(bad)
        tar.addfile(info, io.BytesIO(bad))
    with pytest.raises(Exception) as ei:
        kernel_build.build_kernel()
    msg = str(ei.value)
    assert "make tinyconfig" in msg and "broken Kconfig" in msg and "\n" not in msg
    log = tmp_path / "cache" / "kernels" / "last-build.log"
    assert str(log) in msg and "broken Kconfig" in log.read_text()
    assert not list((tmp_path / "cache" / "kernels").glob(".build-*"))


def test_config_digest_follows_the_fragments_and_patches(monkeypatch, tmp_path):
    copy = config_copy(tmp_path / "kcfg", patches=True)
    monkeypatch.setattr(kernel_build, "config_dir", lambda: copy)
    before = kernel_build.config_digest(ARCH)
    assert before == kernel_build.config_digest(ARCH)
    with open(copy / "common.config", "a") as f:
        f.write("CONFIG_EXAMPLE=y\n")
    after_config = kernel_build.config_digest(ARCH)
    assert after_config != before
    (copy / "common-9999-example.patch").write_text("--- a/x\n+++ b/x\n")
    assert kernel_build.config_digest(ARCH) != after_config
    other = "arm64" if ARCH.name == "x86_64" else "x86_64"
    (copy / f"{other}-9999-example.patch").write_text("--- a/y\n+++ b/y\n")
    names = [p.name for p in kernel_build.source_patches(ARCH)]
    assert "common-9999-example.patch" in names
    assert not [n for n in names if n.startswith(other)]
    assert names == sorted(names)


PATCH_NEW_FILE = """--- /dev/null
+++ b/patched.txt
@@ -0,0 +1 @@
+PATCHED-BY-MATCHLOCK
"""


def test_patches_are_applied_before_the_build(fake_source, monkeypatch, tmp_path):
    copy = config_copy(tmp_path / "kcfg2")
    (copy / "common-0001-test.patch").write_text(PATCH_NEW_FILE)
    monkeypatch.setattr(kernel_build, "config_dir", lambda: copy)
    k = kernel_build.build_kernel()
    assert b"PATCHED-BY-MATCHLOCK" in Path(k.image).read_bytes()


def test_a_patch_that_does_not_apply_is_one_line(fake_source, monkeypatch, tmp_path):
    copy = config_copy(tmp_path / "kcfg2")
    (copy / "common-0001-stale.patch").write_text(
        "--- a/Makefile\n+++ b/Makefile\n@@ -1,1 +1,1 @@\n-no such line\n+x\n")
    monkeypatch.setattr(kernel_build, "config_dir", lambda: copy)
    with pytest.raises(Exception) as ei:
        kernel_build.build_kernel()
    msg = str(ei.value)
    assert "common-0001-stale.patch" in msg and "\n" not in msg
    assert not list((tmp_path / "cache" / "kernels").glob(".build-*"))


def test_our_patches_apply_to_debian_source(tmp_path):
    """Against the real linux-source package (installed by scripts/install.sh): each patch's
    files, extracted alone, take it cleanly."""
    patches = kernel_build.source_patches(ARCH)
    if not patches:
        return
    src = kernel_build.SOURCE_TARBALL
    assert src.is_file(), f"{src} missing: apt-get install linux-source-6.1 (scripts/install.sh)"
    top = subprocess.run(["tar", "-tf", str(src)], capture_output=True, text=True,
                         check=True).stdout.split("\n", 1)[0].split("/")[0]
    files = sorted({line[6:].split("\t")[0] for p in patches
                    for line in p.read_text().splitlines() if line.startswith("+++ b/")})
    subprocess.run(["tar", "-xf", str(src), "-C", str(tmp_path),
                    *[f"{top}/{f}" for f in files]], check=True)
    for p in patches:
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", str(tmp_path / top),
                            "-i", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stdout}{r.stderr}"


def test_fragments_are_all_built_in():
    """No option asks for a module: the initramfs carries none."""
    for f in kernel_build.config_fragments(ARCH):
        opts = kernel_build.parse_config(f.read_text())
        assert not [k for k, v in opts.items() if v == "m"], f
        assert opts.get("CONFIG_MODULES", "n") == "n" or f.name != "common.config"
    merged: dict[str, str] = {}
    for f in kernel_build.config_fragments(ARCH):
        merged.update(kernel_build.parse_config(f.read_text()))
    for need in ("CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_CONSOLE", "CONFIG_VIRTIO_NET",
                 "CONFIG_OVERLAY_FS", "CONFIG_EXT4_FS", "CONFIG_FUSE_FS", "CONFIG_DEVTMPFS",
                 "CONFIG_UNIX98_PTYS", "CONFIG_CGROUPS", "CONFIG_USER_NS", "CONFIG_IPV6",
                 "CONFIG_NF_TABLES", "CONFIG_IP_NF_IPTABLES", "CONFIG_BRIDGE", "CONFIG_VETH",
                 "CONFIG_TUN", "CONFIG_SECCOMP_FILTER", "CONFIG_IO_URING",
                 "CONFIG_BPF_SYSCALL", "CONFIG_INOTIFY_USER", "CONFIG_VSOCKETS",
                 "CONFIG_MEMCG", "CONFIG_CGROUP_PIDS", "CONFIG_CPUSETS", "CONFIG_BLK_CGROUP",
                 "CONFIG_SMP"):
        assert merged.get(need) == "y", need
    if ARCH.name == "x86_64":
        assert merged.get("CONFIG_ACPI") == "y"  # microvm,acpi=on: devices and power-off
        assert merged.get("CONFIG_PVH") == "y"  # direct boot of the uncompressed vmlinux
        assert merged.get("CONFIG_SCHED_MC_PRIO") == "n"


def test_kernel_ls_json_and_rm(fake_source, capsys):
    res = kernel_build.build_kernel()
    with pytest.raises(SystemExit) as ei:
        main(["kernel", "ls", "--json"])
    assert ei.value.code == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["name"], e["kind"], e["default"], e["current"], e["modules"])
            for e in listed] == [(res.name, "matchlock", True, True, False)]
    with pytest.raises(SystemExit) as ei:
        main(["kernel", "rm", "nope", res.name])
    assert ei.value.code == 1 and res.path.exists()  # all or nothing
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["kernel", "rm", res.name])
    assert ei.value.code == 0 and f"Removed {res.name}" in capsys.readouterr().out
    assert not res.path.exists()
