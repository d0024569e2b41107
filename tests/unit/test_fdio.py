"""FdWriter: the loop never blocks on a slow fd; writers wait past the limit; errors surface."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from matchlock._fdio import FdWriter


def test_backpressure_and_order():
    async def main() -> None:
        r, w = os.pipe()
        writer = FdWriter(w, limit=256 * 1024)
        chunk = os.urandom(64 * 1024)
        # The pipe holds 64 KiB and nobody reads: writes queue up to the limit, then wait.
        for _ in range(4):
            await asyncio.wait_for(writer.write(chunk), 1)
        blocked = asyncio.ensure_future(writer.write(chunk))
        ticks = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:
            await asyncio.sleep(0.01)  # the loop keeps running meanwhile
            ticks += 1
        assert not blocked.done() and ticks > 10
        got = bytearray()

        def drain() -> None:
            while len(got) < 5 * len(chunk):
                got.extend(os.read(r, 1 << 20))

        await asyncio.gather(asyncio.to_thread(drain), blocked)
        await writer.flush()
        assert bytes(got) == chunk * 5
        writer.close()
        os.close(r)
        os.close(w)

    asyncio.run(main())


def test_broken_pipe_surfaces():
    async def main() -> None:
        r, w = os.pipe()
        os.close(r)
        writer = FdWriter(w)
        await writer.write(b"x")
        with pytest.raises(BrokenPipeError):
            for _ in range(100):
                await writer.write(b"y")
                await asyncio.sleep(0.01)
        writer.close()
        os.close(w)

    asyncio.run(main())
