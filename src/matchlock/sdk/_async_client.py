"""`AsyncClient`: the asyncio twin of `Client`, same methods, awaitable.

One reader task feeds the sans-I/O `ClientProtocol`; callers await futures. Callbacks
(output writers, hooks, `on_event`) may be coroutine functions; plain functions that
could block (hooks) run in a worker thread so they never stall the event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import shutil
import stat
import sys
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any, TypeVar

from matchlock.sdk import _inputs, _ops, _wire
from matchlock.sdk._builder import Sandbox
from matchlock.sdk._config import Config, control_socket, describe_binary
from matchlock.sdk._errors import CLIError, MatchlockError, ProtocolError
from matchlock.sdk._hooks import (
    MAX_HOOK_LINE,
    LocalNetworkHook,
    LocalVFSHook,
    LocalVFSHooks,
    decode_hook_request,
    encode_hook_error,
    encode_hook_result,
    parse_event,
)
from matchlock.sdk._hookserver import REQUEST_READ_TIMEOUT, make_socket_dir
from matchlock.sdk._protocol import STDERR, STDOUT, ClientProtocol, Completed, Output, Ready
from matchlock.sdk._sinks import Sink
from matchlock.sdk._transport import READ_SIZE, STDERR_TAIL
from matchlock.sdk._types import (
    AllowListResult,
    CreateOptions,
    Event,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    PortForwardBinding,
    VFSHookEvent,
    VolumeInfo,
)

log = logging.getLogger("matchlock.sdk")
T = TypeVar("T")

DEFAULT_CLOSE_TIMEOUT = 2.0


async def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Await a coroutine function; run a plain function in a worker thread (it may
    block), then await its result if it handed back an awaitable."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    value = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(value):
        value = await value
    return value


class _Waiter:
    __slots__ = ("future", "ready", "sinks", "sink_error")

    def __init__(self, loop: asyncio.AbstractEventLoop, sinks: dict[int, Sink] | None) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()
        self.ready = asyncio.Event()
        self.sinks = sinks or {}
        self.sink_error: BaseException | None = None

    async def deliver(self, stream: int, data: bytes) -> None:
        sink = self.sinks.get(stream)
        if sink is None or self.sink_error is not None:
            return
        try:
            value = sink.write(data)
            if inspect.isawaitable(value):
                await value  # the writer's backpressure is the stream's backpressure
        except Exception as e:  # noqa: BLE001 - re-raised to the caller when the call ends
            self.sink_error = e

    async def finish(self, result: Any, error: BaseException | None) -> None:
        for sink in self.sinks.values():
            try:
                value = sink.close()
                if inspect.isawaitable(value):
                    await value
            except Exception as e:  # noqa: BLE001
                self.sink_error = self.sink_error or e
        if not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        self.ready.set()


class _CallIO:
    __slots__ = ("sinks", "stdin", "resize")

    def __init__(self, stdout: Any = None, stderr: Any = None, stdin: Any = None,
                 resize: Any = None) -> None:
        self.sinks = {k: Sink(v) for k, v in ((STDOUT, stdout), (STDERR, stderr))
                      if v is not None}
        self.stdin = stdin
        self.resize = resize


class AsyncClient:
    """asyncio client for one sandbox: `async with AsyncClient() as c: await c.launch(...)`.

    Same methods and semantics as `Client`; cancelling the task awaiting a call cancels
    the request on the server too."""

    def __init__(self, config: Config | None = None, *,
                 on_event: Callable[[Event], Any] | None = None) -> None:
        self._config = config if config is not None else Config.from_env()
        self._on_event = on_event
        self._proto: ClientProtocol[_Waiter] = ClientProtocol()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._read_task: asyncio.Task[None] | None = None
        self._start_lock: asyncio.Lock | None = None
        self._attached = False
        self._closed = False
        self._dead: MatchlockError | None = None
        self._state = _ops.ClientState()
        self._hook_server: asyncio.AbstractServer | None = None
        self._hook_dir = ""
        self._safe_hooks_running = False

    # lifecycle

    @classmethod
    async def attach(cls, vm_id: str, config: Config | None = None, *,
                     on_event: Callable[[Event], Any] | None = None) -> AsyncClient:
        """Connect to a running VM's control socket; `close()` only disconnects."""
        client = cls(config, on_event=on_event)
        path = control_socket(vm_id)
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=READ_SIZE)
        except (FileNotFoundError, ConnectionRefusedError):
            raise MatchlockError(
                f"no running VM behind {path} (is the VM id right? see 'matchlock list')"
            ) from None
        except OSError as e:
            raise MatchlockError(f"cannot connect to {path}: {e.strerror or e}") from None
        client._attached = True
        client._state.vm_id = client._state.last_vm_id = vm_id
        client._begin(reader, writer)
        return client

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    @property
    def vm_id(self) -> str | None:
        return self._state.vm_id

    async def start(self) -> None:
        """Start the server process (done implicitly by the first request)."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._closed:
                raise MatchlockError("client is closed")
            if self._writer is not None:
                return
            argv = self._config.rpc_argv()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, limit=READ_SIZE,
                    start_new_session=not self._config.use_sudo)
            except FileNotFoundError:
                raise MatchlockError(
                    f"matchlock binary not found: {describe_binary(self._config)!r} "
                    "(set MATCHLOCK_BIN or Config(binary_path=...))") from None
            except PermissionError:
                raise MatchlockError(
                    f"matchlock binary is not executable: {describe_binary(self._config)!r}"
                ) from None
            assert proc.stdout is not None and proc.stdin is not None
            self._proc = proc
            self._spawn(self._drain_stderr(proc), "matchlock-rpc-stderr")
            self._begin(proc.stdout, proc.stdin)

    def _begin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._read_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="matchlock-rpc-reader")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            try:
                raw = await proc.stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an over-long stderr line: skip it
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                log.debug("server: %s", line)

    async def close(self, timeout: float = 0) -> None:
        """As `Client.close`."""
        if self._closed:
            return
        self._closed = True
        self._state.last_vm_id = self._state.vm_id or self._state.last_vm_id
        self._state.vfs = LocalVFSHooks()
        await self._stop_hooks()
        if self._writer is None:
            return
        grace = timeout if timeout and timeout > 0 else DEFAULT_CLOSE_TIMEOUT
        if not self._attached and self._dead is None:
            try:
                await self._call(_ops.Call("close", {"timeout_seconds": grace}), grace + 1.0,
                                 None)
            except Exception as e:  # noqa: BLE001 - closing anyway, as the reference does
                log.debug("close request failed: %s", e)
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
        if self._read_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._read_task), 2)
            except TimeoutError:
                log.warning("matchlock rpc output still open after close")
                self._read_task.cancel()
        for task in list(self._tasks):
            task.cancel()

    # the reader task

    async def _read_loop(self) -> None:
        assert self._reader is not None
        failure: MatchlockError | None = None
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                for ev in self._proto.receive_data(data):
                    await self._dispatch(ev)
        except ProtocolError as e:
            failure = e
        except OSError as e:
            failure = MatchlockError(f"Matchlock connection failed: {e}")
        except asyncio.CancelledError:
            failure = MatchlockError("client is closed")
        except Exception as e:  # noqa: BLE001 - never leave callers waiting forever
            log.exception("matchlock SDK reader failed")
            failure = ProtocolError(f"SDK reader failed: {type(e).__name__}: {e}")
        if failure is None and self._closed:
            failure = MatchlockError("client is closed")
        elif failure is None:
            why = await self._why_closed()
            failure = MatchlockError("Matchlock process closed unexpectedly"
                                     + (f" ({why})" if why else ""))
        self._dead = failure
        for w in self._proto.connection_lost():
            await w.finish(None, failure)
        if isinstance(failure, ProtocolError) and self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self._stop_hooks()

    async def _why_closed(self) -> str:
        parts = []
        if self._proc is not None:
            try:
                rc = await asyncio.wait_for(self._proc.wait(), 1)
                parts.append(f"exit status {rc}")
            except TimeoutError:
                pass
        if self._stderr_tail:
            parts.append(self._stderr_tail[-1])
        return ": ".join(parts)

    async def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, Output):
            await ev.waiter.deliver(ev.stream, ev.data)
        elif isinstance(ev, Completed):
            await ev.waiter.finish(ev.result, ev.error)
        elif isinstance(ev, Ready):
            ev.waiter.ready.set()
        else:
            self._on_server_event(ev.params)

    def _on_server_event(self, params: dict[str, Any]) -> None:
        event = parse_event(params)
        if self._on_event is not None:
            try:
                value = self._on_event(event)
                if inspect.isawaitable(value):
                    self._spawn(_logged(value, "on_event callback"), "matchlock-on-event")
            except Exception:  # noqa: BLE001
                log.exception("on_event callback raised")
        if event.file is not None:
            self._run_after_hooks(event.file)

    def _run_after_hooks(self, event: VFSHookEvent) -> None:
        dangerous, safe = self._state.vfs.after_hooks(event)
        for hook in dangerous:
            self._spawn(_logged(call_maybe_async(hook.fn, self, event), f"vfs hook {hook.name!r}"),
                        "matchlock-vfs-hook")
        if not safe or self._safe_hooks_running:
            return
        self._safe_hooks_running = True

        async def run(hooks: list[LocalVFSHook]) -> None:
            try:
                for hook in hooks:
                    await _logged(call_maybe_async(hook.fn, event), f"vfs hook {hook.name!r}")
            finally:
                self._safe_hooks_running = False

        self._spawn(run(safe), "matchlock-vfs-hooks")

    # driving operations

    async def _run(self, op: _ops.Op[T], timeout: float | None = None,
                   io: _CallIO | None = None) -> T:
        if self._closed:
            raise MatchlockError("client is closed")
        if self._writer is None:
            await self.start()
        try:
            step = next(op)
            while True:
                if isinstance(step, _ops.Invoke):
                    value = await call_maybe_async(step.fn, *step.args)
                else:
                    value = await self._call(step, timeout, io)
                step = op.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _send(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise self._dead or MatchlockError("Matchlock process not running")
        try:
            writer.write(data)  # one write per line: lines never interleave
            await writer.drain()
        except (OSError, RuntimeError):
            raise self._dead or MatchlockError("Matchlock process not running") from None

    def _send_nowait(self, method: str, params: dict[str, Any]) -> None:
        """Queue a fire-and-forget line without awaiting (usable while being cancelled)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(self._proto.message(method, params))

    async def _send_quiet(self, method: str, params: dict[str, Any]) -> None:
        with contextlib.suppress(MatchlockError):
            await self._send(self._proto.message(method, params))

    async def _call(self, call: _ops.Call, timeout: float | None, io: _CallIO | None) -> Any:
        if self._dead is not None:
            raise self._dead
        if self._read_task is not None and asyncio.current_task() is self._read_task:
            raise MatchlockError("output writers run in the client's reader task and cannot "
                                 "await the client; spawn a task for that work")
        waiter = _Waiter(asyncio.get_running_loop(), io.sinks if io is not None else None)
        rid, line = self._proto.request(call.method, call.params, waiter)
        pumps: list[asyncio.Task[Any]] = []
        try:
            await self._send(line)
            if call.interactive:
                stdin = io.stdin if io is not None else None
                resize = io.resize if io is not None else None
                # As in Client: a list of sizes goes first, other iterables run alongside.
                lead = resize if isinstance(resize, (list, tuple)) else ()
                if resize is not None and not lead:
                    pumps.append(self._spawn(self._pump_resize(rid, waiter, resize),
                                             "matchlock-resize"))
                pumps.append(self._spawn(self._pump(call.method, rid, waiter, stdin, lead),
                                         "matchlock-stdin"))
            try:
                # Cancelling the future on timeout is fine: nobody else awaits it.
                result = await (waiter.future if timeout is None
                                else asyncio.wait_for(waiter.future, timeout))
            except TimeoutError:
                raise TimeoutError(
                    f"request {call.method} (id={rid}) timed out after {timeout}s") from None
        except BaseException:
            # Not answered (a timeout or task cancel cancels the future): stop it there too.
            if waiter.future.cancelled() or not waiter.future.done():
                self._proto.forget(rid)
                self._send_nowait("cancel", {"id": rid})
                waiter.future.cancel()
                waiter.ready.set()
            raise
        finally:
            for task in pumps:
                if not task.done():
                    task.cancel()
        if waiter.sink_error is not None:
            raise waiter.sink_error
        return result

    async def _pump(self, method: str, rid: int, waiter: _Waiter, stdin: Any,
                    lead: Any = ()) -> None:
        await waiter.ready.wait()
        if waiter.future.done():
            return
        await self._pump_resize(rid, waiter, lead)
        try:
            async for chunk in _achunks(stdin):
                if waiter.future.done():
                    return
                await self._send_quiet(f"{method}.stdin",
                                       {"id": rid, "data": _wire.b64encode(chunk)})
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failing stdin reads as end of input
            log.debug("stdin source raised", exc_info=True)
        if not waiter.future.done():
            await self._send_quiet(f"{method}.stdin_eof", {"id": rid})

    async def _pump_resize(self, rid: int, waiter: _Waiter, sizes: Any) -> None:
        await waiter.ready.wait()
        async for size in _aiter(sizes):
            if waiter.future.done():
                return
            if isinstance(size, (tuple, list)) and len(size) >= 2:
                await self._send_quiet("exec_tty.resize",
                                       {"id": rid, "rows": int(size[0]), "cols": int(size[1])})

    def pending_requests(self) -> dict[int, str]:
        return self._proto.pending()

    # network hook server

    async def _start_hooks(self, table: dict[str, LocalNetworkHook]) -> str:
        self._hook_dir, path = make_socket_dir()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_READ_TIMEOUT)
                decoded = decode_hook_request(line, table)
                if isinstance(decoded, bytes):
                    reply = decoded
                else:
                    hook, req = decoded
                    try:
                        reply = encode_hook_result(await call_maybe_async(hook.fn, req))
                    except Exception as e:  # noqa: BLE001 - the user's hook: report it
                        log.debug("network hook %r raised", hook.name, exc_info=True)
                        reply = encode_hook_error(str(e) or type(e).__name__)
                writer.write(reply)
                await writer.drain()
            except (OSError, TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError) as e:
                log.debug("network hook connection failed: %s", e)
            finally:
                writer.close()

        try:
            self._hook_server = await asyncio.start_unix_server(serve, path,
                                                                limit=MAX_HOOK_LINE + 1)
        except OSError:
            shutil.rmtree(self._hook_dir, ignore_errors=True)
            self._hook_dir = ""
            raise
        return path

    async def _stop_hooks(self) -> None:
        server, self._hook_server = self._hook_server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        if self._hook_dir:
            shutil.rmtree(self._hook_dir, ignore_errors=True)
            self._hook_dir = ""

    # CLI sub-commands

    async def _cli(self, what: str, args: list[str]) -> str:
        argv = [*self._config.cli_argv(), *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise MatchlockError(f"matchlock binary not found: {argv[0]!r}") from None
        out, err = await proc.communicate()
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if proc.returncode != 0:
            raise CLIError(what, proc.returncode or 1, argv, stdout, stderr)
        return stdout

    async def remove(self) -> None:
        vm_id = self._state.vm_id or self._state.last_vm_id
        if vm_id:
            await self._cli(f"rm {vm_id}", ["rm", vm_id])

    async def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        args = _wire.volume_create_args(name, size_mb)
        return _wire.parse_volume_create(await self._cli(f"volume create {name}", args), name,
                                         size_mb)

    async def volume_list(self) -> list[VolumeInfo]:
        return _wire.parse_volume_list(await self._cli("volume ls", ["volume", "ls", "--json"]))

    async def volume_remove(self, name: str) -> None:
        await self._cli(f"volume rm {name}", _wire.volume_remove_args(name))

    # VM

    async def create(self, opts: CreateOptions | None = None) -> str:
        plan = _ops.plan_create(opts)
        if self._attached:
            raise MatchlockError("an attached client drives an existing VM: create needs Client()")
        await self._stop_hooks()
        socket_path = await self._start_hooks(plan.network_hooks) if plan.network_hooks else None
        before = self._state.vm_id
        try:
            return await self._run(_ops.create(self._state, plan, socket_path))
        except BaseException:
            if self._state.vm_id == before:
                await self._stop_hooks()
            raise

    async def launch(self, sandbox: Sandbox) -> str:
        return await self.create(_ops.replace_launch(sandbox.options()))

    # exec

    async def exec(self, command: str, working_dir: str = "", timeout: float | None = None,
                   user: str = "") -> ExecResult:
        return await self._run(_ops.exec_(command, working_dir, user), timeout)

    async def exec_stream(self, command: str, stdout: Any = None, stderr: Any = None,
                          working_dir: str = "", timeout: float | None = None,
                          user: str = "") -> ExecStreamResult:
        return await self._run(_ops.exec_stream(command, working_dir, user), timeout,
                               _CallIO(stdout, stderr))

    async def exec_pipe(self, command: str, stdin: Any = None, stdout: Any = None,
                        stderr: Any = None, working_dir: str = "",
                        timeout: float | None = None, user: str = "") -> ExecPipeResult:
        return await self._run(_ops.exec_pipe(command, working_dir, user), timeout,
                               _CallIO(stdout, stderr, stdin))

    async def exec_interactive(self, command: str, stdin: Any = None, stdout: Any = None,
                               working_dir: str = "", rows: int = 24, cols: int = 80,
                               resize: Iterable[tuple[int, int]] | AsyncIterable[Any] | None = None,
                               timeout: float | None = None,
                               user: str = "") -> ExecInteractiveResult:
        return await self._run(_ops.exec_tty(command, working_dir, user, rows, cols), timeout,
                               _CallIO(stdout, None, stdin, resize))

    exec_tty = exec_interactive

    # files

    async def write_file(self, path: str, content: bytes | str, mode: int = 0o644,
                         timeout: float | None = None) -> None:
        await self._run(_ops.write_file(self._state, path, content, mode), timeout)

    async def read_file(self, path: str, timeout: float | None = None) -> bytes:
        return await self._run(_ops.read_file(self._state, path), timeout)

    async def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        return await self._run(_ops.list_files(self._state, path), timeout)

    # logs

    async def log(self, timeout: float | None = None) -> str:
        return await self._run(_ops.log(), timeout)

    async def log_stream(self, stdout: Any = None, timeout: float | None = None) -> None:
        await self._run(_ops.log_stream(), timeout, _CallIO(stdout))

    # network

    async def allow_list_add(self, *hosts: str) -> AllowListResult:
        return await self._run(_ops.allow_list_add(hosts))

    async def allow_list_delete(self, *hosts: str) -> AllowListResult:
        return await self._run(_ops.allow_list_delete(hosts))

    async def port_forward(self, *specs: str) -> list[PortForwardBinding]:
        return await self.port_forward_with_addresses(None, *specs)

    async def port_forward_with_addresses(self, addresses: list[str] | None,
                                          *specs: str) -> list[PortForwardBinding]:
        forwards = [_wire.parse_port_forward(s) for s in specs]
        return await self._run(_ops.port_forward(addresses, forwards))

    async def cancel(self, request_id: int) -> bool:
        return await self._run(_ops.cancel(request_id))


async def _logged(aw: Any, what: str) -> None:
    try:
        await aw
    except Exception:  # noqa: BLE001 - callbacks cannot change anything: log only
        log.debug("%s raised", what, exc_info=True)


async def _aiter(source: Any) -> Any:
    """Async iteration over an async or plain iterable (plain ones step in a thread,
    since a generator may block waiting for its next item)."""
    if hasattr(source, "__aiter__"):
        async for item in source:
            yield item
        return
    if isinstance(source, (list, tuple)):
        for item in source:
            yield item
        return
    it = iter(source)
    done = object()
    while True:
        item = await asyncio.to_thread(next, it, done)
        if item is done:
            return
        yield item


def _watchable_fd(source: Any) -> int | None:
    """The fd of a pipe, terminal or socket (pollable, so readable without a thread)."""
    fileno = getattr(source, "fileno", None)
    if fileno is None or sys.platform == "win32":
        return None
    try:
        fd = fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError):
        return None
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
        return int(fd)
    return None


async def _read_fd(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return os.read(fd, _inputs.CHUNK)


async def _achunks(source: Any) -> Any:
    """Async form of `_inputs.chunks`, plus asyncio.StreamReader and async iterables.
    Never blocks the loop: pipes/terminals are polled, other files read in a thread."""
    if _inputs.is_inline(source):
        for chunk in _inputs.chunks(source):
            yield chunk
        return
    read = getattr(source, "read", None)
    if read is not None and inspect.iscoroutinefunction(read):
        while data := _inputs.as_bytes(await read(_inputs.CHUNK)):
            yield data
        return
    if read is not None:
        fd = _watchable_fd(source)
        if fd is not None:
            while data := await _read_fd(fd):
                yield data
            return
        reader = _inputs.reader_of(source)
        while True:
            chunk = await asyncio.to_thread(reader, _inputs.CHUNK)
            if chunk is None:
                continue
            data = _inputs.as_bytes(chunk)
            if not data:
                return
            yield data
    async for chunk in _aiter(source):
        data = _inputs.as_bytes(chunk)
        if data:
            yield data
