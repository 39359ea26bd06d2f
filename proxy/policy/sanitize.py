"""Agent-layer validation: Cilium 1.19's `Rule.Validate()` (the check half of `Sanitize()`).

What it does
  `sanitize_policy()` walks every rule of an `api.Policy` and returns the rejections the Cilium
  agent would produce, as `PolicyError`s with layer "agent", Cilium's own message text, a field
  path (`spec.ingress[0].toPorts[0].ports[0].port`) and the line/column of the nearest api object
  that carries a position. Spec §3 is the list of rejections; §1.1/§1.2 add the object-level ones.
  It also offers the pure helpers the engine uses for the values the agent normalises:
  `parse_port()`, `normalize_protocol()`, `icmp_type_number()`.

What it never does
  It never mutates the policy (the agent's case fixes and key conversions are left to the
  engine, which calls the helpers), never consults the CRD schema (that is `schema`, which runs
  first), never resolves selectors, services, CIDR groups or named ports, and does no I/O.

Order of errors
  Cilium stops at the first error of a rule. We report, per rule, the first error of the rule
  itself and the first error of every ingress/ingressDeny/egress/egressDeny entry, in Cilium's
  order (ICMP type names first, because Go rejects those while decoding the object, then the
  rule, then its entries list by list). So `errors[0]` is always the error Cilium would report.

Choices where Cilium is not deterministic or the spec is silent
  * `combining X and Y is not supported yet`: Go iterates a map, so X/Y are random there. We
    name the first two non-empty fields in Cilium's declaration order: ingress FromEndpoints,
    FromCIDR, FromCIDRSet, FromEntities, FromNodes, FromGroups; egress ToCIDR, ToCIDRSet,
    ToEndpoints, ToEntities, ToServices, ToGroups, ToNodes, ToFQDNs.
  * `fromRequires`/`toRequires` (removed in 1.19; the agent's struct no longer has the field and
    the CRD caps it at 0 items) are rejected when non-empty with our own message.
  * A `CiliumNetworkPolicy` is always namespaced here, so any `nodeSelector` in it is rejected.
  * Deny entries are checked as `PortDenyRule`s: only their ports are looked at (L7 fields and
    `toFQDNs` do not exist on deny rules; the schema layer reports them).
  * HTTP regexes are compiled with RE2 (google-re2) and reported in Go's wording
    (`error parsing regexp: <code>: `<expr>``).

Quirks of 1.19 reproduced on purpose (Validate() compares the protocol *as written*)
  * Non-DNS L7 rules need the protocol spelled `TCP`: `tcp` gives
    `L7 rules can only apply to TCP (not tcp) except for DNS rules`, empty gives `(not )`.
  * `port must be empty or 0` fires only for `VRRP`/`IGMP` spelled in upper case, and never for
    a named port.
  * `rules: {http: []}` is a non-empty L7 section (the list is present), `rules: {}` is empty.
  * An `except` prefix is only checked for its address and family, not for its length.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

import re2

from . import api
from .errors import LAYER_AGENT, PolicyError

__all__ = [
    "AgentOptions",
    "sanitize_policy",
    "parse_port",
    "normalize_protocol",
    "icmp_type_number",
    "is_service_name",
    "regexp_error",
    "extended_key",
    "default_rule_paths",
    "MAX_PORTS",
    "MAX_ICMP_FIELDS",
    "ENTITIES",
    "ICMPV4_TYPES",
    "ICMPV6_TYPES",
]

KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"

MAX_PORTS = 40
MAX_ICMP_FIELDS = 40
MAX_FQDN_LENGTH = 255
KAFKA_MAX_TOPIC_LEN = 255

# Cilium's EntitySelectorMapping keys (the agent accepts world-ipv4/-ipv6; the CRD enum does not).
ENTITIES = frozenset({
    "all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "init", "ingress",
    "unmanaged", "remote-node", "health", "none", "kube-apiserver",
})

PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY", "VRRP", "IGMP")

ICMPV4_TYPES = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
    "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMPV6_TYPES = {
    "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
    "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131, "MulticastListenerDone": 132, "RouterSolicitation": 133,
    "RouterAdvertisement": 134, "NeighborSolicitation": 135, "NeighborAdvertisement": 136,
    "RedirectMessage": 137, "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140, "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142, "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}

KAFKA_API_KEYS = frozenset({
    "produce", "fetch", "offsets", "metadata", "leaderandisr", "stopreplica", "updatemetadata",
    "controlledshutdown", "offsetcommit", "offsetfetch", "findcoordinator", "joingroup",
    "heartbeat", "leavegroup", "syncgroup", "describegroups", "listgroups", "saslhandshake",
    "apiversions", "createtopics", "deletetopics", "deleterecords", "initproducerid",
    "offsetforleaderepoch", "addpartitionstotxn", "addoffsetstotxn", "endtxn",
    "writetxnmarkers", "txnoffsetcommit", "describeacls", "createacls", "deleteacls",
    "describeconfigs", "alterconfigs",
})
KAFKA_ROLES = frozenset({"produce", "consume"})

# Messages shared by several checks.
MSG_NO_RULE_LISTS = "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"
MSG_NODES_FLAG = ('FromNodes/ToNodes rules can only be applied when the '
                  '"enable-node-selector-labels" flag is set')
MSG_ICMP_FLAG = 'ICMP rules can only be applied when the "enable-icmp-rules" flag is set'
MSG_ICMP_WITH_TOPORTS = ("the ICMPs block may only be present without ToPorts. "
                         "Define a separate rule to use ToPorts")
MSG_L7_PROXY = "L7 policy is not supported since L7 proxy is not enabled"


@dataclass(frozen=True)
class AgentOptions:
    """The agent flags `Validate()` reads, with Cilium 1.19's defaults."""
    enable_node_selector_labels: bool = False  # --enable-node-selector-labels
    enable_l7_proxy: bool = True  # --enable-l7-proxy
    enable_icmp_rules: bool = True  # --enable-icmp-rules
    enable_extended_ip_protocols: bool = False  # --enable-extended-ip-protocols


# --------------------------------------------------------------------------------------------
# Public helpers for the engine (pure functions over values)
# --------------------------------------------------------------------------------------------

_SVC_NAME = re.compile(r"^([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*$")


def is_service_name(s: str) -> bool:
    """IANA service name (RFC 6335 §5.1), as Cilium's `iana.IsSvcName`: 1-15 chars, a letter."""
    return 0 < len(s) <= 15 and _SVC_NAME.match(s) is not None


def parse_port(port: str) -> int | str:
    """The normalised value of a `port` field: an int, or a lower-cased service name.

    Numbers follow Go's `strconv.ParseUint(s, 0, 16)` ("017" is 15, "8_0" is 80); anything
    that looks like a service name ("0x1F", "HTTP") is a name. Raises ValueError with Cilium's
    message (`port must be specified`, `unable to parse port: ...`).
    """
    if port == "":
        raise ValueError("port must be specified")
    if is_service_name(port):
        return port.lower()
    try:
        return _go_parse_uint(port, 16)
    except _GoError as e:
        raise ValueError(f"unable to parse port: {e}") from None


def normalize_protocol(protocol: str) -> str:
    """Upper-cased protocol, "" meaning ANY; ValueError with Cilium's message when invalid."""
    if protocol == "":
        return "ANY"
    upper = protocol.upper()
    if upper not in PROTOCOLS:
        raise ValueError(_invalid_protocol(upper))
    return upper


def icmp_type_number(family: str, type_: str | int) -> int:
    """The numeric ICMP type of an `icmps[].fields[]` entry.

    A decimal number is taken as is (out-of-range numbers are returned unchanged: they can never
    match a packet); anything else must be a name from the family's table (IPv6 uses the ICMPv6
    table, every other family the ICMPv4 one, as Cilium does). Raises ValueError otherwise.
    """
    text = str(type_)
    if text == "0":
        return 0
    number = _go_atoi(text)
    if number != 0:
        return number
    table = ICMPV6_TYPES if family == "IPv6" else ICMPV4_TYPES
    if text in table:
        return table[text]
    raise ValueError(f"ICMP type {text} not found in {family}")


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------

class _Reject(Exception):
    """First error of a unit (rule or entry): stops checking that unit, as Cilium's return."""

    def __init__(self, message: str, path: str, pos: api.Pos):
        super().__init__(message)
        self.message = message
        self.path = path
        self.pos = pos


def _near(*positions: api.Pos | None) -> api.Pos:
    """The first known position, innermost first."""
    for p in positions:
        if p and p != (0, 0):
            return p
    return (0, 0)


# Peer fields, in Cilium's declaration order: (api attribute, ingress name, egress name).
_INGRESS_L3 = (("endpoints", "FromEndpoints"), ("cidr", "FromCIDR"), ("cidr_set", "FromCIDRSet"),
               ("entities", "FromEntities"), ("nodes", "FromNodes"), ("groups", "FromGroups"))
_EGRESS_L3 = (("cidr", "ToCIDR"), ("cidr_set", "ToCIDRSet"), ("endpoints", "ToEndpoints"),
              ("entities", "ToEntities"), ("services", "ToServices"), ("groups", "ToGroups"),
              ("nodes", "ToNodes"))

_ENTRY_LISTS = (("ingress", "ingress"), ("ingress_deny", "ingressDeny"),
                ("egress", "egress"), ("egress_deny", "egressDeny"))


def _yaml_name(direction: str, attr: str) -> str:
    """The YAML field name of a peer attribute: ("ingress", "cidr_set") -> "fromCIDRSet"."""
    suffix = {"endpoints": "Endpoints", "cidr": "CIDR", "cidr_set": "CIDRSet",
              "entities": "Entities", "nodes": "Nodes", "groups": "Groups",
              "services": "Services", "fqdns": "FQDNs", "requires": "Requires"}[attr]
    return ("from" if direction == "ingress" else "to") + suffix


def default_rule_paths(n: int) -> list[str]:
    """`spec` for a single rule, `specs[i]` otherwise (api.Policy does not record which)."""
    return ["spec"] if n == 1 else [f"specs[{i}]" for i in range(n)]


def sanitize_policy(policy: api.Policy, options: AgentOptions | None = None, *,
                    rule_paths: list[str] | None = None) -> list[PolicyError]:
    """Every agent-layer rejection of `policy`, in Cilium's order (empty list: accepted).

    `rule_paths` gives the path prefix of each rule (`spec`, `specs[3]`); by default `spec` when
    there is one rule and `specs[i]` otherwise.
    """
    opts = options or AgentOptions()
    paths = rule_paths if rule_paths is not None else default_rule_paths(len(policy.rules))
    if len(paths) != len(policy.rules):
        raise ValueError(f"rule_paths has {len(paths)} entries for {len(policy.rules)} rules")
    errors: list[PolicyError] = []

    def emit(message: str, path: str, pos: api.Pos) -> None:
        errors.append(PolicyError(path=path, message=message, layer=LAYER_AGENT,
                                  line=pos[0], column=pos[1], file=policy.ref.file))

    kind = policy.ref.kind
    if kind in (KIND_CNP, KIND_CCNP):
        if not policy.ref.name:
            emit(f"{kind} must have name", "metadata.name", policy.pos)
        if not policy.rules:
            emit(f"Invalid {kind} spec(s): empty policy", "spec", policy.pos)

    # Pass 1: what Go rejects while decoding the object (ICMP type names), before any Validate().
    undecodable: set[tuple[int, str, int]] = set()
    for r, (rule, prefix) in enumerate(zip(policy.rules, paths)):
        for attr, name in _ENTRY_LISTS:
            for i, entry in enumerate(getattr(rule, attr) or []):
                err = _icmp_decode_error(entry, f"{prefix}.{name}[{i}]", rule.pos, policy.pos)
                if err is not None:
                    undecodable.add((r, attr, i))
                    emit(err.message, err.path, err.pos)

    # Pass 2: Validate(), rule by rule.
    for r, (rule, prefix) in enumerate(zip(policy.rules, paths)):
        _RuleCheck(rule, prefix, kind, opts, policy.pos, emit,
                   skip={(a, i) for (rr, a, i) in undecodable if rr == r}).run()
    return errors


class _RuleCheck:
    def __init__(self, rule: api.Rule, prefix: str, kind: str, opts: AgentOptions,
                 policy_pos: api.Pos, emit, skip: set[tuple[str, int]]):
        self.rule = rule
        self.prefix = prefix
        self.kind = kind
        self.opts = opts
        self.rule_pos = _near(rule.pos, policy_pos)
        self.emit = emit
        self.skip = skip

    def run(self) -> None:
        rule = self.rule
        if not (rule.ingress or rule.ingress_deny or rule.egress or rule.egress_deny):
            self.emit(MSG_NO_RULE_LISTS, self.prefix, self.rule_pos)
            return
        try:
            self._selectors()
        except _Reject as e:
            self.emit(e.message, e.path, e.pos)
        host_policy = rule.node_selector is not None and rule.endpoint_selector is None
        for attr, name in _ENTRY_LISTS:
            for i, entry in enumerate(getattr(rule, attr) or []):
                if (attr, i) in self.skip:
                    continue
                path = f"{self.prefix}.{name}[{i}]"
                try:
                    if entry.deny:
                        self._deny_entry(entry, path)
                    elif entry.direction == "ingress":
                        self._ingress_entry(entry, path, host_policy)
                    else:
                        self._egress_entry(entry, path, host_policy)
                except _Reject as e:
                    self.emit(e.message, e.path, e.pos)
        # The CNP parser checks this after Sanitize(), so it comes after the rule's other errors
        # (with both selectors present, "cannot have both" was already reported).
        if (self.kind == KIND_CNP and rule.node_selector is not None
                and rule.endpoint_selector is None):
            self.emit("rule cannot have NodeSelector", f"{self.prefix}.nodeSelector",
                      _near(rule.node_selector.pos, self.rule_pos))

    # -- rule level ---------------------------------------------------------------------------

    def _selectors(self) -> None:
        rule = self.rule
        if rule.endpoint_selector is None and rule.node_selector is None:
            raise _Reject("rule must have one of EndpointSelector or NodeSelector",
                          self.prefix, self.rule_pos)
        if rule.endpoint_selector is not None and rule.node_selector is not None:
            raise _Reject("rule cannot have both EndpointSelector and NodeSelector",
                          self.prefix, self.rule_pos)
        for sel, name in ((rule.endpoint_selector, "endpointSelector"),
                          (rule.node_selector, "nodeSelector")):
            if sel is not None:
                err = _selector_error(sel)
                if err:
                    raise _Reject(err, f"{self.prefix}.{name}", _near(sel.pos, self.rule_pos))

    # -- entries ------------------------------------------------------------------------------

    def _common(self, e: api.PeerRule, path: str, members: list[tuple[str, int]]) -> None:
        """IngressCommonRule/EgressCommonRule.Validate()."""
        pos = _near(e.pos, self.rule_pos)
        nonempty = [name for name, count in members if count > 0]
        if len(nonempty) >= 2:
            raise _Reject(f"combining {nonempty[0]} and {nonempty[1]} is not supported yet",
                          path, pos)
        if e.requires:
            field = _yaml_name(e.direction, "requires")
            raise _Reject(f"{field} is not supported: it was removed in Cilium 1.19",
                          f"{path}.{field}", pos)

        flag_err = MSG_NODES_FLAG if e.nodes and not self.opts.enable_node_selector_labels else None

        def fail(message: str, where: str, at: api.Pos) -> None:
            # errors.Join(err, retErr): the flag error rides along with the first real error.
            raise _Reject(message if flag_err is None else f"{message}\n{flag_err}", where, at)

        for attr in ("endpoints", "nodes"):
            field = _yaml_name(e.direction, attr)
            for j, sel in enumerate(getattr(e, attr) or []):
                err = _selector_error(sel)
                if err:
                    fail(err, f"{path}.{field}[{j}]", _near(sel.pos, pos))
        field = _yaml_name(e.direction, "cidr")
        for j, cidr in enumerate(e.cidr or []):
            err = _cidr_error(cidr)
            if err:
                fail(err, f"{path}.{field}[{j}]", pos)
        field = _yaml_name(e.direction, "cidr_set")
        for j, rule in enumerate(e.cidr_set or []):
            err = _cidr_rule_error(rule)
            if err:
                fail(err, f"{path}.{field}[{j}]", _near(rule.pos, pos))
        field = _yaml_name(e.direction, "entities")
        for j, entity in enumerate(e.entities or []):
            if entity not in ENTITIES:
                fail(f"unsupported entity: {entity}", f"{path}.{field}[{j}]", pos)
        if flag_err is not None:
            raise _Reject(flag_err, f"{path}.{_yaml_name(e.direction, 'nodes')}", pos)

    @staticmethod
    def _members(e: api.PeerRule, table) -> list[tuple[str, int]]:
        return [(name, len(getattr(e, attr) or [])) for attr, name in table]

    def _icmp_gate(self, e: api.PeerRule, path: str, pos: api.Pos) -> None:
        if e.icmps and not self.opts.enable_icmp_rules:
            raise _Reject(MSG_ICMP_FLAG, f"{path}.icmps", pos)
        if e.icmps and e.to_ports:
            raise _Reject(MSG_ICMP_WITH_TOPORTS, path, pos)

    def _ingress_entry(self, e: api.PeerRule, path: str, host_policy: bool) -> None:
        pos = _near(e.pos, self.rule_pos)
        self._common(e, path, self._members(e, _INGRESS_L3))
        l7_present, counts = _count_l7(e.to_ports)
        if host_policy and l7_present:
            raise _Reject("L7 policy is not supported on host ingress yet", path, pos)
        if l7_present and not self.opts.enable_l7_proxy:
            raise _Reject(MSG_L7_PROXY, path, pos)
        if counts["DNS"] > 0:
            raise _Reject("L7 protocol DNS is not supported on ingress yet", path, pos)
        self._icmp_gate(e, path, pos)
        for n, pr in enumerate(e.to_ports or []):
            self._port_rule(pr, f"{path}.toPorts[{n}]", _near(pr.pos, pos), ingress=True)
        for n, icmp in enumerate(e.icmps or []):
            _icmp_rule(icmp, f"{path}.icmps[{n}]", _near(icmp.pos, pos))

    def _egress_entry(self, e: api.PeerRule, path: str, host_policy: bool) -> None:
        pos = _near(e.pos, self.rule_pos)
        self._common(e, path, self._members(e, _EGRESS_L3) + [("ToFQDNs", len(e.fqdns or []))])
        l7_present, counts = _count_l7(e.to_ports)
        if l7_present and not self.opts.enable_l7_proxy:
            raise _Reject(MSG_L7_PROXY, path, pos)
        if host_policy:
            for member in ("HTTP", "Kafka"):
                if counts[member] > 0:
                    raise _Reject(f"L7 protocol {member} is not supported on host egress yet",
                                  path, pos)
        self._icmp_gate(e, path, pos)
        for n, pr in enumerate(e.to_ports or []):
            self._port_rule(pr, f"{path}.toPorts[{n}]", _near(pr.pos, pos), ingress=False)
        for n, icmp in enumerate(e.icmps or []):
            _icmp_rule(icmp, f"{path}.icmps[{n}]", _near(icmp.pos, pos))
        for n, fqdn in enumerate(e.fqdns or []):
            err = _fqdn_selector_error(fqdn)
            if err:
                raise _Reject(err, f"{path}.toFQDNs[{n}]", _near(fqdn.pos, pos))

    def _deny_entry(self, e: api.PeerRule, path: str) -> None:
        pos = _near(e.pos, self.rule_pos)
        table = _INGRESS_L3 if e.direction == "ingress" else _EGRESS_L3
        self._common(e, path, self._members(e, table))
        self._icmp_gate(e, path, pos)
        for n, pr in enumerate(e.to_ports or []):
            pr_path, pr_pos = f"{path}.toPorts[{n}]", _near(pr.pos, pos)
            if len(pr.ports) > MAX_PORTS:
                raise _Reject(f"too many ports, the max is {MAX_PORTS}", f"{pr_path}.ports", pr_pos)
            for k, pp in enumerate(pr.ports):
                self._port_protocol(pp, f"{pr_path}.ports[{k}]", _near(pp.pos, pr_pos), False)
        for n, icmp in enumerate(e.icmps or []):
            _icmp_rule(icmp, f"{path}.icmps[{n}]", _near(icmp.pos, pos))

    # -- ports and L7 -------------------------------------------------------------------------

    def _port_rule(self, pr: api.PortRule, path: str, pos: api.Pos, ingress: bool) -> None:
        """PortRule.Validate(ingress)."""
        rules = pr.rules
        has_dns = rules is not None and bool(rules.dns)
        has_l7 = not _l7_empty(rules)
        # Cilium also rejects DNS rules here on ingress ("DNS rules are not allowed on ingress"),
        # but the entry-level "L7 protocol DNS is not supported on ingress yet" always fires first.
        if pr.server_names and has_l7 and pr.terminating_tls is None:
            raise _Reject("ServerNames are not allowed with L7 rules without TLS termination",
                          f"{path}.serverNames", pos)
        for k, name in enumerate(pr.server_names):
            if name == "":
                raise _Reject("empty server name is not allowed", f"{path}.serverNames[{k}]", pos)
        if len(pr.ports) > MAX_PORTS:
            raise _Reject(f"too many ports, the max is {MAX_PORTS}", f"{path}.ports", pos)
        have_zero = False
        for k, pp in enumerate(pr.ports):
            pp_path, pp_pos = f"{path}.ports[{k}]", _near(pp.pos, pos)
            if self._port_protocol(pp, pp_path, pp_pos, has_dns):
                have_zero = True
            if has_l7 and not has_dns and pp.protocol != "TCP":
                raise _Reject(f"L7 rules can only apply to TCP (not {pp.protocol}) "
                              "except for DNS rules", f"{pp_path}.protocol", pp_pos)
        if pr.listener is not None:
            if ingress:
                raise _Reject(f"Listener is not allowed on ingress ({pr.listener.name})",
                              f"{path}.listener", pos)
            if has_l7:
                raise _Reject(f"Listener is not allowed with L7 rules ({pr.listener.name})",
                              f"{path}.listener", pos)
        if has_l7:
            if have_zero:
                raise _Reject("L7 rules can not be used when a port is 0", f"{path}.rules",
                              _near(rules.pos, pos))
            _l7_rules(rules, pr.ports, f"{path}.rules", _near(rules.pos, pos))

    def _port_protocol(self, pp: api.PortProtocol, path: str, pos: api.Pos,
                       has_dns: bool) -> bool:
        """PortProtocol.Validate(hasDNSRules); returns whether the port is 0."""
        is_zero = False
        if pp.port == "" and not self.opts.enable_extended_ip_protocols:
            raise _Reject("port must be specified", f"{path}.port", pos)
        if not is_service_name(pp.port) and pp.port != "":
            if pp.port != "0" and pp.protocol in ("VRRP", "IGMP"):
                raise _Reject("port must be empty or 0", f"{path}.port", pos)
            try:
                number = _go_parse_uint(pp.port, 16)
            except _GoError as e:
                raise _Reject(f"unable to parse port: {e}", f"{path}.port", pos) from None
            is_zero = number == 0
            if has_dns and pp.end_port > number:
                raise _Reject("DNS rules do not support port ranges", f"{path}.endPort", pos)
        if pp.protocol != "" and pp.protocol.upper() not in PROTOCOLS:
            raise _Reject(_invalid_protocol(pp.protocol.upper()), f"{path}.protocol", pos)
        return is_zero


def _invalid_protocol(upper: str) -> str:
    return f"invalid protocol {_go_quote(upper)}, must be {{ tcp | udp | sctp | vrrp | igmp | any }}"


def _l7_empty(rules: api.L7Rules | None) -> bool:
    """L7Rules.IsEmpty(): absent, or no kind present (an empty list counts as present)."""
    return rules is None or (rules.http is None and rules.kafka is None and rules.dns is None
                             and rules.l7proto == "" and rules.l7 is None)


def _count_l7(ports: list[api.PortRule] | None) -> tuple[bool, dict[str, int]]:
    """countL7Rules(): whether any PortRule has a non-empty L7 section, and rules per kind."""
    present = False
    counts = {"DNS": 0, "HTTP": 0, "Kafka": 0}
    for pr in ports or []:
        if not _l7_empty(pr.rules):
            present = True
            counts["DNS"] += len(pr.rules.dns or [])
            counts["HTTP"] += len(pr.rules.http or [])
            counts["Kafka"] += len(pr.rules.kafka or [])
    return present, counts


def _l7_rules(rules: api.L7Rules, ports: list[api.PortProtocol], path: str,
              pos: api.Pos) -> None:
    """L7Rules.Validate(ports)."""
    kinds = 0
    if rules.http is not None:
        kinds += 1
        for i, h in enumerate(rules.http):
            _http_rule(h, f"{path}.http[{i}]", _near(h.pos, pos))
    if rules.kafka is not None:
        kinds += 1
        for i, k in enumerate(rules.kafka):
            err = _kafka_error(k)
            if err:
                raise _Reject(err, f"{path}.kafka[{i}]", pos)
    if rules.dns is not None:
        if not ports:
            raise _Reject("port 53 must be specified for DNS rules", path, pos)
        kinds += 1
        for i, d in enumerate(rules.dns):
            err = _dns_rule_error(d)
            if err:
                raise _Reject(err, f"{path}.dns[{i}]", _near(d.pos, pos))
    if rules.l7 is not None and rules.l7proto == "":
        raise _Reject("'l7' may only be specified when a 'l7proto' is also specified",
                      f"{path}.l7", pos)
    if rules.l7proto != "":
        kinds += 1
        for i, entry in enumerate(rules.l7 or []):
            if "" in entry:
                raise _Reject("Empty key not allowed", f"{path}.l7[{i}]", pos)
    if kinds > 1:
        raise _Reject("multiple L7 protocol rule types specified in single rule", path, pos)


def _http_rule(h: api.PortRuleHTTP, path: str, pos: api.Pos) -> None:
    """PortRuleHTTP.Validate(): path/method compile as RE2; headerMatches are well-formed."""
    for field in ("path", "method"):
        value = getattr(h, field)
        if value:
            err = regexp_error(value)
            if err:
                raise _Reject(err, f"{path}.{field}", pos)
    for i, m in enumerate(h.header_matches):
        where = f"{path}.headerMatches[{i}]"
        if m.name == "":
            raise _Reject("Header name missing", where, pos)
        if m.mismatch not in ("", "LOG", "ADD", "DELETE", "REPLACE"):
            raise _Reject(f"Invalid header action: {m.mismatch}", where, pos)
        if m.secret is not None and not m.secret.get("name"):
            raise _Reject("Secret name missing", where, pos)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

# RE2 (C++) error codes -> Go regexp/syntax error codes.
_RE2_TO_GO = {
    "no argument for repetition operator": "missing argument to repetition operator",
    "missing )": "missing closing )",
    "missing ]": "missing closing ]",
    "bad repetition operator": "invalid nested repetition operator",
    "invalid repetition size": "invalid repeat count",
    "invalid perl operator": "invalid or unsupported Perl syntax",
    "trailing \\": "trailing backslash at end of expression",
}


def regexp_error(pattern: str) -> str | None:
    """Go's `regexp.Compile` error text for `pattern`, or None if it compiles (checked by RE2)."""
    # Go rejects \C (match any byte); C++ RE2 accepts it.
    i = 0
    while i < len(pattern) - 1:
        if pattern[i] == "\\":
            if pattern[i + 1] == "C":
                return "error parsing regexp: invalid escape sequence: `\\C`"
            i += 2
            continue
        i += 1
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        raw = e.args[0] if e.args else str(e)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        code, sep, arg = text.partition(": ")
        code = _RE2_TO_GO.get(code, code)
        return f"error parsing regexp: {code}: `{arg}`"
    return None


def _kafka_error(k: api.PortRuleKafka) -> str | None:
    """kafka.PortRule.Sanitize() (deprecated L7 kind, still validated in 1.19)."""
    if k.api_key and k.role:
        return f"cannot set both Role {_go_quote(k.role)} and APIKey {_go_quote(k.api_key)} together"
    if k.api_key and k.api_key.lower() not in KAFKA_API_KEYS:
        return f"invalid Kafka APIKey {_go_quote(k.api_key)}"
    if k.role and k.role.lower() not in KAFKA_ROLES:
        return f"invalid Kafka Role {_go_quote(k.role)}"
    if k.api_version:
        try:
            n = _go_parse_int(k.api_version, 16)
        except _GoError:
            n = -1
        if n < 0:
            return f"invalid Kafka APIVersion {_go_quote(k.api_version)}"
    if k.topic:
        if len(k.topic) > KAFKA_MAX_TOPIC_LEN:
            return f"kafka topic exceeds maximum len of {KAFKA_MAX_TOPIC_LEN}"
        if not re.fullmatch(r"[a-zA-Z0-9\\._\-]+", k.topic):
            return f"invalid Kafka Topic name {_go_quote(k.topic)}"
    return None


_MATCH_NAME_CHARS = re.compile(r"^[-a-zA-Z0-9_.]+$")
_MATCH_PATTERN_CHARS = re.compile(r"^[-a-zA-Z0-9_.*]+$")


def _name_pattern_error(name: str | None, pattern: str | None) -> str | None:
    if name and not _MATCH_NAME_CHARS.match(name):
        return (f'Invalid characters in MatchName: "{name}". '
                "Only 0-9, a-z, A-Z and . and - characters are allowed")
    if pattern and not _MATCH_PATTERN_CHARS.match(pattern):
        return (f'Invalid characters in MatchPattern: "{pattern}". '
                "Only 0-9, a-z, A-Z and ., - and * characters are allowed")
    if pattern and len(pattern.strip()) > MAX_FQDN_LENGTH:
        return (f"Invalid MatchPattern: {_go_quote(pattern)}. "
                f"Must be <= {MAX_FQDN_LENGTH} characters long.")
    return None


def _fqdn_selector_error(s: api.FQDNSelector) -> str | None:
    """FQDNSelector validation (toFQDNs): exclusive name/pattern, characters, length."""
    if s.match_name and s.match_pattern:
        return "only one of MatchName or MatchPattern is allowed in an FQDNSelector"
    return _name_pattern_error(s.match_name, s.match_pattern)


def _dns_rule_error(d: api.PortRuleDNS) -> str | None:
    """PortRuleDNS validation: same checks, but both fields together are accepted."""
    return _name_pattern_error(d.match_name, d.match_pattern)


def _icmp_rule(icmp: api.ICMPRule, path: str, pos: api.Pos) -> None:
    """ICMPRule.Validate(): at most 40 fields, family IPv4/IPv6/empty."""
    if len(icmp.fields) > MAX_ICMP_FIELDS:
        raise _Reject(f"too many types, the max is {MAX_ICMP_FIELDS}", f"{path}.fields", pos)
    for k, f in enumerate(icmp.fields):
        if f.family not in ("IPv4", "IPv6", ""):
            raise _Reject(f"wrong family: {f.family}", f"{path}.fields[{k}].family",
                          _near(f.pos, pos))


def _icmp_decode_error(entry: api.PeerRule, path: str, rule_pos: api.Pos,
                       policy_pos: api.Pos) -> _Reject | None:
    """ICMPField.UnmarshalJSON(): a type name must exist in its family's table."""
    for n, icmp in enumerate(entry.icmps or []):
        for k, f in enumerate(icmp.fields):
            text = str(f.type)
            if text != "0" and _go_atoi(text) == 0:
                table = ICMPV6_TYPES if f.family == "IPv6" else ICMPV4_TYPES
                if text not in table:
                    return _Reject(f"ICMP type {text} not found in {f.family}",
                                   f"{path}.icmps[{n}].fields[{k}].type",
                                   _near(f.pos, icmp.pos, entry.pos, rule_pos, policy_pos))
    return None


# --------------------------------------------------------------------------------------------
# CIDRs (Go net/netip semantics and messages)
# --------------------------------------------------------------------------------------------

class _GoError(ValueError):
    pass


def _parse_ipv4(s: str, whole: str) -> ipaddress.IPv4Address:
    fields: list[int] = []
    val = digits = 0
    for i, ch in enumerate(s):
        if "0" <= ch <= "9":
            if digits == 1 and val == 0:
                raise _GoError(f"ParseAddr({_go_quote(whole)}): IPv4 field has octet with leading zero")
            val = val * 10 + ord(ch) - 48
            digits += 1
            if val > 255:
                raise _GoError(f"ParseAddr({_go_quote(whole)}): IPv4 field has value >255")
        elif ch == ".":
            if i == 0 or i == len(s) - 1 or s[i - 1] == ".":
                raise _GoError(f"ParseAddr({_go_quote(whole)}): IPv4 field must have at least "
                               f"one digit (at {_go_quote(s[i:])})")
            if len(fields) == 3:
                raise _GoError(f"ParseAddr({_go_quote(whole)}): IPv4 address too long")
            fields.append(val)
            val = digits = 0
        else:
            raise _GoError(f"ParseAddr({_go_quote(whole)}): unexpected character "
                           f"(at {_go_quote(s[i:])})")
    if len(fields) < 3:
        raise _GoError(f"ParseAddr({_go_quote(whole)}): IPv4 address too short")
    fields.append(val)
    return ipaddress.IPv4Address(".".join(map(str, fields)))


def _parse_addr(s: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """netip.ParseAddr: dotted IPv4 (no leading zeros) or IPv6 with an optional zone.

    Returns the address and its zone ("" when none).
    """
    for ch in s:
        if ch == ".":
            return _parse_ipv4(s, s), ""
        if ch == ":":
            addr, pct, zone = s.partition("%")
            if pct and zone == "":
                raise _GoError(f"ParseAddr({_go_quote(s)}): zone must be a non-empty string")
            try:
                if "." in addr:  # an embedded IPv4 follows Go's stricter IPv4 rules too
                    _parse_ipv4(addr[addr.rfind(":") + 1:], s)
                return ipaddress.IPv6Address(addr), zone
            except ipaddress.AddressValueError:
                raise _GoError(f"ParseAddr({_go_quote(s)}): invalid IPv6 address") from None
        if ch == "%":
            raise _GoError(f"ParseAddr({_go_quote(s)}): missing IPv6 address")
    raise _GoError(f"ParseAddr({_go_quote(s)}): unable to parse IP")


def _parse_prefix(s: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """netip.ParsePrefix: `addr/bits`, no zone, bits decimal without sign or leading zero."""
    i = s.rfind("/")
    if i < 0:
        raise _GoError(f"netip.ParsePrefix({_go_quote(s)}): no '/'")
    try:
        addr, zone = _parse_addr(s[:i])
    except _GoError as e:
        raise _GoError(f"netip.ParsePrefix({_go_quote(s)}): {e}") from None
    if zone:
        raise _GoError(f"netip.ParsePrefix({_go_quote(s)}): IPv6 zones cannot be present in a prefix")
    bits_str = s[i + 1:]
    bad_bits = f"netip.ParsePrefix({_go_quote(s)}): bad bits after slash: {_go_quote(bits_str)}"
    if len(bits_str) > 1 and not ("1" <= bits_str[0] <= "9"):
        raise _GoError(bad_bits)
    if not re.fullmatch(r"[+-]?[0-9]+", bits_str):
        raise _GoError(bad_bits)
    bits = int(bits_str)
    if bits < 0 or bits > addr.max_prefixlen:
        raise _GoError(f"netip.ParsePrefix({_go_quote(s)}): prefix length out of range")
    return addr, bits


def _prefix_contains(prefix: tuple, addr) -> bool:
    """netip.Prefix.Contains: same family (IPv4-mapped IPv6 is IPv6) and inside the mask."""
    net_addr, bits = prefix
    if net_addr.version != addr.version:
        return False
    return addr in ipaddress.ip_network(f"{net_addr}/{bits}", strict=False)


def _cidr_error(cidr: str) -> str | None:
    """CIDR.Validate(): a prefix or a bare address."""
    if cidr == "":
        return "IP must be specified"
    try:
        _parse_prefix(cidr)
        return None
    except _GoError:
        pass
    try:
        _parse_addr(cidr)
    except _GoError as e:
        return f"unable to parse CIDR: {e}"
    return None


def _cidr_rule_error(c: api.CIDRRule) -> str | None:
    """CIDRRule.Validate() as of 1.19."""
    count = 0
    if c.cidr_group_ref:
        count += 1
    if c.cidr:
        count += 1
    if c.cidr_group_selector is not None:
        count += 1
        err = _selector_error(c.cidr_group_selector, convert_keys=False)
        if err:
            return (f"failed to sanitize cidrGroupSelector "
                    f"{_selector_json(c.cidr_group_selector)}: {err}")
    if count == 0:
        return "one of cidr, cidrGroupRef, or cidrGroupSelector is required"
    if count > 1:
        return "more than one of cidr, cidrGroupRef, or cidrGroupSelector may not be set"
    if c.cidr_group_ref or c.cidr_group_selector is not None:
        return None
    try:
        prefix = _parse_prefix(c.cidr)
    except _GoError as e:
        return f"unable to parse CIDRRule {_go_quote(c.cidr)}: {e}"
    for ex in c.except_:
        try:
            except_addr, _ = _parse_prefix(ex)
        except _GoError as e:
            return str(e)
        if not _prefix_contains(prefix, except_addr):
            return f"allow CIDR prefix {c.cidr} does not contain exclude CIDR prefix {ex}"
    return None


# --------------------------------------------------------------------------------------------
# Label selectors (k8s apimachinery validation, keys in Cilium's extended form)
# --------------------------------------------------------------------------------------------

_QNAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QNAME_RE = re.compile(f"^{_QNAME_FMT}$")
_QNAME_MSG = ("must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
              "with an alphanumeric character")
_DNS1123_FMT = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_DNS1123_RE = re.compile(f"^{_DNS1123_FMT}$")
_DNS1123_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character")
_LABEL_VALUE_FMT = f"({_QNAME_FMT})?"
_LABEL_VALUE_RE = re.compile(f"^{_LABEL_VALUE_FMT}$")
_LABEL_VALUE_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, "
                    "'-', '_' or '.', and must start and end with an alphanumeric character")


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    msg += " (e.g. "
    for i, example in enumerate(examples):
        if i > 0:
            msg += " or "
        msg += f"'{example}', "
    return msg + f"regex used for validation is '{fmt}')"


def _is_qualified_name(value: str) -> list[str]:
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if prefix == "":
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in _is_dns1123_subdomain(prefix))
    else:
        return [("a qualified name " + _regex_error(_QNAME_MSG, _QNAME_FMT, "MyName", "my.name",
                                                      "123-abc")
                 + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')")]
    if name == "":
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part must be no more than 63 characters")
    if not _QNAME_RE.match(name):
        errs.append("name part " + _regex_error(_QNAME_MSG, _QNAME_FMT, "MyName", "my.name",
                                                "123-abc"))
    return errs


def _is_dns1123_subdomain(value: str) -> list[str]:
    errs = []
    if len(value) > 253:
        errs.append("must be no more than 253 characters")
    if not _DNS1123_RE.match(value):
        errs.append(_regex_error(_DNS1123_MSG, _DNS1123_FMT, "example.com"))
    return errs


def _is_valid_label_value(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _LABEL_VALUE_RE.match(value):
        errs.append(_regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345"))
    return errs


def extended_key(key: str) -> str:
    """Cilium's `GetExtendedKeyFrom`: `k8s:app` -> `k8s.app`, `app` -> `any.app`, `$host` ->
    `reserved.host`, `reserved.host` stays; a `=value` suffix is dropped."""
    if key == "":
        source, rest = "", ""
    elif key[0] == "$":
        source, rest = "reserved", key[1:]
    elif ":" in key:
        source, _, rest = key.partition(":")
    elif key.startswith("reserved."):
        source, rest = "reserved", key[len("reserved."):]
    else:
        source, rest = "", key
    return f"{source or 'any'}.{rest.partition('=')[0]}"


def _selector_error(sel: api.LabelSelector, convert_keys: bool = True) -> str | None:
    """EndpointSelector.Validate(): k8s ValidateLabelSelector over the extended keys."""
    errs: list[str] = []
    for k, v in sel.match_labels.items():
        key = extended_key(k) if convert_keys else k
        errs.extend(f"matchLabels: Invalid value: {_go_quote(key)}: {m}"
                    for m in _is_qualified_name(key))
        errs.extend(f"matchLabels: Invalid value: {_go_quote(str(v))}: {m}"
                    for m in _is_valid_label_value(str(v)))
    for i, req in enumerate(sel.match_expressions):
        base = f"matchExpressions[{i}]"
        if req.operator in ("In", "NotIn"):
            if not req.values:
                errs.append(f"{base}.values: Required value: must be specified when `operator` "
                            "is 'In' or 'NotIn'")
        elif req.operator in ("Exists", "DoesNotExist"):
            if req.values:
                errs.append(f"{base}.values: Forbidden: may not be specified when `operator` is "
                            "'Exists' or 'DoesNotExist'")
        else:
            errs.append(f"{base}.operator: Invalid value: {_go_quote(req.operator)}: "
                        "not a valid selector operator")
        key = extended_key(req.key) if convert_keys else req.key
        errs.extend(f"{base}.key: Invalid value: {_go_quote(key)}: {m}"
                    for m in _is_qualified_name(key))
        for j, v in enumerate(req.values):
            errs.extend(f"{base}.values[{j}]: Invalid value: {_go_quote(str(v))}: {m}"
                        for m in _is_valid_label_value(str(v)))
    if not errs:
        return None
    unique = list(dict.fromkeys(errs))
    text = unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]"
    return f"invalid label selector: {text}"


def _selector_json(sel: api.LabelSelector) -> str:
    """Go's json.Marshal of a LabelSelector (sorted map keys, empty fields omitted)."""
    out: dict = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sorted(sel.match_labels.items()))
    if sel.match_expressions:
        out["matchExpressions"] = [
            {"key": r.key, "operator": r.operator, **({"values": r.values} if r.values else {})}
            for r in sel.match_expressions]
    return json.dumps(out, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Go number parsing and quoting
# --------------------------------------------------------------------------------------------

def _go_quote(s: str) -> str:
    """strconv.Quote."""
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                        "\t": "\\t", "\v": "\\v"}[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _underscore_ok(s: str) -> bool:
    """strconv.underscoreOK: underscores only between digits or after a base prefix."""
    saw = "^"
    i = 0
    if s[:1] in ("+", "-"):
        s = s[1:]
    hexa = False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i = 2
        saw = "0"
        hexa = s[1].lower() == "x"
    while i < len(s):
        c = s[i]
        if "0" <= c <= "9" or (hexa and "a" <= c.lower() <= "f"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
        i += 1
    return saw != "_"


def _go_parse_uint(s: str, bit_size: int) -> int:
    """strconv.ParseUint(s, 0, bit_size)."""
    fn = "strconv.ParseUint"
    syntax = _GoError(f"{fn}: parsing {_go_quote(s)}: invalid syntax")
    if s == "":
        raise syntax
    base, body = 10, s
    if s[0] == "0":
        if len(s) >= 3 and s[1].lower() == "b":
            base, body = 2, s[2:]
        elif len(s) >= 3 and s[1].lower() == "o":
            base, body = 8, s[2:]
        elif len(s) >= 3 and s[1].lower() == "x":
            base, body = 16, s[2:]
        else:
            base, body = 8, s[1:]
    max_val = (1 << bit_size) - 1
    n = 0
    underscores = False
    for c in body:
        if c == "_":
            underscores = True
            continue
        if "0" <= c <= "9":
            d = ord(c) - 48
        elif "a" <= c.lower() <= "z":
            d = ord(c.lower()) - ord("a") + 10
        else:
            raise syntax
        if d >= base:
            raise syntax
        n = n * base + d
        if n > max_val:
            raise _GoError(f"{fn}: parsing {_go_quote(s)}: value out of range")
    if underscores and not _underscore_ok(s):
        raise syntax
    return n


def _go_parse_int(s: str, bit_size: int) -> int:
    """strconv.ParseInt(s, 10, bit_size) (decimal only, optional sign, no underscores)."""
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise _GoError(f"strconv.ParseInt: parsing {_go_quote(s)}: invalid syntax")
    n = int(s)
    if not -(1 << (bit_size - 1)) <= n < (1 << (bit_size - 1)):
        raise _GoError(f"strconv.ParseInt: parsing {_go_quote(s)}: value out of range")
    return n


def _go_atoi(s: str) -> int:
    """intstr.IntValue() of a string: strconv.Atoi, 0 when it does not parse."""
    if re.fullmatch(r"[+-]?[0-9]+", s):
        return int(s)
    return 0
