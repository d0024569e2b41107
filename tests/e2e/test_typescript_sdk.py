"""The TypeScript SDK against the real `matchlock rpc` of this venv, booting real VMs:
its e2e suite (every exec mode, files, cancel, port forward, allow-list, secrets, close)
and the runnable examples/typescript programs. Afterwards nothing may be left behind.

Network callbacks run against a real HTTPS upstream (the `upstreams` fixture of
test_intercept.py) and are judged by what it logged: test_typescript_network_hooks (a
callback adds a header; one past its deadline blocks, /mutate being the positive
control in the same VM) and test_typescript_network_hooks_example
(examples/typescript/network_hooks.ts, as test_sdk_examples.py runs the Python one)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import residue
from tests.e2e.test_intercept import upstreams  # noqa: F401 - the module's fixture
from tests.typescript_sdk import build_tests, ensure_installed, node, npm

pytestmark = pytest.mark.e2e


def _cli() -> Path:
    matchlock = Path(sys.executable).parent / "matchlock"
    if not matchlock.exists():
        pytest.fail(f"{matchlock} is missing: run ./scripts/install.sh", False)
    return matchlock


def test_typescript_sdk_e2e(ml_env, state_home, qemu_present):
    matchlock = _cli()
    ensure_installed()
    before = residue(state_home)
    env = {**ml_env, "MATCHLOCK_BIN": str(matchlock), "MATCHLOCK_TEST_IMAGE": "matchlock/busybox"}
    out = npm("run", "test:e2e", env=env, timeout=1500)
    m = re.search(r"^(?:#|ℹ) pass (\d+)$", out, re.M)
    assert m and int(m.group(1)) >= 20, out[-3000:]
    assert re.search(r"^(?:#|ℹ) fail 0$", out, re.M), out[-3000:]
    assert not re.search(r"^(?:#|ℹ) (skipped|todo|cancelled) [1-9]", out, re.M), out[-3000:]
    after = residue(state_home)
    assert after["qemu"] == before["qemu"], "a TypeScript test left a VM running"
    assert after["namespaces"] == before["namespaces"], "a TypeScript test left a netns"
    assert after["mounts"] == before["mounts"]


def _api_requests(upstreams, mark: int) -> list[dict]:  # noqa: F811
    return [r for r in upstreams.records("req", since=mark)
            if r["server"].startswith(upstreams.api)]


def test_typescript_network_hooks(ml_env, upstreams, debian_image, state_home,  # noqa: F811
                                  qemu_present):
    build = build_tests()
    before = residue(state_home)
    mark = upstreams.mark()
    env = {**ml_env, "MATCHLOCK_BIN": str(_cli()), "MATCHLOCK_E2E_IMAGE": debian_image,
           "MATCHLOCK_E2E_API_IP": upstreams.api, "MATCHLOCK_UPSTREAM_CA": str(upstreams.ca)}
    test_js = build / "sdk" / "typescript" / "test" / "e2e-net" / "network_hooks.test.js"
    proc = node("--test", "--test-timeout=300000", test_js, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"^(?:#|ℹ) pass 1$", out, re.M), out[-3000:]
    assert re.search(r"^(?:#|ℹ) fail 0$", out, re.M), out[-3000:]
    reqs = _api_requests(upstreams, mark)
    assert [r["target"] for r in reqs] == ["/mutate"], reqs  # /slow never arrived
    assert reqs[0]["headers"]["x-ts-hook"] == "GET /mutate"
    assert residue(state_home) == before, "the TypeScript hooks test left something behind"


def test_typescript_network_hooks_example(ml_env, upstreams, debian_image,  # noqa: F811
                                          state_home, qemu_present):
    build = build_tests()
    before = residue(state_home)
    mark = upstreams.mark()
    env = {**ml_env, "MATCHLOCK_BIN": str(_cli()), "MATCHLOCK_EXAMPLE_IMAGE": debian_image,
           "EXAMPLE_API_URL": "https://api.test/", "EXAMPLE_API_IP": upstreams.api,
           "MATCHLOCK_UPSTREAM_CA": str(upstreams.ca)}
    example = build / "examples" / "typescript" / "network_hooks.js"
    proc = node(example, env=env, timeout=300, cwd=example.parent)
    assert proc.returncode == 0, f"network_hooks.ts failed:\n{proc.stdout}\n{proc.stderr}"
    assert "ok: the callback blocked /admin" in proc.stdout, proc.stdout
    reqs = _api_requests(upstreams, mark)
    assert [r["target"] for r in reqs] == ["/"], reqs  # /admin never arrived
    assert reqs[0]["headers"]["x-agent"] == "matchlock-example"
    # An example closes its VM but keeps it (as a user's program would): nothing may run.
    after = residue(state_home)
    for kind in ("qemu", "namespaces", "mounts"):
        assert after[kind] == before[kind], f"network_hooks.ts left {kind} behind"
