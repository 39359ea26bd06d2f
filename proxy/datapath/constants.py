"""Numbers the datapath, the proxies and the agent must agree on."""

import secrets

TABLE = "l7gate"  # our one nftables table (family inet), in the workload's namespace
HTTP_PROXY_PORT = 15001  # REDIRECT target for ports whose policy has HTTP rules
DNS_PROXY_PORT = 15053  # TPROXY target for DNS (UDP and TCP) with DNS rules
PROXY_MARK = 0x4C37  # SO_MARK on the proxies' own upstream sockets: never redirected, never
# re-checked. A default for tests and standalone proxies only: an agent uses new_proxy_mark()
DNS_TPROXY_MARK = 0x4C38  # fwmark set on locally generated DNS so policy routing sends it to TPROXY
DNS_TPROXY_TABLE = 0x4C38  # routing table holding `local 0.0.0.0/0 dev lo` for that mark
WORLD_ID = 2  # identity of an address outside the ipcache
HTTP_REDIRECT_MARK = 0x4C39  # ct mark of connections the policy sends to the HTTP proxy
NFLOG_GROUP = 1  # policy drops are logged here, prefix "l7gate:<direction>:<reason>"
EGRESS_DROP_TAG = 0x4C3A  # packet mark the egress policy puts on a denied packet
EGRESS_DROP_MARK = 0x4C3B  # fwmark the route chain makes of it: routed to lo, dropped there
EGRESS_DENIED_CT = 0x4C3C  # ct mark of a connection whose egress packet was denied: the kernel
# keeps its conntrack entry, and nothing may come back on it
PROXY_ZONE = 0x4C37  # conntrack zone of the proxies' upstream connections (16 bits)
DOCKER_DNS = "127.0.0.11"  # Docker's embedded DNS server, inside every container on a user network


def new_proxy_mark() -> int:
    """A secret SO_MARK for one agent's proxy sockets. Packets carrying the proxies' mark skip the
    policy, and since Linux 5.17 CAP_NET_RAW (which Docker gives every container) is enough to
    set SO_MARK: a fixed, published mark let any such workload skip its egress policy. The
    workload cannot read this one (listing nftables rules or sockets' marks needs CAP_NET_ADMIN)
    and each try at guessing it is a policed, logged packet among 2^31 values."""
    taken = {0, PROXY_MARK, DNS_TPROXY_MARK, HTTP_REDIRECT_MARK, EGRESS_DROP_TAG, EGRESS_DROP_MARK,
             EGRESS_DENIED_CT}
    while True:
        mark = secrets.randbits(31)  # setsockopt takes a C int
        if mark not in taken:
            return mark
