"""The four demos as data: which lab, which policy files in turn, which requests, what the
tutorial says each request gives.

A demo is a list of stages; a stage puts its policy files (paths under `policies/`, files or
step folders; none = no policy) in the lab's policies directory, replacing the previous stage's,
then runs its checks. A check is one request from inside one workload with the lab's client
(`python -m proxy.lab.apps.client ARGS`), the outcome the tutorial states, and how to recognise
it in the client's output. `{ip:WORKLOAD}` in an argument is that workload's address.

The expectations come from the seeds' words (tests/data/seeds/*.yaml quote them); a check whose
outcome the tutorial implies but does not print says so in its `expect` ("derived").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outcome:
    """What the client must print: a body (exact, prefix or regex), or a hang (TIMEOUT), which
    may be pinned to a phase the client names on stderr ("resolving", "connecting")."""
    kind: str  # "body" | "prefix" | "regex" | "hang"
    text: str = ""

    def matches(self, stdout: str, stderr: str) -> bool:
        out = stdout.strip()
        if self.kind == "body":
            return out == self.text
        if self.kind == "prefix":
            return out.startswith(self.text)
        if self.kind == "regex":
            return re.search(self.text, out) is not None
        if self.kind == "hang":
            return out == "TIMEOUT" and (not self.text or self.text in stderr)
        raise ValueError(self.kind)


def body(text: str) -> Outcome:
    return Outcome("body", text)


def prefix(text: str) -> Outcome:
    return Outcome("prefix", text)


def regex(pattern: str) -> Outcome:
    return Outcome("regex", pattern)


def hang(phase: str = "") -> Outcome:
    return Outcome("hang", phase)


@dataclass(frozen=True)
class Check:
    title: str
    workload: str
    args: tuple[str, ...]
    expect: str  # the tutorial's outcome, in words
    outcome: Outcome


@dataclass(frozen=True)
class Stage:
    title: str
    policies: tuple[str, ...]  # under policies/; () = no policy
    checks: tuple[Check, ...]
    note: str = ""


@dataclass(frozen=True)
class Demo:
    name: str
    title: str
    seed: str
    lab_file: str  # relative to the project root
    stages: tuple[Stage, ...]
    explore: tuple[str, ...] = field(default=())  # `lab exec` examples for --keep (SERVICE -- ARGS)

    @property
    def checks(self) -> int:
        return sum(len(s.checks) for s in self.stages)


def _post(ship: str, title: str, url: str, expect: str, outcome: Outcome,
          method: str = "POST") -> Check:
    return Check(title, ship, ("--method", method, "--url", url), expect, outcome)


CLI = "python -m proxy.lab.apps.client"
LANDING = "http://deathstar/v1/request-landing"
EXHAUST = "http://deathstar/v1/exhaust-port"
HANGS = "hangs (the SYN is dropped: TIMEOUT)"

STARWARS = Demo(
    name="starwars",
    title="Cilium's Star Wars demo: L3/L4, service-based + egressDeny, then L7 (HTTP) policy",
    seed="seed 003, Cilium overview: Star Wars demo",
    lab_file="lab/starwars.yaml",
    stages=(
        Stage("Check current access: no policy", (), (
            _post("xwing", "xwing requests landing", LANDING, "Ship landed", body("Ship landed")),
            _post("tiefighter", "tiefighter requests landing", LANDING, "Ship landed",
                  body("Ship landed")),
        )),
        Stage("Apply an L3/L4 policy: deathstar ingress only from org=empire on TCP/80",
              ("starwars/l3-l4.yaml",), (
            _post("tiefighter", "tiefighter (org=empire) requests landing", LANDING,
                  "Ship landed", body("Ship landed")),
            _post("xwing", "xwing (org=alliance) requests landing", LANDING, HANGS, hang("connecting")),
            _post("tiefighter", "L3/L4 lets tiefighter call any API: PUT /v1/exhaust-port", EXHAUST,
                  "Panic: deathstar exploded", body("Panic: deathstar exploded"), method="PUT"),
        )),
        Stage("Service-based policy: tiefighter egress toServices deathstar:80, xwing egressDeny",
              ("starwars/service-egress-deny.yaml",), (
            _post("tiefighter", "tiefighter requests landing (rule1: toServices deathstar)",
                  "http://{ip:deathstar-1}/v1/request-landing", "Ship landed", body("Ship landed")),
            _post("xwing", "xwing requests landing (rule2: egressDeny deathstar)",
                  "http://{ip:deathstar-1}/v1/request-landing",
                  "blocked: hangs (dropped at xwing's egress: TIMEOUT)", hang("connecting")),
        ), note="rule1 allows tiefighter's egress to the deathstar service only, so its DNS "
                "lookups to kube-dns are dropped as well (as in Cilium; the tutorial's curl by "
                "name glosses over it): this step addresses the deathstar-1 backend directly."),
        Stage("Apply an HTTP-aware L7 policy: org=empire may only POST /v1/request-landing",
              ("starwars/l3-l4-l7.yaml",), (
            _post("tiefighter", "tiefighter POST /v1/request-landing", LANDING, "Ship landed",
                  body("Ship landed")),
            _post("tiefighter", "tiefighter PUT /v1/exhaust-port", EXHAUST,
                  "Access denied (http-request DROPPED)", body("Access denied"), method="PUT"),
            _post("xwing", "xwing POST /v1/request-landing", LANDING,
                  "hangs (the L3/L4 part still drops xwing: TIMEOUT)", hang("connecting")),
        )),
    ),
    explore=(f"tiefighter -- {CLI} --method PUT --url {EXHAUST}",
             f"xwing -- {CLI} --method POST --url {LANDING} --timeout 3"),
)


def _get(url: str, title: str, expect: str, outcome: Outcome, who: str = "mediabot") -> Check:
    return Check(title, who, ("--url", url), expect, outcome)


def _gh(host: str) -> Outcome:
    return prefix(f"{host} GET / host={host}")


DNS = Demo(
    name="dns",
    title="Locking down external access with DNS-based policies (toFQDNs): mediabot and GitHub",
    seed="seed 003, Cilium overview: DNS matchName / matchPattern / port walkthroughs",
    lab_file="lab/dns.yaml",
    stages=(
        Stage("DNS policy with a strict match: toFQDNs matchName api.github.com",
              ("dns/matchname.yaml",), (
            _get("https://api.github.com/", "mediabot -> api.github.com",
                 "answers (HTTP/2 200 in the tutorial)", _gh("api.github.com")),
            _get("https://support.github.com/", "mediabot -> support.github.com",
                 "blocked: hangs (the name resolves, the connection is dropped: TIMEOUT)",
                 hang("connecting")),
        )),
        Stage("DNS policy with a pattern: toFQDNs matchPattern *.github.com",
              ("dns/matchpattern.yaml",), (
            _get("https://support.github.com/", "mediabot -> support.github.com",
                 "answers (HTTP/2 302 in the tutorial)", _gh("support.github.com")),
            _get("https://github.com/", "mediabot -> github.com (`*.` needs a subdomain)",
                 "blocked: hangs (TIMEOUT)", hang("connecting")),
        )),
        Stage("DNS, port and L7 combined: *.github.com and github.com on TCP/443 only",
              ("dns/pattern-port-443.yaml",), (
            _get("https://github.com/", "mediabot -> github.com port 443",
                 "answers (port 443 allowed)", _gh("github.com")),
            _get("https://support.github.com/", "mediabot -> support.github.com port 443",
                 "answers (HTTP/2 302 in the tutorial)", _gh("support.github.com")),
            _get("http://support.github.com/", "mediabot -> support.github.com port 80",
                 "blocked: hangs (port 80 is not allowed: TIMEOUT)", hang("connecting")),
        )),
    ),
    explore=(f"mediabot -- {CLI} --url https://github.com/",),
)

DEATHSTAR_JSON = regex(r'^\{\s*"name": "Death Star"')
DS_NAME = "http://deathstar.empire.svc.cluster.local"

NAMESPACES = Demo(
    name="namespaces",
    title="Controlling ingress/egress from namespaces: within-namespace, kube-dns, Prometheus, toFQDNs",
    seed="seed 001, Kubernetes network policies using Cilium (namespace empire)",
    lab_file="lab/namespaces.yaml",
    stages=(
        Stage("Allow all traffic within namespace empire (and nothing else)",
              ("namespaces/1-within-namespace",), (
            _get("http://{ip:deathstar-1}/v1", "tiefighter -> deathstar by pod IP",
                 "works (the deathstar API's JSON)", DEATHSTAR_JSON, who="tiefighter"),
            _get("http://{ip:deathstar-1}/v1", "kube-dns (kube-system) -> deathstar by pod IP",
                 "hangs (ingress from other namespaces denied: TIMEOUT)", hang("connecting"),
                 who="kube-dns"),
            _get(f"{DS_NAME}/v1", "tiefighter -> deathstar by service name",
                 "fails: egress to kube-dns is blocked (the lookup hangs: TIMEOUT)",
                 hang("resolving"), who="tiefighter"),
        )),
        Stage("+ egress to kube-dns (kube-system, k8s-app=kube-dns)", ("namespaces/2-kube-dns",), (
            _get(f"{DS_NAME}/v1", "tiefighter -> deathstar by service name",
                 "works (the deathstar API's JSON)", DEATHSTAR_JSON, who="tiefighter"),
            _get("http://kubernetes-dashboard.kube-system.svc.cluster.local/version",
                 "tiefighter -> kubernetes-dashboard (kube-system)",
                 "hangs (only kube-dns is allowed in kube-system: TIMEOUT)", hang("connecting"),
                 who="tiefighter"),
        )),
        Stage("+ ingress from monitoring/prometheus: TCP/8080, GET /metrics only",
              ("namespaces/3-prometheus",), (
            _get(f"{DS_NAME}:8080/metrics", "prometheus GET deathstar:8080/metrics",
                 "allowed (the metrics answer)", regex(r"^deathstar-\d GET /metrics "),
                 who="prometheus"),
            _get(f"{DS_NAME}:80/v1", "prometheus GET deathstar:80/v1",
                 "denied: hangs (TIMEOUT)", hang("connecting"), who="prometheus"),
        )),
        Stage("+ toFQDNs cilium.io (with the DNS proxy on the kube-dns egress)",
              ("namespaces/5-tofqdns-with-dns-proxy",), (
            _get("http://cilium.io/", "tiefighter -> cilium.io", "works (cilium.io answers)",
                 _gh("cilium.io"), who="tiefighter"),
            _get("http://google.com/", "tiefighter -> google.com", "hangs (TIMEOUT)",
                 hang("connecting"), who="tiefighter"),
        ), note="the seed's step 4 (policies/namespaces/4-tofqdns-cilium-io) relies on Cilium "
                "1.2's DNS poller; a current Cilium, like l7gate, learns toFQDNs addresses "
                "through the DNS proxy, so this is step 4 with a DNS rule on the kube-dns egress "
                "(policies/README.md)."),
    ),
    explore=(f"tiefighter -- {CLI} --url {DS_NAME}/v1",
             f"prometheus -- {CLI} --url {DS_NAME}:8080/metrics"),
)

USER_DB = "user-db.sock-shop.svc.cluster.local:27017"


def _mongo(who: str, title: str, expect: str, outcome: Outcome) -> Check:
    return Check(title, who, ("--tcp", USER_DB, "--send", "ping"), expect, outcome)


SOCKSHOP = Demo(
    name="sockshop",
    title="Sock-shop: a NetworkPolicy stops lateral movement to the user-db MongoDB",
    seed="seed 002, Using network policies in EKS with Cilium",
    lab_file="lab/sockshop.yaml",
    stages=(
        Stage("No policy: any pod reaches user-db (MongoDB; a TCP echo on 27017 stands in)", (), (
            _mongo("rogue-1", "rogue-1 (default) connects to user-db:27017",
                   "connects (the tutorial lists the databases; the stand-in echoes ping)",
                   body("ping")),
        )),
        Stage("Apply the NetworkPolicy: user-db ingress only from pods name=user",
              ("sockshop/user-db-allow-from-user.yaml",), (
            _mongo("rogue-1", "rogue-1 connects to user-db:27017",
                   "fails: hangs (TIMEOUT)", hang("connecting")),
            _mongo("user", "user (sock-shop, name=user) connects to user-db:27017",
                   "still works (ping echoed)", body("ping")),
            _mongo("rogue-2", "rogue-2 (default, name=user) connects to user-db:27017",
                   "hangs (derived: podSelector picks pods of sock-shop only: TIMEOUT)",
                   hang("connecting")),
        )),
    ),
    explore=(f"rogue-1 -- {CLI} --tcp {USER_DB} --timeout 3",),
)

DEMOS: dict[str, Demo] = {d.name: d for d in (STARWARS, DNS, NAMESPACES, SOCKSHOP)}
