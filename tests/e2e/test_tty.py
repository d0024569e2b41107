"""`run -it` under a real terminal (tmux): prompt, size, resize, exit status."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.e2e


def _tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                          check=True).stdout


def _wait_for(sock: str, pred, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux(sock, "capture-pane", "-p", "-t", "t")
        if pred(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"timed out; screen was:\n{screen}")


def test_interactive_tty(ml_env, qemu_present, tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: run ./scripts/install.sh", False)
    sock = f"ml-{uuid.uuid4().hex[:8]}"
    rc_file = tmp_path / "rc"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ml_env.items()
                   if k.startswith(("MATCHLOCK_", "PATH", "HOME", "PYTHON")))
    cmd = (f"env {env} {shlex.quote(sys.executable)} -m matchlock run -it --image "
           f"matchlock/busybox -e PS1='READY$ ' sh; echo $? > {rc_file}; sleep 30")
    _tmux(sock, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30", cmd)
    try:
        _wait_for(sock, lambda s: "READY$" in s)
        _tmux(sock, "send-keys", "-t", "t", "stty size", "Enter")
        _wait_for(sock, lambda s: "30 100" in s, 30)
        _tmux(sock, "resize-window", "-t", "t", "-x", "90", "-y", "25")
        time.sleep(1)
        _tmux(sock, "send-keys", "-t", "t", "clear; stty size", "Enter")
        _wait_for(sock, lambda s: "25 90" in s, 30)
        _tmux(sock, "send-keys", "-t", "t", "exit 3", "Enter")
        deadline = time.monotonic() + 30
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rc_file.read_text().strip() == "3"
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)


def test_exec_interactive_tty(ml, ml_env, qemu_present, tmp_path):
    """`exec -it` into a detached VM behaves like `run -it`: prompt, size, resize, status;
    Ctrl-C goes to the guest's foreground process, not to the VM."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: run ./scripts/install.sh", False)
    p = ml("run", "-d", "--image", "matchlock/busybox", "--no-network", timeout=180)
    assert p.returncode == 0, p.stderr.decode()
    vm_id = p.stdout.decode().strip()
    sock = f"ml-{uuid.uuid4().hex[:8]}"
    rc_file = tmp_path / "rc"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ml_env.items()
                   if k.startswith(("MATCHLOCK_", "PATH", "HOME", "PYTHON")))
    cmd = (f"env {env} {shlex.quote(sys.executable)} -m matchlock exec -it -e 'PS1=READY$ ' "
           f"{vm_id} sh; echo $? > {rc_file}; sleep 30")
    _tmux(sock, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30", cmd)
    try:
        _wait_for(sock, lambda s: "READY$" in s)
        _tmux(sock, "send-keys", "-t", "t", "stty size", "Enter")
        _wait_for(sock, lambda s: "30 100" in s, 30)
        _tmux(sock, "resize-window", "-t", "t", "-x", "90", "-y", "25")
        time.sleep(1)
        _tmux(sock, "send-keys", "-t", "t", "clear; stty size", "Enter")
        _wait_for(sock, lambda s: "25 90" in s, 30)
        _tmux(sock, "send-keys", "-t", "t", "sleep 1000", "Enter")
        time.sleep(0.5)
        _tmux(sock, "send-keys", "-t", "t", "C-c")
        _tmux(sock, "send-keys", "-t", "t", "clear; echo after-$((40+2))", "Enter")
        _wait_for(sock, lambda s: "after-42" in s, 30)
        _tmux(sock, "send-keys", "-t", "t", "exit 3", "Enter")
        deadline = time.monotonic() + 30
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rc_file.read_text().strip() == "3"
        assert ml("exec", vm_id, "true").returncode == 0  # the VM is still up
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        ml("kill", vm_id)
        ml("rm", vm_id)
