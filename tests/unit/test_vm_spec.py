import os

import pytest

from matchlock.errors import UsageError
from matchlock.vm.accel import detect_accel
from matchlock.vm.qemu import build_argv
from matchlock.vm.spec import Disk, VmSpec, vcpus_for


def _spec(tmp_path, **kw):
    base = dict(kernel=tmp_path / "k", initrd=tmp_path / "i", memory_mib=256, vcpus=1,
                accel="tcg", machine="microvm", log_path=tmp_path / "log",
                disks=(Disk(tmp_path / "root", "ml-root", True),), cmdline=("quiet",))
    base.update(kw)
    return VmSpec(**base)


def test_vcpus():
    assert vcpus_for(1) == 1
    assert vcpus_for(0.5) == 1
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UsageError):
            vcpus_for(bad)
    with pytest.raises(UsageError, match="host has only"):
        vcpus_for((os.cpu_count() or 1) + 1)


def test_spec_validation(tmp_path):
    with pytest.raises(UsageError, match="memory_mib"):
        _spec(tmp_path, memory_mib=0)
    with pytest.raises(UsageError, match="machine"):
        _spec(tmp_path, machine="pc")


def test_argv_microvm(tmp_path):
    argv = build_argv(_spec(tmp_path), "qemu", 7)
    joined = " ".join(argv)
    assert "-M microvm,acpi=on" in joined
    assert "virtio-blk-device,drive=d0,serial=ml-root" in joined
    assert "readonly=on" in joined
    assert "socket,id=ctl,fd=7" in joined
    assert "name=matchlock.ctl" in joined
    assert "virtio-rng-device,rng=rng0" in joined  # entropy at boot, no RDRAND under TCG
    assert argv[argv.index("-append") + 1] == "quiet"


def test_argv_q35_uses_pci(tmp_path):
    joined = " ".join(build_argv(_spec(tmp_path, machine="q35"), "qemu", 7))
    assert "virtio-blk-pci" in joined and "virtio-serial-pci" in joined
    assert "virtio-rng-pci" in joined


def test_accel_override(monkeypatch):
    monkeypatch.setenv("MATCHLOCK_ACCEL", "tcg")
    assert detect_accel() == ("tcg", None)
    with pytest.raises(UsageError, match="unknown accelerator"):
        detect_accel("xen")


def test_accel_auto_needs_virt_flags(monkeypatch):
    monkeypatch.delenv("MATCHLOCK_ACCEL", raising=False)
    import matchlock.vm.accel as accel

    monkeypatch.setattr(accel, "_cpu_has_virt_flags", lambda: False)
    name, warning = detect_accel()
    assert name == "tcg" and "TCG" in warning


def test_qemu_runs_under_its_seccomp_sandbox(tmp_path):
    argv = build_argv(_spec(tmp_path), "qemu", 7)
    sandbox = argv[argv.index("-sandbox") + 1]
    assert sandbox.startswith("on,") and "spawn=deny" in sandbox
    assert "elevateprivileges=deny" in sandbox


def test_tcg_translation_buffer_is_capped(tmp_path, monkeypatch):
    from matchlock.errors import ConfigError
    from matchlock.vm.qemu import TCG_TB_MIB

    spec = _spec(tmp_path)
    monkeypatch.delenv("MATCHLOCK_TCG_TB_MIB", raising=False)
    argv = build_argv(spec, "qemu", 3)
    assert argv[argv.index("-accel") + 1] == f"tcg,tb-size={TCG_TB_MIB}"
    monkeypatch.setenv("MATCHLOCK_TCG_TB_MIB", "256")
    argv = build_argv(spec, "qemu", 3)
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=256"
    monkeypatch.setenv("MATCHLOCK_TCG_TB_MIB", "0")
    with pytest.raises(ConfigError, match="MATCHLOCK_TCG_TB_MIB"):
        build_argv(spec, "qemu", 3)


def test_qmp_socket_only_when_profiling(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    monkeypatch.delenv("MATCHLOCK_QEMU_QMP", raising=False)
    assert "-qmp" not in build_argv(spec, "qemu", 3)
    monkeypatch.setenv("MATCHLOCK_QEMU_QMP", str(tmp_path / "q.sock"))
    argv = build_argv(spec, "qemu", 3)
    assert argv[argv.index("-qmp") + 1] == f"unix:{tmp_path / 'q.sock'},server=on,wait=off"
