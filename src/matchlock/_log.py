"""Module loggers that import `logging` only when a record could go anywhere: `logging`
(with traceback and string) is ~3 ms of imports before a plain `run` spawns QEMU. Until
something imports `logging`, nothing can have lowered the root logger's WARNING level or
added a handler, so debug and info records would be dropped anyway."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging


class _LazyLogger:
    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: logging.Logger | None = None

    def _real(self) -> logging.Logger:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self._name)
        return self._logger

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._real(), attr)

    def debug(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().debug(*args, **kwargs)

    def info(self, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().info(*args, **kwargs)


def get_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)`, imported when the logger is first used."""
    return _LazyLogger(name)  # type: ignore[return-value]
