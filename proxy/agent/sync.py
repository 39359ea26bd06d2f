"""From the engine to the datapath: the one workload's PolicyMap and the ipcache, as data.

The identities that matter for one workload's table: every endpoint in the registry, world,
one identity per CIDR prefix any rule names (excepts included, so an address inside an except
gets the more specific identity), and the identity of every IP the FQDN cache holds. Each is flattened through
the same lookup `trace` uses (`mapstate.flatten`).
"""
from __future__ import annotations

import ipaddress

from proxy.datapath.constants import DNS_PROXY_PORT, HTTP_PROXY_PORT, PROXY_MARK
from proxy.datapath.state import DatapathState
from proxy.policy.engine import Engine, Peer
from proxy.policy.identity import Identity, reserved
from proxy.policy.mapstate import flatten


def host_prefix(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def build_state(engine: Engine, local: Peer, http_port: int = HTTP_PROXY_PORT,
                dns_port: int = DNS_PROXY_PORT, proxy_mark: int = PROXY_MARK) -> DatapathState:
    idents: dict[int, Identity] = {2: reserved("world")}
    ipcache: dict[str, int] = {}
    for ep in engine.endpoints:
        ident = engine.identity_of(ep)
        idents[ident.id] = ident
        for ip in ep.ips:
            ipcache[host_prefix(ip)] = ident.id
    for net in engine.prefixes:
        if str(net) in ipcache:
            continue
        ident = engine.prefix_identity(net)
        idents[ident.id] = ident
        ipcache[str(net)] = ident.id
    now = engine.clock()
    fqdn: dict[str, tuple[int, int]] = {}
    for entry in engine.cache.entries(now):
        if host_prefix(entry.ip) in ipcache:
            continue  # an endpoint's address keeps the endpoint's identity
        ident = engine.ip_identity(entry.ip)
        idents[ident.id] = ident
        ttl = entry.ttl_remaining
        fqdn[entry.ip] = (ident.id, max(1, int(ttl)) if ttl is not None else 0)
    policy = engine.policy_of(local)
    return DatapathState(
        ingress_mode=policy.ingress.mode, egress_mode=policy.egress.mode,
        ingress=flatten(policy.ingress, idents.values()),
        egress=flatten(policy.egress, idents.values()),
        ipcache=ipcache, fqdn=fqdn, local_ips=list(local.endpoint.ips if local.endpoint else []),
        http_port=http_port, dns_port=dns_port, proxy_mark=proxy_mark)
