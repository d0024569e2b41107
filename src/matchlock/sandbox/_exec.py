"""Typed exec requests and results, and the running `Process` a Sandbox hands back.

`ExecRequest` is what a face asks for (argv or a shell string, extra env, cwd, user, tty,
stdin); `compose_request` turns it into the guest's OPEN request by layering it over the
VM's defaults (Docker rules, no I/O). `Process` wraps the channel's stream so that channel
types never leave the sandbox box, and maps channel failures to typed errors.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from matchlock.channel import ChannelError
from matchlock.channel.client import MAX_READ, ExecHandle
from matchlock.errors import ConfigError, GuestError, UsageError
from matchlock.sandbox._command import DEFAULT_PATH, ImageDefaults, compose_argv

DEFAULT_ROWS, DEFAULT_COLS = 24, 80
MAX_WINSIZE = 65535  # rows and cols travel as u16


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One command to run in a VM.

    argv:          the command as an argv (run with execvp semantics, no shell); or
    shell:         a command string, run as `sh -c <shell>` (the RPC `command` form);
    image_command: compose argv with the image ENTRYPOINT/CMD (Docker rules: `run`'s own
                   command); `entrypoint` then replaces ENTRYPOINT ("" clears it);
    env:           variables on top of the VM's environment (later wins);
    cwd, user:     None = the VM's default (image WORKDIR / the user given at start);
    tty:           a PTY of rows x cols (stdout and stderr merged); else pipes;
    stdin:         forward stdin (False: the process reads /dev/null);
    term:          TERM for a PTY when neither the VM nor `env` sets one.
    """

    argv: tuple[str, ...] = ()
    shell: str | None = None
    image_command: bool = False
    entrypoint: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    user: str | None = None
    tty: bool = False
    stdin: bool = False
    rows: int = DEFAULT_ROWS
    cols: int = DEFAULT_COLS
    term: str = "xterm"

    def __post_init__(self) -> None:
        if self.shell is not None and self.argv:
            raise UsageError("give either an argv or a shell command, not both")
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if type(v) is not int or not 0 < v <= MAX_WINSIZE:
                raise ConfigError(name, f"must be between 1 and {MAX_WINSIZE} (got {v!r})")


@dataclass(frozen=True, slots=True)
class VmDefaults:
    """What every exec in one VM starts from: the image config plus the VM's start-time
    env and user, and the variables the sandbox adds (CA paths, secret placeholders)."""

    image: ImageDefaults = field(default_factory=ImageDefaults)
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""  # the workspace, when the image sets no WORKDIR


def compose_env(vm: VmDefaults, req: ExecRequest) -> dict[str, str]:
    """base PATH < image ENV < the VM's env < the request's env < CA vars < placeholders."""
    out: dict[str, str] = {"PATH": DEFAULT_PATH}
    for item in vm.image.env:
        k, _, v = item.partition("=")
        if k:
            out[k] = v
    out.update(vm.env)
    out.update(req.env)
    # Last: a user variable must not shadow the CA bundle or un-placeholder a secret.
    out.update(vm.extra_env)
    if req.tty and "TERM" not in out:
        out["TERM"] = req.term or "xterm"
    return out


def compose_request(vm: VmDefaults, req: ExecRequest) -> dict:
    """The guest's OPEN request for `req` (docs/channel-protocol.md)."""
    if req.shell is not None:
        argv: Sequence[str] = ["sh", "-c", req.shell]
    elif req.image_command:
        argv = compose_argv(vm.image, req.argv, req.entrypoint)
    else:
        argv = req.argv
    if not argv:
        if req.image_command:
            raise UsageError("no command given and the image has no CMD/ENTRYPOINT: "
                             "add a command")
        raise UsageError("no command given")
    env = compose_env(vm, req)
    user = req.user if req.user is not None else (
        vm.user if vm.user is not None else vm.image.user)
    wire = {
        "op": "exec",
        "argv": list(argv),
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": req.cwd or vm.image.working_dir or vm.cwd or "/",
        "user": user,
        "tty": req.tty,
        "stdin": req.stdin,
    }
    if not req.cwd and vm.image.working_dir:
        wire["mkcwd"] = True  # the image's WORKDIR: made when missing, as Docker does
    if req.tty:
        wire["rows"], wire["cols"] = req.rows, req.cols
    return wire


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How a process ended. `exit_code` is what a shell reports: the code, 128+n for a
    signal, 127 when it could not be started (`error` says why)."""

    exit_code: int
    signal: int | None = None
    error: str | None = None
    duration_ms: int = 0


class VmStopped(GuestError):
    """The VM went away while the process ran."""


class Process:
    """A command running in the guest. Pull output with `read()` (or `async for`): the
    guest process is held back when nobody reads, nothing else is. Feed stdin with
    `write()`/`close_stdin()`; `resize()`, `signal()`, `cancel()`; `wait()` for the end."""

    def __init__(self, handle: ExecHandle, vm_id: str,
                 reason: Callable[[], str] = lambda: "") -> None:
        self._h = handle
        self.vm_id = vm_id
        self._reason = reason  # why the VM stopped, for the error message
        self._t0 = time.monotonic()
        self._result: ExecResult | None = None

    def _stopped(self, e: ChannelError) -> VmStopped:
        why = self._reason() or str(e)
        return VmStopped(f"the VM stopped while the command ran ({why})", vm_id=self.vm_id)

    async def read(self, max_bytes: int = MAX_READ) -> tuple[int, bytes] | None:
        """(fd, bytes) with fd 1 = stdout, 2 = stderr; None once the process has exited."""
        try:
            return await self._h.read(max_bytes)
        except ChannelError as e:
            raise self._stopped(e) from None

    async def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        while (chunk := await self.read()) is not None:
            yield chunk

    async def write(self, data: bytes) -> None:
        try:
            await self._h.write(data)
        except ChannelError as e:
            raise self._stopped(e) from None

    async def close_stdin(self) -> None:
        try:
            await self._h.close_stdin()
        except ChannelError as e:
            raise self._stopped(e) from None

    async def resize(self, rows: int, cols: int) -> None:
        if 0 < rows <= MAX_WINSIZE and 0 < cols <= MAX_WINSIZE:
            try:
                await self._h.resize(rows, cols)
            except ChannelError:
                pass  # the process is gone; nothing to resize

    async def signal(self, signum: int) -> None:
        try:
            await self._h.signal(signum)
        except ChannelError:
            pass

    async def cancel(self) -> None:
        """Stop the process's group (SIGTERM, SIGKILL 5 s later). Never raises."""
        try:
            await self._h.cancel()
        except (ChannelError, OSError):
            pass

    @property
    def done(self) -> bool:
        return self._h.done

    async def wait(self) -> ExecResult:
        """Discard unread output, wait for the exit."""
        if self._result is None:
            try:
                st = await self._h.wait()
            except ChannelError as e:
                raise self._stopped(e) from None
            self._result = ExecResult(
                st.shell_code, st.signal, st.error,
                int((time.monotonic() - self._t0) * 1000))
        return self._result


async def drain_to(proc: Process, sinks: Mapping[int, object]) -> ExecResult:
    """Copy output to `sinks[fd].write(bytes)` coroutines (awaited: backpressure)."""
    while (chunk := await proc.read()) is not None:
        fd, data = chunk
        await sinks[fd].write(data)  # type: ignore[attr-defined]
    return await proc.wait()


__all__ = ["ExecRequest", "ExecResult", "Process", "VmDefaults", "VmStopped",
           "compose_env", "compose_request", "drain_to"]
