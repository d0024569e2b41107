"""One scripted sequence (launch with env and a secret, buffered/streamed/piped exec,
binary file round trip, listing, the secret's placeholder, a file error code) run
through the Python, Go and TypeScript SDKs against this checkout's `matchlock rpc` with
real VMs: all three must report identical results (the Go and TypeScript twins of the
script: sdk/go/internal/cmd/sequence, sdk/typescript/test/tools/sequence.ts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import residue
from tests.gotool import SDK, check, run_go
from tests.typescript_sdk import build_tests, node

pytestmark = pytest.mark.e2e

IMAGE = "matchlock/busybox"
OUR_CLI = str(Path(sys.executable).parent / "matchlock")

PY_SEQUENCE = r'''
import io, json, sys
from matchlock import Client, RPCError, Sandbox

out = {}
with Client() as c:
    c.launch(Sandbox(sys.argv[1]).with_env("GREETING", "hi")
             .add_secret("API_KEY", "sk-parity", "api.test"))
    r = c.exec("echo $GREETING; echo err >&2; exit 3")
    out["exec"] = [r.exit_code, r.stdout, r.stderr]
    so, se = io.StringIO(), io.StringIO()
    r = c.exec_stream("for i in 1 2 3; do echo line$i; done; echo e >&2", stdout=so, stderr=se)
    out["stream"] = [r.exit_code, so.getvalue(), se.getvalue()]
    so = io.StringIO()
    r = c.exec_pipe("tr a-z A-Z", stdin=io.StringIO("piped text\n"), stdout=so)
    out["pipe"] = [r.exit_code, so.getvalue()]
    c.write_file("/tmp/parity.bin", b"\x00\x01binary\xff\n", mode=0o600)
    out["read"] = c.read_file("/tmp/parity.bin").hex()
    out["list"] = [[f.name, f.size, f.mode & 0o777, f.is_dir] for f in c.list_files("/tmp")
                   if f.name == "parity.bin"]
    seen = c.exec("echo $API_KEY").stdout
    out["secret_is_placeholder"] = seen.startswith("SANDBOX_SECRET_") and "sk-parity" not in seen
    try:
        c.read_file("/tmp/missing")
    except RPCError as e:
        out["missing_code"] = e.code
c.remove()
print(json.dumps(out))
'''


def test_python_go_and_typescript_sdks_agree(ml_env, state_home, qemu_present, tmp_path) -> None:
    env = {**ml_env, "MATCHLOCK_BIN": OUR_CLI}
    before = residue(state_home)
    py = subprocess.run([sys.executable, "-c", PY_SEQUENCE, IMAGE], env=env,
                        capture_output=True, text=True, timeout=300)
    assert py.returncode == 0, f"python sequence failed:\n{py.stdout}\n{py.stderr}"
    py_out = json.loads(py.stdout.strip().splitlines()[-1])

    exe = tmp_path / "sequence"
    check(run_go(["build", "-o", str(exe), "./internal/cmd/sequence"], SDK), "go build sequence")
    go = subprocess.run([str(exe), IMAGE], env=env, capture_output=True, text=True, timeout=300)
    assert go.returncode == 0, f"go sequence failed:\n{go.stdout}\n{go.stderr}"
    go_out = json.loads(go.stdout.strip().splitlines()[-1])

    ts_seq = build_tests() / "sdk" / "typescript" / "test" / "tools" / "sequence.js"
    ts = node(ts_seq, IMAGE, env=env, timeout=300)
    assert ts.returncode == 0, f"typescript sequence failed:\n{ts.stdout}\n{ts.stderr}"
    ts_out = json.loads(ts.stdout.strip().splitlines()[-1])

    # Pin the expected values too, so two equally wrong SDKs cannot agree.
    assert py_out["exec"] == [3, "hi\n", "err\n"]
    assert py_out["pipe"] == [0, "PIPED TEXT\n"]
    assert py_out["read"] == b"\x00\x01binary\xff\n".hex()
    assert py_out["list"] == [["parity.bin", 10, 0o600, False]]
    assert py_out["secret_is_placeholder"] is True and py_out["missing_code"] == -32002
    assert py_out["stream"] == [0, "line1\nline2\nline3\n", "e\n"]
    assert go_out == py_out, "the Go SDK disagrees with the Python SDK"
    assert ts_out == py_out, "the TypeScript SDK disagrees with the Python SDK"
    assert residue(state_home) == before, "a sequence left something behind"
