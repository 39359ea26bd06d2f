"""The DNS proxy's chain, sans-IO: parse → policy → forward → learn → release.

Each step is a function (or, for forward, a small table) of values in, values out; the asyncio
server in `server.py` only moves bytes between sockets and calls them in this order:

    query = parse_query(data)                         # DNSProtocolError: FORMERR/NOTIMP/drop
    verdict = check_policy(oracle, query, server)     # denied: refusal(query, REFUSED|NXDOMAIN)
    pending = outstanding.register(upstream, query, server)   # bytes to send to `server`
    pending, response = outstanding.match(upstream, data, source)  # Mismatch: discard, wait on
    learned = learn(query, response)                  # then `await oracle.learn(...)`
    reply = release(response, query)                  # the upstream's bytes, client's ID back

Errors follow h11's habit: one exception type, `DNSProtocolError`, carries what the client gets
(an rcode and the reply bytes, or nothing at all).

Decisions (Cilium's DNS server library, miekg/dns, is the reference for what a query may be):
  * fewer than 12 bytes, or the QR bit set (a response sent to us) → dropped, no reply;
  * opcode other than QUERY (IQUERY, STATUS, NOTIFY, UPDATE, ...) → NOTIMP;
  * QDCOUNT ≠ 1, ANCOUNT > 1, NSCOUNT > 1, ARCOUNT > 2, or any part of the message we cannot
    read (truncated, pointer loop, forward pointer, name > 255 octets, bad label type, a record
    announced but missing) → FORMERR. These replies carry the request's ID, opcode, RD and CD
    bits, no question and no records. Trailing bytes after the last record are ignored.
  * The qname policy sees is miekg's presentation of the wire name, lower-cased, final dot.
  * Denied → REFUSED (or NXDOMAIN if configured) = request ID/opcode/RD/CD, QR set, the question
    copied, no records (miekg `SetRcode`, what Cilium sends). Oracle failure → SERVFAIL.
  * Forwarded: the client's bytes unchanged except the ID, which is replaced by a fresh random
    one per upstream (restored on release), to the server the client addressed.
  * An upstream message is accepted only if it comes from that server's address, is a response,
    carries an outstanding ID on that upstream socket/connection and echoes the question
    (name compared case-insensitively, type, class). Anything else is discarded and the query
    keeps waiting. A response whose sections after the question cannot be read is discarded too,
    unless it is truncated (TC): then it is relayed and nothing is learned (the client retries
    over TCP, which the proxy also sees).
  * Learning, exactly as Cilium's `ExtractMsgDetails`: the answer section must follow the CNAME
    chain from the question name (each record owned by the current name, a CNAME moves it to its
    target); otherwise the response is replaced by SERVFAIL. All A/AAAA (class IN) are attributed
    to the question name; TTL = min over A/AAAA/CNAME. Only NOERROR answers with ≥ 1 address are
    learned.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from dnslib import DNSHeader, DNSRecord

from proxy.fqdn.matchpattern import normalize_name
from proxy.l7.dns import wire
from proxy.l7.dns.wire import (CD, CLASS_IN, FORMERR, NOERROR, NOTIMP, QR, RD, REFUSED, SERVFAIL,
                               TC, TYPE_A, TYPE_AAAA, TYPE_CNAME, Labels, Question, WireError)
from proxy.l7.oracle import L7Result, PolicyOracle
from proxy.policy.ipaddr import canonical_ip


# -- errors ---------------------------------------------------------------------------------------
class DNSProtocolError(Exception):
    """A query we will not forward. `reply` is what the client gets (None: nothing at all)."""

    def __init__(self, reason: str, rcode: int | None = None, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rcode = rcode
        self.reply = reply


class Mismatch(Exception):
    """An upstream message that answers no outstanding query: discard it, keep waiting."""


# -- 1. parse -------------------------------------------------------------------------------------
# Messages and their parts are slotted dataclasses, treated as read-only: frozen ones cost about
# a microsecond more each to build, and a query builds several.
@dataclass(slots=True)
class Query:
    raw: bytes
    header: wire.Header
    question: Question
    qname: str  # what policy sees: presentation format, lower-case, final dot

    @property
    def id(self) -> int:
        return self.header.id

    @property
    def qtype_name(self) -> str:
        return wire.type_name(self.question.qtype)


def error_reply(header: wire.Header, rcode: int, question: Question | None = None) -> bytes:
    """A reply built from a request's header: ID, opcode, RD, CD kept; QR and `rcode` set."""
    flags = QR | (header.opcode << 11) | (header.flags & (RD | CD)) | (rcode & 0xF)
    h = DNSHeader(id=header.id, bitmap=flags)
    record = DNSRecord(h, q=question.to_dnslib() if question else None)
    return record.pack()


def parse_query(data: bytes) -> Query:
    """Step 1: bytes from the client → a Query, or DNSProtocolError saying what to answer."""
    try:
        header = wire.parse_header(data)
    except WireError as e:
        raise DNSProtocolError(str(e)) from None
    if header.qr:
        raise DNSProtocolError("a response, not a query")

    def fail(reason: str, rcode: int) -> DNSProtocolError:
        return DNSProtocolError(reason, rcode, error_reply(header, rcode))

    if header.opcode != wire.OPCODE_QUERY:
        raise fail(f"opcode {header.opcode} is not QUERY", NOTIMP)
    if header.qdcount != 1:
        raise fail(f"{header.qdcount} questions", FORMERR)
    if header.ancount > 1 or header.nscount > 1 or header.arcount > 2:
        raise fail("too many records for a query", FORMERR)
    try:
        msg = wire.parse(data, header=header)
    except WireError as e:
        raise fail(f"unreadable: {e}", FORMERR) from None
    question = msg.questions[0]
    return Query(bytes(data), header, question, normalize_name(question.name.lower()))


# -- 2. policy ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Destination:
    """Where the client sent its query (the original destination): the server we forward to."""
    ip: str
    port: int
    proto: str  # "UDP" | "TCP"


@dataclass(slots=True)
class Verdict:
    allowed: bool
    result: L7Result | None = None
    reason: str = ""


def check_policy(oracle: PolicyOracle, query: Query, server: Destination) -> Verdict:
    """Step 2: may this workload ask `server` for `query.qname`? Oracle errors → SERVFAIL."""
    try:
        result = oracle.dns_verdict(server.ip, server.port, server.proto, query.qname)
    except Exception as e:  # noqa: BLE001 - any failure of the oracle is an internal error
        raise DNSProtocolError(f"policy lookup failed: {e!r}", SERVFAIL,
                               error_reply(query.header, SERVFAIL, query.question)) from None
    return Verdict(result.allowed, result, result.reason)


def refusal(query: Query, rcode: int = REFUSED) -> bytes:
    """The answer to a denied query: REFUSED (or NXDOMAIN), question copied, no records."""
    return error_reply(query.header, rcode, query.question)


# -- 3. forward -----------------------------------------------------------------------------------
@dataclass(eq=False)
class Pending:
    """One forwarded query: send `wire` to `server` on `upstream`, wait for its answer."""
    upstream: Hashable
    upstream_id: int
    query: Query
    server: Destination
    wire: bytes


@dataclass(slots=True)
class Response:
    raw: bytes
    message: wire.Message

    @property
    def rcode(self) -> int:
        return self.message.header.rcode


class RandomIDs:
    """Unpredictable 16-bit query IDs (the answer spoofer must guess them), drawn from the
    kernel's CSPRNG 4 KiB at a time: one getrandom() call per ID (secrets.randbelow) was ~4%
    of a proxied query."""
    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: list[int] = []

    def next(self) -> int:
        ids = self._ids
        if not ids:
            raw = os.urandom(4096)
            ids.extend(struct.unpack(f"!{len(raw) // 2}H", raw))
        return ids.pop()


@dataclass
class Outstanding:
    """Forwarded queries by (upstream socket or connection, upstream ID); answers are matched
    against the ID, the question and the source address.

    At most `max_per_upstream` queries wait on one upstream (beyond: SERVFAIL): a client that
    never lets its queries be answered cannot use up the 65536 IDs, after which no free ID would
    be found."""
    _by_key: dict[tuple[Hashable, int], Pending] = field(default_factory=dict)
    random_id: Callable[[], int] = field(default_factory=lambda: RandomIDs().next, repr=False)
    max_per_upstream: int = 1024
    _per_upstream: dict[Hashable, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self._by_key)

    def register(self, upstream: Hashable, query: Query, server: Destination,
                 upstream_id: int | None = None) -> Pending:
        waiting = self._per_upstream.get(upstream, 0)
        if waiting >= self.max_per_upstream:
            raise DNSProtocolError(f"{waiting} queries already wait on this upstream", SERVFAIL,
                                   error_reply(query.header, SERVFAIL, query.question))
        if upstream_id is None:
            upstream_id = self.random_id()
            while (upstream, upstream_id) in self._by_key:
                upstream_id = self.random_id()
        elif (upstream, upstream_id) in self._by_key:
            raise ValueError("upstream ID already outstanding")
        pending = Pending(upstream, upstream_id, query, server,
                          struct.pack("!H", upstream_id) + query.raw[2:])
        self._by_key[(upstream, upstream_id)] = pending
        self._per_upstream[upstream] = waiting + 1
        return pending

    def cancel(self, pending: Pending) -> None:
        if self._by_key.get((pending.upstream, pending.upstream_id)) is pending:
            del self._by_key[(pending.upstream, pending.upstream_id)]
            upstream = pending.upstream
            waiting = self._per_upstream[upstream] - 1
            if waiting:
                self._per_upstream[upstream] = waiting
            else:
                del self._per_upstream[upstream]

    def cancel_all(self, upstream: Hashable) -> list[Pending]:
        gone = [p for (u, _), p in self._by_key.items() if u == upstream]
        for p in gone:
            self.cancel(p)
        return gone

    def match(self, upstream: Hashable, data: bytes, source: tuple[str, int]) -> tuple[Pending, Response]:
        """The pending query this upstream message answers (and forget it), or Mismatch."""
        try:
            header = wire.parse_header(data)
        except WireError as e:
            raise Mismatch(str(e)) from None
        pending = self._by_key.get((upstream, header.id))
        if pending is None:
            raise Mismatch(f"ID {header.id} is not outstanding on this upstream")
        if _addr(source) != (_canon_ip(pending.server.ip), pending.server.port):
            raise Mismatch(f"from {source[0]}:{source[1]}, not {pending.server.ip}:{pending.server.port}")
        if not header.qr:
            raise Mismatch("not a response")
        try:
            message, rest_error = wire.parse_questions_then_rest(data, header)
        except WireError as e:
            raise Mismatch(f"unreadable: {e}") from None
        if len(message.questions) != 1 or message.questions[0].key != pending.query.question.key:
            raise Mismatch("question differs from the one asked")
        if rest_error is not None and not header.tc:
            raise Mismatch(f"unreadable records: {rest_error}")
        self.cancel(pending)
        return pending, Response(bytes(data), message)


def _canon_ip(ip: str) -> str:
    try:
        return canonical_ip(ip)
    except ValueError:
        return ip


def _addr(source: tuple[str, int]) -> tuple[str, int]:
    return _canon_ip(str(source[0])), int(source[1])


# -- 4. learn -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Learned:
    """What an answer teaches: `ips` of the question name, for `ttl` seconds."""
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    rrtypes: tuple[str, ...] = ()

    @property
    def learnable(self) -> bool:
        return bool(self.ips)


def learn(query: Query, response: Response) -> Learned:
    """Step 4: the IPs to open before release. A broken CNAME chain → DNSProtocolError(SERVFAIL)."""
    answers = response.message.answers
    if answers is None:  # truncated and unreadable past the question: relay, learn nothing
        return Learned()
    name: Labels = wire.fold(query.question.labels)
    ips: list[str] = []
    cnames: list[str] = []
    rrtypes: list[str] = []
    ttl: int | None = None
    for rr in answers:
        if wire.fold(rr.labels) != name:
            raise DNSProtocolError(
                f"unexpected name {wire.present(rr.labels)} in the answer (expected "
                f"{wire.present(name)})", SERVFAIL,
                error_reply(query.header, SERVFAIL, query.question))
        rrtypes.append(wire.type_name(rr.rtype))
        if rr.rtype in (TYPE_A, TYPE_AAAA) and rr.rclass == CLASS_IN and isinstance(rr.value, str):
            if rr.value not in ips:
                ips.append(rr.value)
        elif rr.rtype == TYPE_CNAME and isinstance(rr.value, tuple):
            cnames.append(wire.present(rr.value).lower())
            name = wire.fold(rr.value)
        else:
            continue
        ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
    if response.rcode != NOERROR:
        ips = []
    return Learned(tuple(ips), ttl or 0, tuple(cnames), tuple(rrtypes))


# -- 5. release -----------------------------------------------------------------------------------
def release(response: Response, query: Query) -> bytes:
    """Step 5: the upstream's bytes as they came, with the client's ID put back."""
    return struct.pack("!H", query.id) + response.raw[2:]


# -- TCP framing (RFC 1035 §4.2.2, RFC 7766) ------------------------------------------------------
class TCPFramer:
    """Bytes of a TCP stream in, whole DNS messages out (2-byte length prefix, any split)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 2:
            length = (self._buf[0] << 8) | self._buf[1]
            if len(self._buf) < 2 + length:
                break
            out.append(bytes(self._buf[2:2 + length]))
            del self._buf[:2 + length]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @staticmethod
    def frame(message: bytes) -> bytes:
        if len(message) > 0xFFFF:
            raise ValueError("DNS message longer than 65535 bytes")
        return struct.pack("!H", len(message)) + message


__all__ = [
    "FORMERR",
    "NOTIMP",
    "REFUSED",
    "SERVFAIL",
    "TC",
    "DNSProtocolError",
    "Destination",
    "Learned",
    "Mismatch",
    "Outstanding",
    "Pending",
    "Query",
    "Response",
    "TCPFramer",
    "Verdict",
    "check_policy",
    "error_reply",
    "learn",
    "parse_query",
    "refusal",
    "release",
]
