"""The lab in real network namespaces (root and iproute2 needed; skipped otherwise).

Every lab gets a name unique to this test run and a private state root, and is removed by a
finalizer even when a test fails; a last sweep deletes any namespace still carrying this run's
prefix. Sidecars are off (`--no-agents`): these tests are about the lab itself.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from proxy.lab import commands, netns, topology
from proxy.lab.commands import Lab, start
from proxy.lab.netns import LabError, LabExists, teardown
from proxy.lab.spec import load

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="lab integration tests need root and iproute2 (CI runs them as root)")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "lab"
RUN = uuid.uuid4().hex[:5]  # this run's labs are t<RUN>...: nothing else can carry that prefix
CLIENT = ["python", "-m", "proxy.lab.apps.client"]


def lab_netns(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(topology.netns_prefix(name))]


def lab_processes(name: str) -> list[int]:
    """Processes started for lab `name` (every lab process carries L7LAB=<name>; names are unique
    to this run), found by scanning /proc: how a leak would show."""
    token = f"L7LAB={name}".encode() + b"\0"
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token in (d / "environ").read_bytes() and netns.proc_start_time(int(d.name)):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


class Labs:
    """Starts labs under a private state root; `cleanup` removes them whatever happened."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: list[str] = []

    def name(self, tag: str) -> str:
        n = f"t{RUN}{tag}"
        self.names.append(n)
        return n

    def up(self, file: Path | str, tag: str, **kw) -> Lab:
        spec = load(file)
        spec.name = self.name(tag)
        return start(spec, no_agents=True, root=str(self.root), **kw)

    def cleanup(self) -> None:
        for n in self.names:
            teardown(self.root / n)
            # A sweep for anything a failed test left, ours by this run's unique lab name.
            for pid in lab_processes(n):
                os.kill(pid, signal.SIGKILL)
            for ns in lab_netns(n):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
                shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


@pytest.fixture(scope="module")
def labs(request, tmp_path_factory):
    lb = Labs(tmp_path_factory.mktemp("labstate"))
    request.addfinalizer(lb.cleanup)
    return lb


@pytest.fixture(scope="module")
def starwars(labs):
    return labs.up(ROOT / "lab" / "starwars.yaml", "sw")


@pytest.fixture(scope="module")
def dnslab(labs):
    return labs.up(ROOT / "lab" / "dns.yaml", "dns")


def client(lab: Lab, workload: str, *args: str, timeout: float = 3.0):
    return lab.client(workload, *args, timeout=timeout)


def recorded(lab_dir: Path) -> tuple[list[str], list[dict]]:
    st = json.loads((lab_dir / "state.json").read_text())
    return ([r["name"] for r in st["resources"] if r["kind"] == "netns"],
            [r for r in st["resources"] if r["kind"] == "proc"])


def assert_gone(root: Path, name: str, procs: list[dict], namespaces: list[str]) -> None:
    assert not (root / name).exists(), "state dir left behind"
    assert lab_netns(name) == [], "namespaces left behind"
    for ns in namespaces:
        assert not os.path.exists(f"/etc/netns/{ns}"), f"/etc/netns/{ns} left behind"
    for p in procs:
        assert not netns.alive(p), f"process {p['id']} ({p['pid']}) left running"
    assert lab_processes(name) == [], "processes the state file did not know about"


# -- Star Wars: by name, both replicas, the apps' answers ------------------------------------------

def test_tiefighter_lands_on_deathstar_by_service_name(starwars):
    r = client(starwars, "tiefighter", "-X", "POST", "--url", "http://deathstar/v1/request-landing")
    assert (r.returncode, r.stdout) == (0, "Ship landed\n")


def test_exhaust_port_answers_panic_with_status_200(starwars):
    r = client(starwars, "xwing", "-i", "-X", "PUT", "--url", "http://deathstar/v1/exhaust-port")
    assert r.stdout.startswith("HTTP/1.1 200 OK") and r.stdout.endswith("Panic: deathstar exploded\n")


def test_service_name_resolves_to_both_replicas_through_the_lab_dns(starwars):
    code = ("import socket,json; print(json.dumps(sorted({a[4][0] for a in "
            "socket.getaddrinfo('deathstar', 80, type=socket.SOCK_STREAM)})))")
    r = starwars.run("tiefighter", ["python", "-c", code], timeout=10)
    assert json.loads(r.stdout) == ["10.200.0.11", "10.200.0.12"]


def test_each_replica_serves_under_its_own_name(starwars):
    for n in ("deathstar-1", "deathstar-2"):
        r = client(starwars, "tiefighter", "--url", f"http://{starwars.ip(n)}/v1/")
        assert json.loads(r.stdout)["hostname"] == n


DIG = """
import json, sys
from dnslib import DNSRecord, RCODE, QTYPE
q = DNSRecord.question(sys.argv[1], sys.argv[2])
r = DNSRecord.parse(q.send(sys.argv[3], 53, tcp=sys.argv[4] == "tcp", timeout=2))
print(json.dumps({"rcode": RCODE[r.header.rcode], "a": sorted(str(x.rdata) for x in r.rr if x.rtype == QTYPE.A)}))
"""
BOTH = ["10.200.0.11", "10.200.0.12"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("qname,qtype,rcode,a", [
    ("deathstar", "A", "NOERROR", BOTH),
    ("deathstar.default.svc.cluster.local", "A", "NOERROR", BOTH),
    ("kube-dns.kube-system.svc.cluster.local", "A", "NOERROR", ["10.200.0.53"]),
    ("deathstar", "AAAA", "NOERROR", []),
    ("deathstar.empire.svc.cluster.local", "A", "NXDOMAIN", []),
], ids=["short", "fqdn", "dns-server-fqdn", "aaaa-nodata", "other-namespace-nxdomain"])
def test_lab_dns_server_answers(starwars, transport, qname, qtype, rcode, a):
    r = starwars.run("xwing", ["python", "-c", DIG, qname, qtype, starwars.ip("kube-dns"), transport], timeout=10)
    assert json.loads(r.stdout) == {"rcode": rcode, "a": a}, r.stderr


def test_workload_resolv_conf_points_at_the_lab_dns(starwars):
    r = starwars.run("tiefighter", ["cat", "/etc/resolv.conf"])
    assert "nameserver 10.200.0.53" in r.stdout and "search default.svc.cluster.local" in r.stdout


# -- the client tells a hang from a refusal ---------------------------------------------------------

def test_client_refused_on_a_closed_port(starwars):
    r = client(starwars, "tiefighter", "--url", f"http://{starwars.ip('deathstar-1')}:81/", timeout=2)
    assert (r.returncode, r.stdout) == (7, "REFUSED\n")


def test_client_unresolved_name(starwars):
    r = client(starwars, "tiefighter", "--url", "http://nosuch/", timeout=2)
    assert (r.returncode, r.stdout) == (6, "UNRESOLVED\n")


def test_client_timeout_on_a_dropped_syn(starwars):
    rules = "table inet l7labtest {\n chain in {\n  type filter hook input priority 0;\n  tcp dport 9 drop\n }\n}\n"
    r = starwars.run("xwing", ["nft", "-f", "-"], input=rules)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    r = client(starwars, "tiefighter", "--url", "http://xwing:9/", timeout=1)
    took = time.monotonic() - t0
    assert (r.returncode, r.stdout) == (28, "TIMEOUT\n")
    assert "connecting" in r.stderr and took < 5


SERVER = """
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4)
while True:
    c, _ = s.accept(); c.recv(4096)
    if sys.argv[2] == "reset":
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"""


@pytest.mark.parametrize("mode,word,code", [("reset", "RESET", 56), ("close", "EMPTY", 52)])
def test_client_reset_and_empty_reply(starwars, mode, word, code):
    port = 7000 if mode == "reset" else 7001
    node = starwars.node("xwing")
    srv = subprocess.Popen(["ip", "netns", "exec", node["netns"], sys.executable, "-c", SERVER, str(port), mode])
    try:
        deadline = time.monotonic() + 5
        while not netns._listening(srv.pid, port, "TCP") and time.monotonic() < deadline:
            time.sleep(0.02)
        r = client(starwars, "tiefighter", "--url", f"http://xwing:{port}/", timeout=2)
        assert (r.returncode, r.stdout) == (code, f"{word}\n")
    finally:
        srv.kill()
        srv.wait()


# -- CLI functions -------------------------------------------------------------------------------

def test_second_up_of_a_lab_that_is_up_refuses_and_leaves_it_intact(starwars, capsys):
    rc = commands.up(str(ROOT / "lab" / "starwars.yaml"), True, name=starwars.name,
                     root=str(starwars.dir.parent))
    assert rc == 1
    assert "already up" in capsys.readouterr().err
    with pytest.raises(LabExists):
        spec = load(ROOT / "lab" / "starwars.yaml")
        spec.name = starwars.name
        start(spec, no_agents=True, root=str(starwars.dir.parent))
    r = client(starwars, "tiefighter", "-X", "POST", "--url", "http://deathstar/v1/request-landing")
    assert r.stdout == "Ship landed\n"


def test_exec_returns_the_commands_exit_code(starwars):
    rc = commands.exec_(f"{starwars.name}:xwing", ["python", "-c", "raise SystemExit(3)"],
                        root=str(starwars.dir.parent))
    assert rc == 3


def test_exec_by_service_name_runs_in_its_first_replica(starwars, capfd):
    rc = commands.exec_(f"{starwars.name}:deathstar", ["sh", "-c", "ip -o -4 addr show dev eth0"],
                        root=str(starwars.dir.parent))
    assert rc == 0 and "10.200.0.11/24" in capfd.readouterr().out


def test_exec_unknown_service_is_a_usage_error(starwars, capsys):
    rc = commands.exec_(f"{starwars.name}:deathstarr", ["true"], root=str(starwars.dir.parent))
    assert rc == 2 and "has no workload or host 'deathstarr'" in capsys.readouterr().err


def test_status_lists_the_lab_and_its_workloads(starwars):
    out = io.StringIO()
    assert commands.status(root=str(starwars.dir.parent), out=out) == 0
    text = out.getvalue()
    assert f"lab {starwars.name}: up" in text
    for w in ("kube-dns", "deathstar-1", "deathstar-2", "tiefighter", "xwing"):
        assert w in text


def test_passive_endpoints_and_services_are_in_the_registry(starwars):
    rec = json.loads(Path(starwars.registry_dir, "endpoints", "kube-dns.json").read_text())
    assert rec["labels"] == {"k8s:k8s-app": "kube-dns"} and rec["ips"] == ["10.200.0.53"]
    assert rec["identity"] >= 256
    svc = json.loads(Path(starwars.registry_dir, "services", "default.deathstar.json").read_text())
    assert svc["selector"] == {"org": "empire", "class": "deathstar"}


def test_nothing_of_the_lab_is_in_the_root_namespace(starwars):
    st = json.loads((starwars.dir / "state.json").read_text())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    assert st["switch"] not in links
    assert all(n["netns"] not in links for n in starwars.nodes)
    r = starwars.run("tiefighter", ["ip", "-o", "link"])
    assert r.stdout.count("link/ether") == 1  # eth0 only: no link to the outside


# -- the other shipped labs answer as their demos need ---------------------------------------------

@pytest.mark.parametrize("host", ["api.github.com", "support.github.com", "github.com"])
@pytest.mark.parametrize("port", [80, 443])
def test_external_hosts_answer_by_name(dnslab, host, port):
    r = client(dnslab, "mediabot", "--url", f"http://{host}:{port}/")
    assert (r.returncode, r.stdout) == (0, f"{host} GET / host={host}:{port}\n")


def test_namespaces_lab_prometheus_scrapes_metrics_across_namespaces(labs):
    lab = labs.up(ROOT / "lab" / "namespaces.yaml", "ns")
    r = client(lab, "prometheus", "--url", "http://deathstar.empire.svc.cluster.local:8080/metrics")
    assert r.stdout.startswith("deathstar-") and "GET /metrics" in r.stdout
    r = client(lab, "tiefighter", "-X", "POST", "--url", "http://deathstar/v1/request-landing")
    assert r.stdout == "Ship landed\n"
    r = client(lab, "tiefighter", "--url", "http://cilium.io/")
    assert r.stdout.startswith("cilium.io GET /")


def test_sockshop_lab_user_db_echoes_tcp(labs):
    lab = labs.up(ROOT / "lab" / "sockshop.yaml", "sock")
    r = client(lab, "rogue-1", "--tcp", "user-db.sock-shop.svc.cluster.local:27017", "--send", "hello")
    assert (r.returncode, r.stdout) == (0, "hello")


# -- lifecycle: down, failures, crashes --------------------------------------------------------------

def test_down_removes_every_namespace_process_and_the_state_dir(labs):
    lab = labs.up(DATA / "tiny.yaml", "down")
    namespaces, procs = recorded(lab.dir)
    assert len(namespaces) == 6 and all(netns.alive(p) for p in procs)
    assert commands.down(lab.name, root=str(labs.root), out=io.StringIO()) == 0
    assert_gone(labs.root, lab.name, procs, namespaces)


def test_up_that_fails_removes_what_it_built(labs, tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("services:\n  web: {command: [python, -c, 'raise SystemExit(4)'], ports: [80]}\n")
    spec = load(f)
    spec.name = labs.name("fail")
    with pytest.raises(LabError, match="exited during start-up"):
        start(spec, no_agents=True, root=str(labs.root))
    assert_gone(labs.root, spec.name, [], [])


def test_sidecar_readiness_timeout_is_a_clear_error(labs):
    spec = load(DATA / "tiny.yaml")
    spec.name = labs.name("agent")
    dir = labs.root / spec.name
    plan = topology.plan(spec, str(dir), sys.executable)
    steps = plan.steps(no_agents=True)
    # A "sidecar" that never publishes its endpoint: the idle app under an agent's id.
    idle = next(p for p in plan.procs if p.node == "client")
    steps.append(topology.Step("spawn", {"id": "client/agent", "netns": idle.netns,
                                         "argv": list(idle.argv), "log": plan.log_file("client/agent")}))
    steps.append(topology.Step("wait_files", {"procs": {"client/agent": f"{dir}/registry/agents/client.ready"},
                                              "timeout": 0.5}))
    st = netns.State.claim(dir, {"name": spec.name, "status": "building"})
    try:
        with pytest.raises(LabError, match=r"sidecar\(s\) not ready after 0.5s .*client/agent"):
            netns.Executor(plan, st).run(steps)
    finally:
        assert teardown(dir) == []


def _steps_of_tiny(kinds_seen: str) -> int:
    spec = load(DATA / "tiny.yaml")
    steps = topology.plan(spec, "/s", sys.executable).steps(no_agents=True)
    kinds = [s.kind for s in steps]
    return {"first-netns": kinds.index("netns") + 1,
            "all-netns": len(kinds) - kinds[::-1].index("netns"),
            "links": kinds.index("ip") + 2,
            "resolv": kinds.index("file") + 1,
            "one-process": kinds.index("spawn") + 1,
            "all-processes": kinds.index("wait_ports")}[kinds_seen]


@pytest.mark.parametrize("point", ["first-netns", "all-netns", "links", "resolv", "one-process",
                                   "all-processes"])
def test_up_stopped_midway_then_down_cleans(labs, point):
    spec = load(DATA / "tiny.yaml")
    spec.name = labs.name(f"x{point[:3]}{len(point)}")
    lab = start(spec, no_agents=True, root=str(labs.root), _stop_after=_steps_of_tiny(point))
    namespaces, procs = recorded(lab.dir)
    assert namespaces and all(os.path.exists(f"/run/netns/{n}") for n in namespaces)
    assert commands.down(spec.name, root=str(labs.root), out=io.StringIO()) == 0
    assert_gone(labs.root, spec.name, procs, namespaces)


def test_up_killed_with_sigkill_then_down_cleans(labs, tmp_path):
    name = labs.name("kill")
    f = tmp_path / "tiny.yaml"
    f.write_text((DATA / "tiny.yaml").read_text().replace("name: tiny", f"name: {name}"))
    env = dict(os.environ, L7GATE_LAB_ROOT=str(labs.root), PYTHONPATH=str(ROOT))
    up = subprocess.Popen([sys.executable, "-m", "proxy.cli", "lab", "up", "-f", str(f), "--no-agents"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = labs.root / name / "state.json"
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:  # kill it once it has started a process
            try:
                if any(r["kind"] == "proc" and r.get("start") for r in json.loads(state.read_text())["resources"]):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        up.send_signal(signal.SIGKILL)
    finally:
        up.wait()
    namespaces, procs = recorded(labs.root / name)
    assert namespaces and procs
    assert commands.down(name, root=str(labs.root), out=io.StringIO()) == 0
    assert_gone(labs.root, name, procs, namespaces)


def test_down_of_a_lab_that_is_not_up_says_so(labs):
    out = io.StringIO()
    assert commands.down(f"t{RUN}none", root=str(labs.root), out=out) == 1
    assert "is up" in out.getvalue()


# -- rootless ---------------------------------------------------------------------------------------

# `env` in between: the interpreter must be runnable after a plain exec as nobody (setpriv itself
# may still hold root's capabilities for its own exec).
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "env"]


def _python_for_nobody() -> tuple[str, dict] | None:
    """An interpreter user nobody can run with proxy importable, or None (then the test skips)."""
    if shutil.which("setpriv") is None:
        return None
    site = next((p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)), "")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp",
           "PYTHONPATH": os.pathsep.join([str(ROOT), site])}
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"  # same version: same site-packages
    for py in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.exists(py) and subprocess.run([*NOBODY, py, "-c", "import proxy.lab.commands, dnslib, yaml"],
                                 env=env, capture_output=True, check=False).returncode == 0:
            return py, env
    return None


def test_rootless_lab_up_exec_down_as_an_unprivileged_user(tmp_path):
    found = _python_for_nobody()
    if found is None:
        pytest.skip("no interpreter user nobody can run with l7gate importable")
    py, env = found
    if subprocess.run([*NOBODY, "unshare", "--user", "--map-root-user", "--net", "--mount", "true"],
                      capture_output=True, check=False).returncode:
        pytest.skip("unprivileged user namespaces are not available here")
    name = f"t{RUN}rl"
    work = Path(tempfile.mkdtemp(prefix="l7lab-rootless-"))
    os.chmod(work, 0o755)
    f = work / "lab.yaml"
    f.write_text((ROOT / "lab" / "starwars.yaml").read_text().replace("name: starwars", f"name: {name}"))
    os.chmod(f, 0o644)
    cli = [*NOBODY, py, "-m", "proxy.cli", "lab"]
    holder = subprocess.Popen([*cli, "up", "-f", str(f), "--no-agents"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = []
        for line in holder.stdout:  # up stays in the foreground once the lab is built
            lines.append(line)
            if line.startswith("rootless: the lab lives"):
                break
        assert any(f"lab {name} is up" in x for x in lines), "".join(lines)
        r = subprocess.run([*cli, "exec", "tiefighter", "--", *CLIENT, "-X", "POST", "--url",
                            "http://deathstar/v1/request-landing", "--timeout", "3"],
                           env=env, capture_output=True, text=True, timeout=30, check=False)
        assert r.stdout == "Ship landed\n", r.stderr
        assert lab_netns(name) == []  # its namespaces are private to the holder
        r = subprocess.run([*cli, "down", name], env=env, capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert holder.wait(timeout=10) == 0
        assert "stopped 5 process(es)" in holder.stdout.read()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        shutil.rmtree(work, ignore_errors=True)
