"""Sans-I/O sealing rules of the proxy: framing, protocol sniffing, secret patterns, response
scrubbing, decoding, the per-VM budget. Bytes in, bytes out; the I/O side is test_proxy.py."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from matchlock.net.proxy._budget import BufferBudget
from matchlock.net.proxy._framing import (
    MAX_HEAD,
    FramingError,
    check_head,
    head_end,
    split_authority,
    split_target,
)
from matchlock.net.proxy._http import (
    SecretRules,
    rewrite_head,
    rewritten_content_type,
    sniff_protocol,
)
from matchlock.net.proxy._scrub import INFLATE_PIECE, InflateError, Inflater, Scrubber
from matchlock.net.types import Secret

PH = "SANDBOX_SECRET_" + "0123456789abcdef" * 2
PH_OTHER = "SANDBOX_SECRET_" + "fedcba9876543210" * 2
REAL = "real-value-Zq9!"
REAL_OTHER = "other-real-value-Xy7"
SECRETS = (Secret("API_TOKEN", REAL, ("api.test",), PH),
           Secret("OTHER_TOKEN", REAL_OTHER, ("else.test",), PH_OTHER))


def _head(*lines: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: a\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"


# ---------------------------------------------------------------------------------- framing

@pytest.mark.parametrize("lines,why", [
    ((b"Content-Length: 5", b"Transfer-Encoding: chunked"), "both"),
    ((b"transfer-encoding: chunked", b"content-length: 5"), "both"),
    ((b"Content-Length: 5", b"Content-Length: 5"), "more than one Content-Length"),
    ((b"Content-Length: 5, 5",), "invalid Content-Length"),
    ((b"Content-Length: 5", b"content-LENGTH: 6"), "more than one Content-Length"),
    ((b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), "more than one"),
    ((b"Transfer-Encoding: gzip, chunked",), "not 'chunked'"),
    ((b"Transfer-Encoding: chunked, identity",), "not 'chunked'"),
    ((b"Content-Length: -1",), "invalid Content-Length"),
])
def test_conflicting_framing_is_400(lines, why):
    with pytest.raises(FramingError) as e:
        check_head(_head(*lines))
    assert e.value.status == 400 and why in e.value.reason


def test_framing_accepted_and_folded_lines():
    check_head(_head(b"Content-Length: 5"))
    check_head(_head(b"Transfer-Encoding: Chunked"))
    check_head(_head())
    # an obs-fold continuation is part of the previous header (h11 unfolds it): not framing
    check_head(_head(b"X-A: b", b" Content-Length: 5", b"Transfer-Encoding: chunked"))
    # bare LF line endings are lines too (h11 accepts them)
    with pytest.raises(FramingError):
        check_head(b"POST / HTTP/1.1\nHost: a\nContent-Length: 1\nTransfer-Encoding: chunked"
                   b"\n\n")


def test_head_size_limit_on_raw_bytes():
    big = _head(b"X-Pad: " + b"a" * MAX_HEAD)
    with pytest.raises(FramingError) as e:
        check_head(big)
    assert e.value.status == 431
    assert head_end(big + b"body") == len(big)
    assert head_end(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert head_end(b"GET / HTTP/1.1\nHost: a\n\nrest") == len(b"GET / HTTP/1.1\nHost: a\n\n")


def test_request_targets():
    assert split_target(b"GET", b"/a?b", True) == (None, b"/a?b")
    assert split_target(b"GET", b"https://API.test/x?y", True) == (("api.test", 443), b"/x?y")
    assert split_target(b"GET", b"http://api.test:8080", False) == (("api.test", 8080), b"/")
    assert split_target(b"GET", b"http://api.test?q", False) == (("api.test", 80), b"/?q")
    assert split_target(b"OPTIONS", b"*", False) == (None, b"*")
    for method, target, tls, status in [
        (b"GET", b"http://api.test/", True, 400),  # scheme is not the connection's
        (b"GET", b"https://api.test/", False, 400),
        (b"GET", b"ftp://api.test/", False, 400),
        (b"GET", b"http://user@api.test/", False, 400),
        (b"GET", b"http:///x", False, 400),
        (b"GET", b"http://api.test:99999/", False, 400),
        (b"GET", b"api.test/x", False, 400),
        (b"GET", b"*", False, 400),
        (b"CONNECT", b"evil.test:443", False, 405),
    ]:
        with pytest.raises(FramingError) as e:
            split_target(method, target, tls)
        assert e.value.status == status, target
    assert split_authority(b"[::1]:8443", 443) == ("::1", 8443)
    assert split_authority("API.test.", 80) == ("api.test", 80)


# ---------------------------------------------------------------------------------- sniffing

def test_sniff_waits_for_a_whole_record_header():
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    for n in range(5):  # however the header is split, nothing is decided before 5 bytes
        assert sniff_protocol(hello[:n]) is None, n
    assert sniff_protocol(hello[:5]) == "tls"
    assert sniff_protocol(b"\x15\x03\x03\x00\x02") == "tls"  # any TLS-looking record
    assert sniff_protocol(b"G") == "plain"
    assert sniff_protocol(b"SSH-2.0") == "plain"
    assert sniff_protocol(b"\x16\x01") == "plain"
    assert sniff_protocol(b"\x80\x2e\x01") == "plain"  # SSLv2-style hello: no SNI possible


# ---------------------------------------------------------------------------- secret rules

def test_foreign_real_values_and_header_names_leak():
    rules = SecretRules([SECRETS[0]], [SECRETS[1]])
    used: set[str] = set()
    leaked: list[str] = []
    target, headers = rewrite_head(b"/?k=" + PH.encode(), [(b"x-a", REAL.encode())], rules,
                                   used, leaked)
    assert target == b"/?k=" + REAL.encode() and leaked == [] and used == {"API_TOKEN"}
    for head in ([(b"x-a", b"v=" + REAL_OTHER.encode())], [(PH_OTHER.encode(), b"v")],
                 [(b"x-" + REAL_OTHER.encode(), b"v")]):
        leaked = []
        rewrite_head(b"/", head, rules, set(), leaked)
        assert leaked == ["OTHER_TOKEN"], head
    assert rules.leaks(b"..." + REAL_OTHER.encode()) == ["OTHER_TOKEN"]
    # values too short to search for are not patterns (they would match ordinary bytes)
    short = SecretRules([], [Secret("S", "abc", ("x.test",), PH)])
    assert short.leaks(b"abcabc") == [] and short.leaks(PH.encode()) == ["S"]


def test_leak_only_stream_keeps_length_and_bound_placeholders():
    rules = SecretRules([SECRETS[0]], [SECRETS[1]])
    body = os.urandom(5000) + PH.encode() + os.urandom(3000)
    w = rules.stream(rewrite=False)
    out = b"".join(w.feed(body[i:i + 777]) for i in range(0, len(body), 777)) + w.finish()
    assert out == body and w.used == set() and w.leaked == []
    w = rules.stream(rewrite=False)
    bad = os.urandom(100) + REAL_OTHER.encode() + os.urandom(100)
    for i in range(0, len(bad), 3):
        w.feed(bad[i:i + 3])
    assert w.leaked == ["OTHER_TOKEN"]


def test_rewritten_types():
    for ct in (None, b"application/json", b"text/plain; charset=utf-8",
               b"multipart/form-data; boundary=x", b"application/vnd.api+json"):
        assert rewritten_content_type(ct), ct
    for ct in (b"application/octet-stream", b"image/png", b"application/x-tar"):
        assert not rewritten_content_type(ct), ct


# ------------------------------------------------------------------------------- scrubbing

def test_scrub_and_mask():
    sc = Scrubber(SECRETS)
    data = b"a " + REAL.encode() + b" b " + REAL_OTHER.encode()
    assert sc.scrub(data) == b"a " + PH.encode() + b" b " + PH_OTHER.encode()
    masked = sc.mask(data)
    assert len(masked) == len(data) and REAL.encode() not in masked
    assert REAL_OTHER.encode() not in masked and masked.startswith(b"a SANDBOX_SECRET_")
    assert sc.scrub_headers([(b"a", b"b")]) is None
    assert sc.scrub_headers([(b"x-" + REAL.encode(), b"v " + REAL.encode())]) == \
        [(b"x-" + PH.encode(), b"v " + PH.encode())]
    assert not Scrubber([Secret("S", "short", ("x",), PH)]).active


@pytest.mark.parametrize("same_length", [False, True])
def test_scrub_stream_every_split(same_length):
    sc = Scrubber(SECRETS)
    data = b"x" + REAL.encode() + b"yy" + REAL.encode() + REAL_OTHER.encode() + b"z"
    expect = sc.mask(data) if same_length else sc.scrub(data)
    for cut in range(len(data) + 1):
        for cut2 in range(cut, len(data) + 1, 3):
            st = sc.stream(same_length)
            out = st.feed(data[:cut]) + st.feed(data[cut:cut2]) + st.feed(data[cut2:])
            out += st.finish()
            assert out == expect, (cut, cut2)
    st = sc.stream(same_length)
    pieces = [st.feed(data[i:i + 1]) for i in range(len(data))] + [st.finish()]
    assert b"".join(pieces) == expect
    assert all(REAL.encode() not in p for p in pieces)


def test_scrub_stream_holds_only_a_possible_value_start():
    sc = Scrubber(SECRETS)
    st = sc.stream()
    assert st.feed(b"data: event 1\n\n") == b"data: event 1\n\n"  # nothing held back
    assert st.feed(b"data: " + REAL.encode()[:5]) == b"data: "  # maybe a value: held
    assert st.feed(b"!") == REAL.encode()[:5] + b"!"


def test_inflater():
    body = os.urandom(1000) * 50
    for enc, coding in ((gzip.compress(body), b"gzip"), (zlib.compress(body), b"deflate"),
                        (zlib.compress(body)[2:-4], b"deflate"),  # raw deflate
                        (gzip.compress(body[:7]) + gzip.compress(body[7:]), b"gzip")):
        inf = Inflater(coding)
        out = b"".join(b"".join(inf.feed(enc[i:i + 999])) for i in range(0, len(enc), 999))
        assert out + inf.finish() == body, coding
    bomb = gzip.compress(bytes(64 << 20))
    inf = Inflater(b"gzip")
    sizes = [len(p) for p in inf.feed(bomb)]
    assert sum(sizes) == 64 << 20 and max(sizes) <= INFLATE_PIECE
    with pytest.raises(InflateError):
        list(Inflater(b"gzip").feed(b"not gzip at all"))


def test_budget():
    b = BufferBudget(100)
    assert b.take(60) and not b.take(41) and b.take(40)
    b.give(60)
    assert b.used == 40 and b.take(60) and b.peak == 100 and not b.take(-1)
