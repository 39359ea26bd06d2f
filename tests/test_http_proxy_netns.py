"""The HTTP proxy over real sockets, with the real redirect: two scratch network namespaces.

    client ns (tiefighter 10.200.0.21) ──veth── server ns (deathstar-1 10.200.0.11)
                                                  nft: tcp dport {80, 8080} redirect :15001
                                                  proxy on 0.0.0.0:15001, the app on :80/:8080

The test process switches its own thread into the server namespace (setns) to run the proxy and
the app there, and creates client sockets in the client namespace. So SO_ORIGINAL_DST, the
prerouting redirect (ingress), the output redirect with PROXY_MARK excluded (egress, and the
proxy's own upstream sockets) are all the kernel's. Oracle: EngineOracle over the Star Wars
L7 policy (policies/starwars) plus the corpus extras, for deathstar-1. Needs root; the
namespaces are removed even when a test fails.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import httptools
import pytest

from proxy.agent.oracle import EngineOracle
from proxy.datapath.constants import PROXY_MARK
from proxy.l7.http import conn as http
from proxy.l7.http.server import serve
from proxy.policy.endpoint import load_endpoints_file
from proxy.policy.engine import Engine
from proxy.policy.load import load_paths

ROOT = Path(__file__).resolve().parent.parent
POLICIES = [ROOT / "policies" / "starwars" / "l3-l4-l7.yaml",
            ROOT / "tests" / "data" / "http_corpus" / "policies" / "extras.yaml"]
ENDPOINTS = ROOT / "policies" / "starwars" / "endpoints.yaml"
DEATHSTAR, TIEFIGHTER = "10.200.0.11", "10.200.0.21"
DEATHSTAR6, TIEFIGHTER6 = "fd00:200::11", "fd00:200::21"
PROXY_PORT = 15001
CLONE_NEWNET = 0x40000000

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
    reason="needs root, iproute2 and nftables")

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def netns(name: str):
    """Run this thread in network namespace `name` (sockets created meanwhile stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        yield
    finally:
        if _libc.setns(own, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(own)
        os.close(target)


def sh(*args: str, input: str | None = None) -> None:
    subprocess.run(args, check=True, input=input, text=True, capture_output=True)


@pytest.fixture(scope="module")
def lab():
    tag = uuid.uuid4().hex[:6]
    srv, cli = f"l7h-{tag}-srv", f"l7h-{tag}-cli"
    a, b = f"l7h{tag}a", f"l7h{tag}b"
    try:
        sh("ip", "netns", "add", srv)
        sh("ip", "netns", "add", cli)
        sh("ip", "link", "add", a, "netns", srv, "type", "veth", "peer", "name", b, "netns", cli)
        sh("ip", "-n", srv, "addr", "add", f"{DEATHSTAR}/24", "dev", a)
        sh("ip", "-n", cli, "addr", "add", f"{TIEFIGHTER}/24", "dev", b)
        sh("ip", "-n", srv, "addr", "add", f"{DEATHSTAR6}/64", "dev", a, "nodad")
        sh("ip", "-n", cli, "addr", "add", f"{TIEFIGHTER6}/64", "dev", b, "nodad")
        for ns, dev in ((srv, a), (cli, b)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "netns", "exec", srv, "nft", "-f", "-", input=f"""
table inet l7gate_http_test {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport {{ 80, 8080 }} redirect to :{PROXY_PORT}
    }}
    chain out {{
        type nat hook output priority -100; policy accept;
        meta mark {PROXY_MARK:#x} accept
        tcp dport {{ 80, 8080 }} redirect to :{PROXY_PORT}
    }}
}}
""")
        yield {"srv": srv, "cli": cli}
    finally:
        for ns in (srv, cli):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture(scope="module")
def oracle():
    result = load_paths([str(p) for p in POLICIES])
    assert result.valid
    endpoints, services = load_endpoints_file(str(ENDPOINTS))
    for ep in endpoints:  # the scratch namespaces' IPv6 addresses
        ep.ips += {"deathstar-1": [DEATHSTAR6], "tiefighter": [TIEFIGHTER6]}.get(ep.name, [])
    return EngineOracle(Engine(result.policies, endpoints, services), "deathstar-1")


# --- the app: deathstar's HTTP server (and an echoing WebSocket endpoint on 8080) -------------

class App(asyncio.Protocol):
    """Answers every request it gets, in order; records what reached it."""
    seen: list[tuple[str, str, bytes]]

    def __init__(self, seen: list) -> None:
        self.seen = seen
        self.parser = httptools.HttpRequestParser(self)
        self.tunnel = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method, path = self.parser.get_method().decode(), self.url.decode()
        self.seen.append((method, path, self.body))
        if path == "/ws":
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n")
            self.tunnel = True
            return
        body = b"Ship landed\n" if (method, path) == ("POST", "/v1/request-landing") \
            else f"{method} {path} reached the app\n".encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data.upper())  # the "WebSocket" echoes in capitals
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[e.args[0]:]
            if rest:
                self.transport.write(rest.upper())


class Responses:
    """Count complete responses in what a client received."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done = 0
        self.codes: list[int] = []

    def on_headers_complete(self) -> None:
        self.codes.append(self.parser.get_status_code())

    def on_message_complete(self) -> None:
        self.done += 1


async def read_responses(reader: asyncio.StreamReader, n: int, timeout: float = 5.0) -> bytes:
    got = b""
    counter = Responses()
    while counter.done < n:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            break
        got += chunk
        counter.parser.feed_data(chunk)
    return got


class Setup:
    def __init__(self, lab, oracle, **proxy_options) -> None:
        self.proxy_options = proxy_options
        self.lab = lab
        self.oracle = oracle
        self.flows: list[dict] = []
        self.seen: list[tuple[str, str, bytes]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.apps = [await loop.create_server(lambda: App(self.seen), [DEATHSTAR, DEATHSTAR6], port)
                     for port in (80, 8080)]
        # host left to its default, as the agent does: 0.0.0.0 and ::
        self.proxy = await serve(self.oracle, [DEATHSTAR, DEATHSTAR6], port=PROXY_PORT,
                                 on_flow=self.flows.append, **self.proxy_options)

    async def stop(self) -> None:
        await self.proxy.aclose()
        for app in self.apps:
            app.close()

    async def client(self, dst: str = DEATHSTAR, port: int = 80, src_ns: str = "cli"):
        with netns(self.lab[src_ns]):
            sock = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (dst, port)), 5)
        return await asyncio.open_connection(sock=sock)


def run(lab, oracle, scenario, use_uvloop: bool = False, **proxy_options):
    """Run `scenario(setup)` with the proxy and the app in the server namespace."""
    async def main():
        setup = Setup(lab, oracle, **proxy_options)
        await setup.start()
        try:
            return await asyncio.wait_for(scenario(setup), 20)
        finally:
            await setup.stop()

    with netns(lab["srv"]):
        if use_uvloop:
            import uvloop
            return uvloop.run(main())
        return asyncio.run(main())


LANDING = b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar.default.svc.cluster.local\r\n\r\n"
EXHAUST = b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: deathstar.default.svc.cluster.local\r\n\r\n"
LANDED = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nShip landed\n"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_allowed_request_lands_and_is_recorded(lab, oracle, loop):
    async def scenario(s: Setup):
        reader, writer = await s.client()
        writer.write(LANDING)
        got = await read_responses(reader, 1)
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario, use_uvloop=loop == "uvloop")
    assert got == LANDED
    assert s.seen == [("POST", "/v1/request-landing", b"")]
    (flow,) = s.flows
    assert (flow["direction"], flow["src_ip"], flow["dst_ip"], flow["dst_port"]) == \
        ("ingress", TIEFIGHTER, DEATHSTAR, 80)
    assert (flow["verdict"], flow["code"], flow["method"], flow["protocol"]) == \
        ("FORWARDED", 200, "POST", "HTTP/1.1")
    assert flow["url"] == "http://deathstar.default.svc.cluster.local/v1/request-landing"
    assert flow["latency_ms"] >= 0


def test_denied_request_gets_exact_403_and_never_reaches_the_app(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client()
        writer.write(EXHAUST)
        got = await read_responses(reader, 1)
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario)
    assert got == (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n"
                   b"\r\nAccess denied\r\n")
    assert s.seen == []
    assert [(f["verdict"], f["code"]) for f in s.flows] == [("DROPPED", 403)]


def test_every_request_on_a_keep_alive_connection_is_checked(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client()
        out = []
        for request in (LANDING, EXHAUST, LANDING):
            writer.write(request)
            out.append(await read_responses(reader, 1))
        writer.close()
        return out, s

    out, s = run(lab, oracle, scenario)
    assert out == [LANDED, http.DENIED, LANDED]
    assert [p for _, p, _ in s.seen] == ["/v1/request-landing", "/v1/request-landing"]
    assert s.proxy.stats["connections"] == 1


def test_pipelined_mix_is_answered_in_order(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client()
        writer.write(LANDING + EXHAUST + LANDING + EXHAUST)
        got = await read_responses(reader, 4)
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario)
    assert got == LANDED + http.DENIED + LANDED + http.DENIED
    assert len(s.seen) == 2
    assert [(f["verdict"], f["code"]) for f in s.flows] == \
        [("FORWARDED", 200), ("DROPPED", 403), ("FORWARDED", 200), ("DROPPED", 403)]


def test_canonical_path_is_what_the_app_gets(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client()
        writer.write(b"POST //v1/./x/../request-landing HTTP/1.1\r\nHost: deathstar\r\n\r\n")
        got = await read_responses(reader, 1)
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario)
    assert got == LANDED
    assert s.seen == [("POST", "/v1/request-landing", b"")]


def test_websocket_allowed_becomes_a_tunnel(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client(port=8080)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: deathstar\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"hello through the tunnel")
        echo = await asyncio.wait_for(reader.readexactly(24), 5)
        writer.close()
        return head, echo, s

    head, echo, s = run(lab, oracle, scenario)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert echo == b"HELLO THROUGH THE TUNNEL"
    assert [(f["verdict"], f["code"]) for f in s.flows] == [("FORWARDED", 101)]
    assert s.proxy.stats["tunnels"] == 1


def test_upstream_refusing_the_connection_gets_503(lab, oracle):
    async def scenario(s: Setup):
        s.apps[0].close()  # nothing listens on :80 any more
        await s.apps[0].wait_closed()
        reader, writer = await s.client()
        writer.write(LANDING)
        got = await read_responses(reader, 1)
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario)
    assert got.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert got.endswith(b"reset reason: connection failure")
    assert [(f["verdict"], f["code"]) for f in s.flows] == [("FORWARDED", 503)]


def test_egress_is_marked_and_not_redirected_again(lab, oracle):
    """deathstar as a client: its connection to tiefighter:80 is redirected (output hook) to the
    proxy, which checks it as egress and connects with PROXY_MARK, so it is not redirected back."""
    async def scenario(s: Setup):
        seen_remote: list = []
        with netns(s.lab["cli"]):
            remote = socket.create_server((TIEFIGHTER, 80))
        remote.setblocking(False)
        server = await asyncio.get_running_loop().create_server(lambda: App(seen_remote), sock=remote)
        try:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((DEATHSTAR, 0))
            await asyncio.get_running_loop().sock_connect(sock, (TIEFIGHTER, 80))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /status HTTP/1.1\r\nHost: tiefighter\r\n\r\n")
            got = await read_responses(reader, 1)
            writer.close()
        finally:
            server.close()
        return got, seen_remote, s

    got, seen_remote, s = run(lab, oracle, scenario)
    assert got.endswith(b"GET /status reached the app\n")
    assert seen_remote == [("GET", "/status", b"")]
    (flow,) = s.flows
    assert (flow["direction"], flow["src_ip"], flow["dst_ip"], flow["verdict"]) == \
        ("egress", DEATHSTAR, TIEFIGHTER, "FORWARDED")


def test_direct_connection_to_the_proxy_port_is_closed(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client(port=PROXY_PORT)
        writer.write(LANDING)
        try:
            got = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            got = b""
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario)
    assert got == b""
    assert s.seen == [] and s.flows == []


def test_garbage_closes_only_that_connection(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client()
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n")
        bad = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        reader, writer = await s.client()
        writer.write(LANDING)
        good = await read_responses(reader, 1)
        writer.close()
        return bad, good

    bad, good = run(lab, oracle, scenario)
    assert bad.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert good == LANDED


def test_large_body_streams_through(lab, oracle):
    body = bytes(range(256)) * 40000  # ~10 MB, far beyond any socket buffer

    async def scenario(s: Setup):
        reader, writer = await s.client(port=8080)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: deathstar\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        writer.write(body)
        got = await read_responses(reader, 1, timeout=15)
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert s.seen == [("POST", "/upload", body)]


def test_idle_connection_is_dropped(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client()
        writer.write(LANDING)
        first = await read_responses(reader, 1)
        t0 = asyncio.get_running_loop().time()
        rest = await asyncio.wait_for(reader.read(), 5)  # returns when the proxy closes
        waited = asyncio.get_running_loop().time() - t0
        writer.close()
        return first, rest, waited

    first, rest, waited = run(lab, oracle, scenario, idle_timeout=0.4)
    assert first == LANDED and rest == b""
    assert 0.3 < waited < 2


def test_connections_beyond_the_cap_are_refused_and_the_others_served(lab, oracle):
    """Idle connections held open must not use up the agent's descriptors (nftables and the
    DNS proxy need some): beyond `max_connections` a connection is reset at once."""
    async def scenario(s: Setup):
        held = [await s.client() for _ in range(2)]
        extra_reader, extra_writer = await s.client()
        extra_writer.write(LANDING)
        try:
            refused = await asyncio.wait_for(extra_reader.read(), 5)
        except ConnectionResetError:
            refused = b""
        extra_writer.close()
        reader, writer = held[0]
        writer.write(LANDING)
        served = await read_responses(reader, 1)
        for _, w in held:
            w.close()
        await asyncio.sleep(0.05)
        reader, writer = await s.client()  # a place is free again
        writer.write(LANDING)
        again = await read_responses(reader, 1)
        writer.close()
        return refused, served, again, s.proxy.stats["refused"]

    refused, served, again, count = run(lab, oracle, scenario, max_connections=2)
    assert (refused, served, again, count) == (b"", LANDED, LANDED, 1)


def test_a_body_is_not_read_faster_than_the_upstream_connection_is_made(lab, oracle):
    """While the upstream connects, the client is not read: a body streamed into the pending
    buffer meanwhile had no bound (1.8 GB against an upstream slow to accept). The proxy's SYNs
    to the app are dropped here, so its connect waits."""
    sh("ip", "netns", "exec", lab["srv"], "nft", "-f", "-", input=f"""
table inet l7gate_http_slow {{
    chain out {{
        type filter hook output priority 0; policy accept;
        meta mark {PROXY_MARK:#x} tcp dport 80 tcp flags syn drop
    }}
}}
""")

    async def scenario(s: Setup):
        reader, writer = await s.client()
        writer.write(b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        for _ in range(50):  # 50 MB offered in 0.5 s
            writer.write(b"x" * 1_000_000)
            await asyncio.sleep(0.01)
        (conn,) = s.proxy._conns
        buffered = sum(map(len, conn.upstream.pending))
        writer.transport.abort()
        return buffered

    try:
        buffered = run(lab, oracle, scenario)
    finally:
        sh("ip", "netns", "exec", lab["srv"], "nft", "delete", "table", "inet", "l7gate_http_slow")
    assert buffered < 1_000_000, buffered


def test_ipv6_is_redirected_and_checked_the_same_way(lab, oracle):
    async def scenario(s: Setup):
        reader, writer = await s.client(DEATHSTAR6)
        writer.write(LANDING + EXHAUST)
        got = await read_responses(reader, 2)
        writer.close()
        return got, s

    got, s = run(lab, oracle, scenario)
    assert got == LANDED + http.DENIED
    assert s.seen == [("POST", "/v1/request-landing", b"")]
    flow = s.flows[0]
    assert (flow["direction"], flow["src_ip"], flow["dst_ip"], flow["dst_port"]) == \
        ("ingress", TIEFIGHTER6, DEATHSTAR6, 80)
