"""`l7gate compose inject` (proxy/docker/inject.py): the pure transform and its command body.

Every compose file of ../shared/corpus/awesome-compose is injected; each result passes a structural
check (each enforceable service is joined to its sidecar, which owns the namespace and carries the
ports/networks compose forbids on the app, the agent command, caps, healthcheck and volumes), the rest
of each service is unchanged, re-injection is a no-op, and the real `docker-compose config -q`
(Debian's docker-compose 1.29; skipped when absent) accepts the result. Hand-made cases in
tests/data/compose/ cover unenforceable services, depends_on merging and moved keys/aliases/labels.
"""
from __future__ import annotations

import io
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.docker import inject as inj

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "compose"
CORPUS = ROOT.parent / "shared" / "corpus" / "awesome-compose"
CORPUS_FILES = sorted(p for p in CORPUS.glob("*/compose.y*ml"))
DOCKER_COMPOSE = shutil.which("docker-compose")
# The only corpus service that cannot be enforced, and why.
CORPUS_SKIPPED = {("plex", "plex"): "network_mode: host",
                  ("wireguard", "wireguard"): "cap_add: NET_ADMIN lets the app change"}


def load(path: Path) -> dict:
    return inj.load(path.read_text())


def run(doc: dict, project: str = "proj", services=None):
    return inj.inject(doc, project, "./policies", services)


def check_structure(before: dict, after: dict, report: inj.Report, project: str) -> None:
    """Each injected service is enforced; nothing else about it changed."""
    svcs = after["services"]
    injected = report.by_status("injected") + report.by_status("already-injected")
    for name in injected:
        side_name = name + inj.SUFFIX
        app, side = svcs[name], svcs[side_name]
        assert app["network_mode"] == f"service:{side_name}"
        assert app["depends_on"][side_name] == {"condition": "service_healthy"}
        for key in inj.MOVED_KEYS:
            assert key not in app, (name, key)
        assert not any(str(s).startswith("net.") for s in (app.get("sysctls") or []))
        assert side["image"] == inj.IMAGE
        assert "NET_ADMIN" in side["cap_add"]
        cmd = side["command"]
        assert cmd[:2] == ["l7gate", "run"]
        args = dict(zip(cmd[2::2], cmd[3::2]))
        assert args["--name"] == name and args["--namespace"] == project
        assert args["--policies"] == inj.POLICIES_MOUNT and args["--registry"] == inj.REGISTRY_MOUNT
        assert f"container:com.docker.compose.service={name}" in args["--labels"].split(",")
        assert side["healthcheck"]["test"] == [
            "CMD", "test", "-f", f"{inj.REGISTRY_MOUNT}/agents/{name}.ready"]
        assert f"./policies:{inj.POLICIES_MOUNT}:ro" in side["volumes"]
        assert f"{inj.REGISTRY_VOLUME}:{inj.REGISTRY_MOUNT}" in side["volumes"]
        assert side["labels"][inj.MARKER] == name
        if "network_mode" not in side:
            for net in side["networks"].values():
                assert name in net["aliases"]
        # everything else about the app is unchanged (YAML merge keys already expanded by load)
        orig = before["services"][name]
        if name in report.by_status("injected"):
            ignore = set(inj.MOVED_KEYS) | {"network_mode", "depends_on", "sysctls"}
            assert {k: v for k, v in app.items() if k not in ignore} == \
                {k: v for k, v in orig.items() if k not in ignore}
            for key in inj.MOVED_KEYS:
                if key in orig and key != "networks":
                    assert side[key] == orig[key], (name, key)
    if injected:
        assert inj.REGISTRY_VOLUME in after["volumes"]
    # services that were not injected are untouched
    for name, svc in before["services"].items():
        if name not in report.by_status("injected"):
            assert svcs[name] == svc
    # nothing outside services changed except the registry volume (and a dropped 3.x version)
    for key, value in before.items():
        if key not in ("services", "volumes", "version"):
            assert after[key] == value


def stub_build_contexts(doc: dict, where: Path) -> None:
    """docker-compose config insists build contexts exist; the corpus ships only compose files."""
    for svc in doc["services"].values():
        build = svc.get("build")
        ctx = build if isinstance(build, str) else (build or {}).get("context")
        if ctx:
            (where / ctx).mkdir(parents=True, exist_ok=True)


def compose_config(path: Path) -> subprocess.CompletedProcess:
    """The real tool's normalized view of a file (validates it, interpolates, resolves paths)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(path.parent)}
    return subprocess.run([DOCKER_COMPOSE, "-f", str(path), "config"], check=False, capture_output=True,
                          text=True, cwd=path.parent, env=env, timeout=60)


ENFORCEMENT_KEYS = set(inj.MOVED_KEYS) | {"network_mode", "depends_on", "sysctls"}


def same_except_enforcement(cfg_in: dict, cfg_out: dict) -> list[str]:
    """`docker-compose config` of input and output differ only in what enforcement needs."""
    diffs = []
    for name, svc in cfg_in["services"].items():
        out = cfg_out["services"][name]
        a = {k: v for k, v in svc.items() if k not in ENFORCEMENT_KEYS}
        b = {k: v for k, v in out.items() if k not in ENFORCEMENT_KEYS}
        if a != b:
            diffs.append(f"{name}: {a} != {b}")
    extra = set(cfg_out["services"]) - set(cfg_in["services"])
    diffs += [f"unexpected service {s}" for s in extra if not s.endswith(inj.SUFFIX)]
    return diffs


def test_corpus_present():
    assert len(CORPUS_FILES) == 26, CORPUS


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.parent.name)
def test_corpus_inject(path: Path):
    before = load(path)
    project = inj.project_name(before, path)
    after, report = run(before, project)
    assert before == load(path), "inject must not mutate its input"
    check_structure(before, after, report, project)
    for e in report.entries:
        if (path.parent.name, e.service) in CORPUS_SKIPPED:
            assert e.status == "skipped" and CORPUS_SKIPPED[(path.parent.name, e.service)] in e.reason
        else:
            assert e.status == "injected", e
    assert {e.service for e in report.entries} == set(before["services"])
    # the written YAML reads back to the same document, and re-injection is a no-op
    again = inj.load(inj.dump(after))
    assert again == after
    twice, report2 = run(again, project)
    assert twice == again and not report2.changed
    assert set(report2.by_status("already-injected")) == set(report.by_status("injected"))
    assert set(report2.by_status("sidecar")) == {s + inj.SUFFIX for s in report.by_status("injected")}


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose (Debian package docker-compose 1.29) "
                    "is not installed; `apt-get install docker-compose` to run the real config check")
def test_corpus_docker_compose_config(tmp_path: Path):
    jobs = []
    for path in CORPUS_FILES + sorted(DATA.glob("*.yaml")):
        doc = load(path)
        after, _ = run(doc, inj.project_name(doc, path))
        d = tmp_path / (path.parent.name if path.parent != DATA else path.stem)
        d.mkdir()
        stub_build_contexts(doc, d)
        (d / "policies").mkdir()
        (d / "in.yaml").write_text(path.read_text())
        (d / "out.yaml").write_text(inj.dump(after))
        jobs += [d / "in.yaml", d / "out.yaml"]
    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(jobs, pool.map(compose_config, jobs)))
    bad = {str(p.relative_to(tmp_path)): r.stderr.strip() for p, r in results.items() if r.returncode}
    assert not bad
    for i in range(0, len(jobs), 2):
        diffs = same_except_enforcement(inj.load(results[jobs[i]].stdout), inj.load(results[jobs[i + 1]].stdout))
        assert not diffs, (jobs[i].parent.name, diffs)


def test_unenforceable_reported_and_untouched():
    before = load(DATA / "unenforceable.yaml")
    after, report = run(before)
    status = {e.service: (e.status, e.reason) for e in report.entries}
    assert status["hostnet"][0] == "skipped" and "network_mode: host" in status["hostnet"][1]
    assert status["nonet"][0] == "skipped" and "no network" in status["nonet"][1]
    assert status["buddy"][0] == "skipped" and "enforced together with app" in status["buddy"][1]
    assert status["other"][0] == "skipped" and "container:some-container" in status["other"][1]
    assert status["priv"][0] == "skipped" and "privileged: true lets the app" in status["priv"][1]
    assert status["netadmin"][0] == "skipped" and "cap_add: NET_ADMIN" in status["netadmin"][1]
    assert status["app"][0] == "injected" and status["pinger"][0] == "injected"
    for name in ("hostnet", "nonet", "buddy", "other", "priv", "netadmin"):
        assert after["services"][name] == before["services"][name]
    check_structure(before, after, report, "proj")
    assert after["services"]["app-l7gate"]["ports"] == ["8080:80"]


def test_only_unenforceable_is_a_noop():
    doc = {"services": {"h": {"image": "x", "network_mode": "host"}}}
    after, report = run(doc)
    assert after == doc and not report.changed and "volumes" not in after


def test_depends_on_list_and_map_merged():
    before = load(DATA / "depends.yaml")
    after, report = run(before, services={"listform", "mapform"})
    s = after["services"]
    assert s["listform"]["depends_on"] == {
        "db": {"condition": "service_started"}, "cache": {"condition": "service_started"},
        "listform-l7gate": {"condition": "service_healthy"}}
    assert s["mapform"]["depends_on"] == {
        "db": {"condition": "service_healthy"}, "cache": {"condition": "service_started"},
        "mapform-l7gate": {"condition": "service_healthy"}}
    assert "db-l7gate" not in s and s["db"] == before["services"]["db"]
    assert {e.service for e in report.entries} == {"listform", "mapform"}
    check_structure(before, after, report, "proj")


def test_unknown_service_is_an_error():
    with pytest.raises(ValueError, match="no such service: nope"):
        run(load(DATA / "depends.yaml"), services={"nope"})


def test_moved_keys_aliases_labels():
    before = load(DATA / "moved.yaml")
    assert before["services"]["web"]["ports"][0] == "22:22"  # no YAML 1.1 base-60 surprise
    after, report = run(before, project="rebels")
    check_structure(before, after, report, "rebels")
    web, side = after["services"]["web"], after["services"]["web-l7gate"]
    assert side["ports"] == ["22:22", "8080:80"] and side["expose"] == ["9000"]
    assert side["hostname"] == "web1" and side["domainname"] == "example.test"
    assert side["dns"] == ["9.9.9.9"] and side["extra_hosts"] == ["somehost:162.242.195.82"]
    assert side["links"] == ["api:backend"]
    assert side["networks"] == {"front": {"aliases": ["www", "web", "frontdoor"]},
                                "back": {"aliases": ["web", "frontdoor"]}}
    assert side["sysctls"] == {"net.core.somaxconn": 1024} and web["sysctls"] == {"kernel.msgmax": 65536}
    assert side["restart"] == "unless-stopped" and web["restart"] == "unless-stopped"
    assert web["container_name"] == "frontdoor"
    assert web["environment"] == {"GREETING": "hello $${USER}"}
    labels = side["command"][side["command"].index("--labels") + 1].split(",")
    assert labels == ["container:org=empire", "container:class=deathstar", "container:tier=1",
                      "container:flag=true", "container:com.docker.compose.service=web"]
    api = after["services"]["api-l7gate"]
    assert api["networks"] == {"back": {"aliases": ["api"]}}
    assert api["command"][api["command"].index("--labels") + 1] == \
        "container:org=empire,container:role=api,container:com.docker.compose.service=api"
    assert "version" not in after
    text = "\n".join(report.lines())
    assert "'note' contains a comma" in text and "removed `version: 3.8`" in text
    assert "web: `links: api:backend` points at api" in text
    # key order: the sidecar comes right before its app, other keys keep their order
    assert list(after["services"]) == ["web-l7gate", "web", "api-l7gate", "api"]
    assert list(after) == ["x-common", "services", "networks", "volumes"]


def test_inject_command_roundtrip(tmp_path: Path):
    src = tmp_path / "stack" / "compose.yaml"
    src.parent.mkdir()
    src.write_text((DATA / "depends.yaml").read_text())
    out_file = tmp_path / "stack" / "enforced.yaml"
    buf = io.StringIO()
    assert inj.inject_command([str(src)], "pol", ["listform"], str(out_file), buf) == 0
    doc = inj.load(out_file.read_text())
    side = doc["services"]["listform-l7gate"]
    assert "./pol:/etc/l7gate/policies:ro" in side["volumes"]
    assert side["command"][-1] == "stack"  # project = folder name
    assert "listform: injected" in buf.getvalue()
    buf2 = io.StringIO()
    assert inj.inject_command([str(out_file)], "pol", ["listform"], None, buf2) == 0
    assert inj.load(buf2.getvalue()) == doc  # re-run to stdout: the same document
    assert inj.inject_command([str(tmp_path / "missing.yaml")], None, None, None, io.StringIO()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: [1, 2]\n")
    assert inj.inject_command([str(bad)], None, None, None, io.StringIO()) == 1


def test_image_override_and_replicas_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "compose.yaml"
    src.write_text("services:\n  w:\n    image: x\n    deploy:\n      replicas: 3\n")
    monkeypatch.setenv("L7GATE_SIDECAR_IMAGE", "registry.local/l7gate:1")
    buf = io.StringIO()
    assert inj.inject_command([str(src)], None, None, str(tmp_path / "o.yaml"), buf) == 0
    doc = inj.load((tmp_path / "o.yaml").read_text())
    assert doc["services"]["w-l7gate"]["image"] == "registry.local/l7gate:1"
    assert "./policies:/etc/l7gate/policies:ro" in doc["services"]["w-l7gate"]["volumes"]
    assert "3 replicas" in buf.getvalue()


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose (Debian package docker-compose 1.29) "
                    "is not installed: several -f files are merged by it")
def test_several_files_are_merged_by_compose_first(tmp_path: Path):
    stack = tmp_path / "stack"
    stack.mkdir()
    base, override = stack / "compose.yaml", stack / "compose.override.yaml"
    base.write_text("services:\n  web: {image: nginx, labels: {app: web}}\n  db: {image: postgres}\n")
    override.write_text("services:\n  web: {labels: {tier: front}, ports: ['8080:80']}\n")
    out_file = stack / "enforced.yaml"
    buf = io.StringIO()
    assert inj.inject_command([str(base), str(override)], "pol", None, str(out_file), buf) == 0, buf.getvalue()
    doc = inj.load(out_file.read_text())
    side = doc["services"]["web-l7gate"]
    labels = side["command"][side["command"].index("--labels") + 1].split(",")
    assert {"container:app=web", "container:tier=front"} <= set(labels), "both files' labels"
    assert [str(p) for p in side["ports"]] and "ports" not in doc["services"]["web"], "moved to the sidecar"
    assert doc["services"]["db"]["network_mode"] == "service:db-l7gate"
    assert side["command"][-1] == "stack", "the project is the first file's folder"
    assert compose_config(out_file).returncode == 0
    broken = stack / "broken.yaml"
    broken.write_text("services:\n  web: {ports: 12}\n")
    assert inj.inject_command([str(base), str(broken)], None, None, None, io.StringIO()) == 1
