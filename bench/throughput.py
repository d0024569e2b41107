"""Channel throughput: guest stdout to the host (discarded) through the exec channel.

Three measurements, same run, same VM image:
- raw floor: /init writes the bytes straight to the same virtio-serial port (no protocol,
  no producer process) and the host reads them;
- producer floor: the producer piped to `cat > /dev/null` inside the guest (what the
  producer and a pipe cost on their own, under the same emulation);
- channel: the producer's stdout through the agent, framed and flow-controlled, to the host.
Producers: `head -c N /dev/zero` (the issue's) and `dd bs=64k` (large writes).
Prints MB/s and ratios (target: channel >= 0.7 of the raw floor).

usage: python bench/throughput.py [--mib 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import bare_vm

from matchlock._aio import run as aio_run

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def raw_floor(tmp: Path, nbytes: int) -> float:
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
        raise SystemExit(f"raw floor: got only {got} of {nbytes} bytes")
    return (t1 - t0) if t0 else float("nan")


async def in_guest(nbytes: int) -> dict[str, tuple[float, float]]:
    from matchlock.sandbox import ExecRequest, Sandbox, SandboxConfig

    producers = {
        "head -c": f"head -c {nbytes} /dev/zero",
        "dd bs=64k": f"dd if=/dev/zero bs=65536 count={nbytes // 65536} 2>/dev/null",
    }
    sb = Sandbox(SandboxConfig(image="matchlock/busybox"))
    out: dict[str, tuple[float, float]] = {}
    try:
        await sb.start()

        async def run(cmd: str) -> tuple[float, int]:
            got = 0
            t0 = time.perf_counter()
            proc = await sb.exec(ExecRequest(shell=cmd, env=(("PATH", PATH),)))
            async for _fd, data in proc:
                got += len(data)
            st = await proc.wait()
            if st.exit_code != 0:
                raise SystemExit(f"{cmd}: {st}")
            return time.perf_counter() - t0, got

        for name, cmd in producers.items():
            floor, _ = await run(f"{cmd} | cat > /dev/null")
            chan, got = await run(cmd)
            if got != nbytes:
                raise SystemExit(f"{name}: got {got} of {nbytes} bytes")
            out[name] = (floor, chan)
    finally:
        await sb.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    n = args.mib << 20
    mb = n / 1e6
    with tempfile.TemporaryDirectory() as d:
        raw = raw_floor(Path(d), n)
    results = aio_run(in_guest(n))
    print(f"{args.mib} MiB of guest stdout to the host")
    print(f"raw floor (virtio-serial, no protocol): {mb / raw:7.1f} MB/s")
    for name, (floor, chan) in results.items():
        print(f"{name:10s} producer floor (guest pipe): {mb / floor:7.1f} MB/s   "
              f"channel: {mb / chan:7.1f} MB/s   channel/raw {raw / chan:.2f}   "
              f"channel/producer {floor / chan:.2f}")
    print("target: channel/raw >= 0.7")


if __name__ == "__main__":
    main()
