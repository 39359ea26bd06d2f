"""Kubernetes NetworkPolicy (networking.k8s.io/v1) -> Cilium api rules, as Cilium's
`ParseNetworkPolicy` does it (spec §1.3).

What it does
  `translate(ref, spec, pos_of)` turns the schema-validated `spec` mapping of a NetworkPolicy into
  one `api.Rule` inside an `api.Policy`:
  * subject = `podSelector` with `k8s:`-prefixed keys plus `k8s:io.kubernetes.pod.namespace=<ns>`
    (ns from the ref, "default" when empty);
  * every peer of every ingress/egress rule becomes its own `api.PeerRule`, carrying that rule's
    ports: podSelector only -> selector + namespace pin; namespaceSelector (± podSelector) ->
    namespace keys rewritten to `k8s:io.cilium.k8s.namespace.labels.<key>`, ANDed with the pod
    selector, `namespaceSelector: {}` -> `k8s:io.kubernetes.pod.namespace Exists`; ipBlock ->
    `api.CIDRRule(cidr, except_)`;
  * a rule whose `from`/`to` is missing or empty gets one peer `entities: ["all"]` (Cilium uses
    the wildcard endpoint selector; the entity says the same and cannot be caught by the namespace
    scoping that the engine applies to CNP/CCNP peers);
  * ports: protocol default TCP (upper-cased), absent port -> "0", a string port is a named port
    (kept as written), `endPort` -> range;
  * policyTypes defaulting of Cilium's code (not the API server's): no ingress entries and
    (Ingress listed or Egress not listed) -> one ingress default-deny entry
    `PeerRule(direction="ingress")` (no peer, no ports: allows nothing, enforces the direction);
    no egress entries and Egress listed -> one egress default-deny entry; rules that are present
    apply even if policyTypes omits their direction;
  * `enable_default_deny` is True for each direction that has entries (None otherwise), and the
    rule labels are derived-from=NetworkPolicy, name, namespace (source `k8s`).

What it never does
  It never validates (the schema layer did; the agent layer is `sanitize`), never reads files or
  metadata beyond the ref, never resolves selectors or named ports, and never adds the
  `io.cilium.k8s.policy.cluster` pin unless asked (`cluster=`), since the registry decides whether
  endpoints carry that label. The `policy.cilium.io/name` annotation override and the uid label are
  not applied (the ref carries neither).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from . import api

__all__ = ["translate", "NAMESPACE_LABEL", "NAMESPACE_LABELS_PREFIX", "CLUSTER_LABEL"]

NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "k8s:io.cilium.k8s.namespace.labels."
CLUSTER_LABEL = "k8s:io.cilium.k8s.policy.cluster"
LABEL_DERIVED_FROM = "io.cilium.k8s.policy.derived-from"
LABEL_NAME = "io.cilium.k8s.policy.name"
LABEL_NAMESPACE = "io.cilium.k8s.policy.namespace"

PosOf = Callable[[tuple], api.Pos]


def translate(ref: api.PolicyRef, spec: Mapping, pos_of: PosOf, *,
              cluster: str | None = None) -> api.Policy:
    """The Cilium api form of one NetworkPolicy.

    `spec` is the schema-validated `spec` mapping (camelCase keys as in YAML); `pos_of(path)`
    returns the (line, column) of a path such as `("spec", "ingress", 0)`, or (0, 0).
    `cluster`, when given, pins every endpoint peer to that cluster as Cilium 1.19 does with
    `policy-default-local-cluster` (unless the peer already names the cluster key).
    """
    t = _Translator(ref, pos_of, cluster)
    return t.policy(spec)


class _Translator:
    def __init__(self, ref: api.PolicyRef, pos_of: PosOf, cluster: str | None):
        self.ref = ref
        self.namespace = ref.namespace or "default"
        self._pos_of = pos_of
        self.cluster = cluster

    def pos(self, *path) -> api.Pos:
        try:
            p = self._pos_of(tuple(path))
        except (KeyError, IndexError, TypeError):
            return (0, 0)
        return tuple(p) if p else (0, 0)

    def policy(self, spec: Mapping) -> api.Policy:
        policy_types = list(spec.get("policyTypes") or [])
        ingress = [peer for i, r in enumerate(spec.get("ingress") or [])
                   for peer in self.rule_entries("ingress", i, r)]
        egress = [peer for i, r in enumerate(spec.get("egress") or [])
                  for peer in self.rule_entries("egress", i, r)]

        deny_pos = self.pos("spec", "policyTypes") if "policyTypes" in spec else self.pos("spec")
        if not ingress and ("Ingress" in policy_types or "Egress" not in policy_types):
            ingress = [api.PeerRule(direction="ingress", pos=deny_pos)]
        if not egress and "Egress" in policy_types:
            egress = [api.PeerRule(direction="egress", pos=deny_pos)]

        subject_pos = self.pos("spec", "podSelector")
        subject = self.pod_selector(spec.get("podSelector") or {}, subject_pos)
        rule = api.Rule(
            endpoint_selector=subject,
            ingress=ingress or None,
            egress=egress or None,
            labels=[
                api.RuleLabel(LABEL_DERIVED_FROM, "NetworkPolicy", "k8s"),
                api.RuleLabel(LABEL_NAME, self.ref.name, "k8s"),
                api.RuleLabel(LABEL_NAMESPACE, self.namespace, "k8s"),
            ],
            enable_default_deny=api.DefaultDeny(ingress=True if ingress else None,
                                                egress=True if egress else None),
            pos=self.pos("spec"),
        )
        return api.Policy(ref=self.ref, rules=[rule], pos=self.pos())

    # -- one ingress/egress rule -> one PeerRule per peer ----------------------------------------

    def rule_entries(self, direction: str, index: int, rule: Mapping) -> list[api.PeerRule]:
        peers_key = "from" if direction == "ingress" else "to"
        base = ("spec", direction, index)
        peers = rule.get(peers_key) or []
        ports = rule.get("ports") or []
        entries: list[api.PeerRule] = []
        if peers:
            for j, peer in enumerate(peers):
                entry = api.PeerRule(direction=direction, pos=self.pos(*base, peers_key, j))
                self.fill_peer(entry, peer, (*base, peers_key, j))
                entries.append(entry)
        else:
            entries.append(api.PeerRule(direction=direction, entities=["all"],
                                        pos=self.pos(*base)))
        if ports:
            for entry in entries:  # a fresh copy per peer: the api objects are mutable
                entry.to_ports = [self.port_rule(p, (*base, "ports", k))
                                  for k, p in enumerate(ports)]
        return entries

    def fill_peer(self, entry: api.PeerRule, peer: Mapping, path: tuple) -> None:
        pod_sel = peer.get("podSelector")
        ns_sel = peer.get("namespaceSelector")
        if ns_sel is not None:
            sel = self.namespace_selector(ns_sel, pod_sel, self.pos(*path, "namespaceSelector"))
            entry.endpoints = [self.pin_cluster(sel)]
        elif pod_sel is not None:
            sel = self.pod_selector(pod_sel, self.pos(*path, "podSelector"))
            entry.endpoints = [self.pin_cluster(sel)]
        block = peer.get("ipBlock")
        if block is not None:
            entry.cidr_set = [api.CIDRRule(cidr=block.get("cidr"),
                                           except_=list(block.get("except") or []),
                                           pos=self.pos(*path, "ipBlock"))]

    # -- selectors ---------------------------------------------------------------------------

    @staticmethod
    def _requirements(sel: Mapping, prefix: str) -> list[api.Requirement]:
        return [api.Requirement(key=prefix + e["key"], operator=e["operator"],
                                values=list(e.get("values") or []))
                for e in sel.get("matchExpressions") or []]

    def pod_selector(self, sel: Mapping, pos: api.Pos) -> api.LabelSelector:
        """parsePodSelector: the pod selector pinned to the policy's namespace."""
        labels = {f"k8s:{k}": str(v) for k, v in (sel.get("matchLabels") or {}).items()}
        labels[NAMESPACE_LABEL] = self.namespace
        return api.LabelSelector(match_labels=labels,
                                 match_expressions=self._requirements(sel, "k8s:"), pos=pos)

    def namespace_selector(self, ns_sel: Mapping, pod_sel: Mapping | None,
                           pos: api.Pos) -> api.LabelSelector:
        """Namespace keys rewritten to namespace-label keys, ANDed with the (unpinned) pods."""
        labels = {NAMESPACE_LABELS_PREFIX + k: str(v)
                  for k, v in (ns_sel.get("matchLabels") or {}).items()}
        exprs = self._requirements(ns_sel, NAMESPACE_LABELS_PREFIX)
        if not labels and not exprs:  # namespaceSelector: {} = any namespace, pods only
            exprs = [api.Requirement(key=NAMESPACE_LABEL, operator="Exists")]
        if pod_sel is not None:
            labels.update({f"k8s:{k}": str(v)
                           for k, v in (pod_sel.get("matchLabels") or {}).items()})
            exprs += self._requirements(pod_sel, "k8s:")
        return api.LabelSelector(match_labels=labels, match_expressions=exprs, pos=pos)

    def pin_cluster(self, sel: api.LabelSelector) -> api.LabelSelector:
        if self.cluster is None:
            return sel
        keys = set(sel.match_labels) | {r.key for r in sel.match_expressions}
        if CLUSTER_LABEL in keys or "any:io.cilium.k8s.policy.cluster" in keys:
            return sel
        sel.match_labels[CLUSTER_LABEL] = self.cluster
        return sel

    # -- ports -------------------------------------------------------------------------------

    def port_rule(self, port: Mapping, path: tuple) -> api.PortRule:
        """parsePorts: one PortRule per `ports` entry."""
        protocol = str(port.get("protocol") or "TCP").upper()
        value = port.get("port")
        end_port = 0
        if value is None:
            text = "0"
        else:
            text = str(value)
            if port.get("endPort") is not None:
                end_port = int(port["endPort"])
        pos = self.pos(*path)
        return api.PortRule(ports=[api.PortProtocol(port=text, protocol=protocol,
                                                    end_port=end_port, pos=pos)], pos=pos)
