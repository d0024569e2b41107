"""Plain-text tables and sizes for people; --json elsewhere for scripts."""

from __future__ import annotations

from collections.abc import Sequence

import click


def human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
