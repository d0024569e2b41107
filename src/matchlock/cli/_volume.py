"""`matchlock volume create|ls|rm|cp`: named raw ext4 volumes for `--disk @NAME:PATH`."""

from __future__ import annotations

import json

import click

from matchlock.cli._help import Group
from matchlock.cli._output import print_table


@click.group(cls=Group, invoke_without_command=True)
@click.pass_context
def volume(ctx: click.Context) -> None:
    """Manage named volumes (raw ext4 images for --disk @NAME:PATH)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@volume.command("create")
@click.argument("name")
@click.option("--size", type=int, default=10240, show_default=True, help="Size in MB (sparse).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def volume_create(name: str, size: int, as_json: bool) -> None:
    """Create an empty ext4 volume."""
    from matchlock.vfs import create_volume

    v = create_volume(name, size)
    if as_json:
        click.echo(json.dumps(v.to_json()))
    else:
        click.echo(f"Created volume {v.name} ({size} MB)")


@volume.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def volume_ls(as_json: bool) -> None:
    """List volumes."""
    from matchlock.vfs import list_volumes

    vols = list_volumes()
    if as_json:
        click.echo(json.dumps([v.to_json() for v in vols], indent=2))
        return
    print_table(["NAME", "SIZE"], [[v.name, v.to_json()["size"]] for v in vols])


@volume.command("rm")
@click.argument("name")
def volume_rm(name: str) -> None:
    """Remove a volume (not while a VM uses it)."""
    from matchlock.vfs import remove_volume

    remove_volume(name)
    click.echo(f"Removed volume {name}")


@volume.command("cp")
@click.argument("src")
@click.argument("dest")
def volume_cp(src: str, dest: str) -> None:
    """Copy a volume to a new name (not while a VM writes it)."""
    from matchlock.vfs import copy_volume

    copy_volume(src, dest)
    click.echo(f"Copied volume {src} to {dest}")


volume.add_command(volume_ls, "list")
volume.add_command(volume_rm, "remove")
volume.add_command(volume_cp, "copy")
