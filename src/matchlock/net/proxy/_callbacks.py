"""Asking the SDK for a network hook verdict (spec/rpc-protocol.md §4.1): one new Unix
connection per call, one JSON line each way, under the rule's deadline. Awaited, never
blocking the proxy's loop; every failure raises CallbackFailed (the caller blocks)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

from ._rules import MAX_CALLBACK_REPLY, CallbackFailed, CallbackVerdict, parse_callback_reply


def allowed_peer_uids() -> frozenset[int]:
    """Whose socket the proxy may talk to: the user who runs matchlock, or under sudo the
    user who ran sudo (never root then). The socket path comes from the RPC client: the
    peer check keeps it from pointing the (possibly root) proxy at another service's
    socket, symlinks and swapped files included."""
    sudo = os.environ.get("SUDO_UID", "")
    if os.geteuid() == 0 and sudo.isdigit():
        return frozenset({int(sudo)})
    return frozenset({os.getuid()})


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


async def ask(socket_path: str, line: bytes, timeout: float,
              peers: frozenset[int] | None = None) -> CallbackVerdict:
    peers = allowed_peer_uids() if peers is None else peers
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(
                socket_path, limit=MAX_CALLBACK_REPLY)
            uid = _peer_uid(writer)
            if uid not in peers:
                raise CallbackFailed(f"the callback socket belongs to uid {uid}, not to the "
                                     "SDK's user")
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
