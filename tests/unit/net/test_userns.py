"""Detection for unprivileged networking: what is missing, and the one-line error."""

from __future__ import annotations

import os

import pytest

from matchlock.errors import DependencyError, VmStartError
from matchlock.net import _userns, netns

PREFIX = "networking needs root or unprivileged user namespaces: "
SUFFIX = "; run as root, or use --no-network"


@pytest.fixture
def host(tmp_path):
    """A fake /proc/sys and /dev/net/tun where everything needed is there."""
    proc = tmp_path / "proc"
    for knob, value in (("kernel/unprivileged_userns_clone", "1"),
                        ("user/max_user_namespaces", "63000"),
                        ("user/max_net_namespaces", "63000"),
                        ("kernel/apparmor_restrict_unprivileged_userns", "0")):
        (proc / "sys" / knob).parent.mkdir(parents=True, exist_ok=True)
        (proc / "sys" / knob).write_text(value + "\n")
    tun = tmp_path / "tun"
    tun.write_text("")
    tun.chmod(0o666)
    return proc, tun


def _set(proc, knob, value):
    (proc / "sys" / knob).write_text(value + "\n")


def test_nothing_missing(host):
    proc, tun = host
    assert _userns.missing_requirements(proc, tun, "/usr/sbin/nft") == []


def test_knobs_absent_mean_allowed(tmp_path, host):
    _, tun = host
    # Kernels without the Debian knob or AppArmor allow user namespaces by default.
    assert _userns.missing_requirements(tmp_path / "empty", tun, "nft") == []


@pytest.mark.parametrize(("knob", "value", "named"), [
    ("kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone=0"),
    ("user/max_user_namespaces", "0", "user.max_user_namespaces=0"),
    ("user/max_net_namespaces", "0", "user.max_net_namespaces=0"),
    ("kernel/apparmor_restrict_unprivileged_userns", "1",
     "kernel.apparmor_restrict_unprivileged_userns=1"),
])
def test_each_knob_is_named(host, knob, value, named):
    proc, tun = host
    _set(proc, knob, value)
    assert _userns.missing_requirements(proc, tun, "nft") == [named]


def test_tun_missing(host, tmp_path):
    proc, _ = host
    missing = _userns.missing_requirements(proc, tmp_path / "nope", "nft")
    assert missing == [f"{tmp_path / 'nope'} does not exist (modprobe tun)"]


def test_tun_not_accessible(host, monkeypatch):
    proc, tun = host
    tun.chmod(0o600)
    # The tests run as root, for whom os.access is always true.
    monkeypatch.setattr(_userns.os, "access", lambda p, m: False)
    assert _userns.missing_requirements(proc, tun, "nft") == [
        f"{tun} is not read-write for uid {os.getuid()} (mode 0600, owner uid {os.getuid()})"]


def test_several_missing_all_named(host):
    proc, tun = host
    _set(proc, "kernel/unprivileged_userns_clone", "0")
    assert _userns.missing_requirements(proc, tun, None) == [
        "kernel.unprivileged_userns_clone=0", "nft not found (install nftables)"]


def test_error_is_one_line():
    e = _userns.requirement_error(["kernel.unprivileged_userns_clone=0", "x"])
    assert isinstance(e, DependencyError)
    assert str(e) == PREFIX + "kernel.unprivileged_userns_clone=0, x" + SUFFIX
    assert "\n" not in str(e)


def test_check_requirements_unprivileged_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(_userns, "missing_requirements",
                        lambda **kw: ["user.max_user_namespaces=0"])
    with pytest.raises(DependencyError) as ei:
        netns.check_requirements()
    assert str(ei.value) == PREFIX + "user.max_user_namespaces=0" + SUFFIX


def test_check_requirements_unprivileged_ok(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "_find_tool", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(_userns, "missing_requirements", lambda **kw: [])
    assert netns.check_requirements() == ("/usr/sbin/ip", "/usr/sbin/nft")


def test_root_never_looks_at_user_namespaces(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)

    def boom(**kw):
        raise AssertionError("root path consulted the userns checks")

    monkeypatch.setattr(_userns, "missing_requirements", boom)
    monkeypatch.setattr(netns, "_find_tool", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(netns.os.path, "exists", lambda p: True)
    assert netns.check_requirements() == ("/usr/sbin/ip", "/usr/sbin/nft")


def test_kernel_refusal_is_reported_as_missing_user_namespaces():
    e = _userns._helper_failure(
        {"ok": False, "stage": "userns", "error": "[Errno 1] unshare: Operation not permitted"},
        None)  # type: ignore[arg-type]
    assert str(e) == (PREFIX + "cannot create a user namespace "
                      "([Errno 1] unshare: Operation not permitted)" + SUFFIX)


def test_setup_failure_inside_is_a_start_error():
    e = _userns._helper_failure({"ok": False, "stage": "setup", "kind": "VmStartError",
                                 "error": "cannot apply the VM's nftables rules: x"}, None)  # type: ignore[arg-type]
    assert isinstance(e, VmStartError) and "nftables" in str(e)
