"""Where a stream's output goes: text writers get UTF-8 text (decoded incrementally, so
a character split across chunks survives), binary writers and plain callables get the
exact bytes."""

from __future__ import annotations

import codecs
import io
from typing import Any


class Sink:
    __slots__ = ("_write", "_flush", "_decoder", "_drain")

    def __init__(self, target: Any) -> None:
        self._write: Any = None
        self._flush: Any = None
        self._drain: Any = None
        self._decoder: Any = None
        if target is None:
            return
        write = getattr(target, "write", None)
        if write is None:
            if not callable(target):
                raise TypeError(f"output target must have write() or be callable, "
                                f"not {type(target).__name__}")
            self._write = target
            return
        self._write = write
        self._flush = getattr(target, "flush", None)
        self._drain = getattr(target, "drain", None)  # asyncio.StreamWriter
        if _is_text(target):
            self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> Any:
        """Deliver one chunk; returns an awaitable when the target wants awaiting."""
        if self._write is None:
            return None
        if self._decoder is not None:
            text = self._decoder.decode(data)
            if not text:
                return None
            return self._emit(text)
        return self._emit(data)

    def close(self) -> Any:
        """Flush a partial UTF-8 sequence left at the end of the stream."""
        if self._decoder is None or self._write is None:
            return None
        text = self._decoder.decode(b"", final=True)
        return self._emit(text) if text else None

    def _emit(self, chunk: Any) -> Any:
        result = self._write(chunk)
        if self._drain is not None:
            return self._drain()
        if self._flush is not None:
            self._flush()
        return result


def _is_text(target: Any) -> bool:
    if isinstance(target, io.TextIOBase):
        return True
    if isinstance(target, (io.RawIOBase, io.BufferedIOBase)):
        return False
    mode = getattr(target, "mode", None)
    if isinstance(mode, str) and "b" in mode:
        return False
    return hasattr(target, "encoding")
