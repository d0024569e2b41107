"""How every command line ends when it fails: one line on stderr and a documented exit
code, never a traceback (unless --debug). Click-free, so that the short paths that skip
click (`exec`, a plain `run`) end the same way as the rest."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from matchlock.errors import ConfigError, MatchlockError

# Config fields as the CLI spells them (lower boxes name fields, never flags).
FLAGS = {
    "cpus": "--cpus", "memory_mib": "--memory", "disk_size_mib": "--disk-size",
    "hostname": "--hostname", "rows": "terminal rows", "cols": "terminal columns",
}


def word(e: MatchlockError) -> str:
    """One line for a person."""
    if isinstance(e, ConfigError):
        return f"{FLAGS.get(e.field, e.field)} {e.detail}"
    return str(e)


def guarded(fn: Callable[[], object], argv: list[str] | None = None) -> object:
    """`fn()`, or the exit code its failure maps to (SystemExit passes through)."""
    try:
        rc = fn()
    except MatchlockError as e:
        print(f"error: {word(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Reader went away (e.g. `| head`): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 - last resort: one line, details with --debug
        if os.environ.get("MATCHLOCK_DEBUG") or "--debug" in (argv or sys.argv):
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug)",
              file=sys.stderr)
        return 1
    return rc
