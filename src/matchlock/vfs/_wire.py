"""The VFS port's framing (docs/channel-protocol.md, "VFS port"), sans-I/O.

Each side sends a 16-byte HELLO first: b"MLVF", u16 version, u16 flags (0), u32 the
largest message it sends, u32 0; little endian like the FUSE messages that follow. Then
the guest sends FUSE requests and the host FUSE replies, each delimited by its own
header's length field. `VfsConnection` splits the guest's bytes into requests.
"""

from __future__ import annotations

import struct

from matchlock.vfs._fuse import MAX_REQUEST, FuseProtocolError, split_message

VFS_PROTOCOL_VERSION = 1
PORT_NAME = "matchlock.vfs"
HELLO = struct.Struct("<4sHHII")
MAGIC = b"MLVF"


def hello(max_message: int = MAX_REQUEST) -> bytes:
    return HELLO.pack(MAGIC, VFS_PROTOCOL_VERSION, 0, max_message, 0)


class VfsConnection:
    """Guest bytes in (`receive_data`), complete FUSE request messages out (`messages`)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.hello_seen = False
        self.guest_max = 0

    def receive_data(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        off = 0
        if not self.hello_seen:
            if len(buf) < HELLO.size:
                return []
            magic, version, flags, max_msg, _ = HELLO.unpack_from(buf, 0)
            if magic != MAGIC:
                raise FuseProtocolError("the guest's VFS HELLO has a bad magic")
            if version != VFS_PROTOCOL_VERSION:
                raise FuseProtocolError(
                    f"guest VFS protocol {version}, host {VFS_PROTOCOL_VERSION}")
            if flags:
                raise FuseProtocolError(f"guest VFS HELLO flags {flags:#x}")
            self.hello_seen = True
            self.guest_max = max_msg
            off = HELLO.size
        out = []
        with memoryview(buf) as mv:
            while True:
                n = split_message(buf, off)
                if not n:
                    break
                out.append(mv[off:off + n].tobytes())
                off += n
        if off:
            del buf[:off]
        if len(buf) > MAX_REQUEST:  # cannot happen after split_message; a bound anyway
            raise FuseProtocolError("VFS receive buffer overflow")
        return out
