"""Talking to a VM's supervisor from another process (the CLI's exec, kill, allow-list).

Blocking and light on imports on purpose: a CLI call pays Python start-up plus this, not
asyncio. Server errors come back as the typed errors their codes name.
"""

from __future__ import annotations

import os
import socket
import time

from matchlock import errors
from matchlock.errors import ErrorCode, MatchlockError, VmNotRunning
from matchlock.paths import state_dir_str
from matchlock.rpc._codec import LineDecoder, Response, decode_server_line, encode_request
from matchlock.supervisor._socket import CONTROL_SOCKET, connect_unix

TYPE_CHECKING = False  # no typing import on the exec start-up path
if TYPE_CHECKING:
    from typing import Any

_BY_CODE: dict[int, type[MatchlockError]] = {
    ErrorCode.INVALID_PARAMS: errors.UsageError,
    ErrorCode.EXEC_FAILED: errors.ExecError,
    ErrorCode.FILE_FAILED: errors.FileOpError,
    ErrorCode.CANCELLED: errors.Cancelled,
}


def control_path(vm_id: str) -> str:
    return os.path.join(state_dir_str(), "vms", vm_id, CONTROL_SOCKET)


def error_from(code: int, message: str, vm_id: str | None = None) -> MatchlockError:
    return _BY_CODE.get(code, MatchlockError)(message, vm_id=vm_id)


def connect(vm_id: str, status: str = "running") -> socket.socket:
    """A connection to the VM's control socket; VmNotRunning when nobody answers."""
    try:
        return connect_unix(control_path(vm_id), timeout=5)
    except OSError:
        raise VmNotRunning(vm_id, status if status != "running" else "not answering") from None


class ControlClient:
    """One connection; `call` sends a request and waits for its response."""

    def __init__(self, vm_id: str, sock: socket.socket | None = None) -> None:
        self.vm_id = vm_id
        self.sock = sock or connect(vm_id)
        self._dec = LineDecoder()
        self._next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float | None = 60) -> dict[str, Any]:
        rid = self._next_id
        self._next_id += 1
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(encode_request(method, params, rid))
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                line = self._dec.next_line()
                if line is None:
                    if deadline is not None:
                        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                    data = self.sock.recv(1 << 16)
                    if not data:
                        raise VmNotRunning(self.vm_id, "stopped")
                    self._dec.feed(data)
                    continue
                msg = decode_server_line(line)
                if isinstance(msg, Response) and msg.id == rid:
                    if msg.error is not None:
                        raise error_from(msg.error[0], msg.error[1], self.vm_id)
                    return msg.result or {}
        except TimeoutError:
            raise MatchlockError(f"VM {self.vm_id} did not answer {method} within "
                                 f"{timeout:.0f} s", vm_id=self.vm_id) from None
        except (ConnectionError, BrokenPipeError):
            raise VmNotRunning(self.vm_id, "stopped") from None
