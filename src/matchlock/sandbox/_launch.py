"""The blocking half of bringing a VM up: assets, registration, writable disk, network
namespace, QEMU. No event loop and no channel: a foreground `run` does all of it before it
imports asyncio, so QEMU boots while the rest of the program loads (that import is ~50 ms
and the channel's ~25 ms, measured here). The Sandbox does the same steps in a worker
thread when nothing did them first.

    create()   image, kernel and initramfs resolved; then the row (`creating`) and the dir
    spawn()    writable disk, network namespace, QEMU (`starting`); `host_sock` set

Each resource is written to the state DB before it is taken (see _cleanup).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matchlock._proc import ProcessId
from matchlock.guest import guest_binary
from matchlock.image import Image, ImageStore
from matchlock.paths import vms_dir
from matchlock.sandbox import _cleanup as cleanup
from matchlock.sandbox._command import ImageDefaults, overlay_image
from matchlock.sandbox._config import SandboxConfig
from matchlock.sandbox._upper import make_upper_disk
from matchlock.state import StateDB, Status
from matchlock.vfs._attach import SandboxMounts
from matchlock.vm.accel import detect_accel
from matchlock.vm.initramfs import build_initramfs
from matchlock.vm.kernel import Kernel, host_tsc_khz, resolve_kernel
from matchlock.vm.kernel_build import APIC_BUS_PATCH
from matchlock.vm.qemu import QemuProcess, qemu_binary
from matchlock.vm.spec import Disk, Nic, VmSpec, mac_for

if TYPE_CHECKING:
    from matchlock.net.types import NetEvent
    from matchlock.vfs._hooks import HookEngine

Progress = Callable[[str], None]

ROOT_SERIAL = "ml-root"
UPPER_SERIAL = "ml-upper"
CONSOLE_LOG = "vm.log"
SUPERVISOR_LOG = "supervisor.log"


# QEMU's emulated local APIC counts at 1 GHz (TCG; KVM's in-kernel one too).
QEMU_APIC_BUS_KHZ = 1_000_000


def base_cmdline(accel: str, tsc_khz: int | None, kernel: Kernel | None = None) -> list[str]:
    """Kernel arguments every matchlock VM boots with (also used by bench/)."""
    args = [
        "console=ttyS0", "quiet", "loglevel=3", "panic=-1", "reboot=t",
        # Boot-time work a disposable VM does not need (measured ~0.3 s under TCG).
        "cryptomgr.notests", "nowatchdog", "audit=0", "lsm=capability",
        # One vCPU: the kernel would rewrite every LOCK prefix to run uniprocessor, one
        # text_poke (a page-table switch, so a TCG TLB flush) each: 0.58 -> 0.46 s floor.
        "noreplace-smp",
        # A built-in dummy driver (our kernel) makes dummy0 at boot; a guest's links are
        # eth0 and lo only. Users can still `ip link add type dummy`.
        "dummy.numdummies=0",
    ]
    if accel == "tcg":
        # The emulated CPU does not speculate like hardware; mitigations only cost time.
        args.append("mitigations=off")
        if tsc_khz:
            # Without it a microvm under TCG hangs calibrating the TSC in most tries.
            args.append(f"tsc_early_khz={tsc_khz}")
        if kernel is not None and APIC_BUS_PATCH in kernel.patches:
            # TCG has no TSC-deadline timer, so the kernel would spend 0.2 s measuring the
            # APIC timer's rate; our build takes it from here (guest/kernel/*.patch).
            args.append(f"lapic_bus_khz={QEMU_APIC_BUS_KHZ}")
    if os.environ.get("MATCHLOCK_GUEST_DEBUG"):
        args.append("matchlock.debug=1")
    return args


def pick_machine(explicit: str | None, accel: str, tsc_khz: int | None) -> str:
    machine = explicit or os.environ.get("MATCHLOCK_MACHINE") or ""
    if machine:
        return machine
    # microvm boots fastest; under TCG it needs the TSC rate or it hangs calibrating.
    return "microvm" if (accel != "tcg" or tsc_khz) else "q35"


def modules_for(machine: str, networked: bool, vfs: bool = False) -> tuple[str, ...]:
    """Only the modules this VM uses: each costs 5-35 ms of boot under TCG."""
    bus = "virtio_mmio" if machine == "microvm" else "virtio_pci"
    mods = [bus, "virtio_blk", "virtio_console", "overlay"]
    if networked:
        mods.append("virtio_net")
    if vfs:
        mods.append("fuse")
    return tuple(mods)


def new_vm_id() -> str:
    return "vm-" + os.urandom(4).hex()  # not uuid: its import (platform, re) is ~2 ms


def resolve_image(store: ImageStore, name: str, pull: bool = False,
                  progress: Progress | None = None) -> Image:
    # From the store (or built in), else pulled from its registry; always pulled with `pull`.
    return store.resolve(name, pull=pull, progress=progress)


@dataclass(frozen=True, slots=True)
class _Assets:
    accel: str
    warning: str | None
    image: Image
    kernel: Kernel
    tsc: int | None
    machine: str
    initrd: Path


class VmLaunch:
    """One VM's resources up to a spawned QEMU, for the Sandbox that runs it."""

    def __init__(self, config: SandboxConfig, progress: Progress | None = None, *,
                 vm_id: str | None = None, db: StateDB | None = None,
                 owner: ProcessId | None = None) -> None:
        self.config = config
        self.vcpus = config.validate()
        self.progress = progress or (lambda msg: None)
        self.id = vm_id or new_vm_id()
        self.dir = vms_dir() / self.id
        self.owner = owner or ProcessId.current()
        self.image: Image | None = None
        self.qemu: QemuProcess | None = None
        self.net = None  # NetworkStack when the VM has a NIC
        self.vfs: SandboxMounts | None = None  # workspace, volumes and disks
        self.host_sock: socket.socket | None = None  # the channel's end, until taken
        self.net_events: Callable[[NetEvent], None] | None = None  # set by the Sandbox
        self.timings: dict[str, float] = {}
        self.marks: dict[str, float] = {}  # time.monotonic() at named points, for bench/
        self.registered = False
        self._db = db
        self._assets: _Assets | None = None
        self._vfs_hooks: HookEngine | None = None

    @property
    def created(self) -> bool:
        return self._assets is not None

    @property
    def spawned(self) -> bool:
        return self.qemu is not None

    @property
    def vfs_hooks(self) -> HookEngine:
        """The VFS's hook rules and file events (set rules before or after start)."""
        if self._vfs_hooks is None:
            from matchlock.vfs._hooks import HookEngine

            self._vfs_hooks = HookEngine()
        return self._vfs_hooks

    @property
    def db(self) -> StateDB:
        if self._db is None:
            self._db = StateDB()
        return self._db

    def record(self, kind: str, value: dict[str, Any]) -> None:
        """Write down a resource before taking it (also used by the supervisor)."""
        self.db.take(self.id, kind, value)

    def transition(self, to: Status, detail: str = "", error: str | None = None) -> None:
        if self.registered:
            self.db.transition(self.id, to.value, detail=detail, error=error)

    def image_defaults(self) -> ImageDefaults:
        """The image's ENV, ENTRYPOINT, CMD, WORKDIR and USER, as this VM's config
        overrides them (known after create())."""
        cfg = self.image.config if self.image is not None else None
        image = ImageDefaults(env=cfg.env, entrypoint=cfg.entrypoint, cmd=cfg.cmd,
                              working_dir=cfg.working_dir, user=cfg.user) if cfg \
            else ImageDefaults()
        return overlay_image(image, self.config)

    @property
    def log_paths(self) -> tuple[Path, Path]:
        return self.dir / "logs" / CONSOLE_LOG, self.dir / "logs" / SUPERVISOR_LOG

    def create(self) -> None:
        """Resolve the image, kernel and initramfs (bad input fails here, nothing is
        registered); then register the VM (`creating`) and make its directory."""
        t0 = time.monotonic()
        cfg = self.config
        accel, warning = detect_accel(cfg.accel)
        qemu_binary()  # fail on a missing QEMU before any other work
        image = resolve_image(ImageStore(), cfg.image, cfg.pull, self.progress)
        kernel = resolve_kernel(cfg.kernel, progress=self.progress)
        tsc = host_tsc_khz()
        machine = pick_machine(cfg.machine, accel, tsc)
        initrd = build_initramfs(
            kernel, guest_binary(),
            modules_for(machine, networked=cfg.net.mode != "none", vfs=cfg.mounts.vfs))
        self.image = image
        self._assets = _Assets(accel, warning, image, kernel, tsc, machine, initrd)
        if warning:
            # Only once the input is known good, so a bad-input error stays one line.
            self.progress(warning)
        self.timings["prepare_assets"] = time.monotonic() - t0

        public = cfg.public_view() | {"image": image.name}
        while not self.db.create(self.id, image=image.name, config=public, owner=self.owner,
                                 cpus=cfg.cpus, memory_mib=cfg.memory_mib,
                                 ports=public["ports"]):
            self.id = new_vm_id()  # 2^32 ids: a clash is rare, never fatal
            self.dir = vms_dir() / self.id
        self.registered = True
        self.record(cleanup.VM_DIR, {"path": str(self.dir)})
        self.dir.mkdir(parents=True, mode=0o700)
        (self.dir / "logs").mkdir()
        # Only the public view: secret values never reach the state directory.
        (self.dir / "config.json").write_text(json.dumps(public, indent=2) + "\n")

    def spawn(self) -> None:
        """Writable disk, network namespace, QEMU (`starting`); the host end of the guest
        channel is then in `host_sock` until the Sandbox takes it."""
        assert self._assets is not None
        a, cfg = self._assets, self.config
        t0 = time.monotonic()
        upper = self.dir / "upper.ext4"
        self.record(cleanup.UPPER_DISK, {"path": str(upper)})
        make_upper_disk(upper, cfg.disk_size_mib)
        self.vfs = SandboxMounts(cfg.mounts, self.dir,
                                 self.vfs_hooks if cfg.mounts.vfs else None)
        self.vfs.prepare()  # disk locks first: a disk in use fails before QEMU starts

        netcfg = cfg.net
        cmdline = [
            *base_cmdline(a.accel, a.tsc, a.kernel),
            f"matchlock.hostname={cfg.hostname or self.id}",
            f"matchlock.root={ROOT_SERIAL}", f"matchlock.upper={UPPER_SERIAL}",
            f"matchlock.net={0 if netcfg.mode == 'none' else 1}",
        ]
        nic = None
        if netcfg.mode != "none":
            from matchlock.net.netns import ns_name_for
            from matchlock.net.stack import NetworkStack

            self.record(cleanup.NETNS, {"name": ns_name_for(self.id),
                                        "privileged": os.geteuid() == 0})
            launch = self

            class Stack(NetworkStack):
                def emit(self, event) -> None:  # noqa: ANN001 - NetEvent
                    super().emit(event)
                    if launch.net_events is not None:
                        launch.net_events(event)

            self.net = Stack(self.id, self.dir, netcfg)
            self.net.prepare()
            cmdline += self.net.guest_cmdline()
            nic = Nic(self.net.tap_fd, mac_for(self.id))
            self.timings.update(self.net.timings)
        else:
            cmdline += [f"matchlock.add_host={h}:{ip}" for h, ip in netcfg.add_hosts]
        cmdline += self.vfs.cmdline()
        spec = VmSpec(
            kernel=a.kernel.image, initrd=a.initrd, memory_mib=cfg.memory_mib,
            vcpus=self.vcpus, accel=a.accel, machine=a.machine,
            log_path=self.log_paths[0],
            disks=(Disk(a.image.disk, ROOT_SERIAL, readonly=True), Disk(upper, UPPER_SERIAL),
                   *(Disk(Path(d.path), d.serial, d.readonly) for d in self.vfs.attachments)),
            cmdline=tuple(cmdline), nic=nic, vfs_fd=self.vfs.guest_fd,
        )
        self.transition(Status.STARTING)
        # Recorded before the spawn: gc finds an unrecorded pid by the dir in QEMU's argv.
        self.record(cleanup.QEMU, {"marker": str(self.dir)})
        host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.qemu = QemuProcess(spec, guest_sock.fileno(), self.dir / "qemu.err")
        except BaseException:
            host_sock.close()
            raise
        finally:
            guest_sock.close()
        pid = ProcessId.of(self.qemu.pid)
        self.record(cleanup.QEMU, {"marker": str(self.dir), "pid": self.qemu.pid,
                                   "start": pid.start if pid else ""})
        self.vfs.start()
        self.marks["qemu_spawned"] = time.monotonic()
        self.timings["qemu_spawned"] = self.marks["qemu_spawned"] - t0
        self.host_sock = host_sock
