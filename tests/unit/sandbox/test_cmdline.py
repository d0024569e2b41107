"""The kernel arguments every VM gets: the APIC bus rate goes only to kernels that take it."""

from __future__ import annotations

from pathlib import Path

from matchlock.sandbox._launch import QEMU_APIC_BUS_KHZ, base_cmdline
from matchlock.vm.kernel import Kernel
from matchlock.vm.kernel_build import APIC_BUS_PATCH

PATCHED = Kernel("6.1-matchlock", Path("/k"), None, name="matchlock-x", kind="matchlock",
                 patches=(APIC_BUS_PATCH,))
OLD_BUILD = Kernel("6.1-matchlock", Path("/k"), None, name="matchlock-y", kind="matchlock")
DEBIAN = Kernel("6.1.0-57-cloud-amd64", Path("/k"), Path("/m"), name="debian", kind="debian")

ARG = f"lapic_bus_khz={QEMU_APIC_BUS_KHZ}"


def test_tcg_and_a_patched_build_get_the_apic_rate():
    args = base_cmdline("tcg", 2_400_000, PATCHED)
    assert ARG in args and "tsc_early_khz=2400000" in args


def test_kernels_without_the_patch_calibrate_as_before():
    # An unknown parameter would reach init's environment: never give it to them.
    for k in (OLD_BUILD, DEBIAN, None):
        assert not [a for a in base_cmdline("tcg", 2_400_000, k) if a.startswith("lapic_")]


def test_kvm_measures_its_own_timer():
    assert not [a for a in base_cmdline("kvm", 2_400_000, PATCHED) if a.startswith("lapic_")]
