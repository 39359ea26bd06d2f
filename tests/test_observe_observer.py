"""Observer: proxy events kept unbuilt in the ring and counted by kind give exactly the flows and the
metrics that building every flow at once gives."""
from __future__ import annotations

import asyncio
import copy

from proxy.observe.flow import proxy_flow_count, proxy_flows
from proxy.observe.metrics import Metrics
from proxy.observe.observer import Observer
from test_observe_flow import CASES, resolve
from test_observe_metrics import samples


def events() -> list[dict]:
    """Every HTTP and DNS case of the flow table, as the proxies send them, and variants that
    change one thing each the metrics read (verdict, code, policies, method, qtypes, rcode...)."""
    out = []
    for case in CASES:
        for key, latency in (("http", "latency_ms"), ("dns", "latency_ns")):
            if key not in case:
                continue
            ev = dict(case[key])
            if key == "dns":
                ev["type"] = "dns"
            ev["time"] = 1_700_000_000.25
            out.append(ev)
    variants = []
    for ev in out:
        if ev.get("type") == "dns":
            variants += [dict(ev, qtypes=["AAAA"]), dict(ev, rcode=3, ips=[]),
                         dict(ev, rrtypes=["CNAME", "A"]), dict(ev, protocol="TCP"),
                         dict(ev, verdict="DROPPED"), dict(ev, qname="")]
        else:
            variants += [dict(ev, code=None), dict(ev, code=503, verdict="ERROR", policies=[]),
                         dict(ev, method="DELETE"), dict(ev, direction="egress"),
                         dict(ev, latency_ms=7.5)]
        variants.append(dict(ev, policies=[{"name": "other", "namespace": "ns", "kind": "CiliumNetworkPolicy"}]))
    return out + variants


def counts(m: Metrics) -> dict:
    return {k: v for k, v in samples(m.render().decode()).items() if not k[0].endswith("_created")}


def _without_ids(flows: list[dict]) -> list[dict]:
    return [{k: v for k, v in f.items() if k != "uuid"} for f in flows]


def test_the_flow_count_is_what_the_builders_build():
    evs = events()
    assert len(evs) > 20 and {e.get("type", "http") for e in evs} == {"http", "dns"}
    for ev in evs:
        assert proxy_flow_count(ev) == len(proxy_flows(ev, resolve)), ev


def test_unbuilt_events_count_and_read_as_built_flows():
    evs = events()
    eager, lazy = Metrics(), Metrics()
    obs = Observer("node-1", resolve=resolve, metrics=lazy)
    for _ in range(3):  # the second and third rounds reuse the remembered series
        for ev in evs:
            eager.observe_all(proxy_flows(copy.deepcopy(ev), resolve, "node-1"))
            obs.on_proxy_event(copy.deepcopy(ev))
    assert obs.errors == 0
    assert counts(lazy) == counts(eager)
    want = [f for ev in evs for f in proxy_flows(copy.deepcopy(ev), resolve, "node-1")]
    got = list(obs.ring)[-len(want):]
    assert _without_ids(got) == _without_ids(want)
    assert obs.ring.seq == 3 * len(want)
    assert list(obs.ring)[-1] is got[-1]  # built once, then kept


def test_a_follower_receives_built_flows_at_once():
    async def main() -> None:
        obs = Observer("node-1", resolve=resolve)
        ev = next(e for e in events() if e.get("type") != "dns" and e.get("code") is not None)
        follower = obs.ring.follow()
        obs.on_proxy_event(dict(ev))
        batch = await asyncio.wait_for(follower.next_batch(), 2)
        assert [seq for seq, _ in batch] == [1, 2]
        assert [f["l7"]["type"] for _, f in batch] == ["REQUEST", "RESPONSE"]
        assert _without_ids([f for _, f in batch]) == _without_ids(proxy_flows(dict(ev), resolve, "node-1"))
    asyncio.run(main())


def test_peers_are_resolved_when_the_event_happens():
    table = dict.fromkeys(["10.0.0.1", "10.0.0.2"])
    from proxy.observe.flow import EndpointInfo
    table["10.0.0.1"] = EndpointInfo(1001, ("k8s:app=a",), "default", "a")
    obs = Observer(resolve=table.get)
    obs.on_proxy_event({"method": "GET", "url": "http://b/", "protocol": "HTTP/1.1",
                        "verdict": "FORWARDED", "code": 200, "latency_ms": 1, "time": 1.7e9,
                        "direction": "egress", "src_ip": "10.0.0.1", "src_port": 40000,
                        "dst_ip": "10.0.0.2", "dst_port": 80, "policies": []})
    table["10.0.0.1"] = EndpointInfo(2002, ("k8s:app=changed",), "default", "a")
    assert list(obs.ring)[0]["source"]["identity"] == 1001
