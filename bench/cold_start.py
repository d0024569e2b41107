"""Cold start: `matchlock run --image matchlock/busybox true` vs a bare QEMU boot of the
same kernel and initramfs whose /init powers off at once (the floor). Runs interleaved,
reports medians and the ratio (target <= 1.3), plus where the time goes.

usage: python bench/cold_start.py [-n RUNS]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from _common import bare_vm, env, matchlock_cmd, median, wait_exact


def floor_once(tmp: Path) -> float:
    t0 = time.perf_counter()
    proc, sock = bare_vm(tmp, ("matchlock.bench=poweroff",))
    rc = wait_exact(proc, 120)
    sock.close()
    if rc != 0:
        raise SystemExit(f"bare VM exited {rc}")
    return time.perf_counter() - t0


def run_once(tmp: Path) -> tuple[float, dict]:
    timings = tmp / "timings.json"
    e = env()
    e["MATCHLOCK_TIMINGS"] = str(timings)
    t0 = time.monotonic()  # the clock the run's marks use (CLOCK_MONOTONIC)
    p = subprocess.run([*matchlock_cmd(), "run", "--image", "matchlock/busybox", "--no-network",
                        "true"],
                       env=e, capture_output=True)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"matchlock run failed: {p.stderr.decode()}")
    t = json.loads(timings.read_text())
    # The marks as a timeline from this process's spawn of `matchlock`, then its exit.
    for k, at in t.pop("marks").items():
        t[f"at {k}"] = at - t0
    t["at exited"] = wall
    return wall, t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_once(tmp)  # warm caches (kernel, initramfs, builtin image)
        floors, runs, parts = [], [], []
        for _ in range(args.n):
            floors.append(floor_once(tmp))
            wall, t = run_once(tmp)
            runs.append(wall)
            parts.append(t)
    f, r = median(floors), median(runs)
    print(f"floor (bare QEMU boot+poweroff): median {f:.3f} s  {[round(x, 2) for x in floors]}")
    print(f"matchlock run true:              median {r:.3f} s  {[round(x, 2) for x in runs]}")
    print(f"ratio run/floor: {r / f:.2f}  (target <= 1.3)")
    keys = sorted({k for t in parts for k in t},
                  key=lambda k: (k.startswith("at "), median([t.get(k, 0) for t in parts])))
    print("where the time goes (medians, seconds; \"at\": since `matchlock` was spawned):")
    for k in keys:
        print(f"  {k:28s} {median([t[k] for t in parts if k in t]):.3f}")


if __name__ == "__main__":
    main()
