"""What every SDK method does, once, for both clients.

Each operation is a generator that yields steps and gets their results sent back:
`Call` (send a request, wait for its response) and `Invoke` (run a user callback —
awaited in `AsyncClient` if it returns an awaitable). `Client` and `AsyncClient` only
drive these generators, so the two never drift apart."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from matchlock.sdk import _hooks, _wire
from matchlock.sdk._hooks import LocalNetworkHook, LocalVFSHooks
from matchlock.sdk._types import (
    AllowListResult,
    CreateOptions,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    PortForward,
    PortForwardBinding,
    VFSInterceptionConfig,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call:
    """One request. `interactive`: exec_pipe/exec_tty, which take input after `.ready`."""

    method: str
    params: dict[str, Any] | None = None
    interactive: bool = False


@dataclass(frozen=True, slots=True)
class Invoke:
    fn: Callable[..., Any]
    args: tuple[Any, ...]


Step = Call | Invoke
Op = Generator[Step, Any, T]


@dataclass(slots=True)
class ClientState:
    """What a client knows about its session, shared by both shells' operations."""

    vm_id: str | None = None
    last_vm_id: str | None = None
    vfs: LocalVFSHooks = field(default_factory=LocalVFSHooks)


@dataclass(slots=True)
class CreatePlan:
    """A validated create: the wire params (minus the callback socket) and the hooks the
    SDK must host. Built before anything is started, so bad options cost nothing."""

    opts: CreateOptions
    network_interception: dict[str, Any] | None
    vfs_interception: VFSInterceptionConfig | None
    vfs_hooks: LocalVFSHooks
    network_hooks: dict[str, LocalNetworkHook]

    def params(self, callback_socket: str | None) -> dict[str, Any]:
        interception = self.network_interception
        if callback_socket:
            interception = dict(interception or {})
            interception["callback_socket"] = callback_socket
        return _wire.create_params(self.opts, network_interception=interception,
                                   vfs_interception=self.vfs_interception)


def plan_create(opts: CreateOptions | None) -> CreatePlan:
    opts = opts if opts is not None else CreateOptions()
    _wire.validate_create(opts)
    wire_vfs, vfs_hooks = _hooks.compile_vfs_hooks(opts.vfs_interception)
    net = _hooks.compile_network_hooks(opts.network_interception)
    return CreatePlan(opts=opts, network_interception=net.wire, vfs_interception=wire_vfs,
                      vfs_hooks=vfs_hooks, network_hooks=net.local)


def replace_launch(opts: CreateOptions) -> CreateOptions:
    """`launch`: the same options plus the image entrypoint. A shallow copy, unlike the
    reference's deepcopy, so hook callables (bound methods, closures) stay themselves."""
    return dataclasses.replace(opts, launch_entrypoint=True)


def create(state: ClientState, plan: CreatePlan, callback_socket: str | None) -> Op[str]:
    state.vfs = LocalVFSHooks()
    result = yield Call("create", plan.params(callback_socket))
    vm_id = _wire.parse_create(result)
    # Set before port forwarding so the id survives a port-forward failure.
    state.vm_id = state.last_vm_id = vm_id
    state.vfs = plan.vfs_hooks
    if plan.opts.port_forwards:
        yield from port_forward(plan.opts.port_forward_addresses, plan.opts.port_forwards)
    return vm_id


def exec_(command: str, working_dir: str, user: str) -> Op[ExecResult]:
    result = yield Call("exec", _wire.exec_params(command, working_dir, user))
    return _wire.parse_exec(result)


# Streamed output as raw payloads, not base64 (ours, rpc/_codec.py: base64 capped the
# SDK's exec_stream at 0.7x of `matchlock run`). A server that does not know the field
# (the reference's) ignores it and sends base64, which the client reads too.
RAW = {"raw": True}


def exec_stream(command: str, working_dir: str, user: str) -> Op[ExecStreamResult]:
    result = yield Call("exec_stream", {**_wire.exec_params(command, working_dir, user), **RAW})
    return ExecStreamResult(*_wire.parse_exit(result, "exec_stream"))


def exec_pipe(command: str, working_dir: str, user: str) -> Op[ExecPipeResult]:
    result = yield Call("exec_pipe", {**_wire.exec_params(command, working_dir, user), **RAW},
                        interactive=True)
    return ExecPipeResult(*_wire.parse_exit(result, "exec_pipe"))


def exec_tty(command: str, working_dir: str, user: str, rows: int,
             cols: int) -> Op[ExecInteractiveResult]:
    result = yield Call("exec_tty",
                        {**_wire.tty_params(command, working_dir, user, rows, cols), **RAW},
                        interactive=True)
    return ExecInteractiveResult(*_wire.parse_exit(result, "exec_tty"))


def log() -> Op[str]:
    result = yield Call("log")
    return _wire.parse_content(result, "log").decode("utf-8", errors="replace")


def log_stream() -> Op[None]:
    yield Call("log_stream")


def write_file(state: ClientState, path: str, content: Any, mode: int) -> Op[None]:
    data = _wire.to_bytes(content)
    for hook in state.vfs.action_hooks("write", path):
        decision = yield Invoke(hook.fn, (_hooks.action_request("write", path, len(data), mode),))
        _hooks.check_action(hook, decision, "write", path)
    for hook in state.vfs.mutate_hooks(path):
        out = yield Invoke(hook.fn, (_hooks.mutate_request(path, len(data), mode),))
        data = _hooks.apply_mutation(hook, out, data)
    yield Call("write_file", {"path": path, "content": _wire.b64encode(data), "mode": mode})


def read_file(state: ClientState, path: str) -> Op[bytes]:
    for hook in state.vfs.action_hooks("read", path):
        decision = yield Invoke(hook.fn, (_hooks.action_request("read", path, 0, 0),))
        _hooks.check_action(hook, decision, "read", path)
    result = yield Call("read_file", {"path": path})
    return _wire.parse_content(result, "read_file")


def list_files(state: ClientState, path: str) -> Op[list[FileInfo]]:
    for hook in state.vfs.action_hooks("readdir", path):
        decision = yield Invoke(hook.fn, (_hooks.action_request("readdir", path, 0, 0),))
        _hooks.check_action(hook, decision, "readdir", path)
    result = yield Call("list_files", {"path": path})
    return _wire.parse_files(result)


def allow_list_add(hosts: Iterable[str]) -> Op[AllowListResult]:
    result = yield Call("allow_list_add", {"hosts": _wire.normalize_hosts(hosts)})
    return _wire.parse_allow_list(result, "added")


def allow_list_delete(hosts: Iterable[str]) -> Op[AllowListResult]:
    result = yield Call("allow_list_delete", {"hosts": _wire.normalize_hosts(hosts)})
    return _wire.parse_allow_list(result, "removed")


def port_forward(addresses: Iterable[str] | None,
                 forwards: list[PortForward]) -> Op[list[PortForwardBinding]]:
    if not forwards:
        return []
    result = yield Call("port_forward", _wire.port_forward_params(addresses, forwards))
    return _wire.parse_bindings(result)


def cancel(request_id: int) -> Op[bool]:
    result = yield Call("cancel", {"id": int(request_id)})
    return bool(isinstance(result, dict) and result.get("cancelled"))
