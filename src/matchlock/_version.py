"""The version string and the commit it was built from.

The commit comes from, in order: the checkout this module sits in (`git rev-parse`, so a
source or editable install always tells the truth), the `_build_info` module that
setup.py writes into a built package, else "unknown".
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

from matchlock import __version__

_CHECKOUT = Path(__file__).resolve().parents[2]


def _git_commit(root: Path) -> str | None:
    if not (root / ".git").exists():  # a directory, or a file in a git worktree
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = r.stdout.strip()
    return sha if r.returncode == 0 and sha else None


@cache
def commit() -> str:
    sha = _git_commit(_CHECKOUT)
    if sha:
        return sha
    try:
        from matchlock._build_info import COMMIT  # written at build time (git-ignored)
    except ImportError:
        return "unknown"
    return COMMIT or "unknown"


def version_line() -> str:
    return f"matchlock {__version__} (commit: {commit()})"
