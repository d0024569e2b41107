"""`run -d`: the supervisor as a proper daemon, and the parent that starts it.

Parent (`spawn_detached`): starts `python -m matchlock _supervise --ready-fd N` in its own
session (no controlling terminal), hands it the config (secrets included) on a pipe,
then blocks reading the readiness pipe: the child writes one JSON line when the VM is
registered (`vm_id`), one when it accepts exec (`ready`), or an `error`. No polling.

Child (`daemon_main`): redirects its stdio to `<vm dir>/logs/supervisor.log` as soon as
the directory exists, records its PID with its start time (the row's owner), boots,
says ready, runs the command if there is one (output to its log), and serves the
control socket until the VM is stopped (`kill`, SIGTERM, --timeout, or the VM dying).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from matchlock import errors
from matchlock.errors import ConfigError, MatchlockError, VmStartError

log = logging.getLogger(__name__)


def _error_to_wire(e: BaseException) -> dict[str, Any]:
    if isinstance(e, ConfigError):
        return {"error": e.detail, "kind": "ConfigError", "field": e.field}
    if isinstance(e, MatchlockError):
        return {"error": str(e), "kind": type(e).__name__}
    return {"error": f"internal error: {type(e).__name__}: {e}", "kind": "MatchlockError"}


def _error_from_wire(msg: dict[str, Any], vm_id: str | None) -> MatchlockError:
    if msg.get("kind") == "ConfigError":
        return ConfigError(str(msg.get("field")), str(msg["error"]), vm_id=vm_id)
    cls = getattr(errors, str(msg.get("kind")), MatchlockError)
    if not (isinstance(cls, type) and issubclass(cls, MatchlockError)):
        cls = MatchlockError
    # The class keeps its exit code; its message is the child's (no __init__ re-wording).
    err = MatchlockError.__new__(cls)
    Exception.__init__(err, str(msg["error"]))
    err.vm_id = vm_id
    return err


def spawn_detached(config_wire: dict[str, Any], command: dict[str, Any] | None,
                   timeout: float | None) -> str:
    """Start a detached supervisor; return the VM id once the VM accepts exec."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "matchlock", "_supervise", "--ready-fd", str(w)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(w,), start_new_session=True, cwd="/",
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    vm_id: str | None = None
    try:
        assert proc.stdin is not None
        payload = {"config": config_wire, "command": command, "timeout": timeout}
        try:
            proc.stdin.write(json.dumps(payload).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the readiness pipe says nothing and we report it
        with os.fdopen(r, "rb") as ready:
            r = -1
            for line in ready:
                msg = json.loads(line)
                if "vm_id" in msg:
                    vm_id = str(msg["vm_id"])
                elif msg.get("ready"):
                    assert vm_id is not None
                    return vm_id
                elif "error" in msg:
                    raise _error_from_wire(msg, vm_id)
        try:
            rc: int | None = proc.wait(5)
        except subprocess.TimeoutExpired:
            rc = None
        where = f"; see `matchlock log {vm_id}`" if vm_id else ""
        raise VmStartError(f"the supervisor exited before the VM was ready "
                           f"(status {rc}){where}", vm_id=vm_id)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()  # our child, not yet reaped: its PID is still its own
        raise
    finally:
        if r >= 0:
            os.close(r)


def _redirect_stdio(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def daemon_main(ready_fd: int) -> int:
    """The `_supervise` command: read the payload, become the VM's supervisor."""
    payload = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.set_inheritable(ready_fd, False)
    ready = os.fdopen(ready_fd, "w", buffering=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    from matchlock._aio import run as aio_run

    return aio_run(_serve(payload, ready))


def _say(ready, msg: dict[str, Any]) -> bool:  # noqa: ANN001 - the readiness pipe
    """Tell the parent; False if it is gone (it was interrupted and never got the id)."""
    if ready.closed:
        return False
    try:
        ready.write(json.dumps(msg) + "\n")
        ready.flush()
        if "vm_id" not in msg:
            ready.close()
    except OSError:
        return False
    return True


async def _serve(payload: dict[str, Any], ready) -> int:  # noqa: ANN001
    from matchlock._aio import spawn
    from matchlock.sandbox import ExecRequest, SandboxConfig
    from matchlock.supervisor._supervisor import Supervisor

    loop = asyncio.get_running_loop()
    config = SandboxConfig.from_wire(payload["config"])
    command = payload.get("command")
    timeout = payload.get("timeout")
    sup = Supervisor(config)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def created(s: Supervisor) -> None:
        _redirect_stdio(str(s.sandbox.log_paths[1]))
        _say(ready, {"vm_id": s.id})
        log.info("%s: supervisor pid %d", s.id, os.getpid())

    deadline = None if timeout is None else loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            await sup.start(before_boot=created)
    except BaseException as e:
        if isinstance(e, TimeoutError):
            e = VmStartError(f"timed out after {timeout:g} s while starting", vm_id=sup.id)
        _say(ready, _error_to_wire(e))
        log.error("%s failed to start: %s", sup.id, e)
        await sup.remove()
        return 1
    if stop.is_set() or not _say(ready, {"ready": True}):
        # `run -d` was interrupted while the VM booted: nobody knows this VM; remove it.
        log.info("%s: the starting command went away; removing the VM", sup.id)
        await sup.remove()
        return 130
    if command is not None:
        req = ExecRequest(argv=tuple(command.get("argv", ())), image_command=True,
                          entrypoint=command.get("entrypoint"), cwd=command.get("workdir"))
        spawn(_run_command(sup, req), name=f"command-{sup.id}")
    waiters = [asyncio.ensure_future(sup.wait_stopped()), asyncio.ensure_future(stop.wait())]
    left = None if deadline is None else max(0.0, deadline - loop.time())
    done, _ = await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    reason = sup.stop_reason or ("timed out" if not done else "signalled")
    await sup.stop(graceful=True, reason=reason)
    await sup.finish_clients()
    return 0


async def _run_command(sup, req) -> None:  # noqa: ANN001
    """The command given to `run -d`: output to the supervisor's log, like the console."""
    from matchlock._fdio import FdWriter

    try:
        proc = await sup.sandbox.exec(req)
    except MatchlockError as e:
        log.warning("%s: command not started: %s", sup.id, e)
        return
    out = FdWriter(1)
    try:
        async for _fd, data in proc:
            await out.write(data)
        res = await proc.wait()
        await out.flush()
        log.info("%s: command exited with status %d%s", sup.id, res.exit_code,
                 f" ({res.error})" if res.error else "")
    except (MatchlockError, OSError) as e:
        log.info("%s: command ended: %s", sup.id, e)
    finally:
        out.close()
