"""The datapath in real namespaces: real nftables, real sockets, real conntrack.

Lab: namespaces A (the workload whose table is under test), B and C (peers) on a bridge in a
fourth namespace; IPv4 10.77.0.0/24 and IPv6 fd77::/64, no route anywhere else. Names carry the
test process id (l7t-<pid>-a ...) and everything is deleted at the end, failures included.
The sockets are made in-process: a thread `setns`es into a namespace, opens its socket there and
comes back (a socket stays in the namespace it was made in).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from needs import nft_unusable_reason

from proxy.datapath import compile as dpc
from proxy.datapath import nft, origdst, routing
from proxy.datapath.constants import PROXY_MARK, new_proxy_mark
from proxy.datapath.state import DatapathState
from proxy.policy.mapstate import MapEntry
from proxy.policy.repository import L7Policy

ROOT = Path(__file__).resolve().parent.parent
A_IP, B_IP, C_IP, B2_IP = "10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.22"
A6, B6, C6 = "fd77::1", "fd77::2", "fd77::3"
A_ID, B_ID, C_ID = 1000, 1001, 1002
FQDN_ID = 16777217
HANG = 0.4  # a dropped SYN gets no answer; anything answered answers in microseconds here
IPCACHE = {f"{A_IP}/32": A_ID, f"{B_IP}/32": B_ID, f"{C_IP}/32": C_ID,
           f"{A6}/128": A_ID, f"{B6}/128": B_ID, f"{C6}/128": C_ID}
HTTP = L7Policy("http", allow_all=True)
DNS = L7Policy("dns", allow_all=True)

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000




pytestmark = pytest.mark.skipif(nft_unusable_reason() is not None,
                                reason=nft_unusable_reason() or "")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def netns(name: str):
    """Run the block with this thread in namespace `name` (setns is per thread)."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Lab:
    def __init__(self) -> None:
        p = f"l7t-{os.getpid()}"
        self.a, self.b, self.c, self.br = f"{p}-a", f"{p}-b", f"{p}-c", f"{p}-br"
        self.socks: list[socket.socket] = []
        self.received: dict[str, list[bytes]] = {}  # UDP echo tag -> datagrams seen
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        for ns in (self.a, self.b, self.c, self.br):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.br, "link", "set", "br0", "up")
        for ns, ip4, ip6, extra in ((self.a, A_IP, A6, None), (self.b, B_IP, B6, B2_IP),
                                    (self.c, C_IP, C6, None)):
            port = "v" + ns[-1]
            sh("ip", "-n", self.br, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "-n", self.br, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            if extra:
                sh("ip", "-n", ns, "addr", "add", f"{extra}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        with netns(self.a):
            routing.install()  # as the agent does at start

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for s in self.socks:
            s.close()
        nft.release()
        for ns in (self.a, self.b, self.c, self.br):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # -- sockets -----------------------------------------------------------------------------
    def listen(self, ns: str, port: int, tag: str, host: str = "0.0.0.0") -> socket.socket:
        """A TCP echo server answering `<tag>:<data>`."""
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with netns(ns):
            s = socket.socket(fam, socket.SOCK_STREAM)
        self.socks.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(512)
        threading.Thread(target=_serve, args=(s, tag.encode()), daemon=True).start()
        return s

    def udp_echo(self, ns: str, port: int, tag: str) -> socket.socket:
        with netns(ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socks.append(s)
        s.bind(("0.0.0.0", port))
        seen = self.received.setdefault(tag, [])
        threading.Thread(target=_udp_serve, args=(s, tag.encode(), seen), daemon=True).start()
        return s

    def apply(self, ns: str, script: str) -> None:
        with netns(ns):
            nft.apply(script)


def _serve(s: socket.socket, tag: bytes) -> None:
    while True:
        try:
            conn, _ = s.accept()
        except OSError:
            return
        threading.Thread(target=_echo, args=(conn, tag), daemon=True).start()


def _echo(conn: socket.socket, tag: bytes) -> None:
    with conn:
        try:
            while data := conn.recv(4096):
                conn.sendall(tag + b":" + data)
        except OSError:
            pass


def _udp_serve(s: socket.socket, tag: bytes, seen: list[bytes]) -> None:
    while True:
        try:
            data, peer = s.recvfrom(4096)
            seen.append(data)
            s.sendto(tag + b":" + data, peer)
        except OSError:
            return


def tcp(ns: str, ip: str, port: int, timeout: float = HANG, mark: int | None = None) -> str:
    """Connect, send 'ping', return the answer, or 'timeout' (dropped) / 'refused' (RST)."""
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with netns(ns):
        s = socket.socket(fam, socket.SOCK_STREAM)
    with s:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
            s.sendall(b"ping")
            return s.recv(100).decode()
        except socket.timeout:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"


def udp(ns: str, ip: str, port: int, timeout: float = HANG) -> str:
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        s.sendto(b"ping", (ip, port))
        try:
            return s.recv(100).decode()
        except socket.timeout:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"


def ping(ns: str, ip: str, timeout: float = HANG) -> str:
    """One ICMP echo over a raw socket: 'reply' or 'timeout'."""
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with s:
        ident = os.getpid() & 0xFFFF
        body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"l7gate"
        csum = _checksum(body)
        s.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (ip, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                pkt = s.recv(1500)
            except socket.timeout:
                break
            ihl = (pkt[0] & 15) * 4
            kind, _, _, rid, _ = struct.unpack_from("!BBHHH", pkt, ihl)
            if kind == 0 and rid == ident:
                return "reply"
        return "timeout"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def state(ingress_mode="off", egress_mode="off", ingress=(), egress=(), **kw) -> DatapathState:
    return DatapathState(ingress_mode=ingress_mode, egress_mode=egress_mode, ingress=list(ingress),
                         egress=list(egress), ipcache=dict(IPCACHE), local_ips=[A_IP, A6], **kw)


def allow(ident, proto, lo, hi=None, **kw) -> MapEntry:
    return MapEntry(ident, proto, lo, hi if hi is not None else lo, "allow", **kw)


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    try:
        lab.up()
        lab.listen(lab.a, 80, "A")
        lab.listen(lab.a, 80, "A6", host="::")
        lab.listen(lab.b, 80, "B")
        lab.listen(lab.b, 8080, "B8080")
        lab.listen(lab.c, 80, "C")
        for ns, tag in ((lab.a, "UA"), (lab.b, "UB"), (lab.c, "UC")):
            lab.udp_echo(ns, 5353, tag)
        lab.udp_echo(lab.b, 53, "REAL")  # the DNS server A's queries are meant for
        yield lab
    finally:
        lab.down()


@pytest.fixture(autouse=True)
def clean_tables(lab):
    yield
    for ns in (lab.a, lab.b):
        with netns(ns):
            nft.delete_table()


def test_lab_is_open_without_a_table(lab):
    assert tcp(lab.b, A_IP, 80) == "A:ping"
    assert tcp(lab.b, A_IP, 81) == "refused"  # nobody listens: RST, the opposite of a drop
    assert tcp(lab.b, A6, 80) == "A6:ping"


def test_default_deny_ingress_lets_only_the_allowed_identity_in_on_80(lab):
    lab.apply(lab.a, dpc.compile_table(state("default-deny", ingress=[allow(B_ID, "TCP", 80),
                                                                      allow(B_ID, "TCP", 81)])))
    with netns(lab.a):
        assert "ingress_ports" in nft.list_table()
    assert tcp(lab.b, A_IP, 80) == "A:ping"
    assert tcp(lab.b, A_IP, 82) == "timeout", "a port no entry allows is dropped, not reset"
    assert tcp(lab.b, A_IP, 81) == "refused", "an allowed port with no listener still answers RST"
    assert tcp(lab.c, A_IP, 80) == "timeout", "another source identity is dropped"
    assert tcp(lab.b, A6, 80) == "A6:ping", "IPv6: ipcache6 lookup, neighbour discovery still works"
    assert tcp(lab.c, A6, 80) == "timeout"
    assert tcp(lab.a, A_IP, 80) == "A:ping", "the workload talking to itself is never policed"


def test_udp_and_icmp_are_policed_too_and_denials_hang_both_ways(lab):
    lab.apply(lab.a, dpc.compile_table(state("default-deny", "default-deny", ingress=[
        allow(B_ID, "UDP", 5353), allow(B_ID, "ICMP", 8)], egress=[
        allow(B_ID, "UDP", 5353), allow(B_ID, "ICMP", 8)])))
    assert udp(lab.b, A_IP, 5353) == "UA:ping"
    assert udp(lab.c, A_IP, 5353) == "timeout"
    assert ping(lab.b, A_IP) == "reply"
    assert ping(lab.c, A_IP) == "timeout"
    assert udp(lab.a, B_IP, 5353) == "UB:ping"
    assert ping(lab.a, B_IP) == "reply"
    # egress denials: no EPERM from sendto, no error at all - the packet just never arrives
    assert udp(lab.a, C_IP, 5353) == "timeout"
    assert ping(lab.a, C_IP) == "timeout"


def test_without_policy_routing_denied_egress_and_dns_still_never_leave(lab):
    lab.apply(lab.a, dpc.compile_table(state(egress_mode="default-deny", egress=[
        MapEntry(B_ID, "UDP", 53, 53, "redirect", l7=DNS)])))
    with netns(lab.a):
        routing.remove()
        assert not routing.installed()
    try:
        with pytest.raises(PermissionError):  # the fallback drop is in postrouting: EPERM
            udp(lab.a, C_IP, 5353)
        with pytest.raises(PermissionError):
            udp(lab.a, B_IP, 53)
        time.sleep(0.1)
        assert lab.received["REAL"] == [], "the query did not bypass the DNS proxy"
        assert lab.received["UC"] == []
    finally:
        with netns(lab.a):
            routing.install()


def test_egress_default_deny_and_explicit_deny(lab):
    lab.apply(lab.a, dpc.compile_table(state(egress_mode="default-deny", egress=[allow(B_ID, "TCP", 80)])))
    assert tcp(lab.a, B_IP, 80) == "B:ping"
    assert tcp(lab.a, B_IP, 8080) == "timeout"
    assert tcp(lab.a, C_IP, 80) == "timeout"
    lab.apply(lab.a, dpc.compile_table(state(egress_mode="default-allow", egress=[
        MapEntry(B_ID, "TCP", 8080, 8080, "deny", "POLICY_DENY")])))
    assert tcp(lab.a, B_IP, 8080) == "timeout", "an explicit deny in a default-allow direction"
    assert tcp(lab.a, B_IP, 80) == "B:ping"
    assert tcp(lab.a, C_IP, 80) == "C:ping"


class NflogReader:
    """The smallest NFLOG listener: bind one group, read (prefix, mark) of each logged packet."""
    NFNL_SUBSYS_ULOG, MSG_PACKET, MSG_CONFIG = 4, 0, 1
    NFULA_MARK, NFULA_PREFIX, NFULA_CFG_CMD, NFULA_CFG_MODE = 2, 10, 1, 2

    def __init__(self, group: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
        self.sock.bind((0, 0))
        cmd = self._attr(self.NFULA_CFG_CMD, bytes([1]))  # NFULNL_CFG_CMD_BIND
        mode = self._attr(self.NFULA_CFG_MODE, struct.pack("!IBB", 128, 2, 0))  # copy 128 bytes
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, group) + cmd + mode
        hdr = struct.pack("=IHHII", 16 + len(body), self.NFNL_SUBSYS_ULOG << 8 | self.MSG_CONFIG,
                          1 | 4, 1, 0)  # NLM_F_REQUEST | NLM_F_ACK
        self.sock.send(hdr + body)

    @staticmethod
    def _attr(kind: int, payload: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(payload), kind) + payload
        return raw + b"\0" * (-len(raw) % 4)

    def read(self, timeout: float = 2.0) -> list[tuple[str, int]]:
        out, deadline = [], time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == self.NFNL_SUBSYS_ULOG << 8 | self.MSG_PACKET:
                    attrs, pos, end = {}, off + 20, off + length
                    while pos + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, pos)
                        attrs[atype & 0x7FFF] = data[pos + 4:pos + alen]
                        pos += (alen + 3) & ~3
                    prefix = attrs.get(self.NFULA_PREFIX, b"").rstrip(b"\0").decode()
                    mark = struct.unpack("!I", attrs[self.NFULA_MARK])[0] if self.NFULA_MARK in attrs else 0
                    out.append((prefix, mark))
                off += max(16, (length + 3) & ~3)
            if out:
                break
        return out


def test_drops_are_logged_to_nflog_with_reason_and_peer_identity(lab):
    from proxy.datapath.constants import NFLOG_GROUP
    lab.apply(lab.a, dpc.compile_table(state("default-deny", "default-allow", egress=[
        MapEntry(B_ID, "TCP", 8080, 8080, "deny", "POLICY_DENY")])))
    with netns(lab.a):
        reader = NflogReader(NFLOG_GROUP)
    with reader.sock:
        assert tcp(lab.c, A_IP, 80) == "timeout"
        assert ("l7gate:ingress:POLICY_DENIED", C_ID) in reader.read()
        assert tcp(lab.a, B_IP, 8080) == "timeout"
        assert ("l7gate:egress:POLICY_DENY", B_ID) in reader.read()


def test_an_established_connection_survives_a_new_table_that_still_allows_it(lab):
    first = state("default-deny", ingress=[allow(B_ID, "TCP", 80)])
    second = state("default-deny", ingress=[allow(B_ID, "TCP", 80), allow(C_ID, "TCP", 443)],
                   fqdn={"192.0.2.1": (FQDN_ID, 60)})
    lab.apply(lab.a, dpc.compile_table(first))
    with netns(lab.b):
        s = socket.create_connection((A_IP, 80), timeout=2)
    with s:
        s.sendall(b"one")
        assert s.recv(100) == b"A:one"
        lab.apply(lab.a, dpc.compile_table(second))
        s.sendall(b"two")
        assert s.recv(100) == b"A:two"
        lab.apply(lab.a, dpc.compile_table(first))
        s.sendall(b"three")
        assert s.recv(100) == b"A:three"


def _exchange(s: socket.socket, data: bytes, timeout: float = HANG) -> bytes | str:
    s.settimeout(timeout)
    s.sendall(data)
    try:
        return s.recv(100)
    except socket.timeout:
        return "timeout"


def test_removing_an_allow_cuts_established_connections_both_ways(lab):
    """Spec 6.6: original-direction packets of an established connection meet the current policy;
    replies never do. The cut is a silent drop: back in force, TCP's retransmission gets through."""
    allowed = state("default-deny", "default-deny", ingress=[allow(B_ID, "TCP", 80)],
                    egress=[allow(B_ID, "TCP", 80)])
    lab.apply(lab.a, dpc.compile_table(allowed))
    with netns(lab.b):
        inbound = socket.create_connection((A_IP, 80), timeout=2)
    with netns(lab.a):
        outbound = socket.create_connection((B_IP, 80), timeout=2)
    with inbound, outbound:
        assert _exchange(inbound, b"one") == b"A:one" and _exchange(outbound, b"one") == b"B:one"
        lab.apply(lab.a, dpc.compile_table(state("default-deny", "default-deny")))
        assert _exchange(inbound, b"two") == "timeout", "ingress allow removed: cut"
        assert _exchange(outbound, b"two") == "timeout", "egress allow removed: cut"
        lab.apply(lab.a, dpc.compile_table(allowed))
        assert _exchange(inbound, b"", timeout=3) == b"A:two", "retransmitted once allowed again"
        assert _exchange(outbound, b"", timeout=3) == b"B:two"


def test_an_established_connection_to_an_fqdn_address_outlives_its_ttl(lab):
    """Cilium keeps an expired DNS-learned address allowed while a connection uses it (zombies).
    Here a connection the table accepted carries its stamp and is not looked up again until
    another table is applied; then its peer is looked up again (fqdnz: ZOMBIE_GRACE s past the
    TTL): still known -> goes on, forgotten -> cut."""
    policy = state(egress_mode="default-deny", egress=[allow(FQDN_ID, "TCP", 80)])
    lab.apply(lab.a, dpc.compile_table(policy))
    with netns(lab.a):
        nft.add_fqdn_elements([(B2_IP, FQDN_ID, 1)])
        t0 = time.monotonic()
        conn = socket.create_connection((B2_IP, 80), timeout=2)
    with conn:
        assert _exchange(conn, b"one") == b"B:one"
        time.sleep(max(0.0, t0 + 1.3 - time.monotonic()))
        assert tcp(lab.a, B2_IP, 80) == "timeout", "a new connection: the TTL is over"
        assert _exchange(conn, b"two") == b"B:two", "the established one goes on"
        with netns(lab.a):
            assert B2_IP not in nft.fqdn_elements() and B2_IP in nft.fqdn_elements(name="fqdnz")
        other = state(egress_mode="default-deny", egress=[allow(FQDN_ID, "TCP", 80),
                                                          allow(C_ID, "TCP", 443)],
                      fqdn={B2_IP: (FQDN_ID, 1)})  # the agent's cache still has it
        lab.apply(lab.a, dpc.compile_table(other))
        assert _exchange(conn, b"three") == b"B:three", "another table that knows it: goes on"
        with netns(lab.a):
            nft.delete_fqdn_elements([B2_IP])
        assert _exchange(conn, b"four") == b"B:four", "stamped by this table: not looked up"
        lab.apply(lab.a, dpc.compile_table(policy))
        assert _exchange(conn, b"five") == "timeout", "forgotten, and another table: cut"


def test_replacing_the_table_200_times_never_fails_an_allowed_connection(lab):
    many = {f"10.78.{i >> 8}.{i & 255}/32": 2000 + i for i in range(300)}
    tables = []
    for extra in (0, 1):
        st = state("default-deny", ingress=[allow(B_ID, "TCP", 80)] +
                   [allow(2000 + i, "TCP", 1000 + i + extra) for i in range(300)])
        st.ipcache.update(many)
        tables.append(dpc.compile_table(st))
    lab.apply(lab.a, tables[0])
    stop = threading.Event()
    results = {"ok": 0, "fail": []}

    def client():
        while not stop.is_set():
            r = tcp(lab.b, A_IP, 80, timeout=2)
            if r == "A:ping":
                results["ok"] += 1
            else:
                results["fail"].append(r)

    t = threading.Thread(target=client)
    t.start()
    try:
        time.sleep(0.05)
        t0 = time.perf_counter()
        with netns(lab.a):
            for i in range(200):
                nft.apply(tables[i % 2])
        took = time.perf_counter() - t0
    finally:
        stop.set()
        t.join()
    print(f"\n200 table replacements ({len(tables[0])} bytes each) in {took:.2f}s; "
          f"{results['ok']} allowed connections meanwhile")
    assert results["fail"] == []
    assert results["ok"] > 10


def test_only_the_agents_secret_mark_skips_the_policy(lab):
    """CAP_NET_RAW (a Docker default) is enough to set SO_MARK: a workload marking its packets
    with the published default mark must meet the policy like any other (egress default deny
    here, and with the closed table); only the table's own secret mark passes."""
    secret = new_proxy_mark()
    lab.apply(lab.a, dpc.compile_table(state("off", "default-deny", proxy_mark=secret)))
    assert tcp(lab.a, B_IP, 80, mark=PROXY_MARK) == "timeout"
    assert tcp(lab.a, B_IP, 80, mark=secret) == "B:ping"
    lab.apply(lab.a, dpc.closed_table())
    assert tcp(lab.a, B_IP, 80, mark=PROXY_MARK) == "timeout"
    assert tcp(lab.a, B_IP, 80) == "timeout"


def _udp_from(ns: str, src_port: int, dst: tuple[str, int], payload: bytes) -> None:
    """One UDP datagram from any source port (a raw socket: even one another socket holds)."""
    with netns(ns):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    with raw:
        raw.sendto(struct.pack("!HHHH", src_port, dst[1], 8 + len(payload), 0) + payload, (dst[0], 0))


def test_nothing_comes_back_on_the_conntrack_entry_of_a_denied_or_tproxied_packet(lab):
    """A denied egress packet is dropped on lo, but the kernel keeps its conntrack entry: the
    denied peer's "reply" must not come in on it (it did, as ct direction reply). Answers to
    TPROXYed DNS come from the proxy over lo; one from the wire is forged."""
    st = state("default-deny", "default-deny",
               egress=[MapEntry(B_ID, "UDP", 53, 53, "redirect", l7=DNS)])
    lab.apply(lab.a, dpc.compile_table(st))
    for peer, dst, sent in ((lab.c, (C_IP, 5353), b"denied"), (lab.b, (B_IP, 53), b"query")):
        with netns(lab.a):
            app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with app:
            app.bind(("0.0.0.0", 0))
            app.settimeout(HANG)
            app.sendto(sent, dst)  # denied / to the DNS proxy (none here: dropped on lo)
            time.sleep(0.05)
            _udp_from(peer, dst[1], (A_IP, app.getsockname()[1]), b"forged reply")
            with pytest.raises(socket.timeout):
                print(app.recvfrom(100))


def test_a_packet_leaving_with_a_source_address_not_the_workloads_is_dropped(lab):
    """A raw socket (CAP_NET_RAW) can forge any source; the peer would take it for that source's
    identity. Only the workload's own addresses may leave (Cilium: DROP_INVALID_SIP)."""
    lab.apply(lab.a, dpc.compile_table(state()))  # no policy at all: only the source check
    for src, tag in ((C_IP, b"forged"), (A_IP, b"own")):
        payload = b"ping-" + tag
        udp_len = 8 + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(B_IP))
        with netns(lab.a):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with raw, contextlib.suppress(PermissionError):  # a drop in output: EPERM, no hang
            raw.sendto(ip + struct.pack("!HHHH", 40000, 5353, udp_len, 0) + payload, (B_IP, 0))
    time.sleep(0.2)
    assert b"ping-own" in lab.received["UB"] and b"ping-forged" not in lab.received["UB"]


def test_other_ip_protocols_follow_l3_allows_and_denies(lab):
    """UDP-Lite (136) stands for every protocol but TCP/UDP/SCTP/ICMP: an L3 deny drops it under
    default-allow, an L3 allow lets it through under default-deny (Cilium's wildcard-protocol
    entries); it did only ever get the default verdict."""
    with netns(lab.b):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)
    lab.socks.append(server)
    server.bind((B_IP, 5370))
    server.settimeout(HANG)

    def send(tag: bytes) -> bytes | str:
        with netns(lab.a):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)
        with client:
            client.sendto(tag, (B_IP, 5370))
        try:
            return server.recvfrom(100)[0]
        except socket.timeout:
            return "timeout"

    deny_b = MapEntry(B_ID, "OTHER", 0, 0, "deny", "POLICY_DENY")
    lab.apply(lab.a, dpc.compile_table(state("off", "default-allow", egress=[deny_b])))
    assert send(b"denied") == "timeout"
    lab.apply(lab.a, dpc.compile_table(state("off", "default-deny", egress=[allow(B_ID, "OTHER", 0)])))
    assert send(b"allowed") == b"allowed"
    lab.apply(lab.a, dpc.compile_table(state("off", "default-deny", egress=[allow(C_ID, "OTHER", 0)])))
    assert send(b"default") == "timeout"


def _link_local(ns: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[3].split("/")[0]


def test_peers_cannot_talk_over_link_local_addresses_nor_send_router_advertisements(lab):
    """fe80::/10 carries no identity (it would be world): an egress deny of B must hold for B's
    link-local address too; and a peer's router advertisement must not give A routes."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # link-local addresses leave DAD after a moment
        ll = _link_local(lab.b)
        if "tentative" not in subprocess.run(["ip", "-n", lab.b, "-6", "-o", "addr", "show", "dev", "eth0"],
                                             capture_output=True, text=True).stdout:
            break
        time.sleep(0.1)
    with netns(lab.b):
        server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    lab.socks.append(server)
    server.bind(("::", 5360))
    server.settimeout(HANG)
    lab.apply(lab.a, dpc.compile_table(state("off", "default-allow", egress=[
        MapEntry(B_ID, proto, 0, 65535, "deny", "POLICY_DENY") for proto in ("TCP", "UDP")])))
    with netns(lab.a):
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        scope = socket.if_nametoindex("eth0")
    with client:
        client.sendto(b"global", (B6, 5360))
        with contextlib.suppress(PermissionError):  # dropped in output: no such path, EPERM
            client.sendto(b"link-local", (ll, 5360, 0, scope))
        with pytest.raises(socket.timeout):
            print(server.recvfrom(100))

    lab.apply(lab.a, dpc.compile_table(state("default-allow", "default-allow")))
    sh("ip", "netns", "exec", lab.a, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=2")
    with netns(lab.b):
        ra = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        scope_b = socket.if_nametoindex("eth0")
    with ra:
        ra.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        # type 134, code 0, checksum (the kernel's), hop limit 64, flags 0, lifetime 1800 s
        ra.sendto(struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0), ("ff02::1", 0, 0, scope_b))
    time.sleep(0.3)
    routes = subprocess.run(["ip", "-n", lab.a, "-6", "route", "show", "default"],
                            capture_output=True, text=True).stdout
    assert routes.strip() == "", routes


def test_http_redirect_reaches_the_proxy_port_with_the_original_destination(lab):
    st = state("default-allow", "default-deny",
               ingress=[MapEntry(B_ID, "TCP", 8000, 8000, "redirect", l7=HTTP)],
               egress=[MapEntry(B_ID, "TCP", 80, 80, "redirect", l7=HTTP)])
    with netns(lab.a):
        proxy = socket.socket()
    lab.socks.append(proxy)  # closed at the end of this test, else it would answer later ones
    proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    proxy.bind(("0.0.0.0", st.http_port))
    proxy.listen(16)
    proxy.settimeout(2)
    lab.apply(lab.a, dpc.compile_table(st))

    with netns(lab.a):  # egress: A -> B:80 lands on A's proxy port
        client = socket.create_connection((B_IP, 80), timeout=2)
    with client, proxy.accept()[0] as conn:
        assert origdst.original_dst(conn) == (B_IP, 80)
        assert conn.getpeername()[0] == A_IP
    with netns(lab.b):  # ingress: B -> A:8000 lands on A's proxy port
        client = socket.create_connection((A_IP, 8000), timeout=2)
    with client, proxy.accept()[0] as conn:
        assert origdst.original_dst(conn) == (A_IP, 8000)
        assert conn.getpeername()[0] == B_IP
    assert tcp(lab.a, B_IP, 80, mark=PROXY_MARK) == "B:ping", "the proxy's own upstream is not redirected"
    assert tcp(lab.a, B_IP, 8080) == "timeout", "egress is still default deny"
    assert tcp(lab.b, A_IP, st.http_port) == "timeout", "peers cannot reach the proxy port directly"
    assert tcp(lab.b, A_IP, 81) == "refused", "ingress default-allow: other ports are open"
    proxy.close()


def test_dns_is_tproxied_to_a_transparent_socket_with_the_original_server(lab):
    st = state(egress_mode="default-deny", egress=[
        MapEntry(B_ID, "UDP", 53, 53, "redirect", l7=DNS),
        MapEntry(B_ID, "TCP", 53, 53, "redirect", l7=DNS)])
    with netns(lab.a):
        routing.install()  # idempotent: already there since the lab started
        assert routing.installed()
        udp_proxy = origdst.transparent_udp_socket("127.0.0.1", st.dns_port)
        tcp_proxy = origdst.transparent_tcp_listener("127.0.0.1", st.dns_port)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        reply = origdst.reply_socket((B_IP, 53))
    for s in (udp_proxy, tcp_proxy, client, reply):
        lab.socks.append(s)
    lab.apply(lab.a, dpc.compile_table(st))
    udp_proxy.settimeout(2)
    client.settimeout(2)
    for n in range(2):  # the second query is on an established flow: must be intercepted too
        client.sendto(b"query%d" % n, (B_IP, 53))
        data, anc, _, src = udp_proxy.recvmsg(512, socket.CMSG_SPACE(64))
        assert data == b"query%d" % n
        assert origdst.orig_dst_from_ancdata(anc) == (B_IP, 53)
        assert src == (A_IP, client.getsockname()[1])
        reply.sendto(b"answer%d" % n, src)
        assert client.recvfrom(100) == (b"answer%d" % n, (B_IP, 53))
    time.sleep(0.1)
    assert lab.received["REAL"] == [], "the real server never saw the queries"

    with netns(lab.a):
        tclient = socket.create_connection((B_IP, 53), timeout=2)
    tcp_proxy.settimeout(2)
    with tclient, tcp_proxy.accept()[0] as conn:
        assert conn.getsockname() == (B_IP, 53)
        for n in range(3):
            tclient.sendall(b"q%d" % n)
            assert conn.recv(100) == b"q%d" % n
            conn.sendall(b"a%d" % n)
            assert tclient.recv(100) == b"a%d" % n

    assert udp(lab.a, C_IP, 53) == "timeout", "DNS to a server the policy does not allow is dropped"
    udp_proxy.close()
    tcp_proxy.close()
    assert udp(lab.a, B_IP, 53) == "timeout", "no proxy socket: fail closed, not to the real server"


def test_a_workload_socket_reusing_a_proxy_query_tuple_is_still_intercepted(lab):
    """Regression (bench found it): the proxy's upstream UDP query leaves a conntrack entry; a
    workload socket on the same source port must not ride on it past the DNS redirect."""
    st = state(egress_mode="default-deny", egress=[MapEntry(B_ID, "UDP", 53, 53, "redirect", l7=DNS)])
    with netns(lab.a):
        udp_proxy = origdst.transparent_udp_socket("127.0.0.1", st.dns_port)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        upstream.bind((A_IP, 0))
    lab.socks += [udp_proxy, upstream]
    lab.apply(lab.a, dpc.compile_table(st))
    port = upstream.getsockname()[1]
    upstream.settimeout(2)
    upstream.sendto(b"proxyq", (B_IP, 53))  # the proxy's own query reaches the real server
    assert upstream.recvfrom(100)[0] == b"REAL:proxyq"
    upstream.close()
    with netns(lab.a):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind((A_IP, port))  # the same 5-tuple as the proxy's finished query
    lab.socks.append(client)
    udp_proxy.settimeout(2)
    client.sendto(b"sneaky", (B_IP, 53))
    data, anc, _, _src = udp_proxy.recvmsg(512, socket.CMSG_SPACE(64))
    assert data == b"sneaky", "the workload's query went to the proxy, not around it"
    assert b"sneaky" not in lab.received["REAL"]


def test_a_dns_flow_started_before_the_dns_policy_is_intercepted_afterwards(lab):
    """A UDP socket that talked to the server before a DNS rule existed is redirected after."""
    with netns(lab.a):
        udp_proxy = origdst.transparent_udp_socket("127.0.0.1", 15053)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lab.socks += [udp_proxy, client]
    lab.apply(lab.a, dpc.compile_table(state()))  # enforcing nothing, but tracking connections
    client.settimeout(2)
    client.sendto(b"before", (B_IP, 53))  # no DNS rule yet: straight to the server
    assert client.recvfrom(100)[0] == b"REAL:before"
    st = state(egress_mode="default-deny", egress=[MapEntry(B_ID, "UDP", 53, 53, "redirect", l7=DNS)])
    lab.apply(lab.a, dpc.compile_table(st))
    udp_proxy.settimeout(2)
    client.sendto(b"after", (B_IP, 53))
    data, _, _, _ = udp_proxy.recvmsg(512, socket.CMSG_SPACE(64))
    assert data == b"after"
    assert b"after" not in lab.received["REAL"]


def test_an_fqdn_element_opens_then_expires(lab):
    lab.apply(lab.a, dpc.compile_table(state(egress_mode="default-deny",
                                             egress=[allow(FQDN_ID, "TCP", 80)])))
    assert tcp(lab.a, B2_IP, 80) == "timeout", "not learned yet: world, denied"
    with netns(lab.a):
        nft.add_fqdn_elements([(B2_IP, FQDN_ID, 2)])
        t0 = time.monotonic()
        assert nft.fqdn_elements()[B2_IP][0] == FQDN_ID
    assert tcp(lab.a, B2_IP, 80) == "B:ping"
    assert tcp(lab.a, B_IP, 80) == "timeout", "B's other address keeps B's identity"
    time.sleep(max(0.0, t0 + 2.3 - time.monotonic()))
    assert tcp(lab.a, B2_IP, 80) == "timeout", "expired with its DNS TTL"
    with netns(lab.a):  # identity change of a live element: replaced in one transaction
        nft.add_fqdn_elements([(B2_IP, FQDN_ID, 30), ("192.0.2.9", FQDN_ID, 30)])
        nft.add_fqdn_elements([(B2_IP, FQDN_ID + 1, 30), ("192.0.2.9", FQDN_ID, 30)])
        assert nft.fqdn_elements()[B2_IP][0] == FQDN_ID + 1
        nft.delete_fqdn_elements([B2_IP, "192.0.2.200"])
        assert B2_IP not in nft.fqdn_elements()


def test_fqdn_batch_rate(lab):
    lab.apply(lab.a, dpc.compile_table(state(egress_mode="default-deny")))
    n = 20000
    elements = [(f"100.{64 + (i >> 16)}.{i >> 8 & 255}.{i & 255}", FQDN_ID + i % 7, 300) for i in range(n)]
    with netns(lab.a):
        t0 = time.perf_counter()
        nft.add_fqdn_elements(elements)
        add = time.perf_counter() - t0
        t0 = time.perf_counter()
        nft.add_fqdn_elements(elements)  # refresh: same identities, new timeouts
        refresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(200):
            nft.add_fqdn_elements([(f"100.127.0.{i}", FQDN_ID, 300)])
        single = time.perf_counter() - t0
        assert len(nft.fqdn_elements()) == n + 200
    print(f"\nFQDN elements: {n / add:,.0f}/s added in one batch, {n / refresh:,.0f}/s refreshed, "
          f"{200 / single:,.0f}/s one call per element")


def _spawn_applier(lab: Lab, script: str, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "table.nft"
    path.write_text(script)
    code = ("import sys, time\nfrom proxy.datapath import nft\n"
            "nft.apply(open(sys.argv[1]).read())\nprint('ready', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen(["ip", "netns", "exec", lab.a, sys.executable, "-c", code, str(path)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab.procs.append(p)
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read() if p.poll() is not None else line
    return p


def test_a_killed_agent_leaves_its_table_and_redirected_ports_closed(lab, tmp_path):
    st = state("default-deny", "default-deny",
               ingress=[allow(B_ID, "TCP", 80)],
               egress=[MapEntry(B_ID, "TCP", 80, 80, "redirect", l7=HTTP),
                       MapEntry(B_ID, "UDP", 53, 53, "redirect", l7=DNS),
                       allow(B_ID, "TCP", 8080)])
    p = _spawn_applier(lab, dpc.compile_table(st), tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with netns(lab.a):
        assert "egress_http" in nft.list_table(), "the table outlives the process"
    assert tcp(lab.a, B_IP, 80) == "refused", "HTTP redirected to a dead proxy port: refused"
    assert udp(lab.a, B_IP, 53) == "timeout", "DNS TPROXYed to no socket: no answer"
    assert tcp(lab.a, B_IP, 8080) == "B8080:ping", "L3/L4 allows stay in the kernel"
    assert tcp(lab.b, A_IP, 80) == "A:ping"
    assert tcp(lab.c, A_IP, 80) == "timeout"


def test_the_closed_table_drops_every_new_connection_and_outlives_its_process(lab, tmp_path):
    p = _spawn_applier(lab, dpc.closed_table(), tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with netns(lab.a):
        assert "closed" in nft.list_table()
    assert tcp(lab.b, A_IP, 80) == "timeout"
    assert tcp(lab.a, B_IP, 80) == "timeout"
    assert tcp(lab.a, "127.0.0.1", 80) == "A:ping", "loopback stays open"
    with_state = dpc.closed_table(state("default-allow", "off", ingress=[
        MapEntry(B_ID, "TCP", 80, 80, "redirect", l7=HTTP)]))
    lab.apply(lab.a, with_state)
    assert tcp(lab.b, A_IP, 80) == "timeout", "a redirected port is closed while no proxy runs"
    assert tcp(lab.b, A_IP, 81) == "refused", "default-allow ports stay open"
    assert tcp(lab.a, B_IP, 80) == "B:ping", "an unenforced direction stays open"
