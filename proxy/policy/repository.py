"""The policy repository: which rules select an endpoint, and its resolved policy (spec §6-§7).

`Repository.resolve(identity)` gives an `EndpointPolicy`: per direction, the enforcement mode and
the entries that apply. `DirectionPolicy.lookup(peer, proto, port)` is the PolicyMap lookup: deny
over L7 redirect over plain allow, default deny when enforced. Decisions are memoized per
(peer identity, protocol, port), so a repeated lookup is one dict hit, like a BPF map lookup.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from proxy.policy import api
from proxy.policy.endpoint import Service
from proxy.policy.identity import Identity
from proxy.policy.labels import DEFAULT_CLUSTER, RESERVED
from proxy.policy.rule import ALL, CompiledRule, Entry, Origin, PortSpec, compile_policy
from proxy.policy.selector import EXISTS, EndpointSelector, Req

POLICY_DENIED = "POLICY_DENIED"  # 133: default deny
POLICY_DENY = "POLICY_DENY"  # 181: an explicit deny rule
AUTH_REQUIRED = "AUTH_REQUIRED"  # 189: allowed only once mutually authenticated, never here
UNCHECKED_L7 = frozenset({"kafka", "l7proto", "tls"})  # L7 rules no l7gate proxy checks: the
# traffic they would let through is dropped (fail closed) unless an allow without L7 covers it

OFF, DEFAULT_DENY, DEFAULT_ALLOW = "off", "default-deny", "default-allow"

_HOST = EndpointSelector((Req(RESERVED, "host", EXISTS),))
_LOCALHOST = Origin(api.PolicyRef("reserved", "", "allow-localhost"), "allow-localhost")


@dataclass
class Options:
    """Agent options that change resolution (Cilium flag names in comments)."""
    enforcement: str = "default"  # --enable-policy: default | always | never
    allow_localhost: bool = True  # --allow-localhost=always in Kubernetes mode (spec §6.2)
    cluster: str = DEFAULT_CLUSTER  # --cluster-name; peers get it since 1.19


@dataclass(frozen=True)
class L7Policy:
    """What the proxy enforces for one (peer, port): rules per selector, None = allow every request."""
    kind: str  # http | dns | kafka | l7proto
    allow_all: bool
    http: tuple[tuple[api.PortRuleHTTP, Origin], ...] = ()
    dns: tuple[tuple[api.PortRuleDNS, Origin], ...] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    enforced: bool
    drop_reason: str | None = None
    deciders: tuple[Origin, ...] = ()  # the entries (or rules) that decided
    l7: L7Policy | None = None  # set when the traffic is redirected to a proxy

    @property
    def redirect(self) -> bool:
        return self.l7 is not None


@dataclass
class DirectionPolicy:
    direction: str
    mode: str  # off | default-deny | default-allow
    entries: list[Entry]
    rules: list[CompiledRule]  # the selecting rules that have entries this way
    own_ports: dict[str, int] = field(default_factory=dict)  # named ports, for ingress
    peer_ports: dict[int, dict[str, int]] = field(default_factory=dict)  # for egress
    _memo: dict = field(default_factory=dict, repr=False)
    _by_peer: dict = field(default_factory=dict, repr=False)

    @property
    def enforced(self) -> bool:
        return self.mode != OFF

    def entries_for(self, peer: Identity) -> list[tuple[Entry, tuple[PortSpec, ...]]]:
        """The entries whose selectors select `peer`, named ports resolved for this pair."""
        found = self._by_peer.get(peer.id)
        if found is None:
            named = self.own_ports if self.direction == "ingress" else self.peer_ports.get(peer.id, {})
            found = []
            for e in self.entries:
                if any(s.selects(peer) for s in e.peers):
                    specs = tuple(_resolve_named(p, named) for p in e.ports)
                    found.append((e, tuple(p for p in specs if p is not None)))
            self._by_peer[peer.id] = found
        return found

    def lookup(self, peer: Identity, proto: str, port: int) -> Decision:
        key = (peer.id, proto, port)
        d = self._memo.get(key)
        if d is None:
            d = self._memo[key] = self._decide(peer, proto, port)
        return d

    def _decide(self, peer: Identity, proto: str, port: int) -> Decision:
        if self.mode == OFF:
            return Decision(True, False)
        hits = [e for e, specs in self.entries_for(peer) if any(s.covers(proto, port) for s in specs)]
        denies = [e for e in hits if e.deny]
        if denies:
            return Decision(False, True, POLICY_DENY, tuple(e.origin for e in denies))
        allows = [e for e in hits if not e.deny]
        needs_auth = [e.origin for e in allows if e.auth]
        if needs_auth:  # one allow that needs it makes the entry need it (spec §2.3)
            return Decision(False, True, AUTH_REQUIRED, tuple(needs_auth))
        if not allows:
            if self.mode == DEFAULT_ALLOW:
                return Decision(True, True, deciders=tuple(r.origin for r in self.rules))
            return Decision(False, True, POLICY_DENIED, tuple(r.origin for r in self.rules))
        return Decision(True, True, deciders=tuple(e.origin for e in allows),
                        l7=_merge_l7(allows, self.mode == DEFAULT_ALLOW))


def _resolve_named(spec: PortSpec, named: dict[str, int]) -> PortSpec | None:
    if not spec.name:
        return spec
    port = named.get(spec.name)
    return PortSpec(spec.proto, port, port) if port else None


def _merge_l7(allows: list[Entry], wildcard: bool) -> L7Policy | None:
    """§7: redirect if any allow carries L7; an L7-less allow on the same peer allows everything."""
    with_l7 = [e for e in allows if e.l7_kind]
    if not with_l7:
        return None
    kind = with_l7[0].l7_kind
    allow_all = wildcard or any(not e.l7_kind for e in allows)
    http = tuple((r, e.origin) for e in with_l7 if e.l7_kind == "http" for r in e.http)
    dns = tuple((r, e.origin) for e in with_l7 if e.l7_kind == "dns" for r in e.dns)
    return L7Policy(kind, allow_all, http, dns)


@dataclass
class EndpointPolicy:
    identity: Identity
    ingress: DirectionPolicy
    egress: DirectionPolicy

    def direction(self, name: str) -> DirectionPolicy:
        return self.ingress if name == "ingress" else self.egress


def _key(ref: api.PolicyRef) -> tuple:
    return (ref.kind, ref.namespace, ref.name)


class Repository:
    """All rules in force, compiled once; resolution per endpoint identity, cached."""

    def __init__(self, policies: list[api.Policy], services: list[Service] | None = None,
                 options: Options | None = None) -> None:
        self.options = options or Options()
        self.services = list(services or [])
        self._rules_by_policy: dict[tuple, list[CompiledRule]] = {}
        self._cache: dict[tuple, EndpointPolicy] = {}
        self.revision = 0
        for p in policies:
            self._rules_by_policy[_key(p.ref)] = compile_policy(p, self.services, self.options.cluster)
        self.rules = [r for rs in self._rules_by_policy.values() for r in rs]

    def upsert(self, policy: api.Policy) -> set[int]:
        """Add or replace one policy; returns the identities whose resolved policy changed."""
        key = _key(policy.ref)
        old = self._rules_by_policy.get(key, [])
        new = compile_policy(policy, self.services, self.options.cluster)
        self._rules_by_policy[key] = new
        return self._changed(old + new)

    def remove(self, ref: api.PolicyRef) -> set[int]:
        return self._changed(self._rules_by_policy.pop(_key(ref), []))

    def _changed(self, touched: list[CompiledRule]) -> set[int]:
        """Only endpoints selected by a touched rule's subject change (peers are in the rules)."""
        self.rules = [r for rs in self._rules_by_policy.values() for r in rs]
        self.revision += 1
        stale = [k for k, ep in self._cache.items()
                 if any(r.host_policy == k[1] and r.subject.matches(ep.identity.labels) for r in touched)]
        for k in stale:
            del self._cache[k]
        return {k[0] for k in stale}

    def selecting(self, identity: Identity, is_host: bool = False) -> list[CompiledRule]:
        """Rules whose subject selects the endpoint: nodeSelector rules only the host (§1.2)."""
        return [r for r in self.rules
                if r.host_policy == is_host and r.subject.matches(identity.labels)]

    def resolve(self, identity: Identity, is_host: bool = False,
                named_ports: dict[str, int] | None = None,
                peer_ports: dict[int, dict[str, int]] | None = None) -> EndpointPolicy:
        key = (identity.id, is_host, tuple(sorted((named_ports or {}).items())))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rules = self.selecting(identity, is_host)
        dirs = {}
        for direction in ("ingress", "egress"):
            dirs[direction] = self._direction(direction, identity, is_host, rules,
                                              named_ports or {}, peer_ports or {})
        ep = EndpointPolicy(identity, dirs["ingress"], dirs["egress"])
        self._cache[key] = ep
        return ep

    def _direction(self, direction: str, identity: Identity, is_host: bool,
                   rules: list[CompiledRule], own_ports, peer_ports) -> DirectionPolicy:
        with_dir = [r for r in rules if r.has_direction(direction)]
        entries = [e for r in with_dir for e in r.entries[direction]]
        mode = self._mode(direction, identity, is_host, with_dir)
        if direction == "ingress" and self.options.allow_localhost and mode != OFF:
            entries.append(Entry("ingress", False, (_HOST,), (PortSpec(ALL),), _LOCALHOST))
        return DirectionPolicy(direction, mode, entries, with_dir, dict(own_ports), peer_ports)

    def _mode(self, direction: str, identity: Identity, is_host: bool,
              with_dir: list[CompiledRule]) -> str:
        enforcement = self.options.enforcement
        if enforcement == "never":
            return OFF
        if identity.labels.get(RESERVED, "init") is not None:
            return DEFAULT_DENY
        if enforcement == "always" and not is_host:
            return DEFAULT_DENY
        if not with_dir:
            return OFF
        if any(r.default_deny[direction] for r in with_dir):
            return DEFAULT_DENY
        return DEFAULT_ALLOW
