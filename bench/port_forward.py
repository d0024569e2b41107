"""Port-forward throughput and latency, against the exec channel in the same VM and run.

One VM (no NIC: the forward rides the channel). The guest serves a file with busybox httpd
on its loopback; the host fetches it through a PortForwarder (host listener -> channel
stream -> guest 127.0.0.1:8000). Baseline: the same bytes as `cat file` output through
exec. Also: p50/p99 of a small HTTP request on a fresh forwarded connection, and of 20 at
once.

usage: python bench/port_forward.py [--mib 64] [--requests 100]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matchlock._aio import run as aio_run  # noqa: E402

PATH = "PATH=/bin"


def get(port: int, path: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request("GET", path)
        return len(c.getresponse().read())
    finally:
        c.close()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def main(mib: int, requests: int) -> None:
    import os

    os.environ.setdefault("MATCHLOCK_HOME", tempfile.mkdtemp(prefix="ml-bench-"))
    from matchlock.sandbox import ExecRequest, PortForwarder, PortSpec, Sandbox, SandboxConfig

    nbytes = mib << 20
    sb = Sandbox(SandboxConfig(image="matchlock/busybox", no_network=True))
    await sb.start()
    try:
        got = 0

        async def sh(cmd: str) -> int:
            nonlocal got
            k, _, v = PATH.partition("=")
            proc = await sb.exec(ExecRequest(shell=cmd, env=((k, v),), cwd="/"))
            async for _fd, data in proc:
                got += len(data)
            return (await proc.wait()).exit_code

        assert await sh(f"mkdir -p /tmp/w && head -c {nbytes} /dev/zero > /tmp/w/big && "
                        "echo ok > /tmp/w/small && busybox httpd -p 127.0.0.1:8000 -h /tmp/w "
                        "</dev/null >/dev/null 2>&1") == 0
        got = 0
        t0 = time.perf_counter()
        assert await sh("cat /tmp/w/big") == 0 and got == nbytes
        exec_s = time.perf_counter() - t0

        fwd = PortForwarder(sb.channel.open_tcp)
        [b] = await fwd.add([PortSpec(0, 8000)])
        t0 = time.perf_counter()
        assert await asyncio.to_thread(get, b.local_port, "/big") == nbytes
        pf_s = time.perf_counter() - t0

        serial = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await asyncio.to_thread(get, b.local_port, "/small")
            serial.append(time.perf_counter() - t0)

        async def timed() -> float:
            t0 = time.perf_counter()
            await asyncio.to_thread(get, b.local_port, "/small")
            return time.perf_counter() - t0

        burst = await asyncio.gather(*(timed() for _ in range(20)))
        await fwd.close()
    finally:
        await sb.close()
    mb = nbytes / 1e6
    print(f"{mib} MiB guest -> host")
    print(f"exec `cat` (baseline): {mb / exec_s:7.1f} MB/s")
    print(f"port-forward HTTP GET: {mb / pf_s:7.1f} MB/s   port-forward/exec {exec_s / pf_s:.2f}")
    print(f"small GET, new connection each, {requests} in a row: p50 "
          f"{statistics.median(serial) * 1e3:.1f} ms  p99 {pct(serial, 0.99) * 1e3:.1f} ms")
    print(f"small GET, 20 at once: p50 {statistics.median(burst) * 1e3:.1f} ms  "
          f"max {max(burst) * 1e3:.1f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    aio_run(main(args.mib, args.requests))
