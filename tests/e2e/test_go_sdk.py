"""The Go SDK against the real CLI: `go test -tags e2e` (sdk/go/pkg/sdk/e2e_test.go)
launches this checkout's `matchlock rpc` and boots real VMs (every exec mode, cancel,
5 MB binary files, concurrent port-forward connections, allow-list, secrets, bad
input), then the runnable Go examples run as a user runs them. Afterwards nothing may
be left behind (VMs, namespaces, sockets, state rows).

Network callbacks (test_go_network_hooks: one mutates a header, one times out and is
blocked) and examples/go/network_hooks are judged by what the upstream received; the Go
client side of both hook kinds is also unit-tested against a fake server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import residue
from tests.e2e.test_intercept import upstreams  # noqa: F401 - the module's fixture
from tests.gotool import EXAMPLES, SDK, check, run_go

pytestmark = pytest.mark.e2e

# MATCHLOCK_GO_E2E_BIN: run against another build's CLI (e.g. a branch's venv).
OUR_CLI = os.environ.get("MATCHLOCK_GO_E2E_BIN") or str(Path(sys.executable).parent / "matchlock")
RUNNABLE = ["basic", "exec_modes", "secrets", "port_forward", "vfs_hooks"]


@pytest.fixture
def go_env(ml_env, qemu_present) -> dict[str, str]:
    return {"MATCHLOCK_BIN": OUR_CLI, "MATCHLOCK_HOME": ml_env["MATCHLOCK_HOME"],
            "MATCHLOCK_RESOLV_CONF": ml_env["MATCHLOCK_RESOLV_CONF"],
            "MATCHLOCK_IMAGES_DIR": ml_env["MATCHLOCK_IMAGES_DIR"]}  # the suite's store


def test_go_sdk_e2e(go_env, state_home) -> None:
    before = residue(state_home)
    proc = run_go(["test", "-count=1", "-tags", "e2e", "-run", "^TestE2E", "-v", "./pkg/sdk/"],
                  SDK, env=go_env, timeout=900)
    out = check(proc, "go test -tags e2e")
    passed = re.findall(r"^--- PASS: (TestE2E\w+)", out, re.M)
    assert len(passed) >= 4 and "--- FAIL" not in out and "--- SKIP" not in out, out
    assert residue(state_home) == before, "the Go e2e tests left something behind"


def test_go_examples(go_env, ml_env, state_home, tmp_path) -> None:
    check(run_go(["build", "-o", str(tmp_path) + "/", "./..."], EXAMPLES), "go build examples")
    for name in RUNNABLE:
        before = residue(state_home)
        proc = subprocess.run([str(tmp_path / name)], env={**ml_env, **go_env},
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
        assert "ok:" in proc.stdout and "FAILED" not in proc.stdout + proc.stderr, proc.stdout
        assert residue(state_home) == before, f"examples/go/{name} left something behind"


def test_go_network_hooks(go_env, upstreams, debian_image, state_home) -> None:  # noqa: F811
    before = residue(state_home)
    mark = upstreams.mark()
    env = {**go_env, "MATCHLOCK_E2E_IMAGE": debian_image, "MATCHLOCK_E2E_API_IP": upstreams.api,
           "MATCHLOCK_UPSTREAM_CA": str(upstreams.ca)}
    proc = run_go(["test", "-count=1", "-tags", "e2e", "-run", "^TestHooksE2E", "-v",
                   "./pkg/sdk/"], SDK, env=env, timeout=600)
    out = check(proc, "go test -run TestHooksE2E")
    assert "--- PASS: TestHooksE2ENetworkCallbacks" in out, out
    reqs = [r for r in upstreams.records("req", since=mark)
            if r["server"].startswith(upstreams.api)]
    assert [r["target"] for r in reqs] == ["/mutate"], reqs  # /slow never arrived
    assert reqs[0]["headers"]["x-go-hook"] == "GET /mutate"
    assert residue(state_home) == before


def test_go_network_hooks_example(go_env, upstreams, debian_image, state_home,  # noqa: F811
                                  tmp_path) -> None:
    """examples/go/network_hooks against the real upstream, judged by its own log."""
    check(run_go(["build", "-o", str(tmp_path) + "/", "./network_hooks"], EXAMPLES),
          "go build network_hooks")
    before = residue(state_home)
    mark = upstreams.mark()
    env = {**go_env, "MATCHLOCK_EXAMPLE_IMAGE": debian_image,
           "EXAMPLE_API_URL": "https://api.test/", "EXAMPLE_API_IP": upstreams.api,
           "MATCHLOCK_UPSTREAM_CA": str(upstreams.ca)}
    proc = subprocess.run([str(tmp_path / "network_hooks")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"network_hooks failed:\n{proc.stdout}\n{proc.stderr}"
    reqs = [r for r in upstreams.records("req", since=mark)
            if r["server"].startswith(upstreams.api)]
    assert [r["target"] for r in reqs] == ["/"]  # /admin never arrived
    assert reqs[0]["headers"]["x-agent"] == "matchlock-go-example"
    assert residue(state_home) == before
