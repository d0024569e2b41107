"""`matchlock pull` and `matchlock build IMAGE`, with per-layer progress."""

from __future__ import annotations

import os
import sys
import threading

import click

from matchlock.cli._output import human_size
from matchlock.image import LineProgress, PullProgress


class RichProgress(PullProgress):
    """A bar per layer (bytes, speed) on a terminal, drawn on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._bars = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=Console(stderr=True), transient=False,
        )
        self._tasks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._started = False

    def start(self, name: str, layers: list[tuple[str, int, bool]]) -> None:
        with self._lock:
            self._bars.start()
            self._started = True
            for digest, size, have in layers:
                if digest in self._tasks:
                    continue
                label = digest.removeprefix("sha256:")[:12]
                if have:
                    self._tasks[digest] = self._bars.add_task(
                        f"{label} already exists", total=max(size, 1),
                        completed=max(size, 1))
                else:
                    self._tasks[digest] = self._bars.add_task(label, total=size or None)

    def advance(self, digest: str, n: int) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._bars.advance(task, n)

    def layer_done(self, digest: str) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            label = digest.removeprefix("sha256:")[:12]
            self._bars.update(task, description=f"{label} pull complete")

    def message(self, text: str) -> None:
        self._bars.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        with self._lock:
            if self._started:
                self._bars.stop()
                self._started = False


def progress_for(quiet: bool) -> PullProgress:
    if quiet:
        return PullProgress()
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        return RichProgress()
    return LineProgress(lambda msg: click.echo(msg, err=True))


@click.command()
@click.argument("image")
@click.option("--force", is_flag=True, help="Ask the registry again even when the image is "
              "stored (stored layers and disks are still reused).")
@click.option("-t", "--tag", "tag", default=None, metavar="TAG",
              help="Also store the image under this local name.")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="Which image of a multi-platform index (default: this host's).")
@click.option("-q", "--quiet", is_flag=True, help="No progress; print only the image name.")
def pull(image: str, force: bool, tag: str | None, platform: str | None, quiet: bool) -> None:
    """Pull IMAGE from its registry and build its root disk.

    IMAGE is [REGISTRY/]NAME[:TAG][@sha256:DIGEST]; without a registry it is Docker Hub.
    Credentials come from ~/.docker/config.json (`docker login`). Plain HTTP is used only
    for registries on localhost.
    """
    from matchlock.image import BUILTIN_IMAGE, ImageStore, parse_reference

    ref = parse_reference(image)
    if ref.name == BUILTIN_IMAGE:
        img = ImageStore().ensure_builtin()
        click.echo(img.name if quiet else f"{img.name} is built in: nothing to pull")
        return
    if not quiet:
        click.echo(f"Pulling {ref.name}...")
    store = ImageStore()
    res = store.pull(image, force=force, platform=platform, progress=progress_for(quiet))
    if tag:
        store.tag(res.image.name, tag)
    if quiet:
        click.echo(res.image.name)
        return
    if res.cached:
        click.echo(f"{res.image.name} is up to date (stored; --force asks the registry again)")
    if tag:
        click.echo(f"Tagged: {parse_reference(tag).name}")
    click.echo(f"Digest: {res.image.digest or res.image.id}")
    click.echo(f"Size: {human_size(res.image.size)}")


def prebuild(image: str, quiet: bool) -> None:
    """Pre-build the root disk of IMAGE so that its first `run` starts at once.

    A stored image is built from its stored layers (no network); otherwise it is pulled.
    """
    from matchlock.image import ImageStore

    res = ImageStore().build(image, progress=progress_for(quiet))
    if quiet:
        return
    if res.cached:
        click.echo(f"{res.image.name}: root disk already built ({human_size(res.image.size)})")
    else:
        click.echo(f"Built rootfs from {res.image.name} ({human_size(res.image.size)})")
