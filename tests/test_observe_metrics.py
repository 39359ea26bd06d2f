"""Prometheus metrics: Hubble's names, counts equal to the flows fed, served where asked."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.metrics import Metrics, parse_address
from test_observe_flow import CASES, build


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, metric: str, **labels) -> float:
    return samples(text).get((metric, tuple(sorted(labels.items()))), 0.0)


def case(prefix: str) -> list[dict]:
    return build(next(c for c in CASES if c["name"].startswith(prefix)))


def star_wars_replay() -> tuple[Metrics, str]:
    """The L7 step of the demo: 3 landings, 2 exhaust-port PUTs, 4 xwing SYNs, 2 DNS queries."""
    m = Metrics()
    for _ in range(3):
        m.observe_all(case("allowed L7"))
    for _ in range(2):
        m.observe_all(case("denied L7"))
    for _ in range(4):
        m.observe_all(case("a dropped SYN"))
    m.observe_all(case("an allowed DNS"))
    m.observe_all(case("a denied DNS"))
    return m, m.render().decode()


def test_the_text_parses_and_counts_match_the_replay_exactly():
    _, text = star_wars_replay()
    v = lambda metric, **kw: value(text, metric, **kw)  # noqa: E731
    assert v("hubble_http_requests_total", method="POST", protocol="HTTP/1.1") == 3
    assert v("hubble_http_requests_total", method="PUT", protocol="HTTP/1.1") == 2
    assert v("hubble_http_responses_total", status="200", method="POST") == 3
    assert v("hubble_http_responses_total", status="403", method="PUT") == 2
    assert v("hubble_http_request_duration_seconds_count", method="POST") == 3
    assert v("hubble_http_request_duration_seconds_sum", method="POST") == pytest.approx(3 * 0.0014)
    assert v("hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") == 4
    assert v("hubble_drop_total", reason="POLICY_DENIED", protocol="HTTP") == 2
    assert v("hubble_drop_total", reason="POLICY_DENIED", protocol="DNS") == 1
    assert v("hubble_flows_processed_total", protocol="HTTP", type="L7", subtype="HTTP",
             verdict="FORWARDED") == 3 + 3 + 2
    assert v("hubble_flows_processed_total", protocol="HTTP", type="L7", subtype="HTTP",
             verdict="DROPPED") == 2
    assert v("hubble_flows_processed_total", protocol="TCP", type="Drop", subtype="",
             verdict="DROPPED") == 4
    assert v("hubble_flows_processed_total", protocol="TCP", type="PolicyVerdict", subtype="",
             verdict="DROPPED") == 4
    assert v("hubble_dns_queries_total", rcode="", qtypes="A", ips_returned="0") == 1
    assert v("hubble_dns_queries_total", rcode="Policy denied", qtypes="A", ips_returned="0") == 1
    assert v("hubble_dns_responses_total", rcode="No Error", qtypes="A", ips_returned="1") == 1
    assert v("hubble_dns_response_types_total", type="A", qtypes="A") == 1


def test_policy_verdicts_count_decisions_by_match_and_by_policy():
    _, text = star_wars_replay()
    v = lambda metric, **kw: value(text, metric, **kw)  # noqa: E731
    assert v("hubble_policy_verdicts_total", direction="ingress", match="l7/http", action="forwarded") == 3
    assert v("hubble_policy_verdicts_total", direction="ingress", match="l7/http", action="dropped") == 2
    assert v("hubble_policy_verdicts_total", direction="ingress", match="none", action="dropped") == 4
    assert v("hubble_policy_verdicts_total", direction="egress", match="l7/dns", action="dropped") == 1
    assert v("l7gate_policy_verdicts_by_policy_total", direction="ingress", action="forwarded",
             kind="CiliumNetworkPolicy", namespace="default", name="rule1") == 3
    assert v("l7gate_policy_verdicts_by_policy_total", direction="ingress", action="dropped",
             kind="CiliumNetworkPolicy", namespace="default", name="rule1") == 2
    assert v("l7gate_policy_verdicts_by_policy_total", direction="egress", action="dropped",
             kind="CiliumNetworkPolicy", namespace="default", name="my-policy") == 1


def test_two_instances_do_not_share_counts():
    a, b = Metrics(), Metrics()
    a.observe_all(case("allowed L7"))
    assert value(b.render().decode(), "hubble_http_requests_total", method="POST",
                 protocol="HTTP/1.1") == 0


def test_latencies_land_in_prometheus_buckets_bounds_included():
    """le is "less than or equal": 5 ms counts in le=0.005, 5.1 ms only from le=0.01 on."""
    m = Metrics()
    flows = case("allowed L7")
    response = next(f for f in flows if f.get("l7", {}).get("type") == "RESPONSE")
    for latency_ns in (5_000_000, 5_100_000, 20_000_000_000):
        response["l7"]["latency_ns"] = latency_ns
        m.observe(response)
    text = m.render().decode()
    v = lambda le: value(text, "hubble_http_request_duration_seconds_bucket",  # noqa: E731
                         method="POST", le=le)
    assert (v("0.005"), v("0.01"), v("10.0"), v("+Inf")) == (1, 2, 2, 3)
    assert value(text, "hubble_http_request_duration_seconds_count", method="POST") == 3
    assert value(text, "hubble_http_request_duration_seconds_sum", method="POST") == \
        pytest.approx(20.0101)


def test_lost_events_count_by_source():
    m = Metrics()
    m.lost.labels("NFLOG").inc(3)
    m.lost.labels("NFLOG").inc()
    assert value(m.render().decode(), "hubble_lost_events_total", source="NFLOG") == 4


def test_the_server_answers_a_scrape_with_the_same_text():
    m, _ = star_wars_replay()
    server = m.serve("127.0.0.1:0")
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert value(body, "hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") == 4
    finally:
        server.close()


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:9962", ("127.0.0.1", 9962)),
    (":9962", ("127.0.0.1", 9962)),  # no host: loopback, never every interface
    ("9962", ("127.0.0.1", 9962)),
    ("10.0.0.1", ("10.0.0.1", 9965)),
    ("0.0.0.0:9962", ("0.0.0.0", 9962)),  # all interfaces only when written out
    ("[::1]:9962", ("::1", 9962)),
    ("[::]:9962", ("::", 9962)),
])
def test_metrics_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "::1:9962", "host.example:80", "1.2.3.4:http", "1.2.3.4:70000",
                                  "[::1]9962"])
def test_bad_metrics_addresses_are_refused(text):
    with pytest.raises(ValueError):
        parse_address(text)
