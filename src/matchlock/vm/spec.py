"""A fully validated description of one VM, built before any process starts."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from matchlock.errors import ConfigError

MIN_MEMORY_MIB = 64  # below this the Debian cloud kernel cannot unpack its initramfs
MAX_DISKS = 16
_HEX = set("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class Disk:
    path: Path
    serial: str  # the guest finds disks by virtio-blk serial, not probe order
    readonly: bool = False


@dataclass(frozen=True, slots=True)
class Nic:
    tap_fd: int  # an open TAP (IFF_TAP|IFF_NO_PI, no vnet header); QEMU inherits it
    mac: str

    def __post_init__(self) -> None:
        parts = self.mac.split(":")
        if len(parts) != 6 or not all(len(p) == 2 and set(p) <= _HEX for p in parts):
            raise ValueError(f"bad MAC address {self.mac!r}")
        if self.tap_fd < 0:
            raise ValueError(f"bad TAP fd {self.tap_fd}")


def mac_for(vm_id: str) -> str:
    """A stable, locally administered unicast MAC derived from the VM id."""
    h = hashlib.sha256(vm_id.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in h[:5])


@dataclass(frozen=True, slots=True)
class VmSpec:
    kernel: Path
    initrd: Path
    memory_mib: int
    vcpus: int
    accel: str
    machine: str
    log_path: Path
    disks: tuple[Disk, ...] = ()
    cmdline: tuple[str, ...] = ()
    nic: Nic | None = None  # None: no network interface at all
    vfs_fd: int | None = None  # the VFS port's guest end (a socket QEMU inherits), or none

    def __post_init__(self) -> None:
        if self.memory_mib < MIN_MEMORY_MIB:
            raise ConfigError("memory_mib",
                              f"must be at least {MIN_MEMORY_MIB} MB (got {self.memory_mib})")
        if self.vcpus < 1:
            raise ConfigError("cpus", f"must be at least 1 (got {self.vcpus})")
        if len(self.disks) > MAX_DISKS:
            raise ConfigError("disks", f"are too many ({len(self.disks)} > {MAX_DISKS})")
        if self.machine not in ("microvm", "q35"):
            raise ConfigError("machine", f"{self.machine!r} is unknown: use microvm or q35")


def vcpus_for(cpus: float) -> int:
    """--cpus is a float (reference semantics); the VM gets ceil(cpus) vCPUs."""
    if not math.isfinite(cpus) or cpus <= 0:
        raise ConfigError("cpus", f"must be a number greater than 0 (got {cpus})")
    n = math.ceil(cpus)
    host = os.cpu_count() or 1
    if n > host:
        raise ConfigError("cpus", f"{cpus:g} needs {n} vCPUs but the host has only {host}")
    return n
