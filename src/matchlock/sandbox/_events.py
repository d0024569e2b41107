"""VM events for subscribers (the RPC `event` notification, spec/rpc-protocol.md §2.16).

Best effort, as in the reference: each subscriber has a bounded queue and loses its
oldest events when it does not keep up; a slow subscriber never holds back the VM.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

MAX_QUEUED_EVENTS = 1024  # per subscriber


def network_event(kind: str, host: str, detail: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A NetEvent in the wire shape of an `event` notification."""
    blocked = "blocked" in kind
    net: dict[str, Any] = {"kind": kind, "host": host, "blocked": blocked}
    if blocked and detail:
        net["block_reason"] = detail
    elif detail:
        net["detail"] = detail
    for key in ("method", "url", "status_code", "request_bytes", "response_bytes",
                "duration_ms"):
        if key in fields:
            net[key] = fields[key]
    return {"type": "network", "timestamp": int(time.time()), "network": net}


class EventHub:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._subs: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, event: dict[str, Any]) -> None:
        """From any thread."""
        if self._subs:
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: dict[str, Any]) -> None:
        for q in self._subs:
            if q.full():
                q.get_nowait()  # drop the oldest
            q.put_nowait(event)

    def subscribe(self) -> Subscription:
        """Events from now on (subscribed at once, not at the first iteration)."""
        return Subscription(self)


class Subscription:
    """An async iterator of one subscriber's events; `close()` (or the end of an `async
    for` that breaks or is cancelled) unsubscribes."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED_EVENTS)
        hub._subs.add(self._q)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._q.get()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._hub._subs.discard(self._q)
