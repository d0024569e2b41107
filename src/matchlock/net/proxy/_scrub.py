"""Response scrubbing, sans-I/O: the real value of a secret never reaches the guest.

An upstream that reflects a request (httpbin-style echo endpoints, error pages quoting the
`Authorization` header, a WebSocket echo) would hand the guest the value the proxy injected.
Every byte that goes to the guest from an intercepted connection passes a `Scrubber`:

- `scrub` replaces each real value by its placeholder (headers, reason phrases, trailers,
  bodies whose length may change);
- `mask` replaces it by a filler of the same length (bodies whose length is fixed: a large
  `Content-Length` body already announced, upgraded/WebSocket streams with framed lengths);
- `ScrubStream` does either over a stream of chunks: it holds back only the tail bytes that
  could be the start of a value (so an SSE event is not delayed), and finds a value split
  across any number of chunks.

`Inflater` decodes a gzip/deflate body so it can be scrubbed (the proxy asks hosts that
secrets are bound to for `identity`, but a server may send gzip anyway). Values shorter than
`MIN_SCANNED_VALUE` are not searched for (they would match ordinary bytes).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain

from ..types import Secret
from ._http import MIN_SCANNED_VALUE

INFLATE_PIECE = 256 * 1024  # decoded bytes per step: a small gzip bomb never sits in memory


def _filler(value: bytes, placeholder: bytes) -> bytes:
    """Same length as `value`, derived from the placeholder (recognisable, never the value)."""
    return (placeholder + b"_" * max(0, len(value) - len(placeholder)))[:len(value)]


class Scrubber:
    """Real values of `secrets` → placeholders (or same-length fillers)."""

    __slots__ = ("_pairs", "_masks", "_values", "longest")

    def __init__(self, secrets: Iterable[Secret]) -> None:
        pairs: dict[bytes, bytes] = {}
        for s in secrets:
            value = s.value.encode()
            if len(value) >= MIN_SCANNED_VALUE:
                pairs.setdefault(value, s.placeholder.encode())
        # longest first: a value that contains another one is replaced whole
        self._pairs = sorted(pairs.items(), key=lambda kv: len(kv[0]), reverse=True)
        self._masks = [(v, _filler(v, ph)) for v, ph in self._pairs]
        self._values = [v for v, _ in self._pairs]
        self.longest = max((len(v) for v in self._values), default=0)

    @property
    def active(self) -> bool:
        return bool(self._pairs)

    def found(self, data: bytes) -> bool:
        for v in self._values:  # noqa: SIM110 - hot path: no generator per call
            if v in data:
                return True
        return False

    def scrub(self, data: bytes) -> bytes:
        for value, ph in self._pairs:
            if value in data:
                data = data.replace(value, ph)
        return data

    def mask(self, data: bytes) -> bytes:
        for value, filler in self._masks:
            if value in data:
                data = data.replace(value, filler)
        return data

    def scrub_headers(self, headers: Sequence[tuple[bytes, bytes]]
                      ) -> list[tuple[bytes, bytes]] | None:
        """Scrubbed copy of (name, value) pairs, or None when nothing needed changing."""
        if not self.found(b"\n".join(chain.from_iterable(headers))):
            return None
        return [(self.scrub(name), self.scrub(value)) for name, value in headers]

    def partial_tail(self, buf: bytes) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some value."""
        n = len(buf)
        best = 0
        for v in self._values:
            lo = max(0, n - (len(v) - 1))
            first = v[:1]
            i = buf.find(first, lo)
            while i != -1 and n - i > best:
                if v.startswith(buf[i:]):
                    best = n - i
                    break
                i = buf.find(first, i + 1)
        return best

    def stream(self, same_length: bool = False) -> ScrubStream:
        return ScrubStream(self, same_length)


class ScrubStream:
    """`Scrubber.scrub` (or `mask`) over a stream of chunks; `finish()` returns what is held."""

    __slots__ = ("_scrubber", "_fn", "_tail", "hits")

    def __init__(self, scrubber: Scrubber, same_length: bool) -> None:
        self._scrubber = scrubber
        self._fn = scrubber.mask if same_length else scrubber.scrub
        self._tail = b""
        self.hits = 0  # chunks in which a value was replaced (for the event log)

    def feed(self, chunk: bytes) -> bytes:
        buf = self._tail + chunk if self._tail else bytes(chunk)
        sc = self._scrubber
        if sc.found(buf):
            buf = self._fn(buf)
            self.hits += 1
        hold = sc.partial_tail(buf)
        if hold:
            self._tail = buf[-hold:]
            return buf[:-hold]
        self._tail = b""
        return buf

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail  # a proper prefix of a value at most: not the value


# ----------------------------------------------------------------------------- decoding

DECODABLE = (b"gzip", b"x-gzip", b"deflate")


class InflateError(Exception):
    pass


class Inflater:
    """Streaming gzip / zlib-deflate (and raw deflate, which some servers send as `deflate`)
    decoder. Concatenated gzip members are decoded one after the other."""

    __slots__ = ("_d", "_raw_fallback", "_started", "_done")

    def __init__(self, coding: bytes) -> None:
        self._d = zlib.decompressobj(47)  # gzip or zlib header, detected
        self._raw_fallback = coding == b"deflate"
        self._started = False
        self._done = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data and not self._done:
            try:
                out = self._d.decompress(data, INFLATE_PIECE)
            except zlib.error as e:
                if self._raw_fallback and not self._started:
                    self._raw_fallback = False
                    self._d = zlib.decompressobj(-15)
                    continue
                raise InflateError(f"undecodable compressed body: {e}") from None
            self._started = True
            if out:
                yield out
            if self._d.eof:
                rest = self._d.unused_data
                if rest and rest.startswith(b"\x1f\x8b"):  # another gzip member
                    self._d = zlib.decompressobj(47)
                    data = rest
                    continue
                self._done = True  # trailing garbage after the stream is dropped
                return
            data = self._d.unconsumed_tail

    def finish(self) -> bytes:
        if self._done:
            return b""
        try:
            return self._d.flush()
        except zlib.error as e:
            raise InflateError(f"undecodable compressed body: {e}") from None


def content_codings(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """The Content-Encoding codings, lower-case, `identity` dropped."""
    out: list[bytes] = []
    for k, v in headers:
        if k.lower() == b"content-encoding":
            out += [c.strip().lower() for c in v.split(b",")]
    return [c for c in out if c and c != b"identity"]
