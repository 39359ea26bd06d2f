"""The DNS proxy's sockets: transparent UDP and TCP listeners, upstream exchanges, replies.

Interception (the datapath installs it): the workload's DNS to port 53 is marked
DNS_TPROXY_MARK, policy-routed to `lo` and TPROXY'd to `127.0.0.1:DNS_PROXY_PORT`, so the packets
keep the server address the client asked for:
  * UDP: the listener has IP_TRANSPARENT and IP_RECVORIGDSTADDR; `recvmsg` gives the original
    destination; the reply leaves from that address through an IP_TRANSPARENT socket bound to
    it (SO_REUSEADDR; unconnected, so TPROXY never hands it a later query; kept per server
    address, but for loopback servers).
  * TCP: the listener has IP_TRANSPARENT; an accepted socket's local address is the original
    destination and replies leave from it.
Every socket the proxy opens carries SO_MARK=PROXY_MARK so the datapath never intercepts it again.
Upstream: UDP, one connected socket per client socket and server (the client's fresh source
port per query gives a fresh upstream port; kernel-filtered source; closed after UDP_IDLE
seconds unused), queries multiplexed by a random ID; TCP, one upstream connection per client
connection, queries multiplexed by ID.

The logic is `chain.py`; this module only moves bytes and calls the chain in order
(`Server.answer`). It never decides anything itself and never crashes on input: every query
ends in a reply, silence, or a counted error.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from proxy.datapath.constants import DNS_PROXY_PORT, PROXY_MARK
from proxy.l7.dns import wire
from proxy.l7.dns.chain import (REFUSED, SERVFAIL, Destination, DNSProtocolError, Learned, Mismatch,
                                Outstanding, Query, Response, TCPFramer, check_policy, error_reply,
                                learn, parse_query, refusal, release)
from proxy.l7.oracle import L7Result, PolicyOracle
from proxy.observe.flow import ProxyEvent, dns_event_kind, dns_flow_count
from proxy.policy.ipaddr import is_loopback

log = logging.getLogger("l7gate.dns")

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20  # == IP_ORIGDSTADDR, the cmsg type
IPV6_RECVORIGDSTADDR = 74  # == IPV6_ORIGDSTADDR
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)
MAX_INFLIGHT_PER_TCP = 64
MAX_INFLIGHT = 8192  # queries being answered at once, all clients: beyond, UDP ones are dropped

FlowCallback = Callable[["DNSEvent"], None]
Exchange = Callable[[Query, Destination], Awaitable[Response]]  # TimeoutError after upstream_timeout


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def _answer_within(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future,
                         timeout: float) -> Response:
    """The upstream's answer, or TimeoutError after `timeout` seconds: a timer on the answer's
    own future (asyncio.timeout's task bookkeeping cost ~10% of a proxied query)."""
    timer = loop.call_later(timeout, _expire, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()


class UpstreamFailed(Exception):
    """The upstream could not be reached (refused, reset, closed): the client gets SERVFAIL."""


def _set_mark(sock: socket.socket, mark: int | None) -> None:
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _address_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _transparent_socket(family: int, kind: int) -> socket.socket:
    """A non-blocking, address-reusing socket that may bind (or be handed) foreign addresses."""
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _orig_dst(ancdata) -> tuple[str, int] | None:
    """The original destination TPROXY kept (sockaddr_in / sockaddr_in6 in the cmsg)."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port = struct.unpack_from("!H", data, 2)[0]
            return socket.inet_ntoa(data[4:8]), port
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port = struct.unpack_from("!H", data, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


class Server:
    """One DNS proxy (UDP + TCP on the same address). Build it with `serve()`."""

    MAX_REPLY_SOCKETS = 64
    MAX_UDP_UPSTREAMS = 4096  # beyond: idle ones are closed first; if none is idle, SERVFAIL
    UDP_IDLE = 10.0  # seconds an upstream socket is kept without a query

    def __init__(self, oracle: PolicyOracle, *, on_flow: FlowCallback | None = None,
                 reject_rcode: int = REFUSED, upstream_timeout: float = 10.0,
                 mark: int | None = PROXY_MARK, tcp_idle_timeout: float = 30.0) -> None:
        self.oracle = oracle
        self.on_flow = on_flow
        self.reject_rcode = reject_rcode
        self.upstream_timeout = upstream_timeout
        self.mark = mark
        self.tcp_idle_timeout = tcp_idle_timeout
        self.outstanding = Outstanding()
        self.stats: Counter[str] = Counter()
        self.address: tuple[str, int] = ("", 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: list[socket.socket] = []  # the listeners: IPv4, and IPv6 when there is IPv6
        self._tcp: list[asyncio.AbstractServer] = []
        self._clients: set[_ClientTCP] = set()
        self._tasks: set[asyncio.Task] = set()
        self._reply_socks: dict[tuple[str, int], socket.socket] = {}
        # descriptors: UDP upstream sockets and TCP clients (with their upstreams) stay well
        # below the process's limit, which the HTTP proxy and nftables share
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.MAX_UDP_UPSTREAMS = min(Server.MAX_UDP_UPSTREAMS, max(16, limit // 4))
        self.max_tcp_clients = min(1024, max(8, limit // 16))
        self._udp_upstreams: dict[tuple, _UDPUpstream] = {}  # (client, server ip, port) ->
        self._sweeper: asyncio.Task | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self, host: str, port: int, host6: str | None = None) -> None:
        """Listen on host:port, and on host6 (the same port) when given and the namespace has
        IPv6: the datapath sends IPv6 DNS to [::1]."""
        self._loop = asyncio.get_running_loop()
        await self._listen(host, port)
        self.address = self._udp[0].getsockname()[:2]
        if host6 is not None:
            try:
                await self._listen(host6, self.address[1])
            except OSError as e:
                log.info("DNS proxy: no IPv6 listener (%s)", e)
        self._sweeper = self._loop.create_task(self._udp_sweeper())
        log.info("DNS proxy listening on %s (UDP, TCP; transparent)",
                 ", ".join(_address_text(*s.getsockname()[:2]) for s in self._udp))

    async def _listen(self, host: str, port: int) -> None:
        family = _family(host)
        udp = _transparent_socket(family, socket.SOCK_DGRAM)
        tcp = _transparent_socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
            else:
                udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            udp.bind((host, port))
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(512)
            server = await self._loop.create_server(lambda: _ClientTCP(self), sock=tcp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        self._udp.append(udp)
        self._tcp.append(server)
        self._loop.add_reader(udp.fileno(), self._udp_readable, udp)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for udp in self._udp:
            self._loop.remove_reader(udp.fileno())
            udp.close()
        for tcp in self._tcp:
            tcp.close()
        for client in list(self._clients):
            client.close()
        for sock in self._reply_socks.values():
            sock.close()
        self._reply_socks.clear()
        for up in list(self._udp_upstreams.values()):
            up.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        for tcp in self._tcp:
            await tcp.wait_closed()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the chain, once per query, whatever the transport ---------------------------------------
    async def answer(self, data: bytes, client: tuple[str, int], server: Destination,
                     exchange: Exchange) -> bytes | None:
        """parse → policy → forward → learn → release. Returns the bytes for the client, if any."""
        started = time.monotonic_ns()
        self.stats["queries"] += 1
        query: Query | None = None
        result: L7Result | None = None
        try:
            if self._is_self(server):
                raise DNSProtocolError("addressed to the proxy itself, not intercepted")
            query = parse_query(data)
            verdict = check_policy(self.oracle, query, server)
            result = verdict.result
            if not verdict.allowed:
                self.stats["denied"] += 1
                self._flow(started, client, server, query, "DROPPED", self.reject_rcode,
                           result=result, reason=verdict.reason)
                return refusal(query, self.reject_rcode)
            try:
                response = await exchange(query, server)
            except TimeoutError:
                self.stats["upstream_timeouts"] += 1
                self._flow(started, client, server, query, "ERROR", None, result=result,
                           reason="upstream timeout: no reply")
                return None
            except (UpstreamFailed, OSError) as e:
                raise DNSProtocolError(f"upstream failed: {e}", SERVFAIL,
                                       error_reply(query.header, SERVFAIL, query.question)) from None
            learned = learn(query, response)
            if learned.learnable:
                try:
                    # not shielded: a client that goes away cancels only its wait; the datapath
                    # write itself is shielded where it happens (the agent's batch)
                    await self.oracle.learn(query.qname, list(learned.ips), learned.ttl)
                except Exception as e:
                    log.exception("learning %s failed", query.qname)
                    raise DNSProtocolError(f"learning failed: {e!r}", SERVFAIL,
                                           error_reply(query.header, SERVFAIL, query.question)) from None
                self.stats["learned"] += 1
            self.stats["forwarded"] += 1
            self._flow(started, client, server, query, "FORWARDED", response.rcode, learned,
                       result=result, reason=verdict.reason)
            return release(response, query)
        except DNSProtocolError as e:
            self.stats["servfail" if e.rcode == SERVFAIL else
                       "malformed" if query is None else "errors"] += 1
            verdict_name = "ERROR" if e.rcode == SERVFAIL else "DROPPED"
            self._flow(started, client, server, query, verdict_name, e.rcode, result=result,
                       reason=e.reason)
            return e.reply
        except Exception as e:
            log.exception("DNS query from %s:%d failed", *client)
            self.stats["servfail"] += 1
            self._flow(started, client, server, query, "ERROR", SERVFAIL if query else None,
                       result=result, reason=f"internal error: {e!r}")
            return error_reply(query.header, SERVFAIL, query.question) if query else None

    def _is_self(self, dest: Destination) -> bool:
        """A query sent straight to the proxy's port (not intercepted): forwarding it would loop."""
        host, port = self.address
        return dest.port == port and (host in ("0.0.0.0", dest.ip)
                                      or ipaddress.ip_address(dest.ip).is_loopback)

    def _flow(self, started: int, client: tuple[str, int], server: Destination,
              query: Query | None, verdict: str, rcode: int | None, learned: Learned | None = None,
              result: L7Result | None = None, reason: str = "") -> None:
        if self.on_flow is None:
            return
        try:
            self.on_flow(DNSEvent(time.time_ns(), time.monotonic_ns() - started, client, server,
                                  query, verdict, rcode, learned or _NOTHING_LEARNED, result, reason))
        except Exception:
            log.exception("on_flow callback failed")

    # -- UDP --------------------------------------------------------------------------------------
    def _udp_readable(self, udp: socket.socket) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, client = udp.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("UDP receive failed: %s", e)
                return
            orig = _orig_dst(anc)
            if orig is None:
                self.stats["no_original_destination"] += 1
                continue
            if len(self._tasks) >= MAX_INFLIGHT:
                self.stats["shed"] += 1  # the client asks again; memory stays bounded
                continue
            self._spawn(self._udp_query(data, client[:2], orig))

    async def _udp_query(self, data: bytes, client: tuple[str, int], orig: tuple[str, int]) -> None:
        async def exchange(query: Query, server: Destination) -> Response:
            return await self._udp_upstream(client, server).exchange(query, server)

        reply = await self.answer(data, client, Destination(orig[0], orig[1], "UDP"), exchange)
        if reply is not None:
            self._udp_reply(orig, client, reply)

    def _udp_upstream(self, client: tuple[str, int], server: Destination) -> _UDPUpstream:
        key = (client, server.ip, server.port)
        up = self._udp_upstreams.get(key)
        if up is None or up.closed:
            if len(self._udp_upstreams) >= self.MAX_UDP_UPSTREAMS:
                self._sweep_udp(idle=0.0)
                if len(self._udp_upstreams) >= self.MAX_UDP_UPSTREAMS:
                    raise UpstreamFailed(f"{len(self._udp_upstreams)} upstream sockets wait for answers")
            up = self._udp_upstreams[key] = _UDPUpstream(self, key, server)
        return up

    def _sweep_udp(self, idle: float | None = None) -> None:
        """Close the upstream sockets nobody used for `idle` seconds (default UDP_IDLE) and
        that wait for no answer."""
        limit = time.monotonic() - (self.UDP_IDLE if idle is None else idle)
        for up in [u for u in self._udp_upstreams.values() if not u.waiters and u.used <= limit]:
            up.close()

    async def _udp_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.UDP_IDLE)
            self._sweep_udp()

    def _udp_reply(self, orig: tuple[str, int], client: tuple[str, int], reply: bytes) -> None:
        """Answer from the address the client asked: a transparent socket bound to it, kept per
        server address (most workloads ask one or two servers), except for a server in this
        namespace (loopback), whose own socket a lasting bind could shadow."""
        s = self._reply_socks.get(orig)
        keep = not is_loopback(orig[0])
        try:
            if s is None:
                s = self._reply_socket(orig)
                if keep:
                    if len(self._reply_socks) >= self.MAX_REPLY_SOCKETS:
                        self._reply_socks.pop(next(iter(self._reply_socks))).close()
                    self._reply_socks[orig] = s
            s.sendto(reply, client)
        except OSError as e:
            self.stats["reply_failed"] += 1
            log.warning("cannot answer %s:%d from %s:%d: %s", *client, *orig, e)
        finally:
            if s is not None and not keep:
                s.close()

    def _reply_socket(self, orig: tuple[str, int]) -> socket.socket:
        s = _transparent_socket(_family(orig[0]), socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # it only sends
            _set_mark(s, self.mark)
            s.bind(orig)
        except OSError:
            s.close()
            raise
        return s


_NOTHING_LEARNED = Learned()


class DNSEvent(ProxyEvent):
    """One query's event for `on_flow`, read as a dict (type dns, time in ns, direction, protocol,
    src/dst, id, qname, qtypes, verdict, rcode, rcode_name, ips, ttl, cnames, rrtypes,
    policies, reason, latency_ns); built only if someone reads it."""
    __slots__ = ("time_ns", "took_ns", "client", "server", "query", "verdict", "rcode", "learned",
                 "result", "reason")

    def __init__(self, time_ns: int, took_ns: int, client: tuple[str, int], server: Destination,
                 query: Query | None, verdict: str, rcode: int | None, learned: Learned,
                 result: L7Result | None, reason: str) -> None:
        self._dict = None
        self.time_ns, self.took_ns, self.client, self.server = time_ns, took_ns, client, server
        self.query, self.verdict, self.rcode, self.learned = query, verdict, rcode, learned
        self.result, self.reason = result, reason

    src_ip = property(lambda self: self.client[0])
    dst_ip = property(lambda self: self.server.ip)
    http_latency_ns = 0  # = http_latency_ns(the dict): DNS has no HTTP latency

    @property
    def kind(self) -> tuple:  # = proxy_event_kind(the dict), without building it
        q, learned = self.query, self.learned
        return dns_event_kind(self.verdict, "egress", self.result.policies if self.result else (),
                              self.server.proto, (q.qtype_name,) if q else (), len(learned.ips),
                              self.rcode, learned.rrtypes, q.qname if q else "")

    @property
    def flow_count(self) -> int:  # = proxy_flow_count(the dict)
        return dns_flow_count(self.verdict)

    def build(self) -> dict:
        q, learned, server, rcode = self.query, self.learned, self.server, self.rcode
        return {
            "type": "dns", "time": self.time_ns, "direction": "egress", "protocol": server.proto,
            "src_ip": self.client[0], "src_port": self.client[1], "dst_ip": server.ip,
            "dst_port": server.port, "id": q.id if q else None, "qname": q.qname if q else "",
            "qtypes": [q.qtype_name] if q else [], "verdict": self.verdict, "rcode": rcode,
            "rcode_name": wire.rcode_name(rcode) if rcode is not None else "",
            "ips": list(learned.ips), "ttl": learned.ttl, "cnames": list(learned.cnames),
            "rrtypes": list(learned.rrtypes),
            "policies": list(self.result.policies) if self.result else [],
            "reason": self.reason, "latency_ns": self.took_ns,
        }


class _UDPUpstream:
    """A connected socket to one server, shared by the queries of one client socket: the proxy's
    side keeps one 5-tuple (one conntrack entry) as long as the client's does, and a resolver
    that picks a fresh source port per query gets a fresh upstream port too. Answers are matched
    by `Outstanding` (ID, question, source address); an ICMP error (refused) fails every query
    waiting here and closes the socket."""

    def __init__(self, owner: Server, key: tuple, server: Destination) -> None:
        sock = socket.socket(_family(server.ip), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _set_mark(sock, owner.mark)
            sock.connect((server.ip, server.port))
        except OSError as e:
            sock.close()
            raise UpstreamFailed(str(e)) from None
        self.owner = owner
        self.key = key
        self.sock = sock
        self.waiters: dict[int, asyncio.Future] = {}  # upstream ID -> the query's future
        self.used = time.monotonic()
        self.closed = False
        owner._loop.add_reader(sock.fileno(), self._readable)

    async def exchange(self, query: Query, server: Destination) -> Response:
        owner = self.owner
        pending = owner.outstanding.register(self, query, server)
        waiter = owner._loop.create_future()
        self.waiters[pending.upstream_id] = waiter
        self.used = time.monotonic()
        try:
            try:
                self.sock.send(pending.wire)
            except OSError as e:
                raise UpstreamFailed(str(e)) from None
            return await _answer_within(owner._loop, waiter, owner.upstream_timeout)
        finally:
            # the ID may already serve a newer query (answered ones free it at once): only ours
            if self.waiters.get(pending.upstream_id) is waiter:
                del self.waiters[pending.upstream_id]
            owner.outstanding.cancel(pending)

    def _readable(self) -> None:
        owner = self.owner
        for _ in range(64):
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. ICMP port unreachable: the server refused
                for waiter in self.waiters.values():
                    if not waiter.done():
                        waiter.set_exception(UpstreamFailed(str(e)))
                self.close()
                return
            try:
                pending, response = owner.outstanding.match(self, data, addr)
            except Mismatch as e:
                owner.stats["answers_discarded"] += 1
                log.debug("discarded an upstream message: %s", e)
                continue
            waiter = self.waiters.pop(pending.upstream_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(response)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.owner._udp_upstreams.get(self.key) is self:
            del self.owner._udp_upstreams[self.key]
        self.owner._loop.remove_reader(self.sock.fileno())
        self.sock.close()


# -- TCP ------------------------------------------------------------------------------------------
class _ClientTCP(asyncio.Protocol):
    """One intercepted client connection: several queries, answered as each completes."""

    def __init__(self, owner: Server) -> None:
        self.owner = owner
        self.framer = TCPFramer()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task] = set()
        self.upstream: _UpstreamTCP | None = None
        self._connecting = asyncio.Lock()
        self._paused = False  # too many queries in flight
        self._full = False  # the client does not read its answers
        self._last_activity = time.monotonic()
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if len(self.owner._clients) >= self.owner.max_tcp_clients:
            self.owner.stats["tcp_refused"] += 1
            transport.abort()
            return
        self.owner._clients.add(self)
        sock = transport.get_extra_info("socket")
        try:
            _set_mark(sock, self.owner.mark)
        except OSError:
            pass
        self.client = transport.get_extra_info("peername")[:2]
        local = transport.get_extra_info("sockname")[:2]
        self.server = Destination(local[0], local[1], "TCP")
        self._arm_idle()

    def _arm_idle(self) -> None:
        loop = self.owner._loop
        self._idle = loop.call_later(self.owner.tcp_idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        quiet = time.monotonic() - self._last_activity
        if not self.tasks and quiet >= self.owner.tcp_idle_timeout:
            self.close()
        else:
            self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        for message in self.framer.feed(data):
            if len(self.tasks) >= 2 * MAX_INFLIGHT_PER_TCP or len(self.owner._tasks) >= MAX_INFLIGHT:
                self.owner.stats["shed"] += 1  # pipelined far past the limit in one read: cut
                self.transport.abort()
                return
            task = self.owner._spawn(self._query(message))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        if len(self.tasks) >= MAX_INFLIGHT_PER_TCP and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._last_activity = time.monotonic()
        if self._paused and len(self.tasks) < MAX_INFLIGHT_PER_TCP and not self.transport.is_closing():
            self._paused = False
            if not self._full:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The client does not read its answers: read no more of its queries."""
        self._full = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._full = False
        if not self._paused and not self.transport.is_closing():
            self.transport.resume_reading()

    async def _query(self, message: bytes) -> None:
        reply = await self.owner.answer(message, self.client, self.server, self._exchange)
        if reply is not None and not self.transport.is_closing():
            self.transport.write(TCPFramer.frame(reply))

    async def _exchange(self, query: Query, server: Destination) -> Response:
        async with asyncio.timeout(self.owner.upstream_timeout):  # connecting included
            async with self._connecting:
                if self.upstream is None or self.upstream.closed:
                    self.upstream = await _UpstreamTCP.open(self.owner, server)
            return await self.upstream.exchange(query)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.owner._clients.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        for task in list(self.tasks):
            task.cancel()
        if self.upstream is not None:
            self.upstream.close()


class _UpstreamTCP(asyncio.Protocol):
    """The proxy's own connection to the server a client connection addressed."""

    def __init__(self, owner: Server, server: Destination) -> None:
        self.owner = owner
        self.server = server
        self.framer = TCPFramer()
        self.transport: asyncio.Transport | None = None
        self.waiters: dict = {}
        self.closed = False

    @classmethod
    async def open(cls, owner: Server, server: Destination) -> _UpstreamTCP:
        loop = owner._loop
        sock = socket.socket(_family(server.ip), socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            _set_mark(sock, owner.mark)
            await loop.sock_connect(sock, (server.ip, server.port))
            _, proto = await loop.create_connection(lambda: cls(owner, server), sock=sock)
        except OSError as e:
            sock.close()
            raise UpstreamFailed(str(e)) from None
        except BaseException:
            sock.close()
            raise
        return proto

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")[:2]

    async def exchange(self, query: Query) -> Response:
        if self.closed:
            raise UpstreamFailed("upstream connection closed")
        pending = self.owner.outstanding.register(self, query, self.server)
        waiter = self.owner._loop.create_future()
        self.waiters[pending] = waiter
        try:
            self.transport.write(TCPFramer.frame(pending.wire))
            return await waiter
        finally:
            self.waiters.pop(pending, None)
            self.owner.outstanding.cancel(pending)

    def data_received(self, data: bytes) -> None:
        for message in self.framer.feed(data):
            try:
                pending, response = self.owner.outstanding.match(self, message, self.peer)
            except Mismatch as e:
                self.owner.stats["answers_discarded"] += 1
                log.debug("discarded an upstream message: %s", e)
                continue
            waiter = self.waiters.pop(pending, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(response)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(UpstreamFailed(f"upstream closed the connection ({exc})"))
        self.waiters.clear()
        self.owner.outstanding.cancel_all(self)


async def serve(oracle: PolicyOracle, host: str = "127.0.0.1", port: int = DNS_PROXY_PORT, *,
                on_flow: FlowCallback | None = None, reject_rcode: int = REFUSED,
                upstream_timeout: float = 10.0, mark: int | None = PROXY_MARK,
                tcp_idle_timeout: float = 30.0, host6: str | None = "::1") -> Server:
    """Start the transparent DNS proxy on host:port (UDP and TCP) and on [host6]:port when the
    namespace has IPv6 (None: IPv4 only); `close()` stops it.

    reject_rcode: REFUSED (default) or NXDOMAIN (`--tofqdns-dns-reject-response-code=nameError`).
    upstream_timeout: seconds to wait for the server (Cilium: 10 s); then the client gets nothing.
    mark: SO_MARK of every socket the proxy opens (None: leave unmarked, e.g. without NET_ADMIN).
    on_flow: called with one `DNSEvent` per query (see the package docstring)."""
    server = Server(oracle, on_flow=on_flow, reject_rcode=reject_rcode,
                    upstream_timeout=upstream_timeout, mark=mark, tcp_idle_timeout=tcp_idle_timeout)
    await server.start(host, port, host6)
    return server
