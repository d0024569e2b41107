"""The Python SDK against a real VM (issue 8's benchmarks), each figure against a baseline
measured in the same run:

- `client.exec("true")` p50/p99 over --calls calls on one VM, against the channel's raw
  echo (`ping`) of an in-process VM (the floor). Target: p50 <= 2x floor.
- `exec_stream` stdout MB/s of `dd bs=64k` against `matchlock run` of the same command
  (both from first to last byte). Target >= 0.8. And 8 concurrent `exec_stream`s on one
  VM (AsyncClient): aggregate MB/s against one stream.
- `Client.launch` to the first exec result against `matchlock run true`, interleaved,
  medians of --repeat. Target <= 1.1x.

usage: python bench/sdk_vm.py [--calls 500] [--mib 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import env, matchlock_cmd, median
from exec_rtt import InProcessVm, fmt, in_loop_rtts, pct, stream_rate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

IMAGE = "matchlock/busybox"


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.first: float | None = None
        self.last = 0.0

    def write(self, data: bytes) -> int:
        if self.first is None:
            self.first = time.perf_counter()
        self.n += len(data)
        self.last = time.perf_counter()
        return len(data)

    def flush(self) -> None:
        pass

    def rate(self) -> float:
        assert self.first is not None
        return self.n / 1e6 / max(1e-9, self.last - self.first)


def producer(nbytes: int) -> str:
    return f"dd if=/dev/zero bs=65536 count={nbytes // 65536} 2>/dev/null"


def sdk_figures(calls: int, nbytes: int) -> tuple[list[float], list[float], float]:
    from matchlock import Client, Sandbox

    with Client() as client:
        client.launch(Sandbox(IMAGE))
        rtts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            r = client.exec("true")
            rtts.append(time.perf_counter() - t0)
            assert r.exit_code == 0
        rates = []
        for _ in range(3):
            c = Counter()
            client.exec_stream(producer(nbytes), stdout=c)
            assert c.n == nbytes, c.n
            rates.append(c.rate())
    return rtts, rates, concurrent_rate(nbytes)


def concurrent_rate(nbytes: int, streams: int = 8) -> float:
    from matchlock import AsyncClient, Sandbox

    async def go() -> float:
        async with AsyncClient() as client:
            await client.launch(Sandbox(IMAGE))
            counters = [Counter() for _ in range(streams)]
            t0 = time.perf_counter()
            await asyncio.gather(*(client.exec_stream(producer(nbytes), stdout=c)
                                   for c in counters))
            dt = time.perf_counter() - t0
            assert all(c.n == nbytes for c in counters)
            return streams * nbytes / 1e6 / dt

    return asyncio.run(go())


def launch_to_first_exec() -> float:
    from matchlock import Client, Sandbox

    t0 = time.perf_counter()
    with Client() as client:
        client.launch(Sandbox(IMAGE))  # networked by default, as `run` is
        assert client.exec("true").exit_code == 0
        dt = time.perf_counter() - t0
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="ml-bench-")
    os.environ["MATCHLOCK_HOME"] = home
    os.environ.pop("MATCHLOCK_BIN", None)  # the SDK starts this package's own CLI
    e = {**env(), "MATCHLOCK_HOME": home}
    nbytes = args.mib << 20

    vm = InProcessVm()
    try:
        pings, _, _, _ = in_loop_rtts(vm, min(args.calls, 200))
    finally:
        vm.close()
    rtts, stream_rates, agg = sdk_figures(args.calls, nbytes)
    run_rates = [stream_rate([*matchlock_cmd(), "run", "--image", IMAGE, "--no-network",
                              "sh", "-c", producer(nbytes)], e, nbytes)
                 for _ in range(3)]
    launches, runs = [], []
    for _ in range(args.repeat):  # interleaved: the machine's load hits both alike
        launches.append(launch_to_first_exec())
        t0 = time.perf_counter()
        subprocess.run([*matchlock_cmd(), "run", "--image", IMAGE, "true"], env=e, check=True)
        runs.append(time.perf_counter() - t0)

    floor = pct(pings, 50)
    print(f"Python SDK against a real VM ({os.environ.get('MATCHLOCK_ACCEL', 'auto')} accel)")
    print(fmt("floor: channel ping", pings))
    print(fmt(f"client.exec('true') x{args.calls}", rtts))
    print(f"exec p50 / floor p50                 {pct(rtts, 50) / floor:7.2f}  (target <= 2)")
    print(f"exec_stream {args.mib} MiB              {median(stream_rates):7.1f} MB/s")
    print(f"matchlock run, same producer         {median(run_rates):7.1f} MB/s")
    print(f"exec_stream / run                    {median(stream_rates) / median(run_rates):7.2f}"
          "  (target >= 0.8)")
    print(f"8 concurrent exec_streams, aggregate {agg:7.1f} MB/s  "
          f"({agg / median(stream_rates):.2f}x one stream)")
    print(f"launch -> first exec                 {median(launches):7.2f} s")
    print(f"matchlock run true                   {median(runs):7.2f} s")
    print(f"launch / run                         {median(launches) / median(runs):7.2f}"
          "  (target <= 1.1)")


if __name__ == "__main__":
    main()
