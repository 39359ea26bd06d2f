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
from bisect import bisect_left
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from proxy.observe.flow import (EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT, EVENT_TRACE, MATCH_TYPES,
                                RCODE_NAMES, ProxyEvent, protocol_of)
from proxy.observe.format import deciding_policies

DEFAULT_PORT = 9965  # hubble's metrics port
BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)  # seconds
BUCKET_NAMES = [str(b) for b in BUCKETS] + ["+Inf"]
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


class _Count:
    """One counter series: a plain number, bumped on the event loop, read when scraped."""
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Buckets:
    """One histogram series: counts per bucket (not cumulative; +Inf last) and the sum."""
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value


class _Family:
    """A metric and its series by label values. prometheus_client's own Counter costs ~1 us
    per increment (a lock, checks); the proxies count several series per request, so series
    are plain objects here and the text is made from them when scraped."""

    def __init__(self, name: str, doc: str, labels: Iterable[str], histogram: bool = False) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labels)
        self.histogram = histogram
        self.series: dict[tuple[str, ...], _Count | _Buckets] = {}

    def labels(self, *values: str):
        cell = self.series.get(values)
        if cell is None:
            cell = self.series[values] = _Buckets() if self.histogram else _Count()
        return cell

    def collect(self):
        """The family as prometheus_client renders it (called on the scrape thread: a copy
        of the series dict is taken in one step, numbers are read as they are)."""
        series = list(self.series.items())
        if not self.histogram:
            family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
            for values, cell in series:
                family.add_metric(values, cell.value)
            return family
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, cell in series:
            counts, total = list(cell.counts), cell.sum
            cumulative, running = [], 0
            for bound, n in zip(BUCKET_NAMES, counts):
                running += n
                cumulative.append((bound, running))
            family.add_metric(values, cumulative, total)
        return family


class _Collector:
    def __init__(self, families: list[_Family]) -> None:
        self.families = families

    def collect(self):
        return [f.collect() for f in self.families]


Plan = tuple[tuple[_Count, ...], tuple[_Buckets, ...]]  # the series one flow (or event) counts in


def _split(steps: list[tuple[object, bool]]) -> Plan:
    return (tuple(c for c, timed in steps if not timed), tuple(c for c, timed in steps if timed))


def _apply(plan: Plan, latency_s: float) -> None:
    counts, timed = plan
    for cell in counts:
        cell.value += 1
    for cell in timed:
        cell.observe(latency_s)


class Metrics:
    MAX_PLANS = 4096
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        F = _Family
        self.flows = F("hubble_flows_processed_total", "Total number of flows processed",
                       ["protocol", "type", "subtype", "verdict"])
        self.drops = F("hubble_drop_total", "Number of drops", ["reason", "protocol"])
        self.policy = F("hubble_policy_verdicts_total", "Total number of network policy verdicts",
                        ["direction", "match", "action"])
        self.by_policy = F("l7gate_policy_verdicts_by_policy_total",
                           "Network policy verdicts per deciding policy",
                           ["direction", "action", "kind", "namespace", "name"])
        self.dns_queries = F("hubble_dns_queries_total", "Number of DNS queries observed",
                             ["rcode", "qtypes", "ips_returned"])
        self.dns_responses = F("hubble_dns_responses_total", "Number of DNS responses observed",
                               ["rcode", "qtypes", "ips_returned"])
        self.dns_types = F("hubble_dns_response_types_total", "Number of DNS response record types",
                           ["type", "qtypes"])
        self.http_requests = F("hubble_http_requests_total", "Count of HTTP requests",
                               ["method", "protocol"])
        self.http_responses = F("hubble_http_responses_total", "Count of HTTP responses",
                                ["status", "method"])
        self.http_duration = F("hubble_http_request_duration_seconds",
                               "HTTP request duration in seconds", ["method"], histogram=True)
        self.lost = F("hubble_lost_events_total", "Number of lost events", ["source"])
        self.registry.register(_Collector([
            self.flows, self.drops, self.policy, self.by_policy, self.dns_queries,
            self.dns_responses, self.dns_types, self.http_requests, self.http_responses,
            self.http_duration, self.lost]))
        self._plans: dict[tuple, Plan] = {}  # proxy event kind -> the series its flows count in

    def observe_all(self, flows: Iterable[dict]) -> None:
        for f in flows:
            self.observe(f)

    def observe(self, flow: dict) -> None:
        _apply(_split(self._plan(flow)), _latency_s(flow))

    def observe_event(self, kind: tuple, event: ProxyEvent) -> None:
        """Count a proxy event's flows without building them: the series a flow counts in depend
        only on its event's `kind` (`proxy_event_kind`), so the flows of the first event of a
        kind are built once and the series they touched are remembered."""
        plan = self._plans.get(kind)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.clear()
            plan = self._plans[kind] = _split([step for f in event.flows() for step in self._plan(f)])
        _apply(plan, event.http_latency_ns / 1e9)

    def _plan(self, flow: dict) -> list[tuple[object, bool]]:
        """The series `flow` counts in: (child, timed); timed children observe the latency."""
        plan: list[tuple[object, bool]] = []

        def count(family: _Family, *labels: str, timed: bool = False) -> None:
            plan.append((family.labels(*labels), timed))

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
