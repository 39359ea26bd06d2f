"""Peer and subject selectors (spec §4.2-§4.3, §2.2 CIDR, §5 entities, §9.4 toFQDNs).

Every selector answers `selects(identity)` and has a `key` (a canonical string) so equal selectors
written in different rules are merged, as Cilium's SelectorCache does.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

from proxy.fqdn import matchpattern
from proxy.policy import api
from proxy.policy.identity import IPNet, Identity
from proxy.policy.labels import ANY, CLUSTER, FQDN, K8S, RESERVED, Label, LabelSet, split_key

IN, NOT_IN, EXISTS, DOES_NOT_EXIST = "In", "NotIn", "Exists", "DoesNotExist"


@dataclass(frozen=True)
class Req:
    """One requirement on a (source, key): `In`/`NotIn` a set of values, `Exists`/`DoesNotExist`."""
    source: str
    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: LabelSet) -> bool:
        per_source = labels.by_key.get(self.key)
        if self.source == ANY:
            present = list(per_source.values()) if per_source else []
        else:
            value = per_source.get(self.source) if per_source else None
            present = [] if value is None else [value]
        if self.op == IN:
            return any(v in self.values for v in present)
        if self.op == NOT_IN:
            return not any(v in self.values for v in present)
        if self.op == EXISTS:
            return bool(present)
        return not present

    def text(self) -> str:
        name = f"{self.source}:{self.key}"
        if self.op == IN and len(self.values) == 1:
            return f"{name}={next(iter(self.values))}"
        if self.op in (IN, NOT_IN):
            return f"{name} {self.op} ({','.join(sorted(self.values))})"
        return f"{name} {self.op}"


@dataclass(frozen=True)
class EndpointSelector:
    """An ANDed list of requirements; no requirements = selects everything."""
    reqs: tuple[Req, ...]
    key: str = field(init=False, compare=False)
    _eq_any: frozenset = field(init=False, compare=False, repr=False)
    _eq_src: frozenset = field(init=False, compare=False, repr=False)
    _rest: tuple = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        reqs = tuple(sorted(set(self.reqs), key=lambda r: (r.source, r.key, r.op, sorted(r.values))))
        object.__setattr__(self, "reqs", reqs)
        eq_any, eq_src, rest = set(), set(), []
        for r in reqs:
            if r.op == IN and len(r.values) == 1:
                (v,) = r.values
                if r.source == ANY:
                    eq_any.add((r.key, v))
                else:
                    eq_src.add((r.source, r.key, v))
            else:
                rest.append(r)
        object.__setattr__(self, "_eq_any", frozenset(eq_any))
        object.__setattr__(self, "_eq_src", frozenset(eq_src))
        object.__setattr__(self, "_rest", tuple(rest))
        object.__setattr__(self, "key", self._canonical())

    def _canonical(self) -> str:
        ml = {f"{r.source}:{r.key}": next(iter(r.values)) for r in self.reqs
              if r.op == IN and len(r.values) == 1}
        me = [{"key": f"{r.source}:{r.key}", "operator": r.op, "values": sorted(r.values)}
              for r in self.reqs if not (r.op == IN and len(r.values) == 1)]
        body = {}
        if ml:
            body["matchLabels"] = dict(sorted(ml.items()))
        if me:
            body["matchExpressions"] = me
        return json.dumps(body, separators=(",", ":"))

    @property
    def is_wildcard(self) -> bool:
        return not self.reqs

    def has_key(self, key: str, sources=(K8S, ANY)) -> bool:
        return any(r.key == key and r.source in sources for r in self.reqs)

    def has_key_prefix(self, prefix: str, sources=(K8S, ANY)) -> bool:
        return any(r.key.startswith(prefix) and r.source in sources for r in self.reqs)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.reqs)

    def with_req(self, req: Req) -> "EndpointSelector":
        return EndpointSelector(self.reqs + (req,))

    def selects(self, identity: Identity) -> bool:
        return self.matches(identity.labels)

    def matches(self, labels: LabelSet) -> bool:
        if not (self._eq_any <= labels.kv and self._eq_src <= labels.skv):
            return False
        for r in self._rest:
            if not r.matches(labels):
                return False
        return True

    def __str__(self) -> str:
        return self.key


def from_api(sel: api.LabelSelector) -> EndpointSelector:
    """Key conversion of §4.2: `src:key` keeps its source, a bare key gets source `any`."""
    reqs = []
    for k, v in sel.match_labels.items():
        source, key = split_key(k, ANY)
        reqs.append(Req(source, key, IN, frozenset([str(v) if v is not None else ""])))
    for e in sel.match_expressions:
        source, key = split_key(e.key, ANY)
        reqs.append(Req(source, key, e.operator, frozenset(e.values or [])))
    return EndpointSelector(tuple(reqs))


def labels_selector(labels: dict[str, str], default_source: str = ANY) -> EndpointSelector:
    return EndpointSelector(tuple(
        Req(*split_key(k, default_source), IN, frozenset([v])) for k, v in labels.items()))


WILDCARD = EndpointSelector(())


def _reserved(name: str) -> EndpointSelector:
    return EndpointSelector((Req(RESERVED, name, EXISTS),))


def entity_selectors(entity: str, cluster: str) -> list[EndpointSelector]:
    """§5: what each entity selects. Never namespace-scoped."""
    if entity == "all":
        return [WILDCARD]
    if entity == "world":
        return [_reserved("world"), _reserved("world-ipv4"), _reserved("world-ipv6")]
    if entity == "cluster":
        names = ["host", "remote-node", "init", "ingress", "health", "unmanaged", "kube-apiserver"]
        return [_reserved(n) for n in names] + [
            EndpointSelector((Req(K8S, CLUSTER, IN, frozenset([cluster])),))]
    return [_reserved(entity)]  # host, remote-node, kube-apiserver, ingress, init, health, unmanaged, none, world-ipv4/6


@dataclass(frozen=True)
class CIDRSelector:
    """`toCIDR`/`toCIDRSet`/`ipBlock`: prefix containment over IP-derived identities only."""
    net: IPNet
    excepts: tuple[IPNet, ...] = ()
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        ex = "".join(f" except {e}" for e in self.excepts)
        object.__setattr__(self, "key", f"cidr:{self.net}{ex}")

    def selects(self, identity: Identity) -> bool:
        nets = identity.nets
        if not nets:
            # Plain world stands for every address: only a /0 of a matching family covers it.
            name = identity.reserved_name
            if self.net.prefixlen != 0 or self.excepts:
                return False
            return (name == "world" or (name == "world-ipv4" and self.net.version == 4)
                    or (name == "world-ipv6" and self.net.version == 6))
        v = self.net.version
        if not any(n.version == v and n.subnet_of(self.net) for n in nets):
            return False
        return not any(n.version == e.version and n.subnet_of(e) for n in nets for e in self.excepts)

    def __str__(self) -> str:
        return self.key


def cidr_selector(cidr: str, excepts: list[str] | None = None) -> CIDRSelector:
    net = ipaddress.ip_network(cidr.strip(), strict=False)
    ex = tuple(ipaddress.ip_network(e.strip(), strict=False) for e in (excepts or []))
    return CIDRSelector(net, ex)


@dataclass(frozen=True)
class FQDNSelector:
    """`toFQDNs`: selects IP identities whose cached names match (spec §9.4)."""
    text: str  # the matchName or matchPattern as written
    is_pattern: bool
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        kind = "matchPattern" if self.is_pattern else "matchName"
        object.__setattr__(self, "key", f"fqdn:{kind}={self.text}")

    def matcher(self):
        if self.is_pattern:
            return matchpattern.compile_pattern(self.text)
        return matchpattern.compile_name(self.text)

    @property
    def label(self) -> Label:
        """The `fqdn:` label an IP identity carries when this selector matches one of its names."""
        return Label(FQDN, self.text)

    def selects(self, identity: Identity) -> bool:
        return identity.labels.get(FQDN, self.text) is not None

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class NoneSelector:
    """Selects nothing: CIDR groups, AWS groups (no source of truth outside Kubernetes)."""
    why: str
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"none:{self.why}")

    def selects(self, identity: Identity) -> bool:
        return False

    def __str__(self) -> str:
        return self.key


PeerSelector = EndpointSelector | CIDRSelector | FQDNSelector | NoneSelector
