"""The Go SDK (sdk/go) and its examples: `go vet` and the unit tests, which drive the
client against a fake `matchlock rpc` (in-process pipes, and the test binary re-exec'd
as a fake server). The e2e half, against real VMs, is tests/e2e/test_go_sdk.py."""

from __future__ import annotations

import re
import subprocess

from tests.gotool import EXAMPLES, SDK, check, run_go


def test_go_vet_sdk_and_examples() -> None:
    check(run_go(["vet", "./..."], SDK), "go vet ./... (sdk/go)")
    check(run_go(["vet", "-tags", "e2e", "./..."], SDK), "go vet -tags e2e ./... (sdk/go)")
    check(run_go(["vet", "./..."], EXAMPLES), "go vet ./... (examples/go)")


def test_gofmt_clean() -> None:
    goroot = check(run_go(["env", "GOROOT"], SDK), "go env GOROOT").strip()
    out = subprocess.run([f"{goroot}/bin/gofmt", "-l", str(SDK), str(EXAMPLES)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "", f"not gofmt'ed:\n{out.stdout}{out.stderr}"


def test_go_unit_tests() -> None:
    out = check(run_go(["test", "-count=1", "-race", "./..."], SDK), "go test ./... (sdk/go)")
    assert re.search(r"^ok\s+matchlock\.dev/go/pkg/sdk\b", out, re.M), out
