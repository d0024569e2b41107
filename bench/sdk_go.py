"""Go SDK exec latency against the Python SDK's, same run, same real VM kind: each SDK
launches a VM on the built-in image through this checkout's `matchlock rpc` and times
exec("true") N times (after 20 warm-up calls), then exec_stream of --mib MiB of `dd`
stdout three times. Prints p50/p99 per SDK and Go/Python ratios (target: each <= 1.2),
and each SDK's stream MB/s (median) with the Go/Python ratio.

usage: flock /tmp/ml-e2e.lock .venv/bin/python bench/sdk_go.py [--calls 500] [--mib 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gotool import SDK, go_binary, go_env  # noqa: E402

PY = r'''
import json, sys, time
from matchlock import Client, Sandbox

class Counter:
    def __init__(self):
        self.n, self.first, self.last = 0, 0.0, 0.0
    def write(self, data):
        if not self.n:
            self.first = time.perf_counter()
        self.n += len(data)
        self.last = time.perf_counter()
        return len(data)
    def flush(self):
        pass

calls = int(sys.argv[2])
with Client() as c:
    c.launch(Sandbox(sys.argv[1]))
    for _ in range(20):
        c.exec("true")
    lat = []
    for _ in range(calls):
        t = time.perf_counter(); c.exec("true"); lat.append((time.perf_counter() - t) * 1000)
    mib = int(sys.argv[3])
    rates = []
    for _ in range(3):  # as execbench's streamRate: bytes from first write to last
        w = Counter()
        c.exec_stream(f"dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null", stdout=w)
        assert w.n == mib << 20, w.n
        rates.append(w.n / 1e6 / (w.last - w.first))
c.remove()
lat.sort()
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(json.dumps({"p50_ms": pct(0.5), "p99_ms": pct(0.99), "calls": calls,
                  "stream_mb_s": sorted(rates)[1]}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--image", default="matchlock/busybox")
    ap.add_argument("--mib", type=int, default=64, help="exec_stream size per try")
    args = ap.parse_args()
    env = go_env({"MATCHLOCK_BIN": str(Path(sys.executable).parent / "matchlock")})
    with tempfile.TemporaryDirectory() as tmp:
        env["MATCHLOCK_HOME"] = tmp
        exe = Path(tmp) / "execbench"
        subprocess.run([str(go_binary()), "build", "-o", str(exe), "./internal/cmd/execbench"],
                       cwd=SDK, env=env, check=True)
        argv = [args.image, str(args.calls), str(args.mib)]
        py = subprocess.run([sys.executable, "-c", PY, *argv], env=env,
                            capture_output=True, text=True, check=True)
        go = subprocess.run([str(exe), *argv], env=env, capture_output=True, text=True,
                            check=True)
    p, g = json.loads(py.stdout), json.loads(go.stdout)
    print(f"exec('true') x{args.calls} on a real VM")
    print(f"  python SDK  p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms")
    print(f"  go SDK      p50 {g['p50_ms']:.2f} ms  p99 {g['p99_ms']:.2f} ms")
    r50, r99 = g["p50_ms"] / p["p50_ms"], g["p99_ms"] / p["p99_ms"]
    print(f"  go/python   p50 {r50:.2f}x  p99 {r99:.2f}x  (target <= 1.2x)")
    print(f"exec_stream of {args.mib} MiB (median of 3)")
    print(f"  python SDK  {p['stream_mb_s']:.1f} MB/s")
    print(f"  go SDK      {g['stream_mb_s']:.1f} MB/s")
    print(f"  go/python   {g['stream_mb_s'] / p['stream_mb_s']:.2f}x")


if __name__ == "__main__":
    main()
