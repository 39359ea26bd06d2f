"""Engine speed and memory: printed figures with their targets, never asserted.

Scenario: 1,000 endpoints (50 apps x 20 teams) and 1,000 rules, each selecting one app+team and
allowing ingress from another team on a port, some with HTTP rules, plus deny rules.
Prints one line per figure: `<figure>: <value> (target <target>) ok|short`.
Usage: bench/engine.py [--quick]
"""
from __future__ import annotations

import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.policy import api  # noqa: E402
from proxy.policy.endpoint import Endpoint  # noqa: E402
from proxy.policy.identity import IdentityAllocator  # noqa: E402
from proxy.policy.repository import Repository  # noqa: E402

N_ENDPOINTS = 1000
N_RULES = 1000


def endpoints() -> list[Endpoint]:
    return [Endpoint(name=f"ep-{i}", namespace=f"ns-{i % 5}",
                     labels={"app": f"app-{i % 50}", "team": f"team-{(i // 50) % 20}", "idx": str(i)},
                     ips=[f"10.{i // 250}.{i % 250}.1"])
            for i in range(N_ENDPOINTS)]


def policy(i: int, rng: random.Random) -> api.Policy:
    subject = api.LabelSelector(match_labels={"app": f"app-{i % 50}", "team": f"team-{(i // 50) % 20}"})
    peer = api.LabelSelector(match_labels={"team": f"team-{rng.randrange(20)}"})
    port = api.PortProtocol(port=str(8000 + i % 100), protocol="TCP")
    rules = None
    if i % 4 == 0:
        rules = api.L7Rules(http=[api.PortRuleHTTP(method="GET", path=f"/v1/items/{i}/.*")])
    ingress = [api.PeerRule("ingress", endpoints=[peer], to_ports=[api.PortRule(ports=[port], rules=rules)])]
    deny = None
    if i % 10 == 0:
        deny = [api.PeerRule("ingress", deny=True, cidr=["192.0.2.0/24"])]
    rule = api.Rule(endpoint_selector=subject, ingress=ingress, ingress_deny=deny)
    return api.Policy(api.PolicyRef("CiliumNetworkPolicy", f"ns-{i % 5}", f"rule-{i}"), [rule])


def line(name: str, value: float, unit: str, target: float, higher_is_better: bool) -> None:
    ok = value >= target if higher_is_better else value <= target
    cmp = ">=" if higher_is_better else "<="
    print(f"{name}: {value:,.1f} {unit} (target {cmp} {target:,} {unit}) {'ok' if ok else 'short'}")


def main() -> None:
    quick = "--quick" in sys.argv
    rng = random.Random(7)
    eps = endpoints()
    pols = [policy(i, rng) for i in range(N_RULES)]
    ids = IdentityAllocator()
    idents = [ids.for_labels(e.label_set()) for e in eps]

    t0 = time.perf_counter()
    repo = Repository(pols)
    resolved = [repo.resolve(ident) for ident in idents]
    resolve_s = time.perf_counter() - t0
    line(f"engine resolve {N_ENDPOINTS} endpoints x {N_RULES} rules", resolve_s * 1000, "ms", 2000, False)

    # One policy changes: only the endpoints its subject selects are re-resolved.
    changed = policy(3, random.Random(99))
    t0 = time.perf_counter()
    stale = repo.upsert(changed)
    for ident in idents:
        if ident.id in stale:
            repo.resolve(ident)
    reresolve_ms = (time.perf_counter() - t0) * 1000
    line("engine re-resolve after one policy change", reresolve_ms, "ms", 50, False)

    # Cold lookups: the first decision for each (endpoint, peer) pair computes its entries.
    peers = idents[:: 10]
    t0 = time.perf_counter()
    n = 0
    for ep in resolved[:: 10]:
        for p in peers:
            ep.ingress.lookup(p, "TCP", 8000 + n % 100)
            n += 1
    cold = n / (time.perf_counter() - t0)
    line("engine cold L3/L4 lookups (first per peer)", cold, "lookups/s", 20_000, True)

    # Warm lookups: the PolicyMap path every packet-level decision takes.
    ports = [8000 + i % 100 for i in range(100)]
    work = [(resolved[i % len(resolved)].ingress, peers[i % len(peers)], ports[i % 100])
            for i in range(2000)]
    for dp, p, port in work:
        dp.lookup(p, "TCP", port)
    rounds = 50 if quick else 500
    t0 = time.perf_counter()
    for _ in range(rounds):
        for dp, p, port in work:
            dp.lookup(p, "TCP", port)
    warm = rounds * len(work) / (time.perf_counter() - t0)
    line("engine L3/L4 lookups", warm, "lookups/s", 1_000_000, True)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line("engine RSS", rss_mb, "MB", 150, False)


if __name__ == "__main__":
    main()
