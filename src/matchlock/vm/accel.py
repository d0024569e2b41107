"""Pick the QEMU accelerator: KVM only when it can really work, else TCG (with a warning)."""

from __future__ import annotations

import logging
import os
import sys

from matchlock.errors import UsageError

log = logging.getLogger(__name__)

ACCELS = ("kvm", "hvf", "tcg")


def _cpu_has_virt_flags() -> bool:
    # /dev/kvm can exist without hardware virtualisation (e.g. a PVM device on our CI
    # hosts): unmodified kernels crash or crawl there, so also require vmx/svm.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


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
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and _cpu_has_virt_flags():
        return "kvm", None
    return "tcg", (
        "warning: no usable hardware virtualisation (KVM): using QEMU TCG software "
        "emulation, VMs will be slower"
    )
