"""Sandbox: one VM from image to teardown. Owns every resource the VM takes.

Data flows one way: CLI/RPC -> Sandbox -> {image, vm, channel, state}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from matchlock.channel.client import ChannelClosed, ExecHandle, GuestChannel
from matchlock.errors import DependencyError, UsageError, VmStartError
from matchlock.guest import guest_binary
from matchlock.image import BUILTIN_IMAGE, Image, ImageStore
from matchlock.net.types import NetworkConfig
from matchlock.paths import vms_dir
from matchlock.sandbox._exec_limits import check_exec_size
from matchlock.state import StateDB
from matchlock.vfs import HookEngine, MountConfig, SandboxMounts
from matchlock.vm.accel import detect_accel
from matchlock.vm.initramfs import build_initramfs
from matchlock.vm.kernel import host_tsc_khz, resolve_kernel
from matchlock.vm.qemu import QemuProcess, qemu_binary
from matchlock.vm.spec import MIN_MEMORY_MIB, Disk, Nic, VmSpec, mac_for, vcpus_for

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

BOOT_TIMEOUT_S = float(os.environ.get("MATCHLOCK_BOOT_TIMEOUT", "90"))
MAX_DISK_SIZE_MIB = 1 << 20  # 1 TiB: sparse, but a typo of a few zeros should be caught
GUEST_CA_PATH = "/etc/ssl/certs/matchlock-ca.crt"  # written by the guest's install_ca
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
ROOT_SERIAL = "ml-root"
UPPER_SERIAL = "ml-upper"


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    image: str
    cpus: float = 1.0
    memory_mib: int = 512
    disk_size_mib: int = 5120
    hostname: str = ""
    no_network: bool = False
    kernel: str | None = None
    accel: str | None = None
    machine: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    mounts: MountConfig = field(default_factory=MountConfig)  # workspace, -v, --disk

    @property
    def net(self) -> NetworkConfig:
        """The network config in force: `no_network` wins (mode "none")."""
        if self.no_network and self.network.mode != "none":
            return dataclasses.replace(self.network, mode="none")
        return self.network

    def validate(self) -> int:
        """Check everything that needs no I/O; returns the vCPU count."""
        vcpus = vcpus_for(self.cpus)
        if self.memory_mib < MIN_MEMORY_MIB:
            raise UsageError(
                f"--memory must be at least {MIN_MEMORY_MIB} MB (got {self.memory_mib})"
            )
        if not 64 <= self.disk_size_mib <= MAX_DISK_SIZE_MIB:
            raise UsageError(
                f"--disk-size must be between 64 and {MAX_DISK_SIZE_MIB} MB "
                f"(got {self.disk_size_mib})"
            )
        if self.hostname and (len(self.hostname) > 63 or not all(
            c.isalnum() or c in "-." for c in self.hostname
        )):
            raise UsageError(f"--hostname {self.hostname!r}: use letters, digits, '-' and '.'")
        return vcpus


def base_cmdline(accel: str, tsc_khz: int | None) -> list[str]:
    """Kernel arguments every matchlock VM boots with (also used by bench/)."""
    args = [
        "console=ttyS0", "quiet", "loglevel=3", "panic=-1", "reboot=t",
        # Boot-time work a disposable VM does not need (measured ~0.3 s under TCG).
        "cryptomgr.notests", "nowatchdog", "audit=0", "lsm=capability",
    ]
    if accel == "tcg":
        # The emulated CPU does not speculate like hardware; mitigations only cost time.
        args.append("mitigations=off")
        if tsc_khz:
            # Without it a microvm under TCG hangs calibrating the TSC in most tries.
            args.append(f"tsc_early_khz={tsc_khz}")
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
    return "vm-" + uuid.uuid4().hex[:8]


def resolve_image(store: ImageStore, name: str) -> Image:
    builtin = BUILTIN_IMAGE.split(":")[0]
    if name in (builtin, BUILTIN_IMAGE):
        return store.ensure_builtin()
    return store.get(name)


def make_upper_disk(path: Path, size_mib: int) -> None:
    mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
    if not os.path.exists(mke2fs):
        raise DependencyError("mke2fs not found: install e2fsprogs (apt-get install e2fsprogs)")
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    # No journal: the disk is thrown away with the VM, crash consistency buys nothing.
    r = subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "matchlock-upper",
         str(path)],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        raise VmStartError(f"cannot create the VM's writable disk: {r.stderr.strip()}")


class Sandbox:
    def __init__(self, config: SandboxConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda msg: None)
        self.id = new_vm_id()
        self.dir = vms_dir() / self.id
        self.image: Image | None = None
        self.qemu: QemuProcess | None = None
        self.channel: GuestChannel | None = None
        self.timings: dict[str, float] = {}
        self._db: StateDB | None = None
        self._closed = False
        self._prep: asyncio.Future | None = None
        self.net = None  # NetworkStack when the VM has a NIC
        # The VFS's hook rules and file events (set rules before or after start).
        self.vfs_hooks = HookEngine()
        self.vfs: SandboxMounts | None = None  # workspace, volumes and disks

    # -- start ---------------------------------------------------------------------------

    def _prepare(self, vcpus: int) -> tuple[VmSpec, socket.socket]:
        """Blocking preparation (image, kernel, disks); runs in a worker thread."""
        t0 = time.monotonic()
        cfg = self.config
        accel, warning = detect_accel(cfg.accel)
        qemu_binary()  # fail on a missing QEMU before any other work
        self.image = resolve_image(ImageStore(), cfg.image)
        kernel = resolve_kernel(cfg.kernel, progress=self.progress)
        tsc = host_tsc_khz()
        machine = pick_machine(cfg.machine, accel, tsc)
        initrd = build_initramfs(
            kernel, guest_binary(),
            modules_for(machine, networked=cfg.net.mode != "none", vfs=cfg.mounts.vfs),
        )
        if warning:
            # Only once the input is known good, so a bad-input error stays one line.
            self.progress(warning)
        self.timings["prepare_assets"] = time.monotonic() - t0

        self.dir.mkdir(parents=True, mode=0o700)
        (self.dir / "logs").mkdir()
        self._db = StateDB()
        netcfg = cfg.net
        # Only the public view: secret values never reach the state DB.
        self._db.register(self.id, os.getpid(), self.image.name,
                          {"image": self.image.name, "network": netcfg.public_view()})
        upper = self.dir / "upper.ext4"
        make_upper_disk(upper, cfg.disk_size_mib)
        self.vfs = SandboxMounts(cfg.mounts, self.dir, self.vfs_hooks)
        self.vfs.prepare()  # disk locks first: a disk in use fails before QEMU starts

        cmdline = [
            *base_cmdline(accel, tsc),
            f"matchlock.hostname={cfg.hostname or self.id}",
            f"matchlock.root={ROOT_SERIAL}", f"matchlock.upper={UPPER_SERIAL}",
            f"matchlock.net={0 if netcfg.mode == 'none' else 1}",
        ]
        nic = None
        if netcfg.mode != "none":
            from matchlock.net.stack import NetworkStack

            self.net = NetworkStack(self.id, self.dir, netcfg)
            self.net.prepare()
            cmdline += self.net.guest_cmdline()
            nic = Nic(self.net.tap_fd, mac_for(self.id))
            self.timings.update(self.net.timings)
        else:
            cmdline += [f"matchlock.add_host={h}:{ip}" for h, ip in netcfg.add_hosts]
        cmdline += self.vfs.cmdline()
        spec = VmSpec(
            kernel=kernel.image,
            initrd=initrd,
            memory_mib=cfg.memory_mib,
            vcpus=vcpus,
            accel=accel,
            machine=machine,
            log_path=self.dir / "logs" / "vm.log",
            disks=(
                Disk(self.image.disk, ROOT_SERIAL, readonly=True),
                Disk(upper, UPPER_SERIAL),
                *(Disk(Path(d.path), d.serial, d.readonly) for d in self.vfs.disks),
            ),
            cmdline=tuple(cmdline),
            nic=nic,
            vfs_fd=self.vfs.guest_fd,
        )
        host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.qemu = QemuProcess(spec, guest_sock.fileno(), self.dir / "qemu.err")
        except BaseException:
            host_sock.close()
            raise
        finally:
            guest_sock.close()
        self.vfs.start()
        self.timings["qemu_spawned"] = time.monotonic() - t0
        return spec, host_sock

    async def start(self) -> None:
        vcpus = self.config.validate()
        t0 = time.monotonic()
        # Shielded: a Ctrl-C mid-preparation must not leave a QEMU spawned behind close().
        self._prep = asyncio.ensure_future(asyncio.to_thread(self._prepare, vcpus))
        _, host_sock = await asyncio.shield(self._prep)
        if self.net is not None:
            # The sockets listen already; the guest's first packets wait in their queues.
            await self.net.start()
        self.channel = GuestChannel(host_sock)
        self.channel.start()
        hello_task = asyncio.ensure_future(self.channel.wait_ready())
        exit_task = asyncio.ensure_future(asyncio.to_thread(self._wait_qemu_exit))
        try:
            done, _ = await asyncio.wait(
                {hello_task, exit_task}, timeout=BOOT_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self._stop_waiting = True
        if hello_task in done and hello_task.exception() is None:
            hello = hello_task.result()
            exit_task.cancel()
            self.timings["ready"] = time.monotonic() - t0
            if hello.uptime_ns:
                self.timings["guest_uptime_at_ready"] = hello.uptime_ns / 1e9
            if self.net is not None and self.net.ca is not None:
                # Before any exec: so curl, Python, Node and git trust the proxy's leaves.
                reply = await self.channel.request(
                    {"op": "install_ca", "pem": self.net.ca.cert_pem.decode()}
                )
                if not reply.get("ok"):
                    raise VmStartError(f"cannot install the sandbox CA: {reply.get('error')}")
            log.debug("sandbox %s ready: %s", self.id, self.timings)
            return
        hello_task.cancel()
        raise VmStartError(self._boot_failure(elapsed=time.monotonic() - t0))

    _stop_waiting = False

    def _wait_qemu_exit(self) -> int | None:
        assert self.qemu is not None
        while not self._stop_waiting:
            rc = self.qemu.wait(0.1)
            if rc is not None:
                return rc
        return None

    def _boot_failure(self, elapsed: float) -> str:
        assert self.qemu is not None
        rc = self.qemu.poll()
        console = self.console_tail()
        if rc is None:
            why = f"the guest did not become ready within {elapsed:.0f} s"
        else:
            why = f"QEMU exited with status {rc} during boot"
            err = self.qemu.stderr_tail()
            if err:
                why += f": {err}"
        if console:
            why += f" (console: {console})"
        return why

    def console_tail(self, lines: int = 3) -> str:
        """The console lines that explain a failure: a panic or init's FATAL if any."""
        try:
            text = (self.dir / "logs" / "vm.log").read_text(errors="replace")
        except OSError:
            return ""
        rows = [r.strip() for r in text.splitlines() if r.strip()]
        key = [r for r in rows if "Kernel panic" in r or "FATAL" in r]
        return " | ".join(key[:1] if key else rows[-lines:])

    # -- exec ----------------------------------------------------------------------------

    async def exec(
        self,
        request: dict,
        on_output: Callable[[int, bytes], None],
        stdin: Callable[[], Awaitable[bytes]] | None = None,
    ) -> ExecHandle:
        if self.channel is None:
            raise VmStartError("the sandbox is not running")
        # Faces check before booting; this catches what the image and the sandbox added.
        check_exec_size(request.get("argv", ()), request.get("env", ()))
        return await self.channel.exec({"op": "exec", **request}, on_output, stdin)

    def extra_env(self) -> dict[str, str]:
        """Variables every exec gets on top of the user's: CA paths, secret placeholders."""
        env: dict[str, str] = {}
        if self.net is not None and self.net.ca is not None:
            for var in CA_ENV_VARS:
                env[var] = GUEST_CA_PATH
        if self.net is not None:
            # The guest only ever sees placeholders; the proxy swaps in the real values.
            env.update({sec.name: sec.placeholder for sec in self.net.config.secrets})
        return env

    def crashed_reason(self) -> str:
        rc = self.qemu.poll() if self.qemu else None
        msg = "the VM stopped unexpectedly"
        if rc is not None:
            msg += f" (QEMU exit status {rc})"
        tail = self.console_tail()
        return f"{msg}; console: {tail}" if tail else msg

    # -- teardown ------------------------------------------------------------------------

    async def close(self, remove: bool = True) -> None:
        """Stop the VM and release everything. Idempotent; never raises for cleanup."""
        if self._closed:
            return
        self._closed = True
        self._stop_waiting = True
        t0 = time.monotonic()
        if self._prep is not None and not self._prep.done():
            try:
                _, sock = await self._prep
                sock.close()
            except Exception:  # noqa: BLE001 - its failure was already reported
                pass
        if self.channel is not None and self.qemu is not None and self.qemu.poll() is None \
                and not remove:
            # Kept VMs get a clean guest shutdown so the upper disk is consistent.
            try:
                await self.channel.request({"op": "poweroff"}, timeout=2)
            except (ChannelClosed, Exception) as e:  # noqa: BLE001 - best effort
                log.debug("poweroff request failed: %s", e)
            await asyncio.to_thread(self.qemu.wait, 3)
        if self.channel is not None:
            await self.channel.close()
        if self.qemu is not None:
            # A --rm VM's disks are discarded, so there is nothing to flush: kill at once.
            await asyncio.to_thread(self.qemu.kill, 0.0 if remove else 1.0)
        if self.vfs is not None:
            # After QEMU is gone: no guest request is in flight; snapshots are deleted.
            await asyncio.to_thread(self.vfs.close)
        if self.net is not None:
            try:
                await self.net.close()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log.warning("network teardown of %s failed: %s", self.id, e)
            self.timings.update(self.net.timings)
        if self._db is not None:
            if remove:
                self._db.remove(self.id)
            else:
                self._db.set_status(self.id, "stopped")
            self._db.close()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            try:
                (self.dir / "upper.ext4").unlink()
            except FileNotFoundError:
                pass
        self.timings["teardown"] = time.monotonic() - t0
