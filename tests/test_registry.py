"""The shared registry: every sidecar can write it, so what is read from it is checked first."""
from __future__ import annotations

import json
import threading

from proxy.agent.registry import EndpointRecord, Registry


def test_only_well_formed_records_without_reserved_labels_are_taken(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(EndpointRecord("good", labels={"app": "web"}, ips=["10.0.0.1"], identity=1000))
    bad = {
        "host": {"name": "host", "labels": {"reserved:host": ""}, "ips": ["10.0.0.9"]},
        "Host2": {"name": "Host2", "labels": {"Reserved:Host": ""}, "ips": ["10.0.0.8"]},
        "ipstr": {"name": "ipstr", "ips": "10.0.0.2"},
        "notip": {"name": "notip", "ips": ["10.0.0.256"]},
        "labellist": {"name": "labellist", "labels": ["app=web"]},
        "labelint": {"name": "labelint", "labels": {"app": 1}},
        "extra": {"name": "extra", "owner": "me"},
        "noname": {"name": "", "ips": ["10.0.0.3"]},
        "port": {"name": "port", "namedPorts": {"http": 70000}},
        "list": [],
    }
    for name, data in bad.items():
        (tmp_path / "endpoints" / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "endpoints" / "half.json").write_text('{"name": "half", "ips": ["10.')
    assert [r.name for r in reg.endpoints()] == ["good"]
    assert reg.record("good").ips == ["10.0.0.1"] and reg.record("host") is None


def test_identity_claims_at_the_same_time_never_share_a_number(tmp_path):
    """In compose every agent is PID 1: temp files named after the PID were shared by
    concurrent claims (a crash, or both label sets claiming one number)."""
    reg = Registry(tmp_path)
    won: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def claim(labels: str) -> None:
        try:
            for n in range(100, 160):
                if reg.reserve_identity(n, labels):
                    won.setdefault(n, []).append(labels)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(f"k8s:app=a{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(v) == 1 for v in won.values()), {n: v for n, v in won.items() if len(v) > 1}
    assert sorted(won) == list(range(100, 160))
