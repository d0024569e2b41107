"""Request framing the proxy accepts (RFC 9112 §3.2, §6.1, §6.3), sans-I/O.

The guest is hostile and the upstream may parse a request differently from h11, so anything
two parsers could read two ways is refused with 400 instead of being passed on:

- more than one `Content-Length` (also the list form `5, 5`, which h11 merges), more than one
  `Transfer-Encoding`, a `Transfer-Encoding` other than `chunked`, both headers at once, or
  `Transfer-Encoding` in an HTTP/1.0 request;
- an absolute-form target (`GET http://host/path`) whose authority differs from `Host`, or
  whose scheme is not the connection's; the upstream only ever gets origin-form (`/path`);
- `CONNECT` (authority-form): a tunnel through an allowed host would escape inspection.

`check_head` works on the raw head bytes, so its size limit holds however the bytes arrive
(h11's own limit only applies while a head is incomplete).
"""

from __future__ import annotations

import re

MAX_HEAD = 16 * 1024  # one request head (request line + headers), bytes

_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 ends a head (it accepts bare LF lines)
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)\Z")


class FramingError(Exception):
    """Refuse the request: HTTP status for the guest and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def head_end(buf: bytes) -> int | None:
    """Length of the head at the start of `buf` (through its blank line), None if incomplete."""
    m = _BLANK_LINE.search(buf)
    return m.end() if m else None


def check_head(head: bytes) -> None:
    """Size and framing headers of one raw request head. Raises FramingError.

    h11 refuses whitespace before the colon and parses a line that starts with SP/HTAB as a
    continuation (obs-fold), so a framing header is exactly a line starting `\\n<name>:`."""
    if len(head) > MAX_HEAD:
        raise FramingError(431, f"request head over {MAX_HEAD >> 10} KiB")
    low = head.lower()
    n_cl = low.count(b"\ncontent-length:")
    n_te = low.count(b"\ntransfer-encoding:")
    if not n_cl and not n_te:
        return
    if n_cl and n_te:
        raise FramingError(400, "request has both Content-Length and Transfer-Encoding")
    if n_cl > 1:
        raise FramingError(400, "request has more than one Content-Length header")
    if n_te > 1:
        raise FramingError(400, "request has more than one Transfer-Encoding header")
    name = b"\ncontent-length:" if n_cl else b"\ntransfer-encoding:"
    start = low.index(name) + len(name)
    value = low[start:low.index(b"\n", start)].strip(b" \t\r")
    if n_cl and not value.isdigit():
        raise FramingError(400, "request has an invalid Content-Length")
    if n_te and value != b"chunked":
        raise FramingError(400, "request Transfer-Encoding is not 'chunked'")


def split_authority(value: bytes | str, default_port: int) -> tuple[str, int]:
    """`host[:port]` (or `[v6]:port`) → (lower-case host without trailing dot, port).
    Raises FramingError for userinfo, an empty host or a bad port."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = value.strip().lower()
    if "@" in value:
        raise FramingError(400, "request target carries userinfo")
    port_s = ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise FramingError(400, "malformed IPv6 authority")
        host, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise FramingError(400, "malformed IPv6 authority")
            port_s = rest[1:]
    elif ":" in value:
        host, port_s = value.rsplit(":", 1)
    else:
        host = value
    host = host.rstrip(".")
    if not host:
        raise FramingError(400, "request authority has no host")
    if port_s == "":
        return host, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise FramingError(400, "request authority has a bad port")
    return host, int(port_s)


def split_target(method: bytes, target: bytes, tls: bool
                 ) -> tuple[tuple[str, int] | None, bytes]:
    """The request target → (authority of an absolute-form target or None, origin-form target
    to send upstream). Raises FramingError for forms the proxy does not relay."""
    if target.startswith(b"/"):
        return None, target
    if method == b"CONNECT":
        raise FramingError(405, "CONNECT is not relayed (the proxy is not a tunnel)")
    if target == b"*":
        if method != b"OPTIONS":
            raise FramingError(400, "asterisk-form target is only valid for OPTIONS")
        return None, target
    m = _ABSOLUTE.match(target)
    if m is None:
        raise FramingError(400, "request target is neither origin-form nor absolute-form")
    scheme = m.group(1).lower()
    want = b"https" if tls else b"http"
    if scheme != want:
        raise FramingError(400, f"absolute-form target with scheme {scheme.decode()!r} on an "
                                f"{want.decode()} connection")
    authority = split_authority(m.group(2), 443 if tls else 80)
    rest = m.group(3)
    origin = rest if rest.startswith(b"/") else b"/" + rest
    return authority, origin
