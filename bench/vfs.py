"""VFS throughput: a `-v` mount against the guest's own root disk, in the same VM.

Sequential: `dd` writes a file of --mib MiB (bs=1M) and `sync`s, the guest's page cache is
dropped, `dd` reads it back. Small files: a shell creates N files (`echo > f`, no fork),
stats each (`[ -f ]`), then one `rm -rf` deletes them; ops/s counts the three operations
per file. The floor is the guest's root disk (overlay on a virtio-blk ext4) in the same VM,
measured in the same run. Targets: sequential >= 0.5 of the floor, small files >= 0.2.

Where the time goes: the host server's own time per request (on the VFS thread and its
workers) and its request counts by opcode; the rest of each request's wall time is the
guest's FUSE path and the virtio-serial channel.

Rounds alternate root and vfs (load drift hits both); times are medians of the rounds,
request counts the last round's.

usage: python bench/vfs.py [--mib 1024] [--files 10000] [--mode overlay|host_fs] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import median

from matchlock._aio import run as aio_run

PATH = ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


async def measure(host_dir: Path, mib: int, files: int, mode: str, rounds: int) -> dict:
    from matchlock.sandbox import ExecRequest, Sandbox, SandboxConfig
    from matchlock.vfs import mount_config

    mounts = mount_config([f"{host_dir}:/workspace/v{'' if mode == 'overlay' else ':' + mode}"],
                          None, [])
    sb = Sandbox(SandboxConfig(image="matchlock/busybox", memory_mib=1536,
                               disk_size_mib=max(4096, mib * 3), mounts=mounts))
    results: dict = {}
    try:
        await sb.start()
        server = sb.vfs.server  # type: ignore[union-attr]

        async def sh(cmd: str) -> float:
            err = bytearray()
            t0 = time.perf_counter()
            proc = await sb.exec(ExecRequest(argv=("sh", "-c", cmd), env=(PATH,), cwd="/"))
            async for fd, data in proc:
                if fd == 2:
                    err.extend(data)
            st = await proc.wait()
            dt = time.perf_counter() - t0
            if st.exit_code != 0:
                raise SystemExit(f"{cmd}: {st} {err.decode(errors='replace')}")
            return dt

        # Rounds alternate root and vfs so that a change in the machine's load hits both
        # sides alike; each time is the median of its rounds.
        runs: dict[str, list[dict]] = {"root": [], "vfs": []}
        for _ in range(rounds):
            for where, d in (("root", "/bench-root"), ("vfs", "/workspace/v")):
                await sh(f"mkdir -p {d}")
                counts0 = dict(server.fs.counts)
                host0, work0 = server.host_seconds, server.worker_seconds
                bounced0 = server.bounced
                w = await sh(f"dd if=/dev/zero of={d}/big bs=1M count={mib} 2>/dev/null && sync")
                await sh("sync; echo 3 > /proc/sys/vm/drop_caches")
                r = await sh(f"dd if={d}/big of=/dev/null bs=1M 2>/dev/null")
                await sh(f"rm -f {d}/big")
                mk = await sh(f"mkdir {d}/s && cd {d}/s && i=0; while [ $i -lt {files} ]; do "
                              f"echo > f$i; i=$((i+1)); done")
                st = await sh(f"cd {d}/s && i=0; while [ $i -lt {files} ]; do "
                              f"[ -f f$i ] || exit 1; i=$((i+1)); done")
                rm = await sh(f"rm -rf {d}/s")
                counts = {k: v - counts0.get(k, 0) for k, v in server.fs.counts.items()
                          if v - counts0.get(k, 0)}
                runs[where].append({
                    "write_s": w, "read_s": r, "create_s": mk, "stat_s": st, "delete_s": rm,
                    "host_s": server.host_seconds - host0,
                    "worker_s": server.worker_seconds - work0, "requests": counts,
                    "bounced": server.bounced - bounced0,
                })
        for where, rs in runs.items():
            out = {k: median([x[k] for x in rs]) for k in
                   ("write_s", "read_s", "create_s", "stat_s", "delete_s", "host_s",
                    "worker_s")}
            out["requests"] = rs[-1]["requests"]  # the last round's
            out["bounced"] = rs[-1]["bounced"]
            results[where] = out
    finally:
        await sb.close()
    return results


def host_fs_floor(where: Path, files: int) -> float:
    """Seconds per file for create+stat+unlink done by the host itself on the file system
    that holds the snapshot's upper layer: the part of each small-file cycle that is the
    host's disk, not the VFS."""
    import os

    d = Path(tempfile.mkdtemp(dir=where))
    t0 = time.perf_counter()
    for i in range(files):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"\n")
        os.close(fd)
    for i in range(files):
        os.stat(d / f"f{i}")
    for i in range(files):
        os.unlink(d / f"f{i}")
    dt = time.perf_counter() - t0
    d.rmdir()
    return dt / files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--mode", choices=["overlay", "host_fs"], default="overlay")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = aio_run(measure(Path(d), args.mib, args.files, args.mode, args.rounds))
    mb = args.mib * (1 << 20) / 1e6
    n = args.files
    root, vfs = res["root"], res["vfs"]

    def ops(r: dict) -> float:
        return 3 * n / (r["create_s"] + r["stat_s"] + r["delete_s"])

    print(f"VFS ({args.mode} -v mount) against the guest root disk, same VM")
    print(f"{'':22s}{'root':>12s}{'vfs':>12s}{'ratio':>8s}")
    for label, key in (("seq write MB/s", "write_s"), ("seq read MB/s", "read_s")):
        a, b = mb / root[key], mb / vfs[key]
        print(f"{label:22s}{a:12.1f}{b:12.1f}{b / a:8.2f}")
    for label, key in (("create files/s", "create_s"), ("stat files/s", "stat_s"),
                       ("delete files/s", "delete_s")):
        a, b = n / root[key], n / vfs[key]
        print(f"{label:22s}{a:12.0f}{b:12.0f}{b / a:8.2f}")
    a, b = ops(root), ops(vfs)
    print(f"{'small-file ops/s':22s}{a:12.0f}{b:12.0f}{b / a:8.2f}")
    seq = min(mb / vfs["write_s"] / (mb / root["write_s"]),
              mb / vfs["read_s"] / (mb / root["read_s"]))
    print(f"targets: sequential >= 0.5 (worst {seq:.2f}), small files >= 0.2 ({b / a:.2f})")
    total = sum(vfs["requests"].values())
    wall = sum(vfs[k] for k in ("write_s", "read_s", "create_s", "stat_s", "delete_s"))
    print(f"\nwhere the VFS time went: {total} FUSE requests in {wall:.1f} s of guest wall time")
    print(f"  host server: {vfs['host_s']:.2f} s on the VFS thread "
          f"({vfs['host_s'] / max(total, 1) * 1e6:.0f} us/request), "
          f"{vfs['worker_s']:.2f} s in workers (big reads/writes, fsync)")
    print(f"  READ replies through the bounce disk: {vfs['bounced']} of "
          f"{vfs['requests'].get('read', 0)}")
    print(f"  guest FUSE + channel: the rest, {wall - vfs['host_s'] - vfs['worker_s']:.1f} s")
    from matchlock.paths import state_dir

    state_dir().mkdir(parents=True, exist_ok=True)
    floor = host_fs_floor(state_dir(), min(n, 2000))
    print(f"  of the host server's time, the host disk alone (create+write+stat+unlink by the "
          f"host on the upper layer's file system): {floor * 1e6:.0f} us per file, "
          f"{floor * n:.1f} s for {n} files")
    print("  requests: " + ", ".join(f"{k} {v}" for k, v in
                                     sorted(vfs["requests"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
