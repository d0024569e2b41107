"""SDK client overhead: this package's Client/AsyncClient against the reference SDK
(PyPI matchlock 0.2.17), both driving the same fake server (tests/unit/sdk/fake_rpc.py,
no VM), so the server's cost is common and the ratios show the clients' own cost.

- exec("echo x") round trip, p50/p99 over N calls;
- exec_stream of 64 MiB (64 KiB notifications) into a counting writer, MB/s;
- read_file of 15 MB (one 20 MB line), seconds.

usage: python bench/sdk_client.py [--calls 500] [--mib 64]
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

from tests.e2e.refsdk import run_ref  # noqa: E402
from tests.unit.sdk.conftest import make_fake  # noqa: E402

SCRIPT = r'''
import asyncio, json, statistics, sys, time
import matchlock
from matchlock import Client, CreateOptions

CALLS, MIB, MODE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

class Count:
    n = 0
    def write(self, s):
        self.n += len(s)
    def flush(self):
        pass

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]

def sync():
    with Client() as c:
        c.create(CreateOptions(image="img"))
        for _ in range(20):
            c.exec("echo x")
        lat = []
        cpu = time.process_time()
        for _ in range(CALLS):
            t = time.perf_counter(); c.exec("echo x"); lat.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu) / CALLS
        w = Count(); t = time.perf_counter(); c.exec_stream(f"stream {MIB}", stdout=w)
        st = time.perf_counter() - t
        assert w.n == MIB << 20, w.n
        t = time.perf_counter(); data = c.read_file("/big/15000000"); rf = time.perf_counter() - t
        assert len(data) == 15000000
    return lat, cpu, st, rf

async def aio():
    async with matchlock.AsyncClient() as c:
        await c.create(CreateOptions(image="img"))
        for _ in range(20):
            await c.exec("echo x")
        lat = []
        cpu = time.process_time()
        for _ in range(CALLS):
            t = time.perf_counter(); await c.exec("echo x"); lat.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu) / CALLS
        w = Count(); t = time.perf_counter(); await c.exec_stream(f"stream {MIB}", stdout=w)
        st = time.perf_counter() - t
        t = time.perf_counter(); data = await c.read_file("/big/15000000")
        rf = time.perf_counter() - t
    return lat, cpu, st, rf

lat, cpu, st, rf = asyncio.run(aio()) if MODE == "async" else sync()
print(json.dumps({"p50_ms": statistics.median(lat) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
                  "cpu_us": cpu * 1e6, "stream_mbs": MIB / st, "read_file_s": rf}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"reference 0.2.17": [], "ours sync": [], "ours async": []}
    argv = [str(args.calls), str(args.mib)]
    ref_script = (SCRIPT.replace("sys.argv[1]", argv[0]).replace("sys.argv[2]", argv[1])
                  .replace("sys.argv[3]", "'sync'"))
    with tempfile.TemporaryDirectory() as d:
        fake = make_fake(Path(d))
        env = {"MATCHLOCK_BIN": str(fake.bin)}
        script = Path(d) / "bench.py"
        script.write_text(SCRIPT)
        for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
            runs["reference 0.2.17"].append(json.loads(run_ref(ref_script, env=env).stdout))
            for mode in ("sync", "async"):
                out = subprocess.run([sys.executable, str(script), *argv, mode], cwd=d,
                                     env={**os.environ, **env}, capture_output=True,
                                     text=True, check=True).stdout
                runs[f"ours {mode}"].append(json.loads(out))
    results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in runs.items()}
    base = results["reference 0.2.17"]
    print(f"medians of {args.repeats} interleaved runs; {args.calls} execs, {args.mib} MiB "
          "stream, 15 MB read_file; same fake server for all")
    print(f"{'client':<18} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/exec':>11} {'stream MB/s':>11} "
          f"{'read_file s':>11}  ratio vs reference: p50, CPU, stream, read_file")
    for name, r in results.items():
        print(f"{name:<18} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f} {r['cpu_us']:11.1f} "
              f"{r['stream_mbs']:11.1f} {r['read_file_s']:11.3f}  "
              f"{r['p50_ms'] / base['p50_ms']:.2f}x {r['cpu_us'] / base['cpu_us']:.2f}x "
              f"{r['stream_mbs'] / base['stream_mbs']:.2f}x "
              f"{r['read_file_s'] / base['read_file_s']:.2f}x")


if __name__ == "__main__":
    main()
