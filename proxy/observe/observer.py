"""One workload's flow pipeline: events in, flows into the ring and the metrics.

    proxies' on_flow(event) ─┐
                             ├─► flow builders ─► FlowRing (bounded) ─► control socket (observe)
    NFLOG packets ───────────┘      (+ resolver)  └─► Metrics ─► /metrics

`Observer` is what the agent holds: `on_proxy_event` is the proxies' `on_flow` callback,
`start_nflog()` binds the datapath's log group and feeds `on_packet`, `handle_control` answers
the control socket's `observe` command, `serve_metrics` starts /metrics. `EngineView` is the
resolver and explainer built on the agent's engine (it follows engine swaps through a getter).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from proxy.observe.flow import (DictEvent, EndpointInfo, Explainer, Explanation, ProxyEvent,
                                Resolver, kernel_flows)
from proxy.observe.metrics import Metrics, MetricsServer
from proxy.observe.nflog import NflogListener, Packet
from proxy.observe.ring import DEFAULT_SIZE, FlowRing
from proxy.policy.ipaddr import is_loopback

log = logging.getLogger("l7gate.observe")
_FOREVER = float("inf")


class Observer:
    def __init__(self, node_name: str = "", resolve: Resolver | None = None,
                 explain: Explainer | None = None, ring_size: int = DEFAULT_SIZE,
                 metrics: Metrics | None = None) -> None:
        """metrics: where flows are counted; None = not counted (nothing serves /metrics)."""
        self.node_name = node_name
        self.resolve = resolve
        self.explain = explain
        self.ring = FlowRing(ring_size)
        self.metrics = metrics
        self.nflog: NflogListener | None = None
        self._metrics_server: MetricsServer | None = None
        self.errors = 0  # events that could not become flows (logged, never raised)

    # -- feeding ----------------------------------------------------------------------------------
    def add(self, flows: list[dict]) -> None:
        metrics = self.metrics
        for f in flows:
            self.ring.append(f)
            if metrics is not None:
                metrics.observe(f)

    def on_proxy_event(self, event: ProxyEvent | dict) -> None:
        """The HTTP and DNS proxies' `on_flow` callback: the flows are built when read."""
        try:
            if isinstance(event, dict):  # (an ABC's isinstance is slower: ask about dict)
                event = DictEvent(event)
            event.resolve_peers(self.resolve, self.node_name)
            self.ring.append_event(event, event.time_ns)
            if self.metrics is not None:
                self.metrics.observe_event(event.kind, event)
        except Exception:
            self.errors += 1
            log.exception("could not turn a proxy event into flows")

    def on_packet(self, pkt: Packet) -> None:
        """A packet the datapath logged (NFLOG)."""
        try:
            direction = pkt.direction
            if not direction:
                return
            explanation = None
            if self.explain is not None:
                peer = pkt.src if direction == "ingress" else pkt.dst
                port = pkt.dport if pkt.proto in ("TCP", "UDP", "SCTP") else (pkt.icmp_type or 0)
                proto = {"ICMPv4": "ICMP"}.get(pkt.proto, pkt.proto)
                if proto not in ("TCP", "UDP", "SCTP", "ICMP", "ICMPv6"):
                    proto, port = "OTHER", 0  # GRE, UDP-Lite...: decided like the datapath does
                try:
                    explanation = self.explain(direction, peer, proto, port)
                except Exception:
                    log.exception("explaining a kernel verdict failed")
            self.add(kernel_flows(pkt, self.resolve, self.node_name, explanation))
        except Exception:
            self.errors += 1
            log.exception("could not turn a logged packet into flows")

    # -- NFLOG ------------------------------------------------------------------------------------
    def start_nflog(self, group: int | None = None, loop: asyncio.AbstractEventLoop | None = None,
                    ) -> NflogListener:
        """Bind the datapath's log group in this namespace and feed `on_packet` from the loop."""
        if group is None:
            from proxy.datapath.constants import NFLOG_GROUP
            group = NFLOG_GROUP
        listener = NflogListener(group)
        listener.attach(self._on_packet_counting(listener), loop)
        self.nflog = listener
        return listener

    def _on_packet_counting(self, listener: NflogListener) -> Callable[[Packet], None]:
        seen = [0]

        def callback(pkt: Packet) -> None:
            if listener.lost > seen[0]:
                if self.metrics is not None:
                    self.metrics.lost.labels("NFLOG").inc(listener.lost - seen[0])
                seen[0] = listener.lost
            self.on_packet(pkt)
        return callback

    # -- serving ----------------------------------------------------------------------------------
    async def handle_control(self, request: dict, reader: asyncio.StreamReader | None,
                             writer: asyncio.StreamWriter) -> None:
        """The control socket's `{"cmd": "observe", ...}` (see `relay.handle_observe`)."""
        from proxy.observe.relay import handle_observe
        await handle_observe(self.ring, request, writer, reader)

    def serve_metrics(self, address: str) -> MetricsServer:
        """Count flows from now on (if not already) and serve /metrics on `address`."""
        if self.metrics is None:
            self.metrics = Metrics()
        self._metrics_server = self.metrics.serve(address)
        return self._metrics_server

    def close(self) -> None:
        if self.nflog is not None:
            self.nflog.close()
            self.nflog = None
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None


class EngineView:
    """Resolver and explainer on top of the agent's (replaceable) engine.

    get_engine: returns the engine in force (the agent swaps engines on every sync);
    endpoint_name: this workload's endpoint, whose policy the kernel enforced."""

    CACHE_SIZE = 4096
    WORLD_TTL = 1.0  # an outside address's identity and names follow the DNS cache: re-read often

    def __init__(self, get_engine: Callable[[], object], endpoint_name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.get_engine = get_engine
        self.endpoint_name = endpoint_name
        self.clock = clock
        self._engine = None
        self._cache: dict[str, tuple[EndpointInfo | None, float]] = {}

    def resolve(self, ip: str) -> EndpointInfo | None:
        """Cached per engine (an engine is replaced, never changed, when policies or endpoints
        change): an endpoint's address for the engine's life, others for WORLD_TTL seconds.
        A lookup costs 20-60 us; flows ask twice per request."""
        engine = self.get_engine()
        if engine is not self._engine or len(self._cache) >= self.CACHE_SIZE:
            self._engine, self._cache = engine, {}
        hit = self._cache.get(ip)
        if hit is not None and (hit[1] == _FOREVER or hit[1] > self.clock()):
            return hit[0]
        now = self.clock()
        info = self._lookup(engine, ip)
        forever = info is not None and info.pod_name != ""
        self._cache[ip] = (info, _FOREVER if forever else now + self.WORLD_TTL)
        return info

    def _lookup(self, engine, ip: str) -> EndpointInfo | None:
        try:
            if is_loopback(ip):
                # loopback is this workload: a query to Docker's DNS server at 127.0.0.11 comes
                # from 127.0.0.1, and the flow's source is the endpoint, not the world
                peer = engine.peer(self.endpoint_name)
            else:
                peer = engine.ip_peer(ip)
        except ValueError:
            return None
        ident = peer.identity
        labels = tuple(ident.labels.strings())
        ep = peer.endpoint
        if ep is not None:
            return EndpointInfo(ident.id, labels, ep.namespace, ep.name)
        try:
            names = tuple(sorted(n.rstrip(".") for n in engine.cache.names_for_ip(ip, engine.clock())))
        except Exception:
            names = ()
        return EndpointInfo(ident.id, labels, names=names)

    def explain(self, direction: str, peer_ip: str, proto: str, port: int) -> Explanation:
        engine = self.get_engine()
        local = engine.peer(self.endpoint_name)
        peer = engine.ip_peer(peer_ip)
        dpol = engine.policy_of(local).direction(direction)
        decision = dpol.lookup(peer.identity, proto, port)
        policies = tuple({(o.ref.kind, o.ref.namespace, o.ref.name): o.ref.as_dict()
                          for o in decision.deciders}.values())
        match = 0
        if decision.allowed and decision.deciders:
            match = _match_type(dpol, peer.identity, proto, port, set(decision.deciders))
        return Explanation(policies, match)


def _match_type(dpol, identity, proto: str, port: int, deciders: set) -> int:
    """Hubble's policy_match_type of an allow: 1 L3-Only, 2 L3-L4, 3 L4-Only, 4 all."""
    best = 0
    rank = {2: 4, 1: 3, 3: 2, 4: 1}  # prefer the most specific entry that allowed
    for entry, specs in dpol.entries_for(identity):
        if entry.deny or entry.origin not in deciders or not any(s.covers(proto, port) for s in specs):
            continue
        any_peer = any(getattr(s, "is_wildcard", False) for s in entry.peers)
        any_port = entry.l3_only
        kind = 4 if any_peer and any_port else 3 if any_peer else 1 if any_port else 2
        if rank[kind] > rank.get(best, 0):
            best = kind
    return best
