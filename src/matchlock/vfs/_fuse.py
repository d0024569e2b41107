"""The FUSE kernel ABI (linux/fuse.h) as the host speaks it: constants, struct layouts,
request splitting and reply encoding. Sans-I/O: bytes in, `Request`s out, bytes back.

The guest's `fused` relays the kernel's FUSE messages unchanged over the `matchlock.vfs`
port (docs/channel-protocol.md, "VFS port"), so these are the kernel's own structures.
Everything here is hostile input: a guest root can kill `fused` and write anything to the
port, so lengths are checked before any slicing and a bad message is a protocol error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from matchlock.errors import GuestError

# FUSE 7.31: every feature used here (max_pages, cache_symlinks, readdirplus, writeback
# cache) exists by then; Debian 6.1 offers 7.37. Newer minors only add optional fields.
KERNEL_MAJOR = 7
KERNEL_MINOR = 31
MIN_KERNEL_MINOR = 28  # FUSE_MAX_PAGES (1 MiB requests) arrived in 7.28

# Largest WRITE/READ payload: 256 pages. One request per MiB keeps the port busy and the
# per-request cost (one round trip, one Python dispatch) small against the copy.
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
# A request is its header, a write_in and the payload, plus slack for name arguments.
MAX_REQUEST = MAX_WRITE + 4096
MAX_NAME = 255  # NAME_MAX: the guest kernel never sends longer; refuse if one arrives
MAX_SYMLINK = 4095  # PATH_MAX - 1

ROOT_ID = 1

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = (
    8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = (
    18, 20, 21, 22, 23, 24, 25, 26)
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS = (
    27, 28, 29, 30, 31, 32, 33, 34)
CREATE, INTERRUPT, BMAP, DESTROY, IOCTL, POLL = 35, 36, 37, 38, 39, 40
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = 42, 43, 44, 45, 46, 47
SYNCFS, TMPFILE = 50, 51

OP_NAMES = {v: k.lower() for k, v in dict(
    LOOKUP=LOOKUP, FORGET=FORGET, GETATTR=GETATTR, SETATTR=SETATTR, READLINK=READLINK,
    SYMLINK=SYMLINK, MKNOD=MKNOD, MKDIR=MKDIR, UNLINK=UNLINK, RMDIR=RMDIR, RENAME=RENAME,
    LINK=LINK, OPEN=OPEN, READ=READ, WRITE=WRITE, STATFS=STATFS, RELEASE=RELEASE,
    FSYNC=FSYNC, SETXATTR=SETXATTR, GETXATTR=GETXATTR, LISTXATTR=LISTXATTR,
    REMOVEXATTR=REMOVEXATTR, FLUSH=FLUSH, INIT=INIT, OPENDIR=OPENDIR, READDIR=READDIR,
    RELEASEDIR=RELEASEDIR, FSYNCDIR=FSYNCDIR, GETLK=GETLK, SETLK=SETLK, SETLKW=SETLKW,
    ACCESS=ACCESS, CREATE=CREATE, INTERRUPT=INTERRUPT, BMAP=BMAP, DESTROY=DESTROY,
    IOCTL=IOCTL, POLL=POLL, BATCH_FORGET=BATCH_FORGET, FALLOCATE=FALLOCATE,
    READDIRPLUS=READDIRPLUS, RENAME2=RENAME2, LSEEK=LSEEK, COPY_FILE_RANGE=COPY_FILE_RANGE,
    SYNCFS=SYNCFS, TMPFILE=TMPFILE,
).items()}

# INIT flags
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
MAX_PAGES_FLAG = 1 << 22
CACHE_SYMLINKS = 1 << 23

# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_LOCKOWNER, FATTR_CTIME = 1 << 7, 1 << 8, 1 << 9, 1 << 10

# open_out flags
FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_NONSEEKABLE, FOPEN_CACHE_DIR = 1, 2, 4, 8

GETATTR_FH = 1
FSYNC_FDATASYNC = 1
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4

IN_HEADER = struct.Struct("<IIQQIIIHH")   # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")        # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime a/m/cnsec mode nlink
#                                           uid gid rdev blksize flags
ENTRY = struct.Struct("<QQQQII")          # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT = struct.Struct("<QII")          # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")          # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
OPEN_OUT = struct.Struct("<QII")
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIII4x24x")
DIRENT = struct.Struct("<QQII")
XATTR_OUT = struct.Struct("<II")
LSEEK_OUT = struct.Struct("<Q")

# Request bodies (first field offsets follow the header).
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
RELEASE_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
SETXATTR_IN = struct.Struct("<II")        # size flags (the 7.33 extension is not negotiated)
GETXATTR_IN = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
INTERRUPT_IN = struct.Struct("<Q")

S_IFMT = 0o170000


class FuseProtocolError(GuestError):
    """The guest sent something that is not a FUSE request (or not one we can parse)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One FUSE request: the header fields and the raw body after the header."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview

    @property
    def name(self) -> str:
        return OP_NAMES.get(self.opcode, f"op{self.opcode}")


@dataclass(slots=True)
class Attr:
    """What a provider reports for one file: st_* fields with times in ns."""

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    blksize: int = 4096

    def pack(self) -> bytes:
        a, m, c = self.atime_ns, self.mtime_ns, self.ctime_ns
        return ATTR.pack(
            self.ino & 0xFFFFFFFFFFFFFFFF, self.size, self.blocks,
            max(a, 0) // 1_000_000_000, max(m, 0) // 1_000_000_000, max(c, 0) // 1_000_000_000,
            max(a, 0) % 1_000_000_000, max(m, 0) % 1_000_000_000, max(c, 0) % 1_000_000_000,
            self.mode, self.nlink, self.uid & 0xFFFFFFFF, self.gid & 0xFFFFFFFF,
            self.rdev & 0xFFFFFFFF, self.blksize, 0,
        )


def split_message(buf: bytes | bytearray, offset: int = 0) -> int:
    """Length of the complete message at `offset`, or 0 if more bytes are needed."""
    if len(buf) - offset < IN_HEADER.size:
        return 0
    (length,) = struct.unpack_from("<I", buf, offset)
    if length < IN_HEADER.size or length > MAX_REQUEST:
        raise FuseProtocolError(f"FUSE message length {length} out of range")
    return length if len(buf) - offset >= length else 0


def parse_request(msg: memoryview) -> Request:
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(msg, 0)
    if length != len(msg):
        raise FuseProtocolError("FUSE header length does not match the message")
    body = msg[IN_HEADER.size:]
    if extlen:  # extensions (security context, supplementary groups) are never negotiated
        ext = extlen * 8
        if ext > len(body):
            raise FuseProtocolError("FUSE extension length exceeds the message")
        body = body[: len(body) - ext]
    return Request(opcode, unique, nodeid, uid, gid, pid, body)


def reply(unique: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def reply_parts(unique: int, parts: list[bytes]) -> list[bytes]:
    """A reply as buffers for writev-style sending (READ data is not copied)."""
    n = sum(len(p) for p in parts)
    return [OUT_HEADER.pack(OUT_HEADER.size + n, 0, unique), *parts]


def reply_error(unique: int, errno_: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -errno_, unique)


def entry_out(nodeid: int, attr: Attr | None, entry_ttl: float, attr_ttl: float) -> bytes:
    """fuse_entry_out; nodeid 0 with attr None is a cacheable negative entry."""
    es, ens = _ttl(entry_ttl)
    as_, ans = _ttl(attr_ttl)
    head = ENTRY.pack(nodeid, 0, es, as_, ens, ans)
    return head + (attr.pack() if attr is not None else bytes(ATTR.size))


def attr_out(attr: Attr, ttl: float) -> bytes:
    s, ns = _ttl(ttl)
    return ATTR_OUT.pack(s, ns, 0) + attr.pack()


def _ttl(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    ent = DIRENT.pack(ino, off, len(name), dtype) + name
    return ent + b"\0" * (-len(ent) % 8)


def cstring(body: memoryview, start: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated string in `body` from `start`: (bytes, offset after the NUL)."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    if end < 0:
        raise FuseProtocolError("unterminated string in a FUSE request")
    return raw[:end], start + end + 1


def need(body: memoryview, st: struct.Struct) -> tuple:
    if len(body) < st.size:
        raise FuseProtocolError(f"FUSE request body of {len(body)} bytes, need {st.size}")
    return st.unpack_from(body, 0)
