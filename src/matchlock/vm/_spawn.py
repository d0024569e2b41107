"""Start child processes that die with this process, whichever thread asks.

`PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not when the
process does (prctl(2): "the parent thread"). A child forked from an `asyncio.to_thread`
worker would be SIGKILLed as soon as that worker retired, which a long-lived supervisor
cannot allow. So every fork happens on one daemon thread that is started once and never
returns: the signal then fires only when the whole process goes (exit, crash, SIGKILL).

The death signal is set by `setpriv --pdeathsig` in front of the command, not by a
`preexec_fn`: that would make subprocess fork() this whole process (~5 ms, and every
page then copied on write) where it can vfork() (~0.4 ms). Without setpriv, preexec_fn.
setpriv sets it just before it execs the command, so `popen_tied` returns only once the
child runs the command: were we to die before the prctl, the signal would never come.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        # A child starts with no signal blocked, whatever the forking thread held back.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before prctl took effect: the signal never comes

    return setup


class _Forker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (job, where its (ok, result or exception) goes). Not concurrent.futures: its
        # import (logging with it) is ~3 ms before QEMU's spawn.
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], queue.SimpleQueue]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._pid = 0

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # none yet, or we forked
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, args=(self._jobs,),
                                                name="matchlock-forker", daemon=True)
                self._pid = os.getpid()
                self._thread.start()
            jobs = self._jobs
        reply: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        jobs.put((fn, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        # A vforked child keeps this thread's signal mask: none blocked, whoever started us.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        while True:  # never returns: its exit would fire every child's death signal
            fn, reply = jobs.get()
            try:
                reply.put((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                reply.put((False, e))


_FORKER = _Forker()


def popen_tied(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen(argv, **kwargs), but the child gets SIGKILL when this process dies
    (and only then). `preexec_fn` must not be given."""
    if "preexec_fn" in kwargs:
        raise TypeError("popen_tied sets preexec_fn itself")
    setpriv = _setpriv()
    if setpriv is None:
        parent = os.getpid()
        return _FORKER.call(lambda: subprocess.Popen(argv, preexec_fn=_die_with(parent),
                                                     **kwargs))
    # Found here, so that a missing program fails as Popen would, not as setpriv's exit 127.
    exe = shutil.which(argv[0])
    if exe is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    tied = [setpriv, "--pdeathsig", "KILL", "--", exe, *argv[1:]]
    proc = _FORKER.call(lambda: subprocess.Popen(tied, **kwargs))
    _await_exec(proc, os.path.realpath(setpriv))
    return proc


def _await_exec(proc: subprocess.Popen, setpriv: str, timeout: float = 10.0) -> None:
    """Until the child is no longer setpriv (it has exec'd the command, after its prctl),
    has exited, or `timeout`. (Popen returns once setpriv itself is exec'd.) Nothing tells
    of an exec but /proc; the wait is setpriv's start, ~1 ms, which the command waits on
    anyway. Not "until it is the command": a script's exe is its interpreter."""
    link = f"/proc/{proc.pid}/exe"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if os.readlink(link) != setpriv:
                return
        except OSError:
            return  # gone, or not ours to look at: nothing left to wait for
        time.sleep(0.0002)


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv") or next(
        (p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)
