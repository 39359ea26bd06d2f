"""NFLOG listener: the kernel's policy drops (and optional allow logs), read from netlink.

The datapath logs a denied NEW packet with `log group NFLOG_GROUP prefix "l7gate:<dir>:<reason>"`
while the packet mark still holds the peer identity (`proxy.datapath.compile`). This module binds
that group on an `AF_NETLINK / NETLINK_NETFILTER` socket (nfnetlink_log), asks for the first bytes
of each packet (enough for the IP and transport headers) and turns every message into a `Packet`:
prefix, mark, addresses, ports, TCP flags or ICMP type/code, interfaces, time.

Namespaces: a netlink socket belongs to the network namespace it was created in, so open it in the
workload's namespace (the agent runs there). One listener per group and namespace: the kernel
refuses a second bind (EPERM; `NflogBusy`) until the first socket is closed.

Delivery: the kernel batches log messages per group until `qthreshold` messages or `timeout`
(default 100 messages / 1 s); we set threshold 1 and a 10 ms timeout so a drop shows up at once.
A full socket buffer loses messages (ENOBUFS): they are counted in `lost`, never fatal.

Never does: decide anything, look at allowed traffic (only what the rules log reaches it), block
(reads are non-blocking; `attach` puts it on an asyncio loop with `add_reader`).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("l7gate.nflog")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = ~(0x8000 | 0x4000)

# config attributes and commands (linux/netfilter/nfnetlink_log.h)
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2

# packet attributes
NFULA_PACKET_HDR, NFULA_MARK, NFULA_TIMESTAMP = 1, 2, 3
NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10

HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}
PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMPv4", 58: "ICMPv6", 132: "SCTP"}
COPY_RANGE = 128  # IPv6 header + a few extension headers + TCP header with options


class NflogBusy(OSError):
    """Another socket already listens on this group in this namespace."""


@dataclass(frozen=True)
class Packet:
    """One logged packet, as much as its first bytes tell."""
    prefix: str
    mark: int
    time_ns: int
    family: int  # 4 or 6 (0 when the payload is not IP)
    proto: str  # TCP | UDP | ICMPv4 | ICMPv6 | SCTP | the IP protocol number as text
    src: str = ""
    dst: str = ""
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0  # FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20 ECE 0x40 CWR 0x80, NS 0x100
    icmp_type: int | None = None
    icmp_code: int | None = None
    hook: str = ""
    indev: int = 0
    outdev: int = 0

    @property
    def direction(self) -> str:
        """`ingress` / `egress` from an `l7gate:<dir>:<reason>` prefix ('' otherwise)."""
        return parse_prefix(self.prefix)[0]

    @property
    def reason(self) -> str:
        return parse_prefix(self.prefix)[1]


def parse_prefix(prefix: str) -> tuple[str, str]:
    """`l7gate:ingress:POLICY_DENIED` -> ('ingress', 'POLICY_DENIED'); ('', '') if not ours."""
    parts = prefix.strip().split(":")
    if len(parts) == 3 and parts[0] == "l7gate" and parts[1] in ("ingress", "egress"):
        return parts[1], parts[2]
    return "", ""


# -- pure parsing ---------------------------------------------------------------------------------
def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > end:
            break
        out[kind & NLA_TYPE_MASK] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def parse_l3l4(payload: bytes) -> dict:
    """Addresses, protocol, ports, TCP flags / ICMP type of an IPv4 or IPv6 packet's first bytes."""
    if not payload:
        return {"family": 0, "proto": ""}
    version = payload[0] >> 4
    out: dict = {}
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        frag = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        out.update(family=4, src=socket.inet_ntop(socket.AF_INET, payload[12:16]),
                   dst=socket.inet_ntop(socket.AF_INET, payload[16:20]))
        l4 = payload[ihl:] if frag == 0 else b""  # a non-first fragment has no transport header
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        out.update(family=6, src=socket.inet_ntop(socket.AF_INET6, payload[8:24]),
                   dst=socket.inet_ntop(socket.AF_INET6, payload[24:40]))
        off = 40
        # hop-by-hop, routing, destination options, fragment: skip to the transport header
        while proto in (0, 43, 60, 44) and off + 8 <= len(payload):
            nxt = payload[off]
            if proto == 44:
                if struct.unpack_from("!H", payload, off + 2)[0] & 0xFFF8:
                    off = len(payload)  # non-first fragment
                size = 8
            else:
                size = (payload[off + 1] + 1) * 8
            proto, off = nxt, off + size
        l4 = payload[off:]
    else:
        return {"family": 0, "proto": ""}
    out["proto"] = PROTO_NAMES.get(proto, str(proto))
    if proto in (6, 17, 132) and len(l4) >= 4:
        out["sport"], out["dport"] = struct.unpack_from("!HH", l4, 0)
        if proto == 6 and len(l4) >= 14:
            out["tcp_flags"] = l4[13] | ((l4[12] & 0x01) << 8)
    elif proto in (1, 58) and len(l4) >= 2:
        out["icmp_type"], out["icmp_code"] = l4[0], l4[1]
    return out


def parse_messages(data: bytes, now_ns: int | None = None) -> list[Packet]:
    """Every NFULNL_MSG_PACKET in one netlink datagram (others are skipped)."""
    packets = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            break
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET and length >= 20:
            packets.append(_packet(_attrs(data, offset + 20, offset + length), now_ns))
        offset += (length + 3) & ~3
    return packets


def _packet(attrs: dict[int, bytes], now_ns: int | None) -> Packet:
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    mark = struct.unpack("!I", attrs[NFULA_MARK])[0] if len(attrs.get(NFULA_MARK, b"")) == 4 else 0
    ts = attrs.get(NFULA_TIMESTAMP, b"")
    now = now_ns if now_ns is not None else time.time_ns()
    time_ns = now  # locally generated packets may carry no timestamp
    if len(ts) == 16:  # struct nfulnl_msg_packet_timestamp: be64 sec, be64 usec
        sec, usec = struct.unpack("!QQ", ts)
        stamped = sec * 1_000_000_000 + usec * 1000
        if abs(stamped - now) < 60 * 1_000_000_000:  # not a monotonic (EDT) departure time
            time_ns = stamped
    hdr = attrs.get(NFULA_PACKET_HDR, b"")
    hook = HOOKS.get(hdr[2], str(hdr[2])) if len(hdr) >= 3 else ""
    dev = lambda k: struct.unpack("!I", attrs[k])[0] if len(attrs.get(k, b"")) == 4 else 0  # noqa: E731
    l3l4 = parse_l3l4(attrs.get(NFULA_PAYLOAD, b""))
    return Packet(prefix=prefix, mark=mark, time_ns=time_ns, hook=hook,
                  indev=dev(NFULA_IFINDEX_INDEV), outdev=dev(NFULA_IFINDEX_OUTDEV), **l3l4)


# -- the socket -----------------------------------------------------------------------------------
def _config_message(group: int, attrs: list[tuple[int, bytes]], seq: int) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, group)
    for kind, value in attrs:
        attr = struct.pack("=HH", 4 + len(value), kind) + value
        body += attr + b"\0" * (-len(attr) % 4)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                       NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


class NflogListener:
    """One bound NFLOG group. `read()` drains what is queued; `attach()` feeds a callback."""

    def __init__(self, group: int, copy_range: int = COPY_RANGE, rcvbuf: int = 1 << 20) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group} out of range")
        self.group = group
        self.lost = 0  # messages the kernel could not queue (ENOBUFS)
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, 0))
            self._seq = 0
            self._configure(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND))
            self._configure(NFULA_CFG_MODE, struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0))
            self._configure(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
            self._configure(NFULA_CFG_TIMEOUT, struct.pack("!I", 1))  # 1/100 s
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def _configure(self, kind: int, value: bytes) -> None:
        """Send one config attribute and wait for the kernel's ACK (or its error)."""
        self._seq += 1
        self._sock.sendall(_config_message(self.group, [(kind, value)], self._seq))
        self._sock.settimeout(2.0)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, _f, seq, _p = struct.unpack_from("=IHHII", data, offset)
                if mtype == NLMSG_ERROR and seq == self._seq:
                    err = -struct.unpack_from("=i", data, offset + 16)[0]
                    if kind == NFULA_CFG_CMD and err in (errno.EBUSY, errno.EPERM):
                        raise NflogBusy(err, f"NFLOG group {self.group}: already bound by another "
                                             "socket in this namespace (or no CAP_NET_ADMIN)")
                    if err:
                        raise OSError(err, f"NFLOG config {kind} for group {self.group}: {os.strerror(err)}")
                    return
                offset += max(16, (length + 3) & ~3)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[Packet]:
        """Everything queued now (non-blocking); [] when nothing is."""
        out: list[Packet] = []
        for _ in range(256):
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise
            out.extend(parse_messages(data))
        self.received += len(out)
        return out

    def attach(self, callback: Callable[[Packet], None],
               loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Call `callback(packet)` from the event loop for every logged packet."""
        self._loop = loop or asyncio.get_running_loop()

        def readable() -> None:
            try:
                packets = self.read()
            except OSError:
                log.exception("NFLOG read failed")
                return
            for p in packets:
                try:
                    callback(p)
                except Exception:  # an observer must not stop the listener
                    log.exception("NFLOG callback failed")

        self._loop.add_reader(self.fileno(), readable)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._sock.fileno())
            except Exception:
                pass
        self._sock.close()  # the kernel drops the instance with the socket

    def __enter__(self) -> NflogListener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
