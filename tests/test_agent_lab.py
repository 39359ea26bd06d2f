"""The agent enforcing real traffic in the namespace lab (root only): Star Wars and DNS.

Each test builds its own lab (unique name), drops policy files into the lab's policies directory
the way a user would, waits for the agents to apply them, and sends real requests from inside
the workloads. Labs are torn down even when a test fails.
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

RAW_TWO_REQUESTS = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],80),timeout=3)\n"
    "s.sendall(b'POST /v1/request-landing HTTP/1.1\\r\\nHost: deathstar\\r\\nContent-Length: 0\\r\\n\\r\\n'"
    "+b'PUT /v1/exhaust-port HTTP/1.1\\r\\nHost: deathstar\\r\\nContent-Length: 0\\r\\n\\r\\n')\n"
    "buf=b''\n"
    "while buf.count(b'HTTP/1.1')<2 or not buf.endswith((b'landed\\n',b'denied\\r\\n')):\n"
    "  c=s.recv(65536)\n"
    "  if not c: break\n"
    "  buf+=c\n"
    "sys.stdout.write(buf.decode())\n")


def start_lab(file: str, tag: str):
    from proxy.lab.commands import start
    return start(ROOT / "lab" / file, name=f"{tag}{os.getpid() % 10000}")


@pytest.fixture
def starwars():
    lab = start_lab("starwars.yaml", "tsw")
    try:
        yield lab
    finally:
        lab.down()


def apply(lab, *files: str, wait: float = 2.0) -> None:
    """Replace the lab's policies with these files and give the agents time to sync."""
    d = Path(lab.policies_dir)
    for old in d.glob("*.yaml"):
        old.unlink()
    for f in files:
        shutil.copy(POLICIES / f, d / Path(f).name)
    time.sleep(wait)


def post(lab, ship: str, method: str = "POST", path: str = "/v1/request-landing", timeout: float = 2.0):
    r = lab.client(ship, "--method", method, "--url", f"http://deathstar{path}", timeout=timeout)
    return r.stdout.strip()


def test_starwars_l3_l4_then_l7_then_bad_reload(starwars):
    lab = starwars
    assert post(lab, "xwing") == "Ship landed"
    assert post(lab, "tiefighter") == "Ship landed"

    apply(lab, "starwars/l3-l4.yaml")
    assert post(lab, "tiefighter") == "Ship landed"
    assert post(lab, "xwing") == "TIMEOUT"  # dropped SYN: the client hangs, no RST

    apply(lab, "starwars/l3-l4-l7.yaml")
    assert post(lab, "tiefighter") == "Ship landed"
    assert post(lab, "tiefighter", "PUT", "/v1/exhaust-port") == "Access denied"
    assert post(lab, "xwing") == "TIMEOUT"
    # Two requests on one keep-alive connection: the second is checked too.
    out = lab.run("tiefighter", ["python3", "-c", RAW_TWO_REQUESTS, lab.ip("deathstar-1")], timeout=10)
    assert "Ship landed" in out.stdout
    assert "HTTP/1.1 403 Forbidden" in out.stdout and out.stdout.rstrip().endswith("Access denied")
    assert "exploded" not in out.stdout

    # An invalid version of the policy file: reported, and the previous policy stays in force.
    bad = Path(lab.policies_dir) / "l3-l4-l7.yaml"
    bad.write_text(bad.read_text().replace("endpointSelector", "endpointSelectr"))
    time.sleep(2.0)
    assert post(lab, "tiefighter", "PUT", "/v1/exhaust-port") == "Access denied"
    assert post(lab, "tiefighter") == "Ship landed"


def test_agent_killed_fails_closed(starwars):
    lab = starwars
    apply(lab, "starwars/l3-l4-l7.yaml")
    assert post(lab, "tiefighter", "PUT", "/v1/exhaust-port") == "Access denied"
    agent = next(r for r in lab.data["resources"] if r["kind"] == "proc"
                 and r["id"] == "deathstar-1/agent")
    os.kill(agent["pid"], signal.SIGKILL)
    time.sleep(0.5)
    url = f"http://{lab.ip('deathstar-1')}/v1/exhaust-port"
    r = lab.client("tiefighter", "--method", "PUT", "--url", url, timeout=2)
    assert r.stdout.strip() in ("REFUSED", "TIMEOUT", "RESET", "EMPTY"), r.stdout
    assert "exploded" not in r.stdout


@pytest.fixture
def dnslab():
    lab = start_lab("dns.yaml", "tdn")
    try:
        yield lab
    finally:
        lab.down()


def get(lab, url: str, timeout: float = 2.0) -> str:
    return lab.client("mediabot", "--url", url, timeout=timeout).stdout.strip()


def test_dns_matchname_then_pattern_then_port(dnslab):
    lab = dnslab
    apply(lab, "dns/matchname.yaml")
    assert get(lab, "http://api.github.com/").startswith("api.github.com")
    assert get(lab, "http://support.github.com/") == "TIMEOUT"  # resolves, but not allowed
    apply(lab, "dns/matchpattern.yaml")
    assert get(lab, "http://support.github.com/").startswith("support.github.com")
    assert get(lab, "http://github.com/") == "TIMEOUT"  # `*.` needs a subdomain
    apply(lab, "dns/pattern-port-443.yaml")
    assert get(lab, "http://github.com:443/").startswith("github.com")
    assert get(lab, "http://support.github.com:443/").startswith("support.github.com")
    assert get(lab, "http://support.github.com/") == "TIMEOUT"  # port 80 is not allowed


def test_dns_rules_refuse_names_and_learned_ips_open_only_allowed_ports(dnslab):
    lab = dnslab
    d = Path(lab.policies_dir)
    shutil.copy(ROOT / "tests/data/agent/dns-rules-github.yaml", d / "dns-rules.yaml")
    time.sleep(2.0)
    assert get(lab, "http://api.github.com/").startswith("api.github.com")
    r = lab.client("mediabot", "--url", "http://cilium-io.example/", timeout=2)
    assert r.stdout.strip() == "UNRESOLVED"  # REFUSED by the DNS proxy
    r = lab.run("mediabot", ["python3", "-c",
                             "import socket; print(socket.gethostbyname('api.github.com'))"], timeout=5)
    ip = r.stdout.strip()
    assert ip == "192.0.2.10"
    assert get(lab, f"http://{ip}:443/") == "TIMEOUT"  # learned, but only port 80 is open


def test_dns_ttl_expiry_closes_new_connections():
    from proxy.lab.commands import start
    lab = start(ROOT / "tests/data/agent/dns-ttl-lab.yaml", name=f"tdt{os.getpid() % 10000}")
    try:
        apply(lab, "dns/matchname.yaml")
        assert get(lab, "http://api.github.com/").startswith("api.github.com")
        assert get(lab, "http://192.0.2.10/").startswith("api.github.com")  # still within the TTL
        time.sleep(3.5)
        assert get(lab, "http://192.0.2.10/") == "TIMEOUT"  # expired: no new connections
        assert get(lab, "http://api.github.com/").startswith("api.github.com")  # learned again
    finally:
        lab.down()


LOOP = (
    "import http.client,sys,time\n"
    "ok=bad=0\n"
    "end=time.time()+float(sys.argv[2])\n"
    "while time.time()<end:\n"
    "  try:\n"
    "    c=http.client.HTTPConnection(sys.argv[1],80,timeout=2)\n"
    "    c.request('POST','/v1/request-landing'); r=c.getresponse(); b=r.read(); c.close()\n"
    "    ok+= b==b'Ship landed\\n'; bad+= b!=b'Ship landed\\n'\n"
    "  except Exception as e:\n"
    "    bad+=1; print(repr(e))\n"
    "print(ok,bad)\n")


def test_reloads_lose_no_allowed_request(starwars):
    """Policy reloads (valid ones and an invalid one) while tiefighter keeps landing."""
    import threading
    lab = starwars
    apply(lab, "starwars/l3-l4-l7.yaml")
    result = {}

    def client():
        result["out"] = lab.run("tiefighter", ["python3", "-c", LOOP, lab.ip("deathstar-1"), "5"],
                                timeout=30).stdout

    t = threading.Thread(target=client)
    t.start()
    target = Path(lab.policies_dir) / "l3-l4-l7.yaml"
    good = target.read_text()
    for i in range(8):
        time.sleep(0.5)
        text = good if i % 3 else good.replace("endpointSelector", "endpointSelectr")
        target.write_text(text + f"\n# reload {i}\n")
    t.join()
    target.write_text(good)
    ok, bad = map(int, result["out"].split()[-2:])
    assert ok > 20 and bad == 0, result["out"]


def test_control_commands_answer_for_the_lab(starwars):
    from clitool import run_cli
    lab = starwars
    apply(lab, "starwars/l3-l4.yaml")
    eps = run_cli(["endpoint", "list", "--registry", lab.registry_dir, "-o", "json"])
    assert eps.returncode == 0, eps.stderr
    rows = {r["name"]: r for r in json.loads(eps.stdout)}
    assert rows["default/deathstar-1"]["ingress"] == "Enabled"
    assert rows["default/tiefighter"]["ingress"] == "Disabled"
    assert "k8s:class=deathstar" in rows["default/deathstar-1"]["labels"]
    text = run_cli(["endpoint", "list", "--registry", lab.registry_dir])
    assert "POLICY (ingress) ENFORCEMENT" in text.stdout and "deathstar-2" in text.stdout
    ids = run_cli(["identity", "list", "--registry", lab.registry_dir])
    assert ids.returncode == 0 and "k8s:class=xwing" in ids.stdout
    pol = run_cli(["policy", "get", "--registry", lab.registry_dir, "-o", "json"])
    got = json.loads(pol.stdout)
    assert {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "rule1"} in \
        got["deathstar-1"]["policies"]


def test_observe_shows_the_seed_lines(starwars):
    """Hubble's lines for the L7 step: tiefighter's PUT dropped at L7, xwing's SYN dropped."""
    import re

    from clitool import run_cli
    lab = starwars
    apply(lab, "starwars/l3-l4-l7.yaml")
    assert post(lab, "tiefighter", "PUT", "/v1/exhaust-port") == "Access denied"
    assert post(lab, "xwing", timeout=1.5) == "TIMEOUT"
    time.sleep(0.5)
    out = run_cli(["observe", "--registry", lab.registry_dir, "--last", "200"]).stdout
    assert re.search(r"default/tiefighter:\d+ \(ID:\d+\) -> default/deathstar-\d:80 \(ID:\d+\) "
                     r"http-request DROPPED \(HTTP/1\.1 PUT http://deathstar/v1/exhaust-port\)", out), out
    assert re.search(r"default/xwing:\d+ \(ID:\d+\) <> default/deathstar-\d:80 \(ID:\d+\) "
                     r"Policy denied DROPPED \(TCP Flags: SYN\)", out), out
    js = run_cli(["observe", "--registry", lab.registry_dir, "--last", "200", "-o", "json"]).stdout
    flows = [json.loads(line) for line in js.splitlines() if line.strip()]
    dropped = [f["flow"] for f in flows if f["flow"].get("verdict") == "DROPPED"]
    assert any(f.get("drop_reason_desc") == "POLICY_DENIED" and f.get("l4", {}).get("TCP", {}).get("flags", {}).get("SYN")
               for f in dropped)
    assert any(f.get("l7", {}).get("http", {}).get("method") == "PUT" for f in dropped)
    assert all({"time", "verdict", "source", "destination"} <= f.keys() for f in dropped)


SCRAPE = ("import urllib.request;"
          "print(urllib.request.urlopen('http://127.0.0.1:9965/metrics', timeout=3).read().decode())")


def metric(text: str, name: str, **labels) -> float:
    """Sum of a Prometheus series whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def test_metrics_count_the_replayed_traffic_exactly(starwars):
    lab = starwars
    apply(lab, "starwars/l3-l4-l7.yaml")
    for _ in range(3):
        assert post(lab, "tiefighter") == "Ship landed"
    for _ in range(2):
        assert post(lab, "tiefighter", "PUT", "/v1/exhaust-port") == "Access denied"
    text = "".join(lab.run(w, ["python3", "-c", SCRAPE], timeout=10).stdout
                   for w in ("deathstar-1", "deathstar-2"))
    assert metric(text, "hubble_http_requests_total", method="POST") == 3
    assert metric(text, "hubble_http_requests_total", method="PUT") == 2
    assert metric(text, "hubble_http_responses_total", status="200") == 3
    assert metric(text, "hubble_http_responses_total", status="403") == 2
