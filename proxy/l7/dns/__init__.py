"""The DNS proxy: enforce a workload's DNS rules and learn toFQDNs IPs (spec §9–§10).

What it does
  The workload's DNS (UDP and TCP 53, when its policy has DNS rules) is TPROXY'd to this proxy,
  which runs one short chain per query (`chain.py`, sans-IO; `server.py` moves the bytes):

    parse    the query (dnslib, hardened name decoder in `wire.py`); unreadable → FORMERR,
             opcode ≠ QUERY → NOTIMP, shorter than a header or a response → silence
    policy   `oracle.dns_verdict(server_ip, server_port, proto, qname)`, qname in miekg presentation
             form, lower-cased, final dot; denied → REFUSED (or NXDOMAIN), question copied
    forward  to the server the client addressed (original destination), same transport, fresh ID;
             only an answer from that address with an outstanding ID and the same question counts
    learn    NOERROR answers: every A/AAAA attributed to the question name through the CNAME
             chain, TTL = min over A/AAAA/CNAME; `await oracle.learn(qname, ips, ttl)` — the
             datapath opens the IPs — BEFORE the answer is released
    release  the upstream's bytes unchanged but for the client's ID (TTLs untouched)

  Upstream silent for `upstream_timeout` (10 s) → the client gets nothing (as Cilium); upstream
  unreachable, oracle failure, broken CNAME chain → SERVFAIL.

What it never does
  Never forwards a query it could not parse or that policy denies; never relays an upstream
  message that does not answer an outstanding query; never rewrites TTLs or records; never
  releases an answer before `learn` returned; never crashes on input (every path ends in a reply,
  silence or a counted error); never decides policy itself (the oracle does).

Flows
  `on_flow(event)` once per query, a `DNSEvent` (a read-only mapping, built only when read):
  type "dns", time (ns), direction "egress", protocol UDP|TCP,
  src_ip/src_port (the workload), dst_ip/dst_port (the server it asked), id, qname, qtypes,
  verdict FORWARDED (relayed) | DROPPED (denied or malformed) | ERROR (SERVFAIL or timeout),
  rcode (None when nothing was sent), rcode_name, ips, ttl, cnames, rrtypes, policies (the
  L7Result's), reason, latency_ns. A FORWARDED event maps to Hubble's dns-request + dns-response
  pair, a DROPPED one to a single dns-request DROPPED (spec §9.2.7).

Metrics (`Server.stats`, a Counter)
  queries, forwarded, denied, learned, malformed, servfail, errors, upstream_timeouts,
  answers_discarded (spoofed or mismatched upstream messages), reply_failed,
  no_original_destination.
"""
from proxy.l7.dns.chain import (Destination, DNSProtocolError, Learned, Mismatch, Outstanding,
                                Query, Response, TCPFramer, check_policy, learn, parse_query,
                                refusal, release)

__all__ = [
                                "DNSProtocolError",
                                "Destination",
                                "Learned",
                                "Mismatch",
                                "Outstanding",
                                "Query",
                                "Response",
                                "TCPFramer",
                                "check_policy",
                                "learn",
                                "parse_query",
                                "refusal",
                                "release",
]
