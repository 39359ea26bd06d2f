"""The lab without namespaces: file format, plan, DNS zone answers, app handlers (pure values)."""
from __future__ import annotations

import io
import ipaddress
from pathlib import Path

import pytest
import yaml
from dnslib import QTYPE, RCODE, DNSRecord

from proxy.lab import commands, rootless, spec, topology
from proxy.lab.apps import deathstar, echo_http
from proxy.lab.apps.dnsserver import Zone

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "lab"
LABS = sorted((ROOT / "lab").glob("*.yaml"))
INVALID = sorted((DATA / "invalid").glob("*.yaml"))
PY = "/usr/bin/python3"


def plan_of(path: Path | str, state: str = "/run/l7gate/lab/x") -> topology.Plan:
    return topology.plan(spec.load(path), state, PY)


def plan_text(text: str) -> topology.Plan:
    return topology.plan(spec.parse(yaml.safe_load(text), "t.yaml"), "/s", PY)


# -- the lab files shipped in lab/ --------------------------------------------------------------

@pytest.mark.parametrize("path", LABS, ids=lambda p: p.name)
def test_shipped_lab_file_plans_without_problems(path):
    p = plan_of(path)
    assert p.nodes and not p.warnings


SCENARIO = {"starwars": "starwars", "dns": "dns", "namespaces": "namespaces", "sockshop": "sockshop"}


@pytest.mark.parametrize("lab", sorted(SCENARIO))
def test_lab_workloads_match_the_scenario_endpoints_file(lab):
    """Names, namespaces, labels, service accounts and addresses agree with policies/<x>/endpoints.yaml,
    so `l7gate trace` on those files and the live lab describe the same pods."""
    eps = {e["name"]: e for e in yaml.safe_load((ROOT / "policies" / SCENARIO[lab] / "endpoints.yaml")
                                                 .read_text())["endpoints"]}
    p = plan_of(ROOT / "lab" / f"{lab}.yaml")
    for n in p.nodes:
        if n.kind == topology.EXTERNAL or (n.kind == topology.DNS_SERVER and n.name not in eps):
            continue
        e = eps[n.name]
        assert (n.namespace, n.labels, n.service_account, [n.ip]) == \
               (e.get("namespace", "default"), e["labels"], e.get("serviceAccount", "default"), e["ips"]), n.name
        assert n.named_ports == e.get("namedPorts", n.named_ports), n.name


def test_starwars_has_two_deathstar_replicas_behind_one_name():
    p = plan_of(ROOT / "lab" / "starwars.yaml")
    recs = p.zone["records"]
    assert recs["deathstar"]["a"] == ["10.200.0.11", "10.200.0.12"]
    assert recs["deathstar.default.svc.cluster.local"]["a"] == ["10.200.0.11", "10.200.0.12"]
    assert [n.name for n in p.nodes if n.service == "deathstar"] == ["deathstar-1", "deathstar-2"]


def test_dns_lab_external_hosts_have_the_readme_addresses():
    p = plan_of(ROOT / "lab" / "dns.yaml")
    got = {n.name: n.ip for n in p.nodes if n.kind == topology.EXTERNAL}
    assert got == {"api.github.com": "192.0.2.10", "support.github.com": "192.0.2.11",
                   "github.com": "192.0.2.12"}
    assert all(p.zone["records"][h]["a"] == [ip] for h, ip in got.items())


# -- invalid files: one case per file, the expected message in its first line -------------------

@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_lab_file_is_rejected_with_a_precise_message(path):
    expected = path.read_text().splitlines()[0].removeprefix("# error: ")
    with pytest.raises(spec.LabFileError) as exc:
        topology.plan(spec.load(path), "/s", PY)
    assert expected in str(exc.value)


def test_all_problems_of_a_file_are_reported_at_once():
    with pytest.raises(spec.LabFileError) as exc:
        spec.parse({"services": {"a": {"replicas": 0, "enforce": "yes", "bogus": 1}}})
    assert len(exc.value.problems) == 3


# -- addresses -----------------------------------------------------------------------------------

def test_automatic_addresses_dns_at_53_then_from_10_in_file_order():
    p = plan_text("services: {a: {replicas: 2}, b: {}}\nexternal: [example.com]")
    assert {n.name: n.ip for n in p.nodes} == {
        "kube-dns": "10.77.0.53", "a-1": "10.77.0.10", "a-2": "10.77.0.11", "b": "10.77.0.12",
        "example.com": "10.77.0.13"}


def test_automatic_addresses_skip_fixed_ones():
    p = plan_text("services: {a: {}, b: {ip: 10.77.0.10}}")
    assert p.node("a").ip == "10.77.0.11"


def test_small_subnet_allocates_from_its_first_host():
    p = plan_text("subnet: 10.9.8.0/29\nservices: {a: {}, b: {}}")
    assert [n.ip for n in p.nodes] == ["10.9.8.1", "10.9.8.2", "10.9.8.3"]


def test_address_outside_the_subnet_gets_a_host_route_prefix():
    p = plan_text("services: {a: {}}\nexternal: {cilium.io: {ip: 198.51.100.10}}")
    assert (p.node("cilium.io").prefixlen, p.node("a").prefixlen) == (32, 24)


# -- names, zone, resolv.conf ------------------------------------------------------------------

def test_every_namespace_carries_the_lab_prefix_and_is_unique():
    p = plan_of(ROOT / "lab" / "namespaces.yaml")
    names = [p.switch_netns] + [n.netns for n in p.nodes]
    assert all(n.startswith("l7lab-namespaces-") for n in names)
    assert len(set(names)) == len(names)
    assert len({n.veth for n in p.nodes}) == len(p.nodes)
    assert all(len(n.veth) <= 15 for n in p.nodes)


def test_zone_has_short_and_fqdn_names_for_every_service_and_the_dns_server():
    p = plan_of(ROOT / "lab" / "namespaces.yaml")
    recs = p.zone["records"]
    for svc in ("deathstar", "tiefighter", "prometheus"):
        ns = p.node(svc if svc != "deathstar" else "deathstar-1").namespace
        assert recs[svc]["a"] == recs[f"{svc}.{ns}.svc.cluster.local"]["a"]
    assert recs["kube-dns.kube-system.svc.cluster.local"]["a"] == ["10.201.0.53"]


def test_static_records_and_aliases_join_the_zone():
    p = plan_text("services: {a: {}}\nexternal: {github.com: {aliases: [www.github.com], ttl: 5}}\n"
                  "dns: {records: {db.example: 10.77.0.99, alias.example: {cname: db.example}}}")
    recs = p.zone["records"]
    assert recs["www.github.com"] == recs["github.com"] == {"a": [p.node("github.com").ip], "cname": "", "ttl": 5}
    assert recs["db.example"]["a"] == ["10.77.0.99"]
    assert recs["alias.example"]["cname"] == "db.example"


def test_resolv_conf_is_kubelet_style_per_namespace():
    p = plan_of(ROOT / "lab" / "namespaces.yaml")
    text = p.resolv[p.node("prometheus").netns]
    assert "nameserver 10.201.0.53\n" in text
    assert "search monitoring.svc.cluster.local svc.cluster.local cluster.local\n" in text
    assert "options ndots:5\n" in text
    assert "search" not in p.resolv[p.node("cilium.io").netns]


# -- processes and steps ---------------------------------------------------------------------------

def test_python_in_a_command_is_the_labs_interpreter():
    p = plan_text("services: {a: {command: 'python -m http.server 8080'}, b: {command: [sleep, '9']}}")
    by = {x.id: x.argv for x in p.procs}
    assert by["a/app"] == (PY, "-m", "http.server", "8080")
    assert by["b/app"] == ("sleep", "9")


def test_builtin_app_waits_for_its_default_port_and_declared_ports_win():
    p = plan_text("services: {d: {app: deathstar}, e: {app: echo-http, args: [--port, '8080'], ports: [8080]}, i: {}}")
    by = {x.id: x for x in p.procs}
    assert by["d/app"].ports == ((80, "TCP"),)
    assert by["e/app"].ports == ((8080, "TCP"),)
    assert by["i/app"].argv[-1] == "proxy.lab.apps.idle" and by["i/app"].ports == ()


def test_several_commands_run_several_processes_first_one_waited_for():
    p = plan_of(ROOT / "lab" / "namespaces.yaml")
    ids = [x.id for x in p.procs if x.node == "deathstar-1"]
    assert ids == ["deathstar-1/app1", "deathstar-1/app2"]


def test_sidecar_command_line_and_readiness_file():
    p = plan_of(ROOT / "lab" / "starwars.yaml", "/run/l7gate/lab/starwars")
    agent = next(a for a in p.agents if a.node == "tiefighter")
    assert agent.argv == (PY, "-m", "proxy.cli", "run", "--policies", "/run/l7gate/lab/starwars/policies",
                          "--registry", "/run/l7gate/lab/starwars/registry", "--name", "tiefighter",
                          "--labels", "org=empire,class=tiefighter,app.kubernetes.io/name=tiefighter",
                          "--namespace", "default", "--service-account", "default",
                          "--metrics", "127.0.0.1:9965", "--log-allowed")
    assert agent.ready_file == "/run/l7gate/lab/starwars/registry/agents/tiefighter.ready"
    assert {a.node for a in p.agents} == {"deathstar-1", "deathstar-2", "tiefighter", "xwing"}


def test_workloads_without_sidecar_are_published_passively():
    p = plan_of(ROOT / "lab" / "starwars.yaml")
    assert [r["name"] for r in p.passive] == ["kube-dns"]
    assert p.passive[0]["labels"] == {"k8s:k8s-app": "kube-dns"}
    p = plan_text("services: {a: {enforce: false, labels: {app: a}}}")
    assert {r["name"] for r in p.passive} == {"kube-dns", "a"}


def test_services_carry_selectors_for_to_services():
    p = plan_of(ROOT / "lab" / "starwars.yaml")
    svc = next(s for s in p.services if s["name"] == "deathstar")
    assert svc == {"name": "deathstar", "namespace": "default",
                   "selector": {"org": "empire", "class": "deathstar"}, "ips": []}


def test_steps_never_act_outside_the_labs_namespaces():
    p = plan_of(ROOT / "lab" / "dns.yaml", "/run/l7gate/lab/dns")
    steps = p.steps()
    lab_ns = {p.switch_netns} | {n.netns for n in p.nodes}
    for s in steps:
        if s.kind in ("ip", "sysctl", "spawn"):
            assert s.args["netns"] in lab_ns, s
        if s.kind == "netns":
            assert s.args["name"] in lab_ns
        if s.kind in ("file", "etcdir"):
            assert s.args["path"].startswith("/etc/netns")
        if s.kind in ("statedir", "statefile"):
            assert s.args["path"].startswith("/run/l7gate/lab/dns/")
    kinds = [s.kind for s in steps]
    assert kinds.index("netns") < kinds.index("ip") < kinds.index("spawn")


def test_no_agents_leaves_out_sidecars_and_their_wait():
    p = plan_of(ROOT / "lab" / "starwars.yaml")
    assert not any(s.args.get("id", "").endswith("/agent") for s in p.steps(no_agents=True))
    assert any(s.kind == "wait_files" for s in p.steps(no_agents=False))


# -- DNS server answers (vectors in tests/data/lab/dns-cases.yaml) ----------------------------------

DNS = yaml.safe_load((DATA / "dns-cases.yaml").read_text())


@pytest.fixture(scope="module")
def zone(tmp_path_factory):
    path = tmp_path_factory.mktemp("zone") / "zone.json"
    import json
    path.write_text(json.dumps(DNS["zone"]))
    return Zone(str(path))


@pytest.mark.parametrize("case", DNS["cases"], ids=lambda c: c["name"])
def test_dns_server_answer(zone, case):
    reply = DNSRecord.parse(zone.handle(DNSRecord.question(case["qname"], case["qtype"]).pack()))
    assert RCODE[reply.header.rcode] == case["rcode"]
    if "a" in case:
        assert sorted(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A) == sorted(case["a"])
    if "cname" in case:
        assert [str(r.rdata) for r in reply.rr if r.rtype == QTYPE.CNAME] == case["cname"]
    if "ttl" in case:
        assert {r.ttl for r in reply.rr} == {case["ttl"]}
    assert reply.header.aa == 1 and reply.header.qr == 1


def test_dns_server_drops_garbage_and_responses(zone):
    assert zone.handle(b"\x00\x01garbage") is None
    q = DNSRecord.question("deathstar")
    q.header.qr = 1
    assert zone.handle(q.pack()) is None


# -- app handlers -----------------------------------------------------------------------------------

STARWARS = [
    ("POST", "/v1/request-landing", 200, b"Ship landed\n"),
    ("PUT", "/v1/exhaust-port", 200, b"Panic: deathstar exploded\n"),
    ("GET", "/v1/healthz", 200, b"ok\n"),
    ("GET", "/v1/request-landing", 404, b"404 page not found\n"),
    ("DELETE", "/v1/exhaust-port", 404, b"404 page not found\n"),
]


@pytest.mark.parametrize("method,path,status,body", STARWARS, ids=lambda x: str(x))
def test_deathstar_answers_like_the_starwars_image(method, path, status, body):
    assert deathstar.handler_for("deathstar-1")(method, path, {}, b"")[:2] == (status, body)


def test_deathstar_describes_itself_as_json():
    import json
    status, body, ctype = deathstar.handler_for("deathstar-2")("GET", "/v1/", {}, b"")
    assert (status, ctype, json.loads(body)["hostname"]) == (200, "application/json", "deathstar-2")


def test_echo_http_names_host_method_and_path():
    h = echo_http.handler_for("api.github.com")
    assert h("GET", "/x?y=1", {"host": "api.github.com"}, b"")[1] == b"api.github.com GET /x?y=1 host=api.github.com\n"


# -- privileges ---------------------------------------------------------------------------------------

def test_without_root_or_user_namespaces_up_says_so_and_touches_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(rootless.ENV, raising=False)
    monkeypatch.setattr(rootless.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(commands.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(rootless, "userns_available", lambda: (False, "user namespaces are disabled"))
    monkeypatch.setattr(rootless, "holders", dict)
    monkeypatch.setattr(rootless, "reexec", lambda **kw: pytest.fail("must not re-exec"))
    out = io.StringIO()
    rc = commands.up(str(ROOT / "lab" / "starwars.yaml"), True, root=str(tmp_path), out=out)
    assert rc == 2
    assert "needs root, or unprivileged user namespaces" in out.getvalue()
    assert list(tmp_path.iterdir()) == []


def test_invalid_file_is_reported_before_anything_happens(tmp_path):
    out = io.StringIO()
    rc = commands.up(str(DATA / "invalid" / "unknown-field.yaml"), True, root=str(tmp_path), out=out)
    assert rc == 2 and "unknown field 'replica'" in out.getvalue()
    assert list(tmp_path.iterdir()) == []


def test_subnet_default_is_a_private_range():
    assert ipaddress.IPv4Network(spec.DEFAULT_SUBNET).is_private
