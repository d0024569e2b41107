"""Streaming tar reading that notices truncation.

`tarfile` in stream mode silently treats a truncated header as the end of the archive, and
does not verify compressed streams to their end. `iter_tar` decompresses itself (gzip, zstd,
bzip2, xz or none, sniffed from the magic bytes), drains the stream after the last member
and checks that an end-of-archive block was really there.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from matchlock.errors import DependencyError

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_BZ2 = b"BZh"
_XZ = b"\xfd7zXZ\x00"
_CHUNK = 1 << 20


class _Prefixed:
    """Put sniffed bytes back in front of a (maybe unseekable) stream."""

    def __init__(self, head: bytes, raw: BinaryIO):
        self._head = head
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + self._raw.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self._raw.read(n - len(out)) or b""
            return out
        return self._raw.read(n) or b""


class _Counting:
    def __init__(self, raw) -> None:  # noqa: ANN001
        self._raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self._raw.read(n) or b""
        self.count += len(b)
        return b


class _Zstd:
    """zstd frames (possibly several) -> bytes; EOFError if the last frame is cut short."""

    def __init__(self, raw, zstandard) -> None:  # noqa: ANN001
        self._raw = raw
        self._z = zstandard
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._fed = False
        self._done = False

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buf) < n):
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                self._done = True
                if self._fed and not getattr(self._obj, "eof", True):
                    raise EOFError("zstd stream ended before the end of its frame")
                break
            while chunk:
                if getattr(self._obj, "eof", False):
                    self._obj = self._z.ZstdDecompressor().decompressobj()
                    self._fed = False
                self._buf += self._obj.decompress(chunk)
                self._fed = True
                chunk = getattr(self._obj, "unused_data", b"") if self._obj.eof else b""
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def decompressed(f: BinaryIO, label: str):  # noqa: ANN201
    head = f.read(6) or b""
    src = _Prefixed(head, f)
    if head.startswith(_GZIP):
        return gzip.GzipFile(fileobj=src, mode="rb")
    if head.startswith(_ZSTD):
        try:
            import zstandard
        except ImportError:
            raise DependencyError(
                f"{label} is zstd-compressed; install the Python package `zstandard` "
                "(pip install zstandard) to import it"
            ) from None
        return _Zstd(src, zstandard)
    if head.startswith(_BZ2):
        return bz2.BZ2File(src)
    if head.startswith(_XZ):
        return lzma.LZMAFile(src)
    return src


def iter_tar(f: BinaryIO, label: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Yield (tarfile, member) for each member; raise tarfile.ReadError if truncated."""
    counted = _Counting(decompressed(f, label))
    with tarfile.open(fileobj=counted, mode="r|") as tf:
        for m in tf:
            yield tf, m
        end = tf.offset
    while counted.read(_CHUNK):
        pass
    if counted.count < end + tarfile.BLOCKSIZE:
        raise tarfile.ReadError("unexpected end of data (truncated tar stream)")


def decompress_errors() -> tuple[type[BaseException], ...]:
    import zlib

    errs: list[type[BaseException]] = [
        tarfile.TarError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        lzma.LZMAError,
    ]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)
