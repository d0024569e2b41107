"""The `matchlock` command line."""

from matchlock.cli._main import main

__all__ = ["main"]
