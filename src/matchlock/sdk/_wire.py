"""Request params and result parsing for every method (spec §2, §5.5). Pure: no I/O.

`create_params` reproduces the reference SDK 0.2.17's `create` params field for field;
the only addition is `network.allow_private` (sent only when the caller set it)."""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable
from typing import Any

from matchlock.sdk._errors import MatchlockError, ProtocolError
from matchlock.sdk._types import (
    AllowListResult,
    CreateOptions,
    ExecResult,
    FileInfo,
    PortForward,
    PortForwardBinding,
    VFSInterceptionConfig,
    VolumeInfo,
)

DEFAULT_FORWARD_ADDRESS = "127.0.0.1"


def b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"invalid {what}: expected a base64 string")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as e:
        raise ProtocolError(f"invalid {what}: bad base64 ({e})") from None


def to_bytes(content: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    raise TypeError(f"content must be bytes or str, not {type(content).__name__}")


# create


def validate_create(opts: CreateOptions) -> None:
    if not opts.image:
        raise MatchlockError("image is required (e.g., alpine:latest)")
    if opts.network_mtu < 0:
        raise MatchlockError("network mtu must be > 0")
    if opts.no_network and (opts.allowed_hosts or opts.secrets or opts.force_interception
                            or opts.network_interception is not None):
        raise MatchlockError(
            "no network cannot be combined with allowed hosts, secrets, "
            "forced interception, or network interception rules")
    if opts.no_network and opts.allow_private:
        raise MatchlockError("no network cannot be combined with allow_private")


def _block_private_override(opts: CreateOptions) -> tuple[bool, bool]:
    if opts.block_private_ips_set:
        return opts.block_private_ips, True
    if opts.block_private_ips:  # older callers could only say "true"
        return True, True
    return False, False


def network_params(opts: CreateOptions,
                   interception: dict[str, Any] | None) -> dict[str, Any] | None:
    block_private, overridden = _block_private_override(opts)
    if not (opts.allowed_hosts or opts.add_hosts or opts.secrets or opts.dns_servers
            or opts.hostname or opts.network_mtu > 0 or opts.no_network or overridden
            or opts.force_interception or interception is not None or opts.allow_private):
        return None
    if opts.no_network:
        cfg: dict[str, Any] = {"no_network": True}
        if opts.dns_servers:
            cfg["dns_servers"] = list(opts.dns_servers)
        if opts.hostname:
            cfg["hostname"] = opts.hostname
        return cfg
    # A sent `network` object replaces the server's defaults wholesale: keep the
    # private-range block on unless the caller said otherwise.
    net: dict[str, Any] = {
        "allowed_hosts": list(opts.allowed_hosts),
        "block_private_ips": block_private if overridden else True,
    }
    if opts.add_hosts:
        net["add_hosts"] = [{"host": m.host, "ip": m.ip} for m in opts.add_hosts]
    if opts.force_interception or interception is not None:
        net["intercept"] = True
    if interception is not None:
        net["interception"] = interception
    if opts.secrets:
        secrets: dict[str, Any] = {}
        for s in opts.secrets:
            entry: dict[str, Any] = {"value": s.value, "hosts": list(s.hosts)}
            if s.placeholder:
                entry["placeholder"] = s.placeholder
            secrets[s.name] = entry
        net["secrets"] = secrets
    if opts.dns_servers:
        net["dns_servers"] = list(opts.dns_servers)
    if opts.hostname:
        net["hostname"] = opts.hostname
    if opts.network_mtu > 0:
        net["mtu"] = opts.network_mtu
    if opts.allow_private:
        net["allow_private"] = list(opts.allow_private)
    return net


def create_params(opts: CreateOptions, *, network_interception: dict[str, Any] | None,
                  vfs_interception: VFSInterceptionConfig | None) -> dict[str, Any]:
    """`create` params for validated `opts` and compiled hooks (spec §5.5)."""
    params: dict[str, Any] = {"image": opts.image}
    if opts.kernel_ref:
        params["kernel"] = {"ref": opts.kernel_ref}
    if opts.privileged:
        params["privileged"] = True
    resources: dict[str, Any] = {}
    if opts.cpus:
        resources["cpus"] = opts.cpus
    if opts.memory_mb:
        resources["memory_mb"] = opts.memory_mb
    if opts.disk_size_mb:
        resources["disk_size_mb"] = opts.disk_size_mb
    if opts.timeout_seconds:
        resources["timeout_seconds"] = opts.timeout_seconds
    if resources:
        params["resources"] = resources
    network = network_params(opts, network_interception)
    if network is not None:
        params["network"] = network
    if opts.mounts or opts.workspace or vfs_interception is not None:
        vfs: dict[str, Any] = {}
        if opts.mounts:
            vfs["mounts"] = {k: v.to_dict() for k, v in opts.mounts.items()}
        if opts.workspace:
            vfs["workspace"] = opts.workspace
        if vfs_interception is not None:
            vfs["interception"] = vfs_interception.to_dict()
        params["vfs"] = vfs
    if opts.env:
        params["env"] = dict(opts.env)
    if opts.image_config is not None:
        params["image_config"] = opts.image_config.to_dict()
    if opts.launch_entrypoint:
        params["launch_entrypoint"] = True
    return params


def parse_create(result: Any) -> str:
    if not isinstance(result, dict) or "id" not in result:
        raise MatchlockError("invalid create response: missing id")
    return str(result["id"])


# exec family


def exec_params(command: str, working_dir: str = "", user: str = "") -> dict[str, Any]:
    params: dict[str, Any] = {"command": command}
    if working_dir:
        params["working_dir"] = working_dir
    if user:
        params["user"] = user
    return params


def tty_params(command: str, working_dir: str, user: str, rows: int,
               cols: int) -> dict[str, Any]:
    params: dict[str, Any] = {"command": command, "rows": rows if rows > 0 else 24,
                              "cols": cols if cols > 0 else 80}
    if working_dir:
        params["working_dir"] = working_dir
    if user:
        params["user"] = user
    return params


def _field(result: Any, key: str, method: str) -> Any:
    if not isinstance(result, dict) or key not in result:
        raise ProtocolError(f"invalid {method} response: missing {key!r}")
    return result[key]


def _int_field(result: Any, key: str, method: str) -> int:
    value = _field(result, key, method)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"invalid {method} response: {key!r} must be an integer")
    return value


def parse_exec(result: Any) -> ExecResult:
    out = b64decode(_field(result, "stdout", "exec"), "exec stdout")
    err = b64decode(_field(result, "stderr", "exec"), "exec stderr")
    return ExecResult(
        exit_code=_int_field(result, "exit_code", "exec"),
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        duration_ms=_int_field(result, "duration_ms", "exec"),
        stdout_bytes=out, stderr_bytes=err)


def parse_exit(result: Any, method: str) -> tuple[int, int]:
    return _int_field(result, "exit_code", method), _int_field(result, "duration_ms", method)


# files and logs


def parse_content(result: Any, method: str) -> bytes:
    return b64decode(_field(result, "content", method), f"{method} content")


def parse_files(result: Any) -> list[FileInfo]:
    files = result.get("files") if isinstance(result, dict) else None
    if files is None:
        return []
    if not isinstance(files, list):
        raise ProtocolError("invalid list_files response: 'files' must be a list")
    out = []
    for f in files:
        if not isinstance(f, dict):
            raise ProtocolError("invalid list_files response: entries must be objects")
        out.append(FileInfo(name=str(_field(f, "name", "list_files")),
                            size=int(_field(f, "size", "list_files")),
                            mode=int(_field(f, "mode", "list_files")),
                            is_dir=bool(_field(f, "is_dir", "list_files"))))
    return out


# allow-list (extension for Python; the Go SDK has it)


def normalize_hosts(hosts: Iterable[str]) -> list[str]:
    """Comma-split, trim, drop blanks and duplicates (like the Go SDK)."""
    out: list[str] = []
    for h in hosts:
        for part in str(h).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    if not out:
        raise MatchlockError("at least one host is required")
    return out


def parse_allow_list(result: Any, key: str) -> AllowListResult:
    if not isinstance(result, dict):
        raise ProtocolError("invalid allow-list response: expected an object")
    return AllowListResult(changed=[str(h) for h in result.get(key) or []],
                           allowed_hosts=[str(h) for h in result.get("allowed_hosts") or []])


# port forwarding


def _parse_port(raw: str, role: str) -> int:
    value = raw.strip()
    if not value:
        raise MatchlockError(f"invalid port-forward spec: empty {role} port")
    try:
        port = int(value, 10)
    except ValueError:
        raise MatchlockError(f"invalid port value {value!r}") from None
    if port < 1 or port > 65535:
        raise MatchlockError(f"invalid port value {port}: must be in range 1-65535")
    return port


def parse_port_forward(spec: str) -> PortForward:
    value = str(spec).strip()
    if not value:
        raise MatchlockError("invalid port-forward spec: empty spec")
    parts = value.split(":")
    if len(parts) == 1:
        port = _parse_port(parts[0], "remote")
        return PortForward(local_port=port, remote_port=port)
    if len(parts) == 2:
        return PortForward(local_port=_parse_port(parts[0], "local"),
                           remote_port=_parse_port(parts[1], "remote"))
    raise MatchlockError(
        f"invalid port-forward spec: {value!r} (expected [LOCAL_PORT:]REMOTE_PORT)")


def port_forward_params(addresses: Iterable[str] | None,
                        forwards: Iterable[PortForward]) -> dict[str, Any]:
    addrs = list(addresses) if addresses else []
    return {
        "forwards": [{"local_port": int(f.local_port), "remote_port": int(f.remote_port)}
                     for f in forwards],
        "addresses": addrs or [DEFAULT_FORWARD_ADDRESS],
    }


def parse_bindings(result: Any) -> list[PortForwardBinding]:
    if not isinstance(result, dict):
        raise MatchlockError("invalid port_forward response: expected object")
    raw = result.get("bindings")
    if not isinstance(raw, list):
        raise MatchlockError("invalid port_forward response: bindings must be a list")
    out: list[PortForwardBinding] = []
    for b in raw:
        if not isinstance(b, dict):
            raise MatchlockError("invalid port_forward response: binding entry must be an object")
        address = str(b.get("address", "")).strip()
        if not address:
            raise MatchlockError("invalid port_forward response: binding address is required")
        local, remote = int(b.get("local_port") or 0), int(b.get("remote_port") or 0)
        for name, port in (("local_port", local), ("remote_port", remote)):
            if port < 1 or port > 65535:
                raise MatchlockError(
                    f"invalid port_forward response: {name} must be in range 1-65535")
        out.append(PortForwardBinding(address=address, local_port=local, remote_port=remote))
    return out


# CLI sub-commands the SDK runs (`rm`, `volume ...`): argv tails and output parsing


def volume_create_args(name: str, size_mb: int) -> list[str]:
    name = name.strip()
    if not name:
        raise MatchlockError("volume name is required")
    if size_mb <= 0:
        raise MatchlockError("volume size must be > 0")
    return ["volume", "create", name, "--size", str(size_mb), "--json"]


def volume_remove_args(name: str) -> list[str]:
    name = name.strip()
    if not name:
        raise MatchlockError("volume name is required")
    return ["volume", "rm", name]


def parse_volume_create(stdout: str, name: str, size_mb: int) -> VolumeInfo:
    try:
        payload = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise MatchlockError(f"failed to parse volume create output: {e}") from None
    if not isinstance(payload, dict):
        raise MatchlockError("failed to parse volume create output: expected an object")
    path = str(payload.get("path", "")).strip()
    if not path:
        raise MatchlockError("failed to parse volume create output: missing Path")
    return VolumeInfo(name=str(payload.get("name", "")).strip() or name.strip(),
                      size=str(payload.get("size", "")).strip() or f"{float(size_mb):.1f} MB",
                      path=path)


def parse_volume_list(stdout: str) -> list[VolumeInfo]:
    try:
        payload = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise MatchlockError(f"failed to parse volume list output: {e}") from None
    if not isinstance(payload, list):
        raise MatchlockError("failed to parse volume list output: expected array")
    out = []
    for entry in payload:
        if not isinstance(entry, dict):
            raise MatchlockError(f"failed to parse volume list output line: {entry!r}")
        name, path = str(entry.get("name", "")).strip(), str(entry.get("path", "")).strip()
        if not name or not path:
            raise MatchlockError(f"failed to parse volume list output line: {entry!r}")
        out.append(VolumeInfo(name=name, size=str(entry.get("size", "")).strip(), path=path))
    return out
