"""exec round trip and exec output throughput, against floors measured in the same run.

Round trip (p50/p99 over --calls calls, one VM whose supervisor runs in this process):
- floor:   the channel's raw echo (`ping`, a REPLY op: no guest process);
- channel: `true` run straight through the Sandbox (the guest's fork/exec included);
- socket:  `exec` of `true` on the VM's control socket, from this process (blocking client),
           and `info` (a no-op) for the socket and dispatcher alone;
- CLI:     `matchlock exec ID true` as a new process, against Python's own start-up.
Targets (issue 7): socket p50 <= 2x floor; CLI p50 <= floor + Python start-up + 20 ms.

Throughput: the same producer (`dd bs=64k`) through `matchlock run` and through
`matchlock exec` into a running VM, both read by this process from a pipe; MB/s from the
first to the last byte (boot excluded). Target: exec/run >= 0.9.

usage: python bench/exec_rtt.py [--calls 200] [--mib 128] [--cli-calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import env, matchlock_cmd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matchlock._aio import run as aio_run  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def fmt(name: str, xs: list[float]) -> str:
    return f"{name:28s} p50 {pct(xs, 50) * 1000:7.2f} ms   p99 {pct(xs, 99) * 1000:7.2f} ms"


class InProcessVm:
    """A Supervisor on its own loop thread, as a foreground `run` hosts it."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.done: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=lambda: aio_run(self._main()), daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.error:
            raise self.error

    async def _main(self) -> None:
        from matchlock.sandbox import SandboxConfig
        from matchlock.supervisor import Supervisor

        self.loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        self.sup = Supervisor(SandboxConfig(image="matchlock/busybox", no_network=True))
        try:
            await self.sup.start()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            self.error = e
            self.ready.set()
            await self.sup.remove()
            return
        self.ready.set()
        await self.done.wait()
        await self.sup.remove()

    def call(self, coro):  # noqa: ANN001, ANN201
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        assert self.loop is not None and self.done is not None
        self.loop.call_soon_threadsafe(self.done.set)
        self.thread.join(60)


def qemu_cpu_s() -> float:
    """CPU seconds used so far by this process's QEMU child (the in-process VM)."""
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        for c in Path(f"/proc/{os.getpid()}/task/{task}/children").read_text().split():
            if "qemu-system" in os.readlink(f"/proc/{c}/exe"):
                f = Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    raise SystemExit("no QEMU child found")


def in_loop_rtts(vm: InProcessVm, n: int) -> tuple[list[float], list[float], float, float]:
    """Ping and `exec true` round trips, plus QEMU CPU per call of each (less moved by
    the machine's load than wall time: what the guest itself spends)."""
    from matchlock.sandbox import ExecRequest

    async def measure() -> tuple[list[float], list[float], float, float]:
        sb = vm.sup.sandbox
        c0 = qemu_cpu_s()
        pings = [await sb.ping() for _ in range(n)]
        c1 = qemu_cpu_s()
        execs = []
        for _ in range(n):
            t0 = time.perf_counter()
            proc = await sb.exec(ExecRequest(argv=("true",)))
            await proc.wait()
            execs.append(time.perf_counter() - t0)
        c2 = qemu_cpu_s()
        return pings, execs, (c1 - c0) / n, (c2 - c1) / n

    return vm.call(measure())


def socket_rtts(vm_id: str, n: int, method: str = "exec") -> list[float]:
    from matchlock.supervisor.client import ControlClient

    params = {"argv": ["true"]} if method == "exec" else None
    out = []
    with ControlClient(vm_id) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.call(method, params)
            out.append(time.perf_counter() - t0)
            assert method != "exec" or r["exit_code"] == 0, r
    return out


CPU: dict[str, float] = {}  # name -> mean CPU seconds (user + sys) per process


def process_times(argv: list[str], n: int, e: dict[str, str], name: str = "") -> list[float]:
    """Wall times of n runs; their mean CPU time goes to CPU[name] (less load-bound)."""
    import resource

    out = []
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, env=e, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[name] = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n
    return out


def stream_rate(argv: list[str], e: dict[str, str], nbytes: int) -> float:
    """MB/s of a command's stdout, from its first byte to its last."""
    p = subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    got, first = 0, None
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter()
        got += len(chunk)
    last = time.perf_counter()
    assert p.wait() == 0 and got == nbytes, (got, nbytes)
    assert first is not None
    return got / 1e6 / (last - first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--cli-calls", type=int, default=200)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    # Bytecode as an installed package has it (PYTHONDONTWRITEBYTECODE would otherwise
    # recompile every module of every CLI call: ~35 ms here).
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "src" / "matchlock"),
                           quiet=1)
    home = tempfile.mkdtemp(prefix="ml-bench-")
    os.environ["MATCHLOCK_HOME"] = home
    e = {**env(), "MATCHLOCK_HOME": home}

    vm = InProcessVm()
    try:
        vm_id = vm.sup.id
        pings, chan, ping_cpu, exec_cpu = in_loop_rtts(vm, args.calls)
        sock = socket_rtts(vm_id, args.calls)
        info = socket_rtts(vm_id, args.calls, "info")
        py = process_times([sys.executable, "-c", "pass"], 20, e, "py")
        cli = process_times([*matchlock_cmd(), "exec", vm_id, "true"], args.cli_calls, e,
                            "cli")
    finally:
        vm.close()

    floor = pct(pings, 50)
    print(f"exec round trip, {args.calls} calls (CLI: {args.cli_calls}), VM under "
          f"{os.environ.get('MATCHLOCK_ACCEL', 'auto')} accel")
    print(fmt("floor: channel ping", pings))
    print(fmt("channel: exec true", chan))
    print(f"{'QEMU CPU per call':28s} ping {ping_cpu * 1000:6.2f} ms   exec true "
          f"{exec_cpu * 1000:6.2f} ms  (the guest's own cost of a process)")
    print(fmt("control socket: info (no-op)", info))
    print(fmt("control socket: exec true", sock))
    print(fmt("python -c pass", py))
    print(fmt("CLI: matchlock exec ID true", cli))
    print(f"control socket p50 / floor p50          {pct(sock, 50) / floor:6.2f}  "
          f"(target <= 2)")
    print(f"control socket p50 / channel exec p50   {pct(sock, 50) / pct(chan, 50):6.2f}")
    over = pct(cli, 50) - floor - pct(py, 50)
    print(f"CLI p50 - floor - python start-up       {over * 1000:6.1f} ms (target <= 20 ms)")
    print(f"CLI process CPU - python -c pass CPU    {(CPU['cli'] - CPU['py']) * 1000:6.1f} ms "
          f"({CPU['cli'] * 1000:.1f} vs {CPU['py'] * 1000:.1f}: imports, parsing, the client)")

    # Throughput: the same producer through `run` and through `exec`.
    n = args.mib << 20
    producer = ["dd", "if=/dev/zero", "bs=65536", f"count={n // 65536}"]
    run_rates, exec_rates = [], []
    started = subprocess.run([*matchlock_cmd(), "run", "-d", "--image", "matchlock/busybox",
                              "--no-network"], env=e, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    vm_id = started.stdout.strip()
    try:
        for _ in range(args.repeat):
            run_rates.append(stream_rate([*matchlock_cmd(), "run", "--image",
                                          "matchlock/busybox", "--no-network", "--",
                                          *producer], e, n))
            exec_rates.append(stream_rate([*matchlock_cmd(), "exec", vm_id, "--", *producer],
                                          e, n))
    finally:
        subprocess.run([*matchlock_cmd(), "kill", vm_id], env=e, capture_output=True)
        subprocess.run([*matchlock_cmd(), "rm", vm_id], env=e, capture_output=True)
    import shutil

    shutil.rmtree(home, ignore_errors=True)
    r, x = statistics.median(run_rates), statistics.median(exec_rates)
    print(f"{args.mib} MiB of guest stdout (dd bs=64k), median of {args.repeat}")
    print(f"run:  {r:7.1f} MB/s   ({', '.join(f'{v:.0f}' for v in run_rates)})")
    print(f"exec: {x:7.1f} MB/s   ({', '.join(f'{v:.0f}' for v in exec_rates)})")
    print(f"exec / run {x / r:.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
