"""Network interception rules and SDK callbacks with real VMs: one SDK script, run twice —
with this package's SDK and with the unmodified reference SDK (PyPI 0.2.17) — against
`matchlock rpc`, a Debian guest with curl, and a real TLS upstream (test_intercept's, in a
test network namespace). Judged by the upstream's own request log: blocked requests never
reach it, mutated headers arrive mutated, with positive controls in the same run; a
callback that times out or raises blocks (matchlock fails closed, the reference would let
the request through)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import residue
from tests.e2e.refsdk import run_ref
from tests.e2e.test_intercept import upstreams  # noqa: F401 - the module's fixture

pytestmark = pytest.mark.e2e

OUR_CLI = str(Path(sys.executable).parent / "matchlock")

SCRIPT = r'''
import json, sys, time
from matchlock import (Client, Sandbox, NetworkInterceptionConfig, NetworkHookRule,
                       NetworkHookResult, NetworkHookRequestMutation,
                       NetworkHookResponseMutation, NetworkBodyTransform)

IMAGE, API_IP, OURS = sys.argv[1], sys.argv[2], sys.argv[3] == "ours"
calls = []

def decide(req):
    calls.append([req.phase, req.method, req.host, req.path, req.query or {}])
    if req.path == "/cb-block":
        return NetworkHookResult(action="block")
    headers = dict(req.request_headers or {})
    headers["X-Cb"] = ["from-callback"]
    return NetworkHookResult(request=NetworkHookRequestMutation(headers=headers))

def slow(req):
    time.sleep(3)

def boom(req):
    raise RuntimeError("hook bug")

def after(req):
    calls.append([req.phase, req.status_code, req.path,
                  (req.response_headers or {}).get("Content-Type")])
    return NetworkHookResult(response=NetworkHookResponseMutation(
        headers={"Content-Type": ["text/plain"], "X-After": ["1"]},
        set_body="body set by the callback\n"))

rules = NetworkInterceptionConfig(rules=[
    NetworkHookRule(name="no-put", phase="before", methods=["PUT"], action="block"),
    NetworkHookRule(name="no-admin", phase="before", path="/admin*", action="block"),
    NetworkHookRule(name="static", phase="before", hosts=["api.test"],
                    set_headers={"X-Static": "1"}, delete_headers=["X-Drop"]),
    NetworkHookRule(name="query", phase="before", path="/ok", set_query={"added": "yes"}),
    NetworkHookRule(name="decide", phase="before", path="/cb*", hook=decide, timeout_ms=5000),
    NetworkHookRule(name="slow", phase="before", path="/slow", hook=slow, timeout_ms=500),
    NetworkHookRule(name="boom", phase="before", path="/boom", hook=boom, timeout_ms=5000),
    NetworkHookRule(name="redact", phase="after", path="/echo",
                    body_replacements=[NetworkBodyTransform('"api.test"', '"[host]"')]),
    NetworkHookRule(name="sse", phase="after", path="/sse",
                    body_replacements=[NetworkBodyTransform("event", "EVT")]),
    NetworkHookRule(name="setbody", phase="after", path="/setbody", hook=after,
                    timeout_ms=5000),
])
events = []
kw = {"on_event": events.append} if OURS else {}
sandbox = Sandbox(IMAGE).allow_host("api.test").add_host("api.test", API_IP) \
    .with_network_interception(rules)
out = {}
with Client(**kw) as client:
    client.launch(sandbox)
    cmd = ("c() { curl -sS --path-as-is -o /tmp/body -w '%{http_code}' \"$@\"; "
           "printf ' '; head -c 300 /tmp/body | tr '\\n' ' '; echo; }; "
           "for p in /ok /cb-ok /cb-block /admin /x/../admin /slow /boom /echo /setbody; do "
           "printf '%s ' \"$p\"; c -H 'X-Drop: 1' \"https://api.test$p?k=v\"; done; "
           "printf 'PUT '; c -X PUT https://api.test/ok; "
           "printf 'SSE '; curl -sSN -o /tmp/sse -w '%{time_starttransfer} %{time_total}' "
           "https://api.test/sse; echo; cat /tmp/sse")
    r = client.exec(cmd)
    out["exec"] = [r.exit_code, r.stdout, r.stderr]
    out["calls"] = calls
    if OURS:
        time.sleep(0.5)  # events are notifications: let the last ones arrive
        out["events"] = [[e.network.method, e.network.url, e.network.host,
                          e.network.status_code, e.network.blocked, e.network.block_reason]
                         for e in events if e.network is not None]
print("RESULT " + json.dumps(out))
'''


def _run(which: str, env: dict, api_ip: str, image: str) -> dict:
    args = [image, api_ip, which]
    if which == "ref":
        proc = run_ref(SCRIPT.replace("sys.argv[1], sys.argv[2], sys.argv[3]",
                                      ", ".join(repr(a) for a in args)),
                       env=env, check=False, timeout=400)
    else:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "hooks_script.py"
            path.write_text(SCRIPT)
            proc = subprocess.run([sys.executable, str(path), *args], env=env, text=True,
                                  capture_output=True, timeout=400, cwd=d)
    assert proc.returncode == 0, f"{which} SDK script failed:\n{proc.stdout}\n{proc.stderr}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _lines(stdout: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("/") or line.startswith("PUT "):
            name, code, *body = line.split(" ", 2) + [""]
            out[name] = (code, body[0].strip())
    return out


@pytest.mark.parametrize("which", ["ours", "ref"])
def test_rules_and_callbacks(which, upstreams, ml_env, debian_image, state_home,  # noqa: F811
                             qemu_present) -> None:
    env = {**ml_env, "MATCHLOCK_UPSTREAM_CA": str(upstreams.ca),
           # the upstream sits in 198.18/15 (special use): open exactly its address
           "MATCHLOCK_ALLOW_PRIVATE": upstreams.api, "MATCHLOCK_BIN": OUR_CLI,
           "PYTHONPATH": str(ROOT / "src")}
    if which == "ref":
        env.pop("PYTHONPATH")
    before = residue(state_home)["qemu"]
    mark = upstreams.mark()
    out = _run(which, env, upstreams.api, debian_image)
    code, stdout, stderr = out["exec"]
    res = _lines(stdout)
    got = {k: v[0] for k, v in res.items()}
    assert got == {"/ok": "200", "/cb-ok": "200", "/cb-block": "403", "/admin": "403",
                   "/x/../admin": "403", "/slow": "403", "/boom": "403", "/echo": "200",
                   "/setbody": "200", "PUT": "403"}, stdout + stderr
    assert "fail closed" in res["/slow"][1] and "fail closed" in res["/boom"][1]

    # the upstream's own log: what reached it, and how
    reqs = [r for r in upstreams.records("req", since=mark)
            if r["server"].startswith(upstreams.api)]
    by_path = {r["target"].split("?")[0]: r for r in reqs}
    assert sorted(by_path) == ["/cb-ok", "/echo", "/ok", "/setbody", "/sse"], \
        [r["target"] for r in reqs]
    ok, cb = by_path["/ok"], by_path["/cb-ok"]
    assert ok["headers"]["x-static"] == "1" and "x-drop" not in ok["headers"]
    assert ok["target"] == "/ok?added=yes&k=v"  # query edited (re-encoded, sorted)
    assert "x-cb" not in ok["headers"]  # control: the callback rule did not match /ok
    assert cb["headers"]["x-cb"] == "from-callback" and cb["headers"]["x-static"] == "1"

    # after-phase: replacement in a JSON body, a body set by a callback, SSE streamed
    assert '"host": "[host]"' in res["/echo"][1], res["/echo"]
    assert by_path["/echo"]["headers"]["host"] == "api.test"  # the response was rewritten
    assert res["/setbody"][1] == "body set by the callback"
    sse = stdout.split("SSE ", 1)[1].splitlines()
    first, total = map(float, sse[0].split())
    assert first < 1.5 and total >= 2.5, sse[0]  # streamed, not held until the end
    data = [x for x in sse[1:] if x.startswith("data:")]
    assert len(data) == 4 and all(x.startswith("data: EVT ") for x in data), sse

    # what the callbacks saw (the callbacks ran in the SDK process, over its Unix socket)
    before_calls = [c for c in out["calls"] if c[0] == "before"]
    assert ["before", "GET", "api.test", "/cb-ok", {"k": "v"}] in before_calls
    assert ["after", 200, "/setbody", ["text/plain"]] in out["calls"]

    if which == "ours":  # `event` notifications after create (§2.16)
        evs = out["events"]
        assert ["GET", "https://api.test/ok", "api.test", 200, False, ""] in evs, evs
        blocked = [e for e in evs if e[4]]
        assert len(blocked) >= 6 and all("blocked by policy" in e[5] for e in blocked), blocked
    assert residue(state_home)["qemu"] == before

