"""NFLOG: the netlink parser on crafted packets, then the real thing in scratch namespaces.

Namespaces: A (the workload: the compiled l7gate table, default deny both ways, and the NFLOG
listener) and B (the peer, identity 63406 in A's ipcache), joined by a veth pair. A dropped SYN
must come out of the listener as one event within a second, with the datapath's prefix, the
peer identity in the mark, the addresses, ports and the SYN flag; through the `Observer` it must
become a `Policy denied DROPPED (TCP Flags: SYN)` flow carrying that identity.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

from proxy.observe.flow import EndpointInfo
from proxy.observe.format import compact
from proxy.observe.nflog import (NFNL_SUBSYS_ULOG, NFULA_MARK, NFULA_PAYLOAD, NFULA_PREFIX,
                                 NflogBusy, NflogListener, parse_l3l4, parse_messages, parse_prefix)

A_IP, B_IP = "10.78.0.1", "10.78.0.2"
B_ID = 63406


# -- parsing, no kernel ---------------------------------------------------------------------------
def ipv4(proto: int, l4: bytes, src="10.0.0.1", dst="10.0.0.2") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + l4


def ipv6(next_header: int, l4: bytes, src="fd00::1", dst="fd00::2") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + l4


def tcp_header(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4 | (flags >> 8), flags & 0xFF, 1024, 0, 0)


def test_ipv4_tcp_syn():
    got = parse_l3l4(ipv4(6, tcp_header(40000, 80, 0x02)))
    assert got == {"family": 4, "src": "10.0.0.1", "dst": "10.0.0.2", "proto": "TCP",
                   "sport": 40000, "dport": 80, "tcp_flags": 0x02}


def test_ipv6_udp_behind_an_extension_header():
    hop_by_hop = bytes([17, 0]) + b"\0" * 6  # next header UDP, 8 bytes
    got = parse_l3l4(ipv6(0, hop_by_hop + struct.pack("!HHHH", 5353, 53, 8, 0)))
    assert got["family"] == 6 and got["proto"] == "UDP" and (got["sport"], got["dport"]) == (5353, 53)
    assert got["src"] == "fd00::1"


def test_icmp_type_and_code():
    assert parse_l3l4(ipv4(1, bytes([8, 0, 0, 0])))["icmp_type"] == 8
    got = parse_l3l4(ipv6(58, bytes([128, 0, 0, 0])))
    assert (got["proto"], got["icmp_type"], got["icmp_code"]) == ("ICMPv6", 128, 0)


def test_truncated_and_non_ip_payloads_do_not_raise():
    assert parse_l3l4(b"")["family"] == 0
    assert parse_l3l4(b"\x45\x00")["family"] == 0
    assert "sport" not in parse_l3l4(ipv4(6, b"\x00"))


def attr(kind: int, value: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(value), kind) + value
    return a + b"\0" * (-len(a) % 4)


def test_a_netlink_message_becomes_a_packet():
    body = struct.pack("!BBH", socket.AF_INET, 0, 1) + attr(NFULA_PREFIX, b"l7gate:egress:POLICY_DENY\0") \
        + attr(NFULA_MARK, struct.pack("!I", 16777217)) + attr(NFULA_PAYLOAD, ipv4(6, tcp_header(1, 443, 0x12)))
    msg = struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_ULOG << 8, 0, 0, 0) + body
    [pkt] = parse_messages(msg + msg[:10], now_ns=123)  # a torn trailer is ignored
    assert (pkt.prefix, pkt.mark, pkt.direction, pkt.reason) == ("l7gate:egress:POLICY_DENY", 16777217,
                                                                 "egress", "POLICY_DENY")
    assert (pkt.proto, pkt.dport, pkt.tcp_flags, pkt.time_ns) == ("TCP", 443, 0x12, 123)


@pytest.mark.parametrize("prefix,parsed", [("l7gate:ingress:POLICY_DENIED", ("ingress", "POLICY_DENIED")),
                                           ("l7gate:egress:ALLOWED ", ("egress", "ALLOWED")),
                                           ("other:ingress:X", ("", "")), ("", ("", ""))])
def test_prefixes(prefix, parsed):
    assert parse_prefix(prefix) == parsed


# -- the kernel -----------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip"):
        return "needs iproute2"
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return "needs libnftables.so.1"
    return None


needs_netns = pytest.mark.skipif(_usable() is not None, reason=_usable() or "")


@contextlib.contextmanager
def netns(name: str):
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
        if _libc.setns(target.fileno(), 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(home.fileno(), 0x40000000)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def lab():
    with namespaces() as ab:
        yield ab


@contextlib.contextmanager
def namespaces(ingress=(), log_allowed=False):
    from proxy.datapath import compile as dpc
    from proxy.datapath import nft
    from proxy.datapath.state import DatapathState
    a, b = f"l7o-{os.getpid()}-a", f"l7o-{os.getpid()}-b"
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, ip in ((a, A_IP), (b, B_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        state = DatapathState(ingress_mode="default-deny", egress_mode="default-deny",
                              ingress=list(ingress), ipcache={f"{B_IP}/32": B_ID}, local_ips=[A_IP])
        with netns(a):
            nft.apply(dpc.compile_table(state, log_allowed=log_allowed))
            nft.release()
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def syn(ns: str, ip: str, port: int) -> socket.socket:
    with netns(ns):
        s = socket.socket()
    s.setblocking(False)
    with contextlib.suppress(OSError):
        s.connect((ip, port))
    return s


def wait_packets(listener: NflogListener, n: int = 1, timeout: float = 1.0):
    """IPv4 events only: fresh namespaces also send (and so drop and log) IPv6 multicast reports."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += [p for p in listener.read() if p.family == 4]
        time.sleep(0.005)
    if len(got) == n:
        time.sleep(0.05)  # and nothing more comes
        got += [p for p in listener.read() if p.family == 4]
    return got


@needs_netns
def test_a_dropped_syn_is_one_event_within_a_second(lab):
    from proxy.datapath.constants import NFLOG_GROUP
    a, b = lab
    with netns(a):
        listener = NflogListener(NFLOG_GROUP)
    with listener:
        t0 = time.monotonic()
        with syn(b, A_IP, 80):  # ingress: B -> A:80, dropped in A's prerouting
            got = wait_packets(listener)
        assert time.monotonic() - t0 < 1.0
        assert len(got) == 1, got
        p = got[0]
        assert p.prefix == "l7gate:ingress:POLICY_DENIED"
        assert p.mark == B_ID  # the peer identity at log time
        assert (p.family, p.proto, p.src, p.dst, p.dport) == (4, "TCP", B_IP, A_IP, 80)
        assert p.tcp_flags & 0x02 and not p.tcp_flags & 0x10  # SYN, no ACK
        assert p.hook == "prerouting"
        with netns(a):
            out = syn(a, B_IP, 81)  # egress: A -> B:81, logged in A's output hook
        with out:
            [e] = wait_packets(listener)
        assert (e.prefix, e.mark, e.src, e.dst, e.dport) == ("l7gate:egress:POLICY_DENIED", B_ID,
                                                             A_IP, B_IP, 81)


@needs_netns
def test_a_second_listener_on_the_group_is_refused(lab):
    a, _ = lab
    with netns(a):
        first = NflogListener(31)
        try:
            with pytest.raises(NflogBusy):
                NflogListener(31)
        finally:
            first.close()
        NflogListener(31).close()  # free again once the first is closed


@needs_netns
def test_the_observer_turns_the_drop_into_a_hubble_flow_within_a_second(lab):
    from proxy.observe import Observer
    a, b = lab
    endpoints = {B_IP: EndpointInfo(B_ID, ("k8s:class=xwing",), "default", "xwing"),
                 A_IP: EndpointInfo(6822, ("k8s:class=deathstar",), "default", "deathstar-1")}
    obs = Observer("deathstar-1", resolve=endpoints.get)

    async def main():
        with netns(a):
            obs.start_nflog()
        t0 = time.monotonic()
        with syn(b, A_IP, 80):
            while len(ours()) < 2 and time.monotonic() - t0 < 1.0:
                await asyncio.sleep(0.01)
        return time.monotonic() - t0

    def ours():  # the namespaces' own IPv6 multicast reports are dropped (and logged) too
        return [f for f in obs.ring if f["IP"]["source"] == B_IP]

    try:
        elapsed = asyncio.run(main())
    finally:
        obs.close()
    flows = ours()
    assert elapsed < 1.0 and len(flows) == 2
    line = compact(flows[1])
    assert "default/xwing:" in line and f"(ID:{B_ID}) <> default/deathstar-1:80 (ID:6822)" in line
    assert line.endswith("Policy denied DROPPED (TCP Flags: SYN)")
    assert flows[1]["source"]["identity"] == B_ID and flows[1]["node_name"] == "deathstar-1"


@needs_netns
def test_an_allowed_new_connection_is_logged_when_asked_and_becomes_allowed():
    from proxy.datapath.constants import NFLOG_GROUP
    from proxy.observe import Observer
    from proxy.observe.flow import Explanation
    from proxy.policy.mapstate import MapEntry
    policy = ({"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "allow-b"},)
    obs = Observer("a", resolve={B_IP: EndpointInfo(B_ID)}.get,
                   explain=lambda d, ip, proto, port: Explanation(policy, 2))
    with namespaces(ingress=[MapEntry(B_ID, "TCP", 80, 80, "allow")], log_allowed=True) as (a, b):
        with netns(a):
            listener = NflogListener(NFLOG_GROUP)
        with listener, syn(b, A_IP, 80):
            [p] = wait_packets(listener)
    assert (p.prefix, p.mark, p.dport) == ("l7gate:ingress:ALLOWED", B_ID, 80)
    obs.on_packet(p)
    [flow] = [f for f in obs.ring]
    assert flow["verdict"] == "FORWARDED" and flow["is_reply"] is False
    assert flow["ingress_allowed_by"][0]["name"] == "allow-b"
    assert compact(flow).endswith(f"{A_IP}:80 (ID:0) policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)")
    assert f"{B_IP}:{p.sport} (ID:{B_ID}) -> " in compact(flow)
