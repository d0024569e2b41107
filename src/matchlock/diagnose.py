"""Host checks: can this machine run matchlock VMs, and how well?

Each check returns a `Check`: a stable `name`, a `status` (pass / warn / fail), a stable
`reason` code and the facts behind it. A `fail` means something a default `run` needs is
broken; a `warn` means VMs work but slower or with less (e.g. TCG instead of KVM). The
words and the fixes are the face's job (cli/_diagnose.py). Checks only look: the one
active probe runs `nft list tables` (in a throw-away user+net namespace when not root).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from matchlock.errors import DependencyError, NotFoundError
from matchlock.paths import cache_dir, state_dir

Status = Literal["pass", "warn", "fail"]
Fact = str | int

# Free space below which a state or cache directory fails / warns. The cache holds the
# kernel (~150 MB unpacked) and image disks; each VM's writable disk is sparse.
DISK_FAIL_BYTES = 256 << 20
DISK_WARN_BYTES = 2 << 30
PROBE_TIMEOUT_S = 10


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    reason: str
    facts: dict[str, Fact] = field(default_factory=dict)


def find_tool(name: str) -> str | None:
    """PATH, then the sbin dirs a non-root PATH often lacks."""
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
         if os.access(p := f"{d}/{name}", os.X_OK)), None)


def run_probe(argv: list[str]) -> tuple[int, str]:
    """(exit status, stdout + stderr) of a short command; never raises."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {PROBE_TIMEOUT_S} s"
    except OSError as e:
        return 127, e.strerror or str(e)
    return r.returncode, r.stdout + r.stderr


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _error_line(rc: int, text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "rror" in ln]
    return (errs or lines or [f"exit status {rc}"])[-1]


@dataclass(frozen=True, slots=True)
class Host:
    """Where the checks look; tests point these at fakes."""

    proc: Path = Path("/proc")
    dev_kvm: str = "/dev/kvm"
    dev_tun: Path = Path("/dev/net/tun")
    euid: int = field(default_factory=os.geteuid)
    which: Callable[[str], str | None] = find_tool
    run: Callable[[list[str]], tuple[int, str]] = run_probe
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


# ---- VMM ---------------------------------------------------------------------------------


def _qemu_names() -> tuple[str, str]:
    arch = platform.machine()
    if arch == "aarch64":
        return "qemu-system-aarch64", "qemu-system-arm"
    return "qemu-system-x86_64", "qemu-system-x86"


def check_qemu(h: Host) -> tuple[Check, str | None]:
    binary, package = _qemu_names()
    override = h.env.get("MATCHLOCK_QEMU")
    if override:
        if not os.access(override, os.X_OK):
            return Check("qemu", "fail", "env-missing", {"path": override}), None
        path = override
    else:
        found = h.which(binary)
        if found is None:
            return Check("qemu", "fail", "missing", {"binary": binary, "package": package}), None
        path = found
    rc, out = h.run([path, "--version"])
    if rc != 0:
        return Check("qemu", "fail", "broken", {"path": path, "error": _error_line(rc, out),
                                                "package": package}), None
    m = re.search(r"version (\S+)", out)
    version = m.group(1) if m else _first_line(out)
    return Check("qemu", "pass", "ok", {"path": path, "version": version}), path


def check_machine(h: Host, qemu: str) -> Check:
    """x86: is the fast `microvm` machine there (else VMs fall back to q35)?"""
    if platform.machine() == "aarch64":
        return Check("machine", "pass", "virt", {})
    rc, out = h.run([qemu, "-machine", "help"])
    if rc == 0 and re.search(r"^microvm\s", out, re.M):
        return Check("machine", "pass", "microvm", {})
    return Check("machine", "warn", "no-microvm", {})


def check_accelerator(h: Host) -> Check:
    from matchlock.vm.accel import ACCELS, kvm_status

    st = kvm_status(h.dev_kvm, str(h.proc / "cpuinfo"))
    forced = (h.env.get("MATCHLOCK_ACCEL") or "auto").lower()
    if forced != "auto":
        if forced not in ACCELS:
            return Check("accelerator", "fail", "forced-unknown", {"accel": forced})
        if forced == "kvm" and not st.usable:
            return Check("accelerator", "fail", "forced-kvm-unusable",
                         {"device": st.device, "why": st.reason, "uid": os.getuid()})
        return Check("accelerator", "pass", "forced", {"accel": forced})
    if sys.platform == "darwin":
        return Check("accelerator", "pass", "hvf", {})
    if st.usable:
        return Check("accelerator", "pass", "kvm", {"device": st.device})
    return Check("accelerator", "warn", st.reason, {"device": st.device, "uid": os.getuid()})


# ---- what every VM boots -----------------------------------------------------------------


def check_guest_runtime(h: Host) -> Check:
    from matchlock import guest

    where, path = guest.locate()
    facts: dict[str, Fact] = {"path": str(path)} if path else {}
    if where == "env":
        ok = path is not None and path.is_file()
        return Check("guest-runtime", "pass" if ok else "fail", "env" if ok else "env-missing",
                     facts)
    if where == "source":
        cc = h.which("musl-gcc")
        if cc is None:
            return Check("guest-runtime", "fail", "no-musl", facts)
        return Check("guest-runtime", "pass", "source", {**facts, "cc": cc})
    if where == "packaged":
        return Check("guest-runtime", "pass", "packaged", facts)
    return Check("guest-runtime", "fail", "missing", {})


def check_kernel(h: Host) -> Check:
    from matchlock.vm import kernel as k

    env = h.env.get(k.ENV_KERNEL)
    if env:
        if env == k.ALIAS_DEBIAN:
            found = k.cached_kernel()
            if found is None:
                return Check("kernel", "warn", "env-debian-not-cached", {"value": env})
        else:
            try:
                found = k._user_kernel(env, k.ENV_KERNEL)
            except NotFoundError as e:
                return Check("kernel", "fail", "env-missing", {"path": env, "error": str(e)})
        return Check("kernel", "pass", "env", {"path": str(found.image),
                                               "version": found.version})
    built = k.best_built() if k.prefer_built() else None
    if built is not None:
        facts: dict[str, Fact] = {"name": built.name, "path": str(built.image),
                                  "version": built.version}
        if k.built_is_current(built):
            return Check("kernel", "pass", "built", facts)
        return Check("kernel", "warn", "built-old", facts)
    build = _kernel_build_fix()
    cached = k.cached_kernel()
    if cached is not None and not k.prefer_built():  # MATCHLOCK_DEFAULT_KERNEL=debian
        return Check("kernel", "pass", "debian-default", {"path": str(cached.image.parent),
                                                          "version": cached.version})
    if cached is not None:
        return Check("kernel", "warn", "debian", {"path": str(cached.image.parent),
                                                  "version": cached.version, "build": build})
    try:
        arch = k._arch()
    except DependencyError:
        return Check("kernel", "fail", "no-debian-kernel", {"arch": platform.machine(),
                                                            "build": build})
    pkg = f"linux-image-cloud-{arch}"
    apt_missing = [t for t, var in (("apt-get", k.ENV_APT_GET), ("apt-cache", k.ENV_APT_CACHE))
                   if not h.env.get(var) and h.which(t) is None]
    if apt_missing:
        return Check("kernel", "fail", "no-apt", {"tools": ", ".join(apt_missing),
                                                  "package": pkg, "build": build})
    return Check("kernel", "warn", "not-cached", {"package": pkg,
                                                  "path": str(cache_dir() / "kernels"),
                                                  "build": build})


def _kernel_build_fix() -> str:
    """How to get matchlock's own kernel on this host: the packages it lacks, then build."""
    from matchlock.vm import kernel_build as kb

    try:
        pkgs = kb.missing_build_deps(kb.host_arch())
    except DependencyError:
        return "pass --kernel PATH"  # no config of ours for this architecture
    try:
        kb.find_source()
    except DependencyError:
        pkgs.insert(0, kb.SOURCE_PACKAGE)
    except NotFoundError:
        pass  # MATCHLOCK_KERNEL_SOURCE names a missing file: the build says so
    cmd = "matchlock kernel build"
    return f"apt-get install {' '.join(pkgs)} && {cmd}" if pkgs else cmd


def check_tool(h: Host, name: str, tool: str, package: str, status: Status = "fail") -> Check:
    path = h.which(tool)
    if path is None:
        return Check(name, status, "missing", {"tool": tool, "package": package})
    return Check(name, "pass", "ok", {"path": path})


def check_busybox(h: Host) -> Check:
    from matchlock.image._builtin import find_busybox

    try:
        return Check("busybox", "pass", "ok", {"path": str(find_busybox())})
    except DependencyError as e:
        return Check("busybox", "warn", "missing", {"error": str(e)})


def check_builder(h: Host) -> Check:
    """`matchlock build`'s builder image: stored, or what the first build needs to make it.
    Never a failure: only `build` needs it."""
    from matchlock.build._builder import PACKAGES, builder_name, builder_status

    try:
        img = builder_status()
    except Exception as e:  # noqa: BLE001 - an unreadable store is reported, not raised
        return Check("builder-image", "warn", "unreadable", {"error": str(e)})
    facts: dict[str, Fact] = {"name": builder_name(), "packages": ", ".join(PACKAGES)}
    if img is not None:
        return Check("builder-image", "pass", "stored", facts | {"size": img.size >> 20})
    if h.which("mmdebstrap") is None:
        return Check("builder-image", "warn", "no-mmdebstrap", facts)
    return Check("builder-image", "pass", "not-made", facts)


# ---- network -----------------------------------------------------------------------------


def check_tun(h: Host) -> Check:
    path = h.dev_tun
    try:
        st = path.stat()
    except OSError:
        return Check("tun-device", "fail", "missing", {"path": str(path)})
    if h.euid != 0 and not os.access(path, os.R_OK | os.W_OK):
        return Check("tun-device", "fail", "no-access",
                     {"path": str(path), "uid": os.getuid(), "mode": f"{st.st_mode & 0o777:04o}"})
    return Check("tun-device", "pass", "ok", {"path": str(path)})


def check_userns(h: Host) -> Check:
    from matchlock.net import _userns

    if h.euid == 0:
        return Check("user-namespaces", "pass", "root", {})
    # Only the user-namespace knobs: TUN and nft have their own checks.
    knobs = [m for m in _userns.missing_requirements(h.proc, h.dev_tun, nft="nft")
             if "=" in m]
    if knobs:
        return Check("user-namespaces", "fail", "disabled", {"knobs": ", ".join(knobs)})
    unshare = h.which("unshare")
    if unshare is None:
        return Check("user-namespaces", "pass", "knobs-ok", {})
    rc, out = h.run([unshare, "--user", "--map-root-user", "--net", "true"])
    if rc != 0:
        return Check("user-namespaces", "fail", "failed", {"error": _error_line(rc, out)})
    return Check("user-namespaces", "pass", "ok", {})


def check_nftables(h: Host) -> Check:
    nft = h.which("nft")
    if nft is None:
        return Check("nftables", "fail", "missing", {"package": "nftables"})
    if h.euid == 0:
        probe = [nft, "list", "tables"]
    else:
        unshare = h.which("unshare")
        if unshare is None:
            return Check("nftables", "pass", "found", {"path": nft})
        probe = [unshare, "--user", "--map-root-user", "--net", nft, "list", "tables"]
    rc, out = h.run(probe)
    if rc != 0:
        return Check("nftables", "fail", "broken", {"path": nft, "error": _error_line(rc, out)})
    rc, out = h.run([nft, "--version"])
    return Check("nftables", "pass", "ok", {"path": nft,
                                            "version": _first_line(out) if rc == 0 else "nft"})


# ---- disk --------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(name: str, path: Path,
               usage: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free) -> Check:
    base = _existing_ancestor(path)
    facts: dict[str, Fact] = {"path": str(path)}
    if not os.access(base, os.W_OK | os.X_OK):
        return Check(name, "fail", "not-writable", {**facts, "base": str(base),
                                                    "uid": os.getuid()})
    free = usage(base)
    facts["free"] = free
    if free < DISK_FAIL_BYTES:
        return Check(name, "fail", "full", facts)
    if free < DISK_WARN_BYTES:
        return Check(name, "warn", "low", facts)
    return Check(name, "pass", "ok", facts)


# ---- all ---------------------------------------------------------------------------------


def run_checks(h: Host | None = None) -> list[Check]:
    """Every check, in a fixed order."""
    h = h or Host()
    qemu, qemu_path = check_qemu(h)
    checks = [qemu]
    if qemu_path is not None:
        checks.append(check_machine(h, qemu_path))
    checks += [
        check_accelerator(h),
        check_guest_runtime(h),
        check_kernel(h),
        check_tool(h, "mke2fs", "mke2fs", "e2fsprogs"),
        check_busybox(h),
        check_builder(h),
        check_tun(h),
        check_userns(h),
        check_nftables(h),
    ]
    if h.euid == 0:  # the unprivileged path needs no `ip`
        checks.append(check_tool(h, "iproute2", "ip", "iproute2"))
    checks += [check_disk("disk-state", state_dir()), check_disk("disk-cache", cache_dir())]
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)
