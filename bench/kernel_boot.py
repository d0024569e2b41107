"""Guest kernels compared: matchlock's own build against the Debian cloud kernel, measured
in the same run, interleaved, medians.

- floor: a bare QEMU boot (the project's argv, kernel command line and initramfs) whose
  /init powers off at once;
- run true: `matchlock run --image matchlock/busybox --no-network true`, wall clock.

Prints both kernels' medians and the ratios ours/Debian (issue targets: floor <= 0.5x)
and, for our kernel, run/floor (target <= 1.3).

usage: python bench/kernel_boot.py [-n RUNS]      (needs `matchlock kernel build` first)
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from _common import bare_vm, env, matchlock_cmd, median, wait_exact

from matchlock.vm.kernel import best_built, debian_kernel


def floor_once(tmp: Path, kernel: str) -> float:
    t0 = time.perf_counter()
    proc, sock = bare_vm(tmp, ("matchlock.bench=poweroff",), kernel_name=kernel)
    rc = wait_exact(proc, 120)
    sock.close()
    if rc != 0:
        raise SystemExit(f"bare VM with kernel {kernel} exited {rc}")
    return time.perf_counter() - t0


def run_once(kernel: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([*matchlock_cmd(), "run", "--kernel", kernel, "--image",
                        "matchlock/busybox", "--no-network", "true"],
                       env=env(), capture_output=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"matchlock run --kernel {kernel} failed: {p.stderr.decode()}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=7)
    args = ap.parse_args()
    ours = best_built()
    if ours is None:
        raise SystemExit("no matchlock kernel built: run `matchlock kernel build` first")
    theirs = debian_kernel()
    kernels = {"matchlock": ours.name, "debian": theirs.name}
    floors: dict[str, list[float]] = {k: [] for k in kernels}
    runs: dict[str, list[float]] = {k: [] for k in kernels}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in kernels.values():  # warm caches: initramfs, builtin image, page cache
            floor_once(tmp, name)
            run_once(name)
        for _ in range(args.n):
            for label, name in kernels.items():
                floors[label].append(floor_once(tmp, name))
                runs[label].append(run_once(name))
    f = {k: median(v) for k, v in floors.items()}
    r = {k: median(v) for k, v in runs.items()}
    for label, name in kernels.items():
        print(f"{label:9} {name}")
        print(f"  floor (boot+poweroff): median {f[label]:.3f} s  "
              f"{[round(x, 2) for x in floors[label]]}")
        print(f"  run true:              median {r[label]:.3f} s  "
              f"{[round(x, 2) for x in runs[label]]}")
    print(f"floor    ours/debian: {f['matchlock'] / f['debian']:.2f}  (target <= 0.5)")
    print(f"run true ours/debian: {r['matchlock'] / r['debian']:.2f}")
    print(f"ours run/floor:       {r['matchlock'] / f['matchlock']:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
