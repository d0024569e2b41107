"""Density: host memory per idle VM with N detached VMs running (issue 7).

Starts --vms VMs with `matchlock run -d` (network on unless --no-network), runs one
`exec true` in each (so every VM has served an exec, as a used idle VM has), then reads
/proc/PID/smaps of every supervisor and its QEMU child and reports, per VM:

- PSS (proportional set size: a page shared by k processes counts 1/k to each; the fair
  per-VM share of shared libraries, the QEMU binary and the page-cached kernel image)
  and RSS (every resident page counted in full, so summing RSS over VMs over-counts);
- guest RAM excluded: QEMU's one anonymous mapping exactly the VM's memory size (the
  bench fails loudly if it cannot find exactly one). Its resident size is shown apart.

Also shown: the TCG translation buffer's resident share of QEMU (sized by
`-accel tcg,tb-size=`), and `python -c pass`'s PSS measured in the same run as the floor of
any Python supervisor. Target: supervisor + QEMU PSS per VM <= 60 MiB (exit 1 when over).

usage: python bench/density.py [--vms 10] [--no-network] [--settle 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import env, matchlock_cmd

KIB = 1024


@dataclass
class Mem:
    rss: int = 0  # KiB
    pss: int = 0
    guest_rss: int = 0
    guest_pss: int = 0
    tcg_rss: int = 0  # the TCG translation buffer (anonymous rwx mapping)

    def mib(self, v: int) -> float:
        return v / KIB


def smaps(pid: int, guest_kib: int | None) -> Mem:
    """Sum a process's smaps; with guest_kib, set apart the guest RAM mapping."""
    m = Mem()
    guest_maps = 0
    cur: dict[str, int] = {}
    header = ""

    def flush() -> None:
        nonlocal guest_maps
        if not header:
            return
        fields = header.split()
        anon = len(fields) < 6
        size, rss, pss = cur.get("Size", 0), cur.get("Rss", 0), cur.get("Pss", 0)
        if guest_kib is not None and anon and size == guest_kib:
            guest_maps += 1
            m.guest_rss += rss
            m.guest_pss += pss
            return
        if anon and fields[1] == "rwxp":
            m.tcg_rss += rss
        m.rss += rss
        m.pss += pss

    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if " " in key or "-" in key:  # a mapping header line
                flush()
                header, cur = line, {}
            elif rest.strip().endswith("kB"):
                cur[key] = int(rest.split()[0])
    flush()
    if guest_kib is not None and guest_maps != 1:
        raise SystemExit(f"pid {pid}: found {guest_maps} anonymous mappings of "
                         f"{guest_kib} KiB (guest RAM); cannot separate it")
    return m


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def qemu_child(sup: int) -> int:
    for c in children(sup):
        exe = os.readlink(f"/proc/{c}/exe")
        if "qemu-system" in exe:
            return c
    raise SystemExit(f"supervisor {sup} has no QEMU child")


def ml(args: list[str], e: dict[str, str]) -> str:
    p = subprocess.run([*matchlock_cmd(), *args], env=e, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"matchlock {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def row(name: str, xs: list[float]) -> str:
    return (f"{name:34s} {statistics.mean(xs):7.1f} MiB  "
            f"(min {min(xs):.1f}, max {max(xs):.1f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--no-network", action="store_true")
    ap.add_argument("--memory", type=int, default=512, help="guest RAM per VM, MiB")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds idle before measuring (a parameter, not a wait-for)")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="ml-density-")
    e = {**env(), "MATCHLOCK_HOME": home}
    guest_kib = args.memory * KIB
    flags = ["--memory", str(args.memory)] + (["--no-network"] if args.no_network else [])
    ids: list[str] = []
    try:
        t0 = time.perf_counter()
        for _ in range(args.vms):
            ids.append(ml(["run", "-d", "--image", "matchlock/busybox", *flags], e).strip())
        boot = time.perf_counter() - t0
        for vm in ids:
            ml(["exec", vm, "true"], e)
        # Floor of any Python supervisor: a bare interpreter, alive while we read it.
        py = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE)
        time.sleep(args.settle)
        listing = json.loads(ml(["list", "--json"], e))
        sups = {r["id"]: r["pid"] for r in listing if r["status"] == "running"}
        if set(sups) != set(ids):
            raise SystemExit(f"expected {len(ids)} running VMs, list shows {sups}")
        sup_mem = [smaps(p, None) for p in sups.values()]
        qemu_mem = [smaps(qemu_child(p), guest_kib) for p in sups.values()]
        py_mem = smaps(py.pid, None)
        py.communicate(b"")
    finally:
        subprocess.run([*matchlock_cmd(), "kill", "--all"], env=e, capture_output=True)
        subprocess.run([*matchlock_cmd(), "rm", "--stopped"], env=e, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)

    def mib(xs: list[int]) -> list[float]:
        return [x / KIB for x in xs]

    sup_pss, q_pss = mib([m.pss for m in sup_mem]), mib([m.pss for m in qemu_mem])
    total = [a + b for a, b in zip(sup_pss, q_pss, strict=True)]
    net = "no network" if args.no_network else "network on"
    print(f"density: {args.vms} idle VMs ({net}, {args.memory} MiB guest RAM each), "
          f"started in {boot:.1f} s; guest RAM excluded")
    print(row("supervisor PSS", sup_pss))
    print(row("supervisor RSS", mib([m.rss for m in sup_mem])))
    print(row("QEMU PSS (excl. guest RAM)", q_pss))
    print(row("QEMU RSS (excl. guest RAM)", mib([m.rss for m in qemu_mem])))
    print(row("  of which TCG buffer RSS", mib([m.tcg_rss for m in qemu_mem])))
    print(row("guest RAM resident (excluded)", mib([m.guest_rss for m in qemu_mem])))
    print(f"{'python -c pass PSS (floor)':34s} {py_mem.pss / KIB:7.1f} MiB")
    mean = statistics.mean(total)
    rss = statistics.mean(m.rss for m in sup_mem) / KIB + \
        statistics.mean(m.rss for m in qemu_mem) / KIB
    print(f"supervisor + QEMU RSS per VM       {rss:7.1f} MiB  (shared pages counted in full)")
    print(f"supervisor + QEMU PSS per VM       {mean:7.1f} MiB  (target <= 60)")
    print(f"split: supervisor {statistics.mean(sup_pss) / mean:.0%}, "
          f"QEMU {statistics.mean(q_pss) / mean:.0%}")
    print(f"per VM / target                    {mean / 60:7.2f}")
    floor = py_mem.pss / KIB
    print(f"supervisor PSS / python floor      {statistics.mean(sup_pss) / floor:7.2f}")
    if mean > 60:
        sys.exit(1)


if __name__ == "__main__":
    main()
