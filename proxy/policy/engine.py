"""The lookup API: for one flow, what does the policy say, and which rule said it.

A flow goes from a source to a destination. Each side that is a local endpoint enforces its own
direction (egress at the source, ingress at the destination, spec §6.6); both must allow. When a
side redirects to a proxy, the request (HTTP) or query name (DNS) is checked with the same
matchers the proxies use. Pure: the endpoints, services and FQDN cache are inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from proxy.fqdn import matchpattern
from proxy.fqdn.cache import DNSCache
from proxy.policy import api, httpmatch
from proxy.policy.endpoint import Endpoint, Service
from proxy.policy.identity import RESERVED_IDS, Identity, IdentityAllocator, IPNet, reserved
from proxy.policy.ipaddr import canonical_ip, ip_object
from proxy.policy.labels import CIDR, POD_NAMESPACE, RESERVED, Label, LabelSet, parse_label
from proxy.policy.repository import Decision, EndpointPolicy, L7Policy, Options, Repository
from proxy.policy.rule import Origin
from proxy.policy.selector import CIDRSelector, FQDNSelector

NOT_A_PEER_ENTITY = {"all", "cluster", "none"}


class PeerError(ValueError):
    """A flow endpoint that cannot be resolved (unknown name, bad label, bad address)."""


@dataclass
class Peer:
    identity: Identity
    name: str  # how to show it: namespace/name, entity, or IP
    endpoint: Endpoint | None = None  # set when policy is enforced on this side
    ip: str | None = None
    is_host: bool = False

    @property
    def local(self) -> bool:
        return self.endpoint is not None or self.is_host


@dataclass
class L7Verdict:
    kind: str
    allowed: bool | None  # None: no request given to check
    allow_all: bool
    matched: list[Origin] = field(default_factory=list)
    rules: list[tuple[str, Origin]] = field(default_factory=list)  # (rule text, origin)
    header_edits: tuple = ()  # httpmatch.HeaderEdit: headerMatches mismatch actions to apply


@dataclass
class SideVerdict:
    direction: str
    evaluated: bool  # False when that side is not a local endpoint
    decision: Decision | None = None
    l7: L7Verdict | None = None

    @property
    def allowed(self) -> bool:
        if self.decision is None:
            return True  # not a local endpoint: nothing enforced on this side
        if not self.decision.allowed:
            return False
        return self.l7 is None or self.l7.allowed is not False


@dataclass
class FlowVerdict:
    src: Peer
    dst: Peer
    proto: str
    port: int
    egress: SideVerdict
    ingress: SideVerdict

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed


class Engine:
    """Policies + endpoints + services + FQDN cache -> verdicts."""

    def __init__(self, policies: list[api.Policy], endpoints: list[Endpoint] | None = None,
                 services: list[Service] | None = None, fqdn_cache: DNSCache | None = None,
                 options: Options | None = None, clock: Callable[[], float] | None = None,
                 ids: IdentityAllocator | None = None) -> None:
        self.repo = Repository(policies, services, options)
        self.endpoints = list(endpoints or [])
        self.cache = fqdn_cache or DNSCache()
        self.clock = clock or (lambda: 0.0)  # trace: a fixed instant; the agent passes time.time
        self.ids = ids or IdentityAllocator()
        self.prefixes, self.fqdn_selectors = _ip_selectors(self.repo)
        self._by_name = {e.name: e for e in self.endpoints}
        self._by_ip = {ip: e for e in self.endpoints for ip in e.ips}
        self.peer_ports: dict[int, dict[str, int]] = {}
        for e in self.endpoints:
            self.peer_ports.setdefault(self.identity_of(e).id, {}).update(e.named_ports)

    def identity_of(self, ep: Endpoint) -> Identity:
        return self.ids.for_labels(ep.label_set())

    def endpoint_peer(self, ep: Endpoint) -> Peer:
        return Peer(self.identity_of(ep), f"{ep.namespace}/{ep.name}", ep,
                    ep.ips[0] if ep.ips else None, ep.is_host)

    def ip_peer(self, ip: str) -> Peer:
        try:
            ip = canonical_ip(ip)
        except ValueError:
            raise PeerError(f"{ip!r} is not an IP address") from None
        ep = self._by_ip.get(ip)
        if ep is not None:
            return self.endpoint_peer(ep)
        return Peer(self.ip_identity(ip), ip, ip=ip)

    def ip_identity(self, ip: str) -> Identity:
        """The identity of an address outside every endpoint: world + the policy prefixes that
        contain it + the toFQDNs selectors matching a name cached for it (spec §9.4, §12)."""
        addr = ip_object(ip)
        labels = [Label(RESERVED, "world")]
        labels += [Label(CIDR, str(n)) for n in self.prefixes if addr in n]
        names = self.cache.names_for_ip(ip, self.clock())
        if names:
            labels += [s.label for s in self.fqdn_selectors
                       if any(s.matcher().matches(n) for n in names)]
        return self.ids.for_local(LabelSet.of(labels))

    def prefix_identity(self, net: IPNet) -> Identity:
        """The identity the ipcache gives a policy prefix: world + every policy prefix around it."""
        labels = [Label(RESERVED, "world")]
        labels += [Label(CIDR, str(n)) for n in self.prefixes
                   if n.version == net.version and net.subnet_of(n)]
        return self.ids.for_local(LabelSet.of(labels))

    def peer(self, spec: str) -> Peer:
        """`name` | `k=v,...` | `entity:NAME` | `ip:ADDR` (the trace CLI's SRC/DST forms)."""
        if spec.startswith("ip:"):
            return self.ip_peer(spec[3:])
        if spec.startswith("entity:"):
            name = spec[7:]
            if name not in RESERVED_IDS:
                raise PeerError(f"entity {name!r} is not one identity; use one of "
                                + ", ".join(n for n in RESERVED_IDS))
            if name == "host":
                host = next((e for e in self.endpoints if e.is_host), None)
                if host is not None:
                    return self.endpoint_peer(host)
                return Peer(reserved("host"), "host", is_host=True)
            return Peer(reserved(name), name)
        if spec in self._by_name:
            return self.endpoint_peer(self._by_name[spec])
        if "=" in spec:
            return self.endpoint_peer(inline_endpoint(spec))
        raise PeerError(f"unknown endpoint {spec!r} (give an endpoints file, labels k=v,..., "
                        "entity:NAME or ip:ADDR)")

    def policy_of(self, peer: Peer) -> EndpointPolicy:
        ports = peer.endpoint.named_ports if peer.endpoint else {}
        return self.repo.resolve(peer.identity, peer.is_host, ports, self.peer_ports)

    def evaluate(self, src: Peer, dst: Peer, proto: str, port: int,
                 http: httpmatch.HTTPRequest | None = None, dns_name: str | None = None) -> FlowVerdict:
        sides = []
        for direction, local, remote in (("egress", src, dst), ("ingress", dst, src)):
            if not local.local:
                sides.append(SideVerdict(direction, False))
                continue
            decision = self.policy_of(local).direction(direction).lookup(remote.identity, proto, port)
            l7 = l7_verdict(decision.l7, http, dns_name) if decision.allowed and decision.l7 else None
            sides.append(SideVerdict(direction, True, decision, l7))
        return FlowVerdict(src, dst, proto, port, sides[0], sides[1])


def _ip_selectors(repo: Repository) -> tuple[list[IPNet], list[FQDNSelector]]:
    """Every prefix (excepts included) and toFQDNs selector the rules name."""
    prefixes: dict[str, IPNet] = {}
    fqdns: dict[str, FQDNSelector] = {}
    for rule in repo.rules:
        for entries in rule.entries.values():
            for e in entries:
                for s in e.peers:
                    if isinstance(s, CIDRSelector):
                        for n in (s.net, *s.excepts):
                            prefixes[str(n)] = n
                    elif isinstance(s, FQDNSelector):
                        fqdns[s.key] = s
    return list(prefixes.values()), list(fqdns.values())


def inline_endpoint(spec: str) -> Endpoint:
    labels, namespace = {}, "default"
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise PeerError(f"label {part!r} must be key=value")
        lb = parse_label(part)
        if lb.key == POD_NAMESPACE and lb.source in ("k8s", "any"):
            namespace = lb.value
            continue
        labels[f"{lb.source}:{lb.key}"] = lb.value
    return Endpoint(name="(labels)", namespace=namespace, labels=labels)


class L7Checker:
    """One merged L7 policy, compiled once: what the proxies keep per (peer, port) decision."""

    def __init__(self, policy: L7Policy) -> None:
        self.policy = policy
        self.header_names: tuple[str, ...] = ()
        self.actions: tuple[httpmatch.HTTPRuleMatcher, ...] = ()  # all rules, if any has actions
        if policy.kind == "http":
            matchers = [httpmatch.compile_rule(r) for r, _ in policy.http]
            self.rules = [(m.matches, o) for m, (_, o) in zip(matchers, policy.http)]
            if any(m.actions for m in matchers):
                self.actions = tuple(matchers)
            self.listed = [(_http_text(r), o) for r, o in policy.http]
            self.header_names = tuple(sorted({h.name.lower() for m in matchers
                                              for h in (*m.required, *m.actions)}))
        elif policy.kind == "dns":
            self.rules = [(_dns_matcher(r).matches, o) for r, o in policy.dns]
            self.listed = [(_dns_text(r), o) for r, o in policy.dns]
        else:  # kafka, l7proto, tls: no l7gate proxy checks these (UNCHECKED_L7): closed
            self.rules, self.listed = [], []

    def request_key(self, request: httpmatch.HTTPRequest) -> tuple:
        """What of an HTTP request the verdict depends on: requests with equal keys get equal
        verdicts (method, path, authority and the headers some rule names)."""
        authority = request.host if request.host is not None else request.header(":authority")
        if not self.header_names:
            return (request.method, request.path, authority)
        return (request.method, request.path, authority,
                *(request.header(n) for n in self.header_names))

    def verdict(self, request) -> L7Verdict:
        """`request`: an HTTPRequest for HTTP, a query name for DNS."""
        p = self.policy
        if p.kind not in ("http", "dns"):  # nothing to check them with: only an allow-all opens
            return L7Verdict(p.kind, p.allow_all, p.allow_all)
        if not request:
            return L7Verdict(p.kind, None, p.allow_all, [], self.listed)
        if p.allow_all:
            return L7Verdict(p.kind, True, True, [], self.listed)
        if self.actions:  # every rule evaluated in order, each seeing the edits before it (§8.1)
            result = httpmatch.match_any(self.actions, request)
            matched = [self.rules[i][1] for i in result.matched]
            return L7Verdict(p.kind, result.allowed, False, matched, self.listed, result.header_edits)
        matched = [o for check, o in self.rules if check(request)]
        return L7Verdict(p.kind, bool(matched), False, matched, self.listed)


def l7_verdict(policy: L7Policy, http: httpmatch.HTTPRequest | None, dns_name: str | None) -> L7Verdict:
    """Check one request against the merged L7 policy with the proxies' own matchers."""
    return L7Checker(policy).verdict(http if policy.kind == "http" else dns_name)


def _dns_matcher(rule: api.PortRuleDNS):
    if rule.match_pattern is not None:
        return matchpattern.compile_pattern(rule.match_pattern, for_dns_rule=True)
    return matchpattern.compile_name(rule.match_name or "")


def _http_text(r: api.PortRuleHTTP) -> str:
    parts = [f"{k}={v!r}" for k, v in (("method", r.method), ("path", r.path), ("host", r.host)) if v]
    parts += [f"header {h!r}" for h in r.headers]
    parts += [f"headerMatch {m.name!r}" for m in r.header_matches]
    return "{" + ", ".join(parts) + "}"


def _dns_text(r: api.PortRuleDNS) -> str:
    return f"{{matchPattern: {r.match_pattern!r}}}" if r.match_pattern is not None \
        else f"{{matchName: {r.match_name!r}}}"
