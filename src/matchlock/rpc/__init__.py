"""The request dispatcher and its NDJSON JSON-RPC codec (spec/rpc-protocol.md).

`_codec` is sans-I/O (lines <-> messages); `_dispatcher.Session` maps requests onto a
`Target` (one VM); `server.serve_stream` is the asyncio shell for one connection."""

from matchlock.rpc._codec import (
    MAX_LINE,
    FrameDecoder,
    Invalid,
    LineDecoder,
    Notification,
    ProtocolError,
    Raw,
    Request,
    Response,
    decode_request,
    decode_server_line,
    encode_data,
    encode_error,
    encode_input,
    encode_notification,
    encode_raw,
    encode_request,
    encode_result,
)

__all__ = [
    "MAX_LINE",
    "FrameDecoder",
    "Invalid",
    "LineDecoder",
    "Notification",
    "ProtocolError",
    "Raw",
    "Request",
    "Response",
    "decode_request",
    "decode_server_line",
    "encode_data",
    "encode_error",
    "encode_input",
    "encode_notification",
    "encode_raw",
    "encode_request",
    "encode_result",
]
