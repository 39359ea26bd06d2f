"""Engine verdicts, one case per spec fact: tests/data/engine_cases.yaml."""
from pathlib import Path

import pytest
import yaml

from proxy.fqdn.cache import DNSCache
from proxy.policy import httpmatch
from proxy.policy.endpoint import endpoint_from_dict, service_from_dict
from proxy.policy.engine import Engine
from proxy.policy.load import load_paths
from proxy.policy.trace import parse_dport

CASES = yaml.safe_load((Path(__file__).parent / "data" / "engine_cases.yaml").read_text())["cases"]


def build_engine(case, tmp_path):
    pol = tmp_path / "policies"
    pol.mkdir()
    if case["policies"]:
        (pol / "policies.yaml").write_text(case["policies"])
    result = load_paths([str(pol)])
    bad = [str(e) for d in result.documents for e in d.errors]
    assert not bad, bad
    eps = [endpoint_from_dict(e, "case") for e in case["endpoints"]]
    svcs = [service_from_dict(s, "case") for s in case.get("services", [])]
    cache = DNSCache.from_pairs(case.get("fqdn_cache", []))
    return Engine(result.policies, eps, svcs, cache)


def flow_ids():
    for case in CASES:
        for i, flow in enumerate(case["flows"]):
            yield pytest.param(case, flow, id=f"{case['name']} #{i} {flow[0]}->{flow[1]} {flow[2]}")


@pytest.mark.parametrize("case,flow", list(flow_ids()))
def test_flow_verdict(case, flow, tmp_path):
    src, dst, dport, expected = flow[:4]
    extra = flow[4] if len(flow) > 4 else {}
    engine = build_engine(case, tmp_path)
    proto, port = parse_dport(dport)
    request = None
    if "http" in extra:
        method, path = extra["http"]
        request = httpmatch.HTTPRequest(method=method, path=path, host="", headers=())
    v = engine.evaluate(engine.peer(src), engine.peer(dst), proto, port, request, extra.get("dns"))
    assert ("allowed" if v.allowed else "denied") == expected
    sides = {"egress": v.egress, "ingress": v.ingress}
    if "at" in extra:
        side = sides[extra["at"]]
        assert not side.allowed, f"expected the {extra['at']} side to deny"
    if "reason" in extra:
        reasons = {s.decision.drop_reason for s in sides.values() if s.decision}
        assert extra["reason"] in reasons
    if "layer" in extra:
        l3_denied = any(s.decision and not s.decision.allowed for s in sides.values())
        assert ("L3/L4" if l3_denied else "L7") == extra["layer"]
