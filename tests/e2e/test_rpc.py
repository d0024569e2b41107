"""`matchlock rpc` over real pipes with real VMs: the unmodified reference SDK (0.2.17)
drives our CLI, and the protocol's edges (bad lines, requests before create, a line
over the reference's 10 MiB limit, stdin EOF without close) hold."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import matchlock_cmd
from tests.e2e.conftest import residue
from tests.e2e.refsdk import run_ref

pytestmark = pytest.mark.e2e

OUR_CLI = str(Path(sys.executable).parent / "matchlock")

REF_SCRIPT = r'''
import io, json
from matchlock import Client, Sandbox

out = {}
with Client() as client:
    vm = client.launch(Sandbox("matchlock/busybox").with_env("GREETING", "hi"))
    out["vm"] = vm
    r = client.exec("echo $GREETING; echo err >&2; exit 3")
    out["exec"] = [r.exit_code, r.stdout, r.stderr]
    so, se = io.StringIO(), io.StringIO()
    r = client.exec_stream("for i in 1 2 3; do echo line$i; done; echo e >&2", stdout=so,
                           stderr=se)
    out["stream"] = [r.exit_code, so.getvalue(), se.getvalue()]
    so = io.StringIO()
    r = client.exec_pipe("tr a-z A-Z", stdin=io.StringIO("piped text\n"), stdout=so)
    out["pipe"] = [r.exit_code, so.getvalue()]
    client.write_file("/tmp/ref.txt", b"from the reference\n", mode=0o600)
    out["read"] = client.read_file("/tmp/ref.txt").decode()
    out["list"] = [[f.name, f.size, f.mode & 0o777] for f in client.list_files("/tmp")
                   if f.name == "ref.txt"]
print(json.dumps(out))
'''


def test_reference_sdk_drives_our_cli(ml, ml_env, state_home, qemu_present) -> None:
    before = residue(state_home)["qemu"]
    proc = run_ref(REF_SCRIPT, env={"MATCHLOCK_BIN": OUR_CLI,
                                    "MATCHLOCK_HOME": ml_env["MATCHLOCK_HOME"],
                                    "MATCHLOCK_RESOLV_CONF": ml_env["MATCHLOCK_RESOLV_CONF"]},
                   check=False, timeout=240)
    assert proc.returncode == 0, f"reference SDK script failed:\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["exec"] == [3, "hi\n", "err\n"]
    assert out["stream"] == [0, "line1\nline2\nline3\n", "e\n"]
    assert out["pipe"] == [0, "PIPED TEXT\n"]
    assert out["read"] == "from the reference\n"
    assert out["list"] == [["ref.txt", 19, 0o600]]
    # close stopped the VM (its record stays for `matchlock rm`, as with the reference)
    assert residue(state_home)["qemu"] == before
    listed = ml("list").stdout.decode()
    assert out["vm"] in listed and "running" not in listed.split(out["vm"])[1].split("\n")[0]
    ml("rm", out["vm"], check=True)


class Rpc:
    """A raw `matchlock rpc` process on pipes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.p = subprocess.Popen([*matchlock_cmd(), "rpc"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def send(self, line: bytes) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + b"\n")
        self.p.stdin.flush()

    def call(self, method: str, rid: int, params: dict | None = None) -> dict:
        self.send(json.dumps({"jsonrpc": "2.0", "method": method, "id": rid,
                              "params": params or {}}).encode())
        return self.read()

    def read(self) -> dict:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert line, f"rpc exited: {self.p.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
        return json.loads(line)


def test_protocol_edges_and_eof_without_close(ml, ml_env, state_home, qemu_present) -> None:
    rpc = Rpc(ml_env)
    try:
        rpc.send(b"{not json")
        assert rpc.read()["error"] == {"code": -32700, "message": "Parse error"}
        assert rpc.call("no_such_method", 1)["error"]["code"] == -32601
        assert rpc.call("exec", 2, {"command": "true"})["error"] == {
            "code": -32000, "message": "VM not created"}
        assert rpc.call("read_file", 3, {"path": "/etc/hostname"})["error"]["code"] == -32000
        assert rpc.call("create", 4, {"image": ""})["error"]["code"] == -32602
        err = rpc.call("create", 5, {"image": "matchlock/busybox", "vfs": {
            "workspace": "/workspace", "mounts": {"/workspace": {
                "type": "host_fs", "host_path": "/nonexistent/matchlock-test"}}}})["error"]
        assert err["code"] == -32602 and "does not exist" in err["message"]
        err = rpc.call("create", 5, {"image": "matchlock/busybox", "privileged": True})["error"]
        assert err["code"] == -32000 and "not available" in err["message"]

        created = rpc.call("create", 6, {"image": "matchlock/busybox"})
        vm = created["result"]["id"]
        again = rpc.call("create", 7, {"image": "matchlock/busybox"})
        assert again["error"]["code"] == -32602 and vm in again["error"]["message"]

        # A VM like any other: `matchlock exec` reaches it through its control socket.
        via_cli = ml("exec", vm, "--", "echo", "via-cli", check=True)
        assert via_cli.stdout == b"via-cli\n"

        # One line over the reference's 10 MiB scanner limit (ours is 16 MiB).
        big = bytes(range(256)) * (11 * 4096)  # 11 MiB -> ~15 MiB of base64
        r = rpc.call("write_file", 8, {"path": "/tmp/big", "content":
                                       base64.b64encode(big).decode(), "mode": 420})
        assert r == {"jsonrpc": "2.0", "result": {}, "id": 8}
        r = rpc.call("exec", 9, {"command": "wc -c < /tmp/big; md5sum /tmp/big"})
        out = base64.b64decode(r["result"]["stdout"]).decode().split()
        assert out[0] == str(len(big)) and out[1] == hashlib.md5(big).hexdigest()

        assert vm in ml("list").stdout.decode()
        rpc.p.stdin.close()  # type: ignore[union-attr]  # EOF, no `close`
        assert rpc.p.wait(timeout=60) == 0
        assert rpc.p.stdout.read() == b""  # type: ignore[union-attr]
    finally:
        if rpc.p.poll() is None:
            rpc.p.kill()
            rpc.p.wait()
    assert vm not in ml("list").stdout.decode()
    left = residue(state_home, (vm,))
    mine = {k: [x for x in v if vm.removeprefix("vm-") in str(x)] for k, v in left.items()}
    assert {k: v for k, v in mine.items() if v} == {}, left
    assert left["qemu"] == [] and left["namespaces"] == []


def test_sigterm_removes_the_vm(ml, ml_env, state_home, qemu_present) -> None:
    rpc = Rpc(ml_env)
    try:
        vm = rpc.call("create", 1, {"image": "matchlock/busybox"})["result"]["id"]
        r = rpc.call("exec", 2, {"command": "echo up"})
        assert base64.b64decode(r["result"]["stdout"]) == b"up\n"  # positive control
        rpc.p.send_signal(signal.SIGTERM)
        assert rpc.p.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if rpc.p.poll() is None:
            rpc.p.kill()
            rpc.p.wait()
    assert vm not in ml("list").stdout.decode()
    left = residue(state_home, (vm,))
    assert left["qemu"] == [] and left["namespaces"] == [] and vm not in left["vm_dirs"]
