"""The VFS port's framing (docs/channel-protocol.md, "VFS port"), sans-I/O.

Each side sends a 16-byte HELLO first: b"MLVF", u16 version, u16 flags, u32 the
largest message it sends, u32 0; little endian like the FUSE messages that follow. Then
the guest sends FUSE requests and the host FUSE replies, each delimited by its own
header's length field. `VfsConnection` splits the guest's bytes into requests.

Guest flag FLAG_ATTR_PUSH: the guest takes ATTR_PUSH messages (`attr_push`), which the
host sends before a WRITE's reply on exclusive mounts: the node's attributes after the
write, which the guest's `fused` uses to answer the kernel's next GETATTR of that node
itself (the kernel always asks after a write). Guest flag FLAG_LOCAL_RELEASE: the guest
answers RELEASE and RELEASEDIR itself (the kernel ignores their result) and still sends
them; the host serves them and sends no reply. The host's own HELLO flags stay 0.
"""

from __future__ import annotations

import struct

from matchlock.vfs._fuse import MAX_REQUEST, FuseProtocolError, split_message

VFS_PROTOCOL_VERSION = 1
PORT_NAME = "matchlock.vfs"
HELLO = struct.Struct("<4sHHII")
MAGIC = b"MLVF"
FLAG_ATTR_PUSH = 1
FLAG_LOCAL_RELEASE = 2  # the guest answers RELEASE/RELEASEDIR itself: the host sends no reply
GUEST_FLAGS = FLAG_ATTR_PUSH | FLAG_LOCAL_RELEASE
# A host -> guest message that is no FUSE reply: fuse_out_header{len, error=ATTR_PUSH,
# unique=0} (unique 0 with a positive error is a FUSE notification; FUSE's own codes are
# < 16), then u64 nodeid, u64 the WRITE's unique, fuse_attr_out.
ATTR_PUSH = 1000
_PUSH = struct.Struct("<IiQQQ")


def attr_push(nodeid: int, write_unique: int, attr_out: bytes) -> bytes:
    return _PUSH.pack(_PUSH.size + len(attr_out), ATTR_PUSH, 0, nodeid, write_unique) + attr_out


def hello(max_message: int = MAX_REQUEST) -> bytes:
    return HELLO.pack(MAGIC, VFS_PROTOCOL_VERSION, 0, max_message, 0)


class VfsConnection:
    """Guest bytes in (`receive_data`), complete FUSE request messages out (`messages`)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.hello_seen = False
        self.guest_max = 0
        self.guest_flags = 0

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
            if flags & ~GUEST_FLAGS:
                raise FuseProtocolError(f"guest VFS HELLO flags {flags:#x}")
            self.hello_seen = True
            self.guest_max = max_msg
            self.guest_flags = flags
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
