"""`matchlock build`: a Dockerfile built by a real engine (Buildah) in a builder VM.

`matchlock build IMAGE` (no context directory, no -t) keeps its older meaning: pre-build
the root disk of a stored or pullable image (see _pull.prebuild).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import click

from matchlock.cli._output import human_size
from matchlock.errors import UsageError


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


def _engine_output(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _build_args(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not k:
            raise UsageError(f"invalid --build-arg {item!r}: use KEY=VALUE or KEY")
        if not eq:
            if k not in os.environ:
                continue  # docker: a bare KEY not in the environment is left unset
            v = os.environ[k]
        out[k] = v
    return tuple(out.items())


async def _run_job(job) -> object:  # noqa: ANN001 - BuildJob
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    hit: list[int] = []

    def on_signal(sig: int) -> None:
        hit.append(sig)
        if main is not None:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    from matchlock.build._job import BUILD_TIMEOUT_S

    try:
        async with asyncio.timeout(BUILD_TIMEOUT_S):
            return await job.run()
    except TimeoutError:
        print(f"error: the build did not finish within {BUILD_TIMEOUT_S // 60} minutes; the "
              "builder VM was removed", file=sys.stderr)
        raise SystemExit(1) from None
    except asyncio.CancelledError:
        if hit:
            print("error: build interrupted; the builder VM was removed", file=sys.stderr)
            raise SystemExit(128 + hit[0]) from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("context", required=False)
@click.option("-t", "--tag", default="", help="Name of the built image (required for a "
              "Dockerfile build).")
@click.option("-f", "--file", "file", default=None, metavar="PATH",
              help="Dockerfile (default CONTEXT/Dockerfile; a relative PATH is from the "
                   "current directory).")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY[=VALUE]",
              help="Set a build argument (KEY alone takes it from the environment).")
@click.option("--target", default="", help="Build this stage of a multi-stage Dockerfile.")
@click.option("--no-cache", is_flag=True, help="Build every step again, without the "
              "persistent build cache.")
@click.option("--prune", is_flag=True, help="Delete the persistent build cache and exit.")
@click.option("--build-cpus", type=float, default=0, show_default=True,
              help="vCPUs of the builder VM (0: all host CPUs).")
@click.option("--build-memory", type=int, default=0, show_default=True,
              help="RAM of the builder VM in MB (0: all host RAM).")
@click.option("--build-disk", type=int, default=10240, show_default=True,
              help="Writable disk of the builder VM in MB (sparse).")
@click.option("--build-cache-size", type=int, default=10240, show_default=True,
              help="Size of the persistent build cache disk in MB (grows, never shrinks).")
@click.option("--no-network", is_flag=True, help="RUN steps get no network at all.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST",
              help="RUN steps may reach only these hosts (as `run --allow-host`).")
@click.option("--add-host", "add_hosts", multiple=True, metavar="HOST:IP",
              help="Resolve HOST to IP during the build (as `run --add-host`).")
@click.option("--allow-private", "allow_private", multiple=True, metavar="IP|CIDR|HOST[:PORT]",
              help="Let RUN steps reach this private address (as `run --allow-private`).")
@click.option("--secret", "secrets", multiple=True, metavar="NAME[=VALUE]@HOST[,HOST]",
              help="A secret for HOST: RUN --mount=type=secret,id=NAME sees a placeholder "
                   "that the host's proxy replaces in requests to HOST; the value never "
                   "enters the VM or a layer.")
@click.option("--dns-servers", "dns_servers", multiple=True, metavar="IP[,IP]",
              help="Upstream DNS servers of the builder VM's resolver.")
@click.option("--mtu", type=int, default=1500, show_default=True, help="Builder VM NIC MTU.")
@click.option("--kernel", default=None, envvar="MATCHLOCK_KERNEL", help="Guest kernel image.")
@click.option("--accel", default=None, help="auto, kvm, hvf or tcg (env MATCHLOCK_ACCEL).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def build(context: str | None, tag: str, file: str | None, build_args: tuple[str, ...],
          target: str, no_cache: bool, prune: bool, build_cpus: float, build_memory: int,
          build_disk: int, build_cache_size: int, no_network: bool,
          allow_hosts: tuple[str, ...], add_hosts: tuple[str, ...],
          allow_private: tuple[str, ...], secrets: tuple[str, ...],
          dns_servers: tuple[str, ...], mtu: int, kernel: str | None, accel: str | None,
          quiet: bool) -> None:
    """Build an image from the Dockerfile in CONTEXT (a directory) and tag it.

    Buildah runs in a builder VM (made once with mmdebstrap); base images come from the
    local store, else they are pulled. Layers are cached on a persistent disk under the
    cache dir. RUN steps get the sealed network of `run` (--allow-host, --secret).
    With an image name instead of a directory (and no -t), pre-builds its root disk.
    """
    progress = (lambda _m: None) if quiet else _progress
    if prune:
        from matchlock.build import prune_cache

        freed = prune_cache(lambda: _progress("Waiting for build cache lock…"))
        click.echo(f"Removed the build cache ({human_size(freed)})")
        return
    if context is None:
        raise UsageError("a build context is required: matchlock build -t NAME DIR")
    dockerfile_build = bool(tag or file or build_args or target or no_cache) or \
        os.path.isdir(context) or context.startswith((".", "/", "~"))
    if not dockerfile_build:
        from matchlock.cli._pull import prebuild

        prebuild(context, quiet)
        return
    from matchlock.build import BuildJob, BuildRequest
    from matchlock.net.config import ALLOW_PRIVATE_ENV, parse_network_flags

    network = parse_network_flags(
        no_network=no_network, allow_hosts=allow_hosts, add_hosts=add_hosts, secrets=secrets,
        dns_servers=dns_servers, network_intercept=False, mtu=mtu, host_env=os.environ,
        allow_private=allow_private, env_allow_private=os.environ.get(ALLOW_PRIVATE_ENV, ""))
    if no_network:
        from dataclasses import replace

        network = replace(network, mode="none")
    ctx = Path(context).expanduser()
    dockerfile = Path(file).expanduser() if file else ctx / "Dockerfile"
    if build_cpus < 0 or build_memory < 0:
        raise UsageError("--build-cpus and --build-memory must be 0 (all) or more")
    req = BuildRequest(
        context=ctx.absolute(), dockerfile=dockerfile.absolute(), tag=tag,
        build_args=_build_args(build_args), target=target, no_cache=no_cache,
        cpus=build_cpus, memory_mib=build_memory, disk_mib=build_disk,
        cache_size_mib=build_cache_size, network=network, kernel=kernel, accel=accel)
    job = BuildJob(req, progress, (lambda _b: None) if quiet else _engine_output)
    from matchlock._aio import run as aio_run

    res = aio_run(_run_job(job))
    click.echo(f"Successfully built and tagged {res.image.name}")
    click.echo(f"Layers: {res.layers}")
    click.echo(f"Size: {human_size(res.image.size)}")
    path = os.environ.get("MATCHLOCK_TIMINGS")
    if path:
        import json

        with open(path, "w") as f:
            json.dump(res.timings | {"cached_steps": job.tail.cached_steps}, f)
