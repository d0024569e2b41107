"""The host VFS server: the asyncio shell around FuseFilesystem, on its own thread.

It owns one event loop on a dedicated thread, so no file-system call ever runs on the
supervisor's loop. Requests are served in arrival order on that thread; READ/WRITE above
BIG_IO bytes and fsync go to a small worker pool (they may wait on the host disk), and a
handle released while such a request is in flight is closed only when it finishes, so its
fd number is never reused under it.

Bounded against a hostile guest: at most MAX_INFLIGHT worker requests, and reading from
the guest pauses while the transport holds more than its high-water mark of replies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from matchlock.vfs import _fuse as F
from matchlock.vfs._fs import BIG_IO, FuseFilesystem
from matchlock.vfs._fuse import FuseProtocolError, Request
from matchlock.vfs._wire import (
    BOUNCE_SLOT,
    BOUNCE_SLOTS,
    FLAG_ATTR_PUSH,
    FLAG_BOUNCE,
    FLAG_LOCAL_RELEASE,
    FLAG_NEW_DIR,
    VfsConnection,
    bounced,
    hello,
)

log = logging.getLogger(__name__)

MAX_INFLIGHT = 16
WORKERS = 4
# READ data at least this big goes through the bounce file when the guest asks; below
# it, a few 4 KiB steps through the port cost less than a block request.
BOUNCE_MIN = 16 << 10


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class VfsServer:
    """Serve `fs` to the guest on a connected stream socket (the VFS port's host end)."""

    def __init__(self, fs: FuseFilesystem, bounce_fd: int | None = None) -> None:
        self.fs = fs
        self.bounce_fd = bounce_fd  # the bounce file, read-write (the guest's view is ro)
        self.bounced = 0  # READ replies whose data went through it
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proto: _Protocol | None = None
        self._stopped: asyncio.Future | None = None
        self._started = threading.Event()
        self._closed = False
        self.error: BaseException | None = None
        self.host_seconds = 0.0  # time spent serving requests on the VFS thread
        self.worker_seconds = 0.0
        self.on_close: Callable[[BaseException | None], None] | None = None

    def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="vfs",
                                        daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self, sock: socket.socket) -> None:
        loop = self._loop = _new_loop()
        asyncio.set_event_loop(loop)
        pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="vfs-io")
        try:
            self._stopped = loop.create_future()
            transport, proto = loop.run_until_complete(
                loop.create_connection(lambda: _Protocol(self, pool), sock=sock))
            self._proto = proto
            self._started.set()
            loop.run_until_complete(self._stopped)
            transport.close()
            loop.run_until_complete(asyncio.sleep(0))
        except BaseException as e:  # noqa: BLE001 - reported via .error
            self.error = e
            log.warning("VFS server stopped: %s", e)
        finally:
            self._started.set()
            pool.shutdown(wait=True)
            loop.close()

    def stop(self) -> None:
        """Stop serving, release every handle and provider (a snapshot's copy is deleted).
        Idempotent; blocks up to a few seconds (call it from a worker thread)."""
        if self._closed:
            return
        self._closed = True
        loop, fut = self._loop, self._stopped
        if loop is not None and fut is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(10)
        self.fs.hooks.close()
        self.fs.close()

    def _finished(self, err: BaseException | None) -> None:
        if err is not None:
            self.error = err
        fut = self._stopped
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self.on_close is not None:
            try:
                self.on_close(err)
            except Exception:  # noqa: BLE001
                log.exception("VFS on_close callback failed")


class _Protocol(asyncio.Protocol):
    def __init__(self, server: VfsServer, pool: concurrent.futures.Executor) -> None:
        self.server = server
        self.fs = server.fs
        self.pool = pool
        self.conn = VfsConnection()
        self.transport: asyncio.Transport | None = None
        self.inflight = 0
        self._paused_reading = False
        self._write_paused = False
        self._dead = False
        self._batch: list[bytes] | None = None
        self._quiet_release = False  # the guest answered RELEASE(DIR) already
        self._bounce = False  # both ends have the bounce disk

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(hello())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self.server._finished(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        # Replies to every request in this chunk leave in one write (one syscall, one
        # wakeup of QEMU) instead of one each.
        self._batch = []
        try:
            msgs = self.conn.receive_data(data)
            self.fs.push_attrs = bool(self.conn.guest_flags & FLAG_ATTR_PUSH)
            self.fs.push_new_dirs = bool(self.conn.guest_flags & FLAG_NEW_DIR)
            self._quiet_release = bool(self.conn.guest_flags & FLAG_LOCAL_RELEASE)
            self._bounce = bool(self.conn.guest_flags & FLAG_BOUNCE) and \
                self.server.bounce_fd is not None
            for msg in msgs:
                self._dispatch(F.parse_request(memoryview(msg)))
        except FuseProtocolError as e:
            self._fail(e)
        finally:
            batch, self._batch = self._batch, None
            if batch and not self._dead and self.transport is not None:
                self.transport.writelines(batch)

    def eof_received(self) -> bool:
        return False

    # -- requests ------------------------------------------------------------------------

    def _fail(self, e: BaseException) -> None:
        if self._dead:
            return
        self._dead = True
        log.warning("VFS: closing the guest connection: %s", e)
        self.server.error = e
        if self.transport is not None:
            self.transport.close()

    def _send(self, out: bytes | list[bytes] | None) -> None:
        if out is None or self._dead or self.transport is None:
            return
        if self._batch is not None:
            if isinstance(out, list):
                self._batch.extend(out)
            else:
                self._batch.append(out)
            return
        if isinstance(out, list):
            self.transport.writelines(out)
        else:
            self.transport.write(out)

    def _dispatch(self, req: Request) -> None:
        if self.fs.initialized and _blocking(req):
            self._offload(req)
            return
        t0 = time.perf_counter()
        out = self.fs.handle(req)
        self.server.host_seconds += time.perf_counter() - t0
        if self._quiet_release and req.opcode in (F.RELEASE, F.RELEASEDIR):
            return
        if req.opcode == F.READ and self._bounce:
            out = self._bounced(req, out)
        self._send(out)

    def _bounced(self, req: Request, out: bytes | list[bytes] | None) -> bytes | list[bytes] | None:
        """A READ's data in the bounce slot the guest named (fuse_read_in.padding = slot
        + 1), and the BOUNCED reply; the reply as it is when not asked or not worth it."""
        if not isinstance(out, list) or len(out) != 2 or len(req.body) < F.READ_IN.size:
            return out  # an error reply
        slot = F.READ_IN.unpack_from(req.body, 0)[6] - 1
        data = out[1]
        if not 0 <= slot < BOUNCE_SLOTS or len(data) < BOUNCE_MIN or len(data) > BOUNCE_SLOT:
            return out
        fd, off, view = self.server.bounce_fd, slot * BOUNCE_SLOT, memoryview(data)
        assert fd is not None
        try:
            while view:  # the host page cache, which QEMU reads the guest's view from
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        except OSError as e:
            log.warning("VFS bounce file: %s; sending READ data inline from now on", e)
            self.server.bounce_fd = None
            self._bounce = False
            return out
        self.server.bounced += 1
        return bounced(req.unique, len(data), slot)

    def _offload(self, req: Request) -> None:
        fs = self.fs
        fs.counts[req.name] = fs.counts.get(req.name, 0) + 1
        try:
            if req.opcode == F.READ:
                f, offset, size = fs.read_args(req)
                job = (f.handle.read, offset, size)  # type: ignore[union-attr]
            elif req.opcode == F.WRITE:
                f, offset, data, size, mutated = fs.write_args(req)
                job = (f.handle.write, offset, data)  # type: ignore[union-attr]
            else:
                fh, flags, _ = F.need(req.body, F.FSYNC_IN)
                f = fs._file(fh)
                fs.hooks.before("sync", f.path, req)
                if f.handle is None:  # FSYNCDIR
                    mount, rel = fs._where(f.node)
                    job = (mount.provider.fsyncdir, rel)
                else:
                    job = (f.handle.fsync, bool(flags & F.FSYNC_FDATASYNC))
        except OSError as e:
            self._send(F.reply_error(req.unique, _errno(e)))
            return
        f.busy += 1
        self.inflight += 1
        self._update_reading()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()

        def run():
            return job[0](*job[1:])

        fut = loop.run_in_executor(self.pool, run)

        def done(fut: asyncio.Future) -> None:
            self.server.worker_seconds += time.perf_counter() - t0
            f.busy -= 1
            self.inflight -= 1
            self._update_reading()
            fh_closed = f.closing and f.busy == 0
            exc = fut.exception()
            if exc is not None:
                out: bytes | list[bytes] = F.reply_error(req.unique, _errno(exc))
            elif req.opcode == F.READ:
                out = fs.finish_read(req, f, fut.result())
                if self._bounce:
                    out = self._bounced(req, out)
            elif req.opcode == F.WRITE:
                out = fs.finish_write(req, f, fut.result(), len(data), size, mutated)
            else:
                fs.hooks.after("sync", f.path, req)
                out = F.reply(req.unique)
            if fh_closed:
                for fh, of in list(fs.files.items()):
                    if of is f:
                        fs.drop_file(fh)
            self._send(out)

        fut.add_done_callback(done)

    def _update_reading(self) -> None:
        if self.transport is None or self._dead:
            return
        want_pause = self._write_paused or self.inflight >= MAX_INFLIGHT
        if want_pause and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        elif not want_pause and self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()


def _blocking(req: Request) -> bool:
    """Requests that may wait on the host disk: big reads and writes, fsync."""
    op = req.opcode
    if op in (F.FSYNC, F.FSYNCDIR):
        return True
    if op == F.WRITE:
        return len(req.body) - F.WRITE_IN.size > BIG_IO
    if op == F.READ and len(req.body) >= F.READ_IN.size:
        return F.READ_IN.unpack_from(req.body, 0)[2] > BIG_IO
    return False


def _errno(e: BaseException) -> int:
    if isinstance(e, OSError) and isinstance(e.errno, int) and 0 < e.errno < 4096:
        return e.errno
    log.warning("VFS worker request failed: %r", e)
    return errno.EIO
