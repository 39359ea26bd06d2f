"""Flows and metrics: every verdict l7gate reaches, in Hubble's shapes.

What it does
  `flow`      pure builders: an HTTP/DNS proxy event or a logged kernel packet -> Hubble
              `flow.Flow` dicts (proto JSON names), with the deciding policies on every verdict
  `nflog`     the NFLOG netlink listener that reads the datapath's logged drops (asyncio reader)
  `ring`      the bounded ring of recent flows, history queries and followers
  `filters`   hubble observe's filters (--pod, --verdict, --protocol, --label, ...)
  `format`    compact / json(pb) / table / dict output, exactly as `hubble observe` prints
  `metrics`   Prometheus text with Hubble's metric names, counted from the same flows
  `relay`     the agent's `observe` control command and the `l7gate observe` client
  `observer`  the glue an agent holds: events in, ring + metrics out; `EngineView` resolves
              addresses and explains kernel verdicts from the agent's engine

What it never does
  Decides a verdict, touches nftables, sees allowed traffic that the datapath does not log
  (allowed L3/L4 packets stay in the kernel; only NFLOG'd packets reach Python), keeps more than
  the ring's size of flows, or lets a failure in flow building reach the proxies or the agent.

Metrics: see `proxy.observe.metrics` (hubble_flows_processed_total, hubble_drop_total,
hubble_policy_verdicts_total, hubble_dns_*, hubble_http_*, l7gate_policy_verdicts_by_policy_total).
"""
from proxy.observe.flow import EndpointInfo, Explainer, Explanation, Resolver

__all__ = ["EndpointInfo", "EngineView", "Explainer", "Explanation", "Observer", "Resolver"]


def __getattr__(name: str):
    # lazy: the CLI imports `relay` for its flags without loading prometheus_client
    if name in ("EngineView", "Observer"):
        from proxy.observe import observer
        return getattr(observer, name)
    raise AttributeError(name)
