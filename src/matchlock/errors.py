"""Typed errors. Lower boxes raise these; faces (CLI, RPC) word them for their audience.

    MatchlockError                 code VM_FAILED, CLI exit 1
    ├── UsageError                 bad flags or request params (INVALID_PARAMS)
    │   └── ConfigError            one config field out of range: `field` + `detail`
    ├── NotFoundError              an image, kernel or file that does not exist
    │   └── VmNotFound             no VM with that id
    ├── DependencyError            a host tool or package is missing
    ├── VmStartError               the VM did not boot
    ├── VmStateError               the VM is in the wrong state for the operation
    │   ├── VmNotRunning           exec/kill/... on a VM that is not running
    │   └── VmRunning              rm of a VM that is still running
    ├── GuestError                 the guest runtime misbehaved or the channel broke
    ├── ExecError                  a command could not be run (EXEC_FAILED)
    ├── FileOpError                a guest file operation failed (FILE_FAILED)
    ├── Cancelled                  the request was cancelled (CANCELLED)
    └── NotAvailable               the capability does not exist for this VM or build

Every error carries `vm_id` where there is one and a `code` that the RPC face sends as
its JSON-RPC error code (spec/rpc-protocol.md §3). Messages never name CLI flags below
the faces; `ConfigError.field` names the config field and the face maps it to a flag.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """JSON-RPC error codes of `matchlock rpc` and the control socket."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    VM_FAILED = -32000
    EXEC_FAILED = -32001
    FILE_FAILED = -32002
    CANCELLED = -32003


class MatchlockError(Exception):
    """An error the CLI prints as one line (no traceback) and exits non-zero with."""

    exit_code = 1
    code = ErrorCode.VM_FAILED

    def __init__(self, message: str = "", *, vm_id: str | None = None) -> None:
        super().__init__(message)
        self.vm_id = vm_id


class UsageError(MatchlockError):
    """Bad flags, arguments or request parameters."""

    code = ErrorCode.INVALID_PARAMS


class ConfigError(UsageError):
    """A configuration value out of range. `field` is the config field (`memory_mib`),
    `detail` the rest of the sentence (`must be at least 64 MB (got 0)`)."""

    def __init__(self, field: str, detail: str, *, vm_id: str | None = None) -> None:
        super().__init__(f"{field} {detail}", vm_id=vm_id)
        self.field = field
        self.detail = detail


class NotFoundError(MatchlockError):
    """A named thing (image, VM, kernel) does not exist."""


class VmNotFound(NotFoundError):
    def __init__(self, vm_id: str) -> None:
        super().__init__(f"VM {vm_id} not found", vm_id=vm_id)


class DependencyError(MatchlockError):
    """A host tool or package is missing; the message names what to install."""


class VmStartError(MatchlockError):
    """The VM did not boot or its guest runtime never became ready."""


class VmStateError(MatchlockError):
    """The VM is not in a state that allows the operation."""

    def __init__(self, message: str, *, vm_id: str | None = None, status: str = "") -> None:
        super().__init__(message, vm_id=vm_id)
        self.status = status


class VmNotRunning(VmStateError):
    def __init__(self, vm_id: str, status: str) -> None:
        super().__init__(f"VM {vm_id} is not running (status: {status})", vm_id=vm_id,
                         status=status)


class VmRunning(VmStateError):
    def __init__(self, vm_id: str, status: str = "running") -> None:
        super().__init__(f"VM {vm_id} is {status}", vm_id=vm_id, status=status)


class GuestError(MatchlockError):
    """The guest runtime misbehaved or the channel broke."""


class CommandTooLargeError(UsageError):
    """A command line or environment the guest could not exec (Linux ARG_MAX limits)."""


class RegistryError(MatchlockError):
    """A registry could not be reached, refused us, or sent something wrong."""


class IntegrityError(RegistryError):
    """Downloaded bytes do not match the digest they were asked for."""


class UnreachableError(RegistryError):
    """The registry (or its token service) could not be reached at all."""


class ExecError(MatchlockError):
    """A command could not be run in the guest."""

    code = ErrorCode.EXEC_FAILED


class FileOpError(MatchlockError):
    """A guest file operation failed."""

    code = ErrorCode.FILE_FAILED


class Cancelled(MatchlockError):
    """The request was cancelled before it finished."""

    code = ErrorCode.CANCELLED
    exit_code = 130


class NotAvailable(MatchlockError):
    """The capability does not exist for this VM (or in this build)."""
