"""The TypeScript SDK against the real `matchlock rpc` of this venv, booting real VMs:
its e2e suite (every exec mode, files, cancel, port forward, allow-list, secrets, close)
and the runnable examples/typescript programs. Afterwards nothing may be left behind."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import residue
from tests.typescript_sdk import ensure_installed, npm

pytestmark = pytest.mark.e2e


def test_typescript_sdk_e2e(ml_env, state_home, qemu_present):
    matchlock = Path(sys.executable).parent / "matchlock"
    if not matchlock.exists():
        pytest.fail(f"{matchlock} is missing: run ./scripts/install.sh", False)
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
