"""The `matchlock` command line.

`matchlock exec` takes a short path that does not import click (nor the server side):
an exec is Python start-up plus a round trip, and click alone costs ~40 ms."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["exec"]:
        from matchlock.cli._fast import run_fast

        run_fast(args[1:])  # exits, unless the line needs click (--help, odd flags)
    from matchlock.cli._main import main as click_main

    click_main(argv)
