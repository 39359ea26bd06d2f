"""API types: what the policy YAML says, field for field (Cilium `pkg/policy/api`).

These are plain data. `None` means the field was absent; an empty list means the user wrote `[]`
(Cilium treats the two differently, spec §2.2). Nothing here interprets a rule: validation lives
in `schema` (CRD layer) and `sanitize` (agent layer), meaning in `repository`/`l4`.
Every object keeps `pos`, the (line, column) where it starts in its file, for error messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

Pos = tuple[int, int]  # 1-based (line, column) in the source file; (0, 0) when unknown


@dataclass
class Requirement:
    """One `matchExpressions` entry."""
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: list[str] = field(default_factory=list)


@dataclass
class LabelSelector:
    """A Kubernetes label selector as written (keys keep their `source:` prefix, if any)."""
    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: list[Requirement] = field(default_factory=list)
    pos: Pos = (0, 0)


@dataclass
class CIDRRule:
    cidr: str | None = None
    cidr_group_ref: str | None = None
    cidr_group_selector: LabelSelector | None = None
    except_: list[str] = field(default_factory=list)
    pos: Pos = (0, 0)


@dataclass
class K8sServiceNamespace:
    service_name: str = ""
    namespace: str = ""


@dataclass
class ServiceSelector:
    selector: LabelSelector
    namespace: str = ""


@dataclass
class Service:
    """A `toServices` entry: exactly one of the two is set."""
    k8s_service: K8sServiceNamespace | None = None
    k8s_service_selector: ServiceSelector | None = None
    pos: Pos = (0, 0)


@dataclass
class FQDNSelector:
    match_name: str | None = None
    match_pattern: str | None = None
    pos: Pos = (0, 0)


@dataclass
class PortProtocol:
    port: str = ""
    protocol: str = ""  # raw as written; sanitize upper-cases, "" means ANY
    end_port: int = 0
    pos: Pos = (0, 0)


@dataclass
class HeaderMatch:
    name: str
    value: str = ""
    secret: dict[str, str] | None = None  # {namespace?, name}
    mismatch: str = ""  # "" | LOG | ADD | DELETE | REPLACE


@dataclass
class PortRuleHTTP:
    path: str = ""
    method: str = ""
    host: str = ""
    headers: list[str] = field(default_factory=list)
    header_matches: list[HeaderMatch] = field(default_factory=list)
    pos: Pos = (0, 0)


@dataclass
class PortRuleDNS:
    match_name: str | None = None
    match_pattern: str | None = None
    pos: Pos = (0, 0)


@dataclass
class PortRuleKafka:
    role: str = ""
    api_key: str = ""
    api_version: str = ""
    client_id: str = ""
    topic: str = ""


@dataclass
class L7Rules:
    """`toPorts[].rules`: a union, at most one kind non-empty (checked by sanitize)."""
    http: list[PortRuleHTTP] | None = None
    kafka: list[PortRuleKafka] | None = None
    dns: list[PortRuleDNS] | None = None
    l7proto: str = ""
    l7: list[dict[str, str]] | None = None
    pos: Pos = (0, 0)


@dataclass
class TLSContext:
    secret: dict[str, str]
    trusted_ca: str = ""
    certificate: str = ""
    private_key: str = ""


@dataclass
class Listener:
    envoy_config: dict[str, str]
    name: str
    priority: int = 0


@dataclass
class PortRule:
    """`toPorts` entry of an allow rule."""
    ports: list[PortProtocol] = field(default_factory=list)
    rules: L7Rules | None = None
    terminating_tls: TLSContext | None = None
    originating_tls: TLSContext | None = None
    server_names: list[str] = field(default_factory=list)
    listener: Listener | None = None
    pos: Pos = (0, 0)


@dataclass
class ICMPField:
    type: str  # number as string or a name
    family: str = "IPv4"
    pos: Pos = (0, 0)


@dataclass
class ICMPRule:
    fields: list[ICMPField] = field(default_factory=list)
    pos: Pos = (0, 0)


@dataclass
class PeerRule:
    """The L3 part shared by ingress/egress, allow/deny entries.

    Ingress entries use the `from_*` names, egress the `to_*` ones; both are stored here under
    one name per kind (`endpoints`, `cidr`, ...) with `direction` saying which was written.
    """
    direction: str  # "ingress" | "egress"
    deny: bool = False
    endpoints: list[LabelSelector] | None = None
    cidr: list[str] | None = None
    cidr_set: list[CIDRRule] | None = None
    entities: list[str] | None = None
    nodes: list[LabelSelector] | None = None
    groups: list[dict] | None = None
    services: list[Service] | None = None  # egress only
    fqdns: list[FQDNSelector] | None = None  # egress allow only
    requires: list[LabelSelector] | None = None  # removed in 1.19; kept to reject it
    to_ports: list[PortRule] | None = None
    icmps: list[ICMPRule] | None = None
    authentication: dict[str, str] | None = None
    pos: Pos = (0, 0)


@dataclass
class DefaultDeny:
    ingress: bool | None = None
    egress: bool | None = None


@dataclass
class RuleLabel:
    key: str
    value: str = ""
    source: str = ""


@dataclass
class Rule:
    """One Cilium rule (`spec` or an element of `specs`)."""
    endpoint_selector: LabelSelector | None = None
    node_selector: LabelSelector | None = None
    ingress: list[PeerRule] | None = None
    ingress_deny: list[PeerRule] | None = None
    egress: list[PeerRule] | None = None
    egress_deny: list[PeerRule] | None = None
    labels: list[RuleLabel] = field(default_factory=list)
    description: str = ""
    enable_default_deny: DefaultDeny | None = None
    log: str = ""
    pos: Pos = (0, 0)


@dataclass(frozen=True)
class PolicyRef:
    """Which object a rule came from: what flows and `trace` report as responsible."""
    kind: str  # CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy | NetworkPolicy
    namespace: str  # "" for clusterwide
    name: str
    file: str = ""

    def as_dict(self) -> dict:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name}

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


@dataclass
class Policy:
    """One policy object (a YAML document) with its rules, in the api form.

    For a Kubernetes NetworkPolicy the rules are its Cilium translation (spec §1.3), and
    `default_deny` is forced true in every direction the translation touches.
    """
    ref: PolicyRef
    rules: list[Rule]
    pos: Pos = (0, 0)
