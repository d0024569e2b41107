"""Interception rules in the real proxy, no VM: TLS client → InterceptProxy → TLS upstream
on 127.0.0.2 (test_proxy.py's harness), callbacks answered by the SDK's own HookServer
over a real Unix socket. Judged by what the upstream recorded."""

from __future__ import annotations

import json
import threading
import time

import pytest
from tests.unit.net.test_proxy import PH, REAL, UP_IP, Client, Env

from matchlock.net.policy import normalise_glob
from matchlock.net.proxy._rules import RuleSet, compile_rules
from matchlock.sdk._hooks import LocalNetworkHook
from matchlock.sdk._hookserver import HookServer
from matchlock.sdk._types import (
    NetworkBodyTransform,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("hooks"))
    yield e
    e.close()


class Hooks:
    """The SDK's HookServer with per-test callables."""

    def __init__(self) -> None:
        self.fns: dict[str, object] = {}
        self.calls: list = []
        table = {f"network_hook_{i}": LocalNetworkHook(f"h{i}", "", 0, self._make(i))
                 for i in range(1, 9)}
        self.server = HookServer(table)

    def _make(self, i):
        def fn(req):
            self.calls.append((i, req))
            return self.fns[i](req)
        return fn


@pytest.fixture(scope="module")
def hooks():
    h = Hooks()
    yield h
    h.server.close()


def _proxy(env, hooks, *rules):
    compiled, sock = compile_rules({"rules": list(rules), "callback_socket": hooks.server.path},
                                   normalise_glob)
    env.events.clear()
    hooks.calls.clear()
    p = env.proxy(rules=RuleSet(compiled, sock))
    return env.listen(p, UP_IP, env.up_port)


def _client(env, port):
    return Client(port, "api.test", env.ca_file)


def _blocked_events(env):
    return [e for e in env.events if e.kind == "blocked"]


def test_static_block_with_positive_control(env, hooks):
    port = _proxy(env, hooks, {"name": "no-admin", "action": "block", "path": "/admin*"},
                  {"name": "no-put", "action": "block", "methods": ["PUT"]})
    n = len(env.upstream.seen)
    assert _client(env, port).request("GET", "/public", "api.test")[0] == 200  # control
    for method, target in (("GET", "/admin"), ("GET", "/x/../admin"), ("GET", "/ad%6din"),
                           ("PUT", "/public")):
        status, _, body = _client(env, port).request(method, target, "api.test")
        assert status == 403 and b"blocked by policy" in body, (method, target)
    assert [s["target"] for s in env.upstream.seen[n:]] == ["/public"]
    assert {e.fields.get("rule") for e in _blocked_events(env)} == {"no-admin", "no-put"}


def test_static_mutations_arrive_mutated(env, hooks):
    port = _proxy(env, hooks, {"name": "m", "set_headers": {"X-Agent": "ml"},
                               "delete_headers": ["X-Drop"], "set_query": {"b": "2"},
                               "delete_query": ["drop"], "rewrite_path": "/v2"})
    status, _, _ = _client(env, port).request(
        "GET", "/v1?drop=1&a=1", "api.test", headers=[("x-drop", "1"), ("x-keep", "1")])
    assert status == 200
    seen = env.upstream.seen[-1]
    assert seen["target"] == "/v2?a=1&b=2"
    assert seen["headers"]["x-agent"] == "ml" and "x-drop" not in seen["headers"]
    assert seen["headers"]["x-keep"] == "1"


def test_rules_cannot_change_framing_or_host(env, hooks):
    port = _proxy(env, hooks, {"name": "m", "set_headers": {"Content-Length": "0",
                                                            "Host": "other.test"}})
    status, _, body = _client(env, port).request("POST", "/upload", "api.test", body=b"abcdef")
    seen = env.upstream.seen[-1]
    assert status == 200 and seen["headers"]["host"] == "api.test"
    assert seen["headers"]["content-length"] == "6" and seen["body"] == b"abcdef"


def test_callback_mutates_and_blocks(env, hooks):
    def decide(req):
        if req.path.startswith("/admin"):
            return NetworkHookResult(action="block")
        headers = dict(req.request_headers or {})
        headers["X-Agent"] = ["from-callback"]
        return NetworkHookResult(request=NetworkHookRequestMutation(headers=headers))
    hooks.fns[1] = decide
    port = _proxy(env, hooks, {"name": "decide", "callback_id": "network_hook_1",
                               "timeout_ms": 5000})
    n = len(env.upstream.seen)
    assert _client(env, port).request("GET", "/ok?k=v", "api.test",
                                      headers=[("x-a", "1")])[0] == 200
    assert _client(env, port).request("GET", "/admin", "api.test")[0] == 403
    seen = env.upstream.seen[n:]
    assert [s["target"] for s in seen] == ["/ok?k=v"]
    assert seen[0]["headers"]["x-agent"] == "from-callback" and seen[0]["headers"]["x-a"] == "1"
    req = hooks.calls[0][1]
    assert (req.phase, req.host, req.method, req.path, req.query) == (
        "before", "api.test", "GET", "/ok", {"k": "v"})


def test_callback_placeholder_is_replaced_or_leaks(env, hooks):
    """What a callback writes passes the same secret checks as what the guest wrote."""
    hooks.fns[1] = lambda req: NetworkHookResult(request=NetworkHookRequestMutation(
        headers={"Authorization": [f"Bearer {PH}"]}))
    port = _proxy(env, hooks, {"name": "auth", "callback_id": "network_hook_1"})
    assert _client(env, port).request("GET", "/x", "api.test")[0] == 200
    assert env.upstream.seen[-1]["headers"]["authorization"] == f"Bearer {REAL}"
    n = len(env.upstream.seen)
    assert Client(port, "other.test", env.ca_file).request("GET", "/x", "other.test")[0] == 403
    assert len(env.upstream.seen) == n


@pytest.mark.parametrize("kind", ["raises", "times_out", "bad_reply_type"])
def test_failing_callback_fails_closed(env, hooks, kind):
    def boom(req):
        raise RuntimeError("boom")

    def slow(req):
        time.sleep(1.0)

    hooks.fns[2] = {"raises": boom, "times_out": slow, "bad_reply_type": lambda r: 42}[kind]
    hooks.fns[3] = lambda req: None  # positive control: a callback that allows
    port = _proxy(env, hooks,
                  {"name": "bad", "callback_id": "network_hook_2", "timeout_ms": 300,
                   "path": "/bad"},
                  {"name": "good", "callback_id": "network_hook_3", "timeout_ms": 300,
                   "path": "/good"})
    n = len(env.upstream.seen)
    t = time.monotonic()
    status, _, body = _client(env, port).request("GET", "/bad", "api.test")
    took = time.monotonic() - t
    assert status == 403 and b"fail closed" in body
    assert _client(env, port).request("GET", "/good", "api.test")[0] == 200
    assert [s["target"] for s in env.upstream.seen[n:]] == ["/good"]
    if kind == "times_out":
        assert 0.25 < took < 0.9


def test_unreachable_callback_socket_fails_closed(env, hooks, tmp_path):
    compiled, _ = compile_rules({"rules": [{"callback_id": "network_hook_1"}],
                                 "callback_socket": str(tmp_path / "none.sock")},
                                normalise_glob)
    p = env.proxy(rules=RuleSet(compiled, str(tmp_path / "none.sock")))
    port = env.listen(p, UP_IP, env.up_port)
    n = len(env.upstream.seen)
    assert _client(env, port).request("GET", "/x", "api.test")[0] == 403
    assert len(env.upstream.seen) == n


def test_callback_does_not_block_the_loop(env, hooks):
    """A slow callback on one connection; another connection is served meanwhile."""
    gate = threading.Event()
    hooks.fns[4] = lambda req: (gate.wait(5), None)[1]
    port = _proxy(env, hooks, {"name": "slow", "callback_id": "network_hook_4",
                               "path": "/slow", "timeout_ms": 5000})
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "slow", _client(env, port).request("GET", "/slow", "api.test")[0]))
    t.start()
    t0 = time.monotonic()
    assert _client(env, port).request("GET", "/fast", "api.test")[0] == 200
    assert time.monotonic() - t0 < 2
    gate.set()
    t.join(10)
    assert out["slow"] == 200


def test_after_phase_headers_block_and_body_replacement(env, hooks):
    port = _proxy(env, hooks,
                  {"name": "hdr", "phase": "after", "set_response_headers": {"X-Rule": "1"},
                   "delete_response_headers": ["x-echo-auth"]},
                  {"name": "redact", "phase": "after", "path": "/echo*",
                   "body_replacements": [{"find": "api.test", "replace": "[host]"}]},
                  {"name": "deny", "phase": "after", "path": "/deny", "action": "block"})
    for target in ("/echo", "/echo-chunked", "/echo-gzip"):
        status, headers, body = _client(env, port).request("GET", target, "api.test")
        assert status == 200 and headers["x-rule"] == "1" and "x-echo-auth" not in headers
        doc = json.loads(body)
        assert doc["headers"]["host"] == "[host]", target
        assert headers["content-length"] == str(len(body))
    n = len(env.upstream.seen)
    status, _, body = _client(env, port).request("GET", "/deny", "api.test")
    assert status == 403 and len(env.upstream.seen) == n + 1  # after: it did reach upstream


def test_sse_replacement_streams(env, hooks):
    port = _proxy(env, hooks, {"name": "sse", "phase": "after", "path": "/sse",
                               "body_replacements": [{"find": "2", "replace": "two"}]})
    c = _client(env, port)
    start = time.monotonic()
    c.send("GET", "/sse", "api.test")
    got = []
    status, headers, _ = c.response(on_data=lambda d: got.append((time.monotonic() - start, d)))
    data = b"".join(d for _, d in got)
    assert data == b"data: 0\n\ndata: 1\n\ndata: two\n\ndata: 3\n\n"
    assert got[0][0] < 0.5 and got[-1][0] >= 0.8  # streamed, not held


def test_after_callback_set_body_and_sees_response(env, hooks):
    hooks.fns[5] = lambda req: NetworkHookResult(response=NetworkHookResponseMutation(
        headers={"X-From": ["cb"], "Content-Type": ["text/plain"]}, set_body="replaced body",
        body_replacements=[NetworkBodyTransform("body", "BODY")]))
    port = _proxy(env, hooks, {"name": "sb", "phase": "after",
                               "callback_id": "network_hook_5"})
    status, headers, body = _client(env, port).request("GET", "/echo", "api.test")
    assert (status, body) == (200, b"replaced BODY")
    assert headers["x-from"] == "cb" and headers["content-length"] == "13"
    req = hooks.calls[-1][1]
    assert req.phase == "after" and req.status_code == 200
    assert req.response_headers["Content-Type"] == ["application/json"]
    # the connection stays usable after a replaced body
    c = _client(env, port)
    assert c.request("GET", "/echo", "api.test")[2] == b"replaced BODY"
    assert c.request("GET", "/echo", "api.test")[2] == b"replaced BODY"


def test_allowed_event_has_wire_fields(env, hooks):
    port = _proxy(env, hooks, {"name": "m", "set_headers": {"X": "1"}})
    assert _client(env, port).request("GET", "/x?q=1", "api.test")[0] == 200
    (ev,) = [e for e in env.events if e.kind == "allowed"]
    f = ev.fields
    assert f["url"] == "https://api.test/x" and f["status_code"] == 200
    assert f["method"] == "GET" and f["response_bytes"] == 2 and f["duration_ms"] >= 0


def test_callback_socket_of_another_user_is_refused(env, hooks, monkeypatch):
    """The socket path comes from the RPC client: a peer that is not the SDK's user (e.g.
    another service's socket) gets nothing and the request is blocked."""
    import matchlock.net.proxy._callbacks as cb

    hooks.fns[1] = lambda req: None
    port = _proxy(env, hooks, {"name": "cb", "callback_id": "network_hook_1"})
    assert _client(env, port).request("GET", "/x", "api.test")[0] == 200  # control
    monkeypatch.setattr(cb, "allowed_peer_uids", lambda: frozenset({54321}))
    n = len(env.upstream.seen)
    status, _, body = _client(env, port).request("GET", "/x", "api.test")
    assert status == 403 and b"uid" in body and len(env.upstream.seen) == n
    assert hooks.calls == [hooks.calls[0]]  # the SDK was never asked the second time
