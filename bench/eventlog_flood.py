"""Event-log growth under a guest's flood of blocked DNS and HTTP.

    python3 bench/eventlog_flood.py [--seconds 20] [--baseline REV]

Boots `debian:test` (the e2e image) with an allow-list (intercept mode) and runs, for
--seconds, five threads of python3 in the guest: blocked DNS for one name, blocked DNS for
ever-new names (the case a per-key limit alone does not stop), and three of blocked HTTP to
an IP literal. Then it
measures `<vm dir>/logs/net.jsonl*` while the VM is still up. With --baseline REV the same
flood runs against the sources of REV (`git archive`, e.g. the commit before the bounded
log) in the same run, and the ratio is printed. All traffic stays inside the VM's own
network namespace (nothing is dialled: every request is blocked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
IMAGE = "debian:test"  # the e2e suite's image (python3); `pytest tests/e2e -k debian` makes it

GUEST = r"""
import os, socket, struct, sys, threading, time
secs = float(sys.argv[1])
print("VMID", socket.gethostname(), flush=True)
end = time.monotonic() + secs
counts = {}

def query(name):
    q = struct.pack(">HHHHHH", os.getpid() & 0xFFFF, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)

def dns(kind):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.05)
    n = 0
    while time.monotonic() < end:
        name = "evil.test" if kind == "dns_same" else f"r{n}.evil.test"
        s.sendto(query(name), ("10.213.0.1", 53))
        n += 1
        try:
            s.recv(512)
        except OSError:
            pass
    counts[kind] = counts.get(kind, 0) + n

def http(kind):
    n = 0
    while time.monotonic() < end:
        try:
            c = socket.create_connection(("203.0.113.7", 80), timeout=5)
            c.sendall(b"GET /x HTTP/1.1\r\nHost: 203.0.113.7\r\n\r\n")
            c.recv(4096)
            c.close()
        except OSError:
            pass
        n += 1
    counts[kind] = counts.get(kind, 0) + n

ts = [threading.Thread(target=f, args=(k,)) for f, k in
      ((dns, "dns_same"), (dns, "dns_new"), (http, "http"), (http, "http"), (http, "http"))]
for t in ts:
    t.start()
for t in ts:
    t.join()
for k, n in counts.items():
    print("COUNT", k, n, flush=True)
print("FLOODED", flush=True)
sys.stdin.readline()
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_flood(src: Path, seconds: float, home: Path, base_env: dict | None = None) -> dict:
    """One flood; the event log measured at its end (the e2e test calls this too)."""
    env = dict(base_env or os.environ, PYTHONPATH=str(src), MATCHLOCK_HOME=str(home))
    if "MATCHLOCK_IMAGES_DIR" not in env:  # the e2e suite's own store holds debian:test
        from matchlock.paths import cache_dir

        env["MATCHLOCK_IMAGES_DIR"] = str(cache_dir() / "test-images" / "store")
    env.pop("MATCHLOCK_DEBUG", None)
    cmd = [sys.executable, "-m", "matchlock", "run", "-i", "--image", IMAGE,
           "--allow-host", "allowed.test", "--", "python3", "-c", GUEST, str(seconds)]
    err = tempfile.TemporaryFile()  # noqa: SIM115 - read back after the run
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=err)
    assert p.stdin is not None and p.stdout is not None
    vm_id, counts, result = "", {}, {}
    for raw in p.stdout:
        line = raw.decode().strip()
        if line.startswith("VMID "):
            vm_id = line.split()[1]
        elif line.startswith("COUNT "):
            _, name, n = line.split()
            counts[name] = counts.get(name, 0) + int(n)
        elif line == "FLOODED":
            logs = home / "vms" / vm_id / "logs"
            files = sorted(logs.glob("net.jsonl*"))
            events = [json.loads(x) for f in files for x in f.read_text().splitlines()]
            kinds: dict[str, int] = {}
            for e in events:
                kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
            result = {
                "events": events,
                "bytes": sum(f.stat().st_size for f in files),
                "files": [f.name for f in files],
                "lines": len(events),
                "kinds": kinds,
                "suppressed_count": sum(e["fields"].get("count", 0) for e in events
                                        if e["kind"] == "suppressed"),
                "host_rss_kib": _rss_kib(p.pid),  # the process that runs the VM's stack
            }
            p.stdin.write(b"\n")
            p.stdin.close()
    rc = p.wait(120)
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    if rc != 0 or not result:
        raise RuntimeError(f"flood run failed (rc {rc}): {stderr[-2000:]}")
    result["guest_attempts"] = counts
    result["stderr"] = stderr
    return result


def baseline_src(rev: str, into: Path) -> Path:
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src", "guest"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--baseline", help="git revision to compare with (same flood)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ml-flood-") as tmp:
        runs = {}
        if args.baseline:
            src = baseline_src(args.baseline, Path(tmp) / "baseline")
            runs["baseline"] = run_flood(src, args.seconds, Path(tmp) / "home-base")
        runs["current"] = run_flood(ROOT / "src", args.seconds, Path(tmp) / "home-cur")
    for name, r in runs.items():
        rate = r["bytes"] / args.seconds
        print(f"{name:9s} {r['bytes']:>10,d} B in {args.seconds} s  ({rate * 3600 / 1e6:,.1f} MB/h "
              f"at this rate)  lines {r['lines']:,d}  files {r['files']}  "
              f"host RSS {r['host_rss_kib'] / 1024:.0f} MiB")
        print(f"          kinds {r['kinds']}  suppressed {r['suppressed_count']:,d}  "
              f"guest attempts {r['guest_attempts']}")
    from matchlock.net import eventlog  # the bound the current sources enforce

    print(f"current bound: {eventlog.RATE:.0f} lines/s after a burst of {eventlog.BURST}; "
          f"on disk at most {(eventlog.BACKUPS + 1) * eventlog.MAX_BYTES >> 20} MiB (rotation)")
    if "baseline" in runs:
        ratio = runs["baseline"]["bytes"] / max(1, runs["current"]["bytes"])
        print(f"baseline/current size ratio: {ratio:.1f}x")
    for r in runs.values():
        del r["events"], r["stderr"]
    print(json.dumps({"seconds": args.seconds, "at": time.time(), **runs}))


if __name__ == "__main__":
    main()
