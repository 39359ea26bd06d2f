"""The lab's DNS server (the kube-dns analogue): answers from a zone file, UDP and TCP.

Zone file (JSON, written by `lab up`): `{"ttl": 30, "records": {"name": {"a": [ips],
"cname": "", "ttl": null}}}`, names lower-case without the trailing dot. It is re-read when it
changes, so records can be added to a running lab.

Answers: A for a name with addresses (following CNAMEs inside the zone, the chain included in the
answer); NOERROR with no answer (NODATA) for other types of a known name; NXDOMAIN for every other
name. It never forwards anywhere: the lab has no way out. Malformed queries are dropped (UDP) or
close the connection (TCP); it never crashes on input.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys

from dnslib import CNAME, QTYPE, RCODE, RR, A, DNSRecord

from proxy.lab.apps._serve import run

MAX_CHAIN = 8


class Zone:
    def __init__(self, path: str) -> None:
        self.path = path
        self._sig: tuple | None = None
        self.ttl = 30
        self.records: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._sig:
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
            self.ttl = int(data.get("ttl", 30))
            self.records = {k.lower().rstrip("."): v for k, v in data.get("records", {}).items()}
            self._sig = sig
        except (OSError, ValueError, AttributeError) as e:  # keep the last good zone
            print(f"dnsserver: zone {self.path} not loaded: {e}", file=sys.stderr, flush=True)

    def answer(self, query: DNSRecord) -> DNSRecord:
        reply = query.reply()  # QR, AA, RD copied, RA set
        if len(query.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply
        q = query.questions[0]
        name = str(q.qname).lower().rstrip(".")
        rec = self.records.get(name)
        if rec is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        owner = q.qname
        for _ in range(MAX_CHAIN):
            ttl = rec.get("ttl")
            ttl = self.ttl if ttl is None else int(ttl)
            target = rec.get("cname") or ""
            if target:
                reply.add_answer(RR(owner, QTYPE.CNAME, ttl=ttl, rdata=CNAME(target + ".")))
                owner = target + "."
                rec = self.records.get(target)
                if rec is None:
                    return reply
                continue
            if q.qtype in (QTYPE.A, QTYPE.ANY):
                for ip in rec.get("a", []):
                    reply.add_answer(RR(owner, QTYPE.A, ttl=ttl, rdata=A(ip)))
            return reply
        reply.header.rcode = RCODE.SERVFAIL  # CNAME loop
        return reply

    def handle(self, data: bytes) -> bytes | None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - dnslib raises assorted errors on garbage: drop it
            return None
        if query.header.qr:  # a response, not a query: ignore
            return None
        self.reload()
        try:
            return self.answer(query).pack()
        except Exception as e:  # noqa: BLE001 - a record we cannot encode: SERVFAIL, not silence
            print(f"dnsserver: cannot answer {query.q.qname}: {e}", file=sys.stderr, flush=True)
            reply = query.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone, log: bool) -> None:
        self.zone, self.log = zone, log

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        out = self.zone.handle(data)
        if self.log:
            _log(data, out, addr)
        if out is not None:
            self.transport.sendto(out, addr)


def _log(data: bytes, out: bytes | None, addr) -> None:
    try:
        q = DNSRecord.parse(data).q
        rc = RCODE[DNSRecord.parse(out).header.rcode] if out else "dropped"
        print(f"{addr[0]} {q.qname} {QTYPE[q.qtype]} -> {rc}", flush=True)
    except Exception:  # noqa: BLE001 - logging must not fail on garbage
        print(f"{addr[0]} malformed query dropped", flush=True)


async def serve(zone: Zone, port: int, host: str, stop: asyncio.Event, log: bool = False) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _UDP(zone, log), local_addr=(host, port),
                                                       reuse_port=False)

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(n)
                out = zone.handle(data)
                if log:
                    _log(data, out, writer.get_extra_info("peername"))
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(tcp, host, port, reuse_address=True)
    await stop.wait()
    server.close()
    transport.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dnsserver", description=__doc__.splitlines()[0])
    ap.add_argument("--zone", required=True, help="zone file (JSON)")
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--log", action="store_true", help="print one line per query")
    args = ap.parse_args(argv)
    zone = Zone(args.zone)
    return run(lambda stop: serve(zone, args.port, args.host, stop, args.log))


if __name__ == "__main__":
    raise SystemExit(main())
