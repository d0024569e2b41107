"""`matchlock exec` without click: the same parsing rules and one-line errors."""

from __future__ import annotations

import os
import sys

from matchlock.errors import MatchlockError


def run_fast(args: list[str]) -> None:
    """Run exec and exit; return only when click should parse this command line."""
    from matchlock.cli._exec import parse_fast, run_exec

    try:
        parsed = parse_fast(args)
        if parsed is None:
            return
        rc = run_exec(*parsed)
        sys.stdout.flush()
    except MatchlockError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        rc = 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        rc = 141
    except Exception as e:  # noqa: BLE001 - last resort: one line, details with --debug
        if os.environ.get("MATCHLOCK_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug)",
              file=sys.stderr)
        rc = 1
    sys.exit(rc)
