"""The compiler: pure text out, checked by nft itself (`nft -c -f`) in a scratch namespace."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from needs import nft_unusable_reason

from proxy.datapath import compile as dpc
from proxy.datapath.constants import (DNS_TPROXY_MARK, EGRESS_DROP_MARK, EGRESS_DROP_TAG,
                                      HTTP_REDIRECT_MARK, PROXY_MARK, new_proxy_mark)
from proxy.datapath.state import DatapathState
from proxy.policy.mapstate import MapEntry
from proxy.policy.repository import L7Policy

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data/datapath"
VERDICTS = yaml.safe_load((DATA / "verdicts.yaml").read_text())["cases"]
CASES = yaml.safe_load((DATA / "compile_cases.yaml").read_text())["cases"]


def entry(direction_case: dict) -> MapEntry:
    c = direction_case
    l7 = L7Policy(c["l7"], allow_all=c.get("allow_all", False)) if c.get("l7") else None
    return MapEntry(256, c["proto"], 80, 80, c["verdict"], c.get("reason"), l7)


def state_of(case: dict) -> DatapathState:
    def entries(rows):
        return [MapEntry(i, p, lo, hi, v, r, L7Policy(k, True) if k else None)
                for i, p, lo, hi, v, r, k in rows or []]
    st = DatapathState(ingress_mode=case["ingress_mode"], egress_mode=case["egress_mode"],
                       ingress=entries(case.get("ingress")), egress=entries(case.get("egress")),
                       ipcache={str(k): v for k, v in (case.get("ipcache") or {}).items()},
                       fqdn={str(k): tuple(v) for k, v in (case.get("fqdn") or {}).items()},
                       local_ips=[str(x) for x in case.get("local_ips") or []])
    if "http_port" in case:
        st.http_port, st.dns_port = case["http_port"], case["dns_port"]
    return st


# -- pure -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VERDICTS, ids=[c["name"] for c in VERDICTS])
def test_verdict_chain(case):
    e = entry(case)
    assert dpc.verdict_chain(case["direction"], e) == case["chain"]
    elements = dpc.policy_elements(case["direction"], [e], closed=True)
    text = "".join(x for xs in elements.values() for x in xs)
    assert text.endswith(f"goto {case['closed']}")


@pytest.mark.parametrize("mode,chain", [("off", "ingress_allow"), ("default-deny", "ingress_denied"),
                                        ("default-allow", "ingress_allow")])
def test_a_packet_no_entry_matches_gets_the_mode_default(mode, chain):
    assert dpc.default_chain("ingress", mode) == chain


def test_the_script_replaces_one_table_in_one_transaction():
    script = dpc.compile_table(state_of(CASES[2]))
    lines = script.splitlines()
    assert lines[:3] == ["add table inet l7gate", "delete table inet l7gate", "table inet l7gate {"]
    assert script.count("table inet") == 3, "no other table, no flush, nothing outside ours"
    assert "flush" not in script


def test_entries_land_in_their_maps_keyed_by_identity_protocol_and_ports():
    script = dpc.compile_table(state_of(CASES[2]))
    assert "0x100 . tcp . 80 : goto ingress_http," in script
    assert "0x100 . udp . 8000-8100 : goto ingress_allow," in script
    assert "0x100 . 8 : goto ingress_allow," in script  # ICMP echo request in ingress_icmp4
    assert "0x12c . udp . 53 : goto egress_dns," in script
    assert "0x12c . tcp . 22 : goto egress_deny," in script
    assert "0x1000001 . tcp . 9092 : goto egress_allow," in script  # kafka, with an allow-all
    assert "192.0.2.10 timeout 30s : 0x1000001," in script
    assert "192.0.2.11 : 0x1000001," in script  # no TTL: no timeout
    assert "10.1.0.2 : 0x100," in script and "10.1.0.4-10.255.255.255 : 0x1000002," in script


def test_mode_off_never_looks_up_a_peer():
    script = dpc.compile_table(state_of(CASES[0]))
    body = script[script.index("chain ingress_policy"):]
    body = body[:body.index("}")]
    assert "goto ingress_allow" in body and "vmap" not in body


def test_the_closed_table_without_state_drops_everything_new():
    script = dpc.closed_table()
    for d in ("ingress", "egress"):
        body = script[script.index(f"chain {d}_policy"):]
        body = body[:body.index("}")]
        assert f"goto {d}_denied" in body and "vmap" not in body


def _chain_body(script: str, name: str) -> str:
    body = script[script.index(f"chain {name} {{"):]
    return body[:body.index("\n\t}")]


def test_connections_a_table_allows_carry_its_stamp_and_skip_the_lookups():
    """The verdict cache: allow stamps the ct mark; the hooks accept that stamp first (after
    loopback); the stamp is the table's own (same text, same stamp; other text, other stamp)."""
    a = dpc.compile_table(state_of(CASES[2]))
    stamps = set(re.findall(r"ct mark (?:set )?(0x[0-9a-f]{8})\b", a))
    assert len(stamps) == 1
    stamp = stamps.pop()
    assert int(stamp, 16) & 0x80000000 and "@STAMP@" not in a
    assert a == dpc.compile_table(state_of(CASES[2])), "deterministic"
    for d in ("ingress", "egress"):
        allow = _chain_body(a, f"{d}_allow")
        assert f"ct mark set {stamp} meta mark set 0 accept" in allow
        assert "ct state established ct mark != { 0x4c39, 0x4c38 }" in allow, \
            "a redirected connection keeps its redirect mark"
    for hook in ("prerouting", "output"):
        rules = [r.strip() for r in _chain_body(a, hook).splitlines()]
        first = next(i for i, r in enumerate(rules) if r.startswith("ct "))
        assert rules[first] == f"ct mark {stamp} accept"
        assert all(r.startswith(("iif lo", "oif lo", "meta mark")) for r in rules[3:first]
                   if not r.startswith(("comment", "type"))), "only loopback and the proxies before"
    other = state_of(CASES[2])
    other.ipcache["10.9.9.9/32"] = 0x100
    b = dpc.compile_table(other)
    assert stamp not in b and dpc.table_stamp(b) != dpc.table_stamp(a)
    closed = dpc.closed_table()
    assert "ct state established,related accept" in _chain_body(closed, "prerouting")


def test_bad_states_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="overlapping"):
        dpc.compile_table(DatapathState("default-deny", ingress=[
            MapEntry(256, "TCP", 80, 90, "allow"), MapEntry(256, "TCP", 90, 95, "deny")]))
    with pytest.raises(ValueError, match="mode"):
        dpc.compile_table(DatapathState("sometimes"))
    with pytest.raises(ValueError, match="protocol"):
        dpc.compile_table(DatapathState("default-deny", ingress=[MapEntry(256, "GRE", 0, 0, "allow")]))
    with pytest.raises(ValueError, match="32-bit"):
        dpc.compile_table(DatapathState("default-deny", ingress=[MapEntry(1 << 32, "TCP", 1, 1, "allow")]))
    with pytest.raises(ValueError, match="not an IP address"):
        dpc.compile_table(DatapathState(fqdn={"example.com": (16777217, 5)}))
    with pytest.raises(ValueError, match="proxy port"):
        dpc.compile_table(DatapathState(http_port=0))


def test_fqdn_batch_commands_split_by_family_into_both_maps():
    cmd = dpc.fqdn_add_command([("192.0.2.1", 16777217, 30), ("2001:DB8::1", 16777218, 0)])
    grace = 30 + dpc.ZOMBIE_GRACE
    assert cmd == ("add element inet l7gate fqdn4 { 192.0.2.1 timeout 30s : 0x1000001 }\n"
                   "add element inet l7gate fqdn6 { 2001:db8::1 : 0x1000002 }\n"
                   f"add element inet l7gate fqdnz4 {{ 192.0.2.1 timeout {grace}s : 0x1000001 }}\n"
                   "add element inet l7gate fqdnz6 { 2001:db8::1 : 0x1000002 }\n")
    assert dpc.fqdn_delete_command(["192.0.2.1"]) == ("delete element inet l7gate fqdn4 { 192.0.2.1 }\n"
                                                      "delete element inet l7gate fqdnz4 { 192.0.2.1 }\n")
    assert dpc.fqdn_delete_command(["192.0.2.1"], maps=["fqdnz"]) == \
        "delete element inet l7gate fqdnz4 { 192.0.2.1 }\n"
    assert dpc.fqdn_add_command([]) == ""


def test_compiling_a_large_state():
    st = DatapathState("default-deny", "default-deny",
                       ingress=[MapEntry(256 + i, "TCP", 80, 80, "allow") for i in range(5000)],
                       ipcache={f"10.{i >> 8}.{i & 255}.1/32": 256 + i for i in range(5000)},
                       fqdn={f"100.64.{i >> 8}.{i & 255}": (16777217, 60) for i in range(5000)})
    script = dpc.compile_table(st)  # speed is measured in bench/, not asserted here
    assert script.count(": goto ingress_allow") == 5000


# -- checked by nft -------------------------------------------------------------------------------


needs_nft = pytest.mark.skipif(nft_unusable_reason() is not None,
                                reason=nft_unusable_reason() or "")


@pytest.fixture(scope="module")
def scratch():
    name = f"l7t-{os.getpid()}-chk"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def nft_check(ns: str, script: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"], input=script,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_nft
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_compiled_case_loads(scratch, case):
    st = state_of(case)
    nft_check(scratch, dpc.compile_table(st))
    nft_check(scratch, dpc.closed_table(st))


@needs_nft
def test_the_closed_table_loads(scratch):
    nft_check(scratch, dpc.closed_table())


@needs_nft
def test_in_process_check_agrees_with_nft(scratch):
    from proxy.datapath import nft
    script = dpc.compile_table(state_of(CASES[2]))
    code = ("import sys\nfrom proxy.datapath import nft\nnft.check(sys.stdin.read())\n"
            "try:\n    nft.check('table inet l7gate { chain c { bogus } }')\nexcept nft.NftError as e:\n"
            "    print('refused:', str(e).splitlines()[0])\n")
    proc = subprocess.run(["ip", "netns", "exec", scratch, sys.executable, "-c", code], input=script,
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused: Error:")
    assert nft.NftError("x").message == "x"


def seed_states():
    """Every seed scenario's policy files, one at a time, compiled for every endpoint through the
    agent's own engine -> DatapathState step (proxy.agent.sync.build_state)."""
    from proxy.agent.sync import build_state
    from proxy.fqdn.cache import DNSCache
    from proxy.policy.endpoint import load_endpoints_file
    from proxy.policy.engine import Engine
    from proxy.policy.load import load_paths

    out = []
    for eps_file in sorted(glob.glob(str(ROOT / "policies/*/endpoints.yaml"))):
        scenario = Path(eps_file).parent
        eps, svcs = load_endpoints_file(eps_file)
        files = [f for f in sorted(glob.glob(str(scenario / "**/*.yaml"), recursive=True))
                 if not f.endswith("endpoints.yaml")]
        for f in files:
            policies = load_paths([f]).policies
            if not policies:
                continue
            cache = DNSCache()
            cache.update("api.github.com", ["192.0.2.10"], 60, time.time())
            cache.update("support.github.com", ["192.0.2.11"], 60, time.time())
            engine = Engine(policies, eps, svcs, cache, clock=time.time)
            for ep in eps:
                out.append((f"{Path(f).relative_to(ROOT)}:{ep.name}",
                            build_state(engine, engine.endpoint_peer(ep))))
    return out


@needs_nft
def test_every_seed_policy_compiles_to_a_table_nft_accepts(scratch):
    states = seed_states()
    assert len(states) > 20
    enforced = 0
    for name, st in states:
        script = dpc.compile_table(st)
        try:
            nft_check(scratch, script)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        enforced += st.ingress_mode != "off" or st.egress_mode != "off"
    assert enforced > 10
    redirects = [n for n, st in states if re.search(r"goto (ingress|egress)_(http|dns)",
                                                       dpc.compile_table(st))]
    assert any("l3-l4-l7" in n for n in redirects), "the Star Wars L7 policy redirects to the HTTP proxy"
    assert any("dns/" in n for n in redirects), "the DNS policies redirect to the DNS proxy"


# -- logging allowed NEW connections (flows: policy-verdict ALLOWED) ------------------------------
def test_log_allowed_sends_plain_allows_through_a_logging_chain():
    script = dpc.compile_table(state_of(CASES[2]), log_allowed=True)
    assert "0x100 . udp . 8000-8100 : goto ingress_allowed," in script
    assert "0x100 . tcp . 80 : goto ingress_http," in script  # redirects are L7 flows, not logged
    assert "0x12c . tcp . 22 : goto egress_deny," in script
    assert 'log group 1 prefix "l7gate:ingress:ALLOWED"' in script
    body = script[script.index("chain egress_policy"):]
    assert "goto egress_allowed" in body[:body.index("\n\t}")]  # the default-allow fallback too
    assert "_allowed" not in dpc.compile_table(state_of(CASES[2]))  # off by default


def test_log_allowed_leaves_unenforced_directions_alone():
    script = dpc.compile_table(state_of(CASES[0]), log_allowed=True)
    body = script[script.index("chain ingress_policy"):]
    assert body[:body.index("\n\t}")].endswith("goto ingress_allow")


@needs_nft
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_compiled_case_with_allow_logging_loads(scratch, case):
    nft_check(scratch, dpc.compile_table(state_of(case), log_allowed=True))


def test_the_proxy_mark_is_the_states_and_never_the_published_default_in_a_closed_table():
    marks = {new_proxy_mark() for _ in range(200)}
    assert len(marks) == 200 and all(0 < m < 2**31 for m in marks)
    assert not marks & {PROXY_MARK, DNS_TPROXY_MARK, HTTP_REDIRECT_MARK, EGRESS_DROP_TAG, EGRESS_DROP_MARK}
    secret = marks.pop()
    script = dpc.compile_table(DatapathState(proxy_mark=secret))
    assert f"meta mark {secret:#x} accept" in script and f"{PROXY_MARK:#x}" not in script
    assert f"meta mark {secret:#x} accept" in dpc.closed_table(proxy_mark=secret)
    assert f"{PROXY_MARK:#x}" not in dpc.closed_table(), "a fresh secret mark when none is given"
