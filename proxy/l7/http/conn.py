"""HTTP/1.x for the transparent proxy, sans-IO: bytes in, events and commands out.

Three pieces, plain objects with no socket and no logging (the clock is a parameter):

`RequestReader` (client side, h11-style): `receive_data(bytes)`, then `next_event()` until it
  says NEED_DATA. Events: `RequestHead` (method, target, version, headers in arrival order with
  their case, the exact bytes of the head, the `HTTPRequest` the matcher sees), `Body` (raw
  bytes, chunk framing included, so they can be forwarded as they are), `EndOfMessage`,
  `ProtocolError` (status to answer: 400 malformed / smuggling, 431 head too large; None for
  "close without answering", used for HTTP/2 prior knowledge). httptools (llhttp, strict mode)
  parses every request head; our own framing finds where heads and bodies end (llhttp does not
  report offsets) and the request's body bytes are fed to llhttp as well, so a message is
  accepted only when both agree on where it ends.

`ResponseReader` (upstream side): the same for responses, told the method of the request each
  response answers (HEAD, CONNECT), so 1xx/204/304/HEAD responses have no body, a 101 or a 2xx
  to CONNECT switches to a tunnel (a 2xx to CONNECT with Content-Length or Transfer-Encoding,
  which RFC 9110 forbids, is a 502: a server that sends one is not tunnelling), and a body
  without length runs to EOF. Response heads of
  the plainest shape (see _SIMPLE_RESPONSE) are read by a regex alone; llhttp reads the others.

`ProxyConnection` ties them to a verdict function `check(HTTPRequest) -> L7Result` and turns
  everything into commands for the I/O loop: `SendUpstream`, `SendClient`, `Flow`, `Tunnel`,
  `Close`. Responses are delivered in request order: a denied request's 403 waits behind the
  responses the upstream still owes for earlier requests.

Decisions (see the HTTP proxy section of issue 3):
  * request-target forms: origin-form; `*` for OPTIONS; authority-form only for CONNECT (the
    matcher sees no path, as Envoy's `:path` is absent, and the target as authority);
    absolute-form `http://authority/path` is accepted when a Host header is present and equals
    the authority (case-insensitively): the matcher sees that authority and the normalised path,
    the request is forwarded in absolute-form (the upstream may be a forward proxy). Any other
    absolute-form (https, userinfo, Host mismatch or missing) is answered 400.
  * the path is normalised by `httpmatch.normalize_path` (skipped for targets it would return
    unchanged, see _PLAIN_TARGET); when the canonical form differs from what was sent, the
    request-line is rewritten to it (the proxy forwards what it matched); the rest of the head
    is forwarded byte for byte. Header values reach the matcher without surrounding whitespace.
  * `Upgrade: h2c` is not honoured: the Upgrade and HTTP2-Settings headers (and those tokens of
    Connection) are removed and the request goes on as HTTP/1.1 (what Envoy does). `h2c` mixed
    with other protocols in one Upgrade header is answered 400.
  * `PRI * HTTP/2.0` (HTTP/2 prior knowledge): the connection is closed without an answer, the
    flow says why.
  * framing: Transfer-Encoding must be exactly one header `chunked` on HTTP/1.1 (Envoy answers
    501 to other codings; we answer 400 like every other smuggling attempt); CL+TE, repeated or
    non-numeric Content-Length, obs-fold, bare CR/LF, CTL/NUL/space in the target, unknown or
    lowercase methods (llhttp knows the registered methods; `post` is not one), versions other
    than 1.0/1.1, missing or repeated Host on HTTP/1.1, a Host with characters no authority has
    (space, `/ ? # \\`, quotes, controls, non-ASCII: Envoy's check) -> 400 and close. An Upgrade or CONNECT
    request with a body -> 400 (llhttp would treat the body as tunnel data).
  * a denied request: `403` with Envoy's headers and `Access denied\\r\\n`; the connection stays
    open and its body is read and discarded, except when the client sent `Expect: 100-continue`
    with a body (it may never send it): then `connection: close` and close. HEAD gets no body.
    A request that is not kept alive (`Connection: close`, HTTP/1.0) is the last one read, an
    upgrade or CONNECT included.
  * an error while streaming the body of a forwarded request closes both connections without an
    answer (the upstream already has part of the request).
"""
from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools

from proxy.l7.oracle import L7Result
from proxy.policy.httpmatch import HTTPRequest, normalize_path

__all__ = [
    "DENIED", "MAX_HEAD", "MAX_HEADERS", "MAX_PIPELINE", "NEED_DATA", "PAUSED", "Body", "Close",
    "EndOfMessage", "Flow", "ProtocolError", "ProxyConnection", "RequestHead", "RequestReader",
    "ResponseHead", "ResponseReader", "SendClient", "SendUpstream", "Tunnel", "denied_reply",
    "local_reply", "rebuild_head",
]

MAX_HEAD = 64 * 1024  # request or response head (request-line + headers); beyond: 431 / 502
MAX_HEADERS = 100  # header fields per head (Envoy's default); beyond: 431
MAX_LINE = 4096  # a chunk-size line, extensions included
MAX_FLOW_TEXT = 4096  # characters of host, path or target a flow keeps
MAX_PIPELINE = 64  # requests read ahead of their responses before the reader stops pulling


# --- local replies ----------------------------------------------------------------------------

def local_reply(status: int, reason: str, body: bytes, *, close: bool, head_only: bool = False) -> bytes:
    """A reply the proxy answers itself, in the shape of Envoy's local replies."""
    head = (b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n"
            % (status, reason.encode(), len(body)))
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + (b"" if head_only else body)


DENIED_BODY = b"Access denied\r\n"  # Cilium's Envoy, spec 8.2
DENIED = local_reply(403, "Forbidden", DENIED_BODY, close=False)
_DENIED = {(c, h): local_reply(403, "Forbidden", DENIED_BODY, close=c, head_only=h)
           for c in (False, True) for h in (False, True)}
_ERRORS = {
    400: ("Bad Request", b"Bad Request"),
    431: ("Request Header Fields Too Large", b"Request Header Fields Too Large"),
    502: ("Bad Gateway", b"upstream protocol error"),
}
UPSTREAM_CONNECT_FAILURE = "connection failure"
UPSTREAM_TERMINATED = "connection termination"


def denied_reply(*, close: bool = False, head_only: bool = False) -> bytes:
    return _DENIED[close, head_only]


def error_reply(status: int) -> bytes:
    reason, body = _ERRORS[status]
    return local_reply(status, reason, body, close=True)


def unavailable_reply(why: str) -> bytes:
    body = f"upstream connect error or disconnect/reset before headers. reset reason: {why}"
    return local_reply(503, "Service Unavailable", body.encode(), close=True)


# --- events -----------------------------------------------------------------------------------

class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes
PAUSED = _Sentinel("PAUSED")  # after an upgrade request, or once the connection is done


# Events are plain slotted dataclasses (treat them as read-only): frozen ones cost ~1.5 us more
# each to build, on every request.
@dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # the request-target as sent
    version: str  # "1.0" | "1.1"
    headers: tuple[tuple[str, str], ...]  # as sent, order and case kept (latin-1)
    raw: bytes  # the exact bytes of the head, terminating empty line included
    request: HTTPRequest  # what the matcher sees: normalised path, authority, headers
    keep_alive: bool
    has_body: bool
    upgrade: str | None = None  # "CONNECT" or the Upgrade header's protocols; None otherwise
    expect_continue: bool = False
    new_target: bytes | None = None  # canonical request-target to forward, when it differs
    strip_h2c: bool = False  # remove Upgrade/HTTP2-Settings before forwarding


@dataclass(slots=True)
class ResponseHead:
    status: int
    version: str
    data: bytes  # the head's exact bytes; and the whole body too when it came with the head
    keep_alive: bool
    interim: bool = False  # 1xx other than 101: another head follows for the same request
    switch: bool = False  # 101 to an upgrade, 2xx to CONNECT: the connection becomes a tunnel


@dataclass(slots=True)
class Body:
    data: bytes  # raw message bytes (chunk framing and trailers included)


@dataclass(slots=True)
class EndOfMessage:
    pass


@dataclass(slots=True)
class ProtocolError:
    status: int | None  # what to answer (400, 431, 502); None: close without answering
    reason: str


_END = EndOfMessage()


class _Bad(Exception):
    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- framing helpers --------------------------------------------------------------------------

# field lines (of a head llhttp accepted): name, value without surrounding OWS
_FIELD = re.compile(r"([^:\r\n]*+):[ \t]*+((?:[^\r\n \t]++(?:[ \t]++[^\r\n \t]++)*+)?+)[ \t]*+\r\n")
_AUTHORITY = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%\[\]:]+:[0-9]{1,5}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[\t\x20-\x7e\x80-\xff]*)?")
_H2_PREFACE = b"PRI * HTTP/2.0\r\n"
# An origin-form target `normalize_path` returns unchanged: segments of characters it copies
# as they are (unreserved and sub-delims, ':' '@' '[' ']'), none empty, none "." or "..", and
# a query of printable ASCII. Such targets skip the (slower) canonicaliser; anything else goes
# through it. tests/test_http_proxy.py checks the two agree.
def _plain_target(end: bytes) -> bytes:
    return (rb"(?:/(?!\.\.?(?:[/?]|" + end + rb"))[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]]++)*+/?"
            rb"(?:\?[\x21\x22\x24-\x7e]*+)?")


_PLAIN_TARGET = re.compile(_plain_target(rb"\Z"))
# What Envoy accepts as an authority (nghttp2_check_authority): no space, '/', '?', '#', '\\',
# quotes, controls or non-ASCII; a Host such as `evil.net/.example.com` is answered 400 (a suffix
# host rule would match it; many backends read evil.net)
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]%]*+")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(b"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
# Heads of the commonest shape: a start line, then field lines `token:` OWS value OWS CRLF whose
# values are visible characters with inner SP/HTAB. No obs-fold, no bare CR or LF, no control
# character can be in such a head, and splitting its field lines is exact. Requests: a method
# token, a plain origin-form target (as above), HTTP/1.0 or 1.1; `RequestReader._simple_head`
# reads them with a few of `_full_head`'s checks. Responses: HTTP/1.0 or 1.1, a final status
# (not 1xx), a reason; `ResponseReader._simple_fields` reads those without llhttp when their
# framing is plain (no Transfer-Encoding, at most one Content-Length). tests/test_http_proxy.py
# checks that both ways agree with the full ones.
_FIELD_LINES = rb"((?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*+\r\n)*+)\r\n"
_SIMPLE_HEAD = re.compile(
    b"(" + _TOKEN + b") ((?=/)" + _plain_target(b" ") + rb") HTTP/1\.([01])\r\n" + _FIELD_LINES)
_SIMPLE_RESPONSE = re.compile(rb"HTTP/1\.([01]) ([2-9][0-9][0-9]) [\t\x20-\x7e\x80-\xff]*+\r\n" + _FIELD_LINES)
# the framing fields among a simple head's field lines, values without OWS
_FRAMING_FIELD = re.compile(rb"^(content-length|transfer-encoding|connection):[ \t]*+"
                            rb"((?:[^\r\n \t]++(?:[ \t]++[^\r\n \t]++)*+)?+)[ \t]*+\r\n", re.I | re.M)
_DIGITS = frozenset(b"0123456789")


_REQUEST_FIELDS = {"host": 1, "content-length": 2, "transfer-encoding": 3, "connection": 4,
                   "upgrade": 5, "expect": 6}


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


class _Chunked:
    """Where a chunked body ends, strictly (RFC 9112 7.1): sizes, CRLFs, trailer fields.
    A line that arrives in pieces is searched for its end once (`partial`: bytes of it already
    searched), not again from its start at every piece."""
    __slots__ = ("state", "remaining", "trailer_bytes", "partial")
    SIZE, DATA, DATA_END, TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.remaining = 0
        self.trailer_bytes = 0
        self.partial = 0

    def _line_end(self, buf: bytearray, pos: int, end: int) -> int:
        i = buf.find(b"\r\n", pos + max(self.partial - 1, 0), end)
        self.partial = end - pos if i < 0 else 0
        return i

    def scan(self, buf: bytearray, pos: int) -> tuple[int, bool]:
        """Consume what is complete from `pos`: (new position, whether the body ended)."""
        end = len(buf)
        while True:
            st = self.state
            if st == self.DATA:
                n = min(self.remaining, end - pos)
                pos += n
                self.remaining -= n
                if self.remaining:
                    return pos, False
                self.state = self.DATA_END
            elif st == self.DATA_END:
                if end - pos < 2:
                    return pos, False
                if buf[pos] != 13 or buf[pos + 1] != 10:
                    raise _Bad(400, "chunk data not followed by CRLF")
                pos += 2
                self.state = self.SIZE
            elif st == self.SIZE:
                i = self._line_end(buf, pos, end)
                if i < 0 or i - pos > MAX_LINE:
                    if end - pos > MAX_LINE:
                        raise _Bad(400, "chunk-size line too long")
                    return pos, False
                m = _CHUNK_SIZE.fullmatch(buf, pos, i)
                if m is None:
                    raise _Bad(400, "invalid chunk size line")
                size = int(m.group(1), 16)
                pos = i + 2
                if size:
                    self.remaining = size
                    self.state = self.DATA
                else:
                    self.state = self.TRAILER
            else:  # TRAILER: field lines, then an empty line
                i = self._line_end(buf, pos, end)
                if i < 0:
                    if end - pos + self.trailer_bytes > MAX_HEAD:
                        raise _Bad(400, "trailer section too large")
                    return pos, False
                if i == pos:
                    return i + 2, True
                self.trailer_bytes += i - pos + 2
                if self.trailer_bytes > MAX_HEAD:
                    raise _Bad(400, "trailer section too large")
                line = bytes(buf[pos:i])
                if line[0] in (0x20, 0x09) or b":" not in line or b"\n" in line or b"\r" in line:
                    raise _Bad(400, "invalid trailer field")
                pos = i + 2


class _Reader:
    """Shared by both readers: the buffer, head framing and llhttp.

    llhttp validates each head (request/status line, field syntax, framing headers); the
    field lines themselves are then split here, at CRLF and the first colon, with OWS trimmed
    on both sides (llhttp keeps trailing whitespace; RFC 9110 5.5 and Envoy do not). On a head
    llhttp accepted that split is unambiguous: no obs-fold, no bare CR/LF, no space before ':'.
    """

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        # Unconsumed input from _pos on. Usually the bytes object received (no copy: a whole
        # request or response is sliced out of it as is); a bytearray only while a message
        # spans several receives.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scan = 0  # where to resume looking for the end of a head, relative to _pos
        self._head_done = False
        self._complete = False

    # llhttp callbacks (httptools calls them on the object given as protocol)
    def on_headers_complete(self) -> None:
        self._head_done = True

    def on_message_complete(self) -> None:
        self._complete = True

    def receive_data(self, data: bytes) -> None:
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        else:
            if type(buf) is not bytearray:
                buf = self._buf = bytearray(buf[self._pos:])
                self._pos = 0
            elif self._pos > 65536:
                del buf[:self._pos]
                self._pos = 0
            buf += data

    def _take(self, start: int, end: int) -> bytes:
        buf = self._buf
        return buf[start:end] if type(buf) is bytes else bytes(buf[start:end])

    def _clear(self) -> None:
        self._buf = b""
        self._pos = 0

    def trailing_data(self) -> bytes:
        """Bytes received but not consumed (for a tunnel); the reader is then empty."""
        data = self._take(self._pos, len(self._buf))
        self._clear()
        return data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _find_head(self, too_large: int) -> bytes | None:
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n\r\n", pos + self._scan)
        if end < 0:
            if len(buf) - pos > self.max_head:
                raise _Bad(too_large, "head too large")
            self._scan = max(0, len(buf) - pos - 3)
            return None
        end += 4
        if end - pos > self.max_head:
            raise _Bad(too_large, "head too large")
        self._scan = 0
        self._pos = end
        return buf[pos:end] if type(buf) is bytes else bytes(buf[pos:end])

    def _parse_head(self, parser, head: bytes) -> bool:
        """Feed one head to llhttp; whether llhttp saw a protocol upgrade."""
        self._head_done = self._complete = False
        upgraded = False
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgraded = True
        except httptools.HttpParserError as e:
            raise _Bad(self._malformed, f"malformed head: {e}") from None
        if not self._head_done:
            raise _Bad(self._malformed, "malformed head: incomplete")
        return upgraded

    _malformed = 400


class RequestReader(_Reader):
    """Client bytes -> RequestHead, Body, EndOfMessage, ProtocolError (see the module doc)."""
    HEAD, LENGTH, CHUNKED, END, PAUSED, DONE = range(6)

    def __init__(self, max_head: int = MAX_HEAD, max_headers: int = MAX_HEADERS) -> None:
        super().__init__(max_head)
        self.max_headers = max_headers
        self._state = self.HEAD
        self._parser = None  # llhttp, kept across requests while it agrees with our framing
        self._remaining = 0
        self._chunked: _Chunked | None = None
        self._head: RequestHead | None = None
        self.requests = 0

    @property
    def at_boundary(self) -> bool:
        """Between messages with nothing of the next one received (empty lines aside)."""
        if self._state in (self.PAUSED, self.DONE):
            return True
        return self._state == self.HEAD and not self._buf[self._pos:].strip(b"\r\n")

    @property
    def done(self) -> bool:
        return self._state == self.DONE

    def resume(self) -> None:
        """After an upgrade request that was denied or declined: parse HTTP again."""
        if self._state == self.PAUSED:
            self._state = self.HEAD

    def stop(self) -> None:
        """Read nothing more (the connection is closing)."""
        self._state = self.DONE
        self._clear()

    def next_event(self):
        try:
            st = self._state
            if st == self.HEAD:
                if self._pos >= len(self._buf):
                    return NEED_DATA
                return self._next_head()
            if st == self.LENGTH:
                return self._next_length()
            if st == self.CHUNKED:
                return self._next_chunked()
            if st == self.END:
                return self._end()
            if st == self.DONE:
                self._clear()
            return PAUSED
        except _Bad as e:
            self.stop()
            return ProtocolError(e.status, e.reason)

    # -- heads ---------------------------------------------------------------------------------
    def _next_head(self):
        buf = self._buf
        pos = self._pos
        while buf.startswith(b"\r\n", pos):  # empty lines before a request-line are ignored
            pos += 2
        self._pos = pos
        head = self._find_head(431)
        if head is None:
            return NEED_DATA
        self.requests += 1
        return self._on_head(head)

    def _on_head(self, head: bytes) -> RequestHead:
        m = _SIMPLE_HEAD.fullmatch(head)
        if m is not None:
            ev = self._simple_head(head, m)
            if ev is not None:
                return ev
        return self._full_head(head)

    def _simple_head(self, head: bytes, m: re.Match) -> RequestHead | None:
        """What `_full_head` makes of a head in _SIMPLE_HEAD's shape, not CONNECT, whose only
        framing fields are one Host and Connection: no body, no protocol switch, a target
        forwarded as sent. None (nothing consumed) for any other head."""
        bmethod, target, minor, fields = m.groups()
        if bmethod == b"CONNECT":
            return None
        headers = _FIELD.findall(fields.decode("latin-1"))
        if len(headers) > self.max_headers:
            return None
        host = None
        conn: list[str] = []
        for name, value in headers:
            special = _REQUEST_FIELDS.get(name.lower())
            if special is None:
                continue
            if special == 1 and host is None:
                host = value
            elif special == 4:
                conn += _tokens(value)
            else:
                return None
        if (host is None and minor == b"1") or (host is not None and _HOST.fullmatch(host) is None):
            return None
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        if self._parse_head(parser, head):
            raise _Bad(400, "ambiguous protocol upgrade")
        method = bmethod.decode()
        path = target.decode("ascii")
        fields_t = tuple(headers)
        if minor == b"1":
            version, keep_alive = "1.1", "close" not in conn
        else:
            version, keep_alive = "1.0", "keep-alive" in conn and "close" not in conn
        self._head = ev = RequestHead(method, path, version, fields_t, head,
                                      HTTPRequest(method, path, host, fields_t), keep_alive, False)
        self._state = self.END
        return ev

    def _full_head(self, head: bytes) -> RequestHead:
        m = _REQUEST_LINE.match(head)
        if m is None or m.group(3) != b"1" or m.group(4) not in (b"0", b"1"):
            if head.startswith(_H2_PREFACE):
                raise _Bad(None, "HTTP/2 connection preface (prior knowledge) on an HTTP/1 port")
            if m is not None:
                raise _Bad(400, f"unsupported HTTP version {m.group(3).decode()}.{m.group(4).decode()}")
            raise _Bad(400, "malformed request-line")
        lines = head.count(b"\n")
        if lines != head.count(b"\r\n") or lines != head.count(b"\r"):
            raise _Bad(400, "bare CR or LF in head")
        if b"\r\n " in head or b"\r\n\t" in head:
            raise _Bad(400, "obsolete line folding in header")
        bmethod, target, _, minor = m.groups()
        line_end = m.end()
        if lines - 2 > self.max_headers:
            raise _Bad(431, "too many header fields")
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        upgraded = self._parse_head(parser, head)
        method = bmethod.decode()
        version = "1.1" if minor == b"1" else "1.0"

        host = cl = None
        hosts = cls = 0
        te: list[str] = []
        conn: list[str] = []
        upgrade: list[str] = []
        expect = False
        if lines > 2:
            fields = head[line_end:-2].decode("latin-1")  # each field line ends with CRLF
            headers = _FIELD.findall(fields)
            if len(headers) != lines - 2:
                raise _Bad(400, "malformed header field")
            for name, value in headers:
                special = _REQUEST_FIELDS.get(name.lower())
                if special is None:
                    continue
                if special == 1:
                    hosts += 1
                    host = value
                elif special == 2:
                    cls += 1
                    cl = value
                elif special == 3:
                    te.append(value)
                elif special == 4:
                    conn += _tokens(value)
                elif special == 5:
                    upgrade += _tokens(value)
                else:
                    expect = value.lower() == "100-continue"
        else:
            headers = []
        if hosts > 1:
            raise _Bad(400, "more than one Host header")
        if hosts == 0 and version == "1.1":
            raise _Bad(400, "missing Host header")
        if host is not None and _HOST.fullmatch(host) is None:
            raise _Bad(400, "invalid Host header")
        if cls > 1:
            raise _Bad(400, "more than one Content-Length")
        if te and cl is not None:
            raise _Bad(400, "both Content-Length and Transfer-Encoding")
        chunked = False
        length = 0
        if te:
            if version != "1.1":
                raise _Bad(400, "Transfer-Encoding in an HTTP/1.0 request")
            if len(te) != 1 or te[0].strip().lower() != "chunked":
                raise _Bad(400, "Transfer-Encoding other than chunked")
            chunked = True
        elif cl is not None:
            if not cl or len(cl) > 18 or not _DIGITS.issuperset(cl.encode()):
                raise _Bad(400, "invalid Content-Length")
            length = int(cl)
        has_body = chunked or length > 0

        # protocol switches: CONNECT, Upgrade (with Connection: upgrade, as llhttp sees it), h2c
        switch = None
        strip_h2c = "h2c" in upgrade
        if strip_h2c:
            if any(p != "h2c" for p in upgrade):
                raise _Bad(400, "h2c upgrade mixed with other protocols")
            headers = [(n, v) for n, v in headers
                       if n.lower() not in ("upgrade", "http2-settings")]
        if method == "CONNECT":
            switch = "CONNECT"
        elif upgrade and "upgrade" in conn and not strip_h2c:
            switch = ",".join(upgrade)
        if upgraded != (method == "CONNECT" or bool(upgrade and "upgrade" in conn)):
            raise _Bad(400, "ambiguous protocol upgrade")
        if switch and has_body:
            raise _Bad(400, "protocol upgrade with a body")
        keep_alive = ("close" not in conn) if version == "1.1" else (
            "keep-alive" in conn and "close" not in conn)

        # the request-target: what is matched, what is forwarded
        new_target = None
        if method == "CONNECT":
            if _AUTHORITY.fullmatch(target) is None:
                raise _Bad(400, "CONNECT needs an authority-form target")
            authority = target.decode("latin-1")
            request = HTTPRequest(method, None, authority, tuple(headers))  # type: ignore[arg-type]
        else:
            prefix = b""
            path_bytes = target
            if target[:1] != b"/" and target != b"*":
                if target[:7].lower() != b"http://":
                    raise _Bad(400, "unsupported request-target form")
                rest = target[7:]
                cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
                authority_b = rest[:cut]
                if not authority_b or b"@" in authority_b:
                    raise _Bad(400, "invalid authority in absolute-form target")
                if host is None or host.lower() != authority_b.decode("latin-1").lower():
                    raise _Bad(400, "absolute-form authority differs from Host")
                host = authority_b.decode("latin-1")
                prefix = target[:7 + cut]
                path_bytes = rest[cut:]
                if not path_bytes.startswith(b"/"):
                    path_bytes = b"/" + path_bytes
            if _PLAIN_TARGET.fullmatch(path_bytes) is not None:
                path = path_bytes.decode("ascii")
            else:
                path = normalize_path(path_bytes, method=method)
            if path is None:
                raise _Bad(400, "request-target cannot be normalised")
            canonical = prefix + path.encode()
            if canonical != target:
                new_target = canonical
            request = HTTPRequest(method, path, host, tuple(headers))

        if upgraded:
            self._parser = None  # llhttp stopped at the upgrade: a new one for what follows
        self._head = ev = RequestHead(
            method, target.decode("latin-1"), version, tuple(headers), head, request, keep_alive,
            has_body, switch, expect, new_target, strip_h2c)
        if chunked:
            self._chunked = _Chunked()
            self._state = self.CHUNKED
        elif length:
            self._remaining = length
            self._state = self.LENGTH
        else:
            self._state = self.END
        return ev

    # -- bodies --------------------------------------------------------------------------------
    def _check_parser(self, data: bytes, last: bool) -> None:
        parser = self._parser
        if parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise _Bad(400, f"malformed body: {e}") from None
        if self._complete != last:
            raise _Bad(400, "message framing ambiguous")

    def _next_length(self):
        avail = len(self._buf) - self._pos
        if not avail:
            return NEED_DATA
        n = min(avail, self._remaining)
        pos = self._pos
        data = self._take(pos, pos + n)
        self._pos = pos + n
        self._remaining -= n
        last = not self._remaining
        self._check_parser(data, last)
        if last:
            self._state = self.END
        return Body(data)

    def _next_chunked(self):
        start = self._pos
        pos, last = self._chunked.scan(self._buf, start)
        if pos == start:
            return NEED_DATA
        data = self._take(start, pos)
        self._pos = pos
        self._check_parser(data, last)
        if last:
            self._chunked = None
            self._state = self.END
        return Body(data)

    def _end(self):
        head = self._head
        self._head = None
        if self._parser is not None and not self._complete:
            raise _Bad(400, "message framing ambiguous")
        self._complete = False
        if head.upgrade:
            self._state = self.PAUSED
        elif not head.keep_alive:
            self.stop()
        else:
            self._state = self.HEAD
        return _END


class ResponseReader(_Reader):
    """Upstream bytes -> ResponseHead, Body, EndOfMessage, ProtocolError(502). A Content-Length
    body that arrived with its head comes in the ResponseHead's `data` (no Body event).

    `next_event(method, upgrade)` takes the method of the request the next response answers
    and whether that request asked for a protocol switch (both only matter at a head).
    """
    HEAD, LENGTH, CHUNKED, EOF, END, DONE = range(6)
    _malformed = 502

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        super().__init__(max_head)
        self._state = self.HEAD
        self._remaining = 0
        self._chunked: _Chunked | None = None
        self._eof = False

    @property
    def at_boundary(self) -> bool:
        return self._state == self.HEAD and self._pos == len(self._buf)

    def receive_eof(self) -> None:
        self._eof = True

    def reset(self) -> None:
        """A new upstream connection: forget everything."""
        ResponseReader.__init__(self, self.max_head)

    def next_event(self, method: str | None = None, upgrade: bool = False):
        try:
            st = self._state
            if st == self.HEAD:
                if self._pos == len(self._buf):
                    return NEED_DATA
                if method is None:
                    raise _Bad(502, "response without a request")
                start = self._pos
                head = self._find_head(502)
                if head is None:
                    if self._eof:
                        raise _Bad(502, "upstream closed in a response head")
                    return NEED_DATA
                ev = self._on_head(head, method, upgrade)
                if self._state == self.LENGTH and len(self._buf) - self._pos >= self._remaining:
                    # the whole body is here: one slice, no Body event
                    end = self._pos + self._remaining
                    ev.data = self._take(start, end)
                    self._pos = end
                    self._remaining = 0
                    self._state = self.END
                return ev
            if st == self.LENGTH or st == self.EOF:
                avail = len(self._buf) - self._pos
                if not avail:
                    if self._eof:
                        if st == self.EOF:
                            self._state = self.DONE
                            return _END
                        raise _Bad(502, "upstream closed in a response body")
                    return NEED_DATA
                n = avail if st == self.EOF else min(avail, self._remaining)
                data = self._take(self._pos, self._pos + n)
                self._pos += n
                if st == self.LENGTH:
                    self._remaining -= n
                    if not self._remaining:
                        self._state = self.END
                return Body(data)
            if st == self.CHUNKED:
                start = self._pos
                pos, last = self._chunked.scan(self._buf, start)
                if pos == start:
                    if self._eof:
                        raise _Bad(502, "upstream closed in a response body")
                    return NEED_DATA
                self._pos = pos
                if last:
                    self._state = self.END
                return Body(self._take(start, pos))
            if st == self.END:
                self._state = self.HEAD
                return _END
            return PAUSED
        except _Bad as e:
            self._state = self.DONE
            return ProtocolError(e.status, e.reason)

    def _on_head(self, head: bytes, method: str, upgrade: bool) -> ResponseHead:
        m = _SIMPLE_RESPONSE.fullmatch(head)
        fields = self._simple_fields(m) if m is not None else None
        version, status, te, cl, conn = fields or self._full_fields(head)
        keep_alive = ("close" not in conn) if version == "1.1" else "keep-alive" in conn
        if 100 <= status < 200:
            if status == 101:
                if not upgrade or method == "CONNECT":
                    raise _Bad(502, "101 Switching Protocols to a request that did not ask")
                self._state = self.DONE
                return ResponseHead(status, version, head, False, switch=True)
            self._state = self.HEAD
            return ResponseHead(status, version, head, keep_alive, interim=True)
        if method == "CONNECT" and 200 <= status < 300:
            if te is not None or cl is not None:  # RFC 9110 9.3.6: a server MUST NOT send them
                raise _Bad(502, "Content-Length or Transfer-Encoding in a 2xx to CONNECT")
            self._state = self.DONE
            return ResponseHead(status, version, head, False, switch=True)
        if method == "HEAD" or status in (204, 304):
            self._state = self.END
        elif te is not None:
            if _tokens(te)[-1:] == ["chunked"]:
                self._chunked = _Chunked()
                self._state = self.CHUNKED
            else:
                self._state = self.EOF
                keep_alive = False
        elif cl is not None:
            if not cl or len(cl) > 18 or not _DIGITS.issuperset(cl):
                raise _Bad(502, "invalid Content-Length in response")
            self._remaining = int(cl)
            self._state = self.LENGTH if self._remaining else self.END
        else:
            self._state = self.EOF
            keep_alive = False
        return ResponseHead(status, version, head, keep_alive)

    @staticmethod
    def _simple_fields(m: re.Match) -> tuple | None:
        """`_full_fields` of a head in _SIMPLE_RESPONSE's shape without Transfer-Encoding, with
        at most one (numeric) Content-Length; None for any other."""
        minor, status, lines = m.groups()
        cl = None
        conn: list[str] = []
        for name, value in _FRAMING_FIELD.findall(lines):
            ln = name.lower()
            if ln == b"content-length":
                if cl is not None or not value or len(value) > 18 or not _DIGITS.issuperset(value):
                    return None
                cl = value
            elif ln == b"transfer-encoding":
                return None
            elif ln == b"connection":
                conn += _tokens(value.decode("latin-1"))
        return ("1.1" if minor == b"1" else "1.0"), int(status), None, cl, conn

    def _full_fields(self, head: bytes) -> tuple:
        """llhttp checks the head; (version, status, Transfer-Encoding, Content-Length, Connection
        tokens) as the framing needs them."""
        parser = httptools.HttpResponseParser(self)
        self._parse_head(parser, head)
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise _Bad(502, f"unsupported HTTP version {version}")
        status = parser.get_status_code()
        te = cl = None
        conn: list[str] = []
        first = head.find(b"\r\n") + 2
        if first < len(head) - 2:
            for line in head[first:-4].split(b"\r\n"):
                name, _, value = line.partition(b":")
                ln = name.lower()
                if ln == b"content-length":
                    cl = value.strip(b" \t")
                elif ln == b"transfer-encoding":
                    te = (te + "," if te else "") + value.decode("latin-1")
                elif ln == b"connection":
                    conn += _tokens(value.decode("latin-1"))
        return version, status, te, cl, conn


# --- the proxy's commands ---------------------------------------------------------------------

@dataclass(slots=True)
class SendUpstream:
    data: bytes


@dataclass(slots=True)
class SendClient:
    data: bytes


class _Pending:
    """A request waiting for its turn to be answered: by the upstream (local None) or locally."""
    __slots__ = ("local", "close", "method", "upgrade", "head", "result", "code", "reason",
                 "t0", "t1")

    def __init__(self, local: bytes | None, close: bool, head: RequestHead | None,
                 result: L7Result | None, t0: float, code: int | None = None,
                 reason: str = "") -> None:
        self.local = local
        self.close = close
        self.head = head
        self.method = head.method if head is not None else ""
        self.upgrade = head.upgrade if head is not None else None
        self.result = result
        self.code = code
        self.reason = reason or (result.reason if result is not None else "")
        self.t0 = t0
        self.t1 = t0


def _clip(text: str | None) -> str | None:
    """A client-chosen text as a flow keeps it: at most MAX_FLOW_TEXT characters (the observer
    keeps thousands of flows; 64 KB paths would make that gigabytes)."""
    if text is None or len(text) <= MAX_FLOW_TEXT:
        return text
    return f"{text[:MAX_FLOW_TEXT]}...({len(text) - MAX_FLOW_TEXT} more)"


class Flow:
    """One request done (answered, refused, tunnelled, or cut off by the connection's close: code
    None when no response head came, reason "...; not finished: <why>"): what its flow says,
    copied out of the request's objects so that those die with the request (the observer keeps
    flows a while); `record` is built only when read. Host, path and target are clipped."""
    __slots__ = ("verdict", "code", "method", "protocol", "policies", "latency_us", "reason",
                 "host", "path", "target", "normalised", "authority")

    def __init__(self, entry: _Pending, authority: str) -> None:
        r = entry.result
        head = entry.head
        self.verdict = "FORWARDED" if r is not None and r.allowed else "DROPPED"
        self.code = entry.code
        self.policies = r.policies if r is not None else ()
        self.latency_us = round((entry.t1 - entry.t0) * 1_000_000)
        self.reason = entry.reason
        self.authority = authority
        if head is None:
            self.method = self.host = self.path = self.target = None
            self.protocol = "HTTP/2" if entry.code is None else "HTTP/1.1"
            self.normalised = False
        else:
            request = head.request
            self.method, self.protocol = head.method, f"HTTP/{head.version}"
            self.host, self.path, self.target = request.host, request.path, head.target
            if len(head.raw) * 3 > MAX_FLOW_TEXT:  # (else none is longer, %XX escapes included)
                self.host, self.path, self.target = _clip(self.host), _clip(self.path), _clip(self.target)
            self.normalised = head.new_target is not None

    @property
    def latency_ms(self) -> float:
        """To the microsecond."""
        return self.latency_us / 1000

    @property
    def record(self) -> dict:
        """method, url, host, path, protocol, verdict, code, latency_ms, reason, policies
        (and target: the request-target as sent, when it was normalised)."""
        rec = {"method": self.method, "url": None, "host": self.host, "path": self.path,
               "protocol": self.protocol, "verdict": self.verdict, "code": self.code,
               "latency_ms": self.latency_ms, "reason": self.reason, "policies": self.policies}
        if self.target is None:
            return rec
        host = self.host if self.host is not None else self.authority
        rec["url"] = f"http://{host}{self.path}" if self.path is not None else self.target
        if self.normalised:
            rec["target"] = self.target
        return rec

    def __repr__(self) -> str:
        return f"Flow({self.verdict}, {self.code})"


@dataclass(slots=True)
class Tunnel:
    """From now on relay raw bytes both ways; these were received but not yet relayed."""
    to_upstream: bytes
    to_client: bytes


@dataclass(slots=True)
class Close:
    """Close both connections: after flushing what was sent (abort=False) or at once."""
    reason: str
    abort: bool = False


def rebuild_head(head: RequestHead, edits: tuple = ()) -> bytes:
    """The head to forward: the canonical target, no h2c upgrade, header edits applied.

    Only the lines that change are rewritten; every other byte is as received.
    """
    lines = head.raw[:-4].split(b"\r\n")
    if head.new_target is not None:
        first = lines[0]
        method, _, rest = first.partition(b" ")
        version = rest.rpartition(b" ")[2]
        lines[0] = method + b" " + head.new_target + b" " + version
    if head.strip_h2c:
        kept = [lines[0]]
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lname = name.lower()
            if lname in (b"upgrade", b"http2-settings"):
                continue
            if lname == b"connection":
                tokens = [t for t in value.split(b",")
                          if t.strip().lower() not in (b"upgrade", b"http2-settings")]
                if not any(t.strip() for t in tokens):
                    continue
                line = name + b":" + b",".join(tokens)
            kept.append(line)
        lines = kept
    for edit in edits:
        name = "host" if edit.name.lower() == ":authority" else edit.name
        lname = name.lower().encode("latin-1")
        if edit.action in ("delete", "replace"):
            lines = [lines[0]] + [ln for ln in lines[1:]
                                  if ln.partition(b":")[0].lower() != lname]
        if edit.action in ("add", "replace"):
            lines.append(name.encode("latin-1") + b": " + edit.value.encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class ProxyConnection:
    """One client connection through the proxy: verdicts, ordering, forwarding (sans-IO).

    `check(HTTPRequest) -> L7Result` is asked once per request, in arrival order. Feed
    `client_data`, `upstream_data`, `client_eof`, `upstream_eof`, `upstream_failed`; each
    returns the commands to perform, in order. `authority` names the original destination in
    flow URLs when a request has no Host.
    """

    def __init__(self, check: Callable[[HTTPRequest], L7Result], *, authority: str = "",
                 clock: Callable[[], float] = time.monotonic, max_head: int = MAX_HEAD,
                 max_pipeline: int = MAX_PIPELINE) -> None:
        self.requests = RequestReader(max_head)
        self.responses = ResponseReader(max_head)
        self.check = check
        self.authority = authority
        self.clock = clock
        self.max_pipeline = max_pipeline
        self._queue: deque[_Pending] = deque()
        self._current: _Pending | None = None  # the request whose body is being read
        self._started = False  # bytes of the head-of-queue upstream response went to the client
        self._client_eof = False
        self._out: list = []
        self.closed = False
        self.tunnel = False

    # -- inputs --------------------------------------------------------------------------------
    def client_data(self, data: bytes) -> list:
        if self.closed or self.tunnel:
            return []
        self.requests.receive_data(data)
        out = self._out = []
        self._pump_requests()
        return out

    def upstream_data(self, data: bytes) -> list:
        if self.closed or self.tunnel:
            return []
        self.responses.receive_data(data)
        out = self._out = []
        self._pump_responses()
        return out

    def client_eof(self) -> list:
        out = self._out = []
        if self.closed or self.tunnel:
            return out
        self._client_eof = True
        cur = self._current
        if cur is not None and cur.local is None:
            self._close("client closed in the middle of a forwarded request", abort=True)
        else:
            self.requests.stop()
            if self._current is not None:  # a denied request's body: nothing more will come
                self._current = None
            self._close_if_idle()
        return out

    def upstream_eof(self) -> list:
        out = self._out = []
        if self.closed or self.tunnel:
            return out
        self.responses.receive_eof()
        self._pump_responses()
        if self.closed:
            return out
        if not self._queue_upstream():
            self.responses.reset()  # idle keep-alive connection closed: next request reconnects
            return out
        if self._started:
            self._close("upstream closed in the middle of a response", abort=True)
        else:
            self._fail_head(unavailable_reply(UPSTREAM_TERMINATED), "upstream " + UPSTREAM_TERMINATED)
        return out

    def upstream_failed(self, why: str = UPSTREAM_CONNECT_FAILURE) -> list:
        out = self._out = []
        if self.closed or self.tunnel:
            return out
        if self._started:
            self._close(f"upstream {why}", abort=True)
        elif self._queue_upstream():
            self._fail_head(unavailable_reply(why), f"upstream {why}")
        return out

    @property
    def backlog(self) -> int:
        """Requests read and not yet answered."""
        return len(self._queue)

    @property
    def streaming_upstream(self) -> bool:
        """A forwarded request's body is still arriving from the client."""
        cur = self._current
        return cur is not None and cur.local is None

    @property
    def wants_data(self) -> bool:
        """False when the client should not be read until responses drain."""
        return len(self._queue) < self.max_pipeline and self.requests.buffered < MAX_HEAD

    # -- requests ------------------------------------------------------------------------------
    def _pump_requests(self) -> None:
        reader = self.requests
        out = self._out
        queue = self._queue
        while not self.closed:
            if self._current is None and len(queue) >= self.max_pipeline:
                break  # read ahead no further until responses drain
            ev = reader.next_event()
            t = type(ev)
            if t is Body:
                cur = self._current
                if cur is not None and cur.local is None:
                    last = out[-1] if out else None
                    if type(last) is SendUpstream and len(last.data) < 16384:
                        last.data += ev.data
                    else:
                        out.append(SendUpstream(ev.data))
            elif t is RequestHead:
                self._on_request(ev)
            elif t is EndOfMessage:
                cur = self._current
                self._current = None
                if cur is not None and cur.upgrade and cur.local is not None:
                    # a denied upgrade: the connection stays HTTP, unless it closes after the 403
                    reader.stop() if cur.close else reader.resume()
            elif t is ProtocolError:
                self._on_request_error(ev)
            else:  # NEED_DATA, PAUSED
                break
        if queue and queue[0].local is not None:
            full = len(queue) >= self.max_pipeline
            self._flush()
            if full and len(queue) < self.max_pipeline and reader.buffered and not self.closed:
                self._pump_requests()  # the pipeline limit stopped the reading, now there is room
        elif self._client_eof or reader.done:
            self._close_if_idle()

    def _on_request(self, head: RequestHead) -> None:
        t0 = self.clock()
        try:
            result = self.check(head.request)
        except Exception as e:  # the oracle failed: fail closed
            result = L7Result(False, reason=f"policy lookup failed: {type(e).__name__}: {e}")
        if result.allowed:
            edits = result.header_edits
            data = head.raw if head.new_target is None and not head.strip_h2c and not edits \
                else rebuild_head(head, edits)
            entry = _Pending(None, not head.keep_alive, head, result, t0)
            self._out.append(SendUpstream(data))
        else:
            # The body of a denied request is read and dropped; with Expect: 100-continue the
            # client may never send it, so that connection is closed after the 403.
            cut = head.expect_continue and head.has_body
            close = not head.keep_alive or cut
            reply = denied_reply(close=close, head_only=head.method == "HEAD")
            entry = _Pending(reply, close, head, result, t0, 403)
            if cut:
                self.requests.stop()
        self._queue.append(entry)
        self._current = entry

    def _on_request_error(self, ev: ProtocolError) -> None:
        cur = self._current
        self._current = None
        if cur is not None and cur.local is None:
            self._close(f"bad request body: {ev.reason}", abort=True)
            return
        if cur is not None:  # a denied request's body was malformed: its 403 closes the connection
            cur.close = True
            return
        reply = error_reply(ev.status) if ev.status else b""
        self._queue.append(_Pending(reply, True, None, None, self.clock(), ev.status, ev.reason))

    # -- responses -----------------------------------------------------------------------------
    def _queue_upstream(self) -> bool:
        q = self._queue
        return bool(q) and q[0].local is None

    def _pump_responses(self) -> None:
        reader = self.responses
        out = self._out
        q = self._queue
        entry = q[0] if q and q[0].local is None else None  # the request being answered
        while not self.closed:
            ev = reader.next_event(entry.method if entry is not None else None,
                                   entry is not None and entry.upgrade is not None)
            t = type(ev)
            if t is Body:
                last = out[-1] if out else None
                if type(last) is SendClient and len(last.data) < 16384:
                    last.data += ev.data
                else:
                    out.append(SendClient(ev.data))
            elif t is ResponseHead:
                out.append(SendClient(ev.data))
                if ev.interim:
                    continue
                self._started = True
                entry.code = ev.status
                if ev.switch:
                    self._start_tunnel(entry)
                    return
                if not ev.keep_alive:
                    entry.close = True
            elif t is EndOfMessage:
                q.popleft()
                self._started = False
                self._emit(entry)
                if entry.close:
                    self._close("connection not kept alive")
                    return
                if entry.upgrade:  # the upstream declined the upgrade: back to HTTP
                    self.requests.resume()
                if (q and q[0].local is not None) or self._client_eof or self.requests.done:
                    self._flush()
                if self.requests.buffered and not self.closed:
                    self._pump_requests()
                entry = q[0] if q and q[0].local is None else None
            elif t is ProtocolError:
                if self._started or entry is None:
                    self._close(f"upstream: {ev.reason}", abort=True)
                else:
                    self._fail_head(error_reply(502), f"upstream: {ev.reason}")
                return
            else:
                break

    def _start_tunnel(self, entry: _Pending) -> None:
        self._queue.popleft()
        self._emit(entry)
        self.tunnel = True
        self._out.append(Tunnel(self.requests.trailing_data(), self.responses.trailing_data()))
        self.requests.stop()

    def _fail_head(self, reply: bytes, reason: str) -> None:
        """The upstream owes the head-of-queue response and will never send it."""
        entry = self._queue.popleft()
        entry.code = int(reply[9:12])
        entry.reason = reason
        self._out.append(SendClient(reply))
        self._emit(entry)
        self._close(reason)

    # -- ordering ------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Send the local replies that have reached the head of the queue."""
        q = self._queue
        while q and q[0].local is not None and not self.closed:
            entry = q.popleft()
            if entry.local:
                self._out.append(SendClient(entry.local))
            self._emit(entry)
            if entry.close:
                self._close(entry.reason if entry.code != 403 else "connection not kept alive")
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if not self.closed and (self._client_eof or self.requests.done) and not self._queue \
                and self._current is None:
            self._close("client done")

    def _emit(self, entry: _Pending) -> None:
        entry.t1 = self.clock()
        self._out.append(Flow(entry, self.authority))

    def _close(self, reason: str, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.requests.stop()
        for entry in self._queue:  # read (maybe forwarded), not fully answered: still a flow each
            entry.reason = f"{entry.reason}; not finished: {reason}" if entry.reason \
                else f"not finished: {reason}"
            self._emit(entry)
        self._queue.clear()
        self._current = None
        self._out.append(Close(reason, abort))


def describe(commands: list) -> list[Any]:
    """Commands as plain data (for tests and debugging)."""
    out: list[Any] = []
    for c in commands:
        if isinstance(c, (SendUpstream, SendClient)):
            out.append((type(c).__name__, c.data))
        elif isinstance(c, Flow):
            out.append(("Flow", c.verdict, c.code))
        elif isinstance(c, Tunnel):
            out.append(("Tunnel", c.to_upstream, c.to_client))
        elif isinstance(c, Close):
            out.append(("Close", c.abort))
    return out
