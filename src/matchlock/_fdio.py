"""Writing to a blocking fd (a terminal, a pipe, a file) from asyncio without blocking it.

A terminal or a pipe shared with other processes must stay in blocking mode, and a regular
file cannot be polled, so one thread per fd does the writes. `await write()` returns as
soon as the bytes are queued, and waits only while more than `limit` bytes are queued:
a slow reader pushes back on whoever awaits, never on the event loop.
"""

from __future__ import annotations

import collections
import os
import select

TYPE_CHECKING = False  # no typing import on the exec start-up path

if TYPE_CHECKING:
    import asyncio

DEFAULT_LIMIT = 1 << 20  # bytes queued per fd before write() waits


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Blocking write of all of `data` (also when someone made the fd non-blocking)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except InterruptedError:
            continue
        view = view[n:]


class FdWriter:
    """An async writer for one blocking fd. Errors (EPIPE, ENOSPC) surface on the next
    `write()`/`flush()` as the OSError they were."""

    def __init__(self, fd: int, limit: int = DEFAULT_LIMIT) -> None:
        import asyncio  # here: write_all's users (the exec client) do without these
        import threading

        self.fd = fd
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._buf: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._closing = False
        self._error: OSError | None = None
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name=f"fdwriter-{fd}", daemon=True)
        self._thread.start()

    @property
    def error(self) -> OSError | None:
        return self._error

    async def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if not data:
            return
        with self._lock:
            self._buf.append(data)
            self._size += len(data)
            self._idle.clear()
            self._wake.notify()
        while True:
            with self._lock:
                if self._size < self._limit or self._error is not None:
                    break
                self._space.clear()
            await self._space.wait()
        if self._error is not None:
            raise self._error

    async def flush(self) -> None:
        """Until everything queued has been written (or failed)."""
        while True:
            with self._lock:
                if self._size == 0 or self._error is not None:
                    break
                self._idle.clear()
            await self._idle.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread once the queue is empty (does not close the fd)."""
        with self._lock:
            self._closing = True
            self._wake.notify()

    def _signal(self, event: asyncio.Event) -> None:
        try:
            self._loop.call_soon_threadsafe(event.set)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._buf and not self._closing:
                    self._wake.wait()
                if not self._buf:
                    return
                data = self._buf.popleft()
            try:
                write_all(self.fd, data)
            except OSError as e:
                with self._lock:
                    self._error = e
                    self._buf.clear()
                    self._size = 0
                self._signal(self._space)
                self._signal(self._idle)
                return
            with self._lock:
                self._size -= len(data)
                size = self._size
            if size < self._limit:
                self._signal(self._space)
            if size == 0:
                self._signal(self._idle)
