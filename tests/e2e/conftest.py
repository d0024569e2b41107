"""E2E fixtures: test images built once and cached under the cache dir."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from matchlock.paths import cache_dir

pytestmark = pytest.mark.e2e

E2E_KERNEL_ENV = "MATCHLOCK_E2E_KERNEL"


_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ARG001 - the hook's signature
    outcome = yield
    if outcome.get_result().failed:
        _FAILED_MODULES.add(item.module.__name__)


@pytest.fixture(scope="module", autouse=True)
def reclaim_after_module(request, ml_env):
    """After each module, remove the stopped VMs it kept (`rpc` close and `--rm=false` keep
    them, as the reference does); after a module with a failed test, also stop and reclaim
    whatever its VMs left. The state home is shared: without this, one module's leftovers
    fail every later module's residue check, and one failure is reported many times.
    Runs after the module's own fixtures are torn down; never touches another run's VMs."""
    yield
    from tests.conftest import matchlock_cmd

    steps = [("prune",)]
    if request.module.__name__ in _FAILED_MODULES:
        steps = [("kill", "--all"), ("prune",), ("gc",)]
    for args in steps:
        subprocess.run([*matchlock_cmd(), *args], env=ml_env, capture_output=True,
                       timeout=300)


@pytest.fixture(scope="session", autouse=True)
def guest_kernel() -> str:
    """The kernel every e2e VM boots, set before any other fixture reads the environment.

    Default: matchlock's own build, what VMs boot by default (`matchlock kernel build`:
    a cache hit once built, so the suite never rebuilds it; built here, once, on a machine
    that lacks it). MATCHLOCK_E2E_KERNEL=debian runs the suite on the Debian cloud kernel
    fallback instead. An explicit MATCHLOCK_KERNEL is left alone."""
    if os.environ.get("MATCHLOCK_KERNEL"):
        return os.environ["MATCHLOCK_KERNEL"]
    choice = os.environ.get(E2E_KERNEL_ENV, "matchlock")
    if choice == "debian":
        os.environ["MATCHLOCK_KERNEL"] = "debian"
        return "debian"
    if choice != "matchlock":
        pytest.fail(f"{E2E_KERNEL_ENV}={choice}: use matchlock or debian", False)
    os.environ.pop("MATCHLOCK_DEFAULT_KERNEL", None)  # the default resolution, as users get it
    from matchlock.errors import DependencyError, MatchlockError
    from matchlock.vm.kernel import best_built, built_is_current
    from matchlock.vm.kernel_build import build_kernel, find_source

    try:
        find_source()
    except DependencyError:
        # No source package (removed after building?): a build of this config will do.
        k = best_built()
        if k is not None and built_is_current(k):
            return k.name
    try:
        res = build_kernel()
    except MatchlockError as e:
        pytest.fail(f"cannot build the guest kernel for the e2e suite: {e}", False)
    # Not pinned: VMs find it by the default resolution, which the suite thereby tests
    # (test_guest_kernel.py checks that they really boot it).
    return res.name


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644,
              uid: int = 0, gid: int = 0) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), mode, uid, gid, int(time.time())
    tar.addfile(ti, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755, uid: int = 0,
             gid: int = 0) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid = tarfile.DIRTYPE, mode, uid, gid
    tar.addfile(ti)


def make_docker_save(out: Path, layer: bytes, config: dict, tag: str) -> None:
    """Wrap one uncompressed layer tar into a `docker save` tarball."""
    layer_digest = hashlib.sha256(layer).hexdigest()
    cfg = json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
    }).encode()
    cfg_digest = hashlib.sha256(cfg).hexdigest()
    manifest = json.dumps([{
        "Config": f"{cfg_digest}.json", "RepoTags": [tag],
        "Layers": [f"{layer_digest}/layer.tar"],
    }]).encode()
    with tarfile.open(out, "w") as tar:
        _add_file(tar, f"{cfg_digest}.json", cfg)
        _add_file(tar, f"{layer_digest}/layer.tar", layer)
        _add_file(tar, "manifest.json", manifest)


def busybox_rootfs_layer(extra_dirs: tuple[tuple[str, int, int, int], ...] = ()) -> bytes:
    bb = Path("/bin/busybox").read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "tmp", "root", "home", "srv"):
            _add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        _add_file(tar, "bin/busybox", bb, 0o755)
        for applet in ("sh", "echo", "id", "pwd", "cat", "env", "ls", "sleep", "touch"):
            ti = tarfile.TarInfo(f"bin/{applet}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(ti)
        _add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                  b"app:x:1234:2345:app:/home/app:/bin/sh\n"
                  b"nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
        _add_file(tar, "etc/group", b"root:x:0:\napp:x:2345:\nstaff:x:50:\n"
                  b"nogroup:x:65534:\n")
        for name, mode, uid, gid in extra_dirs:
            _add_dir(tar, name, mode, uid, gid)
    return buf.getvalue()


@pytest.fixture(scope="session")
def user_image(ml, qemu_present) -> str:
    """A busybox image whose config sets User, WorkingDir, Env, Entrypoint and Cmd."""
    tag = "e2e/userimg:1"
    tmp = cache_dir() / "test-images"
    tmp.mkdir(parents=True, exist_ok=True)
    tar = tmp / "userimg.tar"
    make_docker_save(
        tar,
        busybox_rootfs_layer((("home/app", 0o755, 1234, 2345), ("srv/work", 0o755, 1234, 2345))),
        {
            "User": "app", "WorkingDir": "/srv/work",
            "Env": ["PATH=/bin", "IMG_VAR=from-image", "SHADOW=image"],
            "Entrypoint": ["/bin/echo", "entry"], "Cmd": ["default-cmd"],
        },
        tag,
    )
    ml("image", "import", tag, str(tar), check=True)
    return tag


def debian_tarball() -> Path:
    """The Debian test image as a `docker save` tarball, built once into the shared cache."""
    out = cache_dir() / "test-images" / "debian-bookworm.tar"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("mmdebstrap") is None:
            pytest.fail("mmdebstrap is not installed: run ./scripts/install.sh", False)
        subprocess.run(
            [sys.executable, "-m", "matchlock.image.testimages", "debian", str(out)],
            check=True, timeout=900,
        )
    return out


def debian_tools_tarball() -> Path:
    """The Debian test image plus nftables, iptables and iproute2 (kernel compatibility)."""
    out = cache_dir() / "test-images" / "debian-bookworm-kernel-tools.tar"
    if not out.exists():
        from matchlock.image.testimages import (
            DEBIAN_CONFIG,
            DEBIAN_PACKAGES,
            build_debian_rootfs,
            make_docker_save,
        )

        if shutil.which("mmdebstrap") is None:
            pytest.fail("mmdebstrap is not installed: run ./scripts/install.sh", False)
        rootfs = out.with_name(out.name + ".rootfs.tar")
        try:
            build_debian_rootfs(rootfs, packages=(*DEBIAN_PACKAGES, "nftables", "iptables",
                                                  "iproute2"))
            make_docker_save(rootfs, out, DEBIAN_CONFIG, tag="debian-tools:test")
        finally:
            rootfs.unlink(missing_ok=True)
    return out


@pytest.fixture(scope="session")
def debian_tools_image(ml, qemu_present) -> str:
    tag = "debian-tools:test"
    ml("image", "import", tag, str(debian_tools_tarball()), check=True, timeout=600)
    return tag


@pytest.fixture(scope="session")
def debian_image(ml, qemu_present) -> str:
    """Debian bookworm minbase + ca-certificates, curl, python3 (mmdebstrap), cached."""
    tag = "debian:test"
    ml("image", "import", tag, str(debian_tarball()), check=True, timeout=600)
    return tag


def qemu_pids(state_home: Path) -> list[int]:
    """QEMU processes that belong to this test run (their paths are under state_home)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(state_home).encode() in cmd:
            pids.append(int(pid))
    return pids


def _known_ids(state_home: Path, ids: tuple[str, ...]) -> set[str]:
    known = set(ids)
    vms = state_home / "vms"
    if vms.exists():
        known |= {p.name for p in vms.iterdir() if p.name.startswith("vm-")}
    db = state_home / "state.db"
    if db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            known |= {r[0] for r in con.execute("SELECT id FROM vms")}
        except sqlite3.Error:
            pass
        finally:
            con.close()
    return known


def _rows(state_home: Path) -> list[str]:
    db = state_home / "state.db"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out = []
        for table, col in (("vms", "id"), ("vm_history", "vm_id"), ("vm_resources", "vm_id")):
            try:
                rows = con.execute(f"SELECT DISTINCT {col} FROM {table}")
                out += [f"{table}:{r[0]}" for r in rows]
            except sqlite3.Error:
                pass
        return sorted(out)
    finally:
        con.close()


def residue(state_home: Path, ids: tuple[str, ...] = ()) -> dict:
    """Everything a VM of this state home (or one of `ids`) could leave behind: QEMU
    processes, VM directories, network namespaces (their TAP and nftables rules live and
    die inside them), TAPs or matchlock nft tables in the host namespace, sockets and
    disks under the state home, mounts, and state DB rows."""
    vms = state_home / "vms"
    known = _known_ids(state_home, ids)
    ns_names = {"ml-" + i.removeprefix("vm-") for i in known}
    try:
        namespaces = sorted(n for n in os.listdir("/run/netns") if n in ns_names)
    except FileNotFoundError:
        namespaces = []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    host_taps = sorted(re.findall(r"^\d+: (ml-[^:@]+)", links, re.M))
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    host_nft = sorted(t for t in tables.splitlines() if "matchlock" in t)
    files = [p for p in state_home.rglob("*")] if state_home.exists() else []
    sockets = sorted(str(p) for p in files if p.is_socket())
    unix = Path("/proc/net/unix").read_text()
    sockets += sorted({line.split()[-1] for line in unix.splitlines()
                       if str(state_home) in line})
    disks = sorted(str(p) for p in files if p.suffix == ".ext4")
    mounts = sorted(m for m in Path("/proc/mounts").read_text().splitlines()
                    if str(state_home) in m or any(f"/run/netns/{n} " in m for n in ns_names))
    return {
        "qemu": qemu_pids(state_home),
        "vm_dirs": sorted(p.name for p in vms.iterdir()) if vms.exists() else [],
        "namespaces": namespaces,
        "host_taps": host_taps,
        "host_nft": host_nft,
        "sockets": sorted(set(sockets)),
        "disks": disks,
        "mounts": mounts,
        "rows": _rows(state_home),
    }


NO_RESIDUE = {k: [] for k in ("qemu", "vm_dirs", "namespaces", "host_taps", "host_nft",
                              "sockets", "disks", "mounts", "rows")}


@contextlib.contextmanager
def veth_netns(hosts: tuple[int, ...] = (2,)) -> Iterator[tuple[str, str]]:
    """A network namespace `mltest-<tag>` joined to the host by a veth pair on a free
    198.18.X.0/24 (X random, so concurrent runs do not clash): the host side is .1, the
    namespace holds .<h> for each h in `hosts`. Yields (namespace, "198.18.X")."""
    used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    free = [x for x in range(100, 250) if f"198.18.{x}." not in used]
    net = f"198.18.{random.choice(free)}"
    tag = uuid.uuid4().hex[:6]
    ns, veth_h, veth_n = f"mltest-{tag}", f"mlth{tag}", f"mltn{tag}"

    def sh(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True)

    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_n)
        sh("ip", "link", "set", veth_n, "netns", ns)
        sh("ip", "addr", "add", f"{net}.1/24", "dev", veth_h)
        sh("ip", "link", "set", veth_h, "up")
        for h in hosts:
            sh("ip", "-n", ns, "addr", "add", f"{net}.{h}/24", "dev", veth_n)
        sh("ip", "-n", ns, "link", "set", veth_n, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, net
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth_h], capture_output=True)


def _recording_server():
    """A TCP server on the host's 127.0.0.1 that records every connection (a sealed
    guest must never reach it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    hits: list[tuple] = []

    def serve() -> None:
        while True:
            try:
                conn, peer = srv.accept()
            except OSError:
                return
            hits.append(peer)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, hits


@pytest.fixture
def host_server():
    srv, hits = _recording_server()
    yield srv.getsockname()[1], hits
    srv.close()


@pytest.fixture(scope="module")
def host_loopback():
    srv, hits = _recording_server()
    yield srv.getsockname()[1], hits
    srv.close()
