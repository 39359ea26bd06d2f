"""The lab plan: a lab file in, everything `up` will create out (pure: no I/O, no clock).

`plan(spec, state_dir, python)` decides namespace names, veth names, addresses, routes, the DNS zone,
each namespace's resolv.conf, the processes and their readiness conditions, and the registry
records of workloads without a sidecar. `Plan.steps(no_agents)` turns that into an ordered list of
small `Step`s (data, printable, JSON-able) that `netns.Executor` performs one by one, recording
each resource before it creates it. Nothing here touches the system, so the whole topology is
testable as values.

Layout on the wire: one "switch" namespace holds a Linux bridge; every workload, the DNS server
and every simulated external host is a namespace with one veth (`eth0`) to that bridge, its
address, and an on-link default route (so addresses outside `subnet`, like the TEST-NET ones the
external hosts use, are reached by ARP on the same segment). Nothing is attached to the root
namespace: no traffic can leave the lab, and the host's firewall (Docker's FORWARD DROP,
br_netfilter) never sees it.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field

from proxy.lab.spec import BUILTIN_APPS, LabFileError, LabSpec
from proxy.policy.labels import K8S, split_key

PREFIX = "l7lab"
SWITCH = "switch"
BRIDGE = "br0"
ETC_NETNS = "/etc/netns"

WORKLOAD, DNS_SERVER, EXTERNAL = "workload", "dns", "external"


def netns_prefix(lab: str) -> str:
    return f"{PREFIX}-{lab}-"


@dataclass(frozen=True)
class Node:
    """One network namespace on the lab's bridge."""
    name: str  # workload name (deathstar-1), DNS server name (kube-dns) or host (api.github.com)
    kind: str  # workload | dns | external
    netns: str
    ip: str
    prefixlen: int
    veth: str  # the switch-side end; the namespace side is always eth0
    service: str = ""
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    named_ports: dict[str, int] = field(default_factory=dict)
    enforce: bool = False
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True)
class Proc:
    id: str  # "<node>/<role>", e.g. deathstar-1/app, kube-dns/dns, tiefighter/agent
    node: str
    netns: str
    argv: tuple[str, ...]
    role: str  # app | dns | external | agent
    ports: tuple[tuple[int, str], ...] = ()  # listening = ready
    ready_file: str = ""  # appearing = ready (the agent's registry record)


@dataclass(frozen=True)
class Step:
    kind: str
    args: dict

    def describe(self) -> str:
        a = self.args
        if self.kind == "netns":
            return f"ip netns add {a['name']}"
        if self.kind == "ip":
            return f"ip -n {a['netns']} -batch - <<{len(a['lines'])} commands>>"
        if self.kind == "sysctl":
            return f"ip netns exec {a['netns']} sysctl -w {a['key']}={a['value']}"
        if self.kind == "spawn":
            return f"ip netns exec {a['netns']} {' '.join(a['argv'])}"
        return f"{self.kind} " + " ".join(f"{k}={v}" for k, v in a.items() if k != "content")


@dataclass
class Plan:
    name: str
    file: str
    subnet: str
    state_dir: str
    switch_netns: str
    nodes: list[Node]
    zone: dict  # {"ttl": N, "records": {name: {"a": [...], "cname": "", "ttl": N|None}}}
    resolv: dict[str, str]  # netns -> resolv.conf text
    procs: list[Proc]  # apps, DNS server, external servers
    agents: list[Proc]  # sidecars (skipped with --no-agents)
    passive: list[dict]  # registry records of workloads without a sidecar
    services: list[dict]  # Kubernetes-style services {name, namespace, selector, ips}
    policies_src: str
    warnings: list[str] = field(default_factory=list)
    etc_netns: str = ETC_NETNS

    # -- paths inside the state dir -----------------------------------------------------------
    @property
    def policies_dir(self) -> str:
        return f"{self.state_dir}/policies"

    @property
    def registry_dir(self) -> str:
        return f"{self.state_dir}/registry"

    @property
    def logs_dir(self) -> str:
        return f"{self.state_dir}/logs"

    @property
    def zone_file(self) -> str:
        return f"{self.state_dir}/zone.json"

    def log_file(self, proc_id: str) -> str:
        return f"{self.logs_dir}/{proc_id.replace('/', '.')}.log"

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def dns_node(self) -> Node:
        return next(n for n in self.nodes if n.kind == DNS_SERVER)

    def summary(self) -> list[dict]:
        """What `status` and `exec` need, stored in state.json."""
        return [{"name": n.name, "kind": n.kind, "netns": n.netns, "ip": n.ip,
                 "service": n.service, "namespace": n.namespace, "labels": n.labels,
                 "serviceAccount": n.service_account, "enforce": n.enforce,
                 "hostnames": list(n.hostnames)} for n in self.nodes]

    def endpoints_file(self) -> dict:
        """The lab as `l7gate trace --endpoints` reads it (actual addresses)."""
        eps = []
        for n in self.nodes:
            if n.kind == EXTERNAL:
                continue
            ep = {"name": n.name, "namespace": n.namespace, "labels": dict(n.labels),
                  "serviceAccount": n.service_account, "ips": [n.ip]}
            if n.named_ports:
                ep["namedPorts"] = dict(n.named_ports)
            eps.append(ep)
        return {"endpoints": eps, "services": [dict(s) for s in self.services]}

    # -- steps ----------------------------------------------------------------------------------
    def steps(self, no_agents: bool = False, wait_timeout: float = 10.0,
              agent_timeout: float = 20.0) -> list[Step]:
        s: list[Step] = []
        add = lambda kind, **args: s.append(Step(kind, args))
        for d in (self.policies_dir, self.registry_dir, self.logs_dir):
            add("statedir", path=d)
        add("netns", name=self.switch_netns)
        for n in self.nodes:
            add("netns", name=n.netns)
        # The switch: no address, no route; bridged frames must not meet any iptables (br_netfilter
        # defaults to calling it in every new namespace when the module is loaded).
        for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
                    "net.bridge.bridge-nf-call-arptables"):
            add("sysctl", netns=self.switch_netns, key=key, value="0", optional=True)
        lines = ["link set lo up", f"link add {BRIDGE} type bridge",
                 f"link set {BRIDGE} up"]
        for n in self.nodes:
            lines += [f"link add {n.veth} type veth peer name eth0 netns {n.netns}",
                      f"link set {n.veth} master {BRIDGE}", f"link set {n.veth} up"]
        add("ip", netns=self.switch_netns, lines=lines)
        for n in self.nodes:
            add("ip", netns=n.netns, lines=[
                "link set lo up", f"addr add {n.ip}/{n.prefixlen} dev eth0", "link set eth0 up",
                "route add default dev eth0"])
        add("etcdir", path=self.etc_netns, shared=True)
        for n in self.nodes:
            add("etcdir", path=f"{self.etc_netns}/{n.netns}")
            add("file", path=f"{self.etc_netns}/{n.netns}/resolv.conf", content=self.resolv[n.netns])
        add("statefile", path=self.zone_file, content=json.dumps(self.zone, indent=1, sort_keys=True))
        add("statefile", path=f"{self.state_dir}/endpoints.yaml",
            content=json.dumps(self.endpoints_file(), indent=1))
        add("policies", src=self.policies_src, dst=self.policies_dir)
        for rec in self.passive:
            add("publish", record=rec, registry=self.registry_dir)
        for svc in self.services:
            add("statefile", path=f"{self.registry_dir}/services/{svc['namespace']}.{svc['name']}.json",
                content=json.dumps(svc, sort_keys=True))
        for p in self.procs:
            add("spawn", id=p.id, netns=p.netns, argv=list(p.argv), log=self.log_file(p.id))
        add("wait_ports", procs={p.id: [list(x) for x in p.ports] for p in self.procs if p.ports},
            timeout=wait_timeout)
        if not no_agents:
            for p in self.agents:
                add("spawn", id=p.id, netns=p.netns, argv=list(p.argv), log=self.log_file(p.id))
            add("wait_files", procs={p.id: p.ready_file for p in self.agents}, timeout=agent_timeout)
        return s


# -- planning ----------------------------------------------------------------------------------

def _python(argv: list[str], python: str) -> tuple[str, ...]:
    """`python`/`python3` in a command means the lab's own interpreter (it can import proxy)."""
    if argv and argv[0] in ("python", "python3"):
        return (python, *argv[1:])
    return tuple(argv)


def _record(name: str, ips: list[str] | None = None, cname: str = "", ttl: int | None = None) -> dict:
    return {"a": list(ips or []), "cname": cname, "ttl": ttl}


def plan(spec: LabSpec, state_dir: str, python: str, etc_netns: str = ETC_NETNS) -> Plan:
    problems: list[str] = []
    warnings: list[str] = []
    prefix = netns_prefix(spec.name)
    net = ipaddress.IPv4Network(spec.subnet)
    dns = spec.dns

    # Names: workload names are endpoint names (registry files), so unique across namespaces.
    entries: list[tuple[str, str]] = []  # (node name, kind)
    for svc in spec.services:
        entries += [(w, WORKLOAD) for w in svc.replica_names()]
    entries.append((dns.name, DNS_SERVER))
    entries += [(e.host, EXTERNAL) for e in spec.external]
    netns_of: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, kind in entries:
        ns = prefix + (f"ext-{name}" if kind == EXTERNAL else name)
        if name == SWITCH and kind != EXTERNAL:
            problems.append(f"{name!r}: the name {SWITCH!r} is reserved for the lab's bridge namespace")
        if ns in seen:
            problems.append(f"{name!r} is defined twice (as {seen[ns]} and {kind})")
        seen[ns] = kind
        netns_of[name] = ns

    # Addresses: fixed ones first, then the subnet's hosts in file order (DNS server first).
    fixed: dict[str, str] = {}
    for svc in spec.services:
        for w, ip in zip(svc.replica_names(), svc.ips):
            fixed[w] = ip
    if dns.ip:
        fixed[dns.name] = dns.ip
    for e in spec.external:
        if e.ip:
            fixed[e.host] = e.ip
    owner: dict[str, str] = {}
    for name, ip in fixed.items():
        if ip in owner:
            problems.append(f"address {ip} given to both {owner[ip]} and {name}")
        owner[ip] = name
        addr = ipaddress.IPv4Address(ip)
        if addr in net and addr in (net.network_address, net.broadcast_address):
            problems.append(f"{name}: {ip} is the network or broadcast address of {net}")
    hosts = list(net.hosts())
    start = 9 if len(hosts) > 64 else 0  # .10 upwards in a /24, leaving room for fixed ones
    pool = (str(h) for h in hosts[start:] + hosts[:start] if str(h) not in owner)
    ips: dict[str, str] = dict(fixed)
    order = [dns.name] + [n for n, _ in entries if n != dns.name]
    for name in order:
        if name not in ips:
            want = str(net.network_address + 53) if name == dns.name and net.num_addresses > 54 else ""
            if want and want not in owner:
                ips[name] = want
            else:
                ips[name] = next(pool, "")
                if not ips[name]:
                    problems.append(f"subnet {net} has no free address left for {name}")
            owner[ips[name]] = name
    if problems:
        raise LabFileError(problems, spec.file)

    def prefixlen(ip: str) -> int:
        return net.prefixlen if ipaddress.IPv4Address(ip) in net else 32

    # Nodes.
    nodes: list[Node] = []
    veth = iter(range(len(entries)))
    for svc in spec.services:
        named = {p.name: p.port for p in svc.ports if p.name}
        for w in svc.replica_names():
            nodes.append(Node(w, WORKLOAD, netns_of[w], ips[w], prefixlen(ips[w]), f"v{next(veth)}",
                              svc.name, svc.namespace, dict(svc.labels), svc.service_account,
                              named, svc.enforce))
    nodes.insert(0, Node(dns.name, DNS_SERVER, netns_of[dns.name], ips[dns.name],
                         prefixlen(ips[dns.name]), f"v{next(veth)}", dns.name, dns.namespace,
                         dict(dns.labels), dns.service_account, {"dns": 53, "dns-tcp": 53},
                         dns.enforce))
    for e in spec.external:
        nodes.append(Node(e.host, EXTERNAL, netns_of[e.host], ips[e.host], prefixlen(ips[e.host]),
                          f"v{next(veth)}", "", "", {}, "", {}, False, (e.host, *e.aliases)))

    # Zone: service names, short and fully qualified, to every replica; the DNS server itself;
    # external hosts; static records. A name may be defined once.
    records: dict[str, dict] = {}
    origin: dict[str, str] = {}

    def put(name: str, rec: dict, why: str) -> None:
        if name in records:
            problems.append(f"DNS name {name} defined by both {origin[name]} and {why}")
            return
        records[name] = rec
        origin[name] = why

    # Short names: service names are unique (and never the DNS server's name), so no clash.
    for svc in spec.services:
        addrs = [ips[w] for w in svc.replica_names()]
        put(f"{svc.name}.{svc.namespace}.svc.{dns.domain}", _record("", addrs), f"service {svc.name}")
        put(svc.name, _record("", addrs), f"service {svc.name}")
    put(f"{dns.name}.{dns.namespace}.svc.{dns.domain}", _record("", [ips[dns.name]]), "the DNS server")
    put(dns.name, _record("", [ips[dns.name]]), "the DNS server")
    for e in spec.external:
        for h in (e.host, *e.aliases):
            put(h, _record("", [ips[e.host]], ttl=e.ttl), f"external host {e.host}")
    for r in dns.records:
        put(r.name, _record("", r.a, r.cname, r.ttl), "dns.records")
    for name, rec in records.items():
        if rec["cname"] and rec["cname"] not in records:
            warnings.append(f"DNS record {name} is a CNAME to {rec['cname']}, which the lab zone "
                            "does not hold (it will not resolve)")
    if problems:
        raise LabFileError(problems, spec.file)
    zone = {"ttl": dns.ttl, "records": dict(sorted(records.items()))}

    # resolv.conf per namespace, as kubelet writes it for a pod (`ip netns exec` bind-mounts
    # /etc/netns/<netns>/resolv.conf over /etc/resolv.conf).
    resolv: dict[str, str] = {}
    opts = f"options {' '.join(dns.options)}\n" if dns.options else ""
    for n in nodes:
        head = f"# l7gate lab {spec.name}: {n.name}\nnameserver {ips[dns.name]}\n"
        if n.kind == EXTERNAL:
            resolv[n.netns] = head
        else:
            d = dns.domain
            resolv[n.netns] = head + f"search {n.namespace}.svc.{d} svc.{d} {d}\n" + opts

    # Processes.
    procs: list[Proc] = []
    procs.append(Proc(f"{dns.name}/dns", dns.name, netns_of[dns.name],
                      (python, "-m", "proxy.lab.apps.dnsserver", "--zone", f"{state_dir}/zone.json",
                       "--port", "53"), "dns", ((53, "UDP"), (53, "TCP"))))
    for e in spec.external:
        argv = [python, "-m", BUILTIN_APPS["echo-http"][0], "--name", e.host]
        for p in e.ports:
            argv += ["--port", str(p)]
        procs.append(Proc(f"{e.host}/http", e.host, netns_of[e.host], tuple(argv), "external",
                          tuple((p, "TCP") for p in e.ports)))
    agents: list[Proc] = []
    passive: list[dict] = []
    registry = f"{state_dir}/registry"
    for svc in spec.services:
        commands = svc.commands or [["python", "-m", BUILTIN_APPS["idle"][0]]]
        for w in svc.replica_names():
            for i, argv in enumerate(commands):
                pid = f"{w}/app" if len(commands) == 1 else f"{w}/app{i + 1}"
                ports = tuple((p.port, p.protocol) for p in svc.ready_ports) if i == 0 else ()
                procs.append(Proc(pid, w, netns_of[w], _python(argv, python), "app", ports))
    for n in nodes:
        if n.kind == EXTERNAL:
            continue
        if n.enforce:
            labels = ",".join(f"{k}={v}" for k, v in n.labels.items())
            agents.append(Proc(f"{n.name}/agent", n.name, n.netns,
                               (python, "-m", "proxy.cli", "run", "--policies", f"{state_dir}/policies",
                                "--registry", registry, "--name", n.name, "--labels", labels,
                                "--namespace", n.namespace, "--service-account", n.service_account,
                                # on the workload's own loopback: `lab exec W -- curl 127.0.0.1:9965`
                                "--metrics", "127.0.0.1:9965", "--log-allowed"),
                               "agent", ready_file=f"{registry}/agents/{n.name}.ready"))
        else:
            passive.append(passive_record(n))
    services = [{"name": svc.name, "namespace": svc.namespace,
                 "selector": dict(svc.selector if svc.selector is not None else svc.labels),
                 "ips": []} for svc in spec.services]
    services.append({"name": dns.name, "namespace": dns.namespace, "selector": dict(dns.labels),
                     "ips": []})
    return Plan(spec.name, spec.file, spec.subnet, state_dir, prefix + SWITCH, nodes, zone, resolv,
                procs, agents, passive, services, spec.policies, warnings, etc_netns)


def passive_record(n: Node) -> dict:
    """The registry record of a workload without a sidecar (so the agents know its identity).

    Same shape as the agent's `EndpointRecord`; labels carry their source like the agent's."""
    labels = {}
    for k, v in n.labels.items():
        source, key = split_key(k, K8S)
        labels[f"{source}:{key}"] = v
    return {"name": n.name, "namespace": n.namespace, "labels": labels,
            "serviceAccount": n.service_account, "ips": [n.ip], "identity": 0,
            "namedPorts": dict(n.named_ports)}



def steps_json(steps: list[Step]) -> str:
    return json.dumps([asdict(s) for s in steps], indent=1)
