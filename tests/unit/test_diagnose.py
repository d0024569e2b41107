"""`matchlock diagnose`: each check's logic against fake hosts, the wording of every outcome,
and the real command on this machine (its verdicts checked against facts read here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from matchlock import diagnose as d
from matchlock.cli._diagnose import WORDS, words
from matchlock.vm import accel


@pytest.fixture(autouse=True)
def _prefer_our_build(monkeypatch):
    """The default resolution: our build preferred (test_kernel.py::
    test_default_kernel_debian_opts_out covers MATCHLOCK_DEFAULT_KERNEL=debian)."""
    monkeypatch.delenv("MATCHLOCK_DEFAULT_KERNEL", raising=False)



@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A host where everything is present and fine; tests break one thing each."""
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MATCHLOCK_HOME", str(tmp_path / "home"))
    proc = tmp_path / "proc"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "cpuinfo").write_text("processor : 0\nflags : fpu vme vmx sse\n")
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    tun = tmp_path / "tun"
    tun.write_text("")
    tools = {t: f"/usr/bin/{t}" for t in ("qemu-system-x86_64", "qemu-system-aarch64", "nft",
                                          "ip", "mke2fs", "unshare", "musl-gcc", "apt-get",
                                          "apt-cache")}
    outputs: dict[str, tuple[int, str]] = {
        "--version": (0, "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\nCopyright\n"),
        "-machine": (0, "Supported machines are:\nmicrovm              microvm (i386)\n"),
        "list": (0, ""),
        "true": (0, ""),
    }

    class Fake:
        calls: list[list[str]] = []

        def host(self, **kw) -> d.Host:
            def run(argv):
                self.calls.append(argv)
                if argv[0].endswith("nft") and argv[1] == "--version":
                    return 0, "nftables v1.0.6 (Lester Gooch #5)\n"
                return next((v for k, v in outputs.items() if k in argv), (0, ""))

            args = {"proc": proc, "dev_kvm": str(kvm), "dev_tun": tun, "euid": 0,
                    "which": tools.get, "run": run, "env": {}}
            args.update(kw)
            return d.Host(**args)

    f = Fake()
    f.proc, f.kvm, f.tun, f.tools, f.outputs = proc, kvm, tun, tools, outputs
    return f


def by_name(checks):
    return {c.name: c for c in checks}


def test_accelerator_kvm_when_device_and_cpu_flags(fake):
    assert d.check_accelerator(fake.host()) == d.Check("accelerator", "pass", "kvm",
                                                       {"device": str(fake.kvm)})


def test_accelerator_explains_a_kvm_device_without_vmx(fake):
    (fake.proc / "cpuinfo").write_text("flags : fpu vme sse hypervisor\n")
    c = d.check_accelerator(fake.host())
    assert (c.status, c.reason) == ("warn", "no-virt-flags")
    message, fix = words(c)
    assert "CPU advertises no vmx/svm" in message and str(fake.kvm) in message
    assert "nested virtualisation" in fix


def test_accelerator_no_device_and_no_access(fake, monkeypatch):
    fake.kvm.unlink()
    assert d.check_accelerator(fake.host()).reason == "no-device"
    fake.kvm.write_text("")
    monkeypatch.setattr(accel.os, "access", lambda p, m: p != str(fake.kvm))
    c = d.check_accelerator(fake.host())
    assert (c.status, c.reason) == ("warn", "no-access")
    assert "kvm group" in words(c)[1]


def test_accelerator_forced(fake):
    (fake.proc / "cpuinfo").write_text("flags : sse\n")
    assert d.check_accelerator(fake.host(env={"MATCHLOCK_ACCEL": "tcg"})).status == "pass"
    c = d.check_accelerator(fake.host(env={"MATCHLOCK_ACCEL": "kvm"}))
    assert (c.status, c.reason) == ("fail", "forced-kvm-unusable")
    assert words(c)[0] == "MATCHLOCK_ACCEL=kvm but KVM is not usable (no-virt-flags)"
    assert d.check_accelerator(fake.host(env={"MATCHLOCK_ACCEL": "xen"})).status == "fail"


def test_qemu_found_missing_broken_and_override(fake, tmp_path):
    c, path = d.check_qemu(fake.host())
    assert c.status == "pass" and c.facts["version"] == "7.2.22" and path
    c, path = d.check_qemu(fake.host(which=lambda t: None))
    assert (c.status, c.reason, path) == ("fail", "missing", None)
    assert words(c)[1].startswith("apt-get install qemu-system-")
    fake.outputs["--version"] = (1, "error while loading shared libraries: libfoo.so\n")
    c, _ = d.check_qemu(fake.host())
    assert (c.status, c.reason) == ("fail", "broken")
    assert "libfoo.so" in words(c)[0]
    c, _ = d.check_qemu(fake.host(env={"MATCHLOCK_QEMU": str(tmp_path / "nope")}))
    assert (c.status, c.reason) == ("fail", "env-missing")


def test_machine_without_microvm_warns(fake):
    assert d.check_machine(fake.host(), "/usr/bin/q").reason in ("microvm", "virt")
    fake.outputs["-machine"] = (0, "Supported machines are:\nq35   Standard PC\n")
    if os.uname().machine == "x86_64":
        c = d.check_machine(fake.host(), "/usr/bin/q")
        assert (c.status, c.reason) == ("warn", "no-microvm")


def test_kernel_outcomes(fake, monkeypatch, tmp_path):
    from matchlock.vm import kernel

    monkeypatch.setattr(kernel, "cached_kernel", lambda: None)
    monkeypatch.setattr(kernel, "best_built", lambda: None)
    c = d.check_kernel(fake.host())
    assert (c.status, c.reason) == ("warn", "not-cached")
    assert "apt-get download" in words(c)[0]
    assert "matchlock kernel build" in words(c)[1]
    c = d.check_kernel(fake.host(which=lambda t: None))
    assert (c.status, c.reason) == ("fail", "no-apt")
    assert words(c)[0].startswith("none built, and apt-get, apt-cache missing")
    # The Debian kernel cached, none built: VMs work, slower; the fix names the build.
    deb = kernel.Kernel("6.1.0-1-cloud-amd64", tmp_path / "deb" / "vmlinux", None,
                        name="6.1.0-1-cloud-amd64", kind="debian")
    monkeypatch.setattr(kernel, "cached_kernel", lambda: deb)
    c = d.check_kernel(fake.host())
    assert (c.status, c.reason) == ("warn", "debian")
    assert "6.1.0-1-cloud-amd64" in words(c)[0] and "matchlock kernel build" in words(c)[1]
    # Our build: passes, or warns when it is of an older config.
    ours = kernel.Kernel("6.1.192-matchlock", tmp_path / "m" / "vmlinux", None,
                         name="matchlock-6.1.192-3-abc", kind="matchlock")
    monkeypatch.setattr(kernel, "best_built", lambda: ours)
    monkeypatch.setattr(kernel, "built_is_current", lambda k: True)
    c = d.check_kernel(fake.host())
    assert (c.status, c.reason) == ("pass", "built")
    assert "matchlock-6.1.192-3-abc" in words(c)[0]
    monkeypatch.setattr(kernel, "built_is_current", lambda k: False)
    c = d.check_kernel(fake.host())
    assert (c.status, c.reason) == ("warn", "built-old") and words(c)[1] == "matchlock kernel build"
    monkeypatch.setattr(kernel, "best_built", lambda: None)
    monkeypatch.setattr(kernel, "cached_kernel", lambda: None)
    c = d.check_kernel(fake.host(env={"MATCHLOCK_KERNEL": str(tmp_path / "none")}))
    assert (c.status, c.reason) == ("fail", "env-missing")
    img = tmp_path / "bzImage"
    img.write_bytes(b"\0" * 1024)
    c = d.check_kernel(fake.host(env={"MATCHLOCK_KERNEL": str(img)}))
    assert (c.status, c.reason) == ("pass", "env")


def test_guest_runtime_needs_musl_when_built_from_source(fake, monkeypatch):
    from matchlock import guest

    monkeypatch.delenv("MATCHLOCK_GUEST", raising=False)
    monkeypatch.setattr(guest, "locate", lambda: ("source", Path("/src/guest")))
    assert d.check_guest_runtime(fake.host()).status == "pass"
    c = d.check_guest_runtime(fake.host(which=lambda t: None))
    assert (c.status, c.reason) == ("fail", "no-musl")
    assert words(c)[1] == "apt-get install musl-tools"


def test_tun_and_user_namespaces_for_a_non_root_user(fake, monkeypatch):
    assert d.check_tun(fake.host(euid=1000)).status == "pass"
    monkeypatch.setattr(d.os, "access", lambda p, m: Path(p) != fake.tun)
    c = d.check_tun(fake.host(euid=1000))
    assert (c.status, c.reason) == ("fail", "no-access")
    assert d.check_tun(fake.host(euid=0)).status == "pass"  # root opens it anyway
    fake.tun.unlink()
    assert d.check_tun(fake.host()).reason == "missing"

    assert d.check_userns(fake.host(euid=0)).reason == "root"
    assert d.check_userns(fake.host(euid=1000)).reason == "ok"
    (fake.proc / "sys/kernel/unprivileged_userns_clone").write_text("0\n")
    c = d.check_userns(fake.host(euid=1000))
    assert (c.status, c.reason) == ("fail", "disabled")
    assert words(c)[0] == "disabled: kernel.unprivileged_userns_clone=0"


def test_nftables_probe_runs_in_a_user_namespace_when_not_root(fake):
    fake.calls.clear()
    assert d.check_nftables(fake.host(euid=1000)).status == "pass"
    assert fake.calls[0][:4] == ["/usr/bin/unshare", "--user", "--map-root-user", "--net"]
    fake.calls.clear()
    assert d.check_nftables(fake.host(euid=0)).facts["version"].startswith("nftables v1")
    assert fake.calls[0] == ["/usr/bin/nft", "list", "tables"]
    fake.outputs["list"] = (1, "Error: Could not process rule: Operation not supported\n")
    c = d.check_nftables(fake.host())
    assert (c.status, c.reason) == ("fail", "broken")
    assert "Operation not supported" in words(c)[0] and "nf_tables" in words(c)[1]
    c = d.check_nftables(fake.host(which=lambda t: None))
    assert (c.status, c.reason) == ("fail", "missing")


def test_disk_thresholds(tmp_path, monkeypatch):
    target = tmp_path / "not" / "yet"  # measured at the nearest existing ancestor
    assert d.check_disk("disk-cache", target, lambda p: 100 << 30).status == "pass"
    c = d.check_disk("disk-cache", target, lambda p: 1 << 30)
    assert (c.status, c.reason) == ("warn", "low")
    assert words(c)[0] == f"only 1.0 GiB free at {target} (kernels and images)"
    c = d.check_disk("disk-state", target, lambda p: 10 << 20)
    assert (c.status, c.reason) == ("fail", "full")
    assert "MATCHLOCK_HOME" in words(c)[1]
    monkeypatch.setattr(d.os, "access", lambda p, m: False)
    c = d.check_disk("disk-state", target, lambda p: 100 << 30)
    assert (c.status, c.reason) == ("fail", "not-writable")
    assert str(tmp_path) in words(c)[0]


def test_every_outcome_has_words(fake, monkeypatch, tmp_path):
    """Drive each check into each outcome it has; none may fall back to a bare code."""
    from matchlock import guest
    from matchlock.vm import kernel

    produced = []
    (fake.proc / "cpuinfo").write_text("flags : sse\n")
    produced += [d.check_accelerator(fake.host(env=e)) for e in
                 ({}, {"MATCHLOCK_ACCEL": "kvm"}, {"MATCHLOCK_ACCEL": "tcg"},
                  {"MATCHLOCK_ACCEL": "xen"})]
    produced += [d.check_qemu(fake.host(**kw))[0] for kw in
                 ({}, {"which": lambda t: None}, {"env": {"MATCHLOCK_QEMU": "/nope"}})]
    produced.append(d.check_machine(fake.host(), "/q"))
    monkeypatch.setattr(kernel, "cached_kernel", lambda: None)
    monkeypatch.setattr(kernel, "best_built", lambda: None)
    produced += [d.check_kernel(fake.host(**kw)) for kw in
                 ({}, {"which": lambda t: None}, {"env": {"MATCHLOCK_KERNEL": "/none"}})]
    for where in ("source", "packaged", "env", "missing"):
        monkeypatch.setattr(guest, "locate", lambda w=where: (w, Path("/x")))
        produced += [d.check_guest_runtime(fake.host(**kw)) for kw in
                     ({}, {"which": lambda t: None})]
    for which in (fake.tools.get, lambda t: None):
        produced += [d.check_tool(fake.host(which=which), "mke2fs", "mke2fs", "e2fsprogs"),
                     d.check_tool(fake.host(which=which), "iproute2", "ip", "iproute2"),
                     d.check_nftables(fake.host(which=which, euid=1000)),
                     d.check_userns(fake.host(which=which, euid=1000))]
    produced += [d.check_busybox(fake.host()), d.check_tun(fake.host()),
                 d.check_userns(fake.host())]
    for name in ("disk-state", "disk-cache"):
        produced += [d.check_disk(name, tmp_path, lambda p, n=n: n)
                     for n in (10, 1 << 30, 100 << 30)]
    fake.outputs["list"] = (1, "Error: x")
    produced.append(d.check_nftables(fake.host()))
    fake.outputs["true"] = (1, "unshare: unshare failed: Operation not permitted")
    produced.append(d.check_userns(fake.host(euid=1000)))
    (fake.proc / "sys/kernel/unprivileged_userns_clone").write_text("0\n")
    produced.append(d.check_userns(fake.host(euid=1000)))
    fake.tun.unlink()
    produced.append(d.check_tun(fake.host()))

    keys = {(c.name, c.reason) for c in produced}
    assert len(keys) >= 35  # most of WORDS is reached
    for c in produced:
        assert (c.name, c.reason) in WORDS, (c.name, c.reason)
        message, fix = words(c)  # formats with the facts it has
        assert message
        if c.status != "pass":
            assert fix or (c.name, c.reason) == ("accelerator", "not-linux"), c


def test_a_bare_host_fails(fake):
    checks = d.run_checks(fake.host(which=lambda t: None, dev_tun=Path("/nonexistent/tun")))
    assert d.failed(checks)
    assert {"qemu", "tun-device", "nftables"} <= {c.name for c in checks
                                                  if c.status == "fail"}


# ---- the real command on this machine ------------------------------------------------------


def ml(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matchlock", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _cpu_virt() -> bool:
    text = Path("/proc/cpuinfo").read_text()
    return any(f in line.split() for line in text.splitlines() if line.startswith("flags")
               for f in ("vmx", "svm"))


def test_diagnose_json_on_this_host():
    p = ml("diagnose", "--json")
    assert p.stdout.count("\n") == 1  # one line
    out = json.loads(p.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert set(checks["qemu"]) == {"name", "status", "message", "fix"}
    ok = all(c["status"] != "fail" for c in out["checks"])
    assert out["ok"] is ok and p.returncode == (0 if ok else 1)
    acc = checks["accelerator"]
    if os.environ.get("MATCHLOCK_ACCEL"):
        assert "MATCHLOCK_ACCEL" in acc["message"]
    elif os.path.exists("/dev/kvm") and not _cpu_virt():  # this team's machines
        assert acc["status"] == "warn"
        assert "/dev/kvm exists but the CPU advertises no vmx/svm" in acc["message"]
        assert acc["fix"]
    elif not os.path.exists("/dev/kvm"):
        assert acc["status"] == "warn" and "does not exist" in acc["message"]
    for c in out["checks"]:
        assert (c["fix"] == "") == (c["status"] == "pass"), c


def test_diagnose_text_and_exit_status_when_a_required_check_fails(tmp_path):
    p = ml("diagnose", env={"MATCHLOCK_QEMU": str(tmp_path / "no-qemu")})
    assert p.returncode == 1
    assert p.stderr == "error: diagnose failed: one or more checks failed\n"
    lines = p.stdout.splitlines()
    i = lines.index(f"✗ qemu: MATCHLOCK_QEMU={tmp_path / 'no-qemu'} is not an executable")
    assert lines[i + 1] == "  fix: point MATCHLOCK_QEMU at a QEMU binary, or unset it"
    assert all(ln[0] in "✓⚠✗" or ln.startswith("  fix: ") for ln in lines)
