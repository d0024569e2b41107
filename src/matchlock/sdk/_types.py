"""Data classes of the Python SDK: configuration, create options, hook rules, results.

Names, fields and defaults follow the reference SDK 0.2.17 (spec/rpc-protocol.md §5.2)
so code written against it runs unchanged; our additions are marked "extension".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

VFS_HOOK_PHASE_BEFORE = "before"
VFS_HOOK_PHASE_AFTER = "after"
VFS_HOOK_ACTION_ALLOW = "allow"
VFS_HOOK_ACTION_BLOCK = "block"
NETWORK_HOOK_PHASE_BEFORE = "before"
NETWORK_HOOK_PHASE_AFTER = "after"
NETWORK_HOOK_ACTION_ALLOW = "allow"
NETWORK_HOOK_ACTION_BLOCK = "block"
NETWORK_HOOK_ACTION_MUTATE = "mutate"

VFS_HOOK_OP_STAT = "stat"
VFS_HOOK_OP_READDIR = "readdir"
VFS_HOOK_OP_OPEN = "open"
VFS_HOOK_OP_CREATE = "create"
VFS_HOOK_OP_MKDIR = "mkdir"
VFS_HOOK_OP_CHMOD = "chmod"
VFS_HOOK_OP_REMOVE = "remove"
VFS_HOOK_OP_REMOVE_ALL = "remove_all"
VFS_HOOK_OP_RENAME = "rename"
VFS_HOOK_OP_SYMLINK = "symlink"
VFS_HOOK_OP_READLINK = "readlink"
VFS_HOOK_OP_READ = "read"
VFS_HOOK_OP_WRITE = "write"
VFS_HOOK_OP_CLOSE = "close"
VFS_HOOK_OP_SYNC = "sync"
VFS_HOOK_OP_TRUNCATE = "truncate"

VFSHookPhase: TypeAlias = Literal["", "before", "after"]
VFSHookOp: TypeAlias = Literal[
    "stat", "readdir", "open", "create", "mkdir", "chmod", "remove", "remove_all", "rename",
    "symlink", "readlink", "read", "write", "close", "sync", "truncate",
]
VFSHookAction: TypeAlias = Literal["allow", "block"]
NetworkHookPhase: TypeAlias = Literal["", "before", "after"]
NetworkHookAction: TypeAlias = Literal["allow", "block", "mutate"]

_MAX_ID = 0xFFFF_FFFF


def _validate_id(value: int | None, name: str) -> None:
    if value is not None and (value < 0 or value > _MAX_ID):
        raise ValueError(f"{name} must be in [0, 4294967295], got {value}")


@dataclass
class MountConfig:
    """One VFS mount: `memory`, `host_fs` (a live host directory) or `overlay`
    (a copy-on-write snapshot of a host directory, discarded with the VM)."""

    type: str = "memory"
    host_path: str = ""
    readonly: bool = False
    owner_uid: int | None = None
    """UID reported for every file of a host_fs mount, in [0, 4294967295]."""
    owner_gid: int | None = None
    """GID reported for every file of a host_fs mount, in [0, 4294967295]."""

    def __post_init__(self) -> None:
        _validate_id(self.owner_uid, "owner_uid")
        _validate_id(self.owner_gid, "owner_gid")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.host_path:
            d["host_path"] = self.host_path
        if self.readonly:
            d["readonly"] = self.readonly
        if self.owner_uid is not None:
            d["owner_uid"] = self.owner_uid
        if self.owner_gid is not None:
            d["owner_gid"] = self.owner_gid
        return d


@dataclass
class VFSHookEvent:
    """A guest file operation, delivered to after-hooks (from `event` notifications)."""

    op: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class VFSMutateRequest:
    """Input of a `mutate_hook` (runs before the SDK's own `write_file`)."""

    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class VFSActionRequest:
    """Input of an `action_hook` (runs before the SDK's own write/read/list calls)."""

    op: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class VFSHookRule:
    """One VFS interception rule. A rule without a callback is sent to the server; a
    rule with one callback runs in the SDK (see docs/python-sdk.md, "VFS hooks")."""

    name: str = ""
    phase: VFSHookPhase = ""
    ops: list[VFSHookOp] = field(default_factory=list)
    path: str = ""
    """Glob on the guest path (empty = all)."""
    action: VFSHookAction = "allow"
    timeout_ms: int = 0
    hook: Callable[[VFSHookEvent], Any] | None = None
    """Safe after-hook: `hook(event)`; events arriving while it runs are dropped."""
    dangerous_hook: Callable[[Any, VFSHookEvent], Any] | None = None
    """Re-entrant after-hook: `dangerous_hook(client, event)`, may call the client."""
    mutate_hook: Callable[[VFSMutateRequest], bytes | str | None] | None = None
    """Before `write_file`: returns new content, or None to keep it."""
    action_hook: Callable[[VFSActionRequest], str] | None = None
    """Before `write_file`/`read_file`/`list_files`: returns "allow" or "block"."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action}
        if self.name:
            d["name"] = self.name
        if self.phase:
            d["phase"] = self.phase
        if self.ops:
            d["ops"] = list(self.ops)
        if self.path:
            d["path"] = self.path
        if self.timeout_ms > 0:
            d["timeout_ms"] = self.timeout_ms
        return d


@dataclass
class VFSInterceptionConfig:
    """Host-side VFS interception: rules and whether to emit file events."""

    emit_events: bool = False
    rules: list[VFSHookRule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.emit_events:
            d["emit_events"] = True
        if self.rules:
            d["rules"] = [r.to_dict() for r in self.rules]
        return d


@dataclass
class NetworkBodyTransform:
    """Literal find/replace applied to a response body (per `data:` line for SSE)."""

    find: str
    replace: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"find": self.find}
        if self.replace:
            d["replace"] = self.replace
        return d


@dataclass
class NetworkHookRequest:
    """What a network callback hook sees about one intercepted HTTP(S) exchange."""

    phase: NetworkHookPhase = ""
    host: str = ""
    method: str = ""
    path: str = ""
    query: dict[str, str] | None = None
    request_headers: dict[str, list[str]] | None = None
    status_code: int = 0
    response_headers: dict[str, list[str]] | None = None
    is_sse: bool = False


@dataclass
class NetworkHookRequestMutation:
    """Request edits a callback returns: `headers`/`query` replace the whole set."""

    headers: dict[str, list[str]] | None = None
    query: dict[str, str] | None = None
    path: str = ""


@dataclass
class NetworkHookResponseMutation:
    """Response edits a callback returns; `set_body` replaces the whole body."""

    headers: dict[str, list[str]] | None = None
    body_replacements: list[NetworkBodyTransform] = field(default_factory=list)
    set_body: bytes | str | None = None


@dataclass
class NetworkHookResult:
    """A network callback's verdict."""

    action: NetworkHookAction = "allow"
    request: NetworkHookRequestMutation | None = None
    response: NetworkHookResponseMutation | None = None


NetworkHook: TypeAlias = Callable[
    [NetworkHookRequest], NetworkHookResult | None | Awaitable[NetworkHookResult | None]
]


@dataclass
class NetworkHookRule:
    """One network interception rule; with `hook` set, the server asks the SDK for a
    verdict over a Unix socket (a hook that fails or times out blocks the request)."""

    name: str = ""
    phase: NetworkHookPhase = ""
    hosts: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    path: str = ""
    action: NetworkHookAction = "allow"
    set_headers: dict[str, str] = field(default_factory=dict)
    delete_headers: list[str] = field(default_factory=list)
    set_query: dict[str, str] = field(default_factory=dict)
    delete_query: list[str] = field(default_factory=list)
    rewrite_path: str = ""
    set_response_headers: dict[str, str] = field(default_factory=dict)
    delete_response_headers: list[str] = field(default_factory=list)
    body_replacements: list[NetworkBodyTransform] = field(default_factory=list)
    timeout_ms: int = 0
    hook: NetworkHook | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action}
        if self.name:
            d["name"] = self.name
        if self.phase:
            d["phase"] = self.phase
        if self.hosts:
            d["hosts"] = list(self.hosts)
        if self.methods:
            d["methods"] = list(self.methods)
        if self.path:
            d["path"] = self.path
        if self.set_headers:
            d["set_headers"] = dict(self.set_headers)
        if self.delete_headers:
            d["delete_headers"] = list(self.delete_headers)
        if self.set_query:
            d["set_query"] = dict(self.set_query)
        if self.delete_query:
            d["delete_query"] = list(self.delete_query)
        if self.rewrite_path:
            d["rewrite_path"] = self.rewrite_path
        if self.set_response_headers:
            d["set_response_headers"] = dict(self.set_response_headers)
        if self.delete_response_headers:
            d["delete_response_headers"] = list(self.delete_response_headers)
        if self.body_replacements:
            d["body_replacements"] = [x.to_dict() for x in self.body_replacements]
        if self.timeout_ms > 0:
            d["timeout_ms"] = self.timeout_ms
        return d


@dataclass
class NetworkInterceptionConfig:
    """Host-side network interception rules (evaluated in order)."""

    rules: list[NetworkHookRule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.rules:
            d["rules"] = [r.to_dict() for r in self.rules]
        return d


@dataclass
class Secret:
    """A secret: the VM sees only a placeholder; the host proxy swaps in `value` on
    requests to `hosts` and blocks the placeholder towards any other host."""

    name: str
    value: str = field(repr=False)
    hosts: list[str] = field(default_factory=list)
    placeholder: str = field(default="", kw_only=True)


@dataclass
class ImageConfig:
    """Overrides of the image's OCI config (USER, WORKDIR, ENTRYPOINT, CMD, ENV)."""

    user: str = ""
    working_dir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.user:
            d["user"] = self.user
        if self.working_dir:
            d["working_dir"] = self.working_dir
        if self.entrypoint:
            d["entrypoint"] = list(self.entrypoint)
        if self.cmd:
            d["cmd"] = list(self.cmd)
        if self.env:
            d["env"] = dict(self.env)
        return d


@dataclass
class PortForward:
    """Host port -> guest port."""

    local_port: int
    remote_port: int


@dataclass
class PortForwardBinding:
    """A listener the server actually bound."""

    address: str
    local_port: int
    remote_port: int


@dataclass
class HostIPMapping:
    """A static name -> address entry for the guest's /etc/hosts (and our DNS)."""

    host: str
    ip: str


@dataclass
class CreateOptions:
    """Everything `Client.create` sends. Zero values mean "server default"."""

    image: str = ""
    kernel_ref: str = ""
    privileged: bool = False
    cpus: float = 0
    memory_mb: int = 0
    disk_size_mb: int = 0
    timeout_seconds: int = 0
    allowed_hosts: list[str] = field(default_factory=list)
    add_hosts: list[HostIPMapping] = field(default_factory=list)
    block_private_ips: bool = False
    block_private_ips_set: bool = False
    no_network: bool = False
    force_interception: bool = False
    network_interception: NetworkInterceptionConfig | None = None
    mounts: dict[str, MountConfig] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    vfs_interception: VFSInterceptionConfig | None = None
    secrets: list[Secret] = field(default_factory=list)
    workspace: str = ""
    dns_servers: list[str] = field(default_factory=list)
    hostname: str = ""
    network_mtu: int = 0
    port_forwards: list[PortForward] = field(default_factory=list)
    port_forward_addresses: list[str] = field(default_factory=list)
    image_config: ImageConfig | None = None
    launch_entrypoint: bool = False
    allow_private: list[str] = field(default_factory=list)
    """Extension: private addresses/CIDRs reachable despite `block_private_ips`."""


@dataclass
class ExecResult:
    """A buffered exec. `stdout`/`stderr` are UTF-8 decoded (undecodable bytes become
    U+FFFD); `stdout_bytes`/`stderr_bytes` (extension) hold the exact bytes."""

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int
    stdout_bytes: bytes = field(default=b"", repr=False, compare=False)
    stderr_bytes: bytes = field(default=b"", repr=False, compare=False)


@dataclass
class ExecStreamResult:
    """A streamed exec: the output went to the writers."""

    exit_code: int
    duration_ms: int


@dataclass
class ExecPipeResult:
    exit_code: int
    duration_ms: int


@dataclass
class ExecInteractiveResult:
    exit_code: int
    duration_ms: int


@dataclass
class FileInfo:
    """One directory entry. `mode` carries Go `os.FileMode` bits (directories: bit 31)."""

    name: str
    size: int
    mode: int
    is_dir: bool


@dataclass
class VolumeInfo:
    name: str
    size: str
    path: str


@dataclass
class AllowListResult:
    """Extension: an allow-list update. `changed` holds the hosts added (or removed);
    `allowed_hosts` the whole list afterwards."""

    changed: list[str]
    allowed_hosts: list[str]


@dataclass
class NetworkEvent:
    """Extension: one intercepted HTTP(S) exchange or block, from an `event`."""

    method: str = ""
    url: str = ""
    host: str = ""
    status_code: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    duration_ms: int = 0
    blocked: bool = False
    block_reason: str = ""


@dataclass
class Event:
    """Extension: an `event` notification (`type` is "network" or "file")."""

    type: str
    timestamp: int
    network: NetworkEvent | None = None
    file: VFSHookEvent | None = None
