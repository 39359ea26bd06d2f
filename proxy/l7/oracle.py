"""What a proxy asks the agent: the verdict for one request or query, and 'open these IPs'.

The agent implements it on top of the engine (`proxy.agent.oracle.EngineOracle`); tests use that
same implementation with real policies, never a stand-in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from proxy.policy.httpmatch import HTTPRequest


@dataclass(frozen=True)
class L7Result:
    allowed: bool
    policies: tuple[dict, ...] = ()  # [{kind, namespace, name}] responsible, for flows
    reason: str = ""  # short human reason, e.g. "no HTTP rule matched"
    header_edits: tuple = field(default=())  # httpmatch.HeaderEdit to apply before forwarding


class PolicyOracle(Protocol):
    def http_verdict(self, direction: str, peer_ip: str, port: int, request: HTTPRequest) -> L7Result:
        """direction: 'egress' (this workload is the client) or 'ingress' (it is the server)."""

    def dns_verdict(self, server_ip: str, server_port: int, proto: str, qname: str) -> L7Result:
        """May this workload ask `server_ip:server_port` over `proto` ("UDP" | "TCP") for `qname`?"""

    async def learn(self, qname: str, ips: list[str], ttl: int) -> None:
        """Record qname -> ips and open them for matching toFQDNs; return once the datapath has
        them (or after the max delay, 100 ms by default, like Cilium)."""
