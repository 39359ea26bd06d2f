"""From api rules to compiled rules: selectors scoped (spec §1.4), peers and ports flattened.

A compiled rule keeps one `Entry` per (peer rule, port rule): the peer selectors, the port specs
and the L7 rules of that port rule, plus where it came from. Resolution (`repository`) only ever
reads these, never the api objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from proxy.policy import api, sanitize
from proxy.policy.endpoint import Service
from proxy.policy.labels import ANY as ANY_SOURCE
from proxy.policy.labels import (CLUSTER, K8S, NAMESPACE_LABELS, POD_NAMESPACE, RESERVED, Label,
                                 LabelSet, split_key)
from proxy.policy.selector import (EXISTS, IN, WILDCARD, EndpointSelector,
                                   FQDNSelector, NoneSelector, PeerSelector, Req, cidr_selector,
                                   entity_selectors, from_api)

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
KNP = "NetworkPolicy"

ALL = "ALL"  # an L3-only entry: every protocol and port, ICMP included (spec §6.3)
ANY_EXPANDS = ("TCP", "UDP", "SCTP")  # protocol ANY (or empty) never covers ICMP
ICMP_PROTO = {"IPv4": "ICMP", "IPv6": "ICMPv6"}


@dataclass(frozen=True)
class PortSpec:
    proto: str  # TCP | UDP | SCTP | VRRP | IGMP | ICMP | ICMPv6 | ALL
    lo: int = 0
    hi: int = 65535
    name: str = ""  # a named port, resolved against an endpoint's ports at lookup

    def covers(self, proto: str, port: int) -> bool:
        return (self.proto == ALL or self.proto == proto) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        if self.proto == ALL:
            return "any protocol/port"
        if self.name:
            return f"{self.name}/{self.proto}"
        if self.lo == 0 and self.hi == 65535:
            return f"0/{self.proto}"
        return f"{self.lo}/{self.proto}" if self.lo == self.hi else f"{self.lo}-{self.hi}/{self.proto}"


@dataclass(frozen=True)
class Origin:
    """Where an entry came from: what `trace` and flows name as responsible."""
    ref: api.PolicyRef
    path: str  # e.g. "specs[1].ingress[0].toPorts[0]"
    pos: api.Pos = (0, 0)
    log: str = ""

    def as_dict(self) -> dict:
        return {**self.ref.as_dict(), "rule": self.path}


@dataclass(frozen=True)
class Entry:
    direction: str  # ingress | egress
    deny: bool
    peers: tuple[PeerSelector, ...]  # () selects nothing
    ports: tuple[PortSpec, ...]
    origin: Origin
    l7_kind: str | None = None  # http | dns | kafka | l7proto | tls (serverNames)
    http: tuple[api.PortRuleHTTP, ...] = ()
    dns: tuple[api.PortRuleDNS, ...] = ()
    auth: bool = False  # authentication required (mutual auth): never given here, so dropped

    @property
    def l3_only(self) -> bool:
        return any(p.proto == ALL for p in self.ports)


@dataclass
class CompiledRule:
    subject: EndpointSelector
    host_policy: bool  # nodeSelector: applies to the host endpoint only
    origin: Origin
    entries: dict[str, list[Entry]] = field(default_factory=lambda: {"ingress": [], "egress": []})
    default_deny: dict[str, bool | None] = field(default_factory=dict)  # None: no entries that way

    def has_direction(self, direction: str) -> bool:
        return self.default_deny.get(direction) is not None


def _scoped_peer(sel: EndpointSelector, kind: str, namespace: str, cluster: str,
                 subject_is_init: bool) -> EndpointSelector:
    """§1.4: pin a CNP peer to its namespace, a CCNP peer to 'some namespace', add the cluster."""
    if sel.has_source(RESERVED):
        return sel
    ns_named = sel.has_key(POD_NAMESPACE) or sel.has_key_prefix(NAMESPACE_LABELS)
    if not ns_named:
        if kind == CNP:
            sel = sel.with_req(Req(K8S, POD_NAMESPACE, IN, frozenset([namespace])))
        elif kind == CCNP and not subject_is_init:
            sel = sel.with_req(Req(K8S, POD_NAMESPACE, EXISTS))
    if cluster and not sel.has_key(CLUSTER):
        sel = sel.with_req(Req(K8S, CLUSTER, IN, frozenset([cluster])))
    return sel


def _service_peers(services: list[api.Service], known: list[Service]) -> list[PeerSelector]:
    out: list[PeerSelector] = []
    for svc in services:
        for s in known:
            if svc.k8s_service is not None:
                ref = svc.k8s_service
                if ref.service_name != s.name or (ref.namespace and ref.namespace != s.namespace):
                    continue
            elif svc.k8s_service_selector is not None:
                ss = svc.k8s_service_selector
                if ss.namespace and ss.namespace != s.namespace:
                    continue
                svc_labels = LabelSet.of(Label(K8S, k, v) for k, v in s.labels.items())
                if not from_api(ss.selector).matches(svc_labels):
                    continue
            else:
                continue
            if s.selector is not None:
                reqs = [Req(*split_key(k, K8S), IN, frozenset([v])) for k, v in s.selector.items()]
                reqs.append(Req(K8S, POD_NAMESPACE, IN, frozenset([s.namespace])))
                out.append(EndpointSelector(tuple(reqs)))
            else:
                out += [cidr_selector(ip) for ip in s.ips]
    return out


def _peers(pr: api.PeerRule, kind: str, namespace: str, cluster: str, subject_is_init: bool,
           services: list[Service]) -> tuple[PeerSelector, ...] | None:
    """The peer selectors of one entry; None = no L3 constraint was written. An explicit `[]` in
    endpoints, CIDR, CIDR set, entities or nodes selects nothing, whatever else the entry names
    (spec §2.2; Cilium drops the entry's whole L3 then)."""
    if any(f is not None and not f for f in (pr.endpoints, pr.cidr, pr.cidr_set, pr.entities, pr.nodes)):
        return ()
    scope = lambda s: _scoped_peer(s, kind, namespace, cluster, subject_is_init)  # noqa: E731
    if pr.endpoints is not None:
        if kind == KNP:
            return tuple(_knp_peer(from_api(s), cluster) for s in pr.endpoints)
        return tuple(scope(from_api(s)) for s in pr.endpoints)
    if pr.cidr is not None:
        return tuple(cidr_selector(c) for c in pr.cidr)
    if pr.cidr_set is not None:
        out: list[PeerSelector] = []
        for c in pr.cidr_set:
            if c.cidr:
                out.append(cidr_selector(c.cidr, c.except_))
            else:
                out.append(NoneSelector("cidrGroup"))  # CiliumCIDRGroups do not exist outside k8s
        return tuple(out)
    if pr.entities is not None:
        return tuple(s for e in pr.entities for s in entity_selectors(e, cluster))
    if pr.nodes is not None:
        return tuple(_scoped_peer(from_api(s).with_req(Req(RESERVED, "remote-node", EXISTS)),
                                  "nodes", namespace, cluster, True) for s in pr.nodes)
    if pr.services is not None:
        return tuple(_service_peers(pr.services, services))
    if pr.groups is not None:
        return tuple(NoneSelector("group") for _ in pr.groups)
    if pr.fqdns:  # `toFQDNs: []` behaves like an absent field (spec §2.2 quirk)
        return tuple(FQDNSelector(f.match_pattern, True) if f.match_pattern is not None
                     else FQDNSelector(f.match_name or "", False) for f in pr.fqdns)
    return None


def _knp_peer(sel: EndpointSelector, cluster: str) -> EndpointSelector:
    if sel.is_wildcard or sel.has_source(RESERVED) or sel.has_key(CLUSTER):
        return sel
    return sel.with_req(Req(K8S, CLUSTER, IN, frozenset([cluster])))


def _port_specs(pp: api.PortProtocol) -> list[PortSpec]:
    proto = sanitize.normalize_protocol(pp.protocol)
    protos = ANY_EXPANDS if proto == "ANY" else (proto,)
    port = sanitize.parse_port(pp.port) if pp.port != "" else 0
    if isinstance(port, str):
        return [PortSpec(p, 0, 0, port) for p in protos]
    end = pp.end_port or 0
    if port == 0 and end in (0, 65535):  # spec §2.3: "0" alone is all ports, "0" to N a range
        lo, hi = 0, 65535
    else:
        lo, hi = port, max(port, end)
    return [PortSpec(p, lo, hi) for p in protos]


def _entries(pr: api.PeerRule, path: str, ref: api.PolicyRef, log: str, peers) -> list[Entry]:
    origin = Origin(ref, path, pr.pos, log)
    auth = (pr.authentication or {}).get("mode") in ("required", "test-always-fail")
    if pr.icmps:
        specs = []
        for rule in pr.icmps:
            for f in rule.fields:
                family = f.family or "IPv4"
                t = sanitize.icmp_type_number(family, f.type)
                specs.append(PortSpec(ICMP_PROTO[family], t, t))
        return [Entry(pr.direction, pr.deny, peers, tuple(specs), origin, auth=auth)]
    if not pr.to_ports:  # `toPorts: []` is no port constraint, as absent (Cilium counts them)
        if pr.endpoints is None and pr.cidr is None and pr.cidr_set is None and pr.entities is None \
                and pr.nodes is None and pr.services is None and pr.groups is None and not pr.fqdns:
            return []  # `ingress: [{}]`: makes the direction enforced, allows nothing
        return [Entry(pr.direction, pr.deny, peers, (PortSpec(ALL),), origin, auth=auth)]
    out = []
    for i, port_rule in enumerate(pr.to_ports):
        specs = tuple(s for pp in port_rule.ports for s in _port_specs(pp))
        if not specs:
            continue  # a PortRule with rules but no ports contributes nothing (spec §6.3)
        kind, http, dns = None, (), ()
        rules = port_rule.rules
        if rules is not None:  # an empty list of rules is no L7 enforcement (spec §2.3)
            if rules.http:
                kind, http = "http", tuple(rules.http)
            elif rules.dns:
                kind, dns = "dns", tuple(rules.dns)
            elif rules.kafka:
                kind = "kafka"
            elif rules.l7proto:
                kind = "l7proto"
        if kind is None and port_rule.server_names:
            kind = "tls"  # the SNI is checked by a TLS proxy (a later issue): closed until then
        sub = Origin(ref, f"{path}.toPorts[{i}]", port_rule.pos or pr.pos, log)
        out.append(Entry(pr.direction, pr.deny, peers, specs, sub, kind, http, dns, auth))
    return out


_LISTS = (("ingress", "ingress", False), ("ingressDeny", "ingress", True),
          ("egress", "egress", False), ("egressDeny", "egress", True))


def compile_rule(rule: api.Rule, path: str, ref: api.PolicyRef, services: list[Service],
                 cluster: str) -> CompiledRule:
    kind, namespace = ref.kind, ref.namespace or "default"
    host_policy = rule.node_selector is not None
    written = rule.node_selector if host_policy else rule.endpoint_selector or api.LabelSelector()
    if kind in (CNP, KNP) and not host_policy:
        # Cilium sets the k8s: namespace label in matchLabels (spec §1.4): a user value for that
        # key is overwritten; matchExpressions on it, and an `any:` namespace key, stay (ANDed)
        labels = {k: v for k, v in written.match_labels.items()
                  if split_key(k, ANY_SOURCE) != (K8S, POD_NAMESPACE)}
        written = replace(written, match_labels=labels)
        subject = from_api(written).with_req(Req(K8S, POD_NAMESPACE, IN, frozenset([namespace])))
    else:
        subject = from_api(written)
    subject_is_init = subject.has_key("init", sources=(RESERVED,))
    compiled = CompiledRule(subject, host_policy, Origin(ref, path, rule.pos, rule.log))
    for yaml_name, direction, deny in _LISTS:
        attr = {"ingressDeny": "ingress_deny", "egressDeny": "egress_deny"}.get(yaml_name, yaml_name)
        entries = getattr(rule, attr)
        if not entries:
            continue
        for i, pr in enumerate(entries):
            peers = _peers(pr, kind, namespace, cluster, subject_is_init, services)
            peers = (WILDCARD,) if peers is None else peers
            compiled.entries[direction] += _entries(pr, f"{path}.{yaml_name}[{i}]", ref, rule.log, peers)
        compiled.default_deny[direction] = True
    explicit = rule.enable_default_deny
    for direction in ("ingress", "egress"):
        setting = getattr(explicit, direction) if explicit else None
        if direction in compiled.default_deny and setting is not None:
            compiled.default_deny[direction] = setting
    return compiled


def compile_policy(policy: api.Policy, services: list[Service], cluster: str) -> list[CompiledRule]:
    many = len(policy.rules) > 1
    return [compile_rule(r, f"specs[{i}]" if many else "spec", policy.ref, services, cluster)
            for i, r in enumerate(policy.rules)]

