"""The TypeScript SDK's own checks (no VMs): `npm test` builds it, type-checks the
reference-style programs under strict tsc and runs the unit tests against a fake
`matchlock rpc`."""

from __future__ import annotations

import re

from tests.typescript_sdk import ensure_installed, node_bin_dir, npm


def test_node_is_new_enough():
    import subprocess

    out = subprocess.run([str(node_bin_dir() / "node"), "--version"], capture_output=True,
                         text=True, check=True).stdout.strip()
    major = int(re.match(r"v(\d+)", out).group(1))
    assert major >= 20, f"the SDK needs Node >= 20, the venv has {out}"


def test_npm_test():
    ensure_installed()
    out = npm("test")
    m = re.search(r"^(?:#|ℹ) pass (\d+)$", out, re.M)
    assert m and int(m.group(1)) > 0, out[-3000:]
    assert re.search(r"^(?:#|ℹ) fail 0$", out, re.M), out[-3000:]
    assert not re.search(r"^(?:#|ℹ) (skipped|todo|cancelled) [1-9]", out, re.M), out[-3000:]
