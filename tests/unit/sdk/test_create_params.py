"""`create` params produced by the builder, field for field (spec §5.5, 0.2.17 deltas),
plus client-side validation and hook compilation. Pure: no process."""

from __future__ import annotations

import pytest

from matchlock import (
    ImageConfig,
    MatchlockError,
    MountConfig,
    NetworkBodyTransform,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Sandbox,
    VFSHookRule,
    VFSInterceptionConfig,
)
from matchlock.sdk import _ops


def params(sb: Sandbox, socket: str | None = None, launch: bool = False) -> dict:
    opts = _ops.replace_launch(sb.options()) if launch else sb.options()
    return _ops.plan_create(opts).params(socket)


def test_image_only_sends_nothing_else():
    assert params(Sandbox("alpine:latest")) == {"image": "alpine:latest"}


def test_launch_adds_launch_entrypoint_and_leaves_builder_untouched():
    sb = Sandbox("alpine:latest")
    assert params(sb, launch=True) == {"image": "alpine:latest", "launch_entrypoint": True}
    assert sb.options().launch_entrypoint is False


def test_resources_only_truthy_fields():
    sb = Sandbox("img").with_cpus(0.5).with_memory(1024)
    assert params(sb) == {"image": "img", "resources": {"cpus": 0.5, "memory_mb": 1024}}
    sb = Sandbox("img").with_cpus(2).with_memory(512).with_disk_size(2048).with_timeout(60)
    assert params(sb)["resources"] == {"cpus": 2, "memory_mb": 512, "disk_size_mb": 2048,
                                       "timeout_seconds": 60}
    assert "resources" not in params(Sandbox("img").with_cpus(0).with_memory(0))


def test_kernel_and_privileged():
    sb = Sandbox("img").with_kernel("file:///k/vmlinux").with_privileged()
    assert params(sb) == {"image": "img", "kernel": {"ref": "file:///k/vmlinux"},
                          "privileged": True}


def test_allow_host_sends_complete_network_with_private_block_on():
    sb = Sandbox("img").allow_host("api.test", "*.x.test")
    assert params(sb)["network"] == {"allowed_hosts": ["api.test", "*.x.test"],
                                     "block_private_ips": True}


def test_secrets_with_and_without_placeholder():
    sb = (Sandbox("img").add_secret("API_KEY", "sk-real", "api.test")
          .add_secret_with_placeholder("TOK", "t-real", "PH_TOK", "a.test", "b.test"))
    assert params(sb)["network"] == {
        "allowed_hosts": [], "block_private_ips": True,
        "secrets": {"API_KEY": {"value": "sk-real", "hosts": ["api.test"]},
                    "TOK": {"value": "t-real", "hosts": ["a.test", "b.test"],
                            "placeholder": "PH_TOK"}}}


def test_spec_worked_example_create_line():
    """§9: allow-list + secret + launch."""
    sb = Sandbox("alpine:latest").allow_host("api.example.com").add_secret(
        "API_KEY", "sk-real", "api.example.com")
    assert params(sb, launch=True) == {
        "image": "alpine:latest",
        "network": {"allowed_hosts": ["api.example.com"], "block_private_ips": True,
                    "secrets": {"API_KEY": {"value": "sk-real", "hosts": ["api.example.com"]}}},
        "launch_entrypoint": True}


@pytest.mark.parametrize("build, expected", [
    (lambda s: s.block_private_ips(), True),
    (lambda s: s.with_block_private_ips(False), False),
    (lambda s: s.allow_private_ips(), False),
])
def test_block_private_override_alone_sends_network(build, expected):
    assert params(build(Sandbox("img")))["network"] == {"allowed_hosts": [],
                                                        "block_private_ips": expected}


def test_unset_block_private_ips_sends_no_network():
    assert "network" not in params(Sandbox("img").allow_private_ips().unset_block_private_ips())


@pytest.mark.parametrize("build, key, value", [
    (lambda s: s.with_dns_servers("1.1.1.1", "9.9.9.9"), "dns_servers", ["1.1.1.1", "9.9.9.9"]),
    (lambda s: s.with_hostname("box"), "hostname", "box"),
    (lambda s: s.with_network_mtu(1400), "mtu", 1400),
    (lambda s: s.add_host("db.test", "10.0.0.5"), "add_hosts",
     [{"host": "db.test", "ip": "10.0.0.5"}]),
    (lambda s: s.allow_private("127.0.0.1", "10.1.0.0/16"), "allow_private",
     ["127.0.0.1", "10.1.0.0/16"]),
])
def test_each_network_field_triggers_network(build, key, value):
    assert params(build(Sandbox("img")))["network"] == {
        "allowed_hosts": [], "block_private_ips": True, key: value}


def test_allow_private_keeps_block_on_and_rejects_non_addresses():
    sb = Sandbox("img").allow_private("127.0.0.1").allow_private("127.0.0.1", " ::1 ")
    assert sb.options().allow_private == ["127.0.0.1", "::1"]
    with pytest.raises(MatchlockError, match="invalid allow_private entry 'localhost'"):
        Sandbox("img").allow_private("localhost")


def test_no_network_branch_drops_everything_but_dns_and_hostname():
    sb = (Sandbox("img").with_no_network().with_dns_servers("1.1.1.1").with_hostname("h")
          .add_host("a.test", "10.0.0.1").with_network_mtu(1400).block_private_ips())
    assert params(sb)["network"] == {"no_network": True, "dns_servers": ["1.1.1.1"],
                                     "hostname": "h"}


def test_with_network_interception_forces_intercept():
    assert params(Sandbox("img").with_network_interception())["network"] == {
        "allowed_hosts": [], "block_private_ips": True, "intercept": True}
    empty = NetworkInterceptionConfig(rules=[])
    assert "interception" not in params(
        Sandbox("img").with_network_interception(empty))["network"]


def test_network_rules_and_callback_ids():
    def hook(req):
        return None

    cfg = NetworkInterceptionConfig(rules=[
        NetworkHookRule(name="block-evil", phase="before", hosts=["evil.test"], action="block"),
        NetworkHookRule(name="cb", phase="after", hosts=["api.test"], timeout_ms=250, hook=hook),
        NetworkHookRule(phase="before", methods=["POST"], path="/v1/*",
                        set_headers={"X-A": "1"}, delete_headers=["X-B"],
                        set_query={"q": "1"}, delete_query=["z"], rewrite_path="/v2/x"),
        NetworkHookRule(phase="after", set_response_headers={"X-R": "1"},
                        delete_response_headers=["Server"],
                        body_replacements=[NetworkBodyTransform("a", "b"),
                                           NetworkBodyTransform("c")]),
    ])
    p = params(Sandbox("img").with_network_interception(cfg), socket="/tmp/d/hook.sock")
    assert p["network"] == {
        "allowed_hosts": [], "block_private_ips": True, "intercept": True,
        "interception": {
            "rules": [
                {"action": "block", "name": "block-evil", "phase": "before",
                 "hosts": ["evil.test"]},
                {"action": "allow", "name": "cb", "phase": "after", "hosts": ["api.test"],
                 "timeout_ms": 250, "callback_id": "network_hook_2"},
                {"action": "allow", "phase": "before", "methods": ["POST"], "path": "/v1/*",
                 "set_headers": {"X-A": "1"}, "delete_headers": ["X-B"],
                 "set_query": {"q": "1"}, "delete_query": ["z"], "rewrite_path": "/v2/x"},
                {"action": "allow", "phase": "after", "set_response_headers": {"X-R": "1"},
                 "delete_response_headers": ["Server"],
                 "body_replacements": [{"find": "a", "replace": "b"}, {"find": "c"}]},
            ],
            "callback_socket": "/tmp/d/hook.sock"}}
    plan = _ops.plan_create(Sandbox("img").with_network_interception(cfg).options())
    assert list(plan.network_hooks) == ["network_hook_2"]
    assert plan.network_hooks["network_hook_2"].timeout_ms == 250


def test_callback_rule_cannot_block():
    cfg = NetworkInterceptionConfig(rules=[NetworkHookRule(name="x", action="block",
                                                           hook=lambda r: None)])
    with pytest.raises(MatchlockError, match="callback hooks cannot set action='block'"):
        _ops.plan_create(Sandbox("img").with_network_interception(cfg).options())


def test_vfs_mounts_workspace_and_wire_rules():
    cfg = VFSInterceptionConfig(rules=[
        VFSHookRule(name="no-create", phase="before", ops=["create"], path="/workspace/*",
                    action="block")])
    sb = (Sandbox("img").with_workspace("/workspace")
          .mount_host_dir("/workspace/src", "/h/src", owner_uid=1000, owner_gid=1000)
          .mount_host_dir_readonly("/workspace/ro", "/h/ro")
          .mount_memory("/workspace/tmp").mount_overlay("/workspace/ov", "/h/ov")
          .with_vfs_interception(cfg))
    assert params(sb)["vfs"] == {
        "mounts": {
            "/workspace/src": {"type": "host_fs", "host_path": "/h/src", "owner_uid": 1000,
                               "owner_gid": 1000},
            "/workspace/ro": {"type": "host_fs", "host_path": "/h/ro", "readonly": True},
            "/workspace/tmp": {"type": "memory"},
            "/workspace/ov": {"type": "overlay", "host_path": "/h/ov"},
        },
        "workspace": "/workspace",
        "interception": {"rules": [{"action": "block", "name": "no-create",
                                    "phase": "before", "ops": ["create"],
                                    "path": "/workspace/*"}]}}


def test_vfs_after_hook_forces_emit_events_and_stays_local():
    cfg = VFSInterceptionConfig(rules=[
        VFSHookRule(name="seen", phase="after", ops=["write"], hook=lambda ev: None),
        VFSHookRule(name="act", ops=["read"], action_hook=lambda r: "allow"),
        VFSHookRule(name="mut", phase="before", mutate_hook=lambda r: b"x")])
    sb = Sandbox("img").mount_memory("/workspace").with_workspace("/workspace") \
        .with_vfs_interception(cfg)
    plan = _ops.plan_create(sb.options())
    assert plan.params(None)["vfs"]["interception"] == {"emit_events": True}
    assert [h.name for h in plan.vfs_hooks.after] == ["seen"]
    assert [h.name for h in plan.vfs_hooks.action] == ["act"]
    assert [h.name for h in plan.vfs_hooks.mutate] == ["mut"]


def test_vfs_only_local_before_hooks_send_no_interception():
    cfg = VFSInterceptionConfig(rules=[VFSHookRule(action_hook=lambda r: "allow")])
    assert "vfs" not in params(Sandbox("img").with_vfs_interception(cfg))


@pytest.mark.parametrize("rule, message", [
    (VFSHookRule(name="a", hook=lambda e: None), "callback hooks must use phase=after"),
    (VFSHookRule(name="b", phase="after", dangerous_hook=lambda c, e: None, action="block"),
     "dangerous_hook cannot set action='block'"),
    (VFSHookRule(name="c", phase="after", action_hook=lambda r: "allow"),
     "action_hook must use phase=before"),
    (VFSHookRule(name="d", phase="after", mutate_hook=lambda r: None),
     "mutate_hook must use phase=before"),
    (VFSHookRule(name="e", hook=lambda e: None, action_hook=lambda r: "allow"),
     "cannot set more than one callback hook"),
    (VFSHookRule(name="f", action="mutate_write"),  # type: ignore[arg-type]
     "mutate_write requires mutate_hook callback"),
])
def test_vfs_rule_errors(rule, message):
    sb = Sandbox("img").with_vfs_interception(VFSInterceptionConfig(rules=[rule]))
    with pytest.raises(MatchlockError, match=message):
        _ops.plan_create(sb.options())


def test_env_and_image_config():
    sb = (Sandbox("img").with_env("A", "1").with_env_map({"B": "2"}).with_user("app")
          .with_entrypoint("sh", "-lc")
          .with_image_config(ImageConfig(working_dir="/srv", cmd=["echo hi"], env={"C": "3"})))
    p = params(sb)
    assert p["env"] == {"A": "1", "B": "2"}
    assert p["image_config"] == {"user": "app", "working_dir": "/srv",
                                 "entrypoint": ["sh", "-lc"], "cmd": ["echo hi"],
                                 "env": {"C": "3"}}


def test_with_image_config_merges_non_empty_fields():
    sb = Sandbox("img").with_user("app").with_image_config(ImageConfig(working_dir="/w"))
    assert params(sb)["image_config"] == {"user": "app", "working_dir": "/w"}
    assert params(Sandbox("img").with_image_config(ImageConfig()))["image_config"] == {}


def test_field_order_of_a_full_request():
    """The reference builds the dict in this order; keep it (diffable logs)."""
    sb = (Sandbox("img").with_kernel("k").with_privileged().with_cpus(1).allow_host("a")
          .mount_memory("/workspace").with_workspace("/workspace").with_env("A", "1")
          .with_user("u"))
    assert list(params(sb, launch=True)) == ["image", "kernel", "privileged", "resources",
                                             "network", "vfs", "env", "image_config",
                                             "launch_entrypoint"]


@pytest.mark.parametrize("build, message", [
    (lambda: Sandbox(""), "image is required (e.g., alpine:latest)"),
    (lambda: Sandbox("img").with_network_mtu(-1), "network mtu must be > 0"),
    (lambda: Sandbox("img").with_no_network().allow_host("a"), "no network cannot be combined"),
    (lambda: Sandbox("img").with_no_network().add_secret("A", "v"),
     "no network cannot be combined"),
    (lambda: Sandbox("img").with_no_network().with_network_interception(),
     "no network cannot be combined"),
    (lambda: Sandbox("img").with_no_network().allow_private("127.0.0.1"),
     "no network cannot be combined with allow_private"),
])
def test_validation(build, message):
    with pytest.raises(MatchlockError) as ei:
        _ops.plan_create(build().options())
    assert message in str(ei.value)


def test_mount_owner_ids_validated():
    with pytest.raises(ValueError, match="owner_uid must be in"):
        MountConfig(type="host_fs", host_path="/x", owner_uid=-1)
    with pytest.raises(ValueError, match="owner_gid must be in"):
        Sandbox("img").mount_host_dir("/w", "/x", owner_gid=1 << 32)


def test_secret_value_not_in_repr():
    sb = Sandbox("img").add_secret("K", "sk-very-secret", "a")
    assert "sk-very-secret" not in repr(sb.options())
