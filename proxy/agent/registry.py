"""The shared registry directory: every sidecar publishes its endpoint and reads the others'.

Layout: `agents/<name>.ready` (the agent's policy is in force), `endpoints/<name>.json` (one per workload: name, namespace, labels, serviceAccount, ips,
identity), `services/<namespace>.<name>.json` (`{name, namespace, selector, ips}`, for
`toServices`; written by whoever defines services: the lab, compose), `identities/<number>` (claimed with an atomic exclusive create, holding the label set
it stands for, so all sidecars agree on the numbers), `agents/<name>.sock` (control sockets).
Writes are atomic (write a temp file, rename), so a reader never sees half a file.

Every sidecar can write here: a record is taken only when well formed (addresses that are
addresses, labels that are strings), and never with `reserved:` labels (`reserved:host` would
make its addresses the host, which allow-localhost lets in everywhere); others are skipped.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
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

    @classmethod
    def from_json(cls, data: object) -> EndpointRecord:
        """A record as read from the registry; ValueError/TypeError if it is not one to trust."""
        if not isinstance(data, dict):
            raise TypeError("not an object")
        rec = cls(**data)  # unknown keys: TypeError
        for name in ("name", "namespace", "serviceAccount"):
            if not isinstance(getattr(rec, name), str) or not getattr(rec, name):
                raise ValueError(f"{name} must be a non-empty string")
        if not isinstance(rec.identity, int) or isinstance(rec.identity, bool):
            raise ValueError("identity must be a number")
        if not (isinstance(rec.labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in rec.labels.items())):
            raise ValueError("labels must map strings to strings")
        if any(k.lower().startswith("reserved:") for k in rec.labels):
            raise ValueError("reserved labels belong to the agent, not to a record")
        if not (isinstance(rec.ips, list) and all(isinstance(ip, str) for ip in rec.ips)):
            raise ValueError("ips must be a list of addresses")
        for ip in rec.ips:
            ipaddress.ip_address(ip)  # ValueError if it is not one
        if not (isinstance(rec.namedPorts, dict) and all(
                isinstance(k, str) and isinstance(v, int) and 0 < v < 65536
                for k, v in rec.namedPorts.items())):
            raise ValueError("namedPorts must map names to ports")
        return rec

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

    def ready_path(self, name: str) -> Path:
        """Appears once the agent's policy is in force (the lab and compose wait for it)."""
        return self.root / "agents" / f"{name}.ready"

    def publish(self, rec: EndpointRecord) -> None:
        path = self.endpoint_path(rec.name)
        tmp = path.with_suffix(f".tmp{secrets.token_hex(8)}")
        tmp.write_text(json.dumps(asdict(rec), sort_keys=True))
        os.replace(tmp, path)

    def record(self, name: str) -> EndpointRecord | None:
        """The record published under `name`, as the others read it (None: none, or unreadable)."""
        found = [r for r in self._read_endpoints([self.endpoint_path(name)])]
        return found[0] if found else None

    def withdraw(self, name: str) -> None:
        self.ready_path(name).unlink(missing_ok=True)
        self.endpoint_path(name).unlink(missing_ok=True)

    def endpoints(self) -> list[EndpointRecord]:
        """Every trusted record. OSError when the directory or a record cannot be read (out of
        file descriptors...): a partial view would turn the missing peers into `world`."""
        return self._read_endpoints(sorted(self._listing("endpoints")))

    def _listing(self, sub: str) -> list[Path]:
        with os.scandir(self.root / sub) as it:  # raises, where glob would yield nothing
            return [Path(e.path) for e in it if e.name.endswith(".json")]

    @staticmethod
    def _read_endpoints(paths) -> list[EndpointRecord]:
        out = []
        for p in paths:
            try:
                out.append(EndpointRecord.from_json(json.loads(p.read_text())))
            except FileNotFoundError:
                continue  # withdrawn meanwhile
            except (ValueError, TypeError):
                continue  # malformed or not to be trusted: skipped
        return out

    def services(self) -> list[Service]:
        out = []
        for p in sorted(self._listing("services")):
            try:
                out.append(service_from_dict(json.loads(p.read_text()), str(p)))
            except (FileNotFoundError, ValueError):
                continue  # withdrawn meanwhile, or malformed
        return out

    def version(self) -> tuple:
        """Changes whenever an endpoint or service is published or withdrawn (cheap to poll)."""
        out = []
        for sub in ("endpoints", "services"):
            for p in self._listing(sub):
                try:
                    out.append((sub, p.name, p.stat().st_mtime_ns))
                except FileNotFoundError:
                    continue
        return tuple(sorted(out))

    def reserve_identity(self, number: int, labels_key: str) -> bool:
        """Claim `number` for a label set; True if it is now (or already was) ours."""
        path = self.root / "identities" / str(number)
        # random: in compose every agent is PID 1, and two claims must not share a temp file
        tmp = path.with_name(f".{number}.{secrets.token_hex(8)}")
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
