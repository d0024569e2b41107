"""`matchlock run`: create a sandbox and run a command in it (foreground or detached)."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import click

from matchlock.errors import UsageError

if TYPE_CHECKING:
    from matchlock.sandbox import SandboxConfig, VmLaunch

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


class _RunCommand(click.Command):
    """`--rm=false`: click flags take no value, so `--rm=<bool>` becomes `--rm`/`--no-rm`
    before parsing. Only tokens before the guest command are looked at."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {o for p in self.params if isinstance(p, click.Option)
                       and not p.is_flag for o in p.opts}
        out, i = [], 0
        while i < len(args):
            a = args[i]
            if a == "--" or not a.startswith("-") or a == "-":
                out += args[i:]
                break
            if a.startswith("--rm="):
                word = a[5:].lower()
                if word not in BOOL_WORDS:
                    raise click.BadParameter(f"{a[5:]!r} is not a boolean (true or false)",
                                             ctx=ctx, param_hint="'--rm'")
                a = "--rm" if BOOL_WORDS[word] else "--no-rm"
            out.append(a)
            if a in takes_value and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
            i += 1
        return super().parse_args(ctx, out)


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


@click.command(cls=_RunCommand, context_settings={"allow_interspersed_args": False})
@click.option("--image", required=True, help="Image reference or local name (see `matchlock "
              "image ls`), pulled on first use; `matchlock/busybox` is built in.")
@click.option("--pull", is_flag=True, help="Ask the image's registry again even when the "
              "image is stored.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and forward it.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal (with -i).")
@click.option("-d", "--detach", is_flag=True,
              help="Start the VM in the background and print its id once it accepts "
                   "exec (implies --rm=false).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]",
              help="Set a variable (every exec in the VM gets it); KEY alone copies it "
                   "from the host environment.")
@click.option("--env-file", multiple=True, metavar="FILE", help="KEY=VALUE lines.")
@click.option("-w", "--workdir", default=None,
              help="Working directory of this command in the guest.")
@click.option("-u", "--user", default=None,
              help="uid, uid:gid, name or name:group (also the default for later exec).")
@click.option("--entrypoint", default=None, help="Replace the image ENTRYPOINT (\"\" clears it).")
@click.option("--cpus", type=float, default=1.0, show_default=True, help="Virtual CPUs.")
@click.option("--memory", type=int, default=512, show_default=True, help="Guest RAM in MB.")
@click.option("--disk-size", type=int, default=5120, show_default=True,
              help="Size of the writable root layer in MB (sparse).")
@click.option("--rm/--no-rm", "rm", default=True, show_default=True,
              help="Remove the sandbox when the command exits; --rm=false keeps it "
                   "running until a signal or `matchlock kill`, then keeps it stopped.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop the VM after this long (boot and command).")
@click.option("-p", "--publish", multiple=True, metavar="[LOCAL:]REMOTE",
              help="Forward a host TCP port to a guest port (repeatable).")
@click.option("--address", "addresses", multiple=True, metavar="IP",
              help="Host addresses for --publish (default 127.0.0.1; comma-separated).")
@click.option("--hostname", default="", help="Guest hostname (default: the VM id).")
@click.option("--no-network", is_flag=True, help="No network interface at all.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST",
              help="Allow only these hosts (globs, comma-separated; repeatable).")
@click.option("--add-host", "add_hosts", multiple=True, metavar="HOST:IP",
              help="Resolve HOST to IP in the guest (repeatable); a private or "
                   "special-use IP also needs --allow-private.")
@click.option("--allow-private", "allow_private", multiple=True, metavar="IP|CIDR|HOST[:PORT]",
              help="Let the guest reach this private or special-use address, network or "
                   "host (optionally one port only); an address of this host only when "
                   "named exactly (comma-separated; repeatable; env MATCHLOCK_ALLOW_PRIVATE "
                   "adds to it).")
@click.option("--secret", "secrets", multiple=True, metavar="NAME[=VALUE]@HOST[,HOST]",
              help="Give the guest a placeholder for NAME, replaced by the real value "
              "(from the host env when no VALUE) only on requests to HOST (repeatable).")
@click.option("--dns-servers", "dns_servers", multiple=True, metavar="IP[,IP]",
              help="Upstream DNS servers the host-side resolver uses "
                   "(default: the host's).")
@click.option("--network-intercept", is_flag=True,
              help="Inspect HTTP/HTTPS even without --allow-host or --secret "
                   "(so that `allow-list add` works later).")
@click.option("--mtu", type=int, default=1500, show_default=True, help="Guest NIC MTU.")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:GUEST[:MODE]",
              help="Mount a host directory or file in the workspace. MODE: overlay (default: "
              "a copy-on-write snapshot, the host is never written), host_fs (alias rw: "
              "writes reach the host) or ro; options ,uid=N,gid=N set the owner the guest "
              "sees. A relative GUEST is under the workspace (repeatable).")
@click.option("--workspace", default=None, metavar="PATH",
              help="Guest path of the VFS (default /workspace with -v); alone, an empty "
              "in-memory workspace.")
@click.option("--disk", "disks", multiple=True, metavar="IMAGE:GUEST[:ro]",
              help="Attach a raw ext4 image (or @VOLUME, see `matchlock volume`) and mount "
              "it at GUEST (repeatable).")
@click.option("--kernel", default=None, envvar="MATCHLOCK_KERNEL",
              help="Guest kernel: a path, a name from `matchlock kernel ls`, `matchlock` or "
                   "`debian` (default: matchlock's own build, else Debian's cloud kernel).")
@click.option("--accel", default=None, help="auto, kvm, hvf or tcg (env MATCHLOCK_ACCEL).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(image: str, pull: bool, interactive: bool, tty: bool, detach: bool, env: tuple[str, ...],
        env_file: tuple[str, ...], workdir: str | None, user: str | None,
        entrypoint: str | None, cpus: float, memory: int, disk_size: int, rm: bool,
        timeout: float | None, publish: tuple[str, ...], addresses: tuple[str, ...],
        hostname: str, no_network: bool, allow_hosts: tuple[str, ...],
        add_hosts: tuple[str, ...], allow_private: tuple[str, ...], secrets: tuple[str, ...],
        dns_servers: tuple[str, ...],
        network_intercept: bool, mtu: int, volumes: tuple[str, ...],
        workspace: str | None, disks: tuple[str, ...], kernel: str | None, accel: str | None,
        command: tuple[str, ...]) -> None:
    """Run COMMAND in a new sandbox booted from --image.

    Options must come before the command; everything after the first argument (or
    after `--`) is the guest command. The exit status is the guest command's (128+n
    when a signal killed it, 127 when it could not be started).
    """
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
        click.echo(vm_id)
        return
    t0 = time.monotonic()
    try:
        launch = prelaunch(config, list(command), entrypoint, rm)
        launch.marks["cli_start"] = t0
    except KeyboardInterrupt:  # click would word it "aborted"
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
        session = RunSession(config, request, rm=rm, timeout=timeout, progress=_progress,
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

    launch = VmLaunch(config, _progress)
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


@click.command("_supervise", hidden=True)
@click.option("--ready-fd", type=int, required=True)
def supervise(ready_fd: int) -> None:
    """Internal: the detached supervisor `run -d` starts."""
    from matchlock.supervisor import daemon_main

    raise SystemExit(daemon_main(ready_fd))


@click.command("rpc")
def rpc() -> None:
    """Serve the JSON-RPC protocol (one JSON object per line) on stdin/stdout.

    This is what the SDKs start (`Client()`): one session drives one VM, made by its
    `create` request. The VM stops on `close`; it is removed when stdin ends without
    `close` or on SIGINT/SIGTERM. Logs go to stderr (--debug for more).
    """
    import logging

    from matchlock._aio import run as aio_run
    from matchlock.rpc.stdio import serve_stdio

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="matchlock rpc: %(levelname)s %(name)s: %(message)s")
    raise SystemExit(aio_run(serve_stdio(_progress)))
