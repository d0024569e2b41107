"""`Client`: the blocking, thread-safe SDK client.

One reader thread demultiplexes the server's lines (through the sans-I/O
`ClientProtocol`) to the waiting callers by request id; any number of threads may call
methods at once and their requests complete in whatever order the server answers.
What each method sends and parses lives in `_ops`, shared with `AsyncClient`."""

from __future__ import annotations

import inspect
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, TypeVar

from matchlock.sdk import _inputs, _ops, _wire
from matchlock.sdk._builder import Sandbox
from matchlock.sdk._config import Config, control_socket
from matchlock.sdk._errors import CLIError, MatchlockError, ProtocolError
from matchlock.sdk._hooks import LocalVFSHook, LocalVFSHooks, parse_event
from matchlock.sdk._hookserver import HookServer
from matchlock.sdk._protocol import STDERR, STDOUT, ClientProtocol, Completed, Output, Ready
from matchlock.sdk._sinks import Sink
from matchlock.sdk._transport import Transport, connect_socket, start_server
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

DEFAULT_CLOSE_TIMEOUT = 2.0  # seconds the server gets to stop the VM (as the reference)


class _Waiter:
    """One in-flight request, as the reader thread and the caller see it."""

    __slots__ = ("done", "ready", "result", "error", "sinks", "sink_error")

    def __init__(self, sinks: dict[int, Sink] | None = None, interactive: bool = False) -> None:
        self.done = threading.Event()
        self.ready = threading.Event() if interactive else self.done
        self.result: Any = None
        self.error: BaseException | None = None
        self.sinks = sinks or {}
        self.sink_error: BaseException | None = None

    def deliver(self, stream: int, data: bytes) -> None:
        sink = self.sinks.get(stream)
        if sink is None or self.sink_error is not None:
            return
        try:
            _no_awaitable(sink.write(data), "output writer")
        except Exception as e:  # noqa: BLE001 - re-raised to the caller when the call ends
            self.sink_error = e

    def finish(self, result: Any, error: BaseException | None) -> None:
        for sink in self.sinks.values():
            try:
                _no_awaitable(sink.close(), "output writer")
            except Exception as e:  # noqa: BLE001
                self.sink_error = self.sink_error or e
        self.result, self.error = result, error
        self.done.set()
        self.ready.set()  # wake input pumps waiting for a `ready` that will never come


def _no_awaitable(value: Any, what: str) -> Any:
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()
        raise TypeError(f"{what} returned an awaitable: use AsyncClient for async callbacks")
    return value


class _CallIO:
    __slots__ = ("sinks", "stdin", "resize")

    def __init__(self, stdout: Any = None, stderr: Any = None, stdin: Any = None,
                 resize: Iterable[tuple[int, int]] | None = None) -> None:
        self.sinks = {k: Sink(v) for k, v in ((STDOUT, stdout), (STDERR, stderr))
                      if v is not None}
        self.stdin = stdin
        self.resize = resize


class Client:
    """Blocking client for one sandbox. Thread-safe; use as a context manager.

    `Client()` starts `$MATCHLOCK_BIN rpc` (or this package's CLI) on first use;
    `Client.attach(vm_id)` drives a VM that is already running. `on_event` (extension)
    is called with every `Event` the server sends, on the reader thread."""

    def __init__(self, config: Config | None = None, *,
                 on_event: Callable[[Event], Any] | None = None) -> None:
        self._config = config if config is not None else Config.from_env()
        self._on_event = on_event
        self._proto: ClientProtocol[_Waiter] = ClientProtocol()
        self._lock = threading.Lock()  # guards _proto and the lifecycle fields below
        self._transport: Transport | None = None
        self._reader: threading.Thread | None = None
        self._attached = False
        self._closed = False
        self._dead: MatchlockError | None = None
        self._state = _ops.ClientState()
        self._hooks: HookServer | None = None
        self._safe_hooks_running = False

    # lifecycle

    @classmethod
    def attach(cls, vm_id: str, config: Config | None = None, *,
               on_event: Callable[[Event], Any] | None = None) -> Client:
        """Connect to a running VM's control socket (a VM started by `matchlock run -d`,
        another client, ...). `close()` then only disconnects: the VM keeps running."""
        client = cls(config, on_event=on_event)
        transport = connect_socket(control_socket(vm_id))
        client._attached = True
        client._state.vm_id = client._state.last_vm_id = vm_id
        client._begin(transport)
        return client

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.close()

    @property
    def vm_id(self) -> str | None:
        return self._state.vm_id

    def start(self) -> None:
        """Start the server process (done implicitly by the first request)."""
        with self._lock:
            if self._closed:
                raise MatchlockError("client is closed")
            if self._transport is not None:
                return
            self._begin(start_server(self._config))

    def _begin(self, transport: Transport) -> None:
        self._transport = transport
        self._reader = threading.Thread(target=self._read_loop, name="matchlock-rpc-reader",
                                        daemon=True)
        self._reader.start()

    def close(self, timeout: float = 0) -> None:
        """Stop the VM and the server: `close` with `timeout` seconds of grace (0 means
        2 s), then EOF, then SIGKILL if the server is still there `timeout` s later.
        For an attached client: disconnect only. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            transport = self._transport
        self._state.last_vm_id = self._state.vm_id or self._state.last_vm_id
        self._state.vfs = LocalVFSHooks()
        self._stop_hooks()
        if transport is None:
            return
        grace = timeout if timeout and timeout > 0 else DEFAULT_CLOSE_TIMEOUT
        if not self._attached and self._dead is None:
            try:
                self._call(_ops.Call("close", {"timeout_seconds": grace}), grace + 1.0, None)
            except Exception as e:  # noqa: BLE001 - closing anyway, as the reference does
                log.debug("close request failed: %s", e)
        transport.close_input()
        if not transport.wait(grace):
            transport.kill()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
            if self._reader.is_alive():
                # Something still holds the server's stdout open: leave the fds to the
                # daemon reader rather than close them under it.
                log.warning("matchlock rpc output still open after close")
                return
        transport.close()

    def _stop_hooks(self) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.close()

    # the reader thread

    def _read_loop(self) -> None:
        transport = self._transport
        assert transport is not None
        failure: MatchlockError | None = None
        try:
            while True:
                data = transport.recv()
                if not data:
                    break
                with self._lock:
                    events = self._proto.receive_data(data)
                for ev in events:
                    self._dispatch(ev)
        except ProtocolError as e:
            failure = e
        except OSError as e:
            failure = MatchlockError(f"Matchlock connection failed: {e}")
        except Exception as e:  # noqa: BLE001 - never leave callers waiting forever
            log.exception("matchlock SDK reader failed")
            failure = ProtocolError(f"SDK reader failed: {type(e).__name__}: {e}")
        if failure is None and self._closed:
            failure = MatchlockError("client is closed")
        elif failure is None:
            why = transport.why_closed()
            failure = MatchlockError("Matchlock process closed unexpectedly"
                                     + (f" ({why})" if why else ""))
        with self._lock:
            self._dead = failure
            waiters = self._proto.connection_lost()
        for w in waiters:
            w.finish(None, failure)
        if isinstance(failure, ProtocolError):
            transport.kill()
        self._stop_hooks()

    def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, Output):
            ev.waiter.deliver(ev.stream, ev.data)
        elif isinstance(ev, Completed):
            ev.waiter.finish(ev.result, ev.error)
        elif isinstance(ev, Ready):
            if ev.waiter.ready is not ev.waiter.done:  # only exec_pipe/exec_tty wait for it
                ev.waiter.ready.set()
        else:
            self._on_server_event(ev.params)

    def _on_server_event(self, params: dict[str, Any]) -> None:
        event = parse_event(params)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - a listener's bug must not kill the reader
                log.exception("on_event callback raised")
        if event.file is not None:
            self._run_after_hooks(event.file)

    def _run_after_hooks(self, event: VFSHookEvent) -> None:
        dangerous, safe = self._state.vfs.after_hooks(event)
        for hook in dangerous:  # may call back into the client: never on the reader
            threading.Thread(target=self._call_hook, args=(hook, self, event),
                             daemon=True).start()
        if not safe:
            return
        with self._lock:
            if self._safe_hooks_running:
                return  # suppress recursion: events caused by a safe hook are dropped
            self._safe_hooks_running = True

        def run() -> None:
            try:
                for hook in safe:
                    self._call_hook(hook, event)
            finally:
                with self._lock:
                    self._safe_hooks_running = False

        threading.Thread(target=run, daemon=True).start()

    @staticmethod
    def _call_hook(hook: LocalVFSHook, *args: Any) -> None:
        try:
            _no_awaitable(hook.fn(*args), "vfs hook")
        except Exception:  # noqa: BLE001 - after-hooks cannot change anything: log only
            log.debug("vfs hook %r raised", hook.name, exc_info=True)

    # driving operations

    def _run(self, op: _ops.Op[T], timeout: float | None = None,
             io: _CallIO | None = None) -> T:
        if self._closed:
            raise MatchlockError("client is closed")
        if self._transport is None:
            self.start()
        try:
            step = next(op)
            while True:
                if isinstance(step, _ops.Invoke):
                    value = _no_awaitable(step.fn(*step.args), "hook")
                else:
                    value = self._call(step, timeout, io)
                step = op.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            raise MatchlockError("Matchlock process not running")
        try:
            transport.send(data)
        except OSError:
            raise self._dead or MatchlockError("Matchlock process not running") from None

    def _send_quiet(self, method: str, params: dict[str, Any]) -> None:
        with self._lock:
            line = self._proto.message(method, params)
        try:
            self._send(line)
        except MatchlockError:
            pass

    def _call(self, call: _ops.Call, timeout: float | None, io: _CallIO | None) -> Any:
        if threading.current_thread() is self._reader:
            # The reader would wait for an answer only it can read.
            raise MatchlockError("output writers and on_event callbacks run on the client's "
                                 "reader thread and cannot call the client; hand the work "
                                 "to another thread")
        waiter = _Waiter(io.sinks if io is not None else None, call.interactive)
        with self._lock:
            if self._dead is not None:
                raise self._dead
            rid, line = self._proto.request(call.method, call.params, waiter)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._send(line)
            if call.interactive:
                self._start_input(call.method, rid, waiter, io, deadline)
            finished = waiter.done.wait(_remaining(deadline))
        except BaseException:
            if not waiter.done.is_set():
                self._abandon(rid)  # e.g. KeyboardInterrupt: stop the server's work too
            raise
        if not finished:
            self._abandon(rid)
            raise TimeoutError(f"request {call.method} (id={rid}) timed out after {timeout}s")
        if waiter.error is not None:
            raise waiter.error
        if waiter.sink_error is not None:
            raise waiter.sink_error
        return waiter.result

    def _abandon(self, rid: int) -> None:
        with self._lock:
            self._proto.forget(rid)
        self._send_quiet("cancel", {"id": rid})

    def _start_input(self, method: str, rid: int, waiter: _Waiter, io: _CallIO | None,
                     deadline: float | None) -> None:
        stdin = io.stdin if io is not None else None
        resize = io.resize if io is not None else None
        # A list of sizes is sent right after `ready`, before any input (deterministic);
        # any other iterable may block between items, so it gets a thread of its own.
        lead = resize if isinstance(resize, (list, tuple)) else ()
        if resize is not None and not lead:
            threading.Thread(target=self._pump_resize, args=(rid, waiter, resize),
                             daemon=True).start()
        if _inputs.is_inline(stdin):  # nothing can block: send from the caller's thread
            if waiter.ready.wait(_remaining(deadline)) and not waiter.done.is_set():
                self._pump(method, rid, waiter, stdin, lead)
            return
        # A stream may block on its reader: never on the caller's thread.
        threading.Thread(target=self._pump, args=(method, rid, waiter, stdin, lead),
                         daemon=True).start()

    def _pump(self, method: str, rid: int, waiter: _Waiter, stdin: Any,
              lead: Iterable[tuple[int, int]] = ()) -> None:
        waiter.ready.wait()
        if waiter.done.is_set():
            return
        self._pump_resize(rid, waiter, lead)
        try:
            for chunk in _inputs.chunks(stdin):
                if waiter.done.is_set():
                    return
                self._send_quiet(f"{method}.stdin", {"id": rid, "data": _wire.b64encode(chunk)})
        except Exception:  # noqa: BLE001 - a failing stdin reads as end of input
            log.debug("stdin source raised", exc_info=True)
        if not waiter.done.is_set():
            self._send_quiet(f"{method}.stdin_eof", {"id": rid})

    def _pump_resize(self, rid: int, waiter: _Waiter,
                     sizes: Iterable[tuple[int, int]]) -> None:
        waiter.ready.wait()
        for size in sizes:
            if waiter.done.is_set():
                return
            if isinstance(size, (tuple, list)) and len(size) >= 2:
                self._send_quiet("exec_tty.resize",
                                 {"id": rid, "rows": int(size[0]), "cols": int(size[1])})

    def pending_requests(self) -> dict[int, str]:
        """Extension: in-flight request ids and their methods (for `cancel`)."""
        with self._lock:
            return self._proto.pending()

    # CLI sub-commands

    def _cli(self, what: str, args: list[str]) -> str:
        argv = [*self._config.cli_argv(), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise MatchlockError(f"matchlock binary not found: {argv[0]!r}") from None
        if proc.returncode != 0:
            raise CLIError(what, proc.returncode, argv, proc.stdout, proc.stderr)
        return proc.stdout

    def remove(self) -> None:
        """`matchlock rm` the (closed) VM's state."""
        vm_id = self._state.vm_id or self._state.last_vm_id
        if vm_id:
            self._cli(f"rm {vm_id}", ["rm", vm_id])

    def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        args = _wire.volume_create_args(name, size_mb)
        return _wire.parse_volume_create(self._cli(f"volume create {name}", args), name,
                                         size_mb)

    def volume_list(self) -> list[VolumeInfo]:
        return _wire.parse_volume_list(self._cli("volume ls", ["volume", "ls", "--json"]))

    def volume_remove(self, name: str) -> None:
        self._cli(f"volume rm {name}", _wire.volume_remove_args(name))

    # VM

    def create(self, opts: CreateOptions | None = None) -> str:
        """Boot a VM; returns its id. Applies `opts.port_forwards` afterwards."""
        plan = _ops.plan_create(opts)
        if self._attached:
            raise MatchlockError("an attached client drives an existing VM: create needs Client()")
        self._stop_hooks()
        socket_path = None
        if plan.network_hooks:
            self._hooks = HookServer(plan.network_hooks)
            socket_path = self._hooks.path
        before = self._state.vm_id
        try:
            return self._run(_ops.create(self._state, plan, socket_path))
        except BaseException:
            if self._state.vm_id == before:  # no VM came up: nobody will call the hooks
                self._stop_hooks()
            raise

    def launch(self, sandbox: Sandbox) -> str:
        """`create` from a builder, starting the image's ENTRYPOINT/CMD detached."""
        return self.create(_ops.replace_launch(sandbox.options()))

    # exec

    def exec(self, command: str, working_dir: str = "", timeout: float | None = None,
             user: str = "") -> ExecResult:
        """Run `sh -c command` and return its buffered output. A non-zero exit is a
        result, not an error. `timeout`: cancel the command and raise TimeoutError."""
        return self._run(_ops.exec_(command, working_dir, user), timeout)

    def exec_stream(self, command: str, stdout: IO[Any] | Any = None,
                    stderr: IO[Any] | Any = None, working_dir: str = "",
                    timeout: float | None = None, user: str = "") -> ExecStreamResult:
        """Run a command, writing its output as it comes to `stdout`/`stderr` (text
        streams get UTF-8 text, binary streams and callables the exact bytes)."""
        return self._run(_ops.exec_stream(command, working_dir, user), timeout,
                         _CallIO(stdout, stderr))

    def exec_pipe(self, command: str, stdin: Any = None, stdout: Any = None,
                  stderr: Any = None, working_dir: str = "", timeout: float | None = None,
                  user: str = "") -> ExecPipeResult:
        """Run a command with `stdin` (bytes, str, a file or an iterable of chunks) fed
        to it, then EOF; output streams as in `exec_stream`."""
        return self._run(_ops.exec_pipe(command, working_dir, user), timeout,
                         _CallIO(stdout, stderr, stdin))

    def exec_interactive(self, command: str, stdin: Any = None, stdout: Any = None,
                         working_dir: str = "", rows: int = 24, cols: int = 80,
                         resize: Iterable[tuple[int, int]] | None = None,
                         timeout: float | None = None,
                         user: str = "") -> ExecInteractiveResult:
        """Run a command on a PTY (stdout and stderr merged); `resize` yields
        `(rows, cols)` pairs to apply while it runs."""
        return self._run(_ops.exec_tty(command, working_dir, user, rows, cols), timeout,
                         _CallIO(stdout, None, stdin, resize))

    exec_tty = exec_interactive

    # files

    def write_file(self, path: str, content: bytes | str, mode: int = 0o644,
                   timeout: float | None = None) -> None:
        self._run(_ops.write_file(self._state, path, content, mode), timeout)

    def read_file(self, path: str, timeout: float | None = None) -> bytes:
        return self._run(_ops.read_file(self._state, path), timeout)

    def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        return self._run(_ops.list_files(self._state, path), timeout)

    # logs

    def log(self, timeout: float | None = None) -> str:
        """The VM's log (console and entrypoint output) so far."""
        return self._run(_ops.log(), timeout)

    def log_stream(self, stdout: Any = None, timeout: float | None = None) -> None:
        """Follow the VM log into `stdout` until cancelled or `timeout` (TimeoutError)."""
        self._run(_ops.log_stream(), timeout, _CallIO(stdout))

    # network

    def allow_list_add(self, *hosts: str) -> AllowListResult:
        """Extension: add hosts to the running VM's allow-list."""
        return self._run(_ops.allow_list_add(hosts))

    def allow_list_delete(self, *hosts: str) -> AllowListResult:
        """Extension: remove hosts from the running VM's allow-list."""
        return self._run(_ops.allow_list_delete(hosts))

    def port_forward(self, *specs: str) -> list[PortForwardBinding]:
        """Forward `"[LOCAL:]REMOTE"` ports on 127.0.0.1 (replaces earlier forwards)."""
        return self.port_forward_with_addresses(None, *specs)

    def port_forward_with_addresses(self, addresses: list[str] | None,
                                    *specs: str) -> list[PortForwardBinding]:
        forwards = [_wire.parse_port_forward(s) for s in specs]
        return self._run(_ops.port_forward(addresses, forwards))

    # cancellation

    def cancel(self, request_id: int) -> bool:
        """Extension: cancel an in-flight request (see `pending_requests`); True if the
        server had it. The cancelled call raises RPCError (code CANCELLED)."""
        return self._run(_ops.cancel(request_id))


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())

