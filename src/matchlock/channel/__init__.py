"""Host <-> guest channel: a sans-I/O core for the framed protocol in docs/channel-protocol.md.

No networking here: feed bytes to `ChannelConnection.receive_data`, pull events with
`next_event`, and write what `send` returns. The asyncio transport lives elsewhere.
"""

from matchlock.channel._connection import CLOSED, NEED_DATA, ChannelConnection
from matchlock.channel._frames import (
    DEFAULT_WINDOW,
    F_MORE,
    HEADER_SIZE,
    MAX_JSON_PAYLOAD,
    MAX_OPEN_STREAMS,
    MAX_PAYLOAD,
    MAX_REQUEST,
    MAX_WINDOW,
    PROTOCOL_VERSION,
    ChannelError,
    Data,
    Eof,
    Event,
    Exit,
    GoAway,
    Hello,
    LocalChannelError,
    Open,
    RemoteChannelError,
    Reply,
    Reset,
    Resize,
    Signal,
    Window,
)

__all__ = [
    "CLOSED",
    "DEFAULT_WINDOW",
    "F_MORE",
    "HEADER_SIZE",
    "MAX_JSON_PAYLOAD",
    "MAX_OPEN_STREAMS",
    "MAX_PAYLOAD",
    "MAX_REQUEST",
    "MAX_WINDOW",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "ChannelConnection",
    "ChannelError",
    "Data",
    "Eof",
    "Event",
    "Exit",
    "GoAway",
    "Hello",
    "LocalChannelError",
    "Open",
    "RemoteChannelError",
    "Reply",
    "Reset",
    "Resize",
    "Signal",
    "Window",
]
