"""`matchlock kernel build|ls|rm`: matchlock's own guest kernel and the kernel cache."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import click

from matchlock.cli._help import Group
from matchlock.cli._output import human_size, print_table
from matchlock.errors import UsageError

if TYPE_CHECKING:
    from matchlock.vm.kernel_build import BuildProgress


@click.group(cls=Group, invoke_without_command=True)
@click.pass_context
def kernel(ctx: click.Context) -> None:
    """Build and manage guest kernels."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


class _LineProgress:
    """Plain lines on stderr: each stage, then every 10% of the compilation."""

    def __init__(self) -> None:
        self._next = 10
        self._t0 = time.monotonic()

    def phase(self, text: str) -> None:
        click.echo(text, err=True)

    def steps(self, done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct >= self._next and done < total:
            self._next = pct - pct % 10 + 10
            click.echo(f"  {pct}% ({done}/~{total} files, "
                       f"{time.monotonic() - self._t0:.0f} s)", err=True)

    def message(self, text: str) -> None:
        click.echo(text, err=True)


class _RichProgress:
    """A bar for the compilation on a terminal; stages as lines above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
            transient=True,
        )
        self._task: int | None = None

    def phase(self, text: str) -> None:
        self._bars.console.print(text, highlight=False, markup=False)

    def steps(self, done: int, total: int) -> None:
        if self._task is None:
            self._bars.start()
            self._task = self._bars.add_task("compiling", total=total)
        self._bars.update(self._task, completed=done, total=total)
        if done >= total and done > 0:
            self.close()

    def message(self, text: str) -> None:
        self._bars.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        if self._task is not None:
            self._bars.stop()
            self._task = None


@kernel.command("build")
@click.option("-j", "--jobs", type=click.IntRange(1, 512), default=None,
              help="Parallel compile jobs (default: one per CPU). The build runs niced.")
@click.option("--force", is_flag=True, help="Rebuild even when the cache has this build.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; print only the kernel's name.")
def kernel_build(jobs: int | None, force: bool, quiet: bool) -> None:
    """Build matchlock's guest kernel from Debian's linux-source-6.1 package.

    The config is guest/kernel/common.config plus <arch>.config over tinyconfig, all
    drivers built in. The result is cached by (source version, config digest): a second
    build is a lookup. Once built, VMs boot it by default (about twice as fast as the
    Debian cloud kernel). Takes several minutes and ~2 GB of temporary disk.
    """
    from matchlock.vm.kernel_build import BuildProgress, build_kernel

    progress: BuildProgress | _LineProgress | _RichProgress
    if quiet:
        progress = BuildProgress()
    elif sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        progress = _RichProgress()
    else:
        progress = _LineProgress()
    try:
        res = build_kernel(progress, jobs=jobs, force=force)
    finally:
        if isinstance(progress, _RichProgress):
            progress.close()
    if quiet:
        click.echo(res.name)
        return
    size = human_size(res.image.stat().st_size)
    if res.cached:
        click.echo(f"{res.name} is already built ({res.image}, {size}; --force rebuilds)")
        return
    for opt in res.dropped:
        click.echo(f"warning: kernel option {opt}: a dependency is not met", err=True)
    click.echo(f"Built {res.name} in {res.seconds:.0f} s ({res.image}, {size})")


@kernel.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def kernel_ls(as_json: bool) -> None:
    """List cached kernels (* marks the one VMs boot by default)."""
    from matchlock.vm.kernel import list_kernels

    entries = list_kernels()
    if as_json:
        import json

        click.echo(json.dumps([
            {"name": e.kernel.name, "kind": e.kernel.kind, "version": e.kernel.version,
             "path": str(e.path), "image": str(e.kernel.image), "size": e.size,
             "created": e.created, "default": e.default, "current": e.current,
             "modules": e.kernel.modules_dir is not None,
             **({"source_version": e.meta.get("source_version"),
                 "config_digest": e.meta.get("config_digest")}
                if e.kernel.kind == "matchlock" else {"package": e.meta.get("package")})}
            for e in entries
        ], indent=2))
        return
    rows = []
    for e in entries:
        kind = e.kernel.kind
        if kind == "matchlock" and not e.current:
            kind += " (older config)"
        rows.append([("* " if e.default else "  ") + e.kernel.name, kind, e.kernel.version,
                     human_size(e.size), e.created[:19].replace("T", " ")])
    print_table(["NAME", "KIND", "VERSION", "SIZE", "CREATED"], rows)


kernel.add_command(kernel_ls, "list")


@kernel.command("rm")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Remove every cached kernel.")
def kernel_rm(names: tuple[str, ...], all_: bool) -> None:
    """Remove cached kernels by NAME (as `kernel ls` prints them)."""
    from matchlock.vm.kernel import all_cached, remove_kernel

    if all_ and names:
        raise UsageError("give kernel names or --all, not both")
    if not all_ and not names:
        raise UsageError("name the kernels to remove (see `matchlock kernel ls`), or pass --all")
    targets = [k.name for k in all_cached()] if all_ else list(names)
    known = {k.name for k in all_cached()}
    unknown = [n for n in targets if n not in known]
    if unknown:  # checked before removing anything: all or nothing
        raise UsageError(f"no cached kernel named {', '.join(unknown)} "
                         "(see `matchlock kernel ls`)")
    for name in targets:
        remove_kernel(name)
        click.echo(f"Removed {name}")


kernel.add_command(kernel_rm, "remove")
