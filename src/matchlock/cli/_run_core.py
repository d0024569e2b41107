"""What `matchlock run` does once its command line is parsed, by click (`_run`) or by the
short path that spawns QEMU before click is even imported (`_run_args`)."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from matchlock.errors import UsageError

if TYPE_CHECKING:
    from matchlock.sandbox import SandboxConfig, VmLaunch

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def progress_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_publish(values: tuple[str, ...]):  # noqa: ANN201 - tuple[PortSpec, ...]
    from matchlock.sandbox import PortSpec

    out = []
    for v in values:
        local, sep, remote = v.strip().rpartition(":")
        try:
            r = int(remote)
            spec = PortSpec(int(local) if sep else r, r)
        except (ValueError, UsageError):
            raise UsageError(f"invalid --publish {v!r}: use [LOCAL_PORT:]REMOTE_PORT with "
                             "ports 1-65535 (e.g. 8080:80)") from None
        out.append(spec)
    return tuple(dict.fromkeys(out))


def parse_addresses(values: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for v in values:
        for a in (p.strip() for p in v.split(",")):
            if not a:
                continue
            if a == "localhost":
                out.append("127.0.0.1")
                continue
            try:
                out.append(str(ipaddress.ip_address(a.strip("[]"))))
            except ValueError:
                raise UsageError(f"invalid --address {a!r}: use an IP address or localhost"
                                 ) from None
    return tuple(dict.fromkeys(out)) or ("127.0.0.1",)


def start_run(image: str, pull: bool, interactive: bool, tty: bool, detach: bool,
        env: tuple[str, ...], env_file: tuple[str, ...], workdir: str | None, user: str | None,
        entrypoint: str | None, cpus: float, memory: int, disk_size: int, rm: bool,
        timeout: float | None, publish: tuple[str, ...], addresses: tuple[str, ...],
        hostname: str, no_network: bool, allow_hosts: tuple[str, ...],
        add_hosts: tuple[str, ...], allow_private: tuple[str, ...], secrets: tuple[str, ...],
        dns_servers: tuple[str, ...],
        network_intercept: bool, mtu: int, volumes: tuple[str, ...],
        workspace: str | None, disks: tuple[str, ...], kernel: str | None, accel: str | None,
        command: tuple[str, ...]) -> None:
    """`run` with its parsed options (the names are click's parameter names)."""
    from matchlock.net.config import ALLOW_PRIVATE_ENV, parse_network_flags
    from matchlock.sandbox import SandboxConfig
    from matchlock.sandbox._command import parse_env_item, read_env_file
    from matchlock.sandbox._exec_limits import check_exec_size
    from matchlock.vfs import mount_config

    if detach and (interactive or tty):
        raise UsageError("--detach cannot be combined with --interactive/--tty")
    if detach:
        rm = False
    if tty and not interactive:
        interactive = True  # -t alone is useless; behave like docker's common -it
    if tty and not os.isatty(0):
        raise UsageError("-t needs a terminal on stdin: drop -t, or run from a terminal")
    network = parse_network_flags(
        no_network=no_network, allow_hosts=allow_hosts, add_hosts=add_hosts, secrets=secrets,
        dns_servers=dns_servers, network_intercept=network_intercept, mtu=mtu,
        host_env=os.environ, allow_private=allow_private,
        env_allow_private=os.environ.get(ALLOW_PRIVATE_ENV, ""),
    )
    mounts = mount_config(volumes, workspace, disks)
    vm_env: dict[str, str] = {}
    for path in env_file:
        vm_env.update(read_env_file(path, os.environ))
    for item in env:
        k, v = parse_env_item(item, os.environ, "-e")
        vm_env[k] = v
    # Linux's ARG_MAX limits, checked before anything boots (bad input costs nothing).
    check_exec_size(list(command), [f"{k}={v}" for k, v in vm_env.items()])
    config = SandboxConfig(
        image=image, cpus=cpus, memory_mib=memory, disk_size_mib=disk_size,
        hostname=hostname, no_network=no_network, kernel=kernel, accel=accel,
        network=network, pull=pull, env=tuple(vm_env.items()), user=user,
        publish=parse_publish(publish), addresses=parse_addresses(addresses),
        mounts=mounts,
    )
    config.validate()
    if detach:
        from matchlock.supervisor import spawn_detached

        vm_id = spawn_detached(config.to_wire(), {"argv": list(command),
                                                  "entrypoint": entrypoint,
                                                  "workdir": workdir}, timeout)
        print(vm_id, flush=True)
        return
    t0 = time.monotonic()
    try:
        launch = prelaunch(config, list(command), entrypoint, rm)
        launch.marks["cli_start"] = t0
    except KeyboardInterrupt:  # the CLI would word it "aborted"
        sig = _signalled[-1] if _signalled else signal.SIGINT
        print("error: " + ("terminated" if sig == signal.SIGTERM else "interrupted"),
              file=sys.stderr)
        raise SystemExit(128 + sig) from None
    # A SIGINT/SIGTERM from here on is only written down until the session's loop acts
    # on it (RunSession.run).
    try:
        # Only now the event loop, the channel and the supervisor: they load while QEMU
        # boots.
        from matchlock._aio import run as aio_run
        from matchlock.cli._session import RunSession, exec_request

        request = exec_request(list(command), entrypoint=entrypoint, workdir=workdir,
                               interactive=interactive, tty=tty)
        session = RunSession(config, request, rm=rm, timeout=timeout, progress=progress_line,
                             launch=launch, spent=time.monotonic() - t0,
                             early_signals=_deferred)
    except BaseException:
        discard(launch)
        raise
    rc = aio_run(session.run())
    sys.stdout.flush()
    raise SystemExit(rc)


def prelaunch(config: SandboxConfig, argv: list[str], entrypoint: str | None,
              rm: bool) -> VmLaunch:
    """Register the VM and spawn QEMU, before the rest of `run` is even imported: the
    guest boots while Python loads asyncio, the channel and the supervisor. What this
    took is released again if anything here fails (bad input, Ctrl-C, SIGTERM)."""
    from matchlock.sandbox import VmLaunch
    from matchlock.sandbox._command import compose_argv

    launch = VmLaunch(config, progress_line)
    _saved.update({s: signal.getsignal(s) for s in _STOP_SIGNALS})
    # While the image is resolved (maybe pulled): SIGTERM ends this like Ctrl-C does.
    signal.signal(signal.SIGTERM, _term_as_int)
    try:
        launch.create()
        if rm and not compose_argv(launch.image_defaults(), argv, entrypoint):
            raise UsageError("command required (or use --rm=false to start without a "
                             "command)")
        # From the first record of the spawn on, a stop signal is only written down: the
        # event loop's handlers act on it (RunSession.run) and tear down what was taken.
        # Not a blocked mask: every child would inherit it (QEMU deaf to SIGTERM).
        for s in _STOP_SIGNALS:
            signal.signal(s, _defer)
        launch.spawn()
    except BaseException:
        discard(launch)
        raise
    return launch


_signalled: list[int] = []  # SIGTERM while the image was resolved
_deferred: list[int] = []  # stop signals between QEMU's spawn and the session's loop
_saved: dict[int, object] = {}  # the handlers prelaunch replaced


def _term_as_int(sig: int, _frame: object) -> None:
    """SIGTERM while the image is resolved: handled as a Ctrl-C, which an event loop
    running a pull turns into a clean cancellation (an exception raised here could land
    inside the loop's own callbacks)."""
    _signalled.append(sig)
    os.kill(os.getpid(), signal.SIGINT)


def _defer(sig: int, _frame: object) -> None:
    _deferred.append(sig)


def discard(launch: VmLaunch) -> None:
    """Release whatever a failed prelaunch took (nothing when it failed before the row),
    with the SIGINT/SIGTERM handlers it replaced back in place."""
    for s, handler in _saved.items():
        signal.signal(s, handler)  # type: ignore[arg-type]
    if not launch.registered:
        return
    from matchlock._aio import run as aio_run
    from matchlock.sandbox import Sandbox

    aio_run(Sandbox(launch.config, launch=launch).remove())
