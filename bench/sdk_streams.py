"""exec_stream throughput of the three SDKs, same run, same real VM kind: each SDK
launches a VM on the built-in image through this checkout's `matchlock rpc` and streams
--mib MiB of `dd` stdout three times into a counting writer (bytes from the first write
to the last). Prints each SDK's median MB/s and its ratio to the Python SDK.

All three ask for raw output payloads (docs/lifecycle.md). With base64 they ran at
57 (Python, 0.70x `matchlock run`), 52 (Go) and 62 MB/s (TypeScript) on this machine;
raw, all three at 105-170 MB/s.

usage: flock /tmp/ml-e2e.lock .venv/bin/python bench/sdk_streams.py [--mib 64]
(needs `npm ci && npm run build` in sdk/typescript, as the install step does)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sdk_go import PY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gotool import SDK as GO_SDK  # noqa: E402
from tests.gotool import go_binary, go_env  # noqa: E402
from tests.typescript_sdk import SDK as TS_SDK  # noqa: E402
from tests.typescript_sdk import node_bin_dir  # noqa: E402

TS = r'''
const { Client, Sandbox } = await import(process.argv[1]);
const [image, mib] = [process.argv[2], Number(process.argv[3])];
const c = new Client();
await c.launch(new Sandbox(image));
const rates = [];
for (let i = 0; i < 3; i++) {
  let n = 0, first = 0, last = 0;
  const w = {
    write(d) {
      if (!n) first = performance.now();
      n += d.length;
      last = performance.now();
      return true;
    },
  };
  await c.execStream(`dd if=/dev/zero bs=65536 count=${mib * 16} 2>/dev/null`, { stdout: w });
  if (n !== mib * 1048576) throw new Error(`stream got ${n} bytes`);
  rates.push(n / 1e6 / ((last - first) / 1000));
}
await c.close();
await c.remove();
rates.sort((a, b) => a - b);
console.log(JSON.stringify({ stream_mb_s: rates[1] }));
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--image", default="matchlock/busybox")
    args = ap.parse_args()
    env = go_env({"MATCHLOCK_BIN": str(Path(sys.executable).parent / "matchlock")})
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env["MATCHLOCK_HOME"] = tmp
        exe = Path(tmp) / "execbench"
        subprocess.run([str(go_binary()), "build", "-o", str(exe), "./internal/cmd/execbench"],
                       cwd=GO_SDK, env=env, check=True)
        runs = {
            # Python and Go: exec("true") once (calls=1), then the streams.
            "python": [sys.executable, "-c", PY, args.image, "1", str(args.mib)],
            "go": [str(exe), args.image, "1", str(args.mib)],
            "typescript": [str(node_bin_dir() / "node"), "--input-type=module", "-e", TS,
                           str(TS_SDK / "dist" / "index.js"), args.image, str(args.mib)],
        }
        for name, argv in runs.items():
            out = subprocess.run(argv, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} SDK failed: {out.stderr.strip()[-2000:]}")
            rates[name] = json.loads(out.stdout.strip().splitlines()[-1])["stream_mb_s"]
    print(f"exec_stream of {args.mib} MiB on a real VM (median of 3 per SDK)")
    for name, r in rates.items():
        print(f"  {name:10}  {r:7.1f} MB/s  {r / rates['python']:.2f}x python")


if __name__ == "__main__":
    main()
