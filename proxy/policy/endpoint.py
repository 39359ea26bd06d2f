"""Endpoints and services as the engine sees them, with the labels Cilium derives (spec §4.1).

An endpoint is a workload (a pod in Cilium; a container or lab namespace here). Its identity labels
are its own labels plus the implicit ones: pod namespace, namespace labels, service account and
cluster. The endpoints file (`trace --endpoints`) is YAML: a list of endpoints, or a mapping
`{endpoints: [...], services: [...]}`.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import yaml

from proxy.policy.labels import (CLUSTER, DEFAULT_CLUSTER, K8S, NAMESPACE_LABELS, POD_NAMESPACE,
                                 RESERVED, SERVICE_ACCOUNT, Label, LabelSet, parse_label)


@dataclass
class Endpoint:
    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)  # keys may carry `source:`; default k8s
    namespace_labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    named_ports: dict[str, int] = field(default_factory=dict)
    ips: list[str] = field(default_factory=list)
    cluster: str = DEFAULT_CLUSTER

    def label_set(self) -> LabelSet:
        own = [parse_label(f"{k}={v}" if v not in (None, "") else k, K8S) for k, v in self.labels.items()]
        if any(lb.source == RESERVED for lb in own):
            return LabelSet.of(own)  # host and other reserved endpoints get no Kubernetes labels
        derived = [Label(K8S, POD_NAMESPACE, self.namespace),
                   Label(K8S, CLUSTER, self.cluster),
                   Label(K8S, SERVICE_ACCOUNT, self.service_account)]
        ns_labels = {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}
        derived += [Label(K8S, NAMESPACE_LABELS + k, str(v)) for k, v in ns_labels.items()]
        explicit = {(lb.source, lb.key) for lb in own}
        return LabelSet.of(own + [d for d in derived if (d.source, d.key) not in explicit])

    @property
    def is_host(self) -> bool:
        return any(lb.source == RESERVED and lb.key == "host" for lb in self.label_set())


@dataclass
class Service:
    """A Kubernetes-style service: a pod selector, or (selector-less) backend IPs (spec §2.2)."""
    name: str
    namespace: str = "default"
    selector: dict[str, str] | None = None
    ips: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # for toServices k8sServiceSelector


class EndpointsFileError(ValueError):
    pass


def _str_map(value, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EndpointsFileError(f"{what} must be a mapping")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _ips(value, what: str) -> list[str]:
    out = []
    for ip in value or []:
        try:
            out.append(str(ipaddress.ip_address(str(ip))))
        except ValueError:
            raise EndpointsFileError(f"{what}: {ip!r} is not an IP address") from None
    return out


def endpoint_from_dict(d: dict, where: str) -> Endpoint:
    if not isinstance(d, dict) or not d.get("name"):
        raise EndpointsFileError(f"{where}: an endpoint needs a name")
    known = {"name", "namespace", "labels", "namespaceLabels", "serviceAccount", "namedPorts", "ips"}
    unknown = set(d) - known
    if unknown:
        raise EndpointsFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    ports = {}
    for k, v in _str_map(d.get("namedPorts"), f"{where}.namedPorts").items():
        if not v.isdigit() or not 0 < int(v) < 65536:
            raise EndpointsFileError(f"{where}.namedPorts.{k}: {v!r} is not a port")
        ports[k.lower()] = int(v)
    return Endpoint(name=str(d["name"]), namespace=str(d.get("namespace") or "default"),
                    labels=_str_map(d.get("labels"), f"{where}.labels"),
                    namespace_labels=_str_map(d.get("namespaceLabels"), f"{where}.namespaceLabels"),
                    service_account=str(d.get("serviceAccount") or "default"),
                    named_ports=ports, ips=_ips(d.get("ips"), f"{where}.ips"))


def service_from_dict(d: dict, where: str) -> Service:
    if not isinstance(d, dict) or not d.get("name"):
        raise EndpointsFileError(f"{where}: a service needs a name")
    sel = d.get("selector")
    return Service(name=str(d["name"]), namespace=str(d.get("namespace") or "default"),
                   selector=_str_map(sel, f"{where}.selector") if sel is not None else None,
                   ips=_ips(d.get("ips"), f"{where}.ips"),
                   labels=_str_map(d.get("labels"), f"{where}.labels"))


def load_endpoints_file(path: str) -> tuple[list[Endpoint], list[Service]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise EndpointsFileError(f"{path}: {e}") from None
    if data is None:
        return [], []
    if isinstance(data, list):
        eps, svcs = data, []
    elif isinstance(data, dict):
        eps, svcs = data.get("endpoints") or [], data.get("services") or []
    else:
        raise EndpointsFileError(f"{path}: expected a list of endpoints or {{endpoints, services}}")
    endpoints = [endpoint_from_dict(e, f"{path}: endpoints[{i}]") for i, e in enumerate(eps)]
    services = [service_from_dict(s, f"{path}: services[{i}]") for i, s in enumerate(svcs)]
    names = [e.name for e in endpoints]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise EndpointsFileError(f"{path}: duplicate endpoint name(s) {', '.join(sorted(dup))}")
    return endpoints, services
