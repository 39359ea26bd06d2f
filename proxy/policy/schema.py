"""The schema layer: what the Kubernetes API server checks before Cilium ever sees a policy.

What it does
  `check_object(value, pos_of)` classifies one Kubernetes object (CiliumNetworkPolicy,
  CiliumClusterwideNetworkPolicy, NetworkPolicy, or some other kind to skip), validates it against
  our own declarative copy of the constraints the API server applies, and builds the api form:
  * CNP/CCNP: Cilium's CRD `openAPIV3Schema` (v2, Cilium 1.19) — upper-case enums, patterns,
    `maxItems: 40`, `oneOf` endpointSelector/nodeSelector, `anyOf` one rule list, `oneOf`
    matchName/matchPattern, `format: cidr`, int-or-string ICMP types, `log.value` ≤ 32 ...;
  * NetworkPolicy: the networking.k8s.io/v1 OpenAPI plus the API server's own validation of it
    (ports, endPort, ipBlock, peers, label selectors);
  * for every kind, ObjectMeta (name required, a DNS-1123 subdomain; namespace a DNS-1123 label)
    and kubectl's strict field validation: an unknown field is an error, with a suggestion
    (`spec.PodSelector: unknown field "PodSelector" (did you mean "podSelector"?)`).
  Every violation is a `PolicyError(layer="schema")` with the field path and the line/column of
  its key. The tables below are the whole schema; `_Walker` is the only code that reads them.

What it never does
  It never reads the CRD files (those are reference material; tests/test_schema_crd.py checks
  that these tables give the same verdict as the CRD) and never applies the agent's checks (that
  is `sanitize`, which runs after this layer passes). Where the CRD and the agent disagree the CRD
  is followed here: `protocol: tcp` is a schema error although the agent would upper-case it.

Choices where the spec is silent
  * `null` for a field means "absent", as the API server prunes nulls of non-nullable fields
    before validating; a `null` list item is a type error.
  * A CiliumNetworkPolicy (or NetworkPolicy) without `metadata.namespace` gets `default`, as
    `kubectl apply` would give it the current namespace; Cilium's agent would read an empty
    namespace as clusterwide (spec §1.1), but that only happens outside the API server.
    A CCNP's namespace is ignored (cluster-scoped).
  * `kind: List` (what `kubectl get -o yaml` prints) is not handled here; `load` expands it.
"""
from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import re2

from . import api
from .errors import LAYER_AGENT, LAYER_SCHEMA, PolicyError
from .source import DOCUMENT_PATH, Path, format_path

__all__ = ["check_object", "Checked", "KIND_CNP", "KIND_CCNP", "KIND_KNP", "POLICY_KINDS",
           "Str", "Int", "Bool", "IntOrStr", "Arr", "Map", "Obj", "Any_",
           "CNP", "CCNP", "KNP", "RULE", "KNP_SPEC", "is_cidr"]

KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
KIND_KNP = "NetworkPolicy"
# kind -> the one apiVersion that serves it
POLICY_KINDS = {KIND_CNP: "cilium.io/v2", KIND_CCNP: "cilium.io/v2",
                KIND_KNP: "networking.k8s.io/v1"}

PosOf = Callable[[Path], api.Pos]
Check = Callable[[Any], list[tuple[Path, str]]]  # value -> [(relative path, message)]


# --------------------------------------------------------------------------------------------
# The schema vocabulary (OpenAPI v3 as Kubernetes uses it, reduced to what the tables need)
# --------------------------------------------------------------------------------------------

@dataclass
class Str:
    enum: tuple[str, ...] = ()
    pattern: str = ""          # Go regexp, *searched* (not full-matched) as Kubernetes does
    min_length: int | None = None
    max_length: int | None = None
    format: str = ""           # "cidr" is the only format Kubernetes checks in these schemas
    check: Callable[[str], list[str]] | None = None  # API-server validation beyond OpenAPI
    what: str = ""             # the pattern in words, for messages


@dataclass
class Int:
    minimum: int | None = None
    maximum: int | None = None


@dataclass
class Bool:
    pass


@dataclass
class IntOrStr:
    """`x-kubernetes-int-or-string`; the pattern applies to strings only."""
    pattern: str = ""
    what: str = ""


@dataclass
class Any_:
    """Free-form (fields we accept without looking, e.g. `metadata.managedFields`)."""


@dataclass
class Arr:
    items: Any
    max_items: int | None = None
    min_items: int | None = None
    unique: bool = False       # x-kubernetes-list-type: set


@dataclass
class Map:
    """An object with free keys (`additionalProperties`)."""
    values: Any
    key_check: Callable[[str], list[str]] | None = None


@dataclass
class Obj:
    name: str
    fields: Mapping[str, Any]
    required: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()   # per group: exactly one key present
    any_of: tuple[str, ...] = ()               # at least one key present
    notes: Mapping[str, str] = field(default_factory=dict)  # unknown fields with a known story
    checks: tuple[Check, ...] = ()             # API-server validation beyond OpenAPI


# --------------------------------------------------------------------------------------------
# Kubernetes name and label formats (apimachinery validation), used by ObjectMeta and the
# NetworkPolicy checks
# --------------------------------------------------------------------------------------------

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_IANA_SVC_NAME = re.compile(r"[-a-z0-9]+\Z")


def dns1123_subdomain(v: str) -> list[str]:
    if len(v) > 253:
        return ["must be no more than 253 characters"]
    if not re.match(DNS1123_SUBDOMAIN, v):
        return ["a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character "
                "(e.g. 'example.com')"]
    return []


def dns1123_label(v: str) -> list[str]:
    if len(v) > 63:
        return ["must be no more than 63 characters"]
    if not re.fullmatch(_DNS1123_LABEL, v):
        return ["a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
                "or '-', and must start and end with an alphanumeric character (e.g. 'my-name')"]
    return []


def qualified_name(v: str) -> list[str]:
    prefix, slash, name = v.rpartition("/")
    errs = []
    if slash:
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs += [f"prefix part {m}" for m in dns1123_subdomain(prefix)]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part must be no more than 63 characters")
    elif not _QUALIFIED_NAME.match(name):
        errs.append("name part must consist of alphanumeric characters, '-', '_' or '.', and "
                    "must start and end with an alphanumeric character (e.g. 'MyName', "
                    "'my.name', or '123-abc')")
    return errs


def label_value(v: str) -> list[str]:
    if len(v) > 63:
        return ["must be no more than 63 characters"]
    if not re.match(LABEL_VALUE, v):
        return ["a valid label must be an empty string or consist of alphanumeric characters, "
                "'-', '_' or '.', and must start and end with an alphanumeric character"]
    return []


def is_cidr(v: str) -> bool:
    """Kubernetes' `format: cidr` (Go net.ParseCIDR): address/prefix-length, no zone."""
    addr, slash, bits = v.partition("/")
    if not slash or not bits.isascii() or not bits.isdigit() or "%" in addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return int(bits) <= ip.max_prefixlen


# --------------------------------------------------------------------------------------------
# ObjectMeta (every kind)
# --------------------------------------------------------------------------------------------

OBJECT_META = Obj("ObjectMeta", {
    "name": Str(check=dns1123_subdomain),
    "namespace": Str(check=dns1123_label),
    "generateName": Str(),
    "labels": Map(Str(check=label_value), key_check=qualified_name),
    "annotations": Map(Str(), key_check=qualified_name),
    # What `kubectl get -o yaml` prints back; accepted and ignored.
    "uid": Str(), "resourceVersion": Str(), "generation": Int(), "selfLink": Str(),
    "creationTimestamp": Str(), "deletionTimestamp": Str(), "deletionGracePeriodSeconds": Int(),
    "finalizers": Arr(Str()), "ownerReferences": Arr(Any_()), "managedFields": Arr(Any_()),
}, required=("name",))

_TOP_NOTES = {"description": "description belongs inside the rule: spec.description"}


# --------------------------------------------------------------------------------------------
# CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy: the CRD openAPIV3Schema, table by table
# (both kinds share one schema). Patterns are copied verbatim from the CRD, quirks included.
# --------------------------------------------------------------------------------------------

LABEL_SELECTOR = Obj("LabelSelector", {
    "matchLabels": Map(Str(max_length=63, pattern=LABEL_VALUE)),
    "matchExpressions": Arr(Obj("LabelSelectorRequirement", {
        "key": Str(),
        "operator": Str(enum=("In", "NotIn", "Exists", "DoesNotExist")),
        "values": Arr(Str()),
    }, required=("key", "operator"))),
})

ENTITIES = ("all", "world", "cluster", "host", "init", "ingress", "unmanaged", "remote-node",
            "health", "none", "kube-apiserver")  # the agent also knows world-ipv4/-ipv6
CIDR = Str(format="cidr")

CIDR_RULE = Obj("CIDRRule", {
    "cidr": CIDR,
    "cidrGroupRef": Str(max_length=253, pattern=DNS1123_SUBDOMAIN),
    "cidrGroupSelector": LABEL_SELECTOR,
    "except": Arr(CIDR),
}, one_of=(("cidr", "cidrGroupRef", "cidrGroupSelector"),))

# The CRD's own list: note "ExtendedEcho Reply" (sic), so ExtendedEchoReply is rejected by the CRD.
ICMP_TYPE = (
    r"^([0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5]|EchoReply|DestinationUnreachable|"
    r"Redirect|Echo|RouterAdvertisement|RouterSelection|TimeExceeded|ParameterProblem|"
    r"Timestamp|TimestampReply|Photuris|ExtendedEchoRequest|ExtendedEcho Reply|PacketTooBig|"
    r"ParameterProblem|EchoRequest|MulticastListenerQuery|MulticastListenerReport|"
    r"MulticastListenerDone|RouterSolicitation|RouterAdvertisement|NeighborSolicitation|"
    r"NeighborAdvertisement|RedirectMessage|RouterRenumbering|ICMPNodeInformationQuery|"
    r"ICMPNodeInformationResponse|InverseNeighborDiscoverySolicitation|"
    r"InverseNeighborDiscoveryAdvertisement|HomeAgentAddressDiscoveryRequest|"
    r"HomeAgentAddressDiscoveryReply|MobilePrefixSolicitation|MobilePrefixAdvertisement|"
    r"DuplicateAddressRequestCodeSuffix|DuplicateAddressConfirmationCodeSuffix)$")

ICMP_RULE = Obj("ICMPRule", {
    "fields": Arr(Obj("ICMPField", {
        "family": Str(enum=("IPv4", "IPv6")),
        "type": IntOrStr(pattern=ICMP_TYPE, what="a type number 0-255 or an ICMP type name"),
    }, required=("type",)), max_items=40),
})

# As in the CRD, the alternation is not grouped: "^(number)" OR "(name)$", searched. So "80x"
# passes (it starts with a number) and the agent rejects it later; "" and "-1" fail here.
PORT = (r"^(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})|"
        r"([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*$")

PORT_PROTOCOL = Obj("PortProtocol", {
    "port": Str(pattern=PORT, what="a port number 0-65535 or a port name"),
    "endPort": Int(minimum=0, maximum=65535),
    "protocol": Str(enum=("TCP", "UDP", "SCTP", "VRRP", "IGMP", "ANY")),
})

SECRET = Obj("Secret", {"name": Str(), "namespace": Str()}, required=("name",))

TLS_CONTEXT = Obj("TLSContext", {
    "secret": SECRET, "trustedCA": Str(), "certificate": Str(), "privateKey": Str(),
}, required=("secret",))

LISTENER = Obj("Listener", {
    "envoyConfig": Obj("EnvoyConfig", {
        "kind": Str(enum=("CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig")),
        "name": Str(min_length=1),
    }, required=("name",)),
    "name": Str(min_length=1),
    "priority": Int(minimum=1, maximum=100),
}, required=("envoyConfig", "name"))

HTTP_RULE = Obj("PortRuleHTTP", {
    "path": Str(), "method": Str(),
    "host": Str(),  # format: idn-hostname, which Kubernetes does not check
    "headers": Arr(Str()),
    "headerMatches": Arr(Obj("HeaderMatch", {
        "name": Str(min_length=1),
        "value": Str(),
        "secret": SECRET,
        "mismatch": Str(enum=("LOG", "ADD", "DELETE", "REPLACE")),
    }, required=("name",))),
})

KAFKA_RULE = Obj("PortRuleKafka", {
    "role": Str(enum=("produce", "consume")),
    "apiKey": Str(), "apiVersion": Str(), "clientID": Str(),
    "topic": Str(max_length=255),
})

MATCH_NAME = Str(max_length=255, pattern=r"^([-a-zA-Z0-9_]+[.]?)+$",
                 what="a DNS name: letters, digits, '-' and '_' in labels separated by one dot")
MATCH_PATTERN = Str(max_length=255, pattern=r"^([-a-zA-Z0-9_*]+[.]?)+$",
                    what="a DNS name pattern: letters, digits, '-', '_' and '*' in labels "
                         "separated by one dot")
FQDN_SELECTOR = Obj("FQDNSelector", {"matchName": MATCH_NAME, "matchPattern": MATCH_PATTERN},
                    one_of=(("matchName", "matchPattern"),))
DNS_RULE = Obj("PortRuleDNS", {"matchName": MATCH_NAME, "matchPattern": MATCH_PATTERN},
               one_of=(("matchName", "matchPattern"),))

L7_RULES = Obj("L7Rules", {
    "http": Arr(HTTP_RULE),
    "kafka": Arr(KAFKA_RULE),
    "dns": Arr(DNS_RULE),
    "l7proto": Str(),
    "l7": Arr(Map(Str())),
}, one_of=(("http", "kafka", "dns", "l7proto"),))

PORT_RULE = Obj("PortRule", {
    "ports": Arr(PORT_PROTOCOL, max_items=40),
    "rules": L7_RULES,
    "terminatingTLS": TLS_CONTEXT,
    "originatingTLS": TLS_CONTEXT,
    "serverNames": Arr(Str(max_length=255, pattern=r"^(\*?\*\.)?([-a-zA-Z0-9_]+\.?)+$"),
                       min_items=1, unique=True),
    "listener": LISTENER,
})

_DENY_ONLY_PORTS = "deny rules can only list ports (no L7 rules, TLS, serverNames or listener)"
PORT_DENY_RULE = Obj("PortDenyRule", {
    "ports": Arr(PORT_PROTOCOL),  # no maxItems here in the CRD (the agent still caps it at 40)
}, notes={k: _DENY_ONLY_PORTS for k in ("rules", "terminatingTLS", "originatingTLS",
                                         "serverNames", "listener")})

SERVICE = Obj("Service", {
    "k8sService": Obj("K8sServiceNamespace", {"serviceName": Str(), "namespace": Str()}),
    "k8sServiceSelector": Obj("ServiceSelector", {
        "selector": LABEL_SELECTOR, "namespace": Str(),
    }, required=("selector",)),
})

GROUP = Obj("Groups", {
    "aws": Obj("AWSGroup", {
        "labels": Map(Str()), "region": Str(),
        "securityGroupsIds": Arr(Str()), "securityGroupsNames": Arr(Str()),
    }),
})

AUTHENTICATION = Obj("Authentication", {
    "mode": Str(enum=("disabled", "required", "test-always-fail")),
}, required=("mode",))

_REMOVED = {
    "fromRequires": "fromRequires was removed in Cilium 1.19",
    "toRequires": "toRequires was removed in Cilium 1.19",
    "auth": "replaced by authentication: {mode: ...}",
}
_NO_FQDN_IN_DENY = "toFQDNs is only allowed in egress allow rules"
_NO_AUTH_IN_DENY = "deny rules cannot require authentication"

_INGRESS_PEERS = {
    "fromEndpoints": Arr(LABEL_SELECTOR), "fromCIDR": Arr(CIDR), "fromCIDRSet": Arr(CIDR_RULE),
    "fromEntities": Arr(Str(enum=ENTITIES)), "fromGroups": Arr(GROUP),
    "fromNodes": Arr(LABEL_SELECTOR), "icmps": Arr(ICMP_RULE),
}
_EGRESS_PEERS = {
    "toEndpoints": Arr(LABEL_SELECTOR), "toCIDR": Arr(CIDR), "toCIDRSet": Arr(CIDR_RULE),
    "toEntities": Arr(Str(enum=ENTITIES)), "toGroups": Arr(GROUP), "toNodes": Arr(LABEL_SELECTOR),
    "toServices": Arr(SERVICE), "icmps": Arr(ICMP_RULE),
}

INGRESS_RULE = Obj("IngressRule", {
    **_INGRESS_PEERS, "toPorts": Arr(PORT_RULE), "authentication": AUTHENTICATION,
}, notes={**_REMOVED, "toFQDNs": "toFQDNs is only allowed in egress rules"})

INGRESS_DENY_RULE = Obj("IngressDenyRule", {
    **_INGRESS_PEERS, "toPorts": Arr(PORT_DENY_RULE),
}, notes={**_REMOVED, "toFQDNs": _NO_FQDN_IN_DENY, "authentication": _NO_AUTH_IN_DENY})

EGRESS_RULE = Obj("EgressRule", {
    **_EGRESS_PEERS, "toFQDNs": Arr(FQDN_SELECTOR), "toPorts": Arr(PORT_RULE),
    "authentication": AUTHENTICATION,
}, notes=_REMOVED)

EGRESS_DENY_RULE = Obj("EgressDenyRule", {
    **_EGRESS_PEERS, "toPorts": Arr(PORT_DENY_RULE),
}, notes={**_REMOVED, "toFQDNs": _NO_FQDN_IN_DENY, "authentication": _NO_AUTH_IN_DENY})

RULE = Obj("Rule", {
    "endpointSelector": LABEL_SELECTOR,
    "nodeSelector": LABEL_SELECTOR,
    "ingress": Arr(INGRESS_RULE),
    "ingressDeny": Arr(INGRESS_DENY_RULE),
    "egress": Arr(EGRESS_RULE),
    "egressDeny": Arr(EGRESS_DENY_RULE),
    "labels": Arr(Obj("Label", {"key": Str(), "value": Str(), "source": Str()},
                      required=("key",))),
    "description": Str(),
    "enableDefaultDeny": Obj("DefaultDenyConfig", {"ingress": Bool(), "egress": Bool()}),
    "log": Obj("LogConfig", {"value": Str(max_length=32, pattern=r"^\PC*$")}),
}, one_of=(("endpointSelector", "nodeSelector"),),
    any_of=("ingress", "ingressDeny", "egress", "egressDeny"))

POLICY_STATUS = Obj("CiliumNetworkPolicyStatus", {
    "conditions": Arr(Obj("NetworkPolicyCondition", {
        "type": Str(), "status": Str(), "lastTransitionTime": Str(), "reason": Str(),
        "message": Str(),
    }, required=("status", "type"))),
    "derivativePolicies": Map(Obj("CiliumNetworkPolicyNodeStatus", {
        "ok": Bool(), "error": Str(), "lastUpdated": Str(), "localPolicyRevision": Int(),
        "enforcing": Bool(), "annotations": Map(Str()),
    })),
})

CNP = Obj(KIND_CNP, {
    "apiVersion": Str(), "kind": Str(), "metadata": OBJECT_META,
    "spec": RULE, "specs": Arr(RULE), "status": POLICY_STATUS,
}, required=("metadata",), notes=_TOP_NOTES)
CCNP = Obj(KIND_CCNP, CNP.fields, required=CNP.required, notes=_TOP_NOTES)


# --------------------------------------------------------------------------------------------
# NetworkPolicy (networking.k8s.io/v1): OpenAPI plus the API server's ValidateNetworkPolicy
# --------------------------------------------------------------------------------------------

def _requirement_check(r: dict) -> list[tuple[Path, str]]:
    op, values = r.get("operator"), r.get("values") or []
    if op in ("In", "NotIn") and not values:
        return [(("values",), "Required value: must be specified when `operator` is 'In' or "
                              "'NotIn'")]
    if op in ("Exists", "DoesNotExist") and values:
        return [(("values",), "Forbidden: may not be specified when `operator` is 'Exists' or "
                              "'DoesNotExist'")]
    if isinstance(op, str) and op not in ("In", "NotIn", "Exists", "DoesNotExist"):
        hint = _suggest(op, ("In", "NotIn", "Exists", "DoesNotExist"))
        return [(("operator",), f"Invalid value: {_show(op)}: not a valid selector operator"
                                + (f" (did you mean {_show(hint)}?)" if hint else ""))]
    return []


K8S_LABEL_SELECTOR = Obj("LabelSelector", {
    "matchLabels": Map(Str(check=label_value), key_check=qualified_name),
    "matchExpressions": Arr(Obj("LabelSelectorRequirement", {
        "key": Str(check=qualified_name),
        "operator": Str(),
        "values": Arr(Str(check=label_value)),
    }, required=("key", "operator"), checks=(_requirement_check,))),
})


def _port_number(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= 65535:
        return "must be between 1 and 65535, inclusive"
    return None


def _port_name(v: str) -> str | None:
    if not 1 <= len(v) <= 15:
        return "must be no more than 15 characters"
    if not _IANA_SVC_NAME.match(v):
        return "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"
    if v.startswith("-") or v.endswith("-") or "--" in v:
        return "must not begin or end with a hyphen, nor contain adjacent hyphens"
    if not any(c.isalpha() for c in v):
        return "must contain at least one letter (a-z); a port number is written unquoted"
    return None


def _knp_port_check(p: dict) -> list[tuple[Path, str]]:
    errs: list[tuple[Path, str]] = []
    port, end = p.get("port"), p.get("endPort")
    if isinstance(port, str):
        msg = _port_name(port)
        if msg:
            errs.append((("port",), f"Invalid value: {_show(port)}: {msg}"))
    elif _port_number(port):
        errs.append((("port",), f"Invalid value: {_show(port)}: {_port_number(port)}"))
    if _is_int(end):
        end = int(end)
        if port is None:
            errs.append((("endPort",), "Required value: may not be specified when `port` is "
                                       "not specified"))
        elif isinstance(port, str):
            errs.append((("endPort",), "Invalid value: may not be specified when `port` is "
                                       "non-numeric"))
        elif _is_int(port) and end < int(port):
            errs.append((("endPort",), f"Invalid value: {end}: must be greater than or equal "
                                       "to `port`"))
        elif _port_number(end):
            errs.append((("endPort",), f"Invalid value: {end}: {_port_number(end)}"))
    return errs


def _ip_block_check(b: dict) -> list[tuple[Path, str]]:
    cidr = b.get("cidr")
    if cidr == "":
        return [(("cidr",), "Required value")]
    if not isinstance(cidr, str) or not is_cidr(cidr):
        return []  # reported by the format check
    net = ipaddress.ip_network(cidr, strict=False)
    errs: list[tuple[Path, str]] = []
    for i, ex in enumerate(b.get("except") or []):
        if not isinstance(ex, str) or not is_cidr(ex):
            continue
        exn = ipaddress.ip_network(ex, strict=False)
        if (exn.version != net.version or exn.network_address not in net
                or exn.prefixlen <= net.prefixlen):
            errs.append((("except", i), f"Invalid value: {_show(ex)}: must be a strict subset "
                                        "of `cidr`"))
    return errs


def _peer_check(p: dict) -> list[tuple[Path, str]]:
    present = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if p.get(k) is not None]
    if not present:
        return [((), "Required value: must specify a peer (podSelector, namespaceSelector or "
                     "ipBlock)")]
    if "ipBlock" in present and len(present) > 1:
        return [((), "Forbidden: may not specify both ipBlock and another peer")]
    return []


KNP_PEER = Obj("NetworkPolicyPeer", {
    "podSelector": K8S_LABEL_SELECTOR,
    "namespaceSelector": K8S_LABEL_SELECTOR,
    "ipBlock": Obj("IPBlock", {"cidr": CIDR, "except": Arr(CIDR)}, required=("cidr",),
                   checks=(_ip_block_check,)),
}, checks=(_peer_check,))

KNP_PORT = Obj("NetworkPolicyPort", {
    "protocol": Str(enum=("TCP", "UDP", "SCTP")),
    "port": IntOrStr(),
    "endPort": Int(),
}, checks=(_knp_port_check,))

KNP_SPEC = Obj("NetworkPolicySpec", {
    "podSelector": K8S_LABEL_SELECTOR,
    "ingress": Arr(Obj("NetworkPolicyIngressRule", {"from": Arr(KNP_PEER), "ports": Arr(KNP_PORT)},
                       notes={"to": "ingress rules list peers under from"})),
    "egress": Arr(Obj("NetworkPolicyEgressRule", {"to": Arr(KNP_PEER), "ports": Arr(KNP_PORT)},
                      notes={"from": "egress rules list peers under to"})),
    "policyTypes": Arr(Str(enum=("Ingress", "Egress")), max_items=2),
}, required=("podSelector",))

KNP = Obj(KIND_KNP, {
    "apiVersion": Str(), "kind": Str(), "metadata": OBJECT_META, "spec": KNP_SPEC,
}, required=("metadata", "spec"),
    notes={"description": "a NetworkPolicy has no description; use metadata.annotations"})

_SCHEMAS = {KIND_CNP: CNP, KIND_CCNP: CCNP, KIND_KNP: KNP}


# --------------------------------------------------------------------------------------------
# The walker
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _regex(pattern: str):
    """Go's regexp semantics: RE2, and `MatchString` searches (the CRD's anchors are its own)."""
    return re2.compile(pattern)


def _prune_nulls(value: Any) -> Any:
    """The value as the API server stores it: null mapping entries dropped."""
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def _is_int(v: Any) -> bool:
    """JSON integer: an int, or a float with no fraction (as Kubernetes accepts `80.0`)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _show(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return _type_name(v)
    text = json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(word: str, candidates) -> str | None:
    """The candidate the user probably meant: same letters in another case, a close spelling,
    or the one candidate the word starts."""
    candidates = list(candidates)
    for c in candidates:
        if c.lower() == word.lower():
            return c
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.7)
    if close:
        return close[0]
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.7)
    if close:
        return lowered[close[0]]
    starts = [c for c in candidates if len(word) >= 3 and c.lower().startswith(word.lower())]
    return starts[0] if len(starts) == 1 else None


class _Walker:
    def __init__(self, pos_of: PosOf, base: Path, file: str):
        self.pos_of = pos_of
        self.base = base
        self.file = file
        self.errors: list[PolicyError] = []

    def error(self, path: Path, message: str) -> None:
        full = self.base + tuple(path)
        line, col = self.pos_of(full)
        self.errors.append(PolicyError(format_path(full), message, LAYER_SCHEMA, line, col,
                                       self.file))

    def type_error(self, path: Path, expected: str, value: Any) -> None:
        got = _type_name(value)
        msg = f"must be of type {expected}, not {got}"
        if not isinstance(value, (dict, list)) and value is not None:
            msg += f" ({_show(value)})"
        if expected == "string" and got in ("integer", "number", "boolean"):
            msg += f"; quote it: \"{_scalar_text(value)}\""
        self.error(path, msg)

    def walk(self, value: Any, schema: Any, path: Path) -> None:
        if isinstance(schema, Any_):
            return
        if isinstance(schema, Obj):
            self.obj(value, schema, path)
        elif isinstance(schema, Arr):
            self.arr(value, schema, path)
        elif isinstance(schema, Map):
            self.map(value, schema, path)
        elif isinstance(schema, Str):
            self.string(value, schema, path)
        elif isinstance(schema, Int):
            if not _is_int(value):
                return self.type_error(path, "integer", value)
            if schema.minimum is not None and value < schema.minimum:
                self.error(path, f"Invalid value: {_show(value)}: must be greater than or equal "
                                 f"to {schema.minimum}")
            if schema.maximum is not None and value > schema.maximum:
                self.error(path, f"Invalid value: {_show(value)}: must be less than or equal "
                                 f"to {schema.maximum}")
        elif isinstance(schema, Bool):
            if not isinstance(value, bool):
                self.type_error(path, "boolean", value)
        elif isinstance(schema, IntOrStr):
            if isinstance(value, str):
                if schema.pattern and not _regex(schema.pattern).search(value):
                    self.error(path, f"Invalid value: {_show(value)}: "
                                     + _must_match(schema.pattern, schema.what))
            elif not _is_int(value):
                self.type_error(path, "integer or string", value)
        else:  # pragma: no cover - a table bug
            raise TypeError(f"unknown schema node {schema!r}")

    def obj(self, value: Any, s: Obj, path: Path) -> None:
        if not isinstance(value, dict):
            return self.type_error(path, "object", value)
        for key, v in value.items():
            if key not in s.fields:
                self.unknown(key, s, path)
            elif v is not None:  # null = absent (pruned by the API server)
                self.walk(v, s.fields[key], path + (key,))
        present = {k for k, v in value.items() if v is not None and k in s.fields}
        for key in s.required:
            if key not in present:
                self.error(path + (key,), "Required value")
        for group in s.one_of:
            have = [k for k in group if k in present]
            if len(have) != 1:
                what = "none" if not have else " and ".join(have)
                self.error(path, f"must have exactly one of {', '.join(group)} (has {what})")
        if s.any_of and not present.intersection(s.any_of):
            self.error(path, f"must have at least one of {', '.join(s.any_of)}")
        for check in s.checks:
            for sub, msg in check({k: v for k, v in value.items() if v is not None}):
                self.error(path + sub, msg)

    def unknown(self, key: str, s: Obj, path: Path) -> None:
        msg = f"unknown field {json.dumps(key)}"
        note = s.notes.get(key)
        hint = _suggest(key, s.fields)
        if note and hint and hint.lower() == key.lower():
            note = None
        if note:
            msg += f" ({note})"
        elif hint:
            msg += f" (did you mean {json.dumps(hint)}?)"
        self.error(path + (key,), msg)

    def arr(self, value: Any, s: Arr, path: Path) -> None:
        if not isinstance(value, list):
            return self.type_error(path, "array", value)
        if s.max_items is not None and len(value) > s.max_items:
            self.error(path, f"Too many: {len(value)}: must have at most {s.max_items} items")
        if s.min_items is not None and len(value) < s.min_items:
            self.error(path, f"Invalid value: {len(value)} items: must have at least "
                             f"{s.min_items} item" + ("s" if s.min_items != 1 else ""))
        seen = set()
        for i, item in enumerate(value):
            self.walk(item, s.items, path + (i,))
            if s.unique:
                k = json.dumps(item, sort_keys=True, default=str)
                if k in seen:
                    self.error(path + (i,), f"Duplicate value: {_show(item)}")
                seen.add(k)

    def map(self, value: Any, s: Map, path: Path) -> None:
        if not isinstance(value, dict):
            return self.type_error(path, "object", value)
        for key, v in value.items():
            if s.key_check:
                for msg in s.key_check(key):
                    self.error(path + (key,), f"Invalid value: {json.dumps(key)}: {msg}")
            if v is not None:
                self.walk(v, s.values, path + (key,))

    def string(self, value: Any, s: Str, path: Path) -> None:
        if not isinstance(value, str):
            return self.type_error(path, "string", value)
        if s.enum and value not in s.enum:
            msg = (f"Unsupported value: {_show(value)}: supported values: "
                   + ", ".join(json.dumps(e) for e in s.enum))
            hint = next((e for e in s.enum if e.lower() == value.lower()), None)
            if hint:
                msg += f" (did you mean {json.dumps(hint)}?)"
            self.error(path, msg)
        if s.max_length is not None and len(value) > s.max_length:
            self.error(path, f"Too long: may not be longer than {s.max_length} characters")
        if s.min_length is not None and len(value) < s.min_length:
            self.error(path, f"Invalid value: {_show(value)}: must be at least {s.min_length} "
                             "character" + ("s" if s.min_length != 1 else "") + " long")
        if s.pattern and not _regex(s.pattern).search(value):
            self.error(path, f"Invalid value: {_show(value)}: " + _must_match(s.pattern, s.what))
        if s.format == "cidr" and not is_cidr(value):
            self.error(path, f"Invalid value: {_show(value)}: must be a CIDR "
                             "(address/prefix-length, e.g. 10.0.0.0/8 or 2001:db8::/32)")
        if s.check:
            for msg in s.check(value):
                self.error(path, f"Invalid value: {_show(value)}: {msg}")


def _must_match(pattern: str, what: str) -> str:
    return f"must be {what}" if what else f"must match '{pattern}'"


def _scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def validate(value: Any, schema: Any, pos_of: PosOf, base: Path = (), file: str = "") \
        -> list[PolicyError]:
    """Every violation of `schema` by `value` (the object at `base` in its document)."""
    w = _Walker(pos_of, base, file)
    w.walk(value, schema, ())
    return sorted(w.errors, key=lambda e: (e.line, e.column))  # stable: walk order within a line


# --------------------------------------------------------------------------------------------
# One object: classify, validate, build
# --------------------------------------------------------------------------------------------

@dataclass
class Checked:
    """What the schema layer makes of one Kubernetes object."""
    kind: str = ""
    api_version: str = ""
    namespace: str = ""
    name: str = ""
    errors: list[PolicyError] = field(default_factory=list)
    skipped: str | None = None        # notice for a kind that is not a policy
    policy: api.Policy | None = None  # built when there are no errors
    rule_paths: list[str] = field(default_factory=list)  # `spec`, `specs[i]` per policy rule


def check_object(value: Any, pos_of: PosOf, base: Path = (), file: str = "") -> Checked:
    """Classify, validate and (when valid) build one object found at `base` of its document."""
    out = Checked()

    def fail(path: Path, message: str) -> Checked:
        full = base + path
        line, col = pos_of(full)
        out.errors.append(PolicyError(format_path(full) or DOCUMENT_PATH, message, LAYER_SCHEMA,
                                      line, col, file))
        return out

    if not isinstance(value, dict):
        return fail((), f"a document must be a Kubernetes object (a mapping with apiVersion and "
                        f"kind), not {_article(_type_name(value))}")
    api_version, kind = value.get("apiVersion"), value.get("kind")
    out.api_version = api_version if isinstance(api_version, str) else ""
    out.kind = kind if isinstance(kind, str) else ""
    meta = value.get("metadata")
    if isinstance(meta, dict):
        out.name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        out.namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
    for key, v in (("apiVersion", api_version), ("kind", kind)):
        if v is None:
            fail((key,), "Required value: every Kubernetes object needs apiVersion and kind")
        elif not isinstance(v, str):
            fail((key,), f"must be of type string, not {_type_name(v)}")
    if out.errors:
        return out

    if kind not in POLICY_KINDS or POLICY_KINDS[kind] != api_version:
        verdict = _classify_other(api_version, kind)
        if verdict is None:
            named = f" {json.dumps(out.name)}" if out.name else ""
            out.skipped = f"{kind}{named} ({api_version}) is not a network policy"
            return out
        return fail(verdict[0], verdict[1])

    schema = _SCHEMAS[kind]
    out.errors += validate(value, schema, pos_of, base, file)
    if kind == KIND_CCNP:
        out.namespace = ""
    elif not out.namespace:
        out.namespace = "default"  # what `kubectl apply` gives an object without a namespace
    if out.errors:
        return out

    ref = api.PolicyRef(kind=kind, namespace=out.namespace, name=out.name, file=file)
    value = _prune_nulls(value)

    def rel_pos(path: Path) -> api.Pos:
        return pos_of(base + tuple(path))

    if kind == KIND_KNP:
        from . import knp  # written alongside; imported when first needed
        try:
            out.policy = knp.translate(ref, value["spec"], rel_pos)
        except Exception as e:  # a translation bug must not become a traceback for the user
            line, col = rel_pos(("spec",))
            out.errors.append(PolicyError(format_path(base + ("spec",)),
                                          f"cannot translate this NetworkPolicy: {e!r}",
                                          LAYER_AGENT, line, col, file))
            return out
        out.rule_paths = [format_path(base + ("spec",))] * len(out.policy.rules)
        return out

    builder = _ApiBuilder(rel_pos)
    rules, paths = [], []
    if value.get("spec") is not None:
        rules.append(builder.rule(value["spec"], ("spec",)))
        paths.append(("spec",))
    for i, r in enumerate(value.get("specs") or []):
        rules.append(builder.rule(r, ("specs", i)))
        paths.append(("specs", i))
    out.policy = api.Policy(ref=ref, rules=rules, pos=rel_pos(()))
    out.rule_paths = [format_path(base + p) for p in paths]
    return out


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _classify_other(api_version: str, kind: str) -> tuple[Path, str] | None:
    """None for a kind to skip; (path, message) for something that looks like a policy."""
    if kind in POLICY_KINDS:
        return (("apiVersion",), f"Invalid value: {json.dumps(api_version)}: kind {kind} is "
                                 f"served as apiVersion {json.dumps(POLICY_KINDS[kind])}")
    hint = _suggest(kind, POLICY_KINDS)
    if hint is not None and (hint.lower() == kind.lower()
                             or difflib.SequenceMatcher(None, kind.lower(),
                                                        hint.lower()).ratio() >= 0.85):
        return (("kind",), f"unknown kind {json.dumps(kind)} (did you mean {json.dumps(hint)}?)")
    if kind.lower().endswith("networkpolicy") or kind.lower().endswith("networkpolicies"):
        return (("kind",), f"kind {kind} ({api_version}) is not supported: l7gate enforces "
                           + ", ".join(POLICY_KINDS))
    return None


# --------------------------------------------------------------------------------------------
# Building the api form of a validated CNP/CCNP rule
# --------------------------------------------------------------------------------------------

class _ApiBuilder:
    """dict (already valid) -> api dataclasses, with `pos` from the source positions."""

    def __init__(self, pos_of: PosOf):
        self.pos = lambda path: pos_of(tuple(path))

    def rule(self, d: dict, path: Path) -> api.Rule:
        dd = d.get("enableDefaultDeny")
        log = d.get("log") or {}
        return api.Rule(
            endpoint_selector=self.selector(d.get("endpointSelector"),
                                            path + ("endpointSelector",)),
            node_selector=self.selector(d.get("nodeSelector"), path + ("nodeSelector",)),
            ingress=self.entries(d.get("ingress"), path + ("ingress",), "ingress", False),
            ingress_deny=self.entries(d.get("ingressDeny"), path + ("ingressDeny",), "ingress",
                                      True),
            egress=self.entries(d.get("egress"), path + ("egress",), "egress", False),
            egress_deny=self.entries(d.get("egressDeny"), path + ("egressDeny",), "egress", True),
            labels=[api.RuleLabel(key=lb["key"], value=lb.get("value") or "",
                                  source=lb.get("source") or "")
                    for lb in d.get("labels") or []],
            description=d.get("description") or "",
            enable_default_deny=(None if dd is None else api.DefaultDeny(
                ingress=dd.get("ingress"), egress=dd.get("egress"))),
            log=log.get("value") or "",
            pos=self.pos(path),
        )

    def selector(self, d: dict | None, path: Path) -> api.LabelSelector | None:
        if d is None:
            return None
        return api.LabelSelector(
            match_labels=dict(d.get("matchLabels") or {}),
            match_expressions=[api.Requirement(key=e["key"], operator=e["operator"],
                                               values=list(e.get("values") or []))
                               for e in d.get("matchExpressions") or []],
            pos=self.pos(path))

    def selectors(self, items: list | None, path: Path) -> list[api.LabelSelector] | None:
        if items is None:
            return None
        return [self.selector(s, path + (i,)) for i, s in enumerate(items)]

    def entries(self, items: list | None, path: Path, direction: str,
                deny: bool) -> list[api.PeerRule] | None:
        if items is None:
            return None
        return [self.peer(e, path + (i,), direction, deny) for i, e in enumerate(items)]

    def peer(self, e: dict, path: Path, direction: str, deny: bool) -> api.PeerRule:
        side = "from" if direction == "ingress" else "to"

        def get(name: str):
            return e.get(side + name)

        def sub(name: str) -> Path:
            return path + (side + name,)

        cidr_set = get("CIDRSet")
        services = e.get("toServices") if direction == "egress" else None
        fqdns = e.get("toFQDNs") if direction == "egress" and not deny else None
        icmps = e.get("icmps")
        return api.PeerRule(
            direction=direction,
            deny=deny,
            endpoints=self.selectors(get("Endpoints"), sub("Endpoints")),
            cidr=list(get("CIDR")) if get("CIDR") is not None else None,
            cidr_set=None if cidr_set is None else [
                self.cidr_rule(c, sub("CIDRSet") + (i,)) for i, c in enumerate(cidr_set)],
            entities=list(get("Entities")) if get("Entities") is not None else None,
            nodes=self.selectors(get("Nodes"), sub("Nodes")),
            groups=[dict(g) for g in get("Groups")] if get("Groups") is not None else None,
            services=None if services is None else [
                self.service(s, path + ("toServices", i)) for i, s in enumerate(services)],
            fqdns=None if fqdns is None else [
                api.FQDNSelector(match_name=f.get("matchName"),
                                 match_pattern=f.get("matchPattern"),
                                 pos=self.pos(path + ("toFQDNs", i)))
                for i, f in enumerate(fqdns)],
            to_ports=self.port_rules(e.get("toPorts"), path + ("toPorts",)),
            icmps=None if icmps is None else [
                self.icmp_rule(r, path + ("icmps", i)) for i, r in enumerate(icmps)],
            authentication=dict(e["authentication"]) if e.get("authentication") else None,
            pos=self.pos(path),
        )

    def cidr_rule(self, c: dict, path: Path) -> api.CIDRRule:
        return api.CIDRRule(
            cidr=c.get("cidr"), cidr_group_ref=c.get("cidrGroupRef"),
            cidr_group_selector=self.selector(c.get("cidrGroupSelector"),
                                              path + ("cidrGroupSelector",)),
            except_=list(c.get("except") or []), pos=self.pos(path))

    def service(self, s: dict, path: Path) -> api.Service:
        svc, sel = s.get("k8sService"), s.get("k8sServiceSelector")
        return api.Service(
            k8s_service=None if svc is None else api.K8sServiceNamespace(
                service_name=svc.get("serviceName") or "", namespace=svc.get("namespace") or ""),
            k8s_service_selector=None if sel is None else api.ServiceSelector(
                selector=self.selector(sel["selector"], path + ("k8sServiceSelector", "selector")),
                namespace=sel.get("namespace") or ""),
            pos=self.pos(path))

    def icmp_rule(self, r: dict, path: Path) -> api.ICMPRule:
        return api.ICMPRule(
            fields=[api.ICMPField(type=_scalar_text(f["type"]), family=f.get("family") or "IPv4",
                                  pos=self.pos(path + ("fields", i)))
                    for i, f in enumerate(r.get("fields") or [])],
            pos=self.pos(path))

    def port_rules(self, items: list | None, path: Path) -> list[api.PortRule] | None:
        if items is None:
            return None
        return [self.port_rule(p, path + (i,)) for i, p in enumerate(items)]

    def port_rule(self, p: dict, path: Path) -> api.PortRule:
        listener = p.get("listener")
        return api.PortRule(
            ports=[api.PortProtocol(port=pp.get("port") or "", protocol=pp.get("protocol") or "",
                                    end_port=int(pp.get("endPort") or 0),
                                    pos=self.pos(path + ("ports", i)))
                   for i, pp in enumerate(p.get("ports") or [])],
            rules=self.l7(p.get("rules"), path + ("rules",)),
            terminating_tls=self.tls(p.get("terminatingTLS")),
            originating_tls=self.tls(p.get("originatingTLS")),
            server_names=list(p.get("serverNames") or []),
            listener=None if listener is None else api.Listener(
                envoy_config=dict(listener["envoyConfig"]), name=listener["name"],
                priority=int(listener.get("priority") or 0)),
            pos=self.pos(path))

    @staticmethod
    def tls(t: dict | None) -> api.TLSContext | None:
        if t is None:
            return None
        return api.TLSContext(secret=dict(t["secret"]), trusted_ca=t.get("trustedCA") or "",
                              certificate=t.get("certificate") or "",
                              private_key=t.get("privateKey") or "")

    def l7(self, r: dict | None, path: Path) -> api.L7Rules | None:
        if r is None:
            return None
        http, kafka, dns, l7 = r.get("http"), r.get("kafka"), r.get("dns"), r.get("l7")
        return api.L7Rules(
            http=None if http is None else [self.http(h, path + ("http", i))
                                            for i, h in enumerate(http)],
            kafka=None if kafka is None else [
                api.PortRuleKafka(role=k.get("role") or "", api_key=k.get("apiKey") or "",
                                  api_version=k.get("apiVersion") or "",
                                  client_id=k.get("clientID") or "", topic=k.get("topic") or "")
                for k in kafka],
            dns=None if dns is None else [
                api.PortRuleDNS(match_name=x.get("matchName"),
                                match_pattern=x.get("matchPattern"),
                                pos=self.pos(path + ("dns", i)))
                for i, x in enumerate(dns)],
            l7proto=r.get("l7proto") or "",
            l7=None if l7 is None else [dict(m) for m in l7],
            pos=self.pos(path))

    def http(self, h: dict, path: Path) -> api.PortRuleHTTP:
        return api.PortRuleHTTP(
            path=h.get("path") or "", method=h.get("method") or "", host=h.get("host") or "",
            headers=list(h.get("headers") or []),
            header_matches=[api.HeaderMatch(name=m["name"], value=m.get("value") or "",
                                            secret=dict(m["secret"]) if m.get("secret") else None,
                                            mismatch=m.get("mismatch") or "")
                            for m in h.get("headerMatches") or []],
            pos=self.pos(path))
