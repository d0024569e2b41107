"""Sandbox: one VM from image to teardown. Owns every resource the VM takes.

Data flows one way: supervisor -> Sandbox -> {image, vm, channel, net, state}.

    create()   image, kernel and initramfs resolved (bad input fails here, nothing is
               registered); then the row (`creating`) and the VM directory
    boot()     writable disk, network namespace, QEMU (`starting`), hello, CA (`running`)
    exec()     typed ExecRequest in, Process out (channel types stay in here)
    stop()     the recorded resources released newest first (`stopping` -> `stopped`)
    remove()   the directory and the rows too

create() and the first half of boot() are `VmLaunch` (_launch): blocking code run in a
worker thread, or done already by the caller before any event loop existed.

Each resource is written to the state DB before it is taken and marked when released, so
`gc` can finish the job from the records if this process dies (see _cleanup).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matchlock._proc import ProcessId
from matchlock.channel import ChannelError
from matchlock.channel.client import GuestChannel
from matchlock.errors import (
    MatchlockError,
    NotAvailable,
    VmNotRunning,
    VmStartError,
)
from matchlock.image import Image
from matchlock.sandbox import _cleanup as cleanup
from matchlock.sandbox._config import SandboxConfig
from matchlock.sandbox._events import EventHub, network_event
from matchlock.sandbox._exec import ExecRequest, Process, VmDefaults, compose_request
from matchlock.sandbox._exec_limits import check_exec_size
from matchlock.sandbox._launch import Progress, VmLaunch
from matchlock.state import InvalidTransition, StateDB, Status
from matchlock.vfs._attach import SandboxMounts
from matchlock.vm.qemu import QemuProcess

if TYPE_CHECKING:
    from matchlock.vfs._hooks import HookEngine

log = logging.getLogger(__name__)

BOOT_TIMEOUT_S = float(os.environ.get("MATCHLOCK_BOOT_TIMEOUT", "90"))
GUEST_CA_PATH = "/etc/ssl/certs/matchlock-ca.crt"  # written by the guest's install_ca
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
POWEROFF_REPLY_S = 2.0  # the guest answers poweroff at once; it then syncs and halts


class Sandbox:
    """One VM. Usage::

        sb = Sandbox(SandboxConfig(image="matchlock/busybox"))
        await sb.start()                       # create() + boot()
        proc = await sb.exec(ExecRequest(argv=("echo", "hi")))
        async for fd, data in proc: ...
        result = await proc.wait()
        await sb.close()                       # stop() + remove()
    """

    def __init__(self, config: SandboxConfig, progress: Progress | None = None, *,
                 vm_id: str | None = None, db: StateDB | None = None,
                 owner: ProcessId | None = None, launch: VmLaunch | None = None) -> None:
        # `launch`: the blocking half, possibly done already (a foreground `run` spawns
        # QEMU before it imports this module).
        self.vm = launch or VmLaunch(config, progress, vm_id=vm_id, db=db, owner=owner)
        self.vm.net_events = self._net_event
        self.config = self.vm.config
        self.channel: GuestChannel | None = None
        self._running = False
        self._work: asyncio.Future | None = None  # blocking setup in flight (shielded)
        self._stop_task: asyncio.Task | None = None
        self._removed = False
        self._stop_waiting = False
        self.stop_reason = ""  # why the VM stopped, for messages
        self._hub: EventHub | None = None
        self.file_events = False  # publish every VFS operation as a `file` event

    # What the launch took, read here and by the faces.
    @property
    def id(self) -> str:
        return self.vm.id

    @property
    def dir(self) -> Path:
        return self.vm.dir

    @property
    def owner(self) -> ProcessId:
        return self.vm.owner

    @property
    def image(self) -> Image | None:
        return self.vm.image

    @property
    def qemu(self) -> QemuProcess | None:
        return self.vm.qemu

    @property
    def net(self):  # noqa: ANN201 - NetworkStack | None (imported only with a NIC)
        return self.vm.net

    @property
    def vfs(self) -> SandboxMounts | None:
        return self.vm.vfs

    @property
    def timings(self) -> dict[str, float]:
        return self.vm.timings

    @property
    def marks(self) -> dict[str, float]:
        return self.vm.marks

    @property
    def vfs_hooks(self) -> HookEngine:
        """The VFS's hook rules and file events (set rules before or after start)."""
        return self.vm.vfs_hooks

    def _net_event(self, event) -> None:  # noqa: ANN001 - NetEvent
        self.hub.publish(network_event(event.kind, event.host, event.detail, event.fields))

    @property
    def hub(self) -> EventHub:
        if self._hub is None:
            self._hub = EventHub()
        return self._hub

    def events(self) -> AsyncIterator[dict]:
        """The VM's events (network today) until the caller stops iterating."""
        return self.hub.subscribe()

    # -- state ---------------------------------------------------------------------------

    @property
    def db(self) -> StateDB:
        return self.vm.db

    def record(self, kind: str, value: dict) -> None:
        """Write down a resource before taking it (also used by the supervisor)."""
        self.vm.record(kind, value)

    def released(self, kind: str, error: str = "") -> None:
        try:
            self.db.released(self.id, kind, error)
        except MatchlockError as e:
            log.warning("%s: cannot record the release of %s: %s", self.id, kind, e)

    def _transition(self, to: Status, detail: str = "", error: str | None = None) -> None:
        self.vm.transition(to, detail, error)

    @property
    def _registered(self) -> bool:
        return self.vm.registered

    @property
    def log_paths(self) -> tuple[Path, Path]:
        return self.vm.log_paths

    # -- create --------------------------------------------------------------------------

    async def create(self) -> None:
        """Resolve the image, kernel and initramfs, then register the VM and make its dir."""
        if self.vm.created:
            return
        self._work = asyncio.ensure_future(asyncio.to_thread(self.vm.create))
        await asyncio.shield(self._work)

    # -- boot ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.create()
        await self.boot()

    async def boot(self) -> None:
        if not self.vm.created:
            raise VmStartError("create() must come before boot()", vm_id=self.id)
        t0 = time.monotonic()
        hub = self.hub  # made here, on the loop it delivers events on
        if self.file_events and self.config.mounts.vfs:
            self.vfs_hooks.subscribe(lambda ev: hub.publish(ev.to_wire()))
        # Shielded: a Ctrl-C mid-preparation must not leave a QEMU spawned behind stop().
        if not self.vm.spawned:
            self._work = asyncio.ensure_future(asyncio.to_thread(self.vm.spawn))
            await asyncio.shield(self._work)
        host_sock, self.vm.host_sock = self.vm.host_sock, None
        assert host_sock is not None
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
            hello_task.cancel()
            exit_task.cancel()
        if not (hello_task in done and hello_task.exception() is None):
            raise VmStartError(self._boot_failure(elapsed=time.monotonic() - t0), vm_id=self.id)
        hello = hello_task.result()
        self.vm.marks["ready"] = time.monotonic()
        self.timings["ready"] = self.vm.marks["ready"] - t0
        if hello.uptime_ns:
            self.timings["guest_uptime_at_ready"] = hello.uptime_ns / 1e9
        if self.net is not None and self.net.ca is not None:
            # Before any exec: so curl, Python, Node and git trust the proxy's leaves.
            reply = await self.channel.request(
                {"op": "install_ca", "pem": self.net.ca.cert_pem.decode()})
            if not reply.get("ok"):
                raise VmStartError(f"cannot install the sandbox CA: {reply.get('error')}",
                                   vm_id=self.id)
        if self._stop_task is not None:
            raise VmStartError("the VM was stopped while it started", vm_id=self.id)
        self._running = True
        await asyncio.to_thread(self._transition, Status.RUNNING)
        log.debug("sandbox %s ready: %s", self.id, self.timings)

    def _wait_qemu_exit(self) -> int | None:
        assert self.qemu is not None
        while not self._stop_waiting:
            rc = self.qemu.wait(0.1)
            if rc is not None:
                return rc
        return None

    def _boot_failure(self, elapsed: float) -> str:
        rc = self.qemu.poll() if self.qemu else None
        console = self.console_tail()
        if rc is None:
            why = f"the guest did not become ready within {elapsed:.0f} s"
        else:
            why = f"QEMU exited with status {rc} during boot"
            err = self.qemu.stderr_tail() if self.qemu else ""
            if err:
                why += f": {err}"
        if console:
            why += f" (console: {console})"
        return why

    def console_tail(self, lines: int = 3) -> str:
        """The console lines that explain a failure: a panic or init's FATAL if any."""
        try:
            text = self.log_paths[0].read_text(errors="replace")
        except OSError:
            return ""
        rows = [r.strip() for r in text.splitlines() if r.strip()]
        key = [r for r in rows if "Kernel panic" in r or "FATAL" in r]
        return " | ".join(key[:1] if key else rows[-lines:])

    def crashed_reason(self) -> str:
        rc = self.qemu.poll() if self.qemu else None
        msg = "the VM stopped unexpectedly"
        if rc is not None:
            msg += f" (QEMU exit status {rc})"
        tail = self.console_tail()
        return f"{msg}; console: {tail}" if tail else msg

    @property
    def running(self) -> bool:
        return self._running and self._stop_task is None

    async def wait_stopped(self) -> str:
        """Until the VM is gone (guest powered off or crashed, or stop()); a reason."""
        if self.channel is None:
            raise VmNotRunning(self.id, "not started")
        await self.channel.wait_closed()
        return self.stop_reason or self.crashed_reason()

    # -- exec and the rest of the runtime surface -----------------------------------------

    @property
    def defaults(self) -> VmDefaults:
        return VmDefaults(image=self.vm.image_defaults(), env=self.config.env,
                          user=self.config.user, extra_env=self._extra_env(),
                          cwd=self.config.mounts.workspace)

    def _extra_env(self) -> dict[str, str]:
        """Variables every exec gets on top of the user's: CA paths, secret placeholders."""
        env: dict[str, str] = {}
        if self.net is not None and self.net.ca is not None:
            for var in CA_ENV_VARS:
                env[var] = GUEST_CA_PATH
        if self.net is not None:
            # The guest only ever sees placeholders; the proxy swaps in the real values.
            env.update({sec.name: sec.placeholder for sec in self.net.config.secrets})
        return env

    def _require_running(self) -> GuestChannel:
        if not self.running or self.channel is None:
            status = "stopping" if self._stop_task is not None else (
                "starting" if self._registered else "not started")
            raise VmNotRunning(self.id, status)
        return self.channel

    async def exec(self, request: ExecRequest) -> Process:
        """Start `request` in the guest; raises UsageError for an empty command."""
        chan = self._require_running()
        wire = compose_request(self.defaults, request)
        # Faces check before booting; this catches what the image and the sandbox added.
        check_exec_size(wire.get("argv", ()), wire.get("env", ()))
        try:
            handle = await chan.exec(wire)
        except ChannelError as e:
            raise VmNotRunning(self.id, f"stopped: {e}") from None
        return Process(handle, self.id, lambda: self.stop_reason or self.crashed_reason())

    async def ping(self) -> float:
        """One channel round trip (the floor under every exec); seconds."""
        chan = self._require_running()
        t0 = time.perf_counter()
        await chan.request({"op": "ping"})
        return time.perf_counter() - t0

    def _policy(self):
        if self.net is None or self.net.policy.mode != "intercept":
            raise NotAvailable("allow-list updates unavailable: sandbox was started without "
                               "network interception", vm_id=self.id)
        return self.net.policy

    def allow_list(self) -> list[str]:
        return list(self._policy().allow_hosts)

    def allow_list_add(self, hosts: Sequence[str]) -> dict[str, Any]:
        """{added, allowed_hosts, allow_all}: in force for new connections at once."""
        pol = self._policy()
        added = pol.add_allowed(list(hosts))
        return {"added": added, "allowed_hosts": list(pol.allow_hosts),
                "allow_all": pol.allow_all}

    def allow_list_delete(self, hosts: Sequence[str]) -> dict[str, Any]:
        """{removed, allowed_hosts, allow_all}: deleting the last host blocks everything."""
        pol = self._policy()
        removed = pol.remove_allowed(list(hosts))
        return {"removed": removed, "allowed_hosts": list(pol.allow_hosts),
                "allow_all": pol.allow_all}

    # -- teardown ------------------------------------------------------------------------

    async def stop(self, *, graceful: bool = True, timeout: float = 5.0,
                   reason: str = "") -> None:
        """Stop the VM and release what it took, newest first. Idempotent; concurrent
        callers share one teardown; never raises (failures are recorded for gc)."""
        if self._stop_task is None:
            self.stop_reason = self.stop_reason or reason
            self._stop_task = asyncio.ensure_future(self._stop(graceful, timeout))
        await asyncio.shield(self._stop_task)

    async def _stop(self, graceful: bool, timeout: float) -> None:
        t0 = time.monotonic()
        self._stop_waiting = True
        errors: list[str] = []

        def step(kind: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - recorded, teardown goes on
                errors.append(f"{kind}: {e}")
                log.warning("%s: releasing %s failed: %s", self.id, kind, e)
                self.released(kind, f"{type(e).__name__}: {e}")
            else:
                self.released(kind)

        with contextlib.suppress(MatchlockError):
            await asyncio.to_thread(self._transition, Status.STOPPING,
                                    self.stop_reason)
        if self._work is not None and not self._work.done():
            # Setup in a worker thread: let it finish so that what it took is known.
            with contextlib.suppress(BaseException):
                await self._work
        if self.vm.host_sock is not None:  # spawned, never booted
            self.vm.host_sock.close()
            self.vm.host_sock = None
        qemu_alive = self.qemu is not None and self.qemu.poll() is None
        if graceful and qemu_alive and self.channel is not None and self._running:
            # Kept VMs get a clean guest shutdown (sync, unmount) before QEMU goes.
            try:
                await self.channel.request({"op": "poweroff"}, timeout=POWEROFF_REPLY_S)
                await asyncio.to_thread(self.qemu.wait, max(0.1, timeout))
            except (TimeoutError, ChannelError, OSError) as e:
                log.debug("%s: poweroff request failed: %s", self.id, e)
        self._running = False
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()
        if self.qemu is not None:
            q = self.qemu
            # A --rm VM's disks are discarded, so there is nothing to flush: kill at once.
            await asyncio.to_thread(step, cleanup.QEMU, lambda: q.kill(1.0 if graceful else 0.0))
        if self.vfs is not None:
            # After QEMU is gone: no guest request is in flight; snapshots are deleted.
            await asyncio.to_thread(self.vfs.close)
        if self.net is not None:
            err = ""
            try:
                await self.net.close()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                errors.append(f"netns: {e}")
                err = f"{type(e).__name__}: {e}"
            await asyncio.to_thread(self.released, cleanup.NETNS, err)
            self.timings.update(self.net.timings)
        if self._registered:
            # Whatever else was recorded (the disk, sockets, a resource taken by a step
            # that failed half way): released from the records, like gc would.
            results = await asyncio.to_thread(
                cleanup.release_recorded, self.db, self.id, include_dir=False)
            errors += [f"{r.kind}: {r.error}" for r in results if r.error]
            to = Status.CLEANUP_FAILED if errors else Status.STOPPED
            with contextlib.suppress(MatchlockError):
                await asyncio.to_thread(self._transition, to, self.stop_reason,
                                        "; ".join(errors) if errors else None)
        self.timings["teardown"] = time.monotonic() - t0

    async def remove(self) -> None:
        """Stop (if needed), then delete the VM directory and forget the VM. Never raises."""
        await self.stop(graceful=False)
        if self._removed or not self._registered:
            return
        self._removed = True
        try:
            await asyncio.to_thread(self._remove)
        except MatchlockError as e:
            log.warning("%s: cannot remove its records: %s", self.id, e)

    def _remove(self) -> None:
        results = cleanup.release_recorded(self.db, self.id, include_dir=True)
        if any(r.error for r in results):
            return  # keep the records: gc or rm finishes it
        self.db.delete(self.id)

    async def close(self, remove: bool = True) -> None:
        """Stop and release everything; `remove` also deletes the directory and rows."""
        await self.stop(graceful=not remove)
        if remove:
            await self.remove()


__all__ = ["InvalidTransition", "Sandbox", "SandboxConfig"]
