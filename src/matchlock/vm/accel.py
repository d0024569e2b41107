"""Pick the QEMU accelerator: KVM only when it can really work, else TCG (with a warning)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

from matchlock._log import get_logger
from matchlock.errors import UsageError

log = get_logger(__name__)

ACCELS = ("kvm", "hvf", "tcg")


def host_machine() -> str:
    """`platform.machine()`, without importing platform (~1.5 ms before QEMU's spawn)."""
    return os.uname().machine


def _cpu_has_virt_flags(cpuinfo: str = "/proc/cpuinfo") -> bool:
    # /dev/kvm can exist without hardware virtualisation (e.g. a PVM device on our CI
    # hosts): unmodified kernels crash or crawl there, so also require vmx/svm.
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


KvmReason = Literal["ok", "not-linux", "no-device", "no-access", "no-virt-flags"]


@dataclass(frozen=True, slots=True)
class KvmStatus:
    """Whether KVM can run our VMs, and if not the first reason why not."""

    reason: KvmReason
    device: str = "/dev/kvm"

    @property
    def usable(self) -> bool:
        return self.reason == "ok"


def kvm_status(device: str = "/dev/kvm", cpuinfo: str | None = None) -> KvmStatus:
    if not sys.platform.startswith("linux"):
        return KvmStatus("not-linux", device)
    if not os.path.exists(device):
        return KvmStatus("no-device", device)
    if not os.access(device, os.R_OK | os.W_OK):
        return KvmStatus("no-access", device)
    if not (_cpu_has_virt_flags(cpuinfo) if cpuinfo else _cpu_has_virt_flags()):
        return KvmStatus("no-virt-flags", device)
    return KvmStatus("ok", device)


def detect_accel(explicit: str | None = None) -> tuple[str, str | None]:
    """Return (accel, warning or None). `explicit` is --accel; MATCHLOCK_ACCEL also works."""
    choice = explicit or os.environ.get("MATCHLOCK_ACCEL") or "auto"
    choice = choice.lower()
    if choice != "auto":
        if choice not in ACCELS:
            choices = ", ".join(ACCELS)
            raise UsageError(f"unknown accelerator {choice!r}: use one of auto, {choices}")
        return choice, None
    if sys.platform == "darwin":
        return "hvf", None
    if kvm_status().usable:
        return "kvm", None
    return "tcg", (
        "warning: no usable hardware virtualisation (KVM): using QEMU TCG software "
        "emulation, VMs will be slower"
    )
