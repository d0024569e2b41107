"""`create` params (the reference's `api.Config`, spec/rpc-protocol.md §2.1, §5.5) ->
`SandboxConfig`. Pure: the only outside inputs are the `env_allow_private` value and
`host_resolvers` the face passes. Errors are `UsageError`s (-32602) naming the wire field;
secret values never appear in them."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from matchlock.errors import NotAvailable, UsageError
from matchlock.net.config import (
    ALLOW_PRIVATE_ENV,
    PLACEHOLDER_PREFIX,
    new_placeholder,
    parse_network_flags,
    parse_private_exceptions,
)
from matchlock.net.policy import normalise_glob
from matchlock.net.types import Secret
from matchlock.sandbox import SandboxConfig
from matchlock.vfs._hooks import HookRule
from matchlock.vfs._spec import (
    DiskSpec,
    MountConfig,
    MountSpec,
    check_mounts,
    check_workspace,
    parse_disk,
)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER_RE = re.compile(re.escape(PLACEHOLDER_PREFIX) + r"[A-Za-z0-9_]{1,64}\Z")
_SAFE_PATH_RE = re.compile(r"^/[a-zA-Z0-9/_.-]+$")
DEFAULT_MTU = 1500


@dataclass(frozen=True, slots=True)
class CreatePlan:
    config: SandboxConfig
    launch_entrypoint: bool = False
    vfs_rules: tuple[HookRule, ...] = ()  # vfs.interception's wire rules
    file_events: bool = False  # `event` notifications of type file


def _obj(params: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = params.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UsageError(f"{key} must be an object")
    return v


def _strs(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise UsageError(f"{what} must be a list of strings")
    return v


def _bool(d: Mapping[str, Any], key: str, what: str) -> bool:
    v = d.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise UsageError(f"{what} must be true or false")
    return v


def _num(d: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    """Each resource field is merged individually: missing or <= 0 keeps the default."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or \
            (kind is int and v != int(v)):
        raise UsageError(f"resources.{key} must be a number")
    return default if v <= 0 else kind(v)


def _env(v: Any) -> tuple[tuple[str, str], ...]:
    if v is None:
        return ()
    if not isinstance(v, dict) or not all(
            isinstance(k, str) and _NAME_RE.match(k) and isinstance(s, str)
            for k, s in v.items()):
        raise UsageError("env must be a map of variable names to strings")
    return tuple(v.items())


def _secrets(v: Any) -> tuple[Secret, ...]:
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise UsageError("network.secrets must be a map of names to {value, hosts}")
    out = []
    for name, s in v.items():
        shown = name if isinstance(name, str) and _NAME_RE.match(name) else "…"
        if shown == "…":
            raise UsageError(f"network.secrets: {name!r} is not a valid variable name")
        if not isinstance(s, dict):
            raise UsageError(f"network.secrets.{shown} must be an object {{value, hosts}}")
        value = s.get("value")
        if not isinstance(value, str) or not value:
            raise UsageError(f"network.secrets.{shown}.value must be a non-empty string")
        hosts = [h.strip() for h in _strs(s.get("hosts"), f"network.secrets.{shown}.hosts")
                 if h.strip()]
        if not hosts:
            raise UsageError(f"network.secrets.{shown}.hosts must name at least one host")
        globs = tuple(dict.fromkeys(normalise_glob(h, f"network.secrets.{shown} host")
                                    for h in hosts))
        placeholder = s.get("placeholder") or ""
        if not isinstance(placeholder, str) or (placeholder and
                                                not _PLACEHOLDER_RE.match(placeholder)):
            raise UsageError(f"network.secrets.{shown}.placeholder must look like "
                             f"{PLACEHOLDER_PREFIX}<letters and digits>")
        out.append(Secret(name=name, value=value, hosts=globs,
                          placeholder=placeholder or new_placeholder()))
    return tuple(out)


def _add_hosts(v: Any) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise UsageError("network.add_hosts must be a list of {host, ip}")
    out = []
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("host"), str) or \
                not isinstance(m.get("ip"), str):
            raise UsageError("network.add_hosts must be a list of {host, ip}")
        out.append(f"{m['host']}:{m['ip']}")
    return out


_VFS_OPS = frozenset({"stat", "readdir", "read_dir", "open", "create", "mkdir", "chmod",
                      "remove", "remove_all", "removeall", "rename", "symlink", "readlink",
                      "read", "write", "close", "sync", "truncate"})
MAX_OWNER_ID = 2**32 - 1


@dataclass(frozen=True, slots=True)
class VfsPlan:
    mounts: MountConfig = MountConfig()
    rules: tuple[HookRule, ...] = ()
    emit_events: bool = False


def _mount(guest: str, m: Any) -> MountSpec:
    if not isinstance(m, dict):
        raise UsageError(f"invalid configuration: vfs.mounts[{guest!r}] must be an object")
    kind = m.get("type") or "memory"
    if kind not in ("memory", "host_fs", "overlay"):
        kind = "memory"  # as the reference: an unknown type is an empty in-memory fs
    if m.get("upper") or m.get("lower"):
        raise UsageError(f"invalid configuration: vfs.mounts[{guest!r}]: upper/lower are "
                         "not supported; give an overlay its host_path")
    readonly = m.get("readonly", False)
    if not isinstance(readonly, bool):
        raise UsageError(f"invalid configuration: vfs.mounts[{guest!r}].readonly must be "
                         "true or false")
    ids = []
    for key in ("owner_uid", "owner_gid"):
        v = m.get(key)
        if v is not None and (type(v) is not int or not 0 <= v <= MAX_OWNER_ID):
            raise UsageError(f"invalid configuration: vfs.mounts[{guest!r}].{key} must be "
                             f"an integer in [0, {MAX_OWNER_ID}]")
        ids.append(v or 0)
    host = m.get("host_path") or ""
    if kind == "memory":
        return MountSpec(guest_path=guest, type="memory", readonly=readonly,
                         uid=ids[0], gid=ids[1])
    if not isinstance(host, str) or not host.startswith("/"):
        raise UsageError(f"invalid configuration: vfs.mounts[{guest!r}]: {kind} needs an "
                         "absolute host_path")
    real = os.path.realpath(host)
    if not (os.path.isdir(real) or os.path.isfile(real)):
        raise UsageError(f"invalid configuration: vfs.mounts[{guest!r}]: host path {host} "
                         "does not exist or is not a directory or regular file")
    return MountSpec(guest_path=guest, type=kind, host_path=real, readonly=readonly,
                     uid=ids[0], gid=ids[1])


def _vfs_rules(interception: Any) -> tuple[tuple[HookRule, ...], bool]:
    if interception is None:
        return (), False
    if not isinstance(interception, dict):
        raise UsageError("invalid configuration: vfs.interception must be an object")
    emit = interception.get("emit_events", False)
    if not isinstance(emit, bool):
        raise UsageError("invalid configuration: vfs.interception.emit_events must be "
                         "true or false")
    raw = interception.get("rules") or []
    if not isinstance(raw, list):
        raise UsageError("invalid configuration: vfs.interception.rules must be a list")
    rules = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise UsageError(f"invalid configuration: vfs.interception.rules[{i}] must be "
                             "an object")
        action = r.get("action") or "allow"
        if action not in ("allow", "block"):
            continue  # as the reference: only allow and block are wire actions
        if action == "allow":
            continue  # an allow rule without a callback does nothing
        phase = r.get("phase") if r.get("phase") in ("before", "after") else "before"
        if phase == "after":
            continue  # an after-rule cannot block what already happened
        ops = [o for o in _strs(r.get("ops"), f"vfs.interception.rules[{i}].ops")
               if o.strip().lower() in _VFS_OPS]
        if r.get("ops") and not ops:
            continue  # every op unknown: the reference drops the rule, not widens it
        path = r.get("path") or ""
        if not isinstance(path, str):
            raise UsageError(f"invalid configuration: vfs.interception.rules[{i}].path "
                             "must be a string")
        rules.append(HookRule(name=str(r.get("name") or f"rule-{i}"), phase="before",
                              ops=frozenset(ops), path=path, action="block"))
    return tuple(rules), emit or bool(raw)


def _extra_disks(v: Any) -> tuple[DiskSpec, ...]:
    if not v:
        return ()
    if not isinstance(v, list):
        raise UsageError("extra_disks must be a list of {host_path, guest_mount, readonly}")
    out: list[DiskSpec] = []
    for i, d in enumerate(v):
        what = f"invalid configuration: extra_disks[{i}]"
        if not isinstance(d, dict) or not isinstance(d.get("host_path"), str) or \
                not isinstance(d.get("guest_mount"), str):
            raise UsageError(f"{what} must be {{host_path, guest_mount, readonly}}")
        ro = d.get("readonly", False)
        if not isinstance(ro, bool):
            raise UsageError(f"{what}.readonly must be true or false")
        try:
            out.append(parse_disk(f"{d['host_path']}:{d['guest_mount']}{':ro' if ro else ''}",
                                  what=what))
        except UsageError as e:
            raise UsageError(str(e)) from None
    if len({d.guest_path for d in out}) != len(out):
        raise UsageError("invalid configuration: extra_disks: two disks at one guest_mount")
    return tuple(out)


def _vfs(vfs: dict[str, Any]) -> VfsPlan:
    """Validated as the reference does (its messages), then mapped onto our VFS."""
    mounts = vfs.get("mounts") or {}
    workspace = vfs.get("workspace") or ""
    if not isinstance(mounts, dict):
        raise UsageError("invalid configuration: vfs.mounts must be an object")
    if not isinstance(workspace, str):
        raise UsageError("invalid configuration: vfs.workspace must be a string")
    if workspace and not mounts:
        raise UsageError("invalid configuration: vfs.workspace requires at least one "
                         "vfs.mounts entry")
    if mounts and not workspace:
        raise UsageError("invalid configuration: vfs.workspace is required when vfs.mounts "
                         "is set")
    if vfs.get("interception") is not None and not mounts:
        raise UsageError("invalid configuration: vfs.interception requires at least one "
                         "vfs.mounts entry")
    if workspace and not _SAFE_PATH_RE.match(workspace):
        raise UsageError(f"invalid configuration: vfs.workspace: invalid guest mount path "
                         f"{workspace!r}: must be absolute and contain only alphanumeric, "
                         "'/', '_', '.', '-'")
    for p in mounts:
        if p != workspace and not p.startswith(workspace.rstrip("/") + "/"):
            raise UsageError(f"invalid configuration: guest path must be within workspace: "
                             f"{p!r} not in {workspace!r}")
    if not mounts:
        return VfsPlan()
    try:
        ws = check_workspace(workspace, "invalid configuration: vfs.workspace")
        specs = tuple(_mount(posixpath.normpath(g), m) for g, m in mounts.items())
        if len(specs) > 1:
            # The VFS's base under the mounts is an empty memory fs already: a memory
            # mount at the workspace itself (the SDKs' common pattern) is that base.
            specs = tuple(x for x in specs if not (
                x.guest_path == ws and x.type == "memory" and not x.readonly))
        check_mounts(specs)
    except UsageError as e:
        raise UsageError(str(e) if str(e).startswith("invalid configuration")
                         else f"invalid configuration: {e}") from None
    rules, emit = _vfs_rules(vfs.get("interception"))
    return VfsPlan(MountConfig(workspace=ws, mounts=specs), rules, emit)


def _image_config(v: Any) -> str | None:
    """Only `user` is honoured; other overrides are refused rather than ignored."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise UsageError("image_config must be an object")
    user = v.get("user") or None
    if user is not None and not isinstance(user, str):
        raise UsageError("image_config.user must be a string")
    unsupported = [k for k in ("working_dir", "entrypoint", "cmd", "env")
                   if v.get(k) not in (None, "")]
    if unsupported:
        raise NotAvailable(f"image_config.{unsupported[0]} is not available yet in this "
                           "build: only image_config.user is")
    return user


def plan_create(params: Mapping[str, Any], *, env_allow_private: str = "") -> CreatePlan:
    if not isinstance(params, Mapping):
        raise UsageError("create params must be an object")
    image = params.get("image")
    if not isinstance(image, str) or not image.strip():
        raise UsageError("image is required (e.g., alpine:latest)")
    if params.get("id"):
        raise UsageError("id is internal-only and cannot be set")
    if params.get("privileged"):
        raise NotAvailable("privileged is not available in this build")
    disks = _extra_disks(params.get("extra_disks"))
    res = _obj(params, "resources")
    net = _obj(params, "network")
    vfs = _vfs(_obj(params, "vfs"))
    kernel = _obj(params, "kernel").get("ref") or None
    if kernel is not None and not isinstance(kernel, str):
        raise UsageError("kernel.ref must be a string")
    if isinstance(kernel, str) and kernel.startswith("file://"):
        kernel = kernel[len("file://"):]

    no_network = _bool(net, "no_network", "network.no_network")
    allowed = _strs(net.get("allowed_hosts"), "network.allowed_hosts")
    secrets = _secrets(net.get("secrets"))
    intercept = _bool(net, "intercept", "network.intercept") or \
        net.get("interception") is not None
    if no_network and (allowed or secrets or intercept):
        raise UsageError("invalid configuration: no_network cannot be combined with "
                         "allowed_hosts, secrets, intercept or interception")
    interception = net.get("interception")
    if isinstance(interception, dict) and interception.get("rules"):
        raise NotAvailable("network.interception rules are not available yet in this build")
    mtu = net.get("mtu") or DEFAULT_MTU
    if isinstance(mtu, int | float) and not isinstance(mtu, bool) and mtu <= 0:
        mtu = DEFAULT_MTU
    allow_private = _strs(net.get("allow_private"), "network.allow_private")
    # The network object replaces the default wholesale (§2.1.1): absent = true only
    # when no network object was sent at all.
    block_private = net.get("block_private_ips", "network" not in params)
    if not isinstance(block_private, bool):
        raise UsageError("network.block_private_ips must be true or false")
    hostname = net.get("hostname") or ""
    if not isinstance(hostname, str):
        raise UsageError("network.hostname must be a string")

    network = parse_network_flags(
        no_network=no_network, allow_hosts=allowed, add_hosts=_add_hosts(net.get("add_hosts")),
        secrets=(), dns_servers=_strs(net.get("dns_servers"), "network.dns_servers"),
        network_intercept=intercept, mtu=mtu, host_env={},
        env_allow_private=env_allow_private)
    if allow_private and not no_network:
        extra = parse_private_exceptions(allow_private, "network.allow_private")
        network = dataclasses.replace(network, allow_private=tuple(dict.fromkeys(
            (*network.allow_private, *extra))))
    if secrets:
        globs = tuple(dict.fromkeys((*network.allow_hosts, *(g for s in secrets
                                                            for g in s.hosts))))
        network = dataclasses.replace(network, mode="intercept", secrets=secrets,
                                      allow_hosts=globs)
    if not block_private and not no_network:
        network = dataclasses.replace(network, allow_private_ranges=True)

    launch = params.get("launch_entrypoint", False)
    if not isinstance(launch, bool):
        raise UsageError("launch_entrypoint must be true or false")
    config = SandboxConfig(
        image=image.strip(), cpus=float(_num(res, "cpus", 1.0, float)),
        memory_mib=_num(res, "memory_mb", 512, int),
        disk_size_mib=_num(res, "disk_size_mb", 5120, int), hostname=hostname,
        no_network=no_network, kernel=kernel, network=network,
        env=_env(params.get("env")), user=_image_config(params.get("image_config")),
        mounts=dataclasses.replace(vfs.mounts, disks=disks))
    config.validate()
    return CreatePlan(config=config, launch_entrypoint=launch, vfs_rules=vfs.rules,
                      file_events=vfs.emit_events)


__all__ = ["ALLOW_PRIVATE_ENV", "CreatePlan", "plan_create"]
