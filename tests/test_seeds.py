"""The seed tutorials' outcomes, run through the real CLI.

Each row of the truth tables in tests/data/seeds/*.yaml is one `l7gate trace` invocation (a
subprocess on the installed console script) and one test, named `<scenario>/<row name>`. The
tables say what the tutorials say: the verdict (exit 0 allowed, 2 denied) and, where the tutorial
says where the flow is stopped, which part decides it (egress / ingress / L7, drop reason).
The policies they load are the files under policies/ (see policies/README.md).

Also here: `l7gate policy validate` accepts every policy file under policies/ and rejects the
seed's verbatim `PodSelector` typo with a hint; and checks that the data itself is coherent
(every row names endpoints and policy paths that exist, every policy file is used by a row).
"""
from __future__ import annotations

import ipaddress
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from clitool import run_cli

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"
TABLES = ROOT / "tests" / "data" / "seeds"
TYPO = TABLES / "user-db-typo.yaml"
EXIT = {"allowed": 0, "denied": 2}
PARTS = ("egress", "ingress", "l7")
ROW_KEYS = {"name", "says", "policies", "from", "to", "dport", "http", "dns_name", "expect",
            "policy_enforcement"}
EXPECT_KEYS = {"verdict", *PARTS, "policies_include", "policies_exactly"}


def run(args: list[str]) -> subprocess.CompletedProcess:
    return run_cli(args)


def load_tables() -> list[dict]:
    tables = []
    for path in sorted(TABLES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "cases" in doc:  # the typo file is a policy, not a table
            doc["_file"] = path.name
            tables.append(doc)
    return tables


TABLE_LIST = load_tables()
ROWS = [(t, row) for t in TABLE_LIST for row in t["cases"]]


def row_id(item) -> str:
    table, row = item
    return f"{table['scenario']}/{row['name']}"


def policy_files() -> list[Path]:
    """Every policy file under policies/ (endpoints files and the README are not policies)."""
    return sorted(p for p in POLICIES.rglob("*.yaml") if p.name != "endpoints.yaml")


def trace_args(table: dict, row: dict, empty_dir: Path) -> list[str]:
    paths = [str(ROOT / p) for p in row["policies"]] or [str(empty_dir)]
    args = ["trace", "--policies", *paths, "--endpoints", str(ROOT / table["endpoints"]),
            "--from", row["from"], "--to", row["to"], "--dport", str(row["dport"])]
    http = row.get("http") or {}
    for key in ("method", "path", "host"):
        if key in http:
            args += [f"--http-{key}", http[key]]
    for name, value in (http.get("headers") or {}).items():
        args += ["--http-header", f"{name}={value}"]
    if row.get("dns_name"):
        args += ["--dns-name", row["dns_name"]]
    for name, ips in (table.get("fqdn_cache") or {}).items():
        args += ["--fqdn-cache", f"{name}={','.join(ips)}"]
    mode = row.get("policy_enforcement") or table.get("policy_enforcement")
    if mode:
        args += ["--policy-enforcement", mode]
    return args + ["-o", "json"]


def policy_ref(p: dict) -> str:
    return f"{p.get('kind')}/{p.get('namespace') or ''}/{p.get('name')}"


# --- the truth tables through `l7gate trace` ------------------------------------------------------

@pytest.mark.parametrize("item", ROWS, ids=[row_id(i) for i in ROWS])
def test_seed_outcome(item, tmp_path):
    table, row = item
    expect = row["expect"]
    args = trace_args(table, row, tmp_path)
    proc = run(args)
    where = (f"\nseed says: {row['says']}\n$ l7gate {shlex.join(args)}\n"
             f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")

    assert proc.returncode == EXIT[expect["verdict"]], "exit code" + where
    out = json.loads(proc.stdout)
    assert out["verdict"] == expect["verdict"], "verdict" + where
    for part in PARTS:
        for key, want in (expect.get(part) or {}).items():
            got = (out.get(part) or {}).get(key, "<missing>")
            assert got == want, f"{part}.{key}: want {want!r}, got {got!r}" + where
    listed = [policy_ref(p) for p in out.get("policies", [])]
    for ref in expect.get("policies_include", []):
        assert ref in listed, f"policies: {ref} not in {listed}" + where
    if "policies_exactly" in expect:
        assert sorted(listed) == sorted(expect["policies_exactly"]), f"policies: {listed}" + where


# --- policy validate -----------------------------------------------------------------------------

def test_every_policy_file_validates():
    files = policy_files()
    proc = run(["policy", "validate", "-o", "json", *map(str, files)])
    detail = f"\nexit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, "policy validate rejected a file under policies/" + detail
    docs = json.loads(proc.stdout)
    invalid = [d for d in docs if not d.get("valid")]
    assert not invalid, f"invalid: {invalid}" + detail
    reported = {Path(d["file"]).resolve() for d in docs}
    assert {f.resolve() for f in files} <= reported, "every file appears in the report" + detail


def test_seed_typo_podselector_rejected_with_hint():
    proc = run(["policy", "validate", "-o", "json", str(TYPO)])
    detail = f"\nexit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    assert proc.returncode == 1, "the seed's PodSelector typo must be rejected" + detail
    errors = json.loads(proc.stdout)[0]["errors"]
    assert errors, "errors listed" + detail
    assert any("podSelector" in e.get("message", "") for e in errors), "hint names podSelector" + detail


def test_seed_typo_text_output_names_file_and_hint():
    proc = run(["policy", "validate", str(TYPO)])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert f"{TYPO.name}:" in text and "podSelector" in text, text


# --- the data itself (these pass without the engine) ---------------------------------------------

def endpoint_doc(table: dict) -> dict:
    doc = yaml.safe_load((ROOT / table["endpoints"]).read_text())
    return doc if isinstance(doc, dict) else {"endpoints": doc, "services": []}


def test_tables_are_well_formed():
    assert {t["scenario"] for t in TABLE_LIST} == {"starwars", "dns", "namespaces", "sockshop", "kube-system"}
    for table in TABLE_LIST:
        names = [r["name"] for r in table["cases"]]
        assert len(names) == len(set(names)), f"{table['_file']}: duplicate row names"
        for row in table["cases"]:
            label = f"{table['_file']}: {row.get('name')}"
            assert set(row) <= ROW_KEYS, f"{label}: unknown keys {set(row) - ROW_KEYS}"
            assert {"name", "says", "policies", "from", "to", "dport", "expect"} <= set(row), label
            assert set(row["expect"]) <= EXPECT_KEYS, f"{label}: unknown expect keys"
            assert row["expect"]["verdict"] in EXIT, label
            for p in row["policies"]:
                assert (ROOT / p).exists(), f"{label}: no such policy path {p}"


def test_rows_name_known_endpoints():
    for table in TABLE_LIST:
        names = {e["name"] for e in endpoint_doc(table)["endpoints"]}
        for row in table["cases"]:
            for side in ("from", "to"):
                ref = row[side]
                if ref.startswith(("entity:", "ip:")) or "=" in ref:
                    continue
                assert ref in names, f"{table['_file']}: {row['name']}: unknown endpoint {ref}"


def test_endpoint_files_follow_the_format():
    lab = ipaddress.ip_network("10.0.0.0/8")
    for path in sorted(POLICIES.rglob("endpoints.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert isinstance(doc, dict) and set(doc) <= {"endpoints", "services"}, path
        seen = set()
        for ep in doc["endpoints"]:
            assert set(ep) <= {"name", "namespace", "labels", "namespaceLabels", "serviceAccount",
                               "namedPorts", "ips"}, (path, ep)
            assert ep["name"] not in seen, (path, ep["name"])
            seen.add(ep["name"])
            assert all(ipaddress.ip_address(ip) in lab for ip in ep.get("ips", [])), (path, ep)
        for svc in doc.get("services", []):
            assert set(svc) <= {"name", "namespace", "selector", "ips"}, (path, svc)
            assert all(ipaddress.ip_address(ip) in lab for ip in svc.get("ips", [])), (path, svc)


def test_fqdn_cache_uses_documentation_addresses():
    test_nets = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
    for table in TABLE_LIST:
        for name, ips in (table.get("fqdn_cache") or {}).items():
            for ip in ips:
                assert any(ipaddress.ip_address(ip) in n for n in test_nets), (table["_file"], name, ip)


def test_policy_files_say_where_they_come_from():
    for path in policy_files():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Source: "), f"{path}: first line {first!r}"


def test_every_policy_file_is_exercised_by_a_row():
    used: set[Path] = set()
    for table in TABLE_LIST:
        for row in table["cases"]:
            for p in row["policies"]:
                target = ROOT / p
                used |= set(target.rglob("*.yaml")) if target.is_dir() else {target}
    unused = [str(p.relative_to(ROOT)) for p in policy_files() if p not in used]
    assert not unused, f"policy files no truth-table row loads: {unused}"
