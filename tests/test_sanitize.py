"""Agent-layer validation (proxy.policy.sanitize): the table in data/sanitize_cases.yaml, then
positions, rule paths and the pure helpers the engine uses.

Inputs are api objects built by `_rule()` below (a strict test-local builder: an unknown key in
the data is an error, so a typo cannot make a case pass by omission)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.policy import api
from proxy.policy.errors import LAYER_AGENT
from proxy.policy.sanitize import (AgentOptions, icmp_type_number, is_service_name,
                                   normalize_protocol, parse_port, sanitize_policy)

CASES = yaml.safe_load((Path(__file__).parent / "data" / "sanitize_cases.yaml").read_text())


# --- a strict dict -> api builder (test-local) ---------------------------------------------------

def _take(d: dict, allowed: set[str]) -> dict:
    unknown = set(d) - allowed
    assert not unknown, f"builder does not know {sorted(unknown)}"
    return d


def _selector(d: dict | None) -> api.LabelSelector | None:
    if d is None:
        return None
    _take(d, {"matchLabels", "matchExpressions"})
    exprs = []
    for e in d.get("matchExpressions") or []:
        _take(e, {"key", "operator", "values"})
        exprs.append(api.Requirement(e["key"], e["operator"], list(e.get("values") or [])))
    return api.LabelSelector(match_labels=dict(d.get("matchLabels") or {}), match_expressions=exprs)


def _opt_list(value, build):
    return None if value is None else [build(v) for v in value]


def _cidr_rule(d: dict) -> api.CIDRRule:
    _take(d, {"cidr", "cidrGroupRef", "cidrGroupSelector", "except"})
    return api.CIDRRule(cidr=d.get("cidr"), cidr_group_ref=d.get("cidrGroupRef"),
                        cidr_group_selector=_selector(d.get("cidrGroupSelector")),
                        except_=list(d.get("except") or []))


def _service(d: dict) -> api.Service:
    _take(d, {"k8sService", "k8sServiceSelector"})
    svc = d.get("k8sService")
    sel = d.get("k8sServiceSelector")
    return api.Service(
        k8s_service=api.K8sServiceNamespace(svc.get("serviceName", ""), svc.get("namespace", ""))
        if svc is not None else None,
        k8s_service_selector=api.ServiceSelector(_selector(sel["selector"]), sel.get("namespace", ""))
        if sel is not None else None)


def _port(d: dict) -> api.PortProtocol:
    _take(d, {"port", "protocol", "endPort"})
    port = d.get("port", "")
    assert isinstance(port, str), f"quote ports in the data: {port!r}"
    return api.PortProtocol(port=port, protocol=d.get("protocol", ""), end_port=d.get("endPort", 0))


def _http(d: dict) -> api.PortRuleHTTP:
    _take(d, {"path", "method", "host", "headers", "headerMatches"})
    matches = []
    for m in d.get("headerMatches") or []:
        _take(m, {"name", "value", "secret", "mismatch"})
        matches.append(api.HeaderMatch(name=m.get("name", ""), value=m.get("value", ""),
                                       secret=m.get("secret"), mismatch=m.get("mismatch", "")))
    return api.PortRuleHTTP(path=d.get("path", ""), method=d.get("method", ""),
                            host=d.get("host", ""), headers=list(d.get("headers") or []),
                            header_matches=matches)


def _kafka(d: dict) -> api.PortRuleKafka:
    _take(d, {"role", "apiKey", "apiVersion", "clientID", "topic"})
    return api.PortRuleKafka(role=d.get("role", ""), api_key=d.get("apiKey", ""),
                             api_version=d.get("apiVersion", ""), client_id=d.get("clientID", ""),
                             topic=d.get("topic", ""))


def _dns(d: dict) -> api.PortRuleDNS:
    _take(d, {"matchName", "matchPattern"})
    return api.PortRuleDNS(match_name=d.get("matchName"), match_pattern=d.get("matchPattern"))


def _l7(d: dict | None) -> api.L7Rules | None:
    if d is None:
        return None
    _take(d, {"http", "kafka", "dns", "l7proto", "l7"})
    return api.L7Rules(http=_opt_list(d.get("http"), _http), kafka=_opt_list(d.get("kafka"), _kafka),
                       dns=_opt_list(d.get("dns"), _dns), l7proto=d.get("l7proto", ""),
                       l7=_opt_list(d.get("l7"), dict))


def _tls(d: dict | None) -> api.TLSContext | None:
    if d is None:
        return None
    _take(d, {"secret", "trustedCA", "certificate", "privateKey"})
    return api.TLSContext(secret=d["secret"])


def _port_rule(d: dict) -> api.PortRule:
    _take(d, {"ports", "rules", "terminatingTLS", "originatingTLS", "serverNames", "listener"})
    listener = d.get("listener")
    return api.PortRule(
        ports=[_port(p) for p in d.get("ports") or []], rules=_l7(d.get("rules")),
        terminating_tls=_tls(d.get("terminatingTLS")), originating_tls=_tls(d.get("originatingTLS")),
        server_names=list(d.get("serverNames") or []),
        listener=api.Listener(listener["envoyConfig"], listener["name"],
                              listener.get("priority", 0)) if listener else None)


def _icmp(d: dict) -> api.ICMPRule:
    _take(d, {"fields"})
    fields = []
    for f in d.get("fields") or []:
        _take(f, {"type", "family"})
        fields.append(api.ICMPField(type=str(f["type"]), family=f.get("family", "IPv4")))
    return api.ICMPRule(fields=fields)


def _fqdn(d: dict) -> api.FQDNSelector:
    _take(d, {"matchName", "matchPattern"})
    return api.FQDNSelector(match_name=d.get("matchName"), match_pattern=d.get("matchPattern"))


# from<X>/to<X> -> (PeerRule attribute, element builder)
_PEER = {"Endpoints": ("endpoints", _selector), "CIDR": ("cidr", str),
         "CIDRSet": ("cidr_set", _cidr_rule), "Entities": ("entities", str),
         "Nodes": ("nodes", _selector), "Groups": ("groups", dict),
         "Services": ("services", _service), "FQDNs": ("fqdns", _fqdn),
         "Requires": ("requires", _selector)}


def _peer(d: dict, direction: str, deny: bool) -> api.PeerRule:
    word = "from" if direction == "ingress" else "to"
    entry = api.PeerRule(direction=direction, deny=deny)
    for key, value in d.items():
        if key == "toPorts":
            entry.to_ports = [_port_rule(p) for p in value]
        elif key == "icmps":
            entry.icmps = [_icmp(i) for i in value]
        elif key == "authentication":
            entry.authentication = value
        else:
            assert key.startswith(word) and key[len(word):] in _PEER, f"unknown peer field {key}"
            attr, build = _PEER[key[len(word):]]
            setattr(entry, attr, [build(v) for v in value])
    return entry


def _rule(d: dict) -> api.Rule:
    _take(d, {"endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress", "egressDeny",
              "description", "labels", "enableDefaultDeny", "log"})

    def entries(key, direction, deny):
        return _opt_list(d.get(key), lambda e: _peer(e, direction, deny))

    return api.Rule(endpoint_selector=_selector(d.get("endpointSelector")),
                    node_selector=_selector(d.get("nodeSelector")),
                    ingress=entries("ingress", "ingress", False),
                    ingress_deny=entries("ingressDeny", "ingress", True),
                    egress=entries("egress", "egress", False),
                    egress_deny=entries("egressDeny", "egress", True),
                    description=d.get("description", ""))


def _policy(case: dict) -> api.Policy:
    rules = [_rule(case["rule"])] if "rule" in case else [_rule(r) for r in case["rules"]]
    kind = case.get("kind", "CiliumNetworkPolicy")
    namespace = "" if kind == "CiliumClusterwideNetworkPolicy" else "default"
    ref = api.PolicyRef(kind, namespace, case.get("policy_name", "p"), "case.yaml")
    return api.Policy(ref, rules)


# --- the table ----------------------------------------------------------------------------------

def _check_case(case: dict) -> None:
    _take(case, {"name", "rule", "rules", "kind", "policy_name", "options", "ok", "error", "path",
                 "errors"})
    errors = sanitize_policy(_policy(case), AgentOptions(**case.get("options", {})))
    if case.get("ok"):
        assert errors == [], [str(e) for e in errors]
        return
    expected = case.get("errors") or [{"error": case["error"], "path": case["path"]}]
    assert [e.path for e in errors] == [x["path"] for x in expected], [str(e) for e in errors]
    for got, want in zip(errors, expected):
        needles = want["error"] if isinstance(want["error"], list) else [want["error"]]
        for needle in needles:
            assert needle in got.message, f"{needle!r} not in {got.message!r}"
        assert got.layer == LAYER_AGENT
        assert got.file == "case.yaml"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case):
    _check_case(case)


def test_table_has_both_kinds_of_case():
    """The table must keep rejections and acceptances, with unique names."""
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    assert sum(1 for c in CASES if c.get("ok")) >= 20
    assert sum(1 for c in CASES if not c.get("ok")) >= 80


# --- cases too long for the data file -----------------------------------------------------------

def _egress_policy(entry: api.PeerRule) -> api.Policy:
    rule = api.Rule(endpoint_selector=api.LabelSelector(), egress=[entry])
    return api.Policy(api.PolicyRef("CiliumNetworkPolicy", "default", "p"), [rule])


def test_match_pattern_longer_than_255_is_rejected():
    pattern = "*." + "a" * 254
    errors = sanitize_policy(_egress_policy(api.PeerRule(
        "egress", fqdns=[api.FQDNSelector(match_pattern=pattern)])))
    assert [e.message for e in errors] == [
        f'Invalid MatchPattern: "{pattern}". Must be <= 255 characters long.']


def test_match_pattern_of_255_is_accepted():
    pattern = "*." + "a" * 253
    assert sanitize_policy(_egress_policy(api.PeerRule(
        "egress", fqdns=[api.FQDNSelector(match_pattern=pattern)]))) == []


def test_dns_rule_pattern_longer_than_255_is_rejected():
    rules = api.L7Rules(dns=[api.PortRuleDNS(match_pattern="a" * 256)])
    entry = api.PeerRule("egress", to_ports=[api.PortRule(
        ports=[api.PortProtocol("53", "UDP")], rules=rules)])
    [error] = sanitize_policy(_egress_policy(entry))
    assert "Must be <= 255 characters long" in error.message
    assert error.path == "spec.egress[0].toPorts[0].rules.dns[0]"


def test_kafka_topic_longer_than_255_is_rejected():
    rules = api.L7Rules(kafka=[api.PortRuleKafka(topic="t" * 256)])
    entry = api.PeerRule("egress", to_ports=[api.PortRule(
        ports=[api.PortProtocol("9092", "TCP")], rules=rules)])
    [error] = sanitize_policy(_egress_policy(entry))
    assert error.message == "kafka topic exceeds maximum len of 255"


# --- positions and paths ------------------------------------------------------------------------

def test_error_takes_the_position_of_the_port():
    port = api.PortProtocol("99999", "TCP", pos=(14, 13))
    entry = api.PeerRule("ingress", to_ports=[api.PortRule(ports=[port], pos=(12, 9))], pos=(10, 5))
    rule = api.Rule(endpoint_selector=api.LabelSelector(), ingress=[entry], pos=(5, 3))
    policy = api.Policy(api.PolicyRef("CiliumNetworkPolicy", "web", "p", "web.yaml"), [rule],
                        pos=(1, 1))
    [error] = sanitize_policy(policy)
    assert (error.line, error.column, error.file) == (14, 13, "web.yaml")
    assert error.path == "spec.ingress[0].toPorts[0].ports[0].port"


def test_unknown_position_falls_back_to_the_nearest_known_one():
    port = api.PortProtocol("99999", "TCP")  # (0, 0): unknown
    entry = api.PeerRule("ingress", to_ports=[api.PortRule(ports=[port])], pos=(10, 5))
    rule = api.Rule(endpoint_selector=api.LabelSelector(), ingress=[entry], pos=(5, 3))
    policy = api.Policy(api.PolicyRef("CiliumNetworkPolicy", "web", "p"), [rule])
    [error] = sanitize_policy(policy)
    assert (error.line, error.column) == (10, 5)


def test_rule_level_error_takes_the_rule_position():
    rule = api.Rule(endpoint_selector=api.LabelSelector(), pos=(4, 1))
    [error] = sanitize_policy(api.Policy(api.PolicyRef("CiliumNetworkPolicy", "a", "p"), [rule]))
    assert (error.path, error.line, error.column) == ("spec", 4, 1)


def test_rule_paths_name_each_rule():
    good = api.Rule(endpoint_selector=api.LabelSelector(), ingress=[api.PeerRule("ingress")])
    bad = api.Rule(endpoint_selector=api.LabelSelector(),
                   ingress=[api.PeerRule("ingress", entities=["mars"])])
    policy = api.Policy(api.PolicyRef("CiliumNetworkPolicy", "a", "p"), [good, bad])
    [error] = sanitize_policy(policy, rule_paths=["spec", "specs[0]"])
    assert error.path == "specs[0].ingress[0].fromEntities[0]"


def test_default_rule_path_of_one_rule_is_spec():
    bad = api.Rule(endpoint_selector=api.LabelSelector(),
                   ingress=[api.PeerRule("ingress", entities=["mars"])])
    [error] = sanitize_policy(api.Policy(api.PolicyRef("CiliumNetworkPolicy", "a", "p"), [bad]))
    assert error.path == "spec.ingress[0].fromEntities[0]"


def test_rule_paths_must_match_the_rules():
    rule = api.Rule(endpoint_selector=api.LabelSelector(), ingress=[api.PeerRule("ingress")])
    with pytest.raises(ValueError):
        sanitize_policy(api.Policy(api.PolicyRef("CiliumNetworkPolicy", "a", "p"), [rule]),
                        rule_paths=["spec", "specs[1]"])


def test_sanitize_does_not_mutate_the_policy():
    port = api.PortProtocol("HTTP", "tcp")
    rule = api.Rule(endpoint_selector=api.LabelSelector(match_labels={"app": "web"}),
                    ingress=[api.PeerRule("ingress", to_ports=[api.PortRule(ports=[port])])])
    policy = api.Policy(api.PolicyRef("CiliumNetworkPolicy", "a", "p"), [rule])
    assert sanitize_policy(policy) == []
    assert (port.port, port.protocol) == ("HTTP", "tcp")
    assert rule.endpoint_selector.match_labels == {"app": "web"}
    assert rule.enable_default_deny is None


def test_knp_kind_gets_no_object_level_checks():
    """NetworkPolicy translations have no name/empty-policy rules of their own here."""
    policy = api.Policy(api.PolicyRef("NetworkPolicy", "a", ""), [])
    assert sanitize_policy(policy) == []


# --- helpers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("80", 80), ("0", 0), ("65535", 65535), ("017", 15), ("0_17", 15), ("8_0", 80), ("00", 0),
    ("0x1F", "0x1f"), ("HTTP", "http"), ("http-alt", "http-alt"), ("0x", "0x"),
], ids=lambda v: repr(v))
def test_parse_port_values(text, value):
    assert parse_port(text) == value


@pytest.mark.parametrize("text,message", [
    ("", "port must be specified"),
    ("65536", 'unable to parse port: strconv.ParseUint: parsing "65536": value out of range'),
    ("08", 'unable to parse port: strconv.ParseUint: parsing "08": invalid syntax'),
    ("80_", 'parsing "80_": invalid syntax'),
    ("8__0", 'parsing "8__0": invalid syntax'),
    ("-1", 'parsing "-1": invalid syntax'),
    ("1-2", 'parsing "1-2": invalid syntax'),
    ("a" * 16, "invalid syntax"),
], ids=lambda v: repr(v))
def test_parse_port_errors(text, message):
    with pytest.raises(ValueError) as exc:
        parse_port(text)
    assert message in str(exc.value)


@pytest.mark.parametrize("name,ok", [
    ("http", True), ("h2c", True), ("a", True), ("x-1", True), ("a" * 15, True),
    ("a" * 16, False), ("80", False), ("-http", False), ("http-", False), ("ht--tp", False),
    ("", False), ("web_ui", False),
], ids=lambda v: repr(v))
def test_is_service_name(name, ok):
    assert is_service_name(name) is ok


@pytest.mark.parametrize("raw,normal", [
    ("", "ANY"), ("tcp", "TCP"), ("Udp", "UDP"), ("SCTP", "SCTP"), ("any", "ANY"),
    ("vrrp", "VRRP"), ("IGMP", "IGMP"),
])
def test_normalize_protocol(raw, normal):
    assert normalize_protocol(raw) == normal


def test_normalize_protocol_rejects_icmp_with_ciliums_message():
    with pytest.raises(ValueError) as exc:
        normalize_protocol("icmp")
    assert str(exc.value) == 'invalid protocol "ICMP", must be { tcp | udp | sctp | vrrp | igmp | any }'


@pytest.mark.parametrize("family,type_,number", [
    ("IPv4", "8", 8), ("IPv4", 0, 0), ("IPv4", "Echo", 8), ("IPv4", "EchoRequest", 8),
    ("IPv4", "ExtendedEchoReply", 43), ("IPv6", "EchoRequest", 128), ("IPv6", "PacketTooBig", 2),
    ("IPv6", "ExtendedEchoReply", 161), ("IPv6", "135", 135), ("", "TimeExceeded", 11),
])
def test_icmp_type_number(family, type_, number):
    assert icmp_type_number(family, type_) == number


@pytest.mark.parametrize("family,type_", [("IPv6", "Echo"), ("IPv4", "PacketTooBig"), ("IPv4", "00")])
def test_icmp_type_number_rejects_names_outside_the_family(family, type_):
    with pytest.raises(ValueError) as exc:
        icmp_type_number(family, type_)
    assert f"ICMP type {type_} not found in {family}" == str(exc.value)
