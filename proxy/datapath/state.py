"""What one workload's nftables table is made of: a plain value, built by the agent, read by the compiler.

`DatapathState` holds only numbers, strings and `MapEntry`s: the flattened PolicyMap per direction
(`proxy.policy.mapstate`), the ipcache (prefix -> identity) and the FQDN-learned IPs. The compiler
(`proxy.datapath.compile`) turns it into one `nft -f` script; nothing here touches the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from proxy.datapath.constants import DNS_PROXY_PORT, HTTP_PROXY_PORT, PROXY_MARK
from proxy.policy.mapstate import MapEntry
from proxy.policy.repository import OFF


@dataclass
class DatapathState:
    ingress_mode: str = OFF  # off | default-deny | default-allow (proxy.policy.repository)
    egress_mode: str = OFF
    ingress: list[MapEntry] = field(default_factory=list)  # from mapstate.flatten, disjoint per (id, proto)
    egress: list[MapEntry] = field(default_factory=list)
    # "10.0.0.2/32", "192.0.2.0/24", "2001:db8::/64" -> identity; longest prefix wins;
    # an address in no prefix is world (WORLD_ID)
    ipcache: dict[str, int] = field(default_factory=dict)
    # IP learned from DNS -> (identity, timeout seconds; 0 = no expiry); beats the ipcache
    fqdn: dict[str, tuple[int, int]] = field(default_factory=dict)
    local_ips: list[str] = field(default_factory=list)  # the workload's own addresses
    http_port: int = HTTP_PROXY_PORT
    dns_port: int = DNS_PROXY_PORT
    proxy_mark: int = PROXY_MARK  # the SO_MARK of the proxies' own sockets (an agent's is secret)

    def mode(self, direction: str) -> str:
        return self.ingress_mode if direction == "ingress" else self.egress_mode

    def entries(self, direction: str) -> list[MapEntry]:
        return self.ingress if direction == "ingress" else self.egress
