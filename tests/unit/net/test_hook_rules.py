"""Sans-I/O interception rules (net/proxy/_rules.py): compiling the wire's rules, matching,
static edits, callback codec, SSE-aware body replacement."""

from __future__ import annotations

import base64
import json

import pytest

from matchlock.errors import UsageError
from matchlock.net.policy import normalise_glob
from matchlock.net.proxy._rules import (
    CallbackFailed,
    RequestView,
    ResponsePlan,
    RuleSet,
    SseRewriter,
    apply_static_after,
    apply_static_before,
    apply_verdict_before,
    callback_request,
    canonical_header,
    compile_path_glob,
    compile_rules,
    match_paths,
    parse_callback_reply,
    replace_all,
)


def _compile(*rules, sock="/tmp/x/hook.sock"):
    return compile_rules({"rules": list(rules), "callback_socket": sock}, normalise_glob)


def test_compile_defaults_and_dropping():
    rules, sock = _compile(
        {"name": "plain-allow"},  # does nothing: dropped
        {"name": "b", "action": "BLOCK", "phase": "weird"},
        {"name": "m", "set_headers": {"x-a": "1"}},  # allow + mutation = mutate
        {"name": "other-phase", "phase": "after", "set_headers": {"x": "1"}},  # dropped
        {"name": "cb", "callback_id": "network_hook_5", "phase": "AFTER", "timeout_ms": 20},
        {"name": "r", "phase": "after", "body_replacements": [{"find": "", "replace": "x"}]},
    )
    assert sock == "/tmp/x/hook.sock"
    assert [(r.name, r.phase, r.action) for r in rules] == [
        ("b", "before", "block"), ("m", "before", "mutate"), ("cb", "after", "allow")]
    assert rules[1].set_headers == (("X-A", "1"),)
    assert rules[2].timeout_ms == 20


@pytest.mark.parametrize("rule,needle", [
    ({"action": "block", "hosts": "api.test"}, "hosts must be a list"),
    ({"action": "block", "path": "/a[b"}, "not a valid glob"),
    ({"set_headers": {"x": "a\r\nb: c"}}, "CR, LF or NUL"),
    ({"set_headers": {"bad header": "v"}}, "not a valid header name"),
    ({"rewrite_path": "no-slash"}, "rewrite_path"),
    ({"action": "block", "timeout_ms": -1}, "timeout_ms"),
    ({"callback_id": "network_hook_1"}, "need callback_socket"),
])
def test_compile_refuses_bad_rules(rule, needle):
    with pytest.raises(UsageError) as e:
        compile_rules({"rules": [rule]}, normalise_glob)
    assert needle in str(e.value)


def test_go_path_match_semantics():
    rx = compile_path_glob("/v1/*")
    assert rx.match("/v1/x") and not rx.match("/v1/x/y") and not rx.match("/v1")
    assert compile_path_glob("/a?c").match("/abc") and not compile_path_glob("/a?c").match("/a/c")
    assert compile_path_glob("/[a-c]x").match("/bx")
    assert not compile_path_glob("/[^a-c]x").match("/bx")
    assert compile_path_glob(r"/\*").match("/*") and not compile_path_glob(r"/\*").match("/a")


def test_path_forms_catch_dot_segments_and_encoding():
    rules, _ = _compile({"name": "b", "action": "block", "path": "/admin*"})
    rs = RuleSet(rules)
    for target in (b"/admin", b"/ad%6din", b"/x/../admin-x", b"//admin", b"/./admin?q=1"):
        v = RequestView.parse("api.test", b"GET", target, [])
        assert rs.matching("before", "api.test", "GET", v.paths()), target
    v = RequestView.parse("api.test", b"GET", b"/public", [])
    assert not rs.matching("before", "api.test", "GET", v.paths())
    assert match_paths("/a/") == ("/a/",)


def test_host_and_method_matching():
    rules, _ = _compile({"name": "b", "action": "block", "hosts": ["*.api.test"],
                         "methods": ["post"]})
    rs = RuleSet(rules)
    assert rs.matching("before", "x.api.test", "POST", ("/",))
    assert not rs.matching("before", "api.test", "POST", ("/",))  # *.x does not match the apex
    assert not rs.matching("before", "x.api.test", "GET", ("/",))


def test_static_before_edits_and_protected_headers():
    rules, _ = _compile({"name": "m", "set_headers": {"X-Agent": "ml", "Host": "evil.test",
                                                      "Content-Length": "0"},
                         "delete_headers": ["authorization", "transfer-encoding"],
                         "set_query": {"b": "2"}, "delete_query": ["drop"],
                         "rewrite_path": "/v2/ü x"})
    v = RequestView.parse("api.test", b"POST", b"/v1/x?z=1&drop=1&b=1",
                          [(b"Host", b"api.test"), (b"Authorization", b"t"),
                           (b"Content-Length", b"3"), (b"x-agent", b"old")])
    apply_static_before(rules[0], v)
    names = [k.lower() for k, _ in v.headers]
    assert ("Host", "api.test") in v.headers and ("Content-Length", "3") in v.headers
    assert "authorization" not in names and names.count("x-agent") == 1
    assert ("X-Agent", "ml") in v.headers
    assert v.target() == b"/v2/%C3%BC%20x?b=2&z=1"


def test_untouched_target_is_byte_identical():
    v = RequestView.parse("h", b"GET", b"/a%2Fb?x=1&x=2&y", [])
    v.set_header("X", "1")
    assert v.target() == b"/a%2Fb?x=1&x=2&y"


def test_after_edits_and_replacements():
    rules, _ = _compile({"name": "a", "phase": "after",
                         "set_response_headers": {"x-new": "1", "content-length": "1"},
                         "delete_response_headers": ["Server"],
                         "body_replacements": [{"find": "secret", "replace": "[r]"}]})
    p = ResponsePlan.parse(200, [(b"Server", b"up"), (b"Content-Length", b"10"),
                                 (b"Content-Type", b"Text/Event-Stream; charset=utf-8")])
    apply_static_after(rules[0], p)
    assert ("X-New", "1") in p.headers and ("Content-Length", "10") in p.headers
    assert not any(k == "Server" for k, _ in p.headers)
    assert p.is_sse and p.replacements == [(b"secret", b"[r]")]
    assert replace_all(b"a secret secret", p.replacements) == b"a [r] [r]"


def test_sse_rewrites_only_data_lines_at_every_split():
    stream = (b"id: secret\nevent: secret\ndata: a secret\r\n\n: secret comment\n"
              b"data:secret\ndata: tail secret")
    want = (b"id: secret\nevent: secret\ndata: a [r]\r\n\n: secret comment\n"
            b"data:[r]\ndata: tail [r]")
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            s = SseRewriter([(b"secret", b"[r]")])
            out = s.feed(stream[:i]) + s.feed(stream[i:j]) + s.feed(stream[j:]) + s.finish()
            assert out == want, (i, j)


def test_callback_request_shape():
    rules, _ = _compile({"name": "cb", "callback_id": "network_hook_1", "phase": "after"})
    v = RequestView.parse("api.test", b"post", b"/v1/x?k=v&k=w",
                          [(b"content-type", b"application/json"), (b"x-a", b"1"),
                           (b"X-A", b"2")])
    p = ResponsePlan.parse(200, [(b"content-type", b"text/event-stream")])
    line = callback_request(rules[0], v, p)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "callback_id": "network_hook_1", "phase": "after", "host": "api.test",
        "method": "POST", "path": "/v1/x", "query": {"k": "v"},
        "request_headers": {"Content-Type": ["application/json"], "X-A": ["1", "2"]},
        "status_code": 200, "response_headers": {"Content-Type": ["text/event-stream"]},
        "is_sse": True}
    before = json.loads(callback_request(rules[0].__class__(callback_id="c"),
                                         RequestView.parse("h", b"GET", b"/", []), None))
    assert before == {"callback_id": "c", "phase": "before", "host": "h", "method": "GET",
                      "path": "/"}


def test_callback_reply_parsing():
    v = parse_callback_reply(b'{"request":{"headers":{"X":["1"]},"query":{},"path":"/p"}}\n')
    assert v.action == "mutate" and v.headers == {"X": ["1"]} and v.query == {}
    view = RequestView.parse("h", b"GET", b"/a?q=1", [(b"Host", b"h"), (b"Y", b"2")])
    apply_verdict_before(v, view)
    assert view.headers == [("Host", "h"), ("X", "1")] and view.target() == b"/p"
    body = base64.b64encode(b"").decode()
    v = parse_callback_reply(json.dumps({"response": {"set_body_base64": body}}).encode())
    assert v.set_body == b"" and v.action == "mutate"  # an empty body is honoured
    assert parse_callback_reply(b"{}").action == "allow"
    assert parse_callback_reply(b'{"action":"BLOCK"}').action == "block"
    assert parse_callback_reply(b'{"action":"nonsense"}').action == "allow"


@pytest.mark.parametrize("line", [
    b"", b"not json", b"[]", b'{"error":"boom"}', b'{"request":{"headers":{"X":"a\\r\\nb"}}}',
    b'{"request":{"path":"relative"}}', b'{"response":{"set_body_base64":"%%%"}}',
    b'{"request":{"headers":{"X":[1]}}}',
])
def test_unusable_replies_fail(line):
    with pytest.raises(CallbackFailed):
        parse_callback_reply(line)


def test_canonical_header():
    assert canonical_header("x-api-KEY") == "X-Api-Key"
    assert canonical_header("content-type") == "Content-Type"
