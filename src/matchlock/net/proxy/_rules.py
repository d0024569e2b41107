"""Sans-I/O network interception rules (spec/rpc-protocol.md §2.1.2, §4.1;
net-secrets-vfs.md §5): compiling the wire's rules, matching a request, applying static
mutations and callback verdicts, the callback line codec, and response body shaping
(SSE-aware replacements). No sockets, no asyncio, no clock; the proxy (server.py) does the
waiting and the I/O.

Where this differs from the reference (docs/network.md, "Interception rules"):
- a callback that fails (timeout, connect error, bad reply, `error` set) BLOCKS the request
  (the reference ignores the callback: fail-open);
- rules never touch the framing headers (Content-Length, Transfer-Encoding) or Host: the
  proxy writes framing itself, and a changed Host would be a new destination;
- a rule's `path` is matched against the percent-decoded path and its dot-segment-resolved
  form; either matching counts (so `/x/../admin` and `/ad%6din` meet a rule on `/admin`).
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from matchlock.errors import UsageError

from ..types import HookRule

# Headers a rule or callback can never set or delete (see the module docstring).
PROTECTED = frozenset({"content-length", "transfer-encoding", "host"})
MAX_CALLBACK_REPLY = 8 << 20  # one reply line (a set_body_base64 of ~6 MiB fits)
DEFAULT_CALLBACK_TIMEOUT_MS = 30_000  # the reference has none; a hung SDK must not hang a VM
SSE_MAX_LINE = 1 << 20  # an SSE line longer than this is rewritten in pieces
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class CallbackFailed(Exception):
    """A callback gave no usable verdict; the request is blocked (fail closed)."""


def canonical_header(name: str) -> str:
    """Go's http.CanonicalHeaderKey: `x-api-key` → `X-Api-Key`."""
    if not _TOKEN.match(name):
        return name
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


# ------------------------------------------------------------------------------ compile

def _strs(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise UsageError(f"{what} must be a list of strings")
    return list(dict.fromkeys(s.strip() for s in v if s.strip()))


def _map(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(s, str)
                                          for k, s in v.items()):
        raise UsageError(f"{what} must be a map of strings to strings")
    return {k.strip(): s for k, s in v.items() if k.strip()}


def _headers(v: Any, what: str) -> tuple[tuple[str, str], ...]:
    out = []
    for k, s in _map(v, what).items():
        if not _TOKEN.match(k):
            raise UsageError(f"{what}: {k[:60]!r} is not a valid header name")
        if _BAD_VALUE.search(s):
            raise UsageError(f"{what}.{k}: header values cannot contain CR, LF or NUL")
        out.append((canonical_header(k), s))
    return tuple(dict(out).items())


def compile_path_glob(pattern: str) -> re.Pattern[str]:
    """Go `path.Match` syntax as a regex: `*` and `?` never cross `/`; `[...]`, `[^...]`
    classes with ranges; `\\` escapes. A malformed pattern raises ValueError."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            if i >= n:
                raise ValueError("pattern ends with a backslash")
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            neg = j < n and pattern[j] == "^"
            if neg:
                j += 1
            cls = []
            first = True
            while True:
                if j >= n:
                    raise ValueError("unterminated character class")
                if pattern[j] == "]" and not first:
                    break
                first = False
                ch = pattern[j]
                if ch == "\\":
                    j += 1
                    if j >= n:
                        raise ValueError("pattern ends with a backslash")
                    ch = pattern[j]
                if ch in "/":
                    raise ValueError("'/' inside a character class")
                lo = ch
                if j + 2 < n and pattern[j + 1] == "-" and pattern[j + 2] != "]":
                    hi = pattern[j + 2]
                    if hi == "\\":
                        j += 1
                        hi = pattern[j + 2] if j + 2 < n else ""
                    if not hi or hi < lo:
                        raise ValueError("bad range in character class")
                    cls.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    j += 3
                else:
                    cls.append(re.escape(lo))
                    j += 1
            out.append(("[^/" if neg else "[") + "".join(cls) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


def compile_rules(raw: Any, normalise_glob) -> tuple[tuple[HookRule, ...], str]:
    """`network.interception` → (rules, callback_socket). `normalise_glob(host, what)`
    is the allow-list's own glob check. Ineffective rules are dropped (reference)."""
    if raw is None:
        return (), ""
    if not isinstance(raw, dict):
        raise UsageError("network.interception must be an object {rules, callback_socket}")
    sock = raw.get("callback_socket") or ""
    if not isinstance(sock, str) or (sock and not sock.startswith("/")):
        raise UsageError("network.interception.callback_socket must be an absolute path")
    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise UsageError("network.interception.rules must be a list")
    rules = []
    for i, r in enumerate(rules_raw):
        what = f"network.interception.rules[{i}]"
        if not isinstance(r, dict):
            raise UsageError(f"{what} must be an object")
        name = r.get("name") or ""
        if not isinstance(name, str):
            raise UsageError(f"{what}.name must be a string")
        phase = "after" if str(r.get("phase") or "").strip().lower() == "after" else "before"
        action = str(r.get("action") or "").strip().lower()
        action = action if action in ("block", "mutate") else "allow"
        callback_id = r.get("callback_id") or ""
        if not isinstance(callback_id, str):
            raise UsageError(f"{what}.callback_id must be a string")
        timeout = r.get("timeout_ms") or 0
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise UsageError(f"{what}.timeout_ms must be a non-negative number")
        path = r.get("path") or ""
        if not isinstance(path, str):
            raise UsageError(f"{what}.path must be a string")
        if path:
            try:
                compile_path_glob(path)
            except ValueError as e:
                raise UsageError(f"{what}.path {path[:80]!r} is not a valid glob: {e}") from None
        hosts = tuple(dict.fromkeys(normalise_glob(h, f"{what}.hosts")
                                    for h in _strs(r.get("hosts"), f"{what}.hosts")))
        methods = tuple(dict.fromkeys(m.upper() for m in _strs(r.get("methods"),
                                                                f"{what}.methods")))
        kw: dict[str, Any] = {}
        if phase == "before":
            kw["set_headers"] = _headers(r.get("set_headers"), f"{what}.set_headers")
            kw["delete_headers"] = tuple(dict.fromkeys(
                canonical_header(h) for h in _strs(r.get("delete_headers"),
                                                   f"{what}.delete_headers")))
            kw["set_query"] = tuple(_map(r.get("set_query"), f"{what}.set_query").items())
            kw["delete_query"] = tuple(_strs(r.get("delete_query"), f"{what}.delete_query"))
            rp = r.get("rewrite_path") or ""
            if not isinstance(rp, str) or (rp and (not rp.startswith("/")
                                                   or _BAD_VALUE.search(rp))):
                raise UsageError(f"{what}.rewrite_path must be a path starting with '/' "
                                 "(no CR, LF or NUL)")
            kw["rewrite_path"] = rp
        else:
            kw["set_response_headers"] = _headers(r.get("set_response_headers"),
                                                  f"{what}.set_response_headers")
            kw["delete_response_headers"] = tuple(dict.fromkeys(
                canonical_header(h) for h in _strs(r.get("delete_response_headers"),
                                                   f"{what}.delete_response_headers")))
            reps = r.get("body_replacements") or []
            if not isinstance(reps, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("find", ""), str)
                    and isinstance(x.get("replace", ""), str) for x in reps):
                raise UsageError(f"{what}.body_replacements must be a list of "
                                 "{find, replace} strings")
            kw["body_replacements"] = tuple((x["find"], x.get("replace", ""))
                                            for x in reps if x.get("find"))
        rule = HookRule(name=name, phase=phase, hosts=hosts, methods=methods, path=path,
                        action=action, callback_id=callback_id, timeout_ms=int(timeout), **kw)
        if mutates(rule) and rule.action == "allow":
            rule = _replace(rule, action="mutate")
        if rule.action == "block" or mutates(rule) or rule.callback_id:
            rules.append(rule)
    if any(r.callback_id for r in rules) and not sock:
        raise UsageError("network.interception: rules with callback_id need callback_socket")
    return tuple(rules), sock


def _replace(rule: HookRule, **kw: Any) -> HookRule:
    import dataclasses

    return dataclasses.replace(rule, **kw)


def mutates(rule: HookRule) -> bool:
    if rule.phase == "before":
        return bool(rule.set_headers or rule.delete_headers or rule.set_query
                    or rule.delete_query or rule.rewrite_path)
    return bool(rule.set_response_headers or rule.delete_response_headers
                or rule.body_replacements)


# ------------------------------------------------------------------------------ matching

class RuleSet:
    """One VM's compiled rules, with their path globs compiled once."""

    def __init__(self, rules: Sequence[HookRule], callback_socket: str = "",
                 match_glob=None) -> None:
        if match_glob is None:
            from matchlock.net.policy import match_glob as _mg

            match_glob = _mg
        self._match_glob = match_glob
        self.callback_socket = callback_socket
        self.before = tuple(r for r in rules if r.phase == "before")
        self.after = tuple(r for r in rules if r.phase == "after")
        self._paths = {r.path: compile_path_glob(r.path) for r in rules if r.path}

    @property
    def active(self) -> bool:
        return bool(self.before or self.after)

    def matches(self, rule: HookRule, host: str, method: str, paths: Sequence[str]) -> bool:
        if rule.hosts and not any(self._match_glob(g, host) for g in rule.hosts):
            return False
        if rule.methods and method.upper() not in rule.methods:
            return False
        if rule.path:
            rx = self._paths[rule.path]
            return any(rx.match(p) for p in paths)
        return True

    def matching(self, phase: str, host: str, method: str, paths: Sequence[str]
                 ) -> list[HookRule]:
        rules = self.before if phase == "before" else self.after
        return [r for r in rules if self.matches(r, host, method, paths)]


def match_paths(path: str) -> tuple[str, ...]:
    """The forms of a (decoded) URL path a rule's glob is tried on."""
    p = path or "/"
    clean = posixpath.normpath(p) if p != "/" else p
    if clean.startswith("//"):
        clean = "/" + clean.lstrip("/")
    if p.endswith("/") and clean != "/":
        clean += "/"
    return (p,) if clean == p else (p, clean)


# ---------------------------------------------------------------------- request side

@dataclass(slots=True)
class RequestView:
    """What rules see of (and change in) one request. `headers` keep their order and case;
    `query` is the list of (key, value) pairs; `path` is percent-decoded."""

    host: str
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    raw_path: str  # as sent (encoded), used when the path is not rewritten
    raw_query: str | None  # as sent, used when the query is not edited
    path_changed: bool = False
    query_changed: bool = False
    headers_changed: bool = False

    @classmethod
    def parse(cls, host: str, method: bytes, target: bytes,
              headers: Iterable[tuple[bytes, bytes]]) -> RequestView:
        t = target.decode("latin-1")
        raw_path, sep, raw_query = t.partition("?")
        return cls(host=host, method=method.decode("latin-1").upper(),
                   path=unquote(raw_path, errors="surrogateescape") or "/",
                   query=parse_qsl(raw_query, keep_blank_values=True) if sep else [],
                   headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                   raw_path=raw_path, raw_query=raw_query if sep else None)

    def paths(self) -> tuple[str, ...]:
        return match_paths(self.path)

    @property
    def changed(self) -> bool:
        return self.path_changed or self.query_changed or self.headers_changed

    def target(self) -> bytes:
        path = quote(self.path, safe="/!$&'()*+,;=:@-._~",
                     errors="surrogateescape") if self.path_changed else self.raw_path
        if self.query_changed:
            # url.Values.Encode: keys sorted, values of a key in their order
            pairs = sorted(self.query, key=lambda kv: kv[0])
            q = urlencode(pairs)
            return (path + ("?" + q if q else "")).encode("latin-1", "replace")
        q = self.raw_query
        return (path + ("" if q is None else "?" + q)).encode("latin-1")

    def header_bytes(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]

    # -- edits -----------------------------------------------------------------------

    def set_header(self, name: str, value: str) -> None:
        if name.lower() in PROTECTED:
            return
        low = name.lower()
        self.headers = [h for h in self.headers if h[0].lower() != low]
        self.headers.append((canonical_header(name), value))
        self.headers_changed = True

    def delete_header(self, name: str) -> None:
        low = name.lower()
        if low in PROTECTED:
            return
        kept = [h for h in self.headers if h[0].lower() != low]
        if len(kept) != len(self.headers):
            self.headers, self.headers_changed = kept, True

    def replace_headers(self, new: Mapping[str, Sequence[str]]) -> None:
        """A callback's `request.headers`: the whole set, protected ones kept as sent."""
        kept = [h for h in self.headers if h[0].lower() in PROTECTED]
        for k, vs in new.items():
            if k.lower() in PROTECTED:
                continue
            kept.extend((canonical_header(k), v) for v in vs)
        self.headers, self.headers_changed = kept, True

    def set_query(self, key: str, value: str) -> None:
        self.query = [kv for kv in self.query if kv[0] != key] + [(key, value)]
        self.query_changed = True

    def delete_query(self, key: str) -> None:
        self.query = [kv for kv in self.query if kv[0] != key]
        self.query_changed = True

    def replace_query(self, new: Mapping[str, str]) -> None:
        self.query = list(new.items())
        self.query_changed = True

    def rewrite_path(self, path: str) -> None:
        self.path, self.path_changed = path, True

    def first_query(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.query:
            out.setdefault(k, v)
        return out


def apply_static_before(rule: HookRule, view: RequestView) -> None:
    """Set headers, delete headers, query set/delete, path (the reference's order)."""
    for k, v in rule.set_headers:
        view.set_header(k, v)
    for k in rule.delete_headers:
        view.delete_header(k)
    for k, v in rule.set_query:
        view.set_query(k, v)
    for k in rule.delete_query:
        view.delete_query(k)
    if rule.rewrite_path:
        view.rewrite_path(rule.rewrite_path)


# ---------------------------------------------------------------------- response side

@dataclass(slots=True)
class ResponsePlan:
    """What after-rules decided about one response: its headers (edited in place) and
    how its body is shaped (`set_body` replaces it; `replacements` then apply)."""

    status: int
    headers: list[tuple[str, str]]
    set_body: bytes | None = None
    replacements: list[tuple[bytes, bytes]] = field(default_factory=list)
    headers_changed: bool = False

    @classmethod
    def parse(cls, status: int, headers: Iterable[tuple[bytes, bytes]]) -> ResponsePlan:
        return cls(status=status, headers=[(k.decode("latin-1"), v.decode("latin-1"))
                                           for k, v in headers])

    @property
    def is_sse(self) -> bool:
        for k, v in self.headers:
            if k.lower() == "content-type":
                return v.strip().lower().startswith("text/event-stream")
        return False

    @property
    def shapes_body(self) -> bool:
        return self.set_body is not None or bool(self.replacements)

    def set_header(self, name: str, value: str) -> None:
        low = name.lower()
        if low in PROTECTED:
            return
        self.headers = [h for h in self.headers if h[0].lower() != low]
        self.headers.append((canonical_header(name), value))
        self.headers_changed = True

    def delete_header(self, name: str) -> None:
        low = name.lower()
        if low in PROTECTED:
            return
        self.headers = [h for h in self.headers if h[0].lower() != low]
        self.headers_changed = True

    def replace_headers(self, new: Mapping[str, Sequence[str]]) -> None:
        kept = [h for h in self.headers if h[0].lower() in PROTECTED]
        for k, vs in new.items():
            if k.lower() in PROTECTED:
                continue
            kept.extend((canonical_header(k), v) for v in vs)
        self.headers, self.headers_changed = kept, True

    def header_bytes(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]


def apply_static_after(rule: HookRule, plan: ResponsePlan) -> None:
    for k, v in rule.set_response_headers:
        plan.set_header(k, v)
    for k in rule.delete_response_headers:
        plan.delete_header(k)
    plan.replacements.extend((f.encode(), r.encode()) for f, r in rule.body_replacements)


def replace_all(data: bytes, replacements: Sequence[tuple[bytes, bytes]]) -> bytes:
    for find, rep in replacements:
        if find:
            data = data.replace(find, rep)
    return data


class SseRewriter:
    """Replacements on the payload of `data:` lines of a text/event-stream, streamed:
    whole lines out as they complete; other lines (id:, event:, comments, blank) as they
    are. Line endings (\\n, \\r\\n) are kept."""

    __slots__ = ("_reps", "_buf")

    def __init__(self, replacements: Sequence[tuple[bytes, bytes]]) -> None:
        self._reps = list(replacements)
        self._buf = b""

    def _line(self, line: bytes) -> bytes:
        if line.startswith(b"data:"):
            body = line[5:]
            end = b""
            if body.endswith(b"\r\n"):
                body, end = body[:-2], b"\r\n"
            elif body.endswith(b"\n"):
                body, end = body[:-1], b"\n"
            return b"data:" + replace_all(body, self._reps) + end
        return line

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            if len(buf) > SSE_MAX_LINE:  # no newline for too long: rewrite this piece
                self._buf = b""
                return self._line(buf)
            self._buf = buf
            return b""
        self._buf = buf[cut:]
        return b"".join(self._line(x) for x in buf[:cut].splitlines(keepends=True))

    def finish(self) -> bytes:
        tail, self._buf = self._buf, b""
        return self._line(tail) if tail else b""


# ---------------------------------------------------------------------- callback codec

def _header_map(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in headers:
        out.setdefault(canonical_header(k), []).append(v)
    return out


def callback_request(rule: HookRule, view: RequestView,
                     resp: ResponsePlan | None = None) -> bytes:
    """The one JSON line the server writes to the SDK (§4.1 step 3); empty fields omitted."""
    msg: dict[str, Any] = {"callback_id": rule.callback_id, "phase": rule.phase,
                           "host": view.host, "method": view.method, "path": view.path}
    q = view.first_query()
    if q:
        msg["query"] = q
    h = _header_map(view.headers)
    if h:
        msg["request_headers"] = h
    if resp is not None:
        msg["status_code"] = resp.status
        rh = _header_map(resp.headers)
        if rh:
            msg["response_headers"] = rh
        if resp.is_sse:
            msg["is_sse"] = True
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogateescape") + b"\n"


def _str_lists(v: Any, what: str) -> dict[str, list[str]]:
    if not isinstance(v, dict):
        raise CallbackFailed(f"{what} must be an object")
    out = {}
    for k, vs in v.items():
        if isinstance(vs, str):
            vs = [vs]
        if not isinstance(vs, list) or not all(isinstance(x, str) for x in vs):
            raise CallbackFailed(f"{what}.{k} must be a list of strings")
        if not _TOKEN.match(k) or any(_BAD_VALUE.search(x) for x in vs):
            raise CallbackFailed(f"{what}: bad header {k[:60]!r}")
        out[k] = vs
    return out


@dataclass(slots=True)
class CallbackVerdict:
    action: str = "allow"  # allow | block | mutate
    headers: dict[str, list[str]] | None = None
    query: dict[str, str] | None = None
    path: str = ""
    response_headers: dict[str, list[str]] | None = None
    body_replacements: list[tuple[bytes, bytes]] = field(default_factory=list)
    set_body: bytes | None = None


def parse_callback_reply(line: bytes) -> CallbackVerdict:
    """The SDK's reply line → a verdict; anything unusable raises CallbackFailed."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise CallbackFailed(f"reply is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise CallbackFailed("reply is not a JSON object")
    err = msg.get("error")
    if err:
        raise CallbackFailed(f"the callback reported: {str(err)[:200]}")
    v = CallbackVerdict()
    action = str(msg.get("action") or "").strip().lower()
    v.action = action if action in ("block", "mutate") else "allow"
    req = msg.get("request")
    if req is not None:
        if not isinstance(req, dict):
            raise CallbackFailed("request must be an object")
        if req.get("headers") is not None:
            v.headers = _str_lists(req["headers"], "request.headers")
        if req.get("query") is not None:
            q = req["query"]
            if not isinstance(q, dict) or not all(isinstance(x, str) for x in q.values()):
                raise CallbackFailed("request.query must be a map of strings")
            v.query = dict(q)
        p = req.get("path") or ""
        if not isinstance(p, str) or (p and (not p.startswith("/") or _BAD_VALUE.search(p))):
            raise CallbackFailed("request.path must be a path starting with '/'")
        v.path = p
    resp = msg.get("response")
    if resp is not None:
        if not isinstance(resp, dict):
            raise CallbackFailed("response must be an object")
        if resp.get("headers") is not None:
            v.response_headers = _str_lists(resp["headers"], "response.headers")
        reps = resp.get("body_replacements") or []
        if not isinstance(reps, list) or not all(
                isinstance(x, dict) and isinstance(x.get("find", ""), str)
                and isinstance(x.get("replace", ""), str) for x in reps):
            raise CallbackFailed("response.body_replacements must be {find, replace} strings")
        v.body_replacements = [(x["find"].encode(), x.get("replace", "").encode())
                               for x in reps if x.get("find")]
        body = resp.get("set_body_base64")
        if body is not None:
            if not isinstance(body, str):
                raise CallbackFailed("response.set_body_base64 must be a string")
            try:
                v.set_body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise CallbackFailed("response.set_body_base64 is not base64") from None
    mutated = (v.headers is not None or v.query is not None or v.path
               or v.response_headers is not None or v.body_replacements
               or v.set_body is not None)
    if v.action == "allow" and mutated:
        v.action = "mutate"
    return v


def apply_verdict_before(v: CallbackVerdict, view: RequestView) -> None:
    if v.headers is not None:
        view.replace_headers(v.headers)
    if v.query is not None:
        view.replace_query(v.query)
    if v.path:
        view.rewrite_path(v.path)


def apply_verdict_after(v: CallbackVerdict, plan: ResponsePlan) -> None:
    if v.response_headers is not None:
        plan.replace_headers(v.response_headers)
    plan.replacements.extend(v.body_replacements)
    if v.set_body is not None:
        plan.set_body = v.set_body  # the last one wins


def callback_timeout(rule: HookRule) -> float:
    return (rule.timeout_ms if rule.timeout_ms > 0 else DEFAULT_CALLBACK_TIMEOUT_MS) / 1000


__all__ = [
    "DEFAULT_CALLBACK_TIMEOUT_MS", "MAX_CALLBACK_REPLY", "PROTECTED", "CallbackFailed",
    "CallbackVerdict", "RequestView", "ResponsePlan", "RuleSet", "SseRewriter",
    "apply_static_after", "apply_static_before", "apply_verdict_after", "apply_verdict_before",
    "callback_request", "callback_timeout", "canonical_header", "compile_path_glob",
    "compile_rules", "match_paths", "mutates", "parse_callback_reply", "replace_all",
]
