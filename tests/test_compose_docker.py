"""The compose side under a real Docker engine: the sidecar image, the Star Wars stack, the demo.

`l7gate compose build` makes the images (a rebuild reuses the debootstrap base and takes seconds);
compose/starwars/docker-compose.yml comes up healthy with every agent unprivileged but NET_ADMIN;
`l7gate demo starwars --compose` passes all ten steps through the real CLI and leaves nothing
behind, also when interrupted; DNS sent to Docker's resolver at 127.0.0.11 goes through the DNS
proxy (a denied name is REFUSED) while Docker's own NAT rules stay; a killed sidecar leaves its app
with no network at all (fail closed).

The `docker_engine` fixture uses the running engine, or starts `dockerd` itself when it is root and
dockerd is installed (and stops only that one); otherwise the Docker tests are skipped with the
reason. Every stack is a compose project `l7gate-test-<pid>-...` taken down with `down -v
--remove-orphans` in a finally: only what these tests created is ever removed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from clitool import ROOT, Output, l7gate, run_cli
from proxy.docker import inject as inj
from proxy.docker.demo import Workload, project_containers, workloads_of

COMPOSE_FILE = ROOT / "compose" / "starwars" / "docker-compose.yml"
PLAIN_FILE = ROOT / "compose" / "starwars" / "plain.yml"
PREFIX = f"l7gate-test-{os.getpid()}"
COMPOSE = shutil.which("docker-compose")
BUILD_TIMEOUT = 1200  # a cold build runs debootstrap
CLIENT = ["python", "-m", "proxy.lab.apps.client", "--timeout", "2"]
CAP_NET_ADMIN = 1 << 12

# Docker's resolver answers at 127.0.0.11; tiefighter may only ask it for `deathstar`.
DNS_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tiefighter-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
    - toCIDR: [127.0.0.11/32]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchName: deathstar}]}
    - toEndpoints: [{matchLabels: {class: deathstar}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
# One DNS query to Docker's resolver, answered with `NAME RCODE IP,IP...`.
DIG = """\
import socket, sys
from dnslib import DNSRecord, RCODE
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(DNSRecord.question(sys.argv[1]).pack(), ("127.0.0.11", 53))
r = DNSRecord.parse(s.recvfrom(4096)[0])
print(sys.argv[1], RCODE[r.header.rcode], ",".join(sorted(str(a.rdata) for a in r.rr)))
"""


def _docker_ok() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _compose(project: str, *args: str, policies: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if policies:
        env["L7GATE_POLICIES"] = policies
    return subprocess.run([COMPOSE, "-p", project, "-f", str(COMPOSE_FILE), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def leftovers(project: str) -> list[str]:
    """Containers, networks and volumes of the compose project that still exist."""
    found = []
    for kind in ("container", "network", "volume"):
        cmd = ["docker", kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"]
        if kind == "container":
            cmd.insert(3, "-a")
        found += [f"{kind} {x}" for x in subprocess.run(cmd, capture_output=True, text=True).stdout.split()]
    return found


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """A Docker engine for the session: the running one, or a dockerd started (and stopped) here."""
    if shutil.which("docker") is None or COMPOSE is None:
        pytest.skip("needs the docker client and docker-compose (Debian: docker.io docker-compose)")
    if _docker_ok():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("Docker is not running, and starting dockerd needs root and dockerd (docker.io)")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _docker_ok() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _docker_ok():
            pytest.skip("dockerd did not come up: " + " | ".join(log_path.read_text().splitlines()[-3:]))
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def built(docker_engine) -> str:
    """`l7gate compose build` (the offline base, cold or warm); its output."""
    p = run_cli(["compose", "build"], timeout=BUILD_TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@dataclass
class Stack:
    project: str
    policies: Path
    workloads: dict[str, Workload]

    def exec(self, workload: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", self.workloads[workload].app, *argv],
                              capture_output=True, text=True, timeout=60)

    def agent(self, workload: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", self.workloads[workload].sidecar, "l7gate", *argv],
                              capture_output=True, text=True, timeout=60)

    def set_policies(self, files: dict[str, str], wait_for: str = "tiefighter") -> None:
        """Replace the policies and wait until every sidecar reports exactly their names."""
        for old in self.policies.iterdir():
            old.unlink()
        for name, text in files.items():
            (self.policies / name).write_text(text)
        want = sorted(inj.load(t)["metadata"]["name"] for t in files.values())
        got: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            p = self.agent(wait_for, "policy", "get", "-o", "json")
            got = json.loads(p.stdout) if p.returncode == 0 else {}
            if set(got) == set(self.workloads) and \
                    all(sorted(x["name"] for x in r["policies"]) == want for r in got.values()):
                return
            time.sleep(0.2)
        raise AssertionError(f"the sidecars do not report {want}: {got}")


@pytest.fixture(scope="module")
def stack(built):
    project = f"{PREFIX}-stack"
    policies = Path(tempfile.mkdtemp(prefix=f"{project}-policies-"))
    policies.chmod(0o755)
    try:
        up = _compose(project, "up", "-d", policies=str(policies))
        assert up.returncode == 0, up.stdout + up.stderr
        yield Stack(project, policies, workloads_of(project_containers(project)))
    finally:
        _compose(project, "down", "-v", "--remove-orphans", policies=str(policies))
        shutil.rmtree(policies, ignore_errors=True)
    assert leftovers(project) == []


# -- no engine needed ----------------------------------------------------------------------------

def test_the_star_wars_stack_is_the_plain_stack_through_inject():
    """docker-compose.yml = inject(plain.yml) + the read-only services directory on each sidecar."""
    want, report = inj.inject(inj.load(PLAIN_FILE.read_text()), "default", "${L7GATE_POLICIES:-./policies}")
    assert report.by_status("injected") == ["deathstar-1", "deathstar-2", "tiefighter", "xwing"]
    for name, svc in want["services"].items():
        if name.endswith(inj.SUFFIX):
            svc["volumes"].append(f"./services:{inj.REGISTRY_MOUNT}/services:ro")
    assert inj.load(COMPOSE_FILE.read_text()) == want


@pytest.mark.skipif(COMPOSE is None, reason="needs docker-compose")
def test_docker_compose_accepts_the_star_wars_stack():
    p = subprocess.run([COMPOSE, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_compose_demo_of_a_demo_without_a_stack_is_a_usage_error():
    p = run_cli(["demo", "dns", "--compose"])
    assert p.returncode == 2
    assert "has no compose stack" in p.stdout and "starwars" in p.stdout


# -- images --------------------------------------------------------------------------------------

def test_a_second_build_reuses_the_base_and_the_image(built):
    p = run_cli(["compose", "build"], timeout=BUILD_TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("base:   l7gate-base:") and lines[0].split()[2] == "reused", p.stdout
    assert f"image:  {inj.IMAGE} up to date" in p.stdout, p.stdout
    assert "built: nothing (all up to date)" in lines[-1], p.stdout


# -- the stack -----------------------------------------------------------------------------------

def test_the_stack_comes_up_with_healthy_unprivileged_sidecars(stack):
    assert sorted(stack.workloads) == ["deathstar-1", "deathstar-2", "tiefighter", "xwing"]
    for w in stack.workloads.values():
        state = json.loads(subprocess.run(["docker", "inspect", "--format", "{{json .State}}", w.sidecar],
                                          capture_output=True, text=True).stdout)
        assert state["Health"]["Status"] == "healthy", w.sidecar
        agent = subprocess.run(["docker", "exec", w.sidecar, "cat", "/proc/1/status"],
                               capture_output=True, text=True).stdout
        status = dict(line.split(":\t", 1) for line in agent.splitlines() if ":\t" in line)
        assert status["Uid"].split()[0] == "10001"  # the agent: the image's l7gate user
        assert int(status["CapEff"], 16) == CAP_NET_ADMIN  # and NET_ADMIN only
        assert int(status["CapAmb"], 16) == CAP_NET_ADMIN  # kept by the `ip` it runs
    endpoints = json.loads(stack.agent("xwing", "endpoint", "list", "-o", "json").stdout)
    labels = {e["name"]: e["labels"] for e in endpoints}
    assert "container:org=empire" in labels["default/deathstar-1"]
    assert "container:class=deathstar" in labels["default/deathstar-2"]
    assert "container:org=alliance" in labels["default/xwing"]
    assert "container:com.docker.compose.service=tiefighter" in labels["default/tiefighter"]


def test_dns_to_dockers_resolver_goes_through_the_dns_proxy(stack):
    stack.set_policies({"dns.yaml": DNS_POLICY})
    deathstars = ",".join(sorted(stack.workloads[w].ip for w in ("deathstar-1", "deathstar-2")))
    allowed = stack.exec("tiefighter", "python", "-c", DIG, "deathstar")
    assert allowed.stdout.split() == ["deathstar", "NOERROR", deathstars], allowed.stderr
    denied = stack.exec("tiefighter", "python", "-c", DIG, "xwing")
    assert denied.stdout.split() == ["xwing", "REFUSED"], denied.stderr
    landing = stack.exec("tiefighter", *CLIENT, "-X", "POST", "--url", "http://deathstar/v1/request-landing")
    assert landing.stdout.strip() == "Ship landed", landing.stderr
    flows = stack.agent("tiefighter", "observe", "--last", "50", "--type", "l7", "-o", "json").stdout
    dns = [f["flow"] for f in map(json.loads, flows.splitlines()) if "dns" in f["flow"]["l7"]]
    refused = [f for f in dns if f["l7"]["dns"].get("query") == "xwing." and f["verdict"] == "DROPPED"]
    assert refused, flows
    assert refused[0]["source"].get("pod_name") == "tiefighter", "from 127.0.0.1: the endpoint itself"
    # Docker's NAT rules for its resolver are still there next to ours
    tables = subprocess.run(["docker", "exec", stack.workloads["tiefighter"].sidecar, "python", "-c",
                             "from proxy.datapath import nft; print(nft.run('list tables'))"],
                            capture_output=True, text=True)
    assert "table ip nat" in tables.stdout and "table inet l7gate" in tables.stdout, tables.stderr


def test_a_killed_sidecar_leaves_its_app_without_network(stack):
    """Last in the module: it breaks tiefighter's namespace."""
    stack.set_policies({})
    url = f"http://{stack.workloads['deathstar-1'].ip}/v1/request-landing"
    before = stack.exec("tiefighter", *CLIENT, "-X", "POST", "--url", url)
    assert before.stdout.strip() == "Ship landed", before.stderr  # no policy: open
    subprocess.run(["docker", "kill", stack.workloads["tiefighter"].sidecar], check=True, capture_output=True)
    after = stack.exec("tiefighter", *CLIENT, "-X", "POST", "--url", url)
    assert after.stdout.strip() in ("UNREACHABLE", "TIMEOUT"), after.stdout + after.stderr
    by_name = stack.exec("tiefighter", *CLIENT, "-X", "POST", "--url", "http://deathstar/v1/request-landing")
    assert by_name.stdout.strip() in ("UNRESOLVED", "TIMEOUT"), by_name.stdout + by_name.stderr
    links = stack.exec("tiefighter", "cat", "/proc/net/dev").stdout
    assert [ln.split(":")[0].strip() for ln in links.splitlines()[2:]] == ["lo"], links


# -- the demo ------------------------------------------------------------------------------------

def test_demo_starwars_compose_passes_and_leaves_nothing(built):
    project = f"{PREFIX}-demo"
    try:
        p = subprocess.run([*l7gate(), "demo", "starwars", "--compose"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=dict(os.environ, COMPOSE_PROJECT_NAME=project))
        text = p.stdout
        assert p.returncode == 0, text + p.stderr
        assert "✔ 10/10 steps as the tutorial says" in text, text
        assert text.count("  ✔\n") == 10 and "✘" not in text, text
        assert text.count(f"$ docker exec {project}") == 10, text
        assert f"stack {project} removed" in text, text
    finally:
        _compose(project, "down", "-v", "--remove-orphans")
    assert leftovers(project) == []


@pytest.mark.parametrize("when", ["starting stack", "[4/10]"])
def test_interrupted_compose_demo_takes_the_stack_down(built, when):
    project = f"{PREFIX}-int{when.strip('[]/ ')[:2].replace('/', '')}"
    env = dict(os.environ, COMPOSE_PROJECT_NAME=project, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*l7gate(), "demo", "starwars", "--compose"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = Output(proc)
        assert out.until(when, 300), str(out)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, str(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _compose(project, "down", "-v", "--remove-orphans")
    text = out.rest()
    assert "interrupted" in text and f"stack {project} removed" in text, text
    assert leftovers(project) == []


# -- a stack of the user's own, through inject ----------------------------------------------------
SHOP_FILE = ROOT / "tests" / "data" / "compose" / "shop.yml"
SHOP_POLICIES = {
    "db.yaml": """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: web}}]
      toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""",
    "payments.yaml": """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: payments-read-only, namespace: shop}
spec:
  endpointSelector: {matchLabels: {tier: external}}
  ingress:
    - fromEndpoints: [{matchLabels: {tier: frontend}}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules: {http: [{method: GET, path: "/api/.*"}]}
""",
}


def test_a_users_own_stack_runs_enforced_through_inject(built, tmp_path):
    """The user's file stays as it is; `compose inject` writes the enforced one, which comes up
    and enforces the KNP/CNP-style policies by the stack's own compose labels."""
    original = SHOP_FILE.read_bytes()
    policies = tmp_path / "policies"
    policies.mkdir()
    policies.chmod(0o755)
    enforced = tmp_path / "enforced.yml"
    # the compose project name is the endpoints' namespace: `shop`, the policies' namespace
    p = subprocess.run([*l7gate(), "compose", "inject", "-f", str(SHOP_FILE), "--policies", str(policies),
                        "-o", str(enforced)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env=dict(os.environ, COMPOSE_PROJECT_NAME="shop"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert SHOP_FILE.read_bytes() == original, "the user's file is never written"
    project = f"{PREFIX}-shop"
    compose = [COMPOSE, "-p", project, "-f", str(enforced)]
    try:
        up = subprocess.run([*compose, "up", "-d"], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        stack = Stack(project, policies, workloads_of(project_containers(project)))
        assert set(stack.workloads) == {"web", "db", "payments"}
        assert client_of(stack)("web", "-X", "POST", "--url", "http://payments/api/charge").startswith(
            "payments POST"), "no policy yet: open"
        stack.set_policies(SHOP_POLICIES, wait_for="web")

        client = client_of(stack)
        assert client("web", "--tcp", "db:5432", "--send", "select 1") == "select 1"
        assert client("web", "--url", "http://payments/api/balance").startswith("payments GET /api/balance")
        assert client("web", "-X", "POST", "--url", "http://payments/api/charge") == "Access denied"
        assert client("payments", "--tcp", "db:5432") == "TIMEOUT", "only web may reach the database"
        assert client("db", "--url", "http://payments/api/balance") == "TIMEOUT", "db is not a frontend"
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], capture_output=True, text=True,
                       timeout=300)
    assert leftovers(project) == []


def client_of(stack: Stack):
    """`client(workload, *args)`: the lab client's one-line answer from inside the app container."""
    def client(who: str, *argv: str) -> str:
        return stack.exec(who, *CLIENT, *argv).stdout.strip()
    return client
