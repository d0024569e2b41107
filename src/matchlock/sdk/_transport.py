"""Blocking byte pipes for `Client`: the `matchlock rpc` child process, or a VM's
control socket. Each write is whole and serialized, so lines never interleave."""

from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
import threading
from pathlib import Path

from matchlock.sdk._config import Config, describe_binary
from matchlock.sdk._errors import MatchlockError

log = logging.getLogger("matchlock.sdk")

# Reads go into one preallocated buffer: a fresh 1 MiB bytes object per read costs more
# than a small exec's whole round trip (mmap churn), while big replies still arrive in
# few reads.
READ_SIZE = 1 << 20
STDERR_TAIL = 20  # lines of the server's stderr kept for error messages


class Transport:
    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self) -> bytes:
        """Next chunk; b"" at end of stream."""
        raise NotImplementedError

    def close_input(self) -> None:
        """Tell the server no more requests will come (EOF)."""

    def wait(self, timeout: float) -> bool:
        """Wait for the server side to finish; True if it did."""
        return True

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass

    def why_closed(self) -> str:
        """A hint for "closed unexpectedly" errors (exit status, last stderr line)."""
        return ""


def start_server(config: Config) -> ProcessTransport:
    argv = config.rpc_argv()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0,
                                # Own session: a Ctrl-C meant for the caller must not kill
                                # the server before the SDK has closed the VM. Not under
                                # sudo, whose cached credentials are tied to the terminal.
                                start_new_session=not config.use_sudo)
    except FileNotFoundError:
        raise MatchlockError(
            f"matchlock binary not found: {describe_binary(config)!r} "
            "(set MATCHLOCK_BIN or Config(binary_path=...))") from None
    except PermissionError:
        raise MatchlockError(
            f"matchlock binary is not executable: {describe_binary(config)!r}") from None
    return ProcessTransport(proc)


class ProcessTransport(Transport):
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self._in = proc.stdin.fileno()
        self._out = proc.stdout
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._lock = threading.Lock()
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._stderr = threading.Thread(target=self._drain_stderr, name="matchlock-rpc-stderr",
                                        daemon=True)
        self._stderr.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._tail.append(line)
                log.debug("server: %s", line)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            if self.proc.stdin is None or self.proc.stdin.closed:
                raise BrokenPipeError("request pipe closed")
            while view:
                n = os.write(self._in, view)
                view = view[n:]

    def recv(self) -> bytes:
        n = self._out.readinto(self._view)  # type: ignore[attr-defined]
        return bytes(self._view[:n]) if n else b""

    def close_input(self) -> None:
        with self._lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("matchlock rpc (pid %d) did not exit after SIGKILL", self.proc.pid)

    def close(self) -> None:
        self.close_input()
        self._stderr.join(timeout=1)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def why_closed(self) -> str:
        try:
            rc = self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            rc = None
        self._stderr.join(timeout=1)
        parts = []
        if rc is not None:
            parts.append(f"exit status {rc}")
        if self._tail:
            parts.append(self._tail[-1])
        return ": ".join(parts)


def connect_socket(path: Path) -> SocketTransport:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise MatchlockError(
            f"no running VM behind {path} (is the VM id right? see 'matchlock list')") from None
    except OSError as e:
        sock.close()
        raise MatchlockError(f"cannot connect to {path}: {e.strerror or e}") from None
    return SocketTransport(sock)


class SocketTransport(Transport):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._view = memoryview(bytearray(READ_SIZE))

    def send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> bytes:
        n = self.sock.recv_into(self._view)
        return bytes(self._view[:n]) if n else b""

    def close_input(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
