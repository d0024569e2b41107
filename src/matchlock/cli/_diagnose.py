"""`matchlock diagnose [--json]`: the host checks of matchlock.diagnose, in words."""

from __future__ import annotations

import json

import click

from matchlock.diagnose import Check, failed, run_checks
from matchlock.errors import MatchlockError

TCG = "TCG software emulation (VMs work, several times slower)"
NESTED_FIX = ("run on a host with hardware virtualisation (VT-x/AMD-V enabled in the "
              "firmware), or enable nested virtualisation for this VM")

# (check name, reason) -> (message, fix). Both are str.format()ed with the check's facts;
# a fix is shown only when the check did not pass.
WORDS: dict[tuple[str, str], tuple[str, str]] = {
    ("qemu", "ok"): ("QEMU {version} ({path})", ""),
    ("qemu", "missing"): ("{binary} not found", "apt-get install {package}"),
    ("qemu", "env-missing"): ("MATCHLOCK_QEMU={path} is not an executable",
                              "point MATCHLOCK_QEMU at a QEMU binary, or unset it"),
    ("qemu", "broken"): ("{path} --version failed: {error}",
                         "reinstall QEMU: apt-get install --reinstall {package}"),
    ("machine", "microvm"): ("microvm machine type available (fastest boot)", ""),
    ("machine", "virt"): ("virt machine type", ""),
    ("machine", "no-microvm"): ("QEMU has no microvm machine type: VMs use q35, which "
                                "boots about 0.5 s slower",
                                "install a QEMU with microvm (4.2 or later)"),
    ("accelerator", "kvm"): ("KVM (hardware virtualisation via {device})", ""),
    ("accelerator", "hvf"): ("HVF (macOS Hypervisor.framework)", ""),
    ("accelerator", "forced"): ("{accel} (set by MATCHLOCK_ACCEL)", ""),
    ("accelerator", "forced-unknown"): ("MATCHLOCK_ACCEL={accel} is not an accelerator",
                                        "set MATCHLOCK_ACCEL to auto, kvm, hvf or tcg"),
    ("accelerator", "forced-kvm-unusable"): (
        "MATCHLOCK_ACCEL=kvm but KVM is not usable ({why})",
        "unset MATCHLOCK_ACCEL to fall back to TCG, or fix KVM"),
    ("accelerator", "no-device"): (
        TCG + ": {device} does not exist",
        "enable VT-x/AMD-V in the firmware and load the kvm module "
        "(modprobe kvm_intel or kvm_amd), or " + NESTED_FIX),
    ("accelerator", "no-access"): (
        TCG + ": {device} is not read-write for uid {uid}",
        "add the user to the kvm group (usermod -aG kvm USER) and log in again"),
    ("accelerator", "no-virt-flags"): (
        TCG + ": {device} exists but the CPU advertises no vmx/svm, so it offers no "
        "hardware virtualisation (e.g. a paravirtual device) and unmodified guest kernels "
        "would crash or crawl on it",
        NESTED_FIX),
    ("accelerator", "not-linux"): (TCG + ": KVM exists only on Linux", ""),
    ("guest-runtime", "source"): ("built from {path} with {cc} on first use", ""),
    ("guest-runtime", "packaged"): ("packaged ({path})", ""),
    ("guest-runtime", "env"): ("MATCHLOCK_GUEST={path}", ""),
    ("guest-runtime", "env-missing"): ("MATCHLOCK_GUEST={path} does not exist",
                                       "point MATCHLOCK_GUEST at a matchlock-guest binary, "
                                       "or unset it"),
    ("guest-runtime", "no-musl"): ("must be built from {path}, but musl-gcc is missing",
                                   "apt-get install musl-tools"),
    ("guest-runtime", "missing"): ("matchlock-guest is missing from the installed package",
                                   "reinstall matchlock (pip install .)"),
    ("kernel", "built"): ("{name}, matchlock's own ({path})", ""),
    ("kernel", "built-old"): ("{name}, matchlock's own, built from an older config ({path})",
                              "matchlock kernel build"),
    ("kernel", "debian"): ("Debian cloud kernel {version} (cached in {path}); matchlock's own "
                           "kernel boots about twice as fast", "{build}"),
    ("kernel", "debian-default"): ("Debian cloud kernel {version} (cached in {path}), "
                                   "chosen by MATCHLOCK_DEFAULT_KERNEL=debian", ""),
    ("kernel", "env"): ("{version} ({path}, from MATCHLOCK_KERNEL)", ""),
    ("kernel", "env-missing"): ("{error}", "fix MATCHLOCK_KERNEL, or unset it"),
    ("kernel", "env-debian-not-cached"): (
        "MATCHLOCK_KERNEL=debian: not cached yet, the first VM fetches it", ""),
    ("kernel", "not-cached"): (
        "none built or cached yet: the first VM fetches {package} (about 30 MB) with "
        "apt-get download",
        "{build} (boots about twice as fast; otherwise nothing to do while the Debian "
        "archive is reachable)"),
    ("kernel", "no-apt"): ("none built, and {tools} missing to fetch {package}",
                           "{build}, or pass --kernel PATH (or set MATCHLOCK_KERNEL)"),
    ("kernel", "no-debian-kernel"): ("none built, and no Debian cloud kernel for "
                                     "architecture {arch}",
                                     "{build}, or pass --kernel PATH (or set MATCHLOCK_KERNEL)"),
    ("mke2fs", "ok"): ("{path}", ""),
    ("mke2fs", "missing"): ("mke2fs not found (it makes each VM's writable disk)",
                            "apt-get install {package}"),
    ("iproute2", "ok"): ("{path}", ""),
    ("iproute2", "missing"): ("ip not found (it builds each VM's network namespace)",
                              "apt-get install {package}"),
    ("busybox", "ok"): ("{path} (for the built-in matchlock/busybox image)", ""),
    ("busybox", "missing"): ("{error}",
                             "apt-get install busybox-static (only the built-in image "
                             "needs it)"),
    ("builder-image", "stored"): ("{name} ({size} MB: Buildah for `matchlock build`)", ""),
    ("builder-image", "not-made"): ("not made yet: the first `matchlock build` makes {name} "
                                    "with mmdebstrap ({packages}; a few minutes, once)", ""),
    ("builder-image", "no-mmdebstrap"): ("not made yet, and mmdebstrap is missing to make it "
                                         "(only `matchlock build` needs it)",
                                         "apt-get install mmdebstrap"),
    ("builder-image", "unreadable"): ("cannot read the image store: {error}",
                                      "check MATCHLOCK_CACHE_DIR / MATCHLOCK_IMAGES_DIR"),
    ("tun-device", "ok"): ("{path} is usable", ""),
    ("tun-device", "missing"): ("{path} does not exist",
                                "modprobe tun; VMs with --no-network need no TUN"),
    ("tun-device", "no-access"): ("{path} is not read-write for uid {uid} (mode {mode})",
                                  "run as root, or chmod 0666 {path}; VMs with --no-network "
                                  "need no TUN"),
    ("user-namespaces", "root"): ("not needed (running as root)", ""),
    ("user-namespaces", "ok"): ("unprivileged user and network namespaces work", ""),
    ("user-namespaces", "knobs-ok"): ("enabled (unshare not found to try one)", ""),
    ("user-namespaces", "disabled"): ("disabled: {knobs}",
                                      "run as root, or allow them, e.g. sysctl -w "
                                      "kernel.unprivileged_userns_clone=1 "
                                      "(or use --no-network)"),
    ("user-namespaces", "failed"): ("cannot create one: {error}",
                                    "run as root, or allow unprivileged user namespaces "
                                    "(or use --no-network)"),
    ("nftables", "ok"): ("{version} ({path})", ""),
    ("nftables", "found"): ("{path} (not tried: unshare not found)", ""),
    ("nftables", "missing"): ("nft not found (it seals each VM's network)",
                              "apt-get install {package}"),
    ("nftables", "broken"): ("{path} cannot list tables: {error}",
                             "load the nf_tables module (modprobe nf_tables)"),
    ("disk-state", "ok"): ("{free} free at {path}", ""),
    ("disk-cache", "ok"): ("{free} free at {path}", ""),
}
for _name, _var, _what in (("disk-state", "MATCHLOCK_HOME", "VM state"),
                           ("disk-cache", "MATCHLOCK_CACHE_DIR", "kernels and images")):
    WORDS[(_name, "low")] = (f"only {{free}} free at {{path}} ({_what})",
                             f"free some space, or point {_var} at a bigger disk")
    WORDS[(_name, "full")] = (f"only {{free}} free at {{path}}: too little for {_what}",
                              f"free some space, or point {_var} at a bigger disk")
    WORDS[(_name, "not-writable")] = (f"{{base}} is not writable for uid {{uid}} ({_what} go "
                                      "to {path})",
                                      f"fix its permissions, or point {_var} elsewhere")

MARKS = {"pass": "✓", "warn": "⚠", "fail": "✗"}


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def words(check: Check) -> tuple[str, str]:
    """(message, fix) for one check; the fix is "" when the check passed."""
    message, fix = WORDS.get((check.name, check.reason), (check.reason, ""))
    facts = {k: _human(v) if k == "free" and isinstance(v, int) else v
             for k, v in check.facts.items()}
    return message.format(**facts), (fix.format(**facts) if check.status != "pass" else "")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
def diagnose(as_json: bool) -> None:
    """Check that this host can run VMs, and say how to fix what cannot."""
    checks = run_checks()
    if as_json:
        out = []
        for c in checks:
            message, fix = words(c)
            out.append({"name": c.name, "status": c.status, "message": message, "fix": fix})
        click.echo(json.dumps({"ok": not failed(checks), "checks": out}, ensure_ascii=False))
    else:
        for c in checks:
            message, fix = words(c)
            click.echo(f"{MARKS[c.status]} {c.name}: {message}")
            if fix:
                click.echo(f"  fix: {fix}")
    if failed(checks):
        raise MatchlockError("diagnose failed: one or more checks failed")
