"""Sans-I/O DNS message codec (RFC 1035): just what the guest resolver needs.

`parse_message` accepts hostile bytes and either returns a `Message` or raises
`DnsFormatError` — nothing else. Bounds: the whole message, each name (255 octets, 63 per
label), the number of records, and compression pointers (they must point strictly backwards,
at most MAX_POINTERS per name, so loops are impossible).

Names are kept two ways: `labels` (the raw label bytes, for re-encoding exactly) and `name`,
the presentation form with '.' between labels and any byte outside letters, digits, '-' and
'_' escaped as \\DDD (a '.' inside a label becomes \\046), so a string check on `name` can
never be fooled by a label that contains a dot.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

# Record types and classes we name.
TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1

# Response codes.
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

OPCODE_QUERY = 0

# Flag bits.
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080

HEADER_LEN = 12
MAX_MESSAGE = 65535  # a DNS message can never be longer (TCP length prefix is 16 bits)
MAX_NAME = 255  # RFC 1035 §2.3.4, octets on the wire including length bytes
MAX_LABEL = 63
MAX_POINTERS = 32  # more jumps than labels in any legal name: a hostile message
MAX_RECORDS = 256  # per message, all sections together; far more than any real answer
_MIN_RR = 11  # root name (1) + type, class, ttl, rdlength (10)
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class DnsFormatError(ValueError):
    """The bytes are not a DNS message we accept (the remote side's fault)."""


@dataclass(frozen=True, slots=True)
class Question:
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int = CLASS_IN

    @property
    def name(self) -> str:
        return labels_to_name(self.labels)


@dataclass(frozen=True, slots=True)
class Record:
    labels: tuple[bytes, ...]
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes
    # decoded rdata: an address for A/AAAA, a presentation name for CNAME, else None
    value: str | None = None

    @property
    def name(self) -> str:
        return labels_to_name(self.labels)


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def labels_to_name(labels: tuple[bytes, ...]) -> str:
    """Presentation form; the root is ''. Bytes outside [A-Za-z0-9_-] become \\DDD."""
    out = []
    for label in labels:
        out.append("".join(chr(b) if b in _PLAIN else f"\\{b:03d}" for b in label))
    return ".".join(out)


def name_to_labels(name: str) -> tuple[bytes, ...]:
    """Encode a plain host name (no escapes); raises DnsFormatError if it cannot be one."""
    name = name.rstrip(".") if name != "." else ""
    if not name:
        return ()
    try:
        labels = tuple(part.encode("ascii") for part in name.split("."))
    except UnicodeEncodeError:
        raise DnsFormatError(f"name {name!r} is not ASCII") from None
    if any(not label or len(label) > MAX_LABEL for label in labels):
        raise DnsFormatError(f"name {name!r} has an empty or over-long label")
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME:
        raise DnsFormatError(f"name {name!r} is longer than {MAX_NAME} octets")
    return labels


# -- parsing -------------------------------------------------------------------------------

def _read_name(data: bytes, pos: int) -> tuple[tuple[bytes, ...], int]:
    """Read a possibly compressed name at `pos`; return (labels, position after it)."""
    labels: list[bytes] = []
    total = 1
    end = -1  # where parsing resumes in the original stream after the first pointer
    jumps = 0
    limit = len(data)
    while True:
        if pos >= limit:
            raise DnsFormatError("name runs past the end of the message")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= limit:
                raise DnsFormatError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= pos:  # only strictly backwards: no loops, no forward references
                raise DnsFormatError("compression pointer does not point backwards")
            jumps += 1
            if jumps > MAX_POINTERS:
                raise DnsFormatError("too many compression pointers")
            if end < 0:
                end = pos + 2
            limit = pos  # a name reached through a pointer must stay before the pointer
            pos = target
            continue
        if kind != 0:
            raise DnsFormatError(f"unsupported label type 0x{kind:02x}")
        if length == 0:
            return tuple(labels), (end if end >= 0 else pos + 1)
        total += length + 1
        if total > MAX_NAME:
            raise DnsFormatError("name longer than 255 octets")
        if pos + 1 + length > limit:
            raise DnsFormatError("label runs past the end of the message")
        labels.append(bytes(data[pos + 1:pos + 1 + length]))
        pos += 1 + length


def _read_record(data: bytes, pos: int) -> tuple[Record, int]:
    labels, pos = _read_name(data, pos)
    if pos + 10 > len(data):
        raise DnsFormatError("truncated resource record")
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
    pos += 10
    if pos + rdlen > len(data):
        raise DnsFormatError("record data runs past the end of the message")
    rdata = bytes(data[pos:pos + rdlen])
    value: str | None = None
    if rclass == CLASS_IN and rtype == TYPE_A:
        if rdlen != 4:
            raise DnsFormatError("A record data is not 4 bytes")
        value = str(ipaddress.IPv4Address(rdata))
    elif rclass == CLASS_IN and rtype == TYPE_AAAA:
        if rdlen != 16:
            raise DnsFormatError("AAAA record data is not 16 bytes")
        value = str(ipaddress.IPv6Address(rdata))
    elif rtype == TYPE_CNAME:
        target, after = _read_name(data[:pos + rdlen], pos)
        if after != pos + rdlen:
            raise DnsFormatError("CNAME data has trailing bytes")
        value = labels_to_name(target)
    if ttl & 0x80000000:  # RFC 2181 §8: treat a TTL with the top bit set as zero
        ttl = 0
    return Record(labels, rtype, rclass, ttl, rdata, value), pos + rdlen


def parse_message(data: bytes) -> Message:
    """Parse one DNS message; hostile input raises DnsFormatError and nothing else."""
    try:
        return _parse(bytes(data))
    except DnsFormatError:
        raise
    except Exception as e:  # a bug must not become a crash on hostile input
        raise DnsFormatError(f"malformed message ({type(e).__name__})") from None


def _parse(data: bytes) -> Message:
    if len(data) < HEADER_LEN:
        raise DnsFormatError("shorter than a DNS header")
    if len(data) > MAX_MESSAGE:
        raise DnsFormatError("longer than any DNS message")
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data, 0)
    if qd + an + ns + ar > MAX_RECORDS:
        raise DnsFormatError("too many records")
    if qd * 5 + (an + ns + ar) * _MIN_RR > len(data) - HEADER_LEN:
        raise DnsFormatError("record counts exceed the message length")
    pos = HEADER_LEN
    questions = []
    for _ in range(qd):
        labels, pos = _read_name(data, pos)
        if pos + 4 > len(data):
            raise DnsFormatError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        questions.append(Question(labels, qtype, qclass))
    sections: list[list[Record]] = [[], [], []]
    for section, count in zip(sections, (an, ns, ar), strict=True):
        for _ in range(count):
            record, pos = _read_record(data, pos)
            section.append(record)
    return Message(ident, flags, tuple(questions), *(tuple(s) for s in sections))


# -- building ------------------------------------------------------------------------------

def _encode_labels(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def build_query(ident: int, name: str, qtype: int = TYPE_A, *, recursion: bool = True) -> bytes:
    """A one-question query for a plain host name."""
    flags = FLAG_RD if recursion else 0
    header = struct.pack("!HHHHHH", ident & 0xFFFF, flags, 1, 0, 0, 0)
    return header + _encode_labels(name_to_labels(name)) + struct.pack("!HH", qtype, CLASS_IN)


def build_response(query: Message, rcode: int = NOERROR, *,
                   addresses: tuple[str, ...] | list[str] = (), ttl: int = 0) -> bytes:
    """Answer `query` (its id, RD bit and first question echoed) with `rcode` and, for
    NOERROR, one A or AAAA record per address, owned by the question name (a compression
    pointer to it). `addresses` must all be of the question's type."""
    flags = FLAG_QR | FLAG_RA | (query.flags & FLAG_RD) | (query.opcode << 11) | (rcode & 0xF)
    question = query.questions[0] if query.questions else None
    answers = []
    if question is not None and rcode == NOERROR:
        for ip in addresses:
            addr = ipaddress.ip_address(ip)
            rtype = TYPE_A if addr.version == 4 else TYPE_AAAA
            answers.append(struct.pack("!HHHIH", 0xC00C, rtype, CLASS_IN,
                                       max(0, min(int(ttl), 0x7FFFFFFF)), len(addr.packed))
                           + addr.packed)
    elif addresses:
        raise ValueError("addresses given for an empty or error response")
    header = struct.pack("!HHHHHH", query.id, flags, 1 if question else 0, len(answers), 0, 0)
    body = b""
    if question is not None:
        body = _encode_labels(question.labels) + struct.pack("!HH", question.qtype,
                                                             question.qclass)
    return header + body + b"".join(answers)


def build_error(ident: int, flags: int, rcode: int) -> bytes:
    """A question-less error reply (e.g. FORMERR for a query we could not parse)."""
    out_flags = FLAG_QR | FLAG_RA | (flags & FLAG_RD) | (flags & 0x7800) | (rcode & 0xF)
    return struct.pack("!HHHHHH", ident & 0xFFFF, out_flags, 0, 0, 0, 0)
