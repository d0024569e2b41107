"""Asking the SDK for a network hook verdict (spec/rpc-protocol.md §4.1): one new Unix
connection per call, one JSON line each way, under the rule's deadline. Awaited, never
blocking the proxy's loop; every failure raises CallbackFailed (the caller blocks)."""

from __future__ import annotations

import asyncio
import contextlib

from ._rules import MAX_CALLBACK_REPLY, CallbackFailed, CallbackVerdict, parse_callback_reply


async def ask(socket_path: str, line: bytes, timeout: float) -> CallbackVerdict:
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(
                socket_path, limit=MAX_CALLBACK_REPLY)
            writer.write(line)
            await writer.drain()
            reply = await reader.readline()
    except TimeoutError:
        raise CallbackFailed(f"no reply within {timeout * 1000:.0f} ms") from None
    except (asyncio.LimitOverrunError, ValueError):
        raise CallbackFailed(f"reply longer than {MAX_CALLBACK_REPLY} bytes") from None
    except OSError as e:
        raise CallbackFailed(f"cannot reach the callback socket: {type(e).__name__}: "
                             f"{e.strerror or e}") from None
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
    if not reply.endswith(b"\n") and not reply:
        raise CallbackFailed("the SDK closed the connection without a reply")
    return parse_callback_reply(reply)
