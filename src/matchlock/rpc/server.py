"""The asyncio shell around `Session`: one stream connection (a control-socket client
today, `matchlock rpc`'s stdio next) served line by line."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from matchlock.rpc._codec import MAX_LINE, FrameDecoder, ProtocolError, Raw
from matchlock.rpc._dispatcher import Session, Target

log = logging.getLogger(__name__)

READ_SIZE = 1 << 18
# Bytes a client may leave unread before its requests wait: bounds memory per client.
WRITE_HIGH_WATER = 1 << 20


class StreamOutbox:
    """`send` for a Session over an asyncio StreamWriter: waits while the client's
    buffer is over the high-water mark, fails once the client is gone."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._w = writer
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def send(self, data: bytes) -> None:
        if self._w.is_closing():
            raise ConnectionResetError("the client went away")
        self._w.write(data)
        await self._w.drain()


async def serve_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       target: Target, *, max_line: int = MAX_LINE) -> None:
    """Serve one client until it disconnects or sends `close`."""
    out = StreamOutbox(writer)
    session = Session(target, out.send)
    decoder = FrameDecoder(max_line)
    try:
        while not session.closed:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            decoder.feed(data)
            while (item := decoder.next_item()) is not None:
                if isinstance(item, Raw):
                    await session.handle_raw(item)
                elif not await session.handle_line(item):
                    break
    except ProtocolError as e:
        log.debug("client broke the framing: %s", e)
    except (ConnectionError, OSError) as e:
        log.debug("client connection failed: %s", e)
    finally:
        await session.shutdown()
        with contextlib.suppress(ConnectionError, OSError):
            if not writer.is_closing():
                await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
