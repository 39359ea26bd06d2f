"""The shared registry directory: every sidecar publishes its endpoint and reads the others'.

Layout: `endpoints/<name>.json` (one per workload: name, namespace, labels, serviceAccount, ips,
identity), `services/<namespace>.<name>.json` (`{name, namespace, selector, ips}`, for
`toServices`; written by whoever defines services: the lab, compose), `identities/<number>` (claimed with an atomic exclusive create, holding the label set
it stands for, so all sidecars agree on the numbers), `agents/<name>.sock` (control sockets).
Writes are atomic (write a temp file, rename), so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from proxy.policy.endpoint import Endpoint, Service, service_from_dict


@dataclass
class EndpointRecord:
    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    serviceAccount: str = "default"
    ips: list[str] = field(default_factory=list)
    identity: int = 0
    namedPorts: dict[str, int] = field(default_factory=dict)

    def endpoint(self) -> Endpoint:
        return Endpoint(name=self.name, namespace=self.namespace, labels=dict(self.labels),
                        service_account=self.serviceAccount, named_ports=dict(self.namedPorts),
                        ips=list(self.ips))


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("endpoints", "services", "identities", "agents"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def endpoint_path(self, name: str) -> Path:
        return self.root / "endpoints" / f"{name}.json"

    def socket_path(self, name: str) -> Path:
        return self.root / "agents" / f"{name}.sock"

    def publish(self, rec: EndpointRecord) -> None:
        path = self.endpoint_path(rec.name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(rec), sort_keys=True))
        os.replace(tmp, path)

    def withdraw(self, name: str) -> None:
        self.endpoint_path(name).unlink(missing_ok=True)

    def endpoints(self) -> list[EndpointRecord]:
        out = []
        for p in sorted((self.root / "endpoints").glob("*.json")):
            try:
                out.append(EndpointRecord(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # being replaced or not ours: the next poll sees it whole
        return out

    def services(self) -> list[Service]:
        out = []
        for p in sorted((self.root / "services").glob("*.json")):
            try:
                out.append(service_from_dict(json.loads(p.read_text()), str(p)))
            except (OSError, ValueError):
                continue
        return out

    def version(self) -> tuple:
        """Changes whenever an endpoint or service is published or withdrawn (cheap to poll)."""
        out = []
        for sub in ("endpoints", "services"):
            for p in (self.root / sub).glob("*.json"):
                try:
                    out.append((sub, p.name, p.stat().st_mtime_ns))
                except OSError:
                    continue
        return tuple(sorted(out))

    def reserve_identity(self, number: int, labels_key: str) -> bool:
        """Claim `number` for a label set; True if it is now (or already was) ours."""
        path = self.root / "identities" / str(number)
        tmp = path.with_name(f".{number}.{os.getpid()}")
        tmp.write_text(labels_key)
        try:
            os.link(tmp, path)  # atomic and exclusive: the claim appears complete or not at all
            return True
        except FileExistsError:
            try:
                return path.read_text() == labels_key
            except OSError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    def identities(self) -> dict[int, str]:
        out = {}
        for p in (self.root / "identities").iterdir():
            if p.name.isdigit():
                try:
                    out[int(p.name)] = p.read_text()
                except OSError:
                    pass
        return out
