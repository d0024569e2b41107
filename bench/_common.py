"""Shared helpers for the benchmarks: a bare VM launch with the same kernel/initramfs."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matchlock.guest import guest_binary  # noqa: E402
from matchlock.sandbox._launch import base_cmdline, modules_for, pick_machine  # noqa: E402
from matchlock.vm.accel import detect_accel  # noqa: E402
from matchlock.vm.initramfs import build_initramfs  # noqa: E402
from matchlock.vm.kernel import host_tsc_khz, resolve_kernel  # noqa: E402
from matchlock.vm.qemu import build_argv, qemu_binary  # noqa: E402
from matchlock.vm.spec import VmSpec  # noqa: E402


def bare_vm(tmp: Path, extra_cmdline: tuple[str, ...], memory_mib: int = 512,
            kernel_name: str | None = None):
    """Start QEMU exactly as a sandbox would, minus disks; returns (Popen, host socket).
    `kernel_name` is what `--kernel` takes (default: what a VM boots by default)."""
    accel, _ = detect_accel()
    kernel = resolve_kernel(kernel_name)
    tsc = host_tsc_khz()
    machine = pick_machine(None, accel, tsc)
    # The same initramfs `matchlock run --no-network` boots.
    initrd = build_initramfs(kernel, guest_binary(), modules_for(machine, networked=False))
    spec = VmSpec(
        kernel=kernel.image, initrd=initrd, memory_mib=memory_mib, vcpus=1, accel=accel,
        machine=machine, log_path=tmp / "console.log",
        cmdline=(*base_cmdline(accel, tsc, kernel), *extra_cmdline),
    )
    host, guest = socket.socketpair()
    argv = build_argv(spec, qemu_binary(), guest.fileno())
    proc = subprocess.Popen(argv, pass_fds=(guest.fileno(),), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guest.close()
    return proc, host


def wait_exact(proc: subprocess.Popen, timeout: float) -> int:
    """Exit status of `proc`, returned as soon as it exits. `Popen.wait(timeout)` polls
    with sleeps of up to 50 ms, which rounds a measured boot up by as much (floors came out
    in 50 ms steps); this blocks in waitpid, and a timer kills a VM that hangs."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        return proc.wait()
    finally:
        timer.cancel()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matchlock_cmd() -> list[str]:
    return [sys.executable, "-m", "matchlock"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    # An installed matchlock has its bytecode compiled (pip does it); without the cache
    # every CLI call here would compile its modules again (~0.1 s, measured).
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    return e
