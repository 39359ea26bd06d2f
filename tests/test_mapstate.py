"""The flattened PolicyMap agrees with the lookup it was made from, port by port."""
import random

import pytest

from proxy.policy.endpoint import endpoint_from_dict
from proxy.policy.engine import Engine
from proxy.policy.load import load_paths
from proxy.policy.mapstate import ALLOW, DENY, PORT_MAX, PROTOCOLS, REDIRECT, default_verdict, flatten, verdict_of

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
    - ports: [{port: "8000", endPort: 8100, protocol: ANY}]
  - fromEndpoints: [{matchLabels: {app: admin}}]
  - toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - fromCIDR: [192.0.2.0/24]
    icmps: [{fields: [{type: 8}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: admin}}]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "8050", protocol: UDP}]}]
"""
ENDPOINTS = [{"name": n, "labels": {"app": n}, "ips": [ip]} for n, ip in
             (("api", "10.0.0.2"), ("web", "10.0.0.1"), ("admin", "10.0.0.3"), ("other", "10.0.0.4"))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("p")
    (d / "p.yaml").write_text(POLICY)
    engine = Engine(load_paths([str(d)]).policies, [endpoint_from_dict(e, "t") for e in ENDPOINTS])
    peers = [engine.peer(n) for n in ("web", "admin", "other", "ip:192.0.2.9", "entity:world")]
    dp = engine.policy_of(engine.peer("api")).ingress
    return dp, peers


def lookup_flat(entries, default, ident, proto, port):
    for e in entries:
        if e.identity == ident and e.proto == proto and e.lo <= port <= e.hi:
            return e.verdict
    return default


def test_flattened_map_agrees_with_lookup(setup):
    dp, peers = setup
    entries = flatten(dp, [p.identity for p in peers])
    default = default_verdict(dp)
    rng = random.Random(1)
    probes = [22, 79, 80, 81, 443, 7999, 8000, 8049, 8050, 8051, 8100, 8101, 0, 65535, 8]
    probes += [rng.randrange(65536) for _ in range(200)]
    for p in peers:
        for proto in PROTOCOLS:
            for port in probes:
                if port > PORT_MAX.get(proto, 65535):
                    continue
                want = verdict_of(dp.lookup(p.identity, proto, port))
                got = lookup_flat(entries, default, p.identity.id, proto, port)
                assert got == want, (p.name, proto, port)


def test_entries_are_disjoint_and_non_default(setup):
    dp, peers = setup
    entries = flatten(dp, [p.identity for p in peers])
    default = default_verdict(dp)
    seen = {}
    for e in entries:
        assert e.verdict != default or e.verdict == REDIRECT or e.drop_reason == "POLICY_DENY"
        for other in seen.get((e.identity, e.proto), []):
            assert e.hi < other.lo or e.lo > other.hi
        seen.setdefault((e.identity, e.proto), []).append(e)


def test_expected_shapes(setup):
    dp, peers = setup
    web, admin, other, cidr, world = (p.identity.id for p in peers)
    entries = flatten(dp, [p.identity for p in peers])
    by = {(e.identity, e.proto, e.lo, e.hi): e.verdict for e in entries}
    assert by[(web, "TCP", 80, 80)] == REDIRECT
    assert by[(web, "TCP", 443, 443)] == ALLOW
    assert by[(web, "UDP", 8000, 8049)] == ALLOW
    assert by[(web, "UDP", 8050, 8050)] == DENY  # an explicit deny is emitted, to log POLICY_DENY
    assert by[(admin, "TCP", 0, 21)] == ALLOW and by[(admin, "TCP", 23, 65535)] == ALLOW
    assert by[(admin, "ICMP", 0, 255)] == ALLOW
    assert by[(admin, "OTHER", 0, 0)] == ALLOW, "an L3 allow covers every IP protocol (GRE...)"
    assert (web, "OTHER", 0, 0) not in by and (cidr, "OTHER", 0, 0) not in by, "ports do not"
    assert by[(cidr, "ICMP", 8, 8)] == ALLOW
    assert (world, "ICMP", 8, 8) not in by
    assert by[(other, "TCP", 443, 443)] == ALLOW
    assert {v for (i, p, lo, hi), v in by.items() if i == other and p == "TCP"} == {ALLOW}
