"""`matchlock run`: create a sandbox, run one command in it, remove it."""

from __future__ import annotations

import os
import sys

import click

from matchlock._aio import run as aio_run
from matchlock.errors import UsageError


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--image", required=True, help="Image reference or local name (see `matchlock "
              "image ls`), pulled on first use; `matchlock/busybox` is built in.")
@click.option("--pull", is_flag=True, help="Ask the image's registry again even when the "
              "image is stored.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and forward it.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal (with -i).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]",
              help="Set a variable; KEY alone copies it from the host environment.")
@click.option("--env-file", multiple=True, metavar="FILE", help="KEY=VALUE lines.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-u", "--user", default=None, help="uid, uid:gid, name or name:group.")
@click.option("--entrypoint", default=None, help="Replace the image ENTRYPOINT (\"\" clears it).")
@click.option("--cpus", type=float, default=1.0, show_default=True, help="Virtual CPUs.")
@click.option("--memory", type=int, default=512, show_default=True, help="Guest RAM in MB.")
@click.option("--disk-size", type=int, default=5120, show_default=True,
              help="Size of the writable root layer in MB (sparse).")
@click.option("--rm", is_flag=True, default=True,
              help="Remove the sandbox when the command exits (the only mode for now).")
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
              help="Inspect HTTP/HTTPS even without --allow-host or --secret.")
@click.option("--mtu", type=int, default=1500, show_default=True, help="Guest NIC MTU.")
@click.option("--kernel", default=None, envvar="MATCHLOCK_KERNEL",
              help="Guest kernel image (default: Debian's cloud kernel, fetched once).")
@click.option("--accel", default=None, help="auto, kvm, hvf or tcg (env MATCHLOCK_ACCEL).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(image: str, pull: bool, interactive: bool, tty: bool, env: tuple[str, ...],
        env_file: tuple[str, ...], workdir: str | None, user: str | None,
        entrypoint: str | None, cpus: float, memory: int, disk_size: int, rm: bool,
        hostname: str, no_network: bool, allow_hosts: tuple[str, ...],
        add_hosts: tuple[str, ...], allow_private: tuple[str, ...], secrets: tuple[str, ...],
        dns_servers: tuple[str, ...],
        network_intercept: bool, mtu: int, kernel: str | None, accel: str | None,
        command: tuple[str, ...]) -> None:
    """Run COMMAND in a new sandbox booted from --image.

    Options must come before the command; everything after the first argument (or
    after `--`) is the guest command. The exit status is the guest command's (128+n
    when a signal killed it, 127 when it could not be started).
    """
    from matchlock.net.config import ALLOW_PRIVATE_ENV, parse_network_flags
    from matchlock.sandbox import SandboxConfig

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
    config = SandboxConfig(
        image=image, cpus=cpus, memory_mib=memory, disk_size_mib=disk_size,
        hostname=hostname, no_network=no_network, kernel=kernel, accel=accel,
        network=network, pull=pull,
    )
    config.validate()
    from matchlock.cli._session import RunSession

    session = RunSession(
        config, list(command), env=env, env_files=env_file, workdir=workdir, user=user,
        entrypoint=entrypoint, interactive=interactive, tty=tty, progress=_progress,
    )
    rc = aio_run(session.run())
    sys.stdout.flush()
    raise SystemExit(rc)


