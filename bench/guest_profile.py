"""Where the guest's CPU time goes during `matchlock run --image matchlock/busybox
--no-network true`: samples the vCPU's RIP over QMP (`info registers`, ~250 samples/s,
which slows the guest ~1.5x) and buckets kernel addresses by symbol of the default kernel
(`nm vmlinux`); user space counts as [user], a halted vCPU as [idle]. Shares, not times.

usage: python bench/guest_profile.py [-n RUNS] [--top N] [-- RUN_ARGS...]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import env, matchlock_cmd

from matchlock.vm.kernel import resolve_kernel

_USER_TOP = 0xFFFF800000000000


def symbols(vmlinux: Path) -> tuple[list[int], list[str]]:
    out = subprocess.run(["nm", "-n", str(vmlinux)], capture_output=True, text=True,
                         check=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    return addrs, names


def connect(path: str, proc: subprocess.Popen) -> socket.socket:
    # QEMU makes the socket a moment after it starts; poll for it (no event to wait on).
    s = socket.socket(socket.AF_UNIX)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            s.connect(path)
            return s
        except OSError:
            time.sleep(0.001)
    raise SystemExit("QEMU's QMP socket never appeared")


def sample_run(qmp: str, run_args: list[str], count: collections.Counter,
               sym: Callable[[int], str]) -> int:
    e = env()
    e["MATCHLOCK_QEMU_QMP"] = qmp
    proc = subprocess.Popen([*matchlock_cmd(), "run", *run_args], env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = 0
    with connect(qmp, proc) as s, s.makefile("rwb", buffering=0) as f:
        f.readline()
        f.write(b'{"execute":"qmp_capabilities"}\n')
        f.readline()
        cmd = (b'{"execute":"human-monitor-command",'
               b'"arguments":{"command-line":"info registers"}}\n')
        try:
            while True:
                f.write(cmd)
                line = f.readline()
                if not line:
                    break
                text = json.loads(line).get("return", "")
                k = text.find("RIP=")
                if k < 0:
                    continue
                count["[idle]" if "HLT=1" in text else sym(int(text[k + 4:k + 20], 16))] += 1
                n += 1
        except (OSError, ValueError):
            pass  # QEMU went away: the run is over
    proc.wait()
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("run_args", nargs="*",
                    default=["--image", "matchlock/busybox", "--no-network", "true"])
    args = ap.parse_args()
    kernel = resolve_kernel(None)
    addrs, names = symbols(kernel.image)

    def sym(rip: int) -> str:
        if rip < _USER_TOP:
            return "[user]"
        i = bisect.bisect_right(addrs, rip) - 1
        return names[i] if i >= 0 else "?"

    count: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.n):
            qmp = os.path.join(d, f"qmp{i}.sock")
            print(f"run {i + 1}: {sample_run(qmp, args.run_args, count, sym)} samples")
    total = sum(count.values()) or 1
    print(f"kernel {kernel.name}, {total} samples:")
    for name, c in count.most_common(args.top):
        print(f"  {100 * c / total:5.1f}%  {c:5d}  {name}")


if __name__ == "__main__":
    main()
