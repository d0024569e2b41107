"""The Python SDK examples (examples/python/), run as a user runs them: `Client()` starts
this package's `matchlock rpc`, real VMs boot on the built-in image. Each example checks
its own output and exits non-zero on a mismatch; afterwards nothing may be left running."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, matchlock_cmd
from tests.e2e.conftest import residue
from tests.e2e.test_intercept import upstreams  # noqa: F401 - the module's fixture

pytestmark = pytest.mark.e2e

EXAMPLES = ROOT / "examples" / "python"


@pytest.fixture(scope="module")
def rpc_server(ml_env) -> None:
    proc = subprocess.run([*matchlock_cmd(), "rpc", "--help"], capture_output=True, text=True,
                          env=ml_env, timeout=60)
    if proc.returncode != 0:
        pytest.fail("`matchlock rpc` is not available, so the SDK examples cannot run: "
                    f"{(proc.stderr or proc.stdout).strip()[-300:]}")


# network_hooks.py needs an upstream (test_network_hooks_example below).
@pytest.mark.parametrize("name", ["basic", "exec_modes", "secrets", "port_forward",
                                  "vfs_hooks"])
def test_example(name: str, rpc_server, ml_env, state_home, qemu_present) -> None:
    before = residue(state_home)
    env = {**ml_env, "MATCHLOCK_EXAMPLE_IMAGE": "matchlock/busybox"}
    env.pop("MATCHLOCK_BIN", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=EXAMPLES)
    assert proc.returncode == 0, f"{name}.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert "ok:" in proc.stdout
    assert residue(state_home)["qemu"] == before["qemu"], "the example left a VM running"


def test_network_hooks_example(upstreams, ml_env, debian_image, state_home,  # noqa: F811
                               qemu_present) -> None:
    """examples/python/network_hooks.py against the real upstream."""
    before = residue(state_home)
    env = {**ml_env, "MATCHLOCK_EXAMPLE_IMAGE": debian_image,
           "EXAMPLE_API_URL": "https://api.test/", "EXAMPLE_API_IP": upstreams.api,
           "MATCHLOCK_UPSTREAM_CA": str(upstreams.ca)}
    env.pop("MATCHLOCK_BIN", None)
    mark = upstreams.mark()
    proc = subprocess.run([sys.executable, str(EXAMPLES / "network_hooks.py")],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=EXAMPLES)
    assert proc.returncode == 0, f"network_hooks.py failed:\n{proc.stdout}\n{proc.stderr}"
    reqs = [r for r in upstreams.records("req", since=mark)
            if r["server"].startswith(upstreams.api)]
    assert [r["target"] for r in reqs] == ["/"]  # /admin never arrived
    assert reqs[0]["headers"]["x-agent"] == "matchlock-example"
    assert residue(state_home)["qemu"] == before["qemu"]
