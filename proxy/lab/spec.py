"""The lab file: compose-like YAML read into plain dataclasses (pure: no I/O beyond reading it).

The format is documented in `proxy/lab/__init__.py` and `lab/README.md`. Every error names the
field (`services.deathstar.replicas: ...`) and is raised as one `LabFileError` carrying all the
problems found, so a user fixes a file in one round.
"""
from __future__ import annotations

import difflib
import ipaddress
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_DOMAIN = "cluster.local"
DEFAULT_TTL = 30
DEFAULT_RESOLV_OPTIONS = ("ndots:5",)  # what kubelet writes into a pod's resolv.conf
EXTERNAL_PORTS = (80, 443)

# Built-in apps: `app: NAME` runs `python -m proxy.lab.apps.<module>`; the ports are what the app
# listens on when given no arguments (used to wait for it to be ready).
BUILTIN_APPS = {
    "deathstar": ("proxy.lab.apps.deathstar", ((80, "TCP"),)),
    "echo-http": ("proxy.lab.apps.echo_http", ((80, "TCP"),)),
    "tcp-echo": ("proxy.lab.apps.tcp_echo", ((27017, "TCP"),)),
    "idle": ("proxy.lab.apps.idle", ()),
}

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # a DNS-1123 label, like a pod name
_HOST = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
PROTOCOLS = ("TCP", "UDP", "SCTP")
MAX_LAB_NAME = 24  # keeps `l7lab-<lab>-<workload>` readable; netns names themselves may be long


class LabFileError(ValueError):
    """Everything wrong with a lab file, one problem per line."""

    def __init__(self, problems: list[str], file: str = "") -> None:
        self.problems = problems
        self.file = file
        head = f"{file}: " if file else ""
        super().__init__("\n".join(head + p for p in problems))


@dataclass(frozen=True)
class Port:
    port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass
class Service:
    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    replicas: int = 1
    ips: list[str] = field(default_factory=list)  # fixed addresses, one per replica (optional)
    commands: list[list[str]] = field(default_factory=list)  # argv per process; [] = idle
    ports: list[Port] = field(default_factory=list)
    ready_ports: list[Port] = field(default_factory=list)  # waited for before `up` returns
    enforce: bool = True
    selector: dict[str, str] | None = None  # the Kubernetes Service's selector (default: labels)

    def replica_names(self) -> list[str]:
        if self.replicas == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(1, self.replicas + 1)]


@dataclass
class DNSRecord:
    name: str
    a: list[str] = field(default_factory=list)
    cname: str = ""
    ttl: int | None = None


@dataclass
class DNS:
    name: str = "kube-dns"
    namespace: str = "kube-system"
    labels: dict[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    service_account: str = "coredns"
    ip: str = ""
    domain: str = DEFAULT_DOMAIN
    ttl: int = DEFAULT_TTL
    options: list[str] = field(default_factory=lambda: list(DEFAULT_RESOLV_OPTIONS))
    records: list[DNSRecord] = field(default_factory=list)
    enforce: bool = False


@dataclass
class External:
    host: str
    ip: str = ""
    ports: list[int] = field(default_factory=lambda: list(EXTERNAL_PORTS))
    aliases: list[str] = field(default_factory=list)
    ttl: int | None = None


@dataclass
class LabSpec:
    name: str
    file: str = ""
    subnet: str = DEFAULT_SUBNET
    services: list[Service] = field(default_factory=list)
    dns: DNS = field(default_factory=DNS)
    external: list[External] = field(default_factory=list)
    policies: str = ""  # absolute path of the directory copied into the lab's policies dir


# -- reading ------------------------------------------------------------------------------------

class _Reader:
    """Collects problems instead of stopping at the first one."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}" if where else msg)

    def keys(self, where: str, data: dict, allowed: tuple[str, ...]) -> None:
        for k in data:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(allowed)})"
                self.fail(where, f"unknown field {k!r}{hint}")

    def mapping(self, where: str, value, default=None) -> dict:
        if value is None:
            return {} if default is None else default
        if not isinstance(value, dict):
            self.fail(where, f"must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def string(self, where: str, value, default: str = "") -> str:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(where, f"must be a string, got {type(value).__name__}")
            return default
        return str(value)

    def boolean(self, where: str, value, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(where, "must be true or false")
            return default
        return value

    def integer(self, where: str, value, default: int, lo: int, hi: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(where, f"must be an integer from {lo} to {hi}")
            return default
        return value

    def labels(self, where: str, value, default=None) -> dict[str, str]:
        out = {}
        for k, v in self.mapping(where, value, default).items():
            if not isinstance(k, str) or not k or "," in k or "=" in k:
                self.fail(where, f"bad label key {k!r}")
                continue
            if isinstance(v, (dict, list)) or v is None or "," in str(v):
                self.fail(f"{where}.{k}", "label value must be a plain string without commas")
                continue
            out[k] = str(v).lower() if isinstance(v, bool) else str(v)
        return out

    def ipv4(self, where: str, value) -> str:
        text = self.string(where, value)
        try:
            addr = ipaddress.IPv4Address(text)
        except ValueError:
            self.fail(where, f"{text!r} is not an IPv4 address")
            return ""
        if addr.is_loopback or addr.is_multicast or addr.is_link_local or addr.is_unspecified \
                or str(addr) == "255.255.255.255":
            self.fail(where, f"{text} cannot be a workload address")
            return ""
        return str(addr)

    def port(self, where: str, value, name: str = "") -> Port | None:
        """`80`, `"53/UDP"` or `{port: 80, protocol: TCP, name: http}`."""
        proto = "TCP"
        if isinstance(value, dict):
            self.keys(where, value, ("port", "protocol", "name"))
            name = self.string(f"{where}.name", value.get("name"), name)
            proto = self.string(f"{where}.protocol", value.get("protocol"), "TCP").upper()
            value = value.get("port")
        elif isinstance(value, str) and "/" in value:
            value, _, proto = value.partition("/")
            proto = proto.upper()
        try:
            num = int(value) if not isinstance(value, bool) else -1
        except (TypeError, ValueError):
            num = -1
        if not 1 <= num <= 65535:
            self.fail(where, f"port must be 1-65535, got {value!r}")
            return None
        if proto not in PROTOCOLS:
            self.fail(where, f"protocol must be one of {', '.join(PROTOCOLS)}, got {proto!r}")
            return None
        if name and not _PORT_NAME.match(name):
            self.fail(where, f"port name {name!r} must be 1-15 lowercase letters, digits or '-'")
            return None
        return Port(num, proto, name)

    def ports(self, where: str, value) -> list[Port]:
        out: list[Port] = []
        if value is None:
            return out
        if isinstance(value, dict):  # {name: port}
            for n, p in value.items():
                got = self.port(f"{where}.{n}", p, str(n))
                if got:
                    out.append(got)
        elif isinstance(value, list):
            for i, p in enumerate(value):
                got = self.port(f"{where}[{i}]", p)
                if got:
                    out.append(got)
        else:
            self.fail(where, "must be a list of ports or a mapping name: port")
        return out

    def argv(self, where: str, value) -> list[str] | None:
        if isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as e:
                self.fail(where, f"cannot split command: {e}")
                return None
        if not isinstance(value, list) or not value or \
                not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
            self.fail(where, "must be a command: a string or a list of strings")
            return None
        return [str(a) for a in value]


SERVICE_KEYS = ("labels", "namespace", "serviceAccount", "replicas", "ips", "ip", "app", "args",
                "command", "ports", "enforce", "selector")
DNS_KEYS = ("name", "namespace", "labels", "serviceAccount", "ip", "domain", "ttl", "options",
            "records", "enforce")
EXTERNAL_KEYS = ("ip", "ports", "aliases", "ttl")
TOP_KEYS = ("name", "subnet", "services", "dns", "external", "policies")


def _service(r: _Reader, name, data) -> Service | None:
    where = f"services.{name}"
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 50:
        r.fail(where, "a service name must be a DNS label: lowercase letters, digits and '-'")
        return None
    data = r.mapping(where, data)
    r.keys(where, data, SERVICE_KEYS)
    svc = Service(name)
    svc.labels = r.labels(f"{where}.labels", data.get("labels"))
    svc.namespace = r.string(f"{where}.namespace", data.get("namespace"), "default")
    if not _NAME.match(svc.namespace):
        r.fail(f"{where}.namespace", f"{svc.namespace!r} is not a valid namespace name")
    svc.service_account = r.string(f"{where}.serviceAccount", data.get("serviceAccount"), "default")
    svc.replicas = r.integer(f"{where}.replicas", data.get("replicas"), 1, 1, 50)
    ips = data.get("ips")
    if data.get("ip") is not None:
        if ips is not None:
            r.fail(where, "give either ip or ips, not both")
        ips = [data["ip"]]
    if ips is not None:
        if not isinstance(ips, list):
            r.fail(f"{where}.ips", "must be a list of addresses, one per replica")
        else:
            svc.ips = [r.ipv4(f"{where}.ips[{i}]", ip) for i, ip in enumerate(ips)]
            if len(svc.ips) != svc.replicas:
                r.fail(f"{where}.ips", f"{len(svc.ips)} addresses for {svc.replicas} replicas")
    svc.ports = r.ports(f"{where}.ports", data.get("ports"))
    app, command = data.get("app"), data.get("command")
    if app is not None and command is not None:
        r.fail(where, "give either app or command, not both")
    if app is not None:
        module = BUILTIN_APPS.get(str(app))
        if module is None:
            r.fail(f"{where}.app", f"unknown app {app!r} (built-in: {', '.join(BUILTIN_APPS)})")
        else:
            args = data.get("args") or []
            extra = r.argv(f"{where}.args", args) if args else []
            svc.commands = [["python", "-m", module[0], *(extra or [])]]
            if not args and not svc.ports:
                svc.ready_ports = [Port(p, proto) for p, proto in module[1]]
    elif data.get("args") is not None:
        r.fail(f"{where}.args", "args go with app (for command, write the whole argv)")
    if command is not None:
        if isinstance(command, list) and command and all(isinstance(c, list) for c in command):
            argvs = [r.argv(f"{where}.command[{i}]", c) for i, c in enumerate(command)]
        else:
            argvs = [r.argv(f"{where}.command", command)]
        svc.commands = [a for a in argvs if a]
    svc.ready_ports = svc.ready_ports or list(svc.ports)
    svc.enforce = r.boolean(f"{where}.enforce", data.get("enforce"), True)
    if data.get("selector") is not None:
        svc.selector = r.labels(f"{where}.selector", data.get("selector"))
    return svc


def _records(r: _Reader, value) -> list[DNSRecord]:
    out = []
    for name, v in r.mapping("dns.records", value).items():
        where = f"dns.records.{name}"
        host = str(name).lower().rstrip(".")
        if not _HOST.match(host):
            r.fail(where, f"{name!r} is not a valid DNS name")
            continue
        rec = DNSRecord(host)
        if isinstance(v, dict):
            r.keys(where, v, ("a", "cname", "ttl"))
            if ("a" in v) == ("cname" in v):
                r.fail(where, "give exactly one of a or cname")
                continue
            rec.ttl = r.integer(f"{where}.ttl", v.get("ttl"), 0, 0, 86400) if "ttl" in v else None
            if "cname" in v:
                rec.cname = r.string(f"{where}.cname", v["cname"]).lower().rstrip(".")
                if not _HOST.match(rec.cname):
                    r.fail(f"{where}.cname", f"{rec.cname!r} is not a valid DNS name")
                out.append(rec)
                continue
            v = v["a"]
        ips = v if isinstance(v, list) else [v]
        rec.a = [ip for ip in (r.ipv4(f"{where}[{i}]", x) for i, x in enumerate(ips)) if ip]
        out.append(rec)
    return out


def _dns(r: _Reader, data) -> DNS:
    data = r.mapping("dns", data)
    r.keys("dns", data, DNS_KEYS)
    d = DNS()
    d.name = r.string("dns.name", data.get("name"), d.name)
    if not _NAME.match(d.name):
        r.fail("dns.name", f"{d.name!r} must be a DNS label")
    d.namespace = r.string("dns.namespace", data.get("namespace"), d.namespace)
    if "labels" in data:
        d.labels = r.labels("dns.labels", data.get("labels"))
    d.service_account = r.string("dns.serviceAccount", data.get("serviceAccount"), d.service_account)
    if data.get("ip") is not None:
        d.ip = r.ipv4("dns.ip", data.get("ip"))
    d.domain = r.string("dns.domain", data.get("domain"), d.domain).lower().strip(".")
    if not _HOST.match(d.domain):
        r.fail("dns.domain", f"{d.domain!r} is not a valid DNS name")
    d.ttl = r.integer("dns.ttl", data.get("ttl"), d.ttl, 0, 86400)
    opts = data.get("options")
    if opts is not None:
        if not isinstance(opts, list) or not all(isinstance(o, str) and o and " " not in o for o in opts):
            r.fail("dns.options", "must be a list of resolv.conf options like ndots:5")
        else:
            d.options = list(opts)
    d.records = _records(r, data.get("records"))
    d.enforce = r.boolean("dns.enforce", data.get("enforce"), False)
    return d


def _external(r: _Reader, value) -> list[External]:
    if value is None:
        return []
    if isinstance(value, list):  # just host names
        items = []
        for i, h in enumerate(value):
            if isinstance(h, str):
                items.append((h, {}))
            else:
                r.fail(f"external[{i}]", "must be a host name (use the mapping form for options)")
        value = dict(items)
    out = []
    for host, data in r.mapping("external", value).items():
        where = f"external.{host}"
        h = str(host).lower().rstrip(".")
        if not _HOST.match(h):
            r.fail(where, f"{host!r} is not a valid host name")
            continue
        data = r.mapping(where, data)
        r.keys(where, data, EXTERNAL_KEYS)
        ext = External(h)
        if data.get("ip") is not None:
            ext.ip = r.ipv4(f"{where}.ip", data.get("ip"))
        if data.get("ports") is not None:
            ports = r.ports(f"{where}.ports", data.get("ports"))
            if any(p.protocol != "TCP" for p in ports):
                r.fail(f"{where}.ports", "external hosts serve HTTP: TCP ports only")
            ext.ports = [p.port for p in ports]
        aliases = data.get("aliases") or []
        if not isinstance(aliases, list):
            r.fail(f"{where}.aliases", "must be a list of host names")
            aliases = []
        for a in aliases:
            a = str(a).lower().rstrip(".")
            if not _HOST.match(a):
                r.fail(f"{where}.aliases", f"{a!r} is not a valid host name")
            else:
                ext.aliases.append(a)
        if "ttl" in data:
            ext.ttl = r.integer(f"{where}.ttl", data.get("ttl"), 0, 0, 86400)
        out.append(ext)
    return out


def parse(data, file: str = "", base: Path | None = None) -> LabSpec:
    """A lab file's YAML value -> LabSpec; relative paths resolve against `base`."""
    r = _Reader()
    if not isinstance(data, dict):
        raise LabFileError(["a lab file is a YAML mapping (name, subnet, services, dns, external, policies)"], file)
    r.keys("", data, TOP_KEYS)
    default_name = Path(file).stem if file else "lab"
    name = r.string("name", data.get("name"), default_name)
    if not _NAME.match(name) or len(name) > MAX_LAB_NAME:
        r.fail("name", f"{name!r}: a lab name is 1-{MAX_LAB_NAME} lowercase letters, digits or '-'")
    spec = LabSpec(name=name, file=file)
    subnet = r.string("subnet", data.get("subnet"), DEFAULT_SUBNET)
    try:
        net = ipaddress.IPv4Network(subnet)
        if net.prefixlen > 29 or net.is_loopback or net.is_multicast or net.is_link_local:
            r.fail("subnet", f"{subnet}: need an IPv4 unicast network of /29 or larger")
        spec.subnet = str(net)
    except ValueError as e:
        r.fail("subnet", f"{subnet!r}: {e}")
    services = data.get("services")
    if services is None:
        r.fail("services", "a lab needs at least one service")
    for sname, sdata in r.mapping("services", services).items():
        svc = _service(r, sname, sdata)
        if svc:
            spec.services.append(svc)
    spec.dns = _dns(r, data.get("dns"))
    spec.external = _external(r, data.get("external"))
    pol = data.get("policies")
    if pol is not None:
        p = Path(r.string("policies", pol))
        if base is not None and not p.is_absolute():
            p = base / p
        if not p.is_dir():
            r.fail("policies", f"{p} is not a directory")
        spec.policies = str(p.resolve())
    if r.problems:
        raise LabFileError(r.problems, file)
    return spec


def load(path: str | Path) -> LabSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LabFileError([f"cannot read: {e.strerror or e}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise LabFileError([f"{where}invalid YAML: {getattr(e, 'problem', e)}"], str(path)) from None
    return parse(data, str(path), path.resolve().parent)
