"""Entry point: one-line errors, no tracebacks, documented exit codes."""

from __future__ import annotations

import sys

import click

from matchlock.cli._guard import guarded
from matchlock.cli._help import Group


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from matchlock._version import version_line

        click.echo(version_line())
        ctx.exit()


class _Cli(Group):
    """The top-level group: subcommand modules load when a command line names them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in _COMMANDS:
            import importlib

            module, attr = _COMMANDS[name]
            self.add_command(getattr(importlib.import_module(f"matchlock.cli.{module}"), attr),
                             name)
        return self.commands.get(name)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Print the version and commit, and exit.")
@click.option("--debug", is_flag=True, envvar="MATCHLOCK_DEBUG", help="Verbose logs on stderr.")
def cli(debug: bool) -> None:
    """Run commands in disposable micro-VMs with a sealed network."""
    if debug:
        import logging  # only then: `exec` and `list` start faster without it

        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s")


@cli.command()
def version() -> None:
    """Print the version and the commit it was built from."""
    from matchlock._version import version_line

    click.echo(version_line())


# name -> (module under matchlock.cli, attribute), imported when a command line names it
# (help imports them all): `run` then loads neither rich nor the build, pull, image or
# diagnose modules (importing what `run` needs: 302 -> 175 ms, measured here).
_COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("_run", "run"), "exec": ("_vms", "exec_"), "list": ("_vms", "list_"),
    "ls": ("_vms", "list_"), "get": ("_vms", "get"), "inspect": ("_vms", "inspect"),
    "stat": ("_vms", "inspect"), "log": ("_vms", "log"), "kill": ("_vms", "kill"),
    "rm": ("_vms", "rm"), "remove": ("_vms", "rm"), "prune": ("_vms", "prune"),
    "gc": ("_vms", "gc"), "allow-list": ("_vms", "allow_list"),
    "port-forward": ("_vms", "port_forward"), "image": ("_image", "image"),
    "kernel": ("_kernel", "kernel"), "pull": ("_pull", "pull"), "build": ("_build", "build"),
    "volume": ("_volume", "volume"), "diagnose": ("_diagnose", "diagnose"),
    "_supervise": ("_run", "supervise"), "rpc": ("_run", "rpc"),
}


def main(argv: list[str] | None = None) -> None:
    rc = guarded(lambda: _click_main(argv), argv)
    sys.exit(rc if isinstance(rc, int) else 0)


def _click_main(argv: list[str] | None) -> object:
    """Click's own failures; every other one is `guarded`'s."""
    try:
        return cli.main(args=argv, prog_name="matchlock", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # pragma: no cover - click>=8.2
        click.echo(e.ctx.get_help(), err=True)
        return 0
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "matchlock"
        msg = e.format_message().replace("\n", " ")
        print(f"error: {msg} (see '{cmd} --help')", file=sys.stderr)
        return 2
    except click.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
