"""Kubernetes NetworkPolicy -> Cilium api rules (proxy.policy.knp), spec §1.3.

Each case is a NetworkPolicy `spec` (YAML, as the schema layer hands it over) and the expected
translation written compactly: entries as dicts of the PeerRule fields that are set, selectors as
{labels: {...}, exprs: [[key, op, [values]]]}, ports as [port, protocol, endPort]."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from proxy.policy import api
from proxy.policy.knp import translate
from proxy.policy.sanitize import sanitize_policy

NS = "k8s:io.kubernetes.pod.namespace"
NSL = "k8s:io.cilium.k8s.namespace.labels."


def _no_pos(path):
    return (0, 0)


def _sel(s: api.LabelSelector) -> dict:
    out = {"labels": dict(s.match_labels)}
    if s.match_expressions:
        out["exprs"] = [[r.key, r.operator, list(r.values)] for r in s.match_expressions]
    return out


def _entry(e: api.PeerRule) -> dict:
    out: dict = {}
    if e.endpoints is not None:
        out["endpoints"] = [_sel(s) for s in e.endpoints]
    if e.cidr_set is not None:
        out["cidr_set"] = [[c.cidr, list(c.except_)] for c in e.cidr_set]
    if e.entities is not None:
        out["entities"] = list(e.entities)
    if e.to_ports is not None:
        out["ports"] = [[p.port, p.protocol, p.end_port] for pr in e.to_ports for p in pr.ports]
        assert all(len(pr.ports) == 1 and pr.rules is None for pr in e.to_ports)
    for attr in ("cidr", "nodes", "groups", "services", "fqdns", "requires", "icmps"):
        assert getattr(e, attr) is None, attr
    assert e.deny is False
    return out


def _summary(policy: api.Policy) -> dict:
    [rule] = policy.rules
    for e in rule.ingress or []:
        assert e.direction == "ingress"
    for e in rule.egress or []:
        assert e.direction == "egress"
    assert rule.ingress_deny is None and rule.egress_deny is None and rule.node_selector is None
    return {
        "subject": _sel(rule.endpoint_selector),
        "ingress": None if rule.ingress is None else [_entry(e) for e in rule.ingress],
        "egress": None if rule.egress is None else [_entry(e) for e in rule.egress],
        "default_deny": [rule.enable_default_deny.ingress, rule.enable_default_deny.egress],
    }


CASES = [
    dict(
        name="sock-shop user-db-allow-from-user: pods of the same namespace on 27017",
        namespace="sock-shop",
        spec="""
            podSelector:
              matchLabels: {name: user-db}
            ingress:
            - from:
              - podSelector:
                  matchLabels: {name: user}
              ports:
              - {protocol: TCP, port: 27017}
        """,
        want={
            "subject": {"labels": {"k8s:name": "user-db", NS: "sock-shop"}},
            "ingress": [{"endpoints": [{"labels": {"k8s:name": "user", NS: "sock-shop"}}],
                         "ports": [["27017", "TCP", 0]]}],
            "egress": None,
            "default_deny": [True, None],
        }),
    dict(
        name="only podSelector means ingress deny-all",
        spec="podSelector: {matchLabels: {app: db}}",
        want={"subject": {"labels": {"k8s:app": "db", NS: "prod"}},
              "ingress": [{}], "egress": None, "default_deny": [True, None]}),
    dict(
        name="podSelector {} selects all pods of the namespace",
        spec="podSelector: {}\npolicyTypes: [Ingress]",
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{}], "egress": None, "default_deny": [True, None]}),
    dict(
        name="policyTypes Egress alone is egress deny-all only",
        spec="podSelector: {}\npolicyTypes: [Egress]",
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": None, "egress": [{}], "default_deny": [None, True]}),
    dict(
        name="both policyTypes without rules deny both directions",
        spec="podSelector: {}\npolicyTypes: [Ingress, Egress]",
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{}], "egress": [{}], "default_deny": [True, True]}),
    dict(
        name="egress rules apply and ingress is still defaulted to deny when policyTypes is absent",
        spec="""
            podSelector: {}
            egress:
            - to: [{ipBlock: {cidr: 10.0.0.0/8}}]
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{}],
              "egress": [{"cidr_set": [["10.0.0.0/8", []]]}],
              "default_deny": [True, True]}),
    dict(
        name="egress rules apply even when policyTypes lists only Ingress",
        spec="""
            podSelector: {}
            policyTypes: [Ingress]
            egress:
            - ports: [{port: 53, protocol: UDP}]
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{}],
              "egress": [{"entities": ["all"], "ports": [["53", "UDP", 0]]}],
              "default_deny": [True, True]}),
    dict(
        name="egress rules with policyTypes Egress add no ingress entry",
        spec="""
            podSelector: {}
            policyTypes: [Egress]
            egress:
            - to: [{podSelector: {}}]
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": None,
              "egress": [{"endpoints": [{"labels": {NS: "prod"}}]}],
              "default_deny": [None, True]}),
    dict(
        name="ingress rule without from or ports allows everything",
        spec="podSelector: {}\ningress: [{}]",
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{"entities": ["all"]}], "egress": None, "default_deny": [True, None]}),
    dict(
        name="an empty from list is a wildcard peer too, and ports apply to it",
        spec="""
            podSelector: {}
            ingress:
            - from: []
              ports: [{port: 80}]
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{"entities": ["all"], "ports": [["80", "TCP", 0]]}],
              "egress": None, "default_deny": [True, None]}),
    dict(
        name="namespaceSelector {} means any namespace, pods only",
        spec="""
            podSelector: {}
            ingress:
            - from: [{namespaceSelector: {}}]
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{"endpoints": [{"labels": {}, "exprs": [[NS, "Exists", []]]}]}],
              "egress": None, "default_deny": [True, None]}),
    dict(
        name="namespaceSelector keys become namespace-label keys and AND the unpinned pod selector",
        spec="""
            podSelector: {}
            ingress:
            - from:
              - namespaceSelector:
                  matchLabels: {team: blue}
                  matchExpressions: [{key: env, operator: In, values: [dev, qa]}]
                podSelector:
                  matchLabels: {app: client}
                  matchExpressions: [{key: tier, operator: Exists}]
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{"endpoints": [{
                  "labels": {NSL + "team": "blue", "k8s:app": "client"},
                  "exprs": [[NSL + "env", "In", ["dev", "qa"]], ["k8s:tier", "Exists", []]]}]}],
              "egress": None, "default_deny": [True, None]}),
    dict(
        name="each peer becomes its own entry carrying the rule's ports",
        spec="""
            podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [legacy]}]}
            ingress:
            - from:
              - podSelector: {matchLabels: {app: a}}
              - ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24, 192.168.2.0/24]}
              ports:
              - {port: 8080}
              - {port: 9090, protocol: SCTP}
        """,
        want={"subject": {"labels": {NS: "prod"}, "exprs": [["k8s:app", "NotIn", ["legacy"]]]},
              "ingress": [
                  {"endpoints": [{"labels": {"k8s:app": "a", NS: "prod"}}],
                   "ports": [["8080", "TCP", 0], ["9090", "SCTP", 0]]},
                  {"cidr_set": [["192.168.0.0/16", ["192.168.1.0/24", "192.168.2.0/24"]]],
                   "ports": [["8080", "TCP", 0], ["9090", "SCTP", 0]]}],
              "egress": None, "default_deny": [True, None]}),
    dict(
        name="ports: protocol defaults to TCP, no port means 0, names stay names, endPort is a range",
        spec="""
            podSelector: {}
            egress:
            - ports:
              - {protocol: UDP}
              - {}
              - {port: http, protocol: tcp}
              - {port: 32000, endPort: 32768}
              - {endPort: 99}
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{}],
              "egress": [{"entities": ["all"], "ports": [
                  ["0", "UDP", 0], ["0", "TCP", 0], ["http", "TCP", 0],
                  ["32000", "TCP", 32768], ["0", "TCP", 0]]}],
              "default_deny": [True, True]}),
    dict(
        name="several ingress rules keep their order",
        spec="""
            podSelector: {}
            ingress:
            - from: [{podSelector: {matchLabels: {app: a}}}]
            - from: [{podSelector: {matchLabels: {app: b}}}]
              ports: [{port: 443}]
        """,
        want={"subject": {"labels": {NS: "prod"}},
              "ingress": [{"endpoints": [{"labels": {"k8s:app": "a", NS: "prod"}}]},
                          {"endpoints": [{"labels": {"k8s:app": "b", NS: "prod"}}],
                           "ports": [["443", "TCP", 0]]}],
              "egress": None, "default_deny": [True, None]}),
    dict(
        name="an empty namespace in the ref means default",
        namespace="",
        spec="podSelector: {matchLabels: {app: web}}\ningress: [{from: [{podSelector: {}}]}]",
        want={"subject": {"labels": {"k8s:app": "web", NS: "default"}},
              "ingress": [{"endpoints": [{"labels": {NS: "default"}}]}],
              "egress": None, "default_deny": [True, None]}),
]


def _translate(case: dict, **kwargs) -> api.Policy:
    ref = api.PolicyRef("NetworkPolicy", case.get("namespace", "prod"), "np", "np.yaml")
    spec = yaml.safe_load(textwrap.dedent(case["spec"]))
    return translate(ref, spec, _no_pos, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_translation(case):
    assert _summary(_translate(case)) == case["want"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_translation_passes_the_agent_layer(case):
    """What we produce is something Cilium's own Validate() would accept."""
    assert sanitize_policy(_translate(case)) == []


def test_rule_labels_and_ref():
    policy = _translate(CASES[0])
    assert policy.ref == api.PolicyRef("NetworkPolicy", "sock-shop", "np", "np.yaml")
    assert [(lbl.source, lbl.key, lbl.value) for lbl in policy.rules[0].labels] == [
        ("k8s", "io.cilium.k8s.policy.derived-from", "NetworkPolicy"),
        ("k8s", "io.cilium.k8s.policy.name", "np"),
        ("k8s", "io.cilium.k8s.policy.namespace", "sock-shop"),
    ]


def test_default_namespace_label_when_ref_has_none():
    policy = _translate({"namespace": "", "spec": "podSelector: {}"})
    assert ("io.cilium.k8s.policy.namespace", "default") in [
        (lbl.key, lbl.value) for lbl in policy.rules[0].labels]


def test_each_peer_gets_its_own_port_objects():
    """Entries share no mutable objects: the engine may normalise one without touching another."""
    policy = _translate({"spec": """
        podSelector: {}
        ingress:
        - from: [{podSelector: {}}, {namespaceSelector: {}}]
          ports: [{port: 80}]
    """})
    first, second = policy.rules[0].ingress
    assert first.to_ports is not second.to_ports
    assert first.to_ports[0].ports[0] is not second.to_ports[0].ports[0]


def test_positions_come_from_pos_of():
    spec = yaml.safe_load(textwrap.dedent("""
        podSelector: {matchLabels: {app: db}}
        ingress:
        - from:
          - podSelector: {matchLabels: {app: api}}
          - ipBlock: {cidr: 10.0.0.0/8}
          ports: [{port: 5432}]
    """))
    where = {
        (): (1, 1), ("spec",): (6, 1), ("spec", "podSelector"): (7, 3),
        ("spec", "ingress", 0, "from", 0): (10, 7),
        ("spec", "ingress", 0, "from", 0, "podSelector"): (10, 9),
        ("spec", "ingress", 0, "from", 1): (11, 7),
        ("spec", "ingress", 0, "from", 1, "ipBlock"): (11, 9),
        ("spec", "ingress", 0, "ports", 0): (12, 14),
    }
    policy = translate(api.PolicyRef("NetworkPolicy", "prod", "np"), spec,
                       lambda path: where.get(path, (0, 0)))
    rule = policy.rules[0]
    pod_peer, cidr_peer = rule.ingress
    assert (policy.pos, rule.pos, rule.endpoint_selector.pos) == ((1, 1), (6, 1), (7, 3))
    assert (pod_peer.pos, pod_peer.endpoints[0].pos) == ((10, 7), (10, 9))
    assert (cidr_peer.pos, cidr_peer.cidr_set[0].pos) == ((11, 7), (11, 9))
    assert pod_peer.to_ports[0].ports[0].pos == (12, 14)


def test_pos_of_that_raises_for_unknown_paths_is_tolerated():
    def strict(path):
        return {("spec",): (3, 1)}[path]
    policy = translate(api.PolicyRef("NetworkPolicy", "prod", "np"),
                       {"podSelector": {}, "ingress": [{}]}, strict)
    assert policy.rules[0].pos == (3, 1)
    assert policy.rules[0].ingress[0].pos == (0, 0)


def test_cluster_pin_is_added_to_endpoint_peers_only_when_asked():
    case = {"spec": """
        podSelector: {}
        ingress:
        - from:
          - podSelector: {matchLabels: {app: a}}
          - namespaceSelector: {matchLabels: {"io.cilium.k8s.policy.cluster": other}}
            podSelector: {matchLabels: {"io.cilium.k8s.policy.cluster": other}}
          - ipBlock: {cidr: 10.0.0.0/8}
    """}
    plain = _summary(_translate(case))["ingress"]
    pinned = _summary(_translate(case, cluster="default"))["ingress"]
    assert "k8s:io.cilium.k8s.policy.cluster" not in plain[0]["endpoints"][0]["labels"]
    assert pinned[0]["endpoints"][0]["labels"]["k8s:io.cilium.k8s.policy.cluster"] == "default"
    assert pinned[1] == plain[1]  # already names the cluster key
    assert pinned[2] == plain[2]  # CIDR peers are never pinned
