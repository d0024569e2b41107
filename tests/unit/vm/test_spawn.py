"""popen_tied: children die with the process, never with the thread that started them.

The negative control shows the kernel behaviour the module works around: a child whose
PR_SET_PDEATHSIG was set from a worker thread is SIGKILLed when that thread exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from matchlock.vm._spawn import popen_tied

pytestmark = pytest.mark.timeout(60)

# How long a child that is going to be killed gets to die before we call it alive.
# The control shows death arrives within milliseconds of the thread's exit.
GRACE_S = 1.0


def _start_in_thread(start) -> subprocess.Popen:
    """Run `start()` in a fresh thread and return once that OS thread has fully exited."""
    out: dict = {}

    def body():
        out["tid"] = threading.get_native_id()
        out["proc"] = start()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    task = Path(f"/proc/self/task/{out['tid']}")
    deadline = time.monotonic() + 10
    while task.exists():  # join() returns before the kernel has reaped the thread
        assert time.monotonic() < deadline, "thread did not exit"
        time.sleep(0.005)
    return out["proc"]


def _naive_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def test_control_pdeathsig_from_a_worker_thread_kills_the_child():
    proc = _start_in_thread(lambda: subprocess.Popen(["sleep", "60"],
                                                     preexec_fn=_naive_pdeathsig))
    try:
        assert proc.wait(GRACE_S) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_child_survives_the_exit_of_the_thread_that_started_it():
    proc = _start_in_thread(lambda: popen_tied(["sleep", "60"]))
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(GRACE_S)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("attempt", range(5))
def test_child_dies_when_the_process_dies(tmp_path, attempt):
    # A Python process starts a child through popen_tied from a short-lived thread, then
    # is SIGKILLed at once: the child must go too. (Killed before setpriv's prctl, the
    # child would live on: a loaded machine caught that once; hence five tries.)
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, threading\n"
        "from matchlock.vm._spawn import popen_tied\n"
        "box = {}\n"
        "t = threading.Thread(target=lambda: box.update(p=popen_tied(['sleep', '60'])))\n"
        "t.start(); t.join()\n"
        "print(box['p'].pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        os.kill(child, 0)  # alive while its parent is
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while True:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # Reparented to init (or a subreaper) as a zombie until reaped; a zombie
            # has exited, which is what counts.
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            assert time.monotonic() < deadline, "child outlived its parent process"
            time.sleep(0.01)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_errors_reach_the_caller_and_the_forker_keeps_working():
    with pytest.raises(FileNotFoundError):
        popen_tied(["/no/such/binary-xyz"])
    with pytest.raises(TypeError):
        popen_tied(["true"], preexec_fn=lambda: None)
    p = popen_tied(["true"])
    assert p.wait(10) == 0


def _exec_done(proc: subprocess.Popen, prog: str) -> None:
    deadline = time.monotonic() + 10
    while os.path.basename(Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0]
                           .decode()) != prog:  # setpriv first, then the program
        assert time.monotonic() < deadline, "child never exec'd its program"
        time.sleep(0.005)


def test_child_starts_with_no_signal_blocked_whatever_the_caller_blocked():
    # `run` once blocked SIGINT/SIGTERM around QEMU's spawn; a vforked child inherits its
    # thread's mask, and a QEMU with SIGTERM blocked cannot be stopped by terminate().
    def start():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        return popen_tied(["sleep", "60"])

    proc = _start_in_thread(start)
    try:
        _exec_done(proc, "sleep")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        blocked = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
        assert int(blocked.split()[1], 16) == 0, blocked
        proc.terminate()
        assert proc.wait(5) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_the_command_line_gc_looks_for_is_qemus_own_or_setprivs():
    from matchlock.sandbox._cleanup import is_qemu

    assert is_qemu(["/usr/bin/qemu-system-x86_64", "-m", "512"])
    assert is_qemu(["/usr/bin/setpriv", "--pdeathsig", "KILL", "--",
                    "/usr/bin/qemu-system-x86_64", "-m", "512"])
    assert not is_qemu(["/usr/bin/setpriv", "--pdeathsig", "KILL", "--", "/bin/sleep"])
    assert not is_qemu(["sleep", "qemu-system-x86_64"])
    assert not is_qemu([])


def test_a_script_is_tied_without_waiting_for_its_own_name(tmp_path):
    # A script's /proc/PID/exe is its interpreter: popen_tied waits for setpriv's exec,
    # not for the script's path (MATCHLOCK_QEMU may name a wrapper script).
    script = tmp_path / "wrapper"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    t0 = time.monotonic()
    proc = popen_tied([str(script)])
    try:
        assert time.monotonic() - t0 < 5
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
