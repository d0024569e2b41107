"""Address sealing with real VMs: the host itself, special-use ranges, 0.0.0.0, exceptions.

A veth namespace (`veth_netns`, 198.18.X.0/24) holds upstreams on X.2 and on one address in
each of several special-use ranges (routed from the host through the veth). The host side
of the veth, X.1, is an address of this host: the test binds its own recording listeners
there (ports 80, 8080, 8081) and on 127.0.0.1:80. Each run lifts the range block for
198.18.X.0/24, so a refusal of X.1 can only come from the host-local rule. Every verdict is
judged by what the listeners recorded, with a positive control in the same run, and by the
reason in the VM's event log, read while the VM waits.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import residue, veth_netns

pytestmark = pytest.mark.e2e

# One upstream per special-use range, inside the test namespace; (range, address picker).
SPECIAL = {
    "doc2": "198.51.100.0/24", "doc3": "203.0.113.0/24", "cgnat": "100.64.0.0/10",
    "ietf": "192.0.0.0/24", "classe": "240.0.0.0/4",
}

NS_SERVER = r"""
import json, socket, sys, threading
log, addrs, ports = sys.argv[1], sys.argv[2].split(","), [int(p) for p in sys.argv[3].split(",")]
lock = threading.Lock()
def serve(srv):
    while True:
        conn, peer = srv.accept()
        me = conn.getsockname()
        with lock, open(log, "a") as f:
            f.write(json.dumps({"dst": "%s:%d" % me, "peer": peer[0]}) + "\n")
        conn.settimeout(3)
        try:
            conn.recv(4096)
        except OSError:
            pass
        body = b"hello from %s:%d\n" % (me[0].encode(), me[1])
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        conn.close()
for a in addrs:
    for p in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a, p))
        s.listen(64)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
open(log + ".ready", "w").close()
threading.Event().wait()
"""


class Recorder:
    """Listeners in this (host) namespace that record every connection and answer."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.socks: list[socket.socket] = []

    def listen(self, ip: str, port: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as e:
            s.close()
            pytest.fail(f"cannot bind the test's listener on {ip}:{port}: {e}", False)
        s.listen(64)
        self.socks.append(s)
        threading.Thread(target=self._serve, args=(s, f"{ip}:{port}"), daemon=True).start()

    def _serve(self, s: socket.socket, name: str) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            self.hits.append(name)
            body = f"HOST LISTENER {name} REACHED\n".encode()
            try:
                conn.settimeout(3)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()


def _routed(ip: str) -> bool:
    """Whether the host already has a route (other than the default) covering ip."""
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                         text=True).stdout
    addr = ipaddress.ip_address(ip)
    for line in out.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable"):
            first = line.split()[1] if first != "default" else ""
        try:
            if first and addr in ipaddress.ip_network(first, strict=False):
                return True
        except ValueError:
            continue
    return False


def _pick(net: str, rng: random.Random) -> str:
    n = ipaddress.ip_network(net)
    for _ in range(100):
        a = n.network_address + rng.randrange(1, min(n.num_addresses - 1, 1 << 20))
        if str(a) in ("192.0.0.9", "192.0.0.10"):  # globally reachable registry exceptions
            continue
        if not _routed(str(a)):
            return str(a)
    pytest.fail(f"no free address in {net} on this host", False)


class Sealed:
    def __init__(self, ns: str, net: str, work: Path, special: dict[str, str]) -> None:
        self.ns, self.net, self.work, self.special = ns, net, work, special
        self.up, self.me = f"{net}.2", f"{net}.1"
        self.log = work / "ns.jsonl"
        self.host = Recorder()

    def ns_hits(self) -> list[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return [json.loads(line)["dst"] for line in text.splitlines()]


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    work = tmp_path_factory.mktemp("sealed")
    rng = random.Random()
    special = {k: _pick(v, rng) for k, v in SPECIAL.items()}
    with veth_netns((2,)) as (ns, net):
        s = Sealed(ns, net, work, special)
        for ip in special.values():
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/32", "dev",
                            "mltn" + ns.removeprefix("mltest-")], check=True)
            subprocess.run(["ip", "route", "add", f"{ip}/32", "via", s.up], check=True)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NS_SERVER, str(s.log),
             ",".join([s.up, *special.values()]), "80,8080"],
            stderr=open(work / "ns.err", "wb"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 15
            while not Path(str(s.log) + ".ready").exists():
                assert proc.poll() is None, (work / "ns.err").read_text()
                assert time.monotonic() < deadline, "the namespace server did not start"
                time.sleep(0.05)
            for port in (80, 8080, 8081):
                s.host.listen(s.me, port)
            s.host.listen("127.0.0.1", 80)
            yield s
        finally:
            s.host.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for ip in special.values():
                subprocess.run(["ip", "route", "del", f"{ip}/32"], capture_output=True)


def run_paused(ml_env: dict, state_home: Path, args: list[str], script: str,
               env: dict | None = None) -> tuple[dict[str, str], list[dict], str]:
    """`matchlock run -i` a busybox script that prints `R name value` lines, then PAUSE and
    waits on stdin; the VM's event log is read while it waits. Returns (results, events,
    diagnostics)."""
    cmd = [sys.executable, "-m", "matchlock", "run", "-i", "--image", "matchlock/busybox",
           "--dns-servers", "127.0.0.1", *args, "--", "sh", "-c", script]
    p = subprocess.Popen(cmd, env={**ml_env, **(env or {})}, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    lines: list[str] = []
    events: list[dict] = []
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if line == "PAUSE":
                vm = next(x for x in lines if x.startswith("vm-"))
                path = state_home / "vms" / vm / "logs" / "net.jsonl"
                events = [json.loads(x) for x in path.read_text().splitlines()]
                p.stdin.write(b"\n")
                p.stdin.close()
        rc = p.wait(120)
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    diag = "\n".join(lines)[-4000:] + "\n--- stderr\n" + err[-2000:]
    assert rc == 0, diag
    assert events or any(x == "PAUSE" for x in lines), diag
    results = {}
    for line in lines:
        if line.startswith("R "):
            _, name, value = (line.split(" ", 2) + [""])[:3]
            results[name] = value
    vm = next(x for x in lines if x.startswith("vm-"))
    assert residue(state_home)["qemu"] == [] and not (state_home / "vms" / vm).exists()
    return results, events, diag


PRELUDE = r"""
hostname
get() { # name url [header]: R name "<first line of the answer>" or FAIL
  if [ -n "$3" ]; then out=$(timeout 10 wget -q -O - --header "$3" "$2" 2>&1)
  else out=$(timeout 10 wget -q -O - "$2" 2>&1); fi
  rc=$?
  if [ $rc = 0 ]; then echo "R $1 $(echo "$out" | head -n 1)"; else echo "R $1 FAIL"; fi
}
raw() { # name ip port host: a raw HTTP/1.0 request, the status line and the body
  out=$(printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$4" | timeout 10 nc -w 5 "$2" "$3" 2>&1)
  echo "R $1 $(echo "$out" | head -n 1 | tr -d '\r')|$(echo "$out" | tail -n 1 | tr -d '\r')"
}
"""


def _blocked(events: list[dict]) -> str:
    """The reasons of every blocked event, one per line."""
    return "\n".join(e["detail"] for e in events if e["kind"] == "blocked")


def test_open_mode_host_itself_special_ranges_and_exceptions(ml_env, state_home, sealed):
    s, sp = sealed, sealed.special
    script = PRELUDE + f"""
get up_ip http://{s.up}:8080/
get up_name http://up.test:8080/
get self_ip http://{s.me}:8080/
get self_name http://self.test:8080/
get self_80 http://{s.me}/
get self_exact http://{s.me}:8081/
""" + "".join(f"get {k} http://{ip}:8080/\n" for k, ip in sp.items()) + "echo PAUSE; read x\n"
    host0, ns0 = len(s.host.hits), len(s.ns_hits())
    r, events, diag = run_paused(
        ml_env, state_home,
        ["--add-host", f"self.test:{s.me}", "--add-host", f"up.test:{s.up}",
         "--allow-private", f"{s.net}.0/24", "--allow-private", f"{s.me}:8081"],
        script, env={"MATCHLOCK_ALLOW_PRIVATE": sp["doc2"]})
    # positive controls: the namespace upstream, the env-var exception, the exact host one
    assert r["up_ip"] == f"hello from {s.up}:8080", diag
    assert r["up_name"] == f"hello from {s.up}:8080", diag
    assert r["doc2"] == f"hello from {sp['doc2']}:8080", diag
    assert r["self_exact"] == f"HOST LISTENER {s.me}:8081 REACHED", diag
    # the host itself (despite the /24 exception), loopback, the other special ranges
    for k in ("self_ip", "self_name", "self_80", "doc3", "cgnat", "ietf", "classe"):
        assert r[k] == "FAIL", (k, diag)
    assert s.host.hits[host0:] == [f"{s.me}:8081"]
    assert sorted(s.ns_hits()[ns0:]) == sorted(
        [f"{s.up}:8080", f"{s.up}:8080", f"{sp['doc2']}:8080"])
    why = _blocked(events)
    for where in (f"{s.me}:8080", f"{s.me}:80"):
        assert f"address {where} is an address of this host, which a sandbox may not reach; " \
            f"allow exactly this address with --allow-private {where}" in why, why
    for k in ("doc3", "cgnat", "ietf", "classe"):
        assert f"address {sp[k]}:8080 is in {SPECIAL[k]} (" in why, (k, why)
        assert f"a special-use range this sandbox may not reach; allow it with " \
            f"--allow-private {sp[k]}:8080" in why, (k, why)


def test_intercept_allow_all_and_passthrough(ml_env, state_home, sealed):
    """--allow-host '*': by add-host name, by IP, by Host header (also IPv4-mapped and
    0.0.0.0 forms), and through the passthrough (ports other than 80/443)."""
    s, sp = sealed, sealed.special
    script = PRELUDE + f"""
raw h_up {s.up} 80 up.test
raw h_self_name {s.me} 80 self.test
raw h_self_ip {s.me} 80 {s.me}
raw h_self_hdr {s.up} 80 {s.me}
raw h_self_hdr_name {s.up} 80 self.test
raw h_mapped_self {s.up} 80 mself.test
raw h_mapped_up {s.up} 80 mup.test
raw h_hole {s.up} 80 hole.test
raw h_zero {s.up} 80 0.0.0.0
raw h_loop {s.up} 80 loop.test
raw h_loop_ip {s.up} 80 127.0.0.1
raw h_doc3 {s.up} 80 doc3.test
raw h_doc2 {s.up} 80 doc2.test
get p_up http://{s.up}:8080/
get p_self http://{s.me}:8080/
get p_self_exact http://self.test:8081/
get p_doc3 http://{sp['doc3']}:8080/
echo PAUSE; read x
"""
    host0, ns0 = len(s.host.hits), len(s.ns_hits())
    r, events, diag = run_paused(
        ml_env, state_home,
        ["--allow-host", "*", "--add-host", f"self.test:{s.me}", "--add-host",
         f"up.test:{s.up}", "--add-host", "hole.test:0.0.0.0", "--add-host",
         "loop.test:127.0.0.1", "--add-host", f"mself.test:::ffff:{s.me}", "--add-host",
         f"mup.test:::ffff:{s.up}", "--add-host", f"doc3.test:{sp['doc3']}",
         "--add-host", f"doc2.test:{sp['doc2']}",
         "--allow-private", f"{s.net}.0/24,{s.me}:8081,127.0.0.1:80",
         "--allow-private", "doc2.test:80"],
        script)
    ok = lambda v, who: v.startswith("HTTP/1.") and " 200 " in v and who in v  # noqa: E731

    # positive controls
    assert ok(r["h_up"], f"hello from {s.up}:80"), diag
    assert ok(r["h_mapped_up"], f"hello from {s.up}:80"), diag
    assert ok(r["h_loop"], "HOST LISTENER 127.0.0.1:80 REACHED"), diag  # named exactly
    assert ok(r["h_doc2"], f"hello from {sp['doc2']}:80"), diag  # a name exception
    assert r["p_up"] == f"hello from {s.up}:8080", diag
    assert r["p_self_exact"] == f"HOST LISTENER {s.me}:8081 REACHED", diag
    # refused, with the rule named in the answer the guest got
    for k in ("h_self_name", "h_self_ip", "h_self_hdr", "h_self_hdr_name", "h_mapped_self"):
        assert " 403 " in r[k] and "is an address of this host" in r[k], (k, diag)
    for k in ("h_hole", "h_zero"):
        assert " 403 " in r[k] and "never dialled" in r[k], (k, diag)
    assert ok(r["h_loop_ip"], "HOST LISTENER 127.0.0.1:80 REACHED"), diag  # the same
    assert " 403 " in r["h_doc3"] and "special-use range" in r["h_doc3"], diag
    assert r["p_self"] == "FAIL" and r["p_doc3"] == "FAIL", diag
    # what the listeners saw: only the positive controls
    assert sorted(s.host.hits[host0:]) == sorted(
        [f"{s.me}:8081", "127.0.0.1:80", "127.0.0.1:80"]), s.host.hits[host0:]
    assert sorted(s.ns_hits()[ns0:]) == sorted(
        [f"{s.up}:80", f"{s.up}:80", f"{sp['doc2']}:80", f"{s.up}:8080"]), s.ns_hits()[ns0:]
    why = _blocked(events)
    assert f"address {s.me}:8080 is an address of this host" in why, why  # passthrough
    assert f"address {sp['doc3']}:8080 is in 203.0.113.0/24" in why, why
    assert f"address {s.me}:80 is an address of this host" in why, why  # by Host/name
    assert "address 0.0.0.0:80 is in 0.0.0.0/8" in why, why


FRESH = r"""
import ipaddress, json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from matchlock.net.hostaddrs import KernelHostAddresses
view = KernelHostAddresses()
res = {"before": [], "after_add": [], "after_del": []}
for i in range(1, 101):
    ip = "198.51.100.%d" % i
    a = ipaddress.ip_address(ip)
    res["before"].append(view.is_local(a))
    subprocess.run(["ip", "addr", "add", ip + "/32", "dev", "lo"], check=True)
    res["after_add"].append(view.is_local(a))
    subprocess.run(["ip", "addr", "del", ip + "/32", "dev", "lo"], check=True)
    res["after_del"].append(view.is_local(a))
# overflow: a tiny receive buffer and thousands of changes between two checks
small = KernelHostAddresses(rcvbuf=2048)
batch = "".join("addr add 10.%d.%d.1/32 dev lo\n" % (i // 250, i % 250) for i in range(3000))
subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
res["overflow_seen"] = small.is_local(ipaddress.ip_address("10.11.249.1"))
res["overflow_resyncs"] = small.resyncs
res["overflow_absent"] = small.is_local(ipaddress.ip_address("10.12.0.1"))
print(json.dumps(res))
"""


def test_kernel_view_sees_each_change_before_the_next_check():
    """In a namespace of our own: an address added right before a check is local at that
    check, and not after it is removed; an overflowing burst of changes forces a new dump
    instead of a stale view."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    with veth_netns(()) as (ns, _):
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", FRESH, src],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["before"] == [False] * 100
    assert res["after_add"] == [True] * 100
    assert res["after_del"] == [False] * 100
    assert res["overflow_seen"] is True and res["overflow_absent"] is False
    assert res["overflow_resyncs"] >= 2, res


def test_view_refused_on_a_thread_in_another_namespace():
    from matchlock.net._setns import CLONE_NEWNET, unshare
    from matchlock.net.hostaddrs import HostAddressError, KernelHostAddresses

    assert os.geteuid() == 0, "this test enters a network namespace on a thread: run as root"
    result: list = []

    def body():
        unshare(CLONE_NEWNET)  # this thread only; it ends right after
        try:
            KernelHostAddresses()
            result.append("opened")
        except HostAddressError:
            result.append("refused")

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert result == ["refused"]


@pytest.mark.parametrize("args,env,needles", [
    (("--allow-private", "0.0.0.0"), {}, ("invalid --allow-private entry '0.0.0.0'",
                                          "never dialled", "127.0.0.1:PORT")),
    (("--allow-private", "10.0.0.1,localhost"), {}, ("'localhost'", "name the address")),
    (("--allow-private", "10.1.2.3/8"), {}, ("did you mean 10.0.0.0/8?",)),
    (("--allow-private", "[fd00::1]:99999"), {}, ("port must be 1 to 65535",)),
    ((), {"MATCHLOCK_ALLOW_PRIVATE": "*.corp"}, ("invalid MATCHLOCK_ALLOW_PRIVATE entry",)),
    (("--no-network", "--allow-private", "10.0.0.1"), {}, ("--no-network", "--allow-private")),
])
def test_bad_allow_private(ml, state_home, args, env, needles):
    before = residue(state_home)
    p = ml("run", "--image", "matchlock/busybox", *args, "true", env=env)
    err = p.stderr.decode().strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert residue(state_home) == before
