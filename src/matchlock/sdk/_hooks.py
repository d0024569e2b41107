"""Hook compilation and the network-callback line codec (spec §4). Pure: no I/O.

A create request's hook rules are split into what goes on the wire and what runs in
the SDK: VFS after-hooks fire on `event` notifications, action/mutate hooks around the
SDK's own file calls, and network callbacks answer the server over a Unix socket."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from matchlock.sdk._errors import MatchlockError
from matchlock.sdk._types import (
    VFS_HOOK_ACTION_ALLOW,
    VFS_HOOK_ACTION_BLOCK,
    VFS_HOOK_PHASE_AFTER,
    VFS_HOOK_PHASE_BEFORE,
    Event,
    NetworkEvent,
    NetworkHook,
    NetworkHookPhase,
    NetworkHookRequest,
    NetworkHookResult,
    NetworkInterceptionConfig,
    VFSActionRequest,
    VFSHookEvent,
    VFSInterceptionConfig,
    VFSMutateRequest,
)

# One callback request line: a request's metadata and headers, never its body. Bounded
# so a misbehaving peer on the socket cannot grow the SDK without limit.
MAX_HOOK_LINE = 1 << 20


@dataclass(frozen=True, slots=True)
class LocalVFSHook:
    name: str
    ops: frozenset[str]
    path: str
    fn: Callable[..., Any]
    dangerous: bool = False

    def matches(self, op: str, path: str) -> bool:
        # fnmatch lets `*` cross `/`, like the reference SDK (unlike the server's glob).
        return (not self.ops or op in self.ops) and (
            not self.path or fnmatch.fnmatch(path, self.path))


@dataclass(frozen=True, slots=True)
class LocalVFSHooks:
    """The SDK-side VFS hooks of the current VM."""

    after: tuple[LocalVFSHook, ...] = ()
    mutate: tuple[LocalVFSHook, ...] = ()
    action: tuple[LocalVFSHook, ...] = ()

    def after_hooks(self, event: VFSHookEvent) -> tuple[list[LocalVFSHook], list[LocalVFSHook]]:
        """(dangerous, safe) after-hooks matching `event`."""
        dangerous, safe = [], []
        for h in self.after:
            if h.matches(event.op, event.path):
                (dangerous if h.dangerous else safe).append(h)
        return dangerous, safe

    def action_hooks(self, op: str, path: str) -> list[LocalVFSHook]:
        return [h for h in self.action if h.matches(op, path)]

    def mutate_hooks(self, path: str) -> list[LocalVFSHook]:
        return [h for h in self.mutate if h.matches("write", path)]


def _owner() -> tuple[int, int]:
    return os.geteuid(), os.getegid()


def action_request(op: str, path: str, size: int, mode: int) -> VFSActionRequest:
    uid, gid = _owner()
    return VFSActionRequest(op=op, path=path, size=size, mode=mode, uid=uid, gid=gid)


def mutate_request(path: str, size: int, mode: int) -> VFSMutateRequest:
    uid, gid = _owner()
    return VFSMutateRequest(path=path, size=size, mode=mode, uid=uid, gid=gid)


def check_action(hook: LocalVFSHook, decision: Any, op: str, path: str) -> None:
    """Raise if an action hook's answer blocks the operation (or is not an answer)."""
    value = str(decision if decision is not None else "").strip().lower()
    if value in ("", VFS_HOOK_ACTION_ALLOW):
        return
    if value == VFS_HOOK_ACTION_BLOCK:
        raise MatchlockError(
            f"vfs action hook blocked operation: op={op} path={path} hook={hook.name!r}")
    raise MatchlockError(
        f"invalid action_hook return value for {hook.name!r}: expected "
        f"{VFS_HOOK_ACTION_ALLOW!r}|{VFS_HOOK_ACTION_BLOCK!r}, got {value!r}")


def apply_mutation(hook: LocalVFSHook, result: Any, current: bytes) -> bytes:
    if result is None:
        return current
    if isinstance(result, str):
        return result.encode("utf-8")
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result)
    raise MatchlockError(
        f"invalid mutate_hook return type for {hook.name!r}: expected bytes|str|None")


def _callback_rule_checks(rule_name: str, kind: str, action: str, phase: str,
                          want_phase: str) -> None:
    if action.strip().lower() not in ("", VFS_HOOK_ACTION_ALLOW):
        raise MatchlockError(
            f"invalid vfs hook {rule_name!r}: {kind} cannot set action={action!r}")
    p = (phase or "").lower()
    if want_phase == VFS_HOOK_PHASE_AFTER and p != VFS_HOOK_PHASE_AFTER:
        raise MatchlockError(f"invalid vfs hook {rule_name!r}: {kind} must use phase=after")
    if want_phase == VFS_HOOK_PHASE_BEFORE and p and p != VFS_HOOK_PHASE_BEFORE:
        raise MatchlockError(f"invalid vfs hook {rule_name!r}: {kind} must use phase=before")


def compile_vfs_hooks(
        cfg: VFSInterceptionConfig | None) -> tuple[VFSInterceptionConfig | None, LocalVFSHooks]:
    """Split VFS rules into the wire config and the SDK-local hooks (spec §4.2)."""
    if cfg is None:
        return None, LocalVFSHooks()
    wire = VFSInterceptionConfig(emit_events=cfg.emit_events, rules=[])
    after: list[LocalVFSHook] = []
    mutate: list[LocalVFSHook] = []
    action: list[LocalVFSHook] = []
    for rule in cfg.rules:
        callbacks = [rule.hook, rule.dangerous_hook, rule.mutate_hook, rule.action_hook]
        if sum(cb is not None for cb in callbacks) > 1:
            raise MatchlockError(
                f"invalid vfs hook {rule.name!r}: cannot set more than one callback hook")
        ops = frozenset(op.lower() for op in rule.ops if op)
        if rule.hook is not None:
            _callback_rule_checks(rule.name, "callback hooks", rule.action or "", rule.phase,
                                  VFS_HOOK_PHASE_AFTER)
            after.append(LocalVFSHook(rule.name, ops, rule.path, rule.hook))
        elif rule.dangerous_hook is not None:
            _callback_rule_checks(rule.name, "dangerous_hook", rule.action or "", rule.phase,
                                  VFS_HOOK_PHASE_AFTER)
            after.append(LocalVFSHook(rule.name, ops, rule.path, rule.dangerous_hook,
                                      dangerous=True))
        elif rule.action_hook is not None:
            _callback_rule_checks(rule.name, "action_hook", rule.action or "", rule.phase,
                                  VFS_HOOK_PHASE_BEFORE)
            action.append(LocalVFSHook(rule.name, ops, rule.path, rule.action_hook))
        elif rule.mutate_hook is not None:
            _callback_rule_checks(rule.name, "mutate_hook", rule.action or "", rule.phase,
                                  VFS_HOOK_PHASE_BEFORE)
            mutate.append(LocalVFSHook(rule.name, ops, rule.path, rule.mutate_hook))
        else:
            if (rule.action or "").strip().lower() == "mutate_write":
                raise MatchlockError(
                    f"invalid vfs hook {rule.name!r}: mutate_write requires mutate_hook callback")
            wire.rules.append(rule)
    if after:
        wire.emit_events = True  # after-hooks are driven by the server's file events
    local = LocalVFSHooks(tuple(after), tuple(mutate), tuple(action))
    if not wire.rules and not wire.emit_events:
        return None, local
    return wire, local


@dataclass(frozen=True, slots=True)
class LocalNetworkHook:
    name: str
    phase: str
    timeout_ms: int
    fn: NetworkHook


@dataclass(slots=True)
class CompiledNetworkHooks:
    wire: dict[str, Any] | None = None  # network.interception, minus callback_socket
    local: dict[str, LocalNetworkHook] = field(default_factory=dict)


def compile_network_hooks(cfg: NetworkInterceptionConfig | None) -> CompiledNetworkHooks:
    """Wire rules plus the callback table; a rule with a hook gets callback_id
    `network_hook_<1-based index>` (spec §4.1)."""
    if cfg is None:
        return CompiledNetworkHooks()
    rules: list[dict[str, Any]] = []
    local: dict[str, LocalNetworkHook] = {}
    for i, rule in enumerate(cfg.rules):
        wire_rule = rule.to_dict()
        if rule.hook is not None:
            if (rule.action or "").strip().lower() not in ("", "allow"):
                raise MatchlockError(
                    f"invalid network hook {rule.name!r}: callback hooks cannot set "
                    f"action={rule.action!r}")
            callback_id = f"network_hook_{i + 1}"
            local[callback_id] = LocalNetworkHook(
                name=rule.name, phase=(rule.phase or "").strip().lower(),
                timeout_ms=max(rule.timeout_ms, 0), fn=rule.hook)
            wire_rule["callback_id"] = callback_id
        rules.append(wire_rule)
    return CompiledNetworkHooks(wire={"rules": rules} if rules else None, local=local)


# Network callback line codec (server -> SDK request, SDK -> server reply)


def _str_map(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): str(v) for k, v in value.items()}


def _str_list_map(value: Any) -> dict[str, list[str]] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): [str(x) for x in v] if isinstance(v, list) else [str(v)]
            for k, v in value.items()}


def decode_hook_request(
        line: bytes,
        table: dict[str, LocalNetworkHook]) -> tuple[LocalNetworkHook, NetworkHookRequest] | bytes:
    """The hook and its request for one callback line, or the error reply to send."""
    try:
        payload = json.loads(line)
        if not isinstance(payload, dict):
            raise ValueError("network hook callback request must be an object")
    except ValueError as e:
        return encode_hook_error(str(e))
    callback_id = str(payload.get("callback_id", "")).strip()
    raw_phase = str(payload.get("phase", "")).strip().lower()
    phase: NetworkHookPhase = raw_phase if raw_phase in ("before", "after") else ""  # type: ignore[assignment]
    hook = table.get(callback_id)
    if hook is None:
        return encode_hook_error("network hook callback not found")
    if hook.phase and hook.phase != phase:
        return encode_hook_error("network hook phase mismatch")
    try:
        status = int(payload.get("status_code") or 0)
    except (TypeError, ValueError):
        status = 0
    req = NetworkHookRequest(
        phase=phase,
        host=str(payload.get("host", "")),
        method=str(payload.get("method", "")),
        path=str(payload.get("path", "")),
        query=_str_map(payload.get("query")),
        request_headers=_str_list_map(payload.get("request_headers")),
        status_code=status,
        response_headers=_str_list_map(payload.get("response_headers")),
        is_sse=bool(payload.get("is_sse")),
    )
    return hook, req


def encode_hook_error(message: str) -> bytes:
    return _line({"error": message})


def encode_hook_result(result: NetworkHookResult | None) -> bytes:
    """The reply line for a hook's return value (None = allow unchanged)."""
    resp: dict[str, Any] = {}
    if result is None:
        return _line(resp)
    if not isinstance(result, NetworkHookResult):
        raise MatchlockError("invalid network hook result: expected NetworkHookResult or None")
    action = str(result.action or "").strip()
    if action:
        resp["action"] = action
    if result.request is not None:
        request: dict[str, Any] = {}
        if result.request.headers is not None:
            request["headers"] = {str(k): [str(x) for x in v]
                                  for k, v in result.request.headers.items()}
        if result.request.query is not None:
            request["query"] = {str(k): str(v) for k, v in result.request.query.items()}
        if result.request.path:
            request["path"] = result.request.path
        if request:
            resp["request"] = request
    if result.response is not None:
        response: dict[str, Any] = {}
        if result.response.headers is not None:
            response["headers"] = {str(k): [str(x) for x in v]
                                   for k, v in result.response.headers.items()}
        if result.response.body_replacements:
            response["body_replacements"] = [
                x.to_dict() for x in result.response.body_replacements]
        body = result.response.set_body
        if body is not None:
            if isinstance(body, str):
                body = body.encode("utf-8")
            if not isinstance(body, (bytes, bytearray)):
                raise MatchlockError(
                    "invalid network hook response set_body type: expected bytes|str|None")
            response["set_body_base64"] = base64.b64encode(body).decode("ascii")
        if response:
            resp["response"] = response
    return _line(resp)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# `event` notifications


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def parse_event(params: dict[str, Any]) -> Event:
    file_ev = None
    f = params.get("file")
    if isinstance(f, dict) and f.get("op"):
        file_ev = VFSHookEvent(op=str(f.get("op", "")).lower(), path=str(f.get("path", "")),
                               size=_int(f.get("size")), mode=_int(f.get("mode")),
                               uid=_int(f.get("uid")), gid=_int(f.get("gid")))
    net_ev = None
    n = params.get("network")
    if isinstance(n, dict):
        net_ev = NetworkEvent(
            method=str(n.get("method", "")), url=str(n.get("url", "")),
            host=str(n.get("host", "")), status_code=_int(n.get("status_code")),
            request_bytes=_int(n.get("request_bytes")),
            response_bytes=_int(n.get("response_bytes")),
            duration_ms=_int(n.get("duration_ms")), blocked=bool(n.get("blocked")),
            block_reason=str(n.get("block_reason", "")))
    return Event(type=str(params.get("type", "")), timestamp=_int(params.get("timestamp")),
                 network=net_ev, file=file_ev)
