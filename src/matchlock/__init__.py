"""Matchlock: disposable micro-VMs for AI agents, with a sealed network.

The SDK (`from matchlock import Client, Config, Sandbox, ...`) is loaded on first use of
one of its names, so `import matchlock` stays cheap for the CLI."""

from __future__ import annotations

TYPE_CHECKING = False  # no typing import on the exec start-up path
if TYPE_CHECKING:
    from typing import Any


__version__ = "0.1.0"

if TYPE_CHECKING:
    from matchlock.sdk import *  # noqa: F403

# The names of matchlock.sdk.__all__ (a unit test keeps the two equal).
_SDK_NAMES = frozenset({
    "AllowListResult",
    "AsyncClient",
    "CLIError",
    "Client",
    "Config",
    "CreateOptions",
    "Event",
    "ExecInteractiveResult",
    "ExecPipeResult",
    "ExecResult",
    "ExecStreamResult",
    "FileInfo",
    "HostIPMapping",
    "ImageConfig",
    "MatchlockError",
    "MountConfig",
    "NETWORK_HOOK_ACTION_ALLOW",
    "NETWORK_HOOK_ACTION_BLOCK",
    "NETWORK_HOOK_ACTION_MUTATE",
    "NETWORK_HOOK_PHASE_AFTER",
    "NETWORK_HOOK_PHASE_BEFORE",
    "NetworkBodyTransform",
    "NetworkEvent",
    "NetworkHookAction",
    "NetworkHookPhase",
    "NetworkHookRequest",
    "NetworkHookRequestMutation",
    "NetworkHookResponseMutation",
    "NetworkHookResult",
    "NetworkHookRule",
    "NetworkInterceptionConfig",
    "PortForward",
    "PortForwardBinding",
    "ProtocolError",
    "RPCError",
    "Sandbox",
    "Secret",
    "VFSActionRequest",
    "VFSHookAction",
    "VFSHookEvent",
    "VFSHookOp",
    "VFSHookPhase",
    "VFSHookRule",
    "VFSInterceptionConfig",
    "VFSMutateRequest",
    "VFS_HOOK_ACTION_ALLOW",
    "VFS_HOOK_ACTION_BLOCK",
    "VFS_HOOK_OP_CHMOD",
    "VFS_HOOK_OP_CLOSE",
    "VFS_HOOK_OP_CREATE",
    "VFS_HOOK_OP_MKDIR",
    "VFS_HOOK_OP_OPEN",
    "VFS_HOOK_OP_READ",
    "VFS_HOOK_OP_READDIR",
    "VFS_HOOK_OP_READLINK",
    "VFS_HOOK_OP_REMOVE",
    "VFS_HOOK_OP_REMOVE_ALL",
    "VFS_HOOK_OP_RENAME",
    "VFS_HOOK_OP_STAT",
    "VFS_HOOK_OP_SYMLINK",
    "VFS_HOOK_OP_SYNC",
    "VFS_HOOK_OP_TRUNCATE",
    "VFS_HOOK_OP_WRITE",
    "VFS_HOOK_PHASE_AFTER",
    "VFS_HOOK_PHASE_BEFORE",
    "VolumeInfo",
})

__all__ = sorted(_SDK_NAMES)


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        from matchlock import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'matchlock' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SDK_NAMES])
