"""The agent's oracle caches HTTP results per request key and DNS results per server and name:
every request gets the verdict the uncached matcher gives, whatever was asked before it."""
from __future__ import annotations

import itertools

from proxy.agent.oracle import EngineOracle, _result
from proxy.policy.httpmatch import HTTPRequest
from test_http_proxy import ORACLE, PEERS

METHODS = ["GET", "HEAD", "POST", "get"]
PATHS = ["/secure", "/v1/x", "/public?a=1", "/ws", "/upload", "/v1/"]
HOSTS = [None, "deathstar", "deathstar:8080", "other"]
HEADERS = [(), (("X-Token", "s3cret"),), (("x-token", "wrong"),), (("X-Token", "s3cret"), ("X-Other", "1")),
           (("User-Agent", "a"),)]


def requests() -> list[HTTPRequest]:
    return [HTTPRequest(m, p, h, hd) for m, p, h, hd in itertools.product(METHODS, PATHS, HOSTS, HEADERS)]


def uncached(oracle: EngineOracle, peer: str, port: int, request: HTTPRequest):
    d = oracle._decision("ingress", peer, "TCP", port)
    return _result(oracle._checker(d.l7).verdict(request), "HTTP")


def test_cached_results_equal_fresh_ones_in_any_order():
    reqs = requests()
    seen = set()
    for order in (reqs, list(reversed(reqs))):
        ORACLE.forget()
        for peer, port in ((PEERS["tiefighter"], 8080), (PEERS["tiefighter"], 80)):
            for req in order:
                got = ORACLE.http_verdict("ingress", peer, port, req)
                assert got == uncached(ORACLE, peer, port, req), (port, req)
                seen.add(got.allowed)
    assert seen == {True, False}


def test_the_key_names_what_the_rules_read():
    d = ORACLE._decision("ingress", PEERS["tiefighter"], "TCP", 8080)
    checker = ORACLE._checker(d.l7)
    assert checker.header_names == ("x-token",)
    a = HTTPRequest("GET", "/secure", "deathstar", (("X-Token", "s3cret"), ("User-Agent", "a")))
    b = HTTPRequest("GET", "/secure", "deathstar", (("x-token", "s3cret"), ("User-Agent", "b")))
    c = HTTPRequest("GET", "/secure", "deathstar", (("X-Token", "other"),))
    assert checker.request_key(a) == checker.request_key(b) != checker.request_key(c)


def test_dns_results_are_cached_per_server_protocol_and_name_and_dropped_with_the_engine():
    from test_dns_proxy import KUBE_DNS, make_oracle

    names = ["api.github.com", "API.GitHub.com", "github.com", "support.github.com", "cilium.io"] * 2
    oracle = make_oracle(["tests/data/agent/dns-rules-github.yaml"])  # *.github.com only
    other = make_oracle(["policies/dns/matchname.yaml"])  # any name
    for name in names:
        got = oracle.dns_verdict(KUBE_DNS.ip, KUBE_DNS.port, KUBE_DNS.proto, name)
        assert got == oracle._dns_verdict(KUBE_DNS.ip, KUBE_DNS.port, KUBE_DNS.proto, name), name
        assert got is oracle.dns_verdict(KUBE_DNS.ip, KUBE_DNS.port, KUBE_DNS.proto, name), "cached"
    allowed = {n: oracle.dns_verdict(KUBE_DNS.ip, KUBE_DNS.port, KUBE_DNS.proto, n).allowed for n in names}
    assert set(allowed.values()) == {True, False}
    oracle.engine = other.engine  # a policy change: nothing cached survives it
    for name in names:
        assert oracle.dns_verdict(KUBE_DNS.ip, KUBE_DNS.port, KUBE_DNS.proto, name) == \
            other.dns_verdict(KUBE_DNS.ip, KUBE_DNS.port, KUBE_DNS.proto, name)
    assert {n: oracle.dns_verdict(KUBE_DNS.ip, KUBE_DNS.port, KUBE_DNS.proto, n).allowed for n in names} != allowed


def test_results_of_long_requests_are_checked_but_not_remembered():
    """The client chooses the path: a cache of 65536 paths of 64 KB each would hold 4 GB."""
    ORACLE.forget()
    peer = PEERS["tiefighter"]
    pad = "a" * ORACLE.MAX_KEY_CHARS
    verdicts = []
    for path in ("/public?" + pad, "/secure" + pad, "/public?" + pad):
        request = HTTPRequest("GET", path, "deathstar", ())
        got = ORACLE.http_verdict("ingress", peer, 8080, request)
        assert got == uncached(ORACLE, peer, 8080, request)
        verdicts.append(got.allowed)
    assert verdicts == [True, False, True] and ORACLE._http == {}
    ORACLE.http_verdict("ingress", peer, 8080, HTTPRequest("GET", "/public", "deathstar", ()))
    assert len(ORACLE._http) == 1, "short ones are"
