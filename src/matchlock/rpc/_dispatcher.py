"""The one request dispatcher (spec/rpc-protocol.md §1.4-§2): the control socket and
`matchlock rpc` both put a `Session` on their transport.

Transport-agnostic: a `Session` takes whole lines (`handle_line`) and hands bytes to an
async `send` that the transport makes wait while its buffer is full. So a slow client
holds back only its own requests (and, through the channel's credit, the guest processes
feeding them); a client that goes away (`shutdown`) cancels what it started.

Dispatch (§1.4): `cancel` and the exec input methods inline, in order; `create` and
`close` inline after the requests in flight; everything else one task per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from matchlock._aio import spawn
from matchlock.errors import ErrorCode, MatchlockError, UsageError
from matchlock.rpc._codec import (
    Invalid,
    Raw,
    Request,
    b64,
    decode_request,
    encode_data,
    encode_error,
    encode_notification,
    encode_raw,
    encode_result,
    unb64,
)
from matchlock.sandbox import ExecRequest, ExecResult, PortSpec, Process

log = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[None]]

STDIN_QUEUE = 64  # chunks queued per exec before the session's reader waits (as the reference)
MAX_BUFFERED_OUTPUT = 64 << 20  # `exec` buffers output in memory: cap it (use exec_stream)
LOG_POLL_S = 0.1
CANCELLED_MESSAGE = "context canceled"


class Target(Protocol):
    """What a session drives: one VM (the supervisor, or `matchlock rpc`'s VM)."""

    vm_id: str | None

    async def create(self, params: dict[str, Any]) -> str: ...
    async def exec(self, request: ExecRequest) -> Process: ...
    async def allow_list_add(self, hosts: Sequence[str]) -> dict[str, Any]: ...
    async def allow_list_delete(self, hosts: Sequence[str]) -> dict[str, Any]: ...
    async def port_forward(self, forwards: Sequence[PortSpec],
                           addresses: Sequence[str]) -> list[dict[str, Any]]: ...
    async def write_file(self, path: str, data: bytes, mode: int) -> None: ...
    async def read_file(self, path: str) -> bytes: ...
    async def list_files(self, path: str) -> list[dict[str, Any]]: ...
    def log_paths(self) -> Sequence[Path]: ...
    def events(self) -> AsyncIterator[dict[str, Any]]: ...
    async def close(self, timeout: float) -> None: ...
    def info(self) -> dict[str, Any]: ...


def _str(params: dict, key: str) -> str | None:
    v = params.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise UsageError(f"{key} must be a string")
    return v


def _int(params: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key)
    if v is None or v == 0:
        return default
    if type(v) is not int or not lo <= v <= hi:
        raise UsageError(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def exec_request(params: dict, *, tty: bool, stdin: bool) -> ExecRequest:
    """`command` (a shell string, as the reference) or `argv` (a list, ours), plus
    `working_dir`, `user`, `env` (a map), `rows`/`cols`, `term`."""
    argv = params.get("argv")
    command = params.get("command")
    if argv is not None:
        if not isinstance(argv, list) or not argv or \
                not all(isinstance(a, str) for a in argv):
            raise UsageError("argv must be a non-empty list of strings")
        shell, argv_t = None, tuple(argv)
    elif isinstance(command, str) and command.strip():
        shell, argv_t = command, ()
    else:
        raise UsageError("command is required")
    env = params.get("env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str)
            for k, v in env.items()):
        raise UsageError("env must be a map of variable names to strings")
    return ExecRequest(
        argv=argv_t, shell=shell, env=tuple(env.items()), cwd=_str(params, "working_dir"),
        user=_str(params, "user"), tty=tty, stdin=stdin,
        rows=_int(params, "rows", 24, 1, 65535), cols=_int(params, "cols", 80, 1, 65535),
        term=_str(params, "term") or "xterm",
    )


def _hosts(params: dict) -> list[str]:
    hosts = params.get("hosts")
    if isinstance(hosts, str):
        hosts = [hosts]
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise UsageError("hosts is required")
    out = list(dict.fromkeys(p.strip() for h in hosts for p in h.split(",") if p.strip()))
    if not out:
        raise UsageError("hosts is required")
    return out


def _result(res: ExecResult) -> dict[str, Any]:
    out: dict[str, Any] = {"exit_code": res.exit_code, "duration_ms": res.duration_ms}
    if res.signal is not None:
        out["signal"] = res.signal
    if res.error is not None:
        out["error"] = res.error
    return out


class _Input:
    """Stdin and resizes for one exec_pipe/exec_tty, fed by the input methods."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(STDIN_QUEUE)
        self.task = spawn(self._pump(), name="rpc-stdin")

    async def _pump(self) -> None:
        try:
            while (chunk := await self.queue.get()) is not None:
                await self.proc.write(chunk)
            await self.proc.close_stdin()
        except MatchlockError as e:
            log.debug("stdin pump stopped: %s", e)

    def close(self) -> None:
        self.task.cancel()


INPUT_METHODS = frozenset({"exec_pipe.stdin", "exec_pipe.stdin_eof", "exec_tty.stdin",
                           "exec_tty.stdin_eof", "exec_tty.resize"})
INLINE_WAITING = frozenset({"create", "close"})
NEEDS_ID = frozenset({"exec_pipe", "exec_tty", "log_stream"})


class Session:
    """One client's conversation with a Target."""

    def __init__(self, target: Target, send: Send) -> None:
        self.target = target
        self._send = send
        self._tasks: dict[int | None, set[asyncio.Task]] = {}
        self._by_id: dict[int, asyncio.Task] = {}
        self._inputs: dict[int, _Input] = {}
        self._closed = False
        self._event_task: asyncio.Task | None = None  # `event` notifications after create
        self._handlers: dict[str, Callable[[Request], Awaitable[dict[str, Any]]]] = {
            "create": self._create,
            "exec": self._exec,
            "exec_stream": lambda r: self._exec_streamed(r, "exec_stream"),
            "exec_pipe": lambda r: self._exec_streamed(r, "exec_pipe"),
            "exec_tty": lambda r: self._exec_streamed(r, "exec_tty"),
            "write_file": self._write_file,
            "read_file": self._read_file,
            "list_files": self._list_files,
            "log": self._log,
            "log_stream": self._log_stream,
            "allow_list_add": self._allow_list_add,
            "allow_list_delete": self._allow_list_delete,
            "port_forward": self._port_forward,
            "close": self._close,
            "events": self._events,  # ours: `event` notifications until cancelled
            "info": self._info,  # ours: the VM id and status
        }

    @property
    def closed(self) -> bool:
        return self._closed

    # -- input side ----------------------------------------------------------------------

    async def handle_line(self, line: bytes) -> bool:
        """Dispatch one line; False once the session is done reading (after `close`)."""
        if self._closed:
            return False
        msg = decode_request(line)
        if isinstance(msg, Invalid):
            await self._send(encode_error(None, ErrorCode.PARSE_ERROR, "Parse error"))
            return True
        if msg.method == "cancel":
            await self._cancel(msg)
        elif msg.method in INPUT_METHODS:
            await self._input(msg)
        elif msg.method in INLINE_WAITING:
            await self._settle(msg)
            await self._respond(msg, self._handlers[msg.method])
        else:
            handler = self._handlers.get(msg.method)
            if handler is None:
                await self._send(encode_error(msg.id, ErrorCode.METHOD_NOT_FOUND,
                                              "Method not found"))
            elif msg.method in NEEDS_ID and msg.id is None:
                await self._send(encode_error(None, ErrorCode.INVALID_REQUEST,
                                              f"{msg.method} requires request id"))
            else:
                task = spawn(self._respond(msg, handler), name=f"rpc-{msg.method}")
                self._tasks.setdefault(msg.id, set()).add(task)
                if msg.id is not None:
                    self._by_id[msg.id] = task
                task.add_done_callback(lambda t, rid=msg.id: self._forget(rid, t))
        return not self._closed

    def _forget(self, rid: int | None, task: asyncio.Task) -> None:
        tasks = self._tasks.get(rid)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._tasks[rid]
        if rid is not None and self._by_id.get(rid) is task:
            del self._by_id[rid]

    def _inflight(self) -> list[asyncio.Task]:
        return [t for ts in self._tasks.values() for t in ts]

    async def _settle(self, msg: Request) -> None:
        """Before create/close: let the requests in flight finish (close: within its
        timeout, then they are cancelled)."""
        tasks = self._inflight()
        if not tasks:
            return
        timeout = None
        if msg.method == "close":
            t = msg.params.get("timeout_seconds")
            timeout = float(t) if isinstance(t, int | float) and t > 0 else 0.0
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _cancel(self, msg: Request) -> None:
        target = msg.params.get("id", 0)
        if target is not None and type(target) is not int:
            await self._send(encode_error(msg.id, ErrorCode.INVALID_PARAMS,
                                          "id must be an integer"))
            return
        task = self._by_id.get(target) if target is not None else None
        cancelled = task is not None and not task.done()
        if cancelled:
            task.cancel()
        await self._send(encode_result(msg.id, {"cancelled": cancelled}))

    async def handle_raw(self, raw: Raw) -> None:
        """A raw-payload message (ours): only exec stdin takes one."""
        if self._closed or raw.method not in ("exec_pipe.stdin", "exec_tty.stdin"):
            return
        inp = self._inputs.get(raw.id)
        if inp is not None and raw.data:
            await inp.queue.put(raw.data)

    async def _input(self, msg: Request) -> None:
        """stdin / stdin_eof / resize: never answered; unknown targets are ignored."""
        target = msg.params.get("id")
        inp = self._inputs.get(target) if type(target) is int else None
        if inp is None:
            return
        if msg.method.endswith(".resize"):
            rows, cols = msg.params.get("rows"), msg.params.get("cols")
            if type(rows) is int and type(cols) is int:
                spawn(inp.proc.resize(rows, cols), name="rpc-resize")
            return
        if msg.method.endswith(".stdin_eof"):
            await inp.queue.put(None)
            return
        try:
            data = unb64(msg.params.get("data"))
        except ValueError:
            return
        if data:
            await inp.queue.put(data)

    async def _respond(self, msg: Request,
                       handler: Callable[[Request], Awaitable[dict[str, Any]]]) -> None:
        try:
            result = await handler(msg)
        except asyncio.CancelledError:
            if self._closed and msg.method != "close":
                raise  # the session is being torn down: nobody to answer
            line = encode_error(msg.id, ErrorCode.CANCELLED, CANCELLED_MESSAGE)
        except MatchlockError as e:
            line = encode_error(msg.id, e.code, str(e))
        except Exception as e:  # noqa: BLE001 - one request must not take the session down
            log.exception("rpc %s failed", msg.method)
            line = encode_error(msg.id, ErrorCode.INTERNAL_ERROR,
                                f"internal error: {type(e).__name__}: {e}")
        else:
            line = encode_result(msg.id, result)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(line)

    async def shutdown(self) -> None:
        """The client went away: cancel everything it started."""
        self._closed = True
        self._stop_events()
        tasks = self._inflight()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for inp in self._inputs.values():
            inp.close()

    # -- handlers ------------------------------------------------------------------------

    async def _create(self, msg: Request) -> dict[str, Any]:
        vm_id = await self.target.create(msg.params)
        # Subscribed before the answer goes out: no event of the new VM is missed.
        events = self.target.events()
        self._event_task = spawn(self._forward(events), name="rpc-events")
        return {"id": vm_id}

    async def _forward(self, events: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for ev in events:
                await self._send(encode_notification("event", ev))
        except (ConnectionError, RuntimeError):
            pass  # the client is gone
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # unsubscribe (a hub subscription)

    def _stop_events(self) -> None:
        if self._event_task is not None:
            self._event_task.cancel()
            self._event_task = None

    async def _info(self, msg: Request) -> dict[str, Any]:
        return self.target.info()

    async def _exec(self, msg: Request) -> dict[str, Any]:
        proc = await self.target.exec(exec_request(msg.params, tty=False, stdin=False))
        out = {1: bytearray(), 2: bytearray()}
        try:
            while (chunk := await proc.read()) is not None:
                fd, data = chunk
                if len(out[1]) + len(out[2]) + len(data) > MAX_BUFFERED_OUTPUT:
                    await proc.cancel()
                    raise UsageError(f"output exceeds {MAX_BUFFERED_OUTPUT} bytes: "
                                     "use exec_stream")
                out[fd] += data
            res = await proc.wait()
        except asyncio.CancelledError:
            spawn(proc.cancel(), name="rpc-cancel")
            raise
        return {"exit_code": res.exit_code, "stdout": b64(bytes(out[1])),
                "stderr": b64(bytes(out[2])), "duration_ms": res.duration_ms,
                **{k: v for k, v in _result(res).items() if k in ("signal", "error")}}

    async def _exec_streamed(self, msg: Request, mode: str) -> dict[str, Any]:
        interactive = mode != "exec_stream"
        tty = mode == "exec_tty"
        proc = await self.target.exec(exec_request(msg.params, tty=tty, stdin=interactive))
        inp = None
        names = {1: f"{mode}.stdout", 2: f"{mode}.stdout" if tty else f"{mode}.stderr"}
        encode = encode_raw if msg.params.get("raw") is True else encode_data
        try:
            if interactive:
                assert msg.id is not None
                # Registered before `ready`: clients send input only after it.
                inp = self._inputs[msg.id] = _Input(proc)
                await self._send(encode_notification(f"{mode}.ready", {"id": msg.id}))
            rid = msg.id if msg.id is not None else 0
            while (chunk := await proc.read()) is not None:
                fd, data = chunk
                await self._send(encode(names[fd], rid, data))
            return _result(await proc.wait())
        except BaseException:
            # Cancelled, or the client is gone: stop the process (its group), not the VM.
            spawn(proc.cancel(), name="rpc-cancel")
            raise
        finally:
            if inp is not None:
                inp.close()
                self._inputs.pop(msg.id, None)  # type: ignore[arg-type]

    async def _write_file(self, msg: Request) -> dict[str, Any]:
        path = _str(msg.params, "path")
        if path is None:
            raise UsageError("path is required")
        try:
            data = unb64(msg.params.get("content", ""))
        except ValueError:
            raise UsageError("invalid base64 content") from None
        mode = _int(msg.params, "mode", 0o644, 0, 0o7777)
        await self.target.write_file(path, data, mode)
        return {}

    async def _read_file(self, msg: Request) -> dict[str, Any]:
        path = _str(msg.params, "path")
        if path is None:
            raise UsageError("path is required")
        return {"content": b64(await self.target.read_file(path))}

    async def _list_files(self, msg: Request) -> dict[str, Any]:
        path = _str(msg.params, "path")
        if path is None:
            raise UsageError("path is required")
        return {"files": await self.target.list_files(path)}

    async def _log(self, msg: Request) -> dict[str, Any]:
        def read() -> bytes:
            parts = []
            for p in self.target.log_paths():
                with contextlib.suppress(FileNotFoundError):
                    parts.append(p.read_bytes())
            return b"".join(parts)

        return {"content": b64(await asyncio.to_thread(read))}

    async def _log_stream(self, msg: Request) -> dict[str, Any]:
        assert msg.id is not None
        offsets: dict[Path, int] = {}
        while True:
            for path in self.target.log_paths():
                chunk, offsets[path] = await asyncio.to_thread(_read_from, path,
                                                               offsets.get(path, 0))
                if chunk:
                    await self._send(encode_data("log_stream.data", msg.id, chunk))
            await asyncio.sleep(LOG_POLL_S)

    async def _allow_list_add(self, msg: Request) -> dict[str, Any]:
        return await self.target.allow_list_add(_hosts(msg.params))

    async def _allow_list_delete(self, msg: Request) -> dict[str, Any]:
        return await self.target.allow_list_delete(_hosts(msg.params))

    async def _port_forward(self, msg: Request) -> dict[str, Any]:
        forwards = msg.params.get("forwards")
        if not isinstance(forwards, list) or not forwards:
            raise UsageError("forwards is required")
        specs = []
        for f in forwards:
            if not isinstance(f, dict):
                raise UsageError("forwards must be a list of {local_port, remote_port}")
            specs.append(PortSpec(f.get("local_port"), f.get("remote_port")))  # type: ignore[arg-type]
        addresses = msg.params.get("addresses") or ["127.0.0.1"]
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise UsageError("addresses must be a list of strings")
        return {"bindings": await self.target.port_forward(specs, addresses)}

    async def _events(self, msg: Request) -> dict[str, Any]:
        async for ev in self.target.events():
            await self._send(encode_notification("event", ev))
        return {}

    async def _close(self, msg: Request) -> dict[str, Any]:
        t = msg.params.get("timeout_seconds")
        timeout = float(t) if isinstance(t, int | float) and t >= 0 else 0.0
        try:
            await self.target.close(timeout)
        finally:
            self._closed = True
            self._stop_events()
        return {}


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                offset = 0  # truncated: start over
            f.seek(offset)
            data = f.read(1 << 20)
    except FileNotFoundError:
        return b"", 0
    return data, offset + len(data)


__all__ = ["Session", "Target", "exec_request"]
