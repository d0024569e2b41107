"""`create` params (the reference's api.Config) -> SandboxConfig, and the stdio Target
before it has a VM."""

from __future__ import annotations

import asyncio
import json

import pytest

from matchlock.errors import ErrorCode, UsageError
from matchlock.net.types import PrivateException
from matchlock.rpc._create import plan_create
from matchlock.rpc._dispatcher import Session
from matchlock.rpc.stdio import StdioTarget


def test_minimal_create_takes_the_defaults():
    plan = plan_create({"image": "alpine:latest"})
    c = plan.config
    assert (c.image, c.cpus, c.memory_mib, c.disk_size_mib) == ("alpine:latest", 1.0, 512, 5120)
    assert c.network.mode == "open" and not c.no_network
    assert not c.network.allow_private_ranges  # no network object: block_private_ips=true
    assert not plan.launch_entrypoint


def test_resources_env_user_kernel_launch():
    plan = plan_create({
        "image": "busybox", "resources": {"cpus": 1.5, "memory_mb": 256, "disk_size_mb": 0,
                                          "timeout_seconds": 30},
        "env": {"A": "1"}, "image_config": {"user": "nobody"},
        "kernel": {"ref": "file:///tmp/vmlinuz"}, "launch_entrypoint": True})
    c = plan.config
    assert (c.cpus, c.memory_mib, c.disk_size_mib) == (1.5, 256, 5120)  # <= 0 keeps default
    assert c.env == (("A", "1"),) and c.user == "nobody" and c.kernel == "/tmp/vmlinuz"
    assert plan.launch_entrypoint


def test_network_as_the_python_sdk_sends_it():
    plan = plan_create({"image": "busybox", "network": {
        "allowed_hosts": ["api.example.com"], "block_private_ips": True,
        "secrets": {"TOKEN": {"value": "s3cr3t", "hosts": ["api.example.com"],
                              "placeholder": "SANDBOX_SECRET_abc123"}},
        "dns_servers": ["1.1.1.1"], "hostname": "box", "mtu": 1400,
        "add_hosts": [{"host": "db.internal", "ip": "10.1.2.3"}],
        "allow_private": ["10.1.2.3:5432"]}})
    n = plan.config.network
    assert n.mode == "intercept" and n.allow_hosts == ("api.example.com",)
    (s,) = n.secrets
    assert (s.name, s.value, s.hosts, s.placeholder) == (
        "TOKEN", "s3cr3t", ("api.example.com",), "SANDBOX_SECRET_abc123")
    assert n.dns_servers == ("1.1.1.1",) and n.mtu == 1400
    assert n.add_hosts == (("db.internal", "10.1.2.3"),)
    assert n.allow_private == (PrivateException(net="10.1.2.3/32", port=5432),)
    assert plan.config.hostname == "box" and not n.allow_private_ranges


def test_secret_hosts_join_the_allow_list_and_get_a_placeholder():
    n = plan_create({"image": "b", "network": {"secrets": {
        "K": {"value": "v", "hosts": ["x.test"]}}, "block_private_ips": True}}).config.network
    assert n.mode == "intercept" and "x.test" in n.allow_hosts
    assert n.secrets[0].placeholder.startswith("SANDBOX_SECRET_")


def test_block_private_ips_false_lifts_the_private_set_and_env_adds_exceptions():
    n = plan_create({"image": "b", "network": {"allowed_hosts": [],
                                               "block_private_ips": False}},
                    env_allow_private="192.168.7.0/24").config.network
    assert n.allow_private_ranges
    assert n.allow_private == (PrivateException(net="192.168.7.0/24"),)
    # a network object without the field means false (it replaces the default wholesale)
    assert plan_create({"image": "b", "network": {"mtu": 1500}}).config.network \
        .allow_private_ranges


def test_no_network():
    c = plan_create({"image": "b", "network": {"no_network": True}}).config
    assert c.no_network and c.net.mode == "none"


@pytest.mark.parametrize("params, needle", [
    ({}, "image is required"),
    ({"image": "b", "id": "vm-1"}, "id is internal-only"),
    ({"image": "b", "network": {"no_network": True, "allowed_hosts": ["a.b"]}},
     "no_network cannot be combined"),
    ({"image": "b", "resources": {"memory_mb": 10}}, "memory_mib"),
    ({"image": "b", "resources": {"cpus": "two"}}, "resources.cpus"),
    ({"image": "b", "env": {"A=B": "x"}}, "env must be a map"),
    ({"image": "b", "network": {"secrets": {"K": {"value": "hunter2", "hosts": []}}}},
     "network.secrets.K.hosts"),
    ({"image": "b", "network": {"allow_private": ["0.0.0.0"]}}, "network.allow_private"),
    ({"image": "b", "vfs": {"workspace": "/workspace"}}, "requires at least one"),
    ({"image": "b", "vfs": {"workspace": "/w s", "mounts": {"/w s": {}}}},
     "invalid guest mount path"),
    ({"image": "b", "vfs": {"workspace": "/ws", "mounts": {"/other": {}}}},
     "must be within workspace"),
])
def test_bad_params_are_usage_errors(params, needle):
    with pytest.raises(UsageError, match=needle) as e:
        plan_create(params)
    assert "hunter2" not in str(e.value)


def test_vfs_mounts_map_onto_our_providers(tmp_path):
    (tmp_path / "src").mkdir()
    plan = plan_create({"image": "b", "vfs": {
        "workspace": "/workspace",
        "mounts": {
            "/workspace": {"type": "memory"},
            "/workspace/src": {"type": "host_fs", "host_path": str(tmp_path / "src"),
                               "readonly": True, "owner_uid": 1000, "owner_gid": 1001},
            "/workspace/ov": {"type": "overlay", "host_path": str(tmp_path)},
            "/workspace/odd": {"type": "weird"},
        },
        "interception": {"rules": [
            {"name": "no-env", "ops": ["write", "create"], "path": "/workspace/*.env",
             "action": "block"},
            {"name": "dropped", "action": "exec_after"},
            {"name": "unknown-ops", "ops": ["frobnicate"], "action": "block"},
        ]},
    }})
    m = plan.config.mounts
    assert m.workspace == "/workspace"
    by = {s.guest_path: s for s in m.mounts}
    assert "/workspace" not in by  # a memory fs at the workspace is the VFS's base
    assert by["/workspace/odd"].type == "memory"
    src = by["/workspace/src"]
    assert (src.type, src.readonly, src.uid, src.gid) == ("host_fs", True, 1000, 1001)
    assert by["/workspace/ov"].type == "overlay"
    assert [r.name for r in plan.vfs_rules] == ["no-env"]
    assert plan.vfs_rules[0].matches("write", "/workspace/a.env")
    assert not plan.vfs_rules[0].matches("read", "/workspace/a.env")
    assert plan.file_events  # the reference emits events whenever there are rules


@pytest.mark.parametrize("mounts, needle", [
    ({"/workspace": {"type": "host_fs", "host_path": "/nonexistent/x"}}, "does not exist"),
    ({"/workspace": {"type": "host_fs", "host_path": "rel"}}, "absolute host_path"),
    ({"/workspace": {"type": "memory", "owner_uid": -1}}, "owner_uid"),
    ({"/workspace": {"type": "memory", "readonly": "yes"}}, "readonly"),
    ({"/workspace/a": {}, "/workspace/a/b": {}}, "overlap"),
])
def test_bad_vfs_mounts(mounts, needle):
    with pytest.raises(UsageError, match=needle) as e:
        plan_create({"image": "b", "vfs": {"workspace": "/workspace", "mounts": mounts}})
    assert str(e.value).startswith("invalid configuration")


def test_extra_disks(tmp_path):
    img = tmp_path / "d.ext4"
    img.write_bytes(b"")
    plan = plan_create({"image": "b", "extra_disks": [
        {"host_path": str(img), "guest_mount": "/data", "readonly": True}]})
    (d,) = plan.config.mounts.disks
    assert (d.host_path, d.guest_path, d.readonly) == (str(img), "/data", True)
    with pytest.raises(UsageError, match="does not exist"):
        plan_create({"image": "b", "extra_disks": [
            {"host_path": str(tmp_path / "nope"), "guest_mount": "/data"}]})
    with pytest.raises(UsageError, match="cannot mount a disk"):
        plan_create({"image": "b", "extra_disks": [
            {"host_path": str(img), "guest_mount": "/proc"}]})


def _run_session(lines: list[str]) -> list[dict]:
    async def go() -> list[dict]:
        sent: list[bytes] = []

        async def send(b: bytes) -> None:
            sent.append(b)

        s = Session(StdioTarget(env={}), send)
        for line in lines:
            await s.handle_line(line.encode())
        await asyncio.sleep(0)
        await s.shutdown()
        return [json.loads(b) for b in b"".join(sent).splitlines()]

    return asyncio.run(go())


def test_requests_before_create_get_vm_not_created():
    out = _run_session([
        '{"jsonrpc":"2.0","method":"exec","id":1,"params":{"command":"true"}}',
        '{"jsonrpc":"2.0","method":"read_file","id":2,"params":{"path":"/x"}}',
        '{"jsonrpc":"2.0","method":"bogus","id":3}',
        '{"jsonrpc":"2.0","method":"create","id":4,"params":{"image":""}}',
        'not json',
    ])
    by_id = {m.get("id"): m["error"] for m in out}
    assert by_id[1] == by_id[2] == {"code": ErrorCode.VM_FAILED, "message": "VM not created"}
    assert by_id[3]["code"] == ErrorCode.METHOD_NOT_FOUND
    assert by_id[4]["code"] == ErrorCode.INVALID_PARAMS
    assert by_id[None]["code"] == ErrorCode.PARSE_ERROR
