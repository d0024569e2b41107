"""The `matchlock` command line.

`matchlock exec` and a plain `matchlock run` take a short path that does not import click
(cli/_fast.py): an exec is Python start-up plus a round trip, and a run spawns QEMU
sooner. click alone costs ~25 ms."""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["exec"]:
            from matchlock.cli._fast import exec_fast

            exec_fast(args[1:])  # exits, unless the line needs click (--help, odd flags)
        elif args[:1] == ["run"]:
            from matchlock.cli._fast import run_fast

            run_fast(args[1:])  # the same
        from matchlock.cli._main import main as click_main

        click_main(argv)
    except SystemExit as e:
        if argv is not None:
            raise  # called in-process (tests): the caller's interpreter goes on
        _exit(e.code)


def _exit(code: object) -> None:
    """End the process without the interpreter's teardown of every module and object:
    that costs 30-70 ms after a `run` (measured), more than the guest command itself.
    Everything that must reach a file or pipe is flushed first; by now every thread
    that does work has been joined (asyncio's executor, output writers)."""
    if code is None:
        rc = 0
    elif isinstance(code, int):
        rc = code
    else:
        print(code, file=sys.stderr)
        rc = 1
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            rc = rc or 141  # the reader went away: what was left is lost either way
        except OSError:
            rc = rc or 1
    os._exit(rc & 0xFF if rc >= 0 else 1)
