"""Channel throughput: `head -c 1G /dev/zero` in the guest to the host (discarded) through
the exec channel, vs a raw copy of the same bytes over the same virtio-serial port from
/init with no protocol (the floor). Reports MB/s and the ratio (target >= 0.7).

usage: python bench/throughput.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _common import bare_vm


def floor(tmp: Path, nbytes: int) -> float:
    proc, sock = bare_vm(tmp, (f"matchlock.bench=serial_write:{nbytes}",))
    got = 0
    t0 = None
    buf = bytearray(1 << 20)
    while got < nbytes:
        n = sock.recv_into(buf)
        if n == 0:
            break
        if t0 is None:
            t0 = time.perf_counter()
        got += n
    t1 = time.perf_counter()
    proc.wait(60)
    sock.close()
    if got < nbytes:
        raise SystemExit(f"floor: got only {got} of {nbytes} bytes")
    return (t1 - t0) if t0 else float("nan")


async def channel(nbytes: int) -> float:
    from matchlock.sandbox import Sandbox, SandboxConfig

    sb = Sandbox(SandboxConfig(image="matchlock/busybox"))
    got = 0

    def sink(fd: int, data: bytes) -> None:
        nonlocal got
        got += len(data)

    try:
        await sb.start()
        t0 = time.perf_counter()
        h = await sb.exec({"argv": ["head", "-c", str(nbytes), "/dev/zero"],
                           "env": ["PATH=/bin"], "cwd": "/", "user": "", "tty": False,
                           "stdin": False}, sink)
        st = await h.wait()
        t1 = time.perf_counter()
    finally:
        await sb.close()
    if st.shell_code != 0 or got != nbytes:
        raise SystemExit(f"channel: exit {st}, got {got} of {nbytes}")
    return t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    n = args.mib << 20
    with tempfile.TemporaryDirectory() as d:
        f = floor(Path(d), n)
    c = asyncio.run(channel(n))
    mb = n / 1e6
    print(f"floor (raw virtio-serial): {mb / f:8.1f} MB/s  ({f:.2f} s for {args.mib} MiB)")
    print(f"exec channel:              {mb / c:8.1f} MB/s  ({c:.2f} s)")
    print(f"ratio channel/floor: {f / c:.2f}  (target >= 0.7)")


if __name__ == "__main__":
    main()
