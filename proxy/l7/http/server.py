"""The HTTP proxy's I/O: accept redirected connections, ask the policy, move the bytes.

Where connections come from. nftables `redirect` rewrites the destination of a new connection
to a local address and our port, keeping the original in conntrack (read back with
SO_ORIGINAL_DST):
  * egress (the workload is the client; `output` hook): locally generated packets are sent to
    127.0.0.1 (::1 for IPv6); the source stays the workload's address.
  * ingress (the workload is the server; `prerouting` hook): packets go to the *primary
    address of the interface they arrived on* (its first IPv4/IPv6 address), not to loopback.
So one listener on 0.0.0.0 takes both; 127.0.0.1 would be enough for egress only. The default
(host=None) listens on 0.0.0.0 and, when the namespace has IPv6, on :: as well (the datapath's
table is `inet`: IPv6 connections are redirected the same way). A connection made to the proxy port directly (not
redirected: its original destination is the proxy itself) is closed at once.

Direction: egress when the client address is one of this workload's own (the agent tells the
server its IPs; loopback always counts), the peer then being the original destination;
ingress otherwise, the peer being the client. The port is the original destination port.

Upstream: one connection per client connection, to the original destination, opened on the
first allowed request (and again if the upstream closed an idle keep-alive connection), with
SO_MARK = PROXY_MARK so nftables neither redirects it back here nor polices it again. If the
mark cannot be set the request is answered 503: an unmarked socket would loop to the proxy.

Never does: parse HTTP (that is `conn`), log per request, crash on input (an exception in one
connection closes that connection and is logged).
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import resource
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from proxy.datapath.constants import HTTP_PROXY_PORT, PROXY_MARK
from proxy.datapath.origdst import original_dst as _original_dst
from proxy.l7.http.conn import (
    MAX_HEAD,
    UPSTREAM_CONNECT_FAILURE,
    Close,
    Flow,
    ProxyConnection,
    SendClient,
    SendUpstream,
    Tunnel,
)
from proxy.l7.oracle import PolicyOracle
from proxy.observe.flow import ProxyEvent, http_event_kind, http_flow_count
from proxy.policy.ipaddr import is_loopback

__all__ = ["Server", "serve", "serve_forever"]

log = logging.getLogger("l7gate.http")


MAX_CONNECTIONS = 8192  # client connections at most (an idle one holds ~64 KB at worst)


def fd_limit() -> int:
    """The process's file descriptor limit (soft)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

SO_MARK = getattr(socket, "SO_MARK", 36)

OriginalDst = Callable[[socket.socket], "tuple[str, int]"]


def _plain(ip: str) -> str:
    """An address without its IPv4-mapped IPv6 wrapping and scope."""
    ip = ip.split("%", 1)[0]
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def _authority(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return host if port == 80 else f"{host}:{port}"


class Server:
    """The listening proxy. Create with `serve()`; `close()` stops it and drops connections."""

    def __init__(self, oracle: PolicyOracle, local_ips: Iterable[str], *,
                 on_flow: Callable[[dict], None] | None = None,
                 original_dst: OriginalDst | None = None, mark: int | None = PROXY_MARK,
                 connect_timeout: float = 5.0, max_head: int = MAX_HEAD,
                 idle_timeout: float | None = 3600.0, max_connections: int | None = None) -> None:
        self.oracle = oracle
        # beyond: refused at once. Each connection holds two descriptors (client, upstream); the
        # rest of the agent (DNS, nftables, the registry) must never find none left
        self.max_connections = max_connections or min(MAX_CONNECTIONS, max(16, (fd_limit() - 512) // 4))
        self.idle_timeout = idle_timeout
        self.on_flow = on_flow
        self.original_dst = original_dst or _original_dst
        self.mark = mark
        self.connect_timeout = connect_timeout
        self.max_head = max_head
        self.set_local_ips(local_ips)
        self.stats = {"connections": 0, "refused": 0, "requests": 0, "forwarded": 0,
                      "denied": 0, "errors": 0, "tunnels": 0}
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[_Client] = set()
        self._sweeper: asyncio.Task | None = None
        self.port = 0

    def set_local_ips(self, ips: Iterable[str]) -> None:
        """This workload's addresses: a client among them means egress."""
        self.local_ips = frozenset(_plain(str(ipaddress.ip_address(_plain(i)))) for i in ips)

    def is_local(self, ip: str) -> bool:
        return ip in self.local_ips or is_loopback(ip)

    async def start(self, host: str | Sequence[str] | None, port: int) -> None:
        """Listen on `host` (None: 0.0.0.0, and :: too when the namespace has IPv6)."""
        loop = asyncio.get_running_loop()
        def factory() -> _Client:
            return _Client(self)

        srv = await loop.create_server(factory, "0.0.0.0" if host is None else host, port,
                                       reuse_address=True, backlog=1024)
        self._servers.append(srv)
        self.port = srv.sockets[0].getsockname()[1]
        if host is None and socket.has_ipv6:
            try:  # IPv6 redirects land on ::1 / the interface's IPv6 address
                self._servers.append(await loop.create_server(
                    factory, "::", self.port, reuse_address=True, backlog=1024))
            except OSError:
                pass  # no IPv6 in this namespace
        if self.idle_timeout:
            self._sweeper = loop.create_task(self._sweep(self.idle_timeout))

    async def _sweep(self, timeout: float) -> None:
        """Close connections that moved no byte for `timeout` seconds (either direction).

        Connections only raise a flag when bytes move; this looks every timeout/4 seconds.
        """
        period = timeout / 4
        while True:
            await asyncio.sleep(period)
            for conn in list(self._conns):
                if conn.active:
                    conn.active = False
                    conn.idle = 0
                else:
                    conn.idle += 1
                    if conn.idle >= 4:
                        conn.abort()

    @property
    def sockets(self) -> list:
        return [sock for srv in self._servers for sock in srv.sockets]

    def close(self) -> None:
        """Stop listening and drop every connection (synchronous; `wait_closed` to await)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for srv in self._servers:
            srv.close()
        for conn in list(self._conns):
            conn.abort()

    async def wait_closed(self) -> None:
        for srv in self._servers:
            await srv.wait_closed()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- flows ---------------------------------------------------------------------------------
    def _flow(self, conn: _Client, flow: Flow) -> None:
        st = self.stats
        st["requests"] += 1
        code = flow.code
        if flow.verdict == "FORWARDED":
            st["forwarded"] += 1
        elif code == 403:
            st["denied"] += 1
        if code is None or code in (400, 431, 502, 503):
            st["errors"] += 1
        if self.on_flow is None:
            return
        try:
            self.on_flow(HTTPEvent(flow, time.time_ns(), conn.direction, conn.src, conn.dst))
        except Exception:  # an observer must not break the proxy
            log.exception("on_flow callback failed")


class HTTPEvent(ProxyEvent):
    """One request's event for `on_flow`, read as a dict: `conn.Flow.record` plus time (ns),
    direction, src_ip/src_port (the client), dst_ip/dst_port (the original destination);
    built only if someone reads it (the observer's hot path reads the attributes)."""
    __slots__ = ("flow", "time_ns", "direction", "src", "dst", "src_ip", "dst_ip", "flow_count",
                 "http_latency_ns")

    def __init__(self, flow: Flow, time_ns: int, direction: str, src: tuple[str, int],
                 dst: tuple[str, int]) -> None:
        self._dict = None
        self.flow, self.time_ns, self.direction, self.src, self.dst = flow, time_ns, direction, src, dst
        self.src_ip, self.dst_ip = src[0], dst[0]
        self.flow_count = http_flow_count(flow.code)  # = proxy_flow_count(the dict)
        self.http_latency_ns = max(0, flow.latency_us) * 1000  # = http_latency_ns(the dict)

    @property
    def kind(self) -> tuple:  # = proxy_event_kind(the dict), without building it
        f = self.flow
        return http_event_kind(f.verdict, f.code, self.direction, f.policies, f.method, f.protocol)

    def build(self) -> dict:
        record = self.flow.record
        record["time"] = self.time_ns
        record["direction"] = self.direction
        record["src_ip"], record["src_port"] = self.src
        record["dst_ip"], record["dst_port"] = self.dst
        return record


class _Upstream(asyncio.Protocol):
    __slots__ = ("client", "transport", "pending", "closed")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.closed:  # the client went away while we connected
            transport.abort()
            return
        if self.client.write_paused:  # the client reads nothing: its responses must wait
            transport.pause_reading()
        if self.pending:
            transport.writelines(self.pending) if len(self.pending) > 1 \
                else transport.write(self.pending[0])
            self.pending = []
            self.client.set_paused("upstream-connecting", False)

    def data_received(self, data: bytes) -> None:
        self.client.upstream_data(self, data)

    def eof_received(self):
        self.client.upstream_eof(self)
        return True  # keep our side open: the client side decides when to close

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.client.upstream_lost(self)

    def pause_writing(self) -> None:
        self.client.set_paused("upstream-full", True)

    def resume_writing(self) -> None:
        self.client.set_paused("upstream-full", False)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
            # not connected yet: read no more of the client until it is (a body streamed into
            # `pending` meanwhile had no bound: gigabytes against an upstream slow to accept)
            self.client.set_paused("upstream-connecting", True)
        elif not self.closed:
            self.transport.write(data)

    def close(self, abort: bool = False) -> None:
        t = self.transport
        self.closed = True
        if t is not None:
            t.abort() if abort else t.close()


class _Client(asyncio.Protocol):
    """One accepted connection: runs the ProxyConnection's commands."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.core: ProxyConnection | None = None
        self.upstream: _Upstream | None = None
        self.tunnel = False
        self.closed = False
        self.direction = ""
        self.src = ("", 0)
        self.dst = ("", 0)
        self._paused: set[str] = set()
        self.write_paused = False  # the client's transport is over its high-water mark
        self._eof = {"client": False, "upstream": False}
        self.active = True  # bytes moved since the idle sweeper last looked
        self.idle = 0

    # -- setup ---------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        srv = self.server
        self.transport = transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if peer is None or local is None or len(srv._conns) >= srv.max_connections:
            srv.stats["refused"] += 1  # reset before we got here, or too many: nothing to log
            self.closed = True
            transport.abort()
            return
        srv._conns.add(self)
        srv.stats["connections"] += 1
        try:
            sock = transport.get_extra_info("socket")
            try:
                dst_ip, dst_port = srv.original_dst(sock)
            except OSError as e:  # not redirected: no conntrack entry
                self._refuse(f"no original destination for a connection from {peer[0]}: {e}")
                return
            dst_ip = _plain(dst_ip)
            client_ip = _plain(peer[0])
            if dst_port == local[1] and (srv.is_local(dst_ip) or dst_ip == _plain(local[0])):
                self._refuse(f"connection to the proxy port itself from {client_ip} (not redirected)")
                return
            self.src = (client_ip, peer[1])
            self.dst = (dst_ip, dst_port)
            if srv.is_local(client_ip):
                self.direction, peer_ip = "egress", dst_ip
            else:
                self.direction, peer_ip = "ingress", client_ip
            check = functools.partial(srv.oracle.http_verdict, self.direction, peer_ip, dst_port)
            self.core = ProxyConnection(check, authority=_authority(dst_ip, dst_port),
                                        max_head=srv.max_head)
        except Exception:
            log.exception("http proxy: cannot set up an accepted connection")
            self._refuse("setup failed")

    def _refuse(self, why: str) -> None:
        self.server.stats["errors"] += 1
        log.warning("http proxy: closing connection: %s", why)
        self.closed = True
        self.transport.abort()
        self.server._conns.discard(self)

    # -- client side ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.active = True
        if self.tunnel:
            up = self.upstream
            if up is not None:
                up.write(data)
            return
        if self.closed:
            return
        try:
            self._run(self.core.client_data(data))
            if not self.closed and not self.core.wants_data:
                self.set_paused("backlog", True)
            if self.write_paused and not self.closed and not self.core.streaming_upstream:
                self.set_paused("client-full", True)  # its body is through: now it may wait
        except Exception:
            self._crash("client data")

    def eof_received(self):
        self._eof["client"] = True
        if self.tunnel:
            self._tunnel_eof(self.upstream.transport if self.upstream is not None else None)
            return True
        if not self.closed:
            try:
                self._run(self.core.client_eof())
            except Exception:
                self._crash("client eof")
        return True

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server._conns.discard(self)
        if self.upstream is not None:
            self.upstream.close(abort=exc is not None or not self.tunnel)
            self.upstream = None

    def pause_writing(self) -> None:
        """The client reads slowly: stop reading what would be written to it (the upstream's
        responses; and the client's own requests, whose 403s pile up here, unless it is in the
        middle of sending a forwarded body: it may only read once that is sent)."""
        self.write_paused = True
        up = self.upstream
        if up is not None and up.transport is not None and not up.closed:
            up.transport.pause_reading()
        if not self.tunnel and self.core is not None and not self.core.streaming_upstream:
            self.set_paused("client-full", True)

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.upstream
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()
        self.set_paused("client-full", False)

    def set_paused(self, why: str, on: bool) -> None:
        t = self.transport
        if self.closed or t is None:
            return
        was = bool(self._paused)
        if on:
            self._paused.add(why)
        else:
            self._paused.discard(why)
        if was != bool(self._paused):
            t.pause_reading() if self._paused else t.resume_reading()

    # -- upstream side -------------------------------------------------------------------------
    def upstream_data(self, up: _Upstream, data: bytes) -> None:
        self.active = True
        if self.tunnel:
            self.transport.write(data)
            return
        if self.closed or up is not self.upstream:
            return
        try:
            self._run(self.core.upstream_data(data))
            if "backlog" in self._paused and not self.closed and self.core.wants_data:
                self.set_paused("backlog", False)
                self._run(self.core.client_data(b""))
        except Exception:
            self._crash("upstream data")

    def upstream_eof(self, up: _Upstream) -> None:
        self._eof["upstream"] = True
        if self.tunnel:
            self._tunnel_eof(self.transport)
            return
        self._upstream_gone(up)

    def upstream_lost(self, up: _Upstream) -> None:
        if self.tunnel:
            if not self.closed:
                self.transport.close()
            return
        self._upstream_gone(up)

    def _upstream_gone(self, up: _Upstream) -> None:
        if self.closed or up is not self.upstream:
            return
        self.upstream = None
        up.close()
        self.set_paused("upstream-full", False)
        try:
            self._run(self.core.upstream_eof())
        except Exception:
            self._crash("upstream eof")

    def _connect(self) -> _Upstream:
        up = self.upstream = _Upstream(self)
        asyncio.get_running_loop().create_task(self._open(up))
        return up

    async def _open(self, up: _Upstream) -> None:
        srv = self.server
        ip, port = self.dst
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if srv.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, srv.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), srv.connect_timeout)
            if self.closed or up is not self.upstream:
                sock.close()
                return
            await loop.create_connection(lambda: up, sock=sock)
        except (OSError, TimeoutError) as e:
            sock.close()
            if self.closed or up is not self.upstream:
                return
            self.upstream = None
            self.set_paused("upstream-connecting", False)
            why = "connection timeout" if isinstance(e, TimeoutError) \
                else UPSTREAM_CONNECT_FAILURE
            if isinstance(e, PermissionError):
                log.error("http proxy: cannot mark upstream socket (SO_MARK needs CAP_NET_ADMIN)")
            try:
                self._run(self.core.upstream_failed(why))
            except Exception:
                self._crash("upstream connect")
        except Exception:
            sock.close()
            self._crash("upstream connect")

    # -- commands ------------------------------------------------------------------------------
    def _run(self, commands: list) -> None:
        for c in commands:
            t = type(c)
            if t is SendClient:
                self.transport.write(c.data)
            elif t is SendUpstream:
                up = self.upstream or self._connect()
                up.write(c.data)
            elif t is Flow:
                self.server._flow(self, c)
            elif t is Close:
                self._close(c.abort)
            elif t is Tunnel:
                self._start_tunnel(c)

    def _start_tunnel(self, c: Tunnel) -> None:
        self.tunnel = True
        self.server.stats["tunnels"] += 1
        self.set_paused("backlog", False)
        self.set_paused("client-full", False)
        if c.to_client:
            self.transport.write(c.to_client)
        if c.to_upstream:
            self.upstream.write(c.to_upstream)
        if self._eof["client"] and self.upstream is not None:
            self._tunnel_eof(self.upstream.transport)

    def _tunnel_eof(self, other) -> None:
        if self._eof["client"] and self._eof["upstream"]:
            self._close(False)
        elif other is not None and other.can_write_eof():
            other.write_eof()

    def _close(self, abort: bool) -> None:
        self.closed = True
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.close(abort)
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def _crash(self, where: str) -> None:
        log.exception("http proxy: connection %s:%s -> %s:%s closed after an error in %s",
                      *self.src, *self.dst, where)
        self.server.stats["errors"] += 1
        self._close(True)

    def abort(self) -> None:
        if self.transport is not None:
            self._close(True)


async def serve(oracle: PolicyOracle, local_ips: Iterable[str] = (),
                host: str | Sequence[str] | None = None, port: int = HTTP_PROXY_PORT, *,
                on_flow: Callable[[dict], None] | None = None,
                original_dst: OriginalDst | None = None, mark: int | None = PROXY_MARK,
                connect_timeout: float = 5.0, max_head: int = MAX_HEAD,
                idle_timeout: float | None = 3600.0, max_connections: int | None = None) -> Server:
    """Start the proxy on the running loop; returns once it listens.

    host: one address or several; None (default) is 0.0.0.0 plus :: when IPv6 is there:
    loopback takes the egress redirects, the interface addresses the ingress ones. Port 0
    picks a free port (see `Server.port`).
    on_flow: called with one `HTTPEvent` per request, a read-only mapping (see
    `conn.Flow.record`, plus time in ns, direction, src_ip/src_port = the client, dst_ip/dst_port
    = the original destination).
    original_dst: replaces SO_ORIGINAL_DST (for tests without nftables); mark=None leaves
    upstream sockets unmarked (likewise). idle_timeout: seconds without a byte either way
    before a connection is dropped (None: never). max_connections: client connections at once
    (default: by the descriptor limit, at most MAX_CONNECTIONS); beyond, reset at once.
    """
    srv = Server(oracle, local_ips, on_flow=on_flow, original_dst=original_dst, mark=mark,
                 connect_timeout=connect_timeout, max_head=max_head, idle_timeout=idle_timeout,
                 max_connections=max_connections)
    await srv.start(host, port)
    return srv


def serve_forever(oracle: PolicyOracle, local_ips: Iterable[str] = (), host=None,
                  port: int = HTTP_PROXY_PORT, *, use_uvloop: bool = True, **kw) -> None:
    """Run the proxy in the foreground until cancelled (uvloop when available and asked)."""
    async def main() -> None:
        srv = await serve(oracle, local_ips, host, port, **kw)
        try:
            await asyncio.Event().wait()
        finally:
            await srv.aclose()

    if use_uvloop:
        try:
            import uvloop
            return uvloop.run(main())
        except ImportError:
            pass
    asyncio.run(main())
