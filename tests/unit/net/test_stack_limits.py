"""The per-VM cap on open guest connections (NetworkStack._on_connection), on loopback: no
namespace is made; the listener is a plain 127.0.0.1 server feeding the stack's callback."""

from __future__ import annotations

import asyncio
import json
import socket

import matchlock.net.stack as stack_mod
from matchlock.net.stack import NetworkStack
from matchlock.net.types import NetworkConfig


class _Hold:
    """A handler that keeps every connection open until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.active = 0

    async def handle(self, reader, writer, dst_ip, dst_port) -> None:
        self.active += 1
        await self.release.wait()


def test_connections_past_the_per_vm_limit_are_closed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(stack_mod, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(stack_mod, "original_dst", lambda sock: ("203.0.113.5", 443))
    (tmp_path / "logs").mkdir()
    handler = _Hold()
    stack = NetworkStack("vm-0000c0de", tmp_path, NetworkConfig(mode="open"), handler=handler)

    async def main() -> tuple[list[bytes], int]:
        server = await asyncio.start_server(stack._on_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        socks = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            socks.append(s)
        deadline = loop.time() + 10
        while handler.active < 3 or len(stack._conns) < 3:  # the first three are served
            assert loop.time() < deadline, (handler.active, len(stack._conns))
            await asyncio.sleep(0.01)
        # the two past the limit are closed by the stack: their reads end
        ends = [await asyncio.wait_for(loop.sock_recv(s, 10), 10) for s in socks[3:]]
        held = len(stack._conns)
        handler.release.set()
        for s in socks:
            s.close()
        server.close()
        return ends, held

    ends, held = asyncio.run(main())
    assert ends == [b"", b""] and held == 3
    events = [json.loads(x) for x in (tmp_path / "logs" / "net.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["kind"] == "blocked"]
    assert len(refused) == 2 and refused[0]["fields"]["limit"] == 3
    assert "per-VM limit" in refused[0]["detail"]
