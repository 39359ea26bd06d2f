"""Prometheus metrics with Hubble's names, counted from the same flow dicts the ring keeps.

Every metric is updated from flows (`Metrics.observe(flow)`; for proxy events, `observe_event`
counts the series the event's flows would count in, remembered per kind of event), so the counts
always agree with the flows (`l7gate observe` shows what `/metrics` counts).

  hubble_flows_processed_total{protocol,type,subtype,verdict}   every flow; type L7 | Drop |
        PolicyVerdict | Trace, subtype HTTP | DNS for L7, protocol HTTP | DNS | TCP | UDP | ICMPv4 ...
  hubble_drop_total{reason,protocol}          dropped flows (kernel drops and L7 denials; the
        policy-verdict event that accompanies a kernel drop is not counted twice)
  hubble_policy_verdicts_total{direction,match,action}   policy decisions: policy-verdict events
        (match none | l3-only | l3-l4 | l4-only | all) and L7 requests (match l7/http | l7/dns);
        action = the verdict in lower case (forwarded, dropped, ...)
  l7gate_policy_verdicts_by_policy_total{direction,action,kind,namespace,name}   the same
        decisions, once per policy that decided (beyond Hubble)
  hubble_dns_queries_total{rcode,qtypes,ips_returned}    DNS requests (rcode "Policy denied" when
        dropped, "" otherwise, as Hubble)
  hubble_dns_responses_total{rcode,qtypes,ips_returned}  DNS responses (rcode "No Error", ...)
  hubble_dns_response_types_total{type,qtypes}           answer record types
  hubble_http_requests_total{method,protocol}
  hubble_http_responses_total{status,method}
  hubble_http_request_duration_seconds{method}   histogram of response latency
  hubble_lost_events_total{source}               events lost before becoming flows (NFLOG overflow)

Served by `serve(addr)` (prometheus_client's HTTP server thread) on an address the operator
gives: never on all interfaces unless the address says so (`parse_address`).
"""
from __future__ import annotations

import ipaddress
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import start_http_server

from proxy.observe.flow import (EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT, EVENT_TRACE, MATCH_TYPES,
                                RCODE_NAMES, ProxyEventFlows, http_latency_ns, protocol_of)
from proxy.observe.format import deciding_policies

DEFAULT_PORT = 9965  # hubble's metrics port
TYPE_NAMES = {EVENT_L7: "L7", EVENT_DROP: "Drop", EVENT_TRACE: "Trace", EVENT_POLICY_VERDICT: "PolicyVerdict"}


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT` -> (host, port). No host means 127.0.0.1:
    metrics are never exposed on every interface unless `0.0.0.0` / `[::]` is written out."""
    text = (text or "").strip()
    if not text:
        raise ValueError("empty metrics address")
    if text.isdigit():
        host, port_text = "", text
    elif text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad metrics address {text!r} (use [ADDR]:PORT)")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, str(DEFAULT_PORT)
        if ":" in host:
            raise ValueError(f"bad metrics address {text!r} (bracket IPv6 addresses: [ADDR]:PORT)")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:  # 0: any free port
        raise ValueError(f"bad metrics port in {text!r}")
    host = host or "127.0.0.1"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"metrics address {host!r} is not an IP address") from None
    return host, int(port_text)


class MetricsServer:
    def __init__(self, server, thread, address: tuple[str, int]) -> None:
        self._server, self._thread, self.address = server, thread, address

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


def _latency_s(flow: dict) -> float:
    l7 = flow.get("l7") or {}
    return int(l7.get("latency_ns", 0) or 0) / 1e9


def _apply(plan: list, latency_s: float) -> None:
    for child, timed in plan:
        if timed:
            child.observe(latency_s)
        else:
            child.inc()


class Metrics:
    MAX_PLANS = 4096
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.flows = Counter("hubble_flows_processed_total", "Total number of flows processed",
                             ["protocol", "type", "subtype", "verdict"], registry=r)
        self.drops = Counter("hubble_drop_total", "Number of drops", ["reason", "protocol"], registry=r)
        self.policy = Counter("hubble_policy_verdicts_total", "Total number of network policy verdicts",
                              ["direction", "match", "action"], registry=r)
        self.by_policy = Counter("l7gate_policy_verdicts_by_policy_total",
                                 "Network policy verdicts per deciding policy",
                                 ["direction", "action", "kind", "namespace", "name"], registry=r)
        self.dns_queries = Counter("hubble_dns_queries_total", "Number of DNS queries observed",
                                   ["rcode", "qtypes", "ips_returned"], registry=r)
        self.dns_responses = Counter("hubble_dns_responses_total", "Number of DNS responses observed",
                                     ["rcode", "qtypes", "ips_returned"], registry=r)
        self.dns_types = Counter("hubble_dns_response_types_total", "Number of DNS response record types",
                                 ["type", "qtypes"], registry=r)
        self.http_requests = Counter("hubble_http_requests_total", "Count of HTTP requests",
                                     ["method", "protocol"], registry=r)
        self.http_responses = Counter("hubble_http_responses_total", "Count of HTTP responses",
                                      ["status", "method"], registry=r)
        self.http_duration = Histogram("hubble_http_request_duration_seconds",
                                       "HTTP request duration in seconds", ["method"], registry=r)
        self.lost = Counter("hubble_lost_events_total", "Number of lost events", ["source"], registry=r)
        self._children: dict = {}
        self._plans: dict[tuple, list] = {}  # proxy event kind -> the series its flows count in

    def _child(self, metric, *labels: str):
        """metric.labels(*labels), memoised: prometheus_client's lookup costs ~4 us a call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_all(self, flows: Iterable[dict]) -> None:
        for f in flows:
            self.observe(f)

    def observe(self, flow: dict) -> None:
        _apply(self._plan(flow), _latency_s(flow))

    def observe_event(self, kind: tuple, event: ProxyEventFlows) -> None:
        """Count a proxy event's flows without building them: the series a flow counts in depend
        only on its event's `kind` (`proxy_event_kind`), so the flows of the first event of a
        kind are built once and the series they touched are remembered."""
        plan = self._plans.get(kind)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.clear()
            plan = self._plans[kind] = [step for f in event.flows() for step in self._plan(f)]
        _apply(plan, http_latency_ns(event.event) / 1e9)

    def _plan(self, flow: dict) -> list[tuple[object, bool]]:
        """The series `flow` counts in: (child, timed); timed children observe the latency."""
        plan: list[tuple[object, bool]] = []

        def count(metric, *labels: str, timed: bool = False) -> None:
            plan.append((self._child(metric, *labels), timed))

        et = flow.get("event_type", {}).get("type", 0)
        verdict = flow.get("verdict", "VERDICT_UNKNOWN")
        protocol = protocol_of(flow)
        l7 = flow.get("l7")
        subtype = ""
        if et == EVENT_L7 and l7 is not None:
            subtype = "DNS" if "dns" in l7 else "HTTP" if "http" in l7 else ""
        count(self.flows, protocol, TYPE_NAMES.get(et, "Unknown"), subtype, verdict)
        if verdict == "DROPPED" and et != EVENT_POLICY_VERDICT:
            count(self.drops, flow.get("drop_reason_desc", "DROP_REASON_UNKNOWN"), protocol)
        direction = flow.get("traffic_direction", "TRAFFIC_DIRECTION_UNKNOWN").lower()
        match = None
        if et == EVENT_POLICY_VERDICT:
            ids = (flow.get("source", {}).get("identity"), flow.get("destination", {}).get("identity"))
            if ids[0] != 1 and 4 not in ids:  # Hubble ignores host-sourced and health verdicts
                match = MATCH_TYPES.get(flow.get("policy_match_type", 0), "unknown").lower()
        elif et == EVENT_L7 and l7 is not None and l7.get("type") == "REQUEST":
            match = "l7/" + subtype.lower() if subtype else "l7/unknown"
        if match is not None:
            action = verdict.lower()
            count(self.policy, direction, match, action)
            for p in deciding_policies(flow):
                count(self.by_policy, direction, action, p.get("kind", ""), p.get("namespace", ""),
                      p.get("name", ""))
        if l7 is None:
            return plan
        if "dns" in l7:
            dns = l7["dns"]
            qtypes = ",".join(dns.get("qtypes", []))
            ips = str(len(dns.get("ips", [])))
            if verdict == "DROPPED":
                count(self.dns_queries, "Policy denied", qtypes, ips)
            elif not flow.get("is_reply"):
                count(self.dns_queries, "", qtypes, ips)
            else:
                rcode = int(dns.get("rcode", 0))
                count(self.dns_responses, RCODE_NAMES.get(rcode, str(rcode)), qtypes, ips)
                for t in dns.get("rrtypes", []):
                    count(self.dns_types, t, qtypes)
        elif "http" in l7:
            http = l7["http"]
            method = http.get("method", "")
            if l7.get("type") == "REQUEST":
                count(self.http_requests, method, http.get("protocol", ""))
            elif l7.get("type") == "RESPONSE":
                count(self.http_responses, str(http.get("code", 0)), method)
                count(self.http_duration, method, timed=True)
        return plan

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (what /metrics answers)."""
        return generate_latest(self.registry)

    def serve(self, address: str) -> MetricsServer:
        """Serve /metrics on `address` (see `parse_address`) from a daemon thread."""
        host, port = parse_address(address)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread, (host, server.server_address[1]))
