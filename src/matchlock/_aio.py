"""The event loop matchlock runs on (uvloop when installed: the proxy's request rate
roughly doubles, else asyncio's default) and the one way to start a background task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# The loop keeps only weak references to tasks: these keep background tasks alive.
_background: set[asyncio.Task] = set()


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """A named background task, kept alive until done; its failure is logged, not lost."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _background.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s failed: %r", task.get_name(), task.exception())
