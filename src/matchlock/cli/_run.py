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
@click.option("--image", required=True, help="Image tag (see `matchlock image ls`); "
              "`matchlock/busybox` is built in.")
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
              help="Resolve HOST to IP in the guest (repeatable).")
@click.option("--secret", "secrets", multiple=True, metavar="NAME[=VALUE]@HOST[,HOST]",
              help="Give the guest a placeholder for NAME, replaced by the real value "
              "(from the host env when no VALUE) only on requests to HOST (repeatable).")
@click.option("--dns-servers", "dns_servers", multiple=True, metavar="IP[,IP]",
              help="Upstream DNS servers the host-side resolver uses "
                   "(default: the host's).")
@click.option("--network-intercept", is_flag=True,
              help="Inspect HTTP/HTTPS even without --allow-host or --secret.")
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
              help="Guest kernel image (default: Debian's cloud kernel, fetched once).")
@click.option("--accel", default=None, help="auto, kvm, hvf or tcg (env MATCHLOCK_ACCEL).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(image: str, interactive: bool, tty: bool, env: tuple[str, ...],
        env_file: tuple[str, ...], workdir: str | None, user: str | None,
        entrypoint: str | None, cpus: float, memory: int, disk_size: int, rm: bool,
        hostname: str, no_network: bool, allow_hosts: tuple[str, ...],
        add_hosts: tuple[str, ...], secrets: tuple[str, ...], dns_servers: tuple[str, ...],
        network_intercept: bool, mtu: int, volumes: tuple[str, ...], workspace: str | None,
        disks: tuple[str, ...], kernel: str | None, accel: str | None,
        command: tuple[str, ...]) -> None:
    """Run COMMAND in a new sandbox booted from --image.

    Options must come before the command; everything after the first argument (or
    after `--`) is the guest command. The exit status is the guest command's (128+n
    when a signal killed it, 127 when it could not be started).
    """
    from matchlock.net.config import parse_network_flags
    from matchlock.sandbox import SandboxConfig
    from matchlock.vfs import mount_config

    if tty and not interactive:
        interactive = True  # -t alone is useless; behave like docker's common -it
    if tty and not os.isatty(0):
        raise UsageError("-t needs a terminal on stdin: drop -t, or run from a terminal")
    network = parse_network_flags(
        no_network=no_network, allow_hosts=allow_hosts, add_hosts=add_hosts, secrets=secrets,
        dns_servers=dns_servers, network_intercept=network_intercept, mtu=mtu,
        host_env=os.environ,
    )
    mounts = mount_config(volumes, workspace, disks)
    config = SandboxConfig(
        image=image, cpus=cpus, memory_mib=memory, disk_size_mib=disk_size,
        hostname=hostname, no_network=no_network, kernel=kernel, accel=accel,
        network=network, mounts=mounts,
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


