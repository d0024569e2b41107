"""Sealed networking with real VMs: no NIC, open-mode relay, and what never leaves.

"Upstream" is an HTTP server inside a network namespace this test creates (veth pair,
198.18.0.1 host side, 198.18.0.2 in the namespace); nothing talks beyond 127.0.0.0/8 or
the namespaces created here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from matchlock.net.netns import NETNS_DIR, NetNamespace, leftover_namespaces, remove_namespace
from matchlock.net.types import GATEWAY_IP, TAP_NAME
from tests.e2e.conftest import residue

pytestmark = pytest.mark.e2e

UP_HOST, UP_NS = "198.18.0.1", "198.18.0.2"
PAGE = "hello-from-upstream"

UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    with open(sys.argv[3], "a") as f:
        f.write(f"{peer} {data!r}\\n")
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A namespace with an HTTP server on UP_NS:8080 and UDP sinks on :9999 and :53."""
    tag = uuid.uuid4().hex[:6]
    ns, veth_h, veth_n = f"mltest-{tag}", f"mlth{tag}", f"mltn{tag}"
    work = tmp_path_factory.mktemp("upstream")
    (work / "index.html").write_text(PAGE)
    udp_log = work / "udp.log"
    udp_log.touch()
    procs: list[subprocess.Popen] = []
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_n)
        sh("ip", "link", "set", veth_n, "netns", ns)
        sh("ip", "addr", "add", f"{UP_HOST}/24", "dev", veth_h)
        sh("ip", "link", "set", veth_h, "up")
        sh("ip", "-n", ns, "addr", "add", f"{UP_NS}/24", "dev", veth_n)
        sh("ip", "-n", ns, "link", "set", veth_n, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "-b", UP_NS,
             "-d", str(work), "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ("9999", "53"):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", UDP_SINK, UP_NS, port,
                 str(udp_log)]))
        deadline = time.monotonic() + 10
        while True:  # the server is reachable from the host namespace
            try:
                socket.create_connection((UP_NS, 8080), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield {"ns": ns, "udp_log": udp_log}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth_h], capture_output=True)


def _vm_ns_gone(vm_id: str, state_home: Path) -> None:
    assert re.fullmatch(r"vm-[0-9a-f]{8}", vm_id), vm_id
    assert not (NETNS_DIR / ("ml-" + vm_id[3:])).exists()
    assert residue(state_home)["qemu"] == []
    assert leftover_namespaces() == []


def test_namespace_layout_and_teardown():
    """The namespace alone (no VM): TAP address, no route out, no IPv6, rules, cleanup."""
    ns = NetNamespace("vm-" + uuid.uuid4().hex[:8], mtu=1400)
    t0 = time.monotonic()
    ns.create()
    setup_ms = (time.monotonic() - t0) * 1000
    try:
        addr = subprocess.run(["ip", "-n", ns.name, "-o", "addr"], capture_output=True,
                              text=True, check=True).stdout
        assert f"{TAP_NAME}    inet {GATEWAY_IP}/30" in addr
        assert "inet6" not in addr
        links = subprocess.run(["ip", "-n", ns.name, "-o", "link"], capture_output=True,
                               text=True, check=True).stdout
        assert sorted(re.findall(r"^\d+: ([^:@]+)", links, re.M)) == ["lo", TAP_NAME]
        assert "mtu 1400" in links
        routes = subprocess.run(["ip", "-n", ns.name, "route"], capture_output=True,
                                text=True, check=True).stdout
        assert "default" not in routes
        rules = ns.ruleset_text()
        assert f"dnat ip to {GATEWAY_IP}:{ns.relay_port}" in rules
        assert "policy drop" in rules
        # The listeners live in the namespace: the host namespace has nothing on that port.
        assert ns.tcp_listener is not None
        assert ns.tcp_listener.getsockname() == (GATEWAY_IP, ns.relay_port)
        with pytest.raises(OSError):
            socket.create_connection((GATEWAY_IP, ns.relay_port), timeout=1)
    finally:
        t0 = time.monotonic()
        ns.close()
        ns.close()  # idempotent
        teardown_ms = (time.monotonic() - t0) * 1000
    assert not (NETNS_DIR / ns.name).exists()
    assert ns.name not in leftover_namespaces()
    print(f"namespace setup {setup_ms:.1f} ms, teardown {teardown_ms:.1f} ms")


def test_namespace_left_mounted_by_a_chroot_is_still_removed(tmp_path):
    """A chroot that bound /run (an install root, CI) mounts its namespaces at
    <root>/run/netns/<name>: the same file as ours. `ip netns delete` alone then fails
    (EBUSY: the file is a mount point elsewhere); `remove_namespace`, as gc uses it, must not."""
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    name = "ml-" + uuid.uuid4().hex[:8]
    sh("mount", "--bind", "/run", str(root / "run"))
    try:
        sh("mount", "--make-private", str(root / "run"))  # as fresh-machine.sh's binds are
        NETNS_DIR.mkdir(exist_ok=True)
        (NETNS_DIR / name).touch()
        # A namespace mounted through the chroot's path only.
        sh("unshare", "--net", "mount", "--bind", "/proc/self/ns/net",
           str(root / "run" / "netns" / name))
        with open("/proc/self/mountinfo") as f:
            assert f"/run/netns/{name} " in f.read()
        control = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
        assert control.returncode != 0 and "busy" in control.stderr, control.stderr
        assert remove_namespace(name)
        assert not (NETNS_DIR / name).exists()
        with open("/proc/self/mountinfo") as f:
            assert f"/netns/{name} " not in f.read()
    finally:
        subprocess.run(["umount", "-l", str(root / "run" / "netns" / name)], capture_output=True)
        subprocess.run(["umount", "-l", str(root / "run")], capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            (NETNS_DIR / name).unlink()


def test_no_network_has_only_lo(ml, state_home):
    p = ml("run", "--image", "matchlock/busybox", "--no-network", "--",
           "sh", "-c", "ls /sys/class/net; hostname", check=True)
    out = p.stdout.decode().split()
    assert out[:-1] == ["lo"]
    _vm_ns_gone(out[-1], state_home)


def test_open_mode_relays_tcp_and_drops_the_rest(ml, state_home, upstream, host_server):
    host_port, hits = host_server
    script = f"""
try() {{
  name=$1; shift
  if "$@" >/tmp/out 2>&1; then echo "OK $name"; else echo "FAIL $name"; fi
}}
# Every TCP handshake succeeds (all TCP goes to the relay): "reachable" means an answer.
answers() {{ test -n "$(echo hello | timeout 5 nc -w 3 "$1" "$2")"; }}
try fetch sh -c 'timeout 10 wget -q -O - http://{UP_NS}:8080/ | grep -q {PAGE}'
try fetch_by_name sh -c 'timeout 10 wget -q -O - http://up.test:8080/ | grep -q {PAGE}'
# DNS to any address lands on our resolver (the sink on {UP_NS}:53 must see nothing).
try dns_redirected sh -c 'nslookup up.test {UP_NS} | grep -q {UP_NS}'
try private10 timeout 5 wget -q -O /dev/null http://10.0.0.1/
try loopback timeout 5 wget -q -O /dev/null http://127.0.0.1:{host_port}/
try metadata timeout 5 wget -q -O /dev/null http://169.254.169.254/latest/meta-data/
try gateway answers {GATEWAY_IP} 12345
try gateway_dns_tcp answers {GATEWAY_IP} 53
try ping_gw ping -c 1 -W 2 {GATEWAY_IP}
try ping_up ping -c 1 -W 2 {UP_NS}
try udp nslookup -timeout=1 -retry=1 example.com {UP_NS}:9999
try ipv6 timeout 5 nc -w 3 2001:db8::1 80 </dev/null
try ipv6_ll timeout 5 ping6 -c 1 -W 2 ff02::2%eth0
hostname
"""
    # --dns-servers on loopback: a query the resolver forwards never leaves the machine.
    # 198.18/15 is a special-use range: open exactly the upstream's port
    p = ml("run", "--image", "matchlock/busybox", "--add-host", f"up.test:{UP_NS}",
           "--allow-private", f"{UP_NS}:8080",
           "--dns-servers", "127.0.0.1", "--", "sh", "-c", script, check=True)
    lines = p.stdout.decode().split("\n")
    results = dict(line.split(" ", 1)[::-1] for line in lines if line[:3] in ("OK ", "FAI"))
    assert results == {
        "fetch": "OK", "fetch_by_name": "OK", "dns_redirected": "OK",
        "private10": "FAIL", "loopback": "FAIL", "metadata": "FAIL",
        "gateway": "FAIL", "gateway_dns_tcp": "FAIL", "ping_gw": "FAIL", "ping_up": "FAIL",
        "udp": "FAIL", "ipv6": "FAIL", "ipv6_ll": "FAIL",
    }, p.stdout.decode() + p.stderr.decode()
    assert hits == []
    time.sleep(0.5)  # a stray datagram would have landed by now
    assert upstream["udp_log"].read_text() == ""
    vm_id = [line for line in lines if line.startswith("vm-")][0]
    _vm_ns_gone(vm_id, state_home)


def test_killed_supervisor_leaves_a_namespace_that_gc_finds(ml_env, tmp_path):
    """SIGKILL on `matchlock run`: QEMU dies with it; the namespace is then a leftover."""
    home = tmp_path / "home"  # its own state: the killed run leaves a VM dir and DB row
    p = subprocess.Popen(
        [sys.executable, "-m", "matchlock", "run", "--image", "matchlock/busybox", "--",
         "sh", "-c", "hostname; sleep 60"],
        env={**ml_env, "MATCHLOCK_HOME": str(home)},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert p.stdout is not None
        vm_id = p.stdout.readline().decode().strip()
        name = "ml-" + vm_id.removeprefix("vm-")
        assert (NETNS_DIR / name).exists()
        assert name not in leftover_namespaces()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        assert name in leftover_namespaces()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert remove_namespace(name)
    assert not (NETNS_DIR / name).exists()
    deadline = time.monotonic() + 5
    while residue(home)["qemu"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert residue(home)["qemu"] == []
