"""Help that stays true: every command listed with its whole one-line summary."""

from __future__ import annotations

import click


def summary(cmd: click.Command) -> str:
    """The command's one-line summary: `short_help`, else its docstring's first sentence."""
    return cmd.get_short_help_str(limit=1000)


class Group(click.Group):
    """A click group whose command list never cuts a summary (click's default stops at 45
    characters and appends "...")."""

    group_class = type  # groups made with @group.group() are of this class too

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, summary(cmd)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
