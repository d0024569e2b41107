"""Sealed networking without root: `matchlock run` as uid 65534 (nobody).

Each run happens in a private mount namespace (made here, as root) where:
- /dev/net/tun is replaced by a node with the mode under test (0666 or 0600), so the
  host's own /dev/net/tun is never touched;
- the Python prefix is bind-mounted somewhere nobody can read (/root may be 0700);
then `setpriv` drops to nobody. The cache is a copy nobody owns. Upstream is an HTTP server
in a veth namespace on 198.18.X (conftest.veth_netns); nothing else is reached.
If this host does not allow unprivileged user namespaces, the open-mode test asserts the
clear error instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from matchlock.paths import cache_dir
from tests.e2e.conftest import veth_netns

pytestmark = pytest.mark.e2e

NOBODY = 65534
PAGE = "hello-unprivileged"
ERR_PREFIX = "error: networking needs root or unprivileged user namespaces: "
ERR_SUFFIX = "; run as root, or use --no-network"

WRAPPER = r"""
set -e
work=$1; tun_mode=$2; shift 2
mount --bind "$PY_PREFIX" "$work/py"
if [ -n "$PY_VENV" ]; then mount --bind "$PY_VENV" "$work/venv"; fi
rm -f "$work/tun"; mknod -m "$tun_mode" "$work/tun" c 10 200
mount --bind "$work/tun" /dev/net/tun
if [ -n "$FAKE_MAX_USERNS" ]; then
  echo 0 > "$work/zero"; mount --bind "$work/zero" /proc/sys/user/max_user_namespaces
fi
exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"
"""


@pytest.fixture(scope="module")
def nobody(qemu_present):
    """Run matchlock as nobody: returns run(args, tun_mode=..., env=...)."""
    work = Path(tempfile.mkdtemp(prefix="ml-unpriv-"))
    work.chmod(0o755)
    try:
        for d in ("py", "venv"):
            (work / d).mkdir()
        cache = work / "cache"
        cache.mkdir()
        for d in ("guest", "images", "initramfs", "kernels"):
            if (cache_dir() / d).exists():
                shutil.copytree(cache_dir() / d, cache / d, symlinks=True)
        home = work / "home"
        home.mkdir()
        resolv = work / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(cache), str(home)], check=True)
        (work / "wrap.sh").write_text(WRAPPER)

        base, prefix = sys.base_prefix, sys.prefix

        def remap(p: str) -> str:
            if prefix != base and p.startswith(prefix):
                return str(work / "venv") + p[len(prefix):]
            if p.startswith(base):
                return str(work / "py") + p[len(base):]
            return p

        src = str(Path(__file__).resolve().parents[2] / "src")
        pypath = [src] + [remap(p) for p in sys.path if p and Path(p).is_dir()]
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
            "MATCHLOCK_HOME": str(home), "MATCHLOCK_CACHE_DIR": str(cache),
            "MATCHLOCK_RESOLV_CONF": str(resolv),
            "PYTHONPATH": ":".join(pypath), "LD_LIBRARY_PATH": str(work / "py" / "lib"),
            "PY_PREFIX": base, "PY_VENV": prefix if prefix != base else "",
        }
        # The real interpreter, not a venv's bin/python: that is a symlink into the
        # (unreadable for nobody) base prefix, and matchlock re-executes sys.executable
        # for its user-namespace helper. The venv's packages come in via PYTHONPATH.
        python = remap(os.path.realpath(sys.executable))

        def run(*args: str, tun_mode: str = "0666", extra_env: dict | None = None,
                timeout: float = 240) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", str(work / "wrap.sh"),
                 str(work), tun_mode, python, "-m", "matchlock", *args],
                env={**env, **(extra_env or {})}, capture_output=True, timeout=timeout)

        yield run
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _userns_allowed() -> bool:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "unshare", "-Urn", "true"], capture_output=True).returncode == 0


@pytest.fixture
def upstream(tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "index.html").write_text(PAGE)
    with veth_netns() as (ns, net):
        srv = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "-b",
             f"{net}.2", "-d", str(tmp_path), "8080"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection((f"{net}.2", 8080), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            yield f"{net}.2"
        finally:
            srv.send_signal(signal.SIGTERM)
            srv.wait(5)


def _helpers_of(vm_id: str) -> list[int]:
    """Namespace helper processes still alive for this VM."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"matchlock.net._userns" in b" ".join(cmd) and vm_id.encode() in cmd:
                pids.append(int(pid))
    return pids


def test_open_mode_as_nobody(nobody, upstream, host_server):
    host_port, hits = host_server
    script = f"""
try() {{
  name=$1; shift
  if "$@" >/dev/null 2>&1; then echo "OK $name"; else echo "FAIL $name"; fi
}}
id -u
try fetch sh -c 'timeout 10 wget -q -O - http://{upstream}:8080/ | grep -q {PAGE}'
try fetch_by_name sh -c 'timeout 10 wget -q -O - http://up.test:8080/ | grep -q {PAGE}'
try private10 timeout 5 wget -q -O /dev/null http://10.0.0.1/
try loopback timeout 5 wget -q -O /dev/null http://127.0.0.1:{host_port}/
try metadata timeout 5 wget -q -O /dev/null http://169.254.169.254/
try ping_up ping -c 1 -W 2 {upstream}
hostname
"""
    t0 = time.monotonic()
    p = nobody("run", "--image", "matchlock/busybox", "--add-host", f"up.test:{upstream}",
               "--allow-private", f"{upstream}:8080",
               "--dns-servers", "127.0.0.1", "--", "sh", "-c", script)
    elapsed = time.monotonic() - t0
    out, err = p.stdout.decode(), p.stderr.decode()
    if not _userns_allowed():
        assert p.returncode != 0
        line = err.strip().splitlines()[-1]
        assert line.startswith(ERR_PREFIX) and line.endswith(ERR_SUFFIX), err
        return
    assert p.returncode == 0, out + err
    lines = out.split("\n")
    results = dict(line.split(" ", 1)[::-1] for line in lines if line[:3] in ("OK ", "FAI"))
    assert results == {"fetch": "OK", "fetch_by_name": "OK", "private10": "FAIL",
                       "loopback": "FAIL", "metadata": "FAIL", "ping_up": "FAIL"}, out + err
    assert hits == []
    vm_id = [line for line in lines if line.startswith("vm-")][0]
    assert _helpers_of(vm_id) == []  # the helper (and with it the namespaces) is gone
    print(f"unprivileged networked run: {elapsed:.2f} s")


def test_tun_not_accessible_says_so(nobody):
    p = nobody("run", "--image", "matchlock/busybox", "--", "true", tun_mode="0600")
    assert p.returncode != 0
    assert p.stderr.decode().strip().splitlines()[-1] == (
        ERR_PREFIX + f"/dev/net/tun is not read-write for uid {NOBODY} "
        "(mode 0600, owner uid 0)" + ERR_SUFFIX)


def test_user_namespaces_off_says_so(nobody):
    p = nobody("run", "--image", "matchlock/busybox", "--", "true",
               extra_env={"FAKE_MAX_USERNS": "1"})
    assert p.returncode != 0
    assert p.stderr.decode().strip().splitlines()[-1] == (
        ERR_PREFIX + "user.max_user_namespaces=0" + ERR_SUFFIX)


def test_no_network_needs_nothing(nobody):
    p = nobody("run", "--image", "matchlock/busybox", "--no-network", "--", "sh", "-c",
               "ls /sys/class/net", tun_mode="0600", extra_env={"FAKE_MAX_USERNS": "1"})
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().split() == ["lo"]
