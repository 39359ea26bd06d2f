"""DNS wire format for the proxy: dnslib, with a name decoder hardened for hostile input.

dnslib parses headers, questions and A/AAAA/CNAME data; names go through `_Buffer.decode_name`,
which replaces dnslib's recursive one: compression pointers must point backwards and past the
header (the proxy rewrites the ID, so a name read through a pointer into the header would read
differently upstream than here: a query checked as one name and resolved as another), at most 126 of
them per name (miekg/dns's limit), at most 255 octets per name, labels are kept as raw bytes
(dnslib's own decoder rejects non-UTF-8 labels and recurses on some pointer loops). Records of
other types are kept opaque: the proxy relays the upstream's bytes, so it only needs to understand
what it learns from.

`present` prints a name the way miekg/dns (Cilium's DNS library) does, so policy sees the same
qname Cilium would: `.`, space, `'`, `@`, `;`, `(`, `)`, `"` and `\\` inside a label are escaped
with a backslash, bytes outside printable ASCII as `\\DDD`. A label `api.github` therefore reads
`api\\.github` and can never pass for two labels.

Never raises anything but `WireError` on input bytes.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from dnslib import CNAME, QTYPE, RCODE, DNSBuffer, DNSLabel, DNSQuestion
from dnslib.buffer import BufferError as DNSLibBufferError
from dnslib.dns import DNSError as DNSLibError

# Header flag bits (RFC 1035 §4.1.1, RFC 4035 for AD/CD).
QR, AA, TC, RD, RA, Z, AD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0040, 0x0020, 0x0010
OPCODE_QUERY = 0
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A, TYPE_CNAME, TYPE_AAAA, CLASS_IN = 1, 5, 28, 1

HEADER_LEN = 12
_HEADER = struct.Struct("!6H")  # id, flags, qdcount, ancount, nscount, arcount
MAX_POINTERS = 126  # miekg/dns maxCompressionPointers
MAX_NAME_OCTETS = 255
_SPECIAL = frozenset(b".'@;()\" \\")
_PLAIN_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in _SPECIAL)  # printed as they are

Labels = tuple[bytes, ...]


class WireError(ValueError):
    """The bytes are not a DNS message we can read."""


_LIBRARY_ERRORS = (DNSLibBufferError, DNSLibError, struct.error, ValueError, IndexError)


class _Buffer(DNSBuffer):
    def decode_name(self, last: int = -1) -> DNSLabel:
        """dnslib's hook (CNAME data): our decoder, in dnslib's type."""
        return DNSLabel(list(self.labels()))

    def labels(self) -> Labels:
        """The name at the offset (compression followed, hardened), as raw labels."""
        data, pos = self.data, self.offset
        labels: list[bytes] = []
        octets, pointers, resume = 1, 0, None
        while True:
            if pos >= len(data):
                raise WireError("name runs past the end of the message")
            length = data[pos]
            kind = length & 0xC0
            if kind == 0xC0:
                if pos + 1 >= len(data):
                    raise WireError("truncated compression pointer")
                target = ((length & 0x3F) << 8) | data[pos + 1]
                pointers += 1
                if target >= pos or pointers > MAX_POINTERS:
                    raise WireError("compression pointer loop or forward pointer")
                if target < HEADER_LEN:
                    raise WireError("compression pointer into the header")
                if resume is None:
                    resume = pos + 2
                pos = target
            elif kind:
                raise WireError(f"unsupported label type 0x{kind:02x}")
            elif length == 0:
                pos += 1
                break
            else:
                label = bytes(data[pos + 1:pos + 1 + length])
                if len(label) < length:
                    raise WireError("label runs past the end of the message")
                octets += length + 1
                if octets > MAX_NAME_OCTETS:
                    raise WireError("name longer than 255 octets")
                labels.append(label)
                pos += 1 + length
        self.offset = resume if resume is not None else pos
        return tuple(labels)


def present(labels: Labels) -> str:
    """A name in presentation format as miekg/dns prints it (case kept, final dot)."""
    if not labels:
        return "."
    raw = b"".join(labels)
    if not raw.translate(None, _PLAIN_BYTES):  # nothing to escape (the usual name)
        return b".".join(labels).decode("ascii") + "."
    out = []
    for label in labels:
        text = []
        for b in label:
            if b in _SPECIAL:
                text.append("\\" + chr(b))
            elif b < 0x20 or b > 0x7E:
                text.append(f"\\{b:03d}")
            else:
                text.append(chr(b))
        out.append("".join(text))
    return ".".join(out) + "."


def fold(labels: Labels) -> Labels:
    """Labels compared as DNS compares names: ASCII case-insensitively."""
    return tuple(label.lower() for label in labels)


def type_name(rtype: int) -> str:
    return str(QTYPE[rtype])


def rcode_name(rcode: int) -> str:
    return str(RCODE[rcode])


# Messages and their parts are slotted dataclasses, treated as read-only: frozen ones cost about
# a microsecond more each to build, and a query builds several.
@dataclass(slots=True)
class Question:
    labels: Labels
    qtype: int
    qclass: int

    @property
    def name(self) -> str:
        return present(self.labels)

    @property
    def key(self) -> tuple[Labels, int, int]:
        return fold(self.labels), self.qtype, self.qclass

    def to_dnslib(self) -> DNSQuestion:
        return DNSQuestion(DNSLabel(list(self.labels)), self.qtype, self.qclass)


@dataclass(slots=True)
class Record:
    """One resource record; `value` is the address (A/AAAA) or the target labels (CNAME)."""
    labels: Labels
    rtype: int
    rclass: int
    ttl: int
    value: str | Labels | None = None


@dataclass(slots=True)
class Header:
    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def qr(self) -> bool:
        return bool(self.flags & QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def tc(self) -> bool:
        return bool(self.flags & TC)


@dataclass(slots=True)
class Message:
    header: Header
    questions: tuple[Question, ...]
    answers: tuple[Record, ...] | None  # None: sections after the question could not be read


def parse_header(data: bytes) -> Header:
    if len(data) < HEADER_LEN:
        raise WireError(f"{len(data)} bytes: shorter than a DNS header")
    return Header(*_HEADER.unpack_from(data))


_TYPE_CLASS = struct.Struct("!HH")


def _question(buf: _Buffer) -> Question:
    labels = buf.labels()
    if buf.offset + 4 > len(buf.data):
        raise WireError("question runs past the end of the message")
    qtype, qclass = _TYPE_CLASS.unpack_from(buf.data, buf.offset)
    buf.offset += 4
    return Question(labels, qtype, qclass)


def _record(buf: _Buffer) -> Record:
    labels = buf.labels()
    rtype, rclass, ttl, rdlength = buf.unpack("!HHIH")
    start = buf.offset
    if start + rdlength > len(buf.data):
        raise WireError("record data runs past the end of the message")
    value: str | Labels | None = None
    if rtype == TYPE_A and rclass == CLASS_IN:
        if rdlength != 4:
            raise WireError(f"A record with {rdlength} bytes of data")
        value = socket.inet_ntoa(buf.get(4))
    elif rtype == TYPE_AAAA and rclass == CLASS_IN:
        if rdlength != 16:
            raise WireError(f"AAAA record with {rdlength} bytes of data")
        value = str(ipaddress.IPv6Address(bytes(buf.get(16))))
    elif rtype == TYPE_CNAME:
        value = tuple(CNAME.parse(buf, rdlength).label.label)
        if buf.offset != start + rdlength:
            raise WireError("CNAME target does not fill its record")
    buf.offset = start + rdlength
    return Record(labels, rtype, rclass, ttl, value)


def parse(data: bytes, questions_only: bool = False, header: Header | None = None) -> Message:
    """Read a whole message (or only up to the questions); WireError if it is malformed.
    `header`: `parse_header(data)` when the caller has it already.

    Trailing bytes after the last record are ignored, as miekg/dns does."""
    message, rest_error = _parse(data, questions_only, header)
    if rest_error is not None:
        raise rest_error
    return message


def parse_questions_then_rest(data: bytes, header: Header | None = None,
                              ) -> tuple[Message, WireError | None]:
    """Header and questions (WireError if those fail); the rest, or why it could not be read."""
    return _parse(data, False, header)


def _parse(data: bytes, questions_only: bool, header: Header | None,
           ) -> tuple[Message, WireError | None]:
    if header is None:
        header = parse_header(data)
    buf = _Buffer(data)
    buf.offset = HEADER_LEN
    try:
        questions = tuple(_question(buf) for _ in range(header.qdcount))
    except WireError:
        raise
    except _LIBRARY_ERRORS as e:
        raise WireError(str(e)) from None
    if questions_only:
        return Message(header, questions, None), None
    try:
        answers = tuple(_record(buf) for _ in range(header.ancount))
        for _ in range(header.nscount + header.arcount):
            _record(buf)
    except WireError as e:
        return Message(header, questions, None), e
    except _LIBRARY_ERRORS as e:
        return Message(header, questions, None), WireError(str(e))
    return Message(header, questions, answers), None
