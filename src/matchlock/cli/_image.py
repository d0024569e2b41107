"""`matchlock image ls|rm|import|gc`."""

from __future__ import annotations

import sys

import click

from matchlock.cli._help import Group
from matchlock.cli._output import human_size, print_table


@click.group(cls=Group, invoke_without_command=True)
@click.pass_context
def image(ctx: click.Context) -> None:
    """Manage local images."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def image_ls(as_json: bool) -> None:
    """List images."""
    from matchlock.image import ImageStore

    images = ImageStore().list()
    if as_json:
        import json

        click.echo(json.dumps([
            {"tag": i.name, "id": i.id, "source": i.source, "size": i.size, "created": i.created,
             "digest": i.digest, "platform": i.platform,
             "config": {"env": list(i.config.env), "entrypoint": list(i.config.entrypoint),
                        "cmd": list(i.config.cmd), "working_dir": i.config.working_dir,
                        "user": i.config.user,
                        "exposed_ports": list(i.config.exposed_ports)}}
            for i in images
        ], indent=2))
        return
    print_table(
        ["TAG", "SOURCE", "SIZE", "CREATED"],
        [[i.name, i.source, human_size(i.size), i.created[:19].replace("T", " ")]
         for i in images],
    )


image.add_command(image_ls, "list")


@image.command("rm")
@click.argument("tags", nargs=-1, required=True)
def image_rm(tags: tuple[str, ...]) -> None:
    """Remove images by tag."""
    from matchlock.image import ImageStore

    store = ImageStore()
    for tag in tags:
        store.remove(tag)
        click.echo(f"Removed {tag}")


image.add_command(image_rm, "remove")


@image.command("import")
@click.argument("tag")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
def image_import(tag: str, file: str | None) -> None:
    """Import a `docker save` or OCI-layout tarball (FILE, or stdin) as TAG."""
    from matchlock.image import ImageStore

    def progress(msg: str) -> None:
        click.echo(msg, err=True)

    if file and file != "-":
        try:
            f = open(file, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            from matchlock.errors import UsageError

            raise UsageError(f"cannot read {file}: {e.strerror}") from None
    else:
        if sys.stdin.isatty():
            from matchlock.errors import UsageError

            raise UsageError("no tarball given: pipe one in (`< image.tar`) or pass FILE")
        click.echo(f"Importing {tag} from stdin...", err=True)
        f = sys.stdin.buffer
    try:
        img = ImageStore().import_tar(tag, f, progress=progress)
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    click.echo(f"Imported: {img.name}")
    click.echo(f"Size: {human_size(img.size)}")


@image.command("gc")
def image_gc() -> None:
    """Delete layers and disks that no image uses, and leftovers of killed pulls."""
    from matchlock.image import ImageStore

    res = ImageStore().gc()
    click.echo(f"Removed {res.blobs} unreferenced blobs")
    if res.disks or res.kept_in_use:
        click.echo(f"Removed {res.disks} unreferenced disks"
                   + (f" ({res.kept_in_use} still in use by running VMs, kept)"
                      if res.kept_in_use else ""))
    if res.staging:
        click.echo(f"Removed {res.staging} leftovers of interrupted pulls or imports")
    click.echo(f"Freed: {human_size(res.freed)}")
