"""The SDK-hosted Unix socket the server calls for network hook verdicts (spec §4.1):
one connection per call, one JSON line each way. Threaded, for `Client`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading

from matchlock.sdk._hooks import (
    MAX_HOOK_LINE,
    LocalNetworkHook,
    decode_hook_request,
    encode_hook_error,
    encode_hook_result,
)

log = logging.getLogger("matchlock.sdk")

# The server writes its request right after connecting; a peer that sends nothing for
# this long is not the server.
REQUEST_READ_TIMEOUT = 10.0


def make_socket_dir() -> tuple[str, str]:
    """A private (0700) directory and the socket path inside it."""
    d = tempfile.mkdtemp(prefix="matchlock-network-hook-")
    return d, os.path.join(d, "hook.sock")


def read_request_line(conn: socket.socket) -> bytes:
    buf = bytearray()
    while len(buf) <= MAX_HOOK_LINE:
        chunk = conn.recv(65536)
        if not chunk:
            return bytes(buf)
        nl = chunk.find(b"\n")
        if nl >= 0:
            buf += chunk[:nl]
            return bytes(buf)
        buf += chunk
    raise ValueError(f"network hook callback request longer than {MAX_HOOK_LINE} bytes")


class HookServer:
    def __init__(self, table: dict[str, LocalNetworkHook]) -> None:
        self._table = dict(table)
        self._dir, self.path = make_socket_dir()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self.path)
            self._sock.listen(64)
        except OSError:
            self._sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._thread = threading.Thread(target=self._accept_loop, name="matchlock-hooks",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="matchlock-hook",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(REQUEST_READ_TIMEOUT)
                line = read_request_line(conn)
                if not line:
                    return
                decoded = decode_hook_request(line, self._table)
                if isinstance(decoded, bytes):
                    reply = decoded
                else:
                    hook, req = decoded
                    try:
                        reply = encode_hook_result(hook.fn(req))
                    except Exception as e:  # noqa: BLE001 - the user's hook: report, don't die
                        log.debug("network hook %r raised", hook.name, exc_info=True)
                        reply = encode_hook_error(str(e) or type(e).__name__)
                conn.settimeout(REQUEST_READ_TIMEOUT)
                conn.sendall(reply)
            except (OSError, ValueError) as e:
                log.debug("network hook connection failed: %s", e)
                with contextlib.suppress(OSError):
                    conn.sendall(encode_hook_error(str(e)))

    def close(self) -> None:
        # shutdown() wakes a thread blocked in accept() on Linux; close() alone does not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=1)
        shutil.rmtree(self._dir, ignore_errors=True)
