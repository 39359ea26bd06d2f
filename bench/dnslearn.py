"""DNS answer -> nft element present, measured in-process (bench/run runs this under
`unshare --net`, a scratch network namespace that vanishes with the process).

The agent exposes no per-answer timing, so this builds the real thing in-process: an
`proxy.agent.run.Agent` (temporary policies and registry directories, a toFQDNs policy for
`*.bench.example`), syncs it (its nftables table lands in this namespace), then for K distinct
names awaits `agent.oracle.learn(name, [ip], ttl)` -- exactly what the DNS proxy awaits between
receiving an allowed upstream answer and releasing it -- and times each call. After each call
(outside the timing) it checks the IP is in the table's fqdn4 map (`nft get element`).
Prints one JSON object: n, missing, p50_ms, p99_ms, max_ms, first/last-tenth p50 (the table
grows by one element per name), seconds.

    unshare --net -- .venv/bin/python bench/dnslearn.py --names 300 --seconds 20
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.agent.run import Agent, AgentConfig, parse_labels
from proxy.datapath import nft
from proxy.datapath.constants import TABLE

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-learn
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: bench-learner
  egress:
    - toFQDNs:
        - matchPattern: "*.bench.example"
      toPorts:
        - ports:
            - port: "80"
              protocol: TCP
    - toEndpoints:
        - matchLabels:
            "k8s:io.kubernetes.pod.namespace": kube-system
            "k8s:k8s-app": kube-dns
      toPorts:
        - ports:
            - port: "53"
              protocol: ANY
          rules:
            dns:
              - matchPattern: "*"
"""


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(p * len(v)))], 3)


async def measure(n: int, seconds: float, ttl: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="l7gate-bench-learn-") as tmp:
        policies, registry = Path(tmp, "policies"), Path(tmp, "registry")
        policies.mkdir()
        (policies / "learn.yaml").write_text(POLICY)
        os.utime(policies / "learn.yaml", (1, 1))  # long written: the agent reads it at once
        agent = Agent(AgentConfig(policies=str(policies), registry=str(registry), name="learner",
                                  labels=parse_labels("app=bench-learner"), ips=["10.231.1.2"]))
        agent.sync(force=True)
        try:
            times: list[float] = []
            missing = 0
            deadline = time.monotonic() + seconds
            t_start = time.monotonic()
            for i in range(n):
                if time.monotonic() >= deadline:
                    break
                ip = f"10.{232 + i // 65536}.{(i // 256) % 256}.{i % 256 or 1}"
                name = f"n{i}.bench.example"
                t0 = time.perf_counter()
                await agent.oracle.learn(name, [ip], ttl)
                times.append((time.perf_counter() - t0) * 1000)
                try:
                    nft.run(f"get element inet {TABLE} fqdn4 {{ {ip} }}\n")
                except nft.NftError:
                    missing += 1
            tenth = max(1, len(times) // 10)
            return {"n": len(times), "missing": missing, "p50_ms": pct(times, 0.5),
                    "p99_ms": pct(times, 0.99), "max_ms": round(max(times), 3) if times else None,
                    "first_tenth_p50_ms": pct(times[:tenth], 0.5),
                    "last_tenth_p50_ms": pct(times[-tenth:], 0.5),
                    "seconds": round(time.monotonic() - t_start, 2)}
        finally:
            try:
                nft.delete_table()
            except nft.NftError:
                pass


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=300, help="distinct names to learn (K)")
    p.add_argument("--seconds", type=float, default=20.0, help="stop learning after this long")
    p.add_argument("--ttl", type=int, default=300)
    a = p.parse_args()
    print(json.dumps(asyncio.run(measure(a.names, a.seconds, a.ttl))))
