"""Sans-I/O helpers for the proxy: secret placeholders, host names, TLS sniffing, block pages.

No sockets, no asyncio, no clock: every function here takes bytes/strings and returns them, so
each security rule can be unit-tested on its own. The real value of a secret only ever appears
in the bytes these functions return for the upstream; it is never put in an exception, a name
list or a message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Protocol

from ..types import Secret

MAX_BUFFERED_BODY = 16 * 1024 * 1024  # a rewritten Content-Length body is held whole; cap it
# Bodies whose bound placeholders are replaced by the real value (the types that carry
# tokens). Every body, of any type, is scanned for foreign placeholders and values.
REWRITTEN_TYPES = (b"application/json", b"application/x-www-form-urlencoded", b"text/",
                   b"multipart/form-data")
# Real values shorter than this are not searched for: they would match ordinary bytes.
MIN_SCANNED_VALUE = 8
_HOST_RE = re.compile(r"^[a-z0-9_*]([a-z0-9_.*-]{0,251}[a-z0-9_*])?$")


class SecretPolicy(Protocol):
    def secrets_for_host(self, host: str) -> list[Secret]: ...
    def all_secrets(self) -> tuple[Secret, ...]: ...


# ---------------------------------------------------------------------------------- hosts

def normalize_host(value: str | bytes) -> str:
    """`Host` header or SNI → lower-case name without port, brackets or trailing dot."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def valid_hostname(name: str) -> bool:
    """A DNS name or IP literal we are willing to mint a certificate for."""
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return bool(_HOST_RE.match(name))


def host_matches_sni(host_header: str | bytes, sni_host: str) -> bool:
    return normalize_host(host_header) == normalize_host(sni_host)


def is_tls_client_hello(prefix: bytes) -> bool:
    """A TLS record of type handshake (0x16) with a 3.x version: what every ClientHello starts
    with. HTTP and the other text protocols start with a letter."""
    return len(prefix) >= 2 and prefix[0] == 0x16 and prefix[1] == 0x03


TLS_RECORD_HEADER = 5  # content type, version (2), length (2)


def sniff_protocol(prefix: bytes) -> str | None:
    """What the client's first bytes are: "tls", "plain", or None while undecided.

    Anything that starts like a TLS record header (content type 20-24, major version 3) is
    TLS and goes to our TLS terminator, which judges it by SNI (or refuses it); deciding waits
    for the whole 5-byte record header however the bytes are split or delayed. Every other
    first byte is not TLS."""
    if not prefix:
        return None
    if not 20 <= prefix[0] <= 24:
        return "plain"
    if len(prefix) >= 2 and prefix[1] != 3:
        return "plain"
    if len(prefix) < TLS_RECORD_HEADER:
        return None
    return "tls"


def rewritten_content_type(content_type: bytes | None) -> bool:
    """Bodies of these types get bound placeholders replaced. No Content-Type counts as one:
    `curl -d` style uploads carry form data, and a missing label must not be a way around."""
    if content_type is None:
        return True
    ct = content_type.strip().lower()
    return any(ct.startswith(t) for t in REWRITTEN_TYPES) or b"+json" in ct.split(b";", 1)[0]


# ------------------------------------------------------------------------------- secrets

def replace_placeholders(data: bytes, secrets: Iterable[Secret]) -> bytes:
    """Every placeholder of `secrets` in `data` replaced by the real value."""
    for s in secrets:
        ph = s.placeholder.encode()
        if ph in data:
            data = data.replace(ph, s.value.encode())
    return data


def foreign_placeholders(data: bytes, host: str, policy: SecretPolicy) -> list[str]:
    """Names of secrets NOT bound to `host` whose placeholder occurs in `data`."""
    return SecretRules.for_host(policy, host).leaks(data)


class SecretRules:
    """The patterns that matter for one destination host: `bound` placeholders are replaced by
    their value; `foreign` placeholders, and the real values of foreign secrets (a value the
    guest should never hold, e.g. one an upstream reflected), mean the request is blocked."""

    __slots__ = ("bound", "foreign", "_regex", "_prefix", "_values", "_names", "hold",
                 "_foreign_values")

    def __init__(self, bound: Sequence[Secret], foreign: Sequence[Secret]) -> None:
        self.bound = tuple(bound)
        self.foreign = tuple(foreign)
        self._values: dict[bytes, bytes | None] = {}
        self._names: dict[bytes, str] = {}
        bound_values = {s.value.encode() for s in self.bound}
        self._foreign_values: list[bytes] = []
        for s in self.foreign:
            self._values[s.placeholder.encode()] = None
            self._names[s.placeholder.encode()] = s.name
            value = s.value.encode()
            if len(value) >= MIN_SCANNED_VALUE and value not in bound_values:
                self._values[value] = None
                self._names[value] = s.name
                self._foreign_values.append(value)
        for s in self.bound:  # bound wins if a placeholder were listed twice
            self._values[s.placeholder.encode()] = s.value.encode()
            self._names[s.placeholder.encode()] = s.name
        pats = sorted(self._values, key=len, reverse=True)
        self._regex = re.compile(b"|".join(re.escape(p) for p in pats)) if pats else None
        phs = [p for p in pats if p not in self._foreign_values]
        prefix = os.path.commonprefix(phs) if phs else b""
        self._prefix = prefix if len(prefix) >= 4 else None
        # A pattern split across chunks: keep this many input bytes back.
        self.hold = max((len(p) for p in pats), default=1) - 1

    @classmethod
    def for_host(cls, policy: SecretPolicy, host: str) -> SecretRules:
        bound = list(policy.secrets_for_host(host))
        bound_ph = {s.placeholder for s in bound}
        foreign = [s for s in policy.all_secrets() if s.placeholder not in bound_ph]
        return cls(bound, foreign)

    @property
    def active(self) -> bool:
        return self._regex is not None

    @property
    def rewrites(self) -> bool:
        return bool(self.bound)

    def _maybe(self, data: bytes) -> bool:
        """Cheap pre-check (substring searches) before the regex runs."""
        if self._regex is None:
            return False
        if self._prefix is None or self._prefix in data:
            return True
        for v in self._foreign_values:  # noqa: SIM110 - hot path: no generator per call
            if v in data:
                return True
        return False

    def leaks(self, data: bytes) -> list[str]:
        """Names of foreign placeholders in `data` (in order of appearance, unique)."""
        if not self._maybe(data):
            return []
        out: list[str] = []
        for m in self._regex.finditer(data):
            ph = m.group()
            if self._values[ph] is None and self._names[ph] not in out:
                out.append(self._names[ph])
        return out

    def rewrite(self, data: bytes, used: set[str], leaked: list[str]) -> bytes:
        """`data` with bound placeholders replaced; names replaced go to `used`, names of
        foreign placeholders found go to `leaked` (the caller must then block)."""
        if not self._maybe(data):
            return data
        values, names = self._values, self._names

        def sub(m: re.Match[bytes]) -> bytes:
            ph = m.group()
            value = values[ph]
            if value is None:
                if names[ph] not in leaked:
                    leaked.append(names[ph])
                return ph
            used.add(names[ph])
            return value

        return self._regex.sub(sub, data)

    def stream(self, rewrite: bool = True) -> BodyRewriter:
        return BodyRewriter(self, rewrite)


class BodyRewriter:
    """Streaming `SecretRules.rewrite` over body chunks: holds back the last `hold` input bytes
    so a pattern split across two chunks is still seen whole. With rewrite=False it only looks
    for foreign patterns (the body's length is kept; bound placeholders go out unchanged)."""

    __slots__ = ("_rules", "_tail", "used", "leaked", "_rewrite")

    def __init__(self, rules: SecretRules, rewrite: bool = True) -> None:
        self._rules = rules
        self._rewrite = rewrite
        self._tail = b""
        self.used: set[str] = set()
        self.leaked: list[str] = []

    def feed(self, chunk: bytes) -> bytes:
        rules = self._rules
        buf = self._tail + chunk if self._tail else bytes(chunk)
        regex = rules._regex
        if regex is None:
            return buf
        cut = max(len(buf) - rules.hold, 0)
        parts: list[bytes] = []
        pos = 0
        if rules._maybe(buf):
            for m in regex.finditer(buf):
                start, end = m.span()
                parts.append(buf[pos:start])
                ph = m.group()
                value = rules._values[ph]
                if value is None:
                    name = rules._names[ph]
                    if name not in self.leaked:
                        self.leaked.append(name)
                    value = ph
                elif self._rewrite:
                    self.used.add(rules._names[ph])
                else:
                    value = ph
                parts.append(value)
                pos = end
        cut = max(cut, pos)
        parts.append(buf[pos:cut])
        self._tail = buf[cut:]
        return b"".join(parts)

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail  # holds no complete placeholder (feed matched every complete one)


def rewrite_head(target: bytes, headers: Sequence[tuple[bytes, bytes]], rules: SecretRules,
                 used: set[str], leaked: list[str]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Request target (path+query) and header values with bound placeholders replaced.
    Header names are never rewritten, only scanned. Foreign patterns land in `leaked`."""
    target = rules.rewrite(target, used, leaked)
    # One substring pre-check over the whole head (a header holds no CR/LF, so a pattern
    # found within one header is found in the joined bytes); exact passes only on a hit.
    if not rules._maybe(b"\n".join(chain.from_iterable(headers))):
        return target, list(headers)
    names = b"\n".join([h[0] for h in headers])
    if rules._maybe(names):
        leaked.extend(n for n in rules.leaks(names) if n not in leaked)
    return target, [(name, rules.rewrite(value, used, leaked)) for name, value in headers]


# ---------------------------------------------------------------------------- responses

_REASONS = {400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed",
            413: b"Content Too Large",
            421: b"Misdirected Request", 431: b"Request Header Fields Too Large",
            502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}


def block_message(host: str, reason: str) -> str:
    return f"matchlock: blocked request to {host}: {reason}"


def simple_response(status: int, text: str) -> bytes:
    """A complete `Connection: close` response with a plain-text body (the connection is
    closed after it, so no h11 state is involved)."""
    body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS.get(status, b"Error"), len(body)))
    return head + body
