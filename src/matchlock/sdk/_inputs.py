"""Stdin sources for exec_pipe/exec_interactive, as chunks of bytes (blocking form).
A source is None, bytes/str, a file-like object, or an iterable of bytes/str chunks."""

from __future__ import annotations

import select
from collections.abc import Iterator
from typing import Any

CHUNK = 64 * 1024


def as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(f"stdin chunks must be bytes or str, not {type(chunk).__name__}")


def split(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


def reader_of(source: Any) -> Any:
    """The best "read what is available" call of a file-like object: read1 returns after
    one underlying read (a typed line on a terminal) instead of waiting for CHUNK bytes."""
    for obj in (source, getattr(source, "buffer", None)):
        read1 = getattr(obj, "read1", None)
        if callable(read1):
            return read1
    return source.read


def is_inline(source: Any) -> bool:
    """Sources the caller's thread can send without blocking on anyone."""
    return source is None or isinstance(source, (bytes, bytearray, memoryview, str))


def chunks(source: Any) -> Iterator[bytes]:
    """Blocking iteration over a source's bytes (empty chunks dropped)."""
    if source is None:
        return
    if isinstance(source, (bytes, bytearray, memoryview, str)):
        yield from split(as_bytes(source))
        return
    if hasattr(source, "read"):
        read = reader_of(source)
        while True:
            chunk = read(CHUNK)
            if chunk is None:  # a non-blocking file with nothing ready yet
                select.select([source], [], [])
                continue
            data = as_bytes(chunk)
            if not data:
                return
            yield data
    for chunk in source:
        data = as_bytes(chunk)
        if data:
            yield data
