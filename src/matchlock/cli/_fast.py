"""Command lines that skip click (its import is ~25 ms): `exec`, and a plain `run`, which
then spawns QEMU that much sooner. Same parsing rules, same one-line errors; anything
else (help, unusual spellings, bad values) goes to click."""

from __future__ import annotations

import sys

from matchlock.cli._guard import guarded


def exec_fast(args: list[str]) -> None:
    """Run exec and exit; return only when click should parse this command line."""

    def go() -> int | None:
        from matchlock.cli._exec import parse_fast, run_exec

        parsed = parse_fast(args)
        if parsed is None:
            return None
        rc = run_exec(*parsed)
        sys.stdout.flush()
        return rc

    _exit_unless_none(guarded(go))


def run_fast(args: list[str]) -> None:
    """Run `run` and exit (it raises SystemExit); return only when click should parse
    this command line."""

    def go() -> int | None:
        from matchlock.cli._run_args import parse_run

        params = parse_run(args)
        if params is None:
            return None
        from matchlock.cli._run_core import start_run

        start_run(**params)
        return 0

    _exit_unless_none(guarded(go))


def _exit_unless_none(rc: object) -> None:
    if rc is not None:
        sys.exit(rc)
