"""The agent's answer to the proxies: verdicts from the engine for the local endpoint.

One oracle per workload (sidecar). The peer of a request is known only by IP: the engine maps it
to an endpoint identity (registry) or an IP identity (world, CIDR, FQDN-learned names).
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from proxy.fqdn.cache import DNSCache
from proxy.l7.oracle import L7Result
from proxy.policy.engine import Engine, L7Checker, L7Verdict
from proxy.policy.httpmatch import HTTPRequest

# open_ips(qname, ips, ttl) with what was learned: what to await until the datapath holds the
# IPs; None when it already does (a busy name: no wait, no timer)
OpenIPs = Callable[[str, list[str], int], "Awaitable[None] | None"]


def _result(v: L7Verdict | None, what: str) -> L7Result:
    if v is None:
        return L7Result(False, reason=f"no {what} policy for this flow")
    origins = v.matched if v.matched else [o for _, o in v.rules]
    policies = tuple({tuple(d.items()): d for d in (o.ref.as_dict() for o in origins)}.values())
    if v.allowed:
        return L7Result(True, policies, "allowed by an allow without L7 rules" if v.allow_all
                        else f"{what} rule matched", v.header_edits)
    return L7Result(False, policies, f"no {what} rule matched")


class EngineOracle:
    """Decisions are cached per (direction, peer IP, protocol, port), compiled L7 checkers per
    merged policy, HTTP results per (checker, request key) and DNS results per (server,
    protocol, name); the caches are dropped when the engine is replaced (a policy or registry
    change) or when learning changes the FQDN cache's live (name, IP) pairs, and at least every
    REFRESH seconds of learning (an IP's identity depends on its names, which also expire)."""

    MAX_CACHED = 65536  # entries per cache: many peers or paths must not grow memory
    MAX_KEY_CHARS = 1024  # an HTTP result is remembered only for a request key this short: the
    # client chooses the path (up to the 64 KB head), 65536 such keys would hold 4 GB
    REFRESH = 1.0  # seconds: learning forgets the caches at least this often

    def __init__(self, engine: Engine, endpoint_name: str, open_ips: OpenIPs | None = None,
                 max_delay: float = 0.1) -> None:
        self.endpoint_name = endpoint_name
        self.open_ips = open_ips
        self.max_delay = max_delay
        self._fresh_until = 0.0
        self.engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine
        self.forget()

    def forget(self) -> None:
        self._decisions: dict[tuple, object] = {}
        self._checkers: dict[int, tuple[object, L7Checker]] = {}
        self._http: dict[tuple, L7Result] = {}  # (checker, its request key) -> result
        self._dns: dict[tuple, L7Result] = {}  # (server IP, port, name) -> result

    def _checker(self, policy) -> L7Checker:
        found = self._checkers.get(id(policy))
        if found is None or found[0] is not policy:
            found = self._checkers[id(policy)] = (policy, L7Checker(policy))
        return found[1]

    @property
    def cache(self) -> DNSCache:
        return self.engine.cache

    def _decision(self, direction: str, peer_ip: str, proto: str, port: int):
        key = (direction, peer_ip, proto, port)
        d = self._decisions.get(key)
        if d is None:
            if len(self._decisions) > self.MAX_CACHED:
                self._decisions.clear()  # bounded: many peers must not grow memory
            local = self.engine.peer(self.endpoint_name)
            peer = self.engine.ip_peer(peer_ip)
            policy = self.engine.policy_of(local).direction(direction)
            d = self._decisions[key] = policy.lookup(peer.identity, proto, port)
        return d

    def http_verdict(self, direction: str, peer_ip: str, port: int, request: HTTPRequest) -> L7Result:
        d = self._decision(direction, peer_ip, "TCP", port)
        if not d.allowed:
            return L7Result(False, reason="denied at L3/L4")
        if d.l7 is None or d.l7.kind != "http":
            return L7Result(True, reason="no HTTP rules on this port")
        checker = self._checker(d.l7)
        request_key = checker.request_key(request)
        key = (id(checker), request_key)  # the checker lives as long as the cache
        result = self._http.get(key)
        if result is None:
            result = _result(checker.verdict(request), "HTTP")
            if sum(map(len, filter(None, request_key))) <= self.MAX_KEY_CHARS:
                if len(self._http) > self.MAX_CACHED:
                    self._http.clear()
                self._http[key] = result
        return result

    def dns_verdict(self, server_ip: str, server_port: int, proto: str, qname: str) -> L7Result:
        key = (server_ip, server_port, proto, qname)
        result = self._dns.get(key)
        if result is None:
            if len(self._dns) > self.MAX_CACHED:
                self._dns.clear()
            result = self._dns[key] = self._dns_verdict(server_ip, server_port, proto, qname)
        return result

    def _dns_verdict(self, server_ip: str, server_port: int, proto: str, qname: str) -> L7Result:
        """The DNS rules of this very port and protocol (spec 9.2: a name allowed over TCP is
        not thereby allowed over UDP)."""
        d = self._decision("egress", server_ip, proto, server_port)
        if d.allowed and d.l7 is not None and d.l7.kind == "dns":
            return _result(self._checker(d.l7).verdict(qname), "DNS")
        return _result(None, "DNS")

    async def learn(self, qname: str, ips: list[str], ttl: int) -> None:
        cache = self.engine.cache
        generation = cache.generation
        now = self.engine.clock()
        cache.update(qname, ips, ttl, now)
        # A new name for an IP may change its identity; so may a name that expired meanwhile
        # (noticed here within REFRESH seconds: the kernel's elements expire on their own).
        if cache.generation != generation or now >= self._fresh_until:
            self.forget()
            self._fresh_until = now + self.REFRESH
        pending = self.open_ips(qname, ips, ttl) if self.open_ips is not None else None
        if pending is None:
            return
        try:
            async with asyncio.timeout(self.max_delay):
                await pending
        except TimeoutError:
            pass  # like Cilium: release the answer anyway after the max delay
