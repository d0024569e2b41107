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
them; the host serves them and sends no reply. Guest flag FLAG_BOUNCE: the guest has the
bounce disk, a read-only virtio-blk view of a host file of BOUNCE_SLOTS slots of
BOUNCE_SLOT bytes; a READ whose fuse_read_in.padding is slot + 1 may be answered with
BOUNCED (`bounced`) once the data is written at slot * BOUNCE_SLOT of that file, and the
guest reads it from there with O_DIRECT: one block request per MiB instead of 256 trips
of 4 KiB through the port (QEMU's chardev moves 4 KiB per step, each a guest interrupt
and read(2) under TCG). Guest flag FLAG_NEW_DIR: the guest takes NEW_DIR messages
(`new_dir`), which the host sends before a MKDIR's reply on exclusive mounts with no
before-hook: the new, empty directory's nodeid; the guest notes every name it sends for
creation there and answers a LOOKUP of any other name ENOENT itself. The host's own HELLO
flags stay 0.
"""

from __future__ import annotations

import struct

from matchlock.vfs._fuse import MAX_REQUEST, MAX_WRITE, FuseProtocolError, split_message

VFS_PROTOCOL_VERSION = 1
PORT_NAME = "matchlock.vfs"
HELLO = struct.Struct("<4sHHII")
MAGIC = b"MLVF"
FLAG_ATTR_PUSH = 1
FLAG_LOCAL_RELEASE = 2  # the guest answers RELEASE/RELEASEDIR itself: the host sends no reply
FLAG_BOUNCE = 4  # the guest reads READ data from the bounce disk when the host says so
FLAG_NEW_DIR = 8  # the guest answers LOOKUPs of absent names in directories made empty
GUEST_FLAGS = FLAG_ATTR_PUSH | FLAG_LOCAL_RELEASE | FLAG_BOUNCE | FLAG_NEW_DIR
# A host -> guest message that is no FUSE reply: fuse_out_header{len, error=ATTR_PUSH,
# unique=0} (unique 0 with a positive error is a FUSE notification; FUSE's own codes are
# < 16), then u64 nodeid, u64 the WRITE's unique, fuse_attr_out.
ATTR_PUSH = 1000
_PUSH = struct.Struct("<IiQQQ")
# A READ's reply whose data is in the bounce file: fuse_out_header{len, error=BOUNCED,
# unique of the READ}, then u32 the data's length, u32 the slot. FUSE errors are <= 0.
BOUNCED = 1001
_BOUNCED = struct.Struct("<IiQII")
BOUNCE_SLOTS = 16
BOUNCE_SLOT = MAX_WRITE  # a READ never asks for more (max_read)
BOUNCE_SERIAL = "ml-vfsbuf"
# A new, empty directory on an exclusive mount: fuse_out_header{len, error=NEW_DIR,
# unique=0}, then u64 its nodeid; sent just before the MKDIR's reply.
NEW_DIR = 1002
_NEW_DIR = struct.Struct("<IiQQ")


def bounced(unique: int, length: int, slot: int) -> bytes:
    return _BOUNCED.pack(_BOUNCED.size, BOUNCED, unique, length, slot)


def attr_push(nodeid: int, write_unique: int, attr_out: bytes) -> bytes:
    return _PUSH.pack(_PUSH.size + len(attr_out), ATTR_PUSH, 0, nodeid, write_unique) + attr_out


def new_dir(nodeid: int) -> bytes:
    return _NEW_DIR.pack(_NEW_DIR.size, NEW_DIR, 0, nodeid)


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
