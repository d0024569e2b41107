"""QEMU as the VMM: command line from a VmSpec, process launch and teardown."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from matchlock._log import get_logger
from matchlock.errors import ConfigError, DependencyError
from matchlock.vm._spawn import popen_tied
from matchlock.vm.accel import host_machine
from matchlock.vm.spec import VmSpec

log = get_logger(__name__)

CHANNEL_PORT_NAME = "matchlock.ctl"
VFS_PORT_NAME = "matchlock.vfs"  # FUSE traffic on its own port: it never queues behind exec

# TCG's translation buffer. QEMU's default (1 GiB, filled lazily) lets an idle VM keep the
# ~45 MiB its boot translated resident for good; 32 MiB caps that at 32 with no measurable
# slowdown on a boot + CPython workload, while 16 MiB made that workload 45% slower
# (buffer flushes and re-translation). bench/density.py measures the effect.
TCG_TB_MIB = 32


def tcg_tb_mib() -> int:
    raw = os.environ.get("MATCHLOCK_TCG_TB_MIB")
    if raw is None:
        return TCG_TB_MIB
    if not raw.isdigit() or not 1 <= int(raw) <= 2048:
        raise ConfigError("MATCHLOCK_TCG_TB_MIB", f"must be a whole number of MiB from 1 to "
                          f"2048 (got {raw!r})")
    return int(raw)


def qemu_binary() -> str:
    arch = host_machine()
    name = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}.get(arch)
    if name is None:
        raise DependencyError(f"unsupported host architecture {arch}")
    override = os.environ.get("MATCHLOCK_QEMU")
    path = override or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        pkg = "qemu-system-x86" if arch == "x86_64" else "qemu-system-arm"
        raise DependencyError(
            f"{override or name} not found: install QEMU (apt-get install {pkg})"
        )
    return path


def build_argv(spec: VmSpec, qemu: str, channel_fd: int) -> list[str]:
    mmio = spec.machine == "microvm"
    bus = "device" if mmio else "pci"
    machine = "microvm,acpi=on" if mmio else "q35"
    accel = spec.accel
    if accel == "tcg":
        accel = "tcg,thread=multi" if spec.vcpus > 1 else "tcg"
        accel += f",tb-size={tcg_tb_mib()}"
    argv = [
        qemu,
        "-M", machine,
        "-accel", accel,
        "-smp", str(spec.vcpus),
        "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-monitor", "none",
        # QEMU's own seccomp filter: a guest that breaks out of the emulator still cannot
        # exec, fork, setuid or change resource limits on the host.
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-chardev", f"file,id=con,path={spec.log_path}",
        "-serial", "chardev:con",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", " ".join(spec.cmdline),
    ]
    if spec.accel in ("kvm", "hvf"):
        argv += ["-cpu", "host"]
    qmp = os.environ.get("MATCHLOCK_QEMU_QMP")
    if qmp:
        # Profiling only (bench/guest_profile.py samples the guest's RIP through it).
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    for i, disk in enumerate(spec.disks):
        ro = ",readonly=on" if disk.readonly else ""
        argv += [
            "-drive", f"id=d{i},file={disk.path},format=raw,if=none,cache=unsafe{ro}",
            "-device", f"virtio-blk-{bus},drive=d{i},serial={disk.serial}",
        ]
    # Entropy from the host at boot: a guest without RDRAND (TCG's default CPU) would
    # otherwise wait on jitter entropy before getrandom() returns.
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom",
             "-device", f"virtio-rng-{bus},rng=rng0"]
    argv += [
        "-device", f"virtio-serial-{bus},max_ports=4",  # id 0 is the console's
        "-chardev", f"socket,id=ctl,fd={channel_fd}",
        "-device", f"virtserialport,chardev=ctl,name={CHANNEL_PORT_NAME}",
    ]
    if spec.vfs_fd is not None:
        argv += [
            "-chardev", f"socket,id=vfs,fd={spec.vfs_fd}",
            "-device", f"virtserialport,chardev=vfs,name={VFS_PORT_NAME}",
        ]
    if spec.nic is not None:
        argv += [
            "-netdev", f"tap,id=n0,fd={spec.nic.tap_fd}",
            "-device", f"virtio-net-{bus},netdev=n0,mac={spec.nic.mac}",
        ]
    return argv


class QemuProcess:
    """One running QEMU; owns the process and reaps it."""

    def __init__(self, spec: VmSpec, channel_fd: int, stderr_path: Path) -> None:
        self.spec = spec
        self.stderr_path = stderr_path
        argv = build_argv(spec, qemu_binary(), channel_fd)
        log.debug("qemu argv: %s", argv)
        with open(stderr_path, "wb") as err:
            # QEMU must not outlive its supervisor, even when the supervisor is SIGKILLed,
            # and must not die with the thread that happened to start it.
            self.proc = popen_tied(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                pass_fds=(channel_fd,) + ((spec.nic.tap_fd,) if spec.nic else ())
                + ((spec.vfs_fd,) if spec.vfs_fd is not None else ()),
                start_new_session=True,  # a terminal Ctrl-C reaches us, not QEMU
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, grace: float = 1.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps."""
        if self.proc.poll() is None:
            self.proc.terminate()
            if self.wait(grace) is None:
                self.proc.kill()
        return self.proc.wait()
