"""`l7gate compose inject`: turn an existing compose file into one where selected services are enforced.

`inject(doc, project, policies_dir, services)` is a pure transform of a parsed compose file (it never
mutates its input) returning `(new_doc, report)`. For each selected, enforceable service `S`:

* a sidecar service `S-l7gate` is added that OWNS the network namespace; the app gets
  `network_mode: "service:S-l7gate"` so all of its traffic crosses the sidecar's datapath, and if the
  sidecar dies the app has no network (fail closed);
* what compose/Docker forbid on a container that joins another's namespace moves to the sidecar
  (`MOVED_KEYS`: ports, expose, networks incl. aliases, hostname, domainname, dns, dns_search, dns_opt,
  extra_hosts, mac_address, links, external_links, `net.*` sysctls, and a `network_mode` such as
  `bridge`);
* the sidecar gets the aliases `S` (and the app's `container_name`) on each of its networks, so other
  services still reach the app by its old name;
* the app gets `depends_on: {S-l7gate: {condition: service_healthy}}` merged with its own depends_on
  (list form becomes the equivalent map form, `condition: service_started`), and the sidecar's
  healthcheck passes only once the agent wrote `agents/S.ready` in the registry, i.e. after its
  datapath is in place (a stale marker of a killed agent is removed first thing at start): the app
  never runs with unenforced traffic;
* the sidecar mounts the policies directory read-only at /etc/l7gate/policies and the named volume
  `l7gate-registry` (shared by all sidecars of the project) at /var/run/l7gate/registry.

Label mapping (endpoint identity): every compose label `k=v` of the app becomes the endpoint label
`container:k=v` (source `container`, as Cilium's Docker integration named it), plus
`container:com.docker.compose.service=S`; the endpoint name is `S` and its namespace is the compose
project name. A Kubernetes policy selecting `matchLabels: {org: empire}` (any source) therefore selects
compose services labelled `org: empire` unchanged. Labels whose key or value contains a comma cannot be
passed through `--labels k=v,...` and are left out with a warning.

Not enforceable (reported with the reason, left exactly as they were): `network_mode: host` (shares the
host's namespace), `none` (no network to enforce), `service:X` / `container:X` (joins another namespace;
it is enforced together with X when X is injected), `privileged: true` or `cap_add` NET_ADMIN /
SYS_ADMIN / ALL (the app could rewrite or delete the nftables table that enforces it).

Idempotent: an app already joined to its marked sidecar is reported as already injected and nothing in
the file changes. Sidecars carry the label `io.l7gate.sidecar-for: S` and are never injected themselves.

Several `-f` files are merged first by the compose tool itself (`docker-compose ... config`, see
`merged`): its override rules are not reimplemented; one file is read as it is.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

SUFFIX = "-l7gate"
IMAGE = "l7gate-sidecar:latest"
MARKER = "io.l7gate.sidecar-for"
REGISTRY_VOLUME = "l7gate-registry"
POLICIES_MOUNT = "/etc/l7gate/policies"
REGISTRY_MOUNT = "/var/run/l7gate/registry"
DEFAULT_POLICIES = "./policies"
DEFAULT_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
# Keys Docker refuses on a container that joins another's network namespace: they belong to the owner.
MOVED_KEYS = ("ports", "expose", "networks", "hostname", "domainname", "dns", "dns_search", "dns_opt",
              "extra_hosts", "mac_address", "links", "external_links")
NETNS_OWNER_CAPS = {"NET_ADMIN", "SYS_ADMIN", "ALL"}  # enough to rewrite or delete our nftables table
UNENFORCEABLE = {
    "host": "network_mode: host shares the host's network namespace; a sidecar cannot own it",
    "none": "network_mode: none has no network to enforce",
}


@dataclass
class Entry:
    service: str
    status: str  # injected | already-injected | skipped | sidecar
    reason: str = ""


@dataclass
class Report:
    entries: list[Entry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def by_status(self, status: str) -> list[str]:
        return [e.service for e in self.entries if e.status == status]

    @property
    def changed(self) -> bool:
        return bool(self.by_status("injected"))

    def lines(self) -> list[str]:
        out = []
        for e in self.entries:
            out.append(f"{e.service}: {e.status}" + (f" ({e.reason})" if e.reason else ""))
        out += [f"warning: {w}" for w in self.warnings]
        return out


def sidecar_name(service: str) -> str:
    return service + SUFFIX


def _label_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def compose_labels(labels: Any) -> list[tuple[str, str]]:
    """A service's `labels:` (list `k=v` or map form) as ordered (key, value) pairs."""
    if not labels:
        return []
    if isinstance(labels, dict):
        return [(str(k), _label_text(v)) for k, v in labels.items()]
    out = []
    for item in labels:
        k, _, v = str(item).partition("=")
        out.append((k, v))
    return out


def endpoint_labels(service: str, labels: Any, warnings: list[str]) -> str:
    """The `--labels` argument of the agent: `container:k=v,...` + the compose service name."""
    parts = []
    for k, v in compose_labels(labels):
        if "," in k or "," in v:
            warnings.append(f"{service}: label {k!r} contains a comma and is not an endpoint label")
            continue
        parts.append(f"container:{k.strip()}={v.strip()}")
    parts.append(f"container:com.docker.compose.service={service}")
    return ",".join(parts)


def _networks_map(networks: Any) -> dict:
    if isinstance(networks, dict):
        return {k: (dict(v) if isinstance(v, dict) else {}) for k, v in networks.items()}
    return {n: {} for n in networks or []}


def _add_aliases(net: dict, names: list[str]) -> dict:
    aliases = list(net.get("aliases") or [])
    for n in names:
        if n not in aliases:
            aliases.append(n)
    net["aliases"] = aliases
    return net


def _merge_depends_on(depends_on: Any, sidecar: str) -> dict:
    if isinstance(depends_on, dict):
        out = {k: (dict(v) if isinstance(v, dict) else {"condition": "service_started"})
               for k, v in depends_on.items()}
    else:
        out = {k: {"condition": "service_started"} for k in depends_on or []}
    out[sidecar] = {"condition": "service_healthy"}
    return out


def _is_sidecar(svc: Any) -> bool:
    return isinstance(svc, dict) and MARKER in dict(compose_labels(svc.get("labels")))


def _status(name: str, svc: Any, services: dict) -> Entry | None:
    """None when `name` can be injected, else why not (or that it already is)."""
    if not isinstance(svc, dict):
        return Entry(name, "skipped", "service definition is not a mapping")
    if _is_sidecar(svc):
        return Entry(name, "sidecar", f"l7gate sidecar of {dict(compose_labels(svc['labels']))[MARKER]}")
    mode = svc.get("network_mode")
    side = sidecar_name(name)
    if mode == f"service:{side}" and _is_sidecar(services.get(side)):
        return Entry(name, "already-injected", f"joined to {side}")
    if isinstance(mode, str):
        if mode in UNENFORCEABLE:
            return Entry(name, "skipped", UNENFORCEABLE[mode])
        for prefix in ("service:", "container:"):
            if mode.startswith(prefix):
                return Entry(name, "skipped", f"network_mode: {mode} joins another network namespace; "
                             f"it is enforced together with {mode[len(prefix):]} when that is injected")
    if side in services:
        return Entry(name, "skipped", f"a service named {side} already exists and is not its l7gate sidecar")
    caps = {str(c).upper().removeprefix("CAP_") for c in svc.get("cap_add") or []}
    if svc.get("privileged") is True or caps & NETNS_OWNER_CAPS:
        held = "privileged: true" if svc.get("privileged") is True else \
            "cap_add: " + ", ".join(sorted(caps & NETNS_OWNER_CAPS))
        return Entry(name, "skipped", f"{held} lets the app change its network namespace's "
                     "nftables: it could remove the table that enforces its policy")
    return None


def _split_sysctls(sysctls: Any) -> tuple[Any, Any]:
    """(net.* sysctls, the rest), each in the form given: net.* belong to the namespace's owner."""
    if not sysctls:
        return None, sysctls
    if isinstance(sysctls, dict):
        net = {k: v for k, v in sysctls.items() if str(k).startswith("net.")}
        rest = {k: v for k, v in sysctls.items() if not str(k).startswith("net.")}
    else:
        net = [x for x in sysctls if str(x).startswith("net.")]
        rest = [x for x in sysctls if not str(x).startswith("net.")]
    return net or None, rest or None


def make_sidecar(name: str, app: dict, project: str, policies_dir: str, image: str,
                 warnings: list[str]) -> dict:
    command = ["l7gate", "run", "--policies", POLICIES_MOUNT, "--registry", REGISTRY_MOUNT,
               "--name", name, "--labels", endpoint_labels(name, app.get("labels"), warnings),
               "--namespace", project]
    side: dict = {
        "image": image,
        "cap_add": ["NET_ADMIN"],
        "command": command,
        "labels": {MARKER: name},
    }
    for key in MOVED_KEYS:
        if key in app and key != "networks":
            side[key] = copy.deepcopy(app[key])
    mode = app.get("network_mode")
    aliases = list(dict.fromkeys([name] + ([str(app["container_name"])] if app.get("container_name") else [])))
    if mode is not None:  # bridge, default or a network name: the owner of the namespace carries it
        side["network_mode"] = mode
        if mode not in ("default",):
            warnings.append(f"{name}: network_mode: {mode} moved to {sidecar_name(name)}; "
                            "no aliases can be added there")
    else:
        side["networks"] = {k: _add_aliases(v, aliases)
                            for k, v in _networks_map(copy.deepcopy(app.get("networks"))).items()} \
            if app.get("networks") else {"default": {"aliases": aliases}}
    net_sysctls, _ = _split_sysctls(app.get("sysctls"))
    if net_sysctls:
        side["sysctls"] = net_sysctls
    if "restart" in app:
        side["restart"] = app["restart"]
    side["healthcheck"] = {
        "test": ["CMD", "test", "-f", f"{REGISTRY_MOUNT}/agents/{name}.ready"],
        "interval": "1s", "timeout": "3s", "retries": 60,
    }
    side["volumes"] = [f"{policies_dir}:{POLICIES_MOUNT}:ro", f"{REGISTRY_VOLUME}:{REGISTRY_MOUNT}"]
    return side


def inject(doc: dict, project: str, policies_dir: str, services: set[str] | None = None,
           image: str = IMAGE) -> tuple[dict, Report]:
    """Pure transform; raises ValueError for a file that is not a compose file or unknown services."""
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ValueError("not a compose file: no top-level `services:` mapping "  # noqa: TRY004
                         "(the v1 format without `services:` is not supported)")
    report = Report()
    src = doc["services"]
    if services is not None:
        unknown = sorted(set(services) - set(src))
        if unknown:
            raise ValueError(f"no such service: {', '.join(unknown)}")
    new_services: dict = {}
    for name, svc in src.items():
        entry = _status(name, svc, src)
        if services is not None and name not in services:
            new_services[name] = copy.deepcopy(svc)
            continue
        if entry is not None:
            report.entries.append(entry)
            new_services[name] = copy.deepcopy(svc)
            continue
        app = copy.deepcopy(svc)
        side = make_sidecar(name, app, project, policies_dir, image, report.warnings)
        for key in MOVED_KEYS + ("network_mode",):
            app.pop(key, None)
        if "sysctls" in app:
            rest = _split_sysctls(app["sysctls"])[1]
            if rest:
                app["sysctls"] = rest
            else:
                del app["sysctls"]
        sname = sidecar_name(name)
        app["network_mode"] = f"service:{sname}"
        app["depends_on"] = _merge_depends_on(app.get("depends_on"), sname)
        replicas = app.get("scale") or (app.get("deploy") or {}).get("replicas")
        if isinstance(replicas, int) and replicas > 1:
            report.warnings.append(f"{name}: {replicas} replicas would all join the one {sname} namespace "
                                   "and share one endpoint; run one replica per enforced service")
        new_services[sname] = side
        new_services[name] = app
        report.entries.append(Entry(name, "injected", f"sidecar {sname}"))
    if not report.changed:
        return copy.deepcopy(doc), report
    injected = set(report.by_status("injected"))
    for name, svc in src.items():
        if not isinstance(svc, dict):
            continue
        for link in svc.get("links") or []:
            target = str(link).split(":")[0]
            if target in injected:
                report.warnings.append(f"{name}: `links: {link}` points at {target}, which now has no "
                                       f"network of its own; use the service name ({target}) instead")
    out: dict = {}
    for key, value in doc.items():
        if key == "version" and not _version_allows_conditions(value):
            report.warnings.append(f"removed `version: {value}`: depends_on conditions need the Compose "
                                   "Specification (docker compose v2, docker-compose >= 1.27)")
            continue
        out[key] = new_services if key == "services" else copy.deepcopy(value)
    volumes = out.get("volumes")
    if not isinstance(volumes, dict):
        volumes = {}
    volumes.setdefault(REGISTRY_VOLUME, {})
    out["volumes"] = volumes
    return out, report


def _version_allows_conditions(version: Any) -> bool:
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?.*", str(version))
    if not m:
        return False
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    return major == 2 and minor >= 1


# ---- YAML in and out --------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 numbers: `22:22` stays a string, as compose v2 reads it."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v
                                       if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=4096)


def project_name(doc: Any, path: Path) -> str:
    """Compose's project name: top-level `name:`, $COMPOSE_PROJECT_NAME, else the file's folder."""
    raw = (doc.get("name") if isinstance(doc, dict) else None) or os.environ.get("COMPOSE_PROJECT_NAME") \
        or path.resolve().parent.name
    return re.sub(r"[^-_a-z0-9]", "", str(raw).lower()) or "default"


def compose_cli() -> list[str] | None:
    """docker-compose (v1, Debian's) or `docker compose` (v2); None when neither is there."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def merged(files: list[str]) -> str:
    """Several compose files as one, merged by the compose tool itself (`config`): its override
    rules are not reimplemented here. Relative paths come back absolute, anchored where compose
    anchors them (the first file's folder). ValueError when no compose tool is installed or it
    rejects the files."""
    cli = compose_cli()
    if cli is None:
        raise ValueError("merging several compose files needs docker-compose or `docker compose`")
    argv = [*cli] + [a for f in files for a in ("-f", f)] + ["config"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ValueError(f"{' '.join(argv)}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def inject_command(files: list[str], policies: str | None, services: list[str] | None,
                   output: str | None, out: TextIO) -> int:
    """`l7gate compose inject`: 0 written, 1 bad input, 2 usage. The YAML goes to `output` or `out`;
    the report goes to `out` when writing a file, else to stderr (so stdout stays valid YAML).
    Relative `policies` are written as `./DIR`: compose resolves them against the project directory
    (the folder of the file it is given). $L7GATE_SIDECAR_IMAGE overrides the sidecar image."""
    err = sys.stderr
    if not files:
        found = [f for f in DEFAULT_FILES if Path(f).is_file()]
        if not found:
            print(f"error: no compose file given and none of {', '.join(DEFAULT_FILES)} here", file=err)
            return 2
        files = found[:1]
    path = Path(files[0])
    try:
        if len(files) > 1:
            text = merged(files)
        else:
            text = sys.stdin.read() if files[0] == "-" else path.read_text()
        doc = load(text)
        policies_dir = policies or DEFAULT_POLICIES
        if not os.path.isabs(policies_dir) and not policies_dir.startswith((".", "~")):
            policies_dir = "./" + policies_dir
        new, report = inject(doc, project_name(doc, path), policies_dir,
                             set(services) if services else None,
                             os.environ.get("L7GATE_SIDECAR_IMAGE") or IMAGE)
    except (OSError, yaml.YAMLError, ValueError) as e:
        print(f"error: {', '.join(files)}: {e}", file=err)
        return 1
    text = dump(new)
    if output:
        Path(output).write_text(text)
        rep = out
    else:
        out.write(text)
        rep = err
    for line in report.lines():
        print(line, file=rep)
    return 0
