"""`matchlock run` (and the internal `_supervise`, and `rpc`) as click commands. The work
is in `_run_core`; a plain `run` line skips click altogether (`_run_args`)."""

from __future__ import annotations

import sys
from typing import Any

import click

from matchlock.cli._run_core import (
    BOOL_WORDS,
    parse_addresses,
    parse_publish,
    progress_line,
    start_run,
)

__all__ = ["parse_addresses", "parse_publish", "rpc", "run", "supervise"]


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
def run(**params: Any) -> None:
    """Run COMMAND in a new sandbox booted from --image.

    Options must come before the command; everything after the first argument (or
    after `--`) is the guest command. The exit status is the guest command's (128+n
    when a signal killed it, 127 when it could not be started).
    """
    start_run(**params)


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
    raise SystemExit(aio_run(serve_stdio(progress_line)))
