"""Flow builders: proxy events and logged packets become Hubble flows that print as hubble does.

The vectors live in tests/data/observe/flows.yaml (the Star Wars demo's hubble lines, spec §11.3's
examples, and l7gate's own cases); the JSON shape is checked against spec §11.1's field names.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proxy.observe.flow import (EndpointInfo, Explanation, dns_flows, http_flows, kernel_flows,
                                parse_time, proxy_flows, rfc3339)
from proxy.observe.format import compact
from proxy.observe.nflog import Packet

DATA = yaml.safe_load((Path(__file__).parent / "data/observe/flows.yaml").read_text())
CASES = DATA["cases"]
ENDPOINTS = {ip: EndpointInfo(e["identity"], tuple(e.get("labels", ())), e.get("namespace", ""),
                              e.get("pod_name", ""), names=tuple(e.get("names", ())))
             for ip, e in DATA["endpoints"].items()}


def resolve(ip: str) -> EndpointInfo | None:
    return ENDPOINTS.get(ip)


def build(case: dict) -> list[dict]:
    at = parse_time(case["at"])
    node = case.get("node_name", "")
    if "http" in case:
        ev = dict(case["http"])
        ev["time"] = (at + int(ev["latency_ms"] * 1_000_000)) / 1e9
        return http_flows(ev, resolve, node)
    if "dns" in case:
        ev = dict(case["dns"])
        ev["time"] = (at + ev["latency_ns"]) / 1e9
        return dns_flows(ev, resolve, node)
    pkt = Packet(time_ns=at, **case["packet"])
    expl = Explanation(tuple(case.get("explanation", ())), case.get("match_type", 0))
    return kernel_flows(pkt, resolve, node, expl)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_compact_lines(case):
    flows = build(case)
    if case.get("only_first"):
        flows = flows[:1]
    node = case.get("print_node_name", False)
    if "lines" in case:
        assert [compact(f, False, node) for f in flows] == case["lines"]
    if "policy_lines" in case:
        assert [compact(f, True, node) for f in flows] == case["policy_lines"]


def test_the_star_wars_seed_lines_are_reproduced_verbatim():
    seeds = [c for c in CASES if c.get("seed")]
    assert len(seeds) >= 4  # both L7 pairs, the dropped SYN, the DNS example


# -- JSON shape ---------------------------------------------------------------------------------
FLOW_FIELDS = {"time", "uuid", "emitter", "verdict", "drop_reason", "drop_reason_desc", "IP", "l4",
               "source", "destination", "Type", "node_name", "source_names", "destination_names",
               "l7", "event_type", "traffic_direction", "policy_match_type", "is_reply", "Summary",
               "egress_allowed_by", "ingress_allowed_by", "egress_denied_by", "ingress_denied_by"}
ENDPOINT_FIELDS = {"ID", "identity", "namespace", "labels", "pod_name"}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_flows_use_only_hubble_field_names_and_survive_json(case):
    for f in build(case):
        assert set(f) <= FLOW_FIELDS
        assert set(f["source"]) <= ENDPOINT_FIELDS and set(f["destination"]) <= ENDPOINT_FIELDS
        assert json.loads(json.dumps(f)) == f
        assert f["verdict"] in ("FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED")
        assert parse_time(f["time"]) > 0 and f["time"].endswith("Z")


def star_wars(name: str) -> list[dict]:
    return build(next(c for c in CASES if c["name"].startswith(name)))


def test_a_kernel_drop_carries_reason_flags_identity_and_direction():
    pv, drop = star_wars("a dropped SYN")
    assert drop["verdict"] == "DROPPED"
    assert drop["drop_reason"] == 133 and drop["drop_reason_desc"] == "POLICY_DENIED"
    assert drop["event_type"] == {"type": 1, "sub_type": 133}
    assert drop["l4"] == {"TCP": {"source_port": 45706, "destination_port": 80, "flags": {"SYN": True}}}
    assert drop["IP"] == {"source": "10.0.1.20", "destination": "10.0.1.31", "ipVersion": "IPv4"}
    assert drop["source"]["identity"] == 63406 and drop["source"]["pod_name"] == "xwing"
    assert "k8s:class=xwing" in drop["source"]["labels"]
    assert drop["traffic_direction"] == "INGRESS" and drop["Type"] == "L3_L4"
    assert "is_reply" not in drop  # unknown: printed <>
    assert pv["event_type"] == {"type": 5} and pv["verdict"] == "DROPPED"


def test_an_l7_denial_names_the_policy_on_the_request_and_the_response():
    req, resp = star_wars("denied L7")
    assert req["ingress_denied_by"] == [{"name": "rule1", "namespace": "default",
                                         "kind": "CiliumNetworkPolicy"}]
    assert resp["ingress_denied_by"] == req["ingress_denied_by"]
    assert req["l7"] == {"type": "REQUEST", "http": {
        "method": "PUT", "url": "http://deathstar.default.svc.cluster.local/v1/exhaust-port",
        "protocol": "HTTP/1.1"}}
    assert resp["l7"]["http"]["code"] == 403 and resp["l7"]["type"] == "RESPONSE"
    assert req["event_type"] == {"type": 129} and req["Type"] == "L7"
    assert req["drop_reason_desc"] == "POLICY_DENIED"


def test_an_allowed_request_has_latency_as_a_string_and_allowed_by():
    req, resp = star_wars("allowed L7")
    assert resp["l7"]["latency_ns"] == "1400000"
    assert "latency_ns" not in req["l7"]
    assert req["ingress_allowed_by"][0]["name"] == "rule1"
    assert "ingress_denied_by" not in req and "drop_reason" not in req


def test_a_response_swaps_addresses_ports_and_endpoints_and_is_a_reply():
    req, resp = star_wars("allowed L7")
    assert req["is_reply"] is False and resp["is_reply"] is True
    assert resp["IP"]["source"] == req["IP"]["destination"]
    assert resp["l4"]["TCP"] == {"source_port": 80, "destination_port": 42746}
    assert resp["source"] == req["destination"] and resp["destination"] == req["source"]


def test_dns_flows_carry_query_answers_and_observation_source():
    req, resp = star_wars("an allowed DNS")
    assert req["l7"]["dns"] == {"query": "web.default.svc.cluster.local.", "observation_source": "proxy",
                                "qtypes": ["A"]}
    assert resp["l7"]["dns"] == {"query": "web.default.svc.cluster.local.", "ips": ["10.96.0.10"],
                                 "ttl": 30, "observation_source": "proxy", "qtypes": ["A"],
                                 "rrtypes": ["A"]}
    assert req["l4"] == {"UDP": {"source_port": 45240, "destination_port": 53}}
    assert req["traffic_direction"] == "EGRESS"
    [denied] = star_wars("a denied DNS")
    assert denied["verdict"] == "DROPPED" and denied["egress_denied_by"][0]["name"] == "my-policy"


def test_world_peers_get_their_dns_names():
    req, _ = star_wars("an egress request to a world")
    assert req["destination_names"] == ["api.github.com"]
    assert req["destination"]["labels"] == ["fqdn:api.github.com", "reserved:world"]


def test_the_mark_wins_over_a_resolver_that_disagrees():
    pkt = Packet("l7gate:egress:POLICY_DENIED", 16777300, 0, 4, "TCP", "10.0.1.10", "203.0.113.7",
                 1, 443, 2)
    _, drop = kernel_flows(pkt, resolve)
    assert drop["destination"]["identity"] == 16777300
    assert "labels" not in drop["destination"]  # the resolver's labels describe another identity


def test_foreign_log_prefixes_make_no_flows():
    pkt = Packet("someone-else", 0, 0, 4, "TCP", "10.0.0.1", "10.0.0.2", 1, 2, 2)
    assert kernel_flows(pkt, resolve) == []


def test_a_failing_resolver_costs_labels_not_flows():
    def broken(ip):
        raise RuntimeError("engine gone")
    ev = {"method": "GET", "url": "http://x/", "protocol": "HTTP/1.1", "verdict": "FORWARDED",
          "code": 200, "latency_ms": 1, "direction": "egress", "src_ip": "10.0.0.1",
          "src_port": 1, "dst_ip": "10.0.0.2", "dst_port": 80, "time": 1.0}
    req, resp = http_flows(ev, broken)
    assert req["source"] == {} and resp["verdict"] == "FORWARDED"


def test_proxy_flows_dispatches_on_the_event_type():
    dns = dict(next(c for c in CASES if "dns" in c)["dns"], time=1.0)
    assert "dns" in proxy_flows(dns)[0]["l7"]
    http = dict(next(c for c in CASES if "http" in c)["http"], time=1.0)
    assert "http" in proxy_flows(http)[0]["l7"]


@pytest.mark.parametrize("ns,text", [
    (1692620000510175415, "2023-08-21T12:13:20.510175415Z"),
    (1692620000510175000, "2023-08-21T12:13:20.510175Z"),
    (1692620000510000000, "2023-08-21T12:13:20.510Z"),
    (1692620000000000000, "2023-08-21T12:13:20Z"),
])
def test_times_print_like_protojson_and_parse_back(ns, text):
    assert rfc3339(ns) == text
    assert parse_time(text) == ns


def test_parse_time_takes_offsets():
    assert parse_time("2023-08-21T14:13:20.5+02:00") == 1692620000500000000


# -- EngineView: the agent's resolver and explainer on a real engine ----------------------------
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def _engine():
    from proxy.fqdn.cache import DNSCache
    from proxy.policy.endpoint import Endpoint
    from proxy.policy.engine import Engine
    from proxy.policy.load import load_text
    policies = load_text(POLICY).policies
    eps = [Endpoint("deathstar-1", labels={"class": "deathstar", "org": "empire"}, ips=["10.0.1.30"]),
           Endpoint("tiefighter", labels={"class": "tiefighter", "org": "empire"}, ips=["10.0.1.10"]),
           Endpoint("xwing", labels={"class": "xwing", "org": "alliance"}, ips=["10.0.1.20"])]
    cache = DNSCache()
    cache.update("api.github.com.", ["203.0.113.7"], 300, 0.0)
    return Engine(policies, eps, [], cache, clock=lambda: 1.0)


def test_engine_view_resolves_endpoints_and_world_addresses():
    from proxy.observe import EngineView
    engine = _engine()
    view = EngineView(lambda: engine, "deathstar-1")
    x = view.resolve("10.0.1.20")
    assert (x.namespace, x.pod_name) == ("default", "xwing")
    assert x.identity == engine.identity_of(engine.peer("xwing").endpoint).id
    assert "k8s:class=xwing" in x.labels
    w = view.resolve("203.0.113.7")
    assert w.pod_name == "" and "reserved:world" in w.labels and w.names == ("api.github.com",)
    assert view.resolve("not-an-ip") is None
    for loopback in ("127.0.0.1", "::1"):  # e.g. a query to Docker's DNS at 127.0.0.11
        me = view.resolve(loopback)
        assert (me.namespace, me.pod_name) == ("default", "deathstar-1")


def test_engine_view_explains_drops_and_allows():
    from proxy.observe import EngineView
    engine = _engine()
    view = EngineView(lambda: engine, "deathstar-1")
    denied = view.explain("ingress", "10.0.1.20", "TCP", 80)
    assert [p["name"] for p in denied.policies] == ["rule1"] and denied.match_type == 0
    allowed = view.explain("ingress", "10.0.1.10", "TCP", 80)
    assert [p["name"] for p in allowed.policies] == ["rule1"]
    assert allowed.match_type == 2  # L3-L4


def test_engine_view_caches_per_engine_and_rereads_world_addresses():
    from proxy.observe import EngineView
    engines = [_engine()]
    now = [0.0]
    view = EngineView(lambda: engines[-1], "deathstar-1", clock=lambda: now[0])
    first = view.resolve("198.51.100.9")
    engines[-1].cache.update("late.example.", ["198.51.100.9"], 300, 0.0)
    assert view.resolve("198.51.100.9") == first  # cached for WORLD_TTL
    now[0] += EngineView.WORLD_TTL + 0.1
    assert view.resolve("198.51.100.9").names == ("late.example",)
    xwing = view.resolve("10.0.1.20")
    engines.append(_engine())  # a sync swaps the engine: nothing cached survives
    assert view.resolve("10.0.1.20") == xwing and view._engine is engines[-1]
