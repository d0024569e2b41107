"""`matchlock exec`: run a command in a running VM, through its control socket.

A small single-threaded event loop over `select` (no asyncio: start-up time is most of
an `exec`'s cost): the socket is non-blocking with an outgoing buffer, so input is only
read while the buffer is small and output is always drained, and a command that echoes
its stdin never deadlocks. Output is written to stdout/stderr with blocking writes: a
slow reader holds back this client, the supervisor then holds back the guest process.

Signals: SIGINT/SIGTERM send `cancel` (the guest stops the process's group: SIGTERM,
SIGKILL 5 s later; the VM stays up); a second one, or no answer within
`CANCEL_WAIT_S`, ends the client. In `-it` mode Ctrl-C is a byte for the guest's PTY.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import sys
import time

from matchlock._fdio import write_all
from matchlock.errors import Cancelled, UsageError, VmNotFound, VmNotRunning
from matchlock.rpc._codec import (
    FrameDecoder,
    Notification,
    Raw,
    Response,
    decode_server_line,
    encode_raw,
    encode_request,
)

TYPE_CHECKING = False  # no typing import on the exec start-up path
if TYPE_CHECKING:
    from typing import Any

STDIN_CHUNK = 1 << 16
MAX_PENDING_OUT = 1 << 18  # stdin bytes queued for the socket before stdin is paused
CANCEL_WAIT_S = 8.0  # the guest SIGKILLs after 5 s; then the answer comes
EXEC_ID, CANCEL_ID = 1, 2


class ExecClient:
    def __init__(self, vm_id: str, sock, method: str, params: dict[str, Any], *,  # noqa: ANN001
                 stdin: bool, tty: bool) -> None:
        self.vm_id = vm_id
        self.sock = sock
        self.method = method
        self.params = params
        self.stdin_open = stdin
        self.tty = tty
        # "raw": output and stdin travel as raw payloads, not base64 (codec docstring).
        self._out = bytearray(encode_request(method, {**params, "raw": True}, EXEC_ID))
        self._dec = FrameDecoder()
        self._ready = False
        self._signals: list[int] = []
        self._cancel_sent = False
        self._deadline: float | None = None
        self.interrupted = 0

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, sig: int, _frame: object) -> None:
        self._signals.append(sig)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGWINCH:
                if self._ready:
                    rows, cols = _size()
                    self._queue(encode_request(f"{self.method}.resize",
                                               {"id": EXEC_ID, "rows": rows, "cols": cols},
                                               None))
                continue
            self.interrupted = sig
            if self._cancel_sent:
                raise Cancelled(f"interrupted; the command may still run in {self.vm_id}")
            self._cancel_sent = True
            self._queue(encode_request("cancel", {"id": EXEC_ID}, CANCEL_ID))
            self._deadline = time.monotonic() + CANCEL_WAIT_S

    def _queue(self, data: bytes) -> None:
        self._out += data

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.sock.setblocking(False)
        sel = selectors.SelectSelector()  # select(2) also takes regular files as stdin
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGWINCH] if self.tty else [])
        old = {s: signal.signal(s, self._on_signal) for s in sigs}
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "sock")
        stdin_registered = False
        try:
            while True:
                want_stdin = self.stdin_open and self._ready and \
                    len(self._out) < MAX_PENDING_OUT
                if want_stdin != stdin_registered:
                    if want_stdin:
                        sel.register(0, selectors.EVENT_READ, "stdin")
                    else:
                        sel.unregister(0)
                    stdin_registered = want_stdin
                sel.modify(self.sock, selectors.EVENT_READ |
                           (selectors.EVENT_WRITE if self._out else 0), "sock")
                timeout = None
                if self._deadline is not None:
                    timeout = max(0.0, self._deadline - time.monotonic())
                    if timeout == 0:
                        raise Cancelled(f"interrupted; the command may still run in "
                                        f"{self.vm_id}")
                for key, events in sel.select(timeout):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                    elif key.data == "stdin":
                        self._read_stdin()
                        if not self.stdin_open:
                            sel.unregister(0)
                            stdin_registered = False
                    elif key.data == "sock":
                        if events & selectors.EVENT_WRITE and self._out:
                            try:
                                n = self.sock.send(self._out)
                            except BlockingIOError:
                                n = 0
                            del self._out[:n]
                        if events & selectors.EVENT_READ:
                            result = self._read_sock()
                            if result is not None:
                                return result
                self._handle_signals()
        except (ConnectionError, BrokenPipeError):
            raise VmNotRunning(self.vm_id, "stopped") from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
            sel.close()

    def _read_stdin(self) -> None:
        try:
            data = os.read(0, STDIN_CHUNK)
        except OSError:
            data = b""
        if data:
            self._queue(encode_raw(f"{self.method}.stdin", EXEC_ID, data))
        else:
            self.stdin_open = False
            self._queue(encode_request(f"{self.method}.stdin_eof", {"id": EXEC_ID}, None))

    def _read_sock(self) -> dict[str, Any] | None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return None
        if not data:
            raise VmNotRunning(self.vm_id, "stopped")
        self._dec.feed(data)
        while (item := self._dec.next_item()) is not None:
            if isinstance(item, Raw):
                if item.id == EXEC_ID and item.method.startswith(self.method + "."):
                    write_all(2 if item.method.endswith(".stderr") else 1, item.data)
                continue
            msg = decode_server_line(item)
            if isinstance(msg, Notification):
                if msg.data is not None and msg.method.startswith(self.method + "."):
                    write_all(2 if msg.method.endswith(".stderr") else 1, msg.data)
                elif msg.method == f"{self.method}.ready":
                    self._ready = True
                    if not self.stdin_open:
                        self._queue(encode_request(f"{self.method}.stdin_eof",
                                                   {"id": EXEC_ID}, None))
            elif isinstance(msg, Response) and msg.id == EXEC_ID:
                if msg.error is not None:
                    from matchlock.supervisor.client import error_from

                    raise error_from(msg.error[0], msg.error[1], self.vm_id)
                return msg.result or {}
        return None


def _size() -> tuple[int, int]:
    try:
        s = os.get_terminal_size(0)
        return s.lines, s.columns
    except OSError:
        return 24, 80


class ExecArgs:
    """exec's parsed command line (a plain class: no dataclasses on this start-up path)."""

    __slots__ = ("argv", "env", "interactive", "tty", "user", "workdir")

    def __init__(self, interactive: bool = False, tty: bool = False,
                 workdir: str | None = None, user: str | None = None,
                 env: list[str] | None = None) -> None:
        self.interactive, self.tty = interactive, tty
        self.workdir, self.user = workdir, user
        self.env: list[str] = env if env is not None else []
        self.argv: list[str] = []


_BOOL_FLAGS = {"-i": "i", "--interactive": "i", "-t": "t", "--tty": "t", "-it": "it",
               "-ti": "it"}
_VALUE_FLAGS = {"-w": "workdir", "--workdir": "workdir", "-u": "user", "--user": "user",
                "-e": "env", "--env": "env"}


def parse_flags(ea: ExecArgs, args: list[str], *, stop_at_positional: bool) -> list[str]:
    """Take exec's flags off the front of `args`; returns what is left. Raises
    UsageError on a flag it does not know (before the guest command only)."""
    while args and args[0] != "--":
        a = args[0]
        name, eq, val = a.partition("=")
        if a in _BOOL_FLAGS:
            f = _BOOL_FLAGS[a]
            ea.interactive = ea.interactive or "i" in f
            ea.tty = ea.tty or "t" in f
            args.pop(0)
        elif name in _VALUE_FLAGS and (eq or len(args) > 1):
            args.pop(0)
            val = val if eq else args.pop(0)
            field_ = _VALUE_FLAGS[name]
            if field_ == "env":
                ea.env.append(val)
            else:
                setattr(ea, field_, val)
        elif a.startswith("-") and a != "-" and not stop_at_positional:
            raise UsageError(f"no such option: {a}")
        else:
            break
    return args


def parse_after_id(ea: ExecArgs, rest: list[str]) -> ExecArgs:
    """Flags between the id and `--` (`exec ID -it sh`) are exec's, as with the reference;
    then `--`; then the guest command."""
    rest = parse_flags(ea, rest, stop_at_positional=True)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if ea.tty and not ea.interactive:
        ea.interactive = True
    if not rest:
        if not ea.tty:
            raise UsageError("no command given: matchlock exec ID -- COMMAND [ARGS...]")
        rest = ["sh"]
    ea.argv = rest
    return ea


def parse_fast(args: list[str]) -> tuple[str, ExecArgs] | None:
    """`exec`'s command line without click (its import is a third of an exec's cost).
    None: let click handle it (--help, or anything unusual)."""
    if any(a in ("-h", "--help") for a in args[: args.index("--") if "--" in args
                                               else len(args)]):
        return None
    ea = ExecArgs()
    try:
        rest = parse_flags(ea, list(args), stop_at_positional=False)
    except UsageError:
        return None
    if not rest or rest[0].startswith("-"):
        return None
    return rest[0], parse_after_id(ea, rest[1:])


def run_exec(vm_id: str, ea: ExecArgs) -> int:
    env: dict[str, str] = {}
    if ea.env:
        from matchlock.sandbox._command import parse_env_item

        env = dict(parse_env_item(item, os.environ, "-e") for item in ea.env)
    return _run(vm_id, ea.argv, interactive=ea.interactive, tty=ea.tty, workdir=ea.workdir,
                user=ea.user, env=env)


def _run(vm_id: str, argv: list[str], *, interactive: bool, tty: bool,
         workdir: str | None, user: str | None, env: dict[str, str]) -> int:
    from matchlock.supervisor.client import connect, connect_unix, control_path

    if tty and not os.isatty(0):
        raise UsageError("-t needs a terminal on stdin: drop -t, or run from a terminal")
    method = "exec_tty" if tty else ("exec_pipe" if interactive else "exec_stream")
    params: dict[str, Any] = {"argv": argv}
    if workdir:
        params["working_dir"] = workdir
    if user is not None:
        params["user"] = user
    if env:
        params["env"] = env
    if tty:
        params["rows"], params["cols"] = _size()
        params["term"] = os.environ.get("TERM") or "xterm"
    # The socket first: a live supervisor answers on it. Only when nobody does is the
    # state DB asked why (unknown id, stopped, crashed); the happy path skips SQLite.
    if "/" in vm_id or vm_id.startswith("."):
        raise VmNotFound(vm_id)
    try:
        sock = connect_unix(control_path(vm_id), timeout=5)
    except OSError:
        from matchlock.state import StateDB

        rec = StateDB().require(vm_id)
        if rec.status not in ("running", "starting", "creating"):
            raise VmNotRunning(vm_id, rec.status) from None
        sock = connect(vm_id, rec.status)  # it may have bound its socket meanwhile
    client = ExecClient(vm_id, sock, method, params, stdin=interactive or tty, tty=tty)
    try:
        if tty:
            import termios
            import tty as ttymod

            saved = termios.tcgetattr(0)
            ttymod.setraw(0)
            try:
                result = client.run()
            finally:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
        else:
            result = client.run()
    except Cancelled:
        if client.interrupted:
            print("error: interrupted", file=sys.stderr)
            return 128 + client.interrupted
        raise
    finally:
        sock.close()
    if result.get("error"):
        print(f"matchlock: {result['error']}", file=sys.stderr)
    if client.interrupted:
        return 128 + client.interrupted
    return int(result.get("exit_code", 255))
