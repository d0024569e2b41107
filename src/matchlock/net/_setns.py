"""setns(2)/unshare(2) through ctypes (Python 3.11 has no os.setns), and a way to run a
function inside a network namespace without ever moving the caller's thread.

A network namespace is a per-thread attribute: `run_in_netns` enters the namespace on a
dedicated, short-lived thread, runs the function there, and switches that thread back
before it ends. Sockets and TAP devices created on that thread stay in the namespace;
processes forked from it (subprocess) start in it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

T = TypeVar("T")

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace `fd` refers to."""
    if _lib().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def unshare(flags: int) -> None:
    if _lib().unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def run_in_netns(ns_path: str, fn: Callable[[], T]) -> T:
    """Run `fn()` on a fresh thread that lives in the network namespace at `ns_path`.

    The calling thread never changes namespace. Exceptions from `fn` propagate.
    """
    box: dict[str, object] = {}

    def body() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(target, CLONE_NEWNET)
                finally:
                    os.close(target)
                try:
                    box["result"] = fn()
                finally:
                    # The thread ends right after, but leave it where it came from anyway.
                    setns(own, CLONE_NEWNET)
            finally:
                os.close(own)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, name="netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
