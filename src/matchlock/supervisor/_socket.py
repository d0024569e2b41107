"""Unix socket paths of any length: sun_path holds 108 bytes, a VM directory under a long
$HOME may not fit, so long paths go through /proc/self/fd/<dir fd>/<name>."""

from __future__ import annotations

import contextlib
import os
import socket

TYPE_CHECKING = False  # no typing import on the exec start-up path

if TYPE_CHECKING:
    from collections.abc import Iterator
    from os import PathLike

    StrPath = str | PathLike[str]  # a str on the exec client's path: no pathlib import

MAX_SUN_PATH = 100  # of 108, leaving room for the terminator and the odd multi-byte name
CONTROL_SOCKET = "control.sock"


@contextlib.contextmanager
def _short(path: StrPath) -> Iterator[str]:
    p = os.fspath(path)
    if len(p.encode()) <= MAX_SUN_PATH:
        yield p
        return
    parent, name = os.path.split(p)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def bind_unix(path: StrPath, backlog: int = 64) -> socket.socket:
    """A listening, non-blocking socket at `path`, mode 0600 (owner only)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short(path) as p:
            s.bind(p)
        os.chmod(path, 0o600)
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def connect_unix(path: StrPath, timeout: float | None = None) -> socket.socket:
    """A blocking connection to `path`; OSError (ENOENT, ECONNREFUSED, ...) as it comes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        with _short(path) as p:
            s.connect(p)
        s.settimeout(None)
    except BaseException:
        s.close()
        raise
    return s
