"""SDK errors. `MatchlockError` is the package's one base error, so `except
MatchlockError` catches SDK, RPC and CLI failures alike; a per-call timeout raises the
built-in `TimeoutError`, as the reference SDK does."""

from __future__ import annotations

import subprocess

from matchlock.errors import MatchlockError


class RPCError(MatchlockError):
    """An error response from the server: `code` (spec/rpc-protocol.md §3) and `message`."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    VM_FAILED = -32000
    EXEC_FAILED = -32001
    FILE_FAILED = -32002
    CANCELLED = -32003

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message

    def is_vm_error(self) -> bool:
        return self.code == self.VM_FAILED

    def is_exec_error(self) -> bool:
        return self.code == self.EXEC_FAILED

    def is_file_error(self) -> bool:
        return self.code == self.FILE_FAILED

    def is_cancelled(self) -> bool:
        return self.code == self.CANCELLED


class ProtocolError(MatchlockError):
    """The server broke the wire protocol (an oversized line, a missing result field)."""


class CLIError(MatchlockError, subprocess.CalledProcessError):
    """A `matchlock` sub-command (`rm`, `volume ...`) failed. Also a CalledProcessError,
    which is what the reference SDK raised, so existing handlers keep working."""

    def __init__(self, what: str, returncode: int, cmd: list[str], output: str,
                 stderr: str) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)
        self.what = what  # e.g. "volume rm data"

    def __str__(self) -> str:
        lines = (self.stderr or "").strip().splitlines()
        why = lines[-1] if lines else f"exit status {self.returncode}"
        return f"matchlock {self.what} failed: {why}"
