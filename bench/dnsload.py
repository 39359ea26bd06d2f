"""UDP DNS load generator for bench/run (runs inside a lab namespace; python = l7gate's venv).

Keeps `--window` queries outstanding against SERVER:53 from one UDP socket, cycling through the
given names (A queries), until `--count` queries are answered or `--seconds` have passed
(both bounds always hold). A query unanswered after `--timeout` counts as lost and is replaced.
Prints one JSON object: sent, answered, lost, seconds, qps, p50_ms, p99_ms, rcodes.

    python bench/dnsload.py --server 10.231.0.53 --names a.example,b.example --count 20000 --seconds 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import time
from collections import Counter


def query(name: str, qtype: int = 1) -> bytes:
    """A DNS query with ID 0 (patched per send), RD set, one question."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".") if p)
    return struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


class Load(asyncio.DatagramProtocol):
    def __init__(self, names: list[str], window: int, count: int, seconds: float, timeout: float,
                 done: asyncio.Future) -> None:
        self.templates = [query(n) for n in names]
        self.window, self.count, self.timeout = window, count, timeout
        self.deadline = time.monotonic() + seconds
        self.done = done
        self.inflight: dict[int, float] = {}
        self.next_id = 1
        self.sent = self.answered = self.lost = 0
        self.latencies: list[float] = []
        self.rcodes: Counter[int] = Counter()
        self.transport: asyncio.DatagramTransport | None = None
        self.started = self.last = time.monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.started = self.last = time.monotonic()
        for _ in range(self.window):
            self.send()

    def send(self) -> None:
        if self.answered + len(self.inflight) >= self.count or time.monotonic() >= self.deadline:
            self.maybe_done()
            return
        qid = self.next_id
        while qid in self.inflight:
            qid = (qid % 65535) + 1
        self.next_id = (qid % 65535) + 1
        tpl = self.templates[self.sent % len(self.templates)]
        self.inflight[qid] = time.monotonic()
        self.sent += 1
        self.transport.sendto(struct.pack("!H", qid) + tpl[2:])

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        qid, flags = struct.unpack_from("!HH", data)
        t0 = self.inflight.pop(qid, None)
        if t0 is None:
            return  # late answer to a query already counted lost
        now = time.monotonic()
        self.last = now
        self.answered += 1
        self.latencies.append(now - t0)
        self.rcodes[flags & 0xF] += 1
        self.send()

    def error_received(self, exc) -> None:
        pass  # e.g. ICMP port unreachable: the query times out and is counted lost

    def sweep(self) -> None:
        now = time.monotonic()
        for qid, t0 in list(self.inflight.items()):
            if now - t0 > self.timeout:
                del self.inflight[qid]
                self.lost += 1
                self.send()
        if now >= self.deadline:
            self.lost += len(self.inflight)
            self.inflight.clear()
        self.maybe_done()

    def maybe_done(self) -> None:
        if not self.inflight and not self.done.done():
            self.done.set_result(None)


async def main(a: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    names = [n for n in a.names.split(",") if n]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    if a.sport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", a.sport))
    sock.connect((a.server, a.port))
    transport, load = await loop.create_datagram_endpoint(
        lambda: Load(names, a.window, a.count, a.seconds, a.timeout, done), sock=sock)
    try:
        while not done.done():
            await asyncio.wait([done], timeout=0.05)
            load.sweep()
    finally:
        transport.close()
    elapsed = max(load.last - load.started, 1e-9)
    lat = sorted(load.latencies)
    pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None
    return {"sent": load.sent, "answered": load.answered, "lost": load.lost,
            "seconds": round(elapsed, 3), "qps": round(load.answered / elapsed, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "rcodes": {str(k): v for k, v in sorted(load.rcodes.items())}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--sport", type=int, default=0,
                   help="source port (default: an ephemeral one). bench/run passes a fresh port "
                        "below the ephemeral range per run: a 5-tuple that already has a "
                        "conntrack entry (an earlier run's, or one the DNS proxy's own upstream "
                        "sockets left) would skip the DNS proxy's interception")
    p.add_argument("--names", required=True, help="comma-separated names, queried in turn (A)")
    p.add_argument("--window", type=int, default=32, help="queries outstanding")
    p.add_argument("--count", type=int, default=20000, help="stop after this many answers")
    p.add_argument("--seconds", type=float, default=5.0, help="stop after this long")
    p.add_argument("--timeout", type=float, default=1.0, help="a query unanswered this long is lost")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(main(args))))
