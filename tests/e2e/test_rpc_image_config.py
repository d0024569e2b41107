"""`image_config` overrides and `launch_entrypoint` over `matchlock rpc` (spec §2.1.1,
§2.1.4 step 5), with a real VM of an image whose config sets every field: what the guest
process sees, what reached the VM log, and a failing entrypoint that fails create and
leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import residue

pytestmark = pytest.mark.e2e

SCRIPT = r'''
import json, sys
from matchlock import Client, ImageConfig, MatchlockError, Sandbox

image = sys.argv[1]
out = {}
with Client() as c:
    c.launch(Sandbox(image).with_image_config(ImageConfig(
        user="root", working_dir="/tmp", entrypoint=["sh", "-c"],
        cmd=["echo entrypoint-ran-as-$(id -u) in $(pwd); sleep 60"],
        env={"ONLY": "override"})))
    r = c.exec("pwd; id -u; echo IMG=${IMG_VAR:-unset} ONLY=$ONLY; ps | grep -c '[s]leep 60'")
    out["exec"] = r.stdout.split()
    out["log"] = c.log()
# defaults: the image's own config (positive control for the overrides above)
with Client() as c:
    c.launch(Sandbox(image))
    r = c.exec("pwd; id -un; echo IMG=${IMG_VAR:-unset}")
    out["plain"] = r.stdout.split()
try:
    with Client() as c:
        c.launch(Sandbox(image).with_entrypoint("sh", "-c").with_image_config(
            ImageConfig(cmd=["echo about-to-fail; exit 3"])))
    out["failed"] = None
except MatchlockError as e:
    out["failed"] = str(e)
print("RESULT " + json.dumps(out))
'''


def test_image_config_and_entrypoint(ml, ml_env, user_image, state_home, qemu_present):
    before = residue(state_home)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "imgcfg.py"
        path.write_text(SCRIPT)
        env = {**ml_env}
        env.pop("MATCHLOCK_BIN", None)
        proc = subprocess.run([sys.executable, str(path), user_image], env=env, text=True,
                              capture_output=True, timeout=400, cwd=d)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    # overrides: working dir, user, the image env replaced whole, the entrypoint running
    assert out["exec"][:4] == ["/tmp", "0", "IMG=unset", "ONLY=override"], out
    assert int(out["exec"][4]) >= 1  # the entrypoint still runs, detached
    assert "entrypoint-ran-as-0 in /tmp" in out["log"]
    assert out["plain"] == ["/srv/work", "app", "IMG=from-image"]
    assert out["failed"] is not None and "start image entrypoint: exit code 3" in out["failed"]
    after = residue(state_home)
    assert after["qemu"] == before["qemu"]
