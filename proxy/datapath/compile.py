"""Compile a `DatapathState` into one nftables table, `inet l7gate` (pure: state in, `nft -f` text out).

The script is `add table` + `delete table` + the whole table: the kernel applies one script as one
transaction, so the old table is in force until the new one is, never a mix and never a gap. Only
our own table is touched (Docker's or anyone else's rules stay).

Layout - Cilium's ipcache + PolicyMap, as nftables maps:

  ipcache4/6  prefix interval -> identity     (`proxy.datapath.ipcache` makes them disjoint)
  fqdn4/6     DNS-learned IP  -> identity, each element with a timeout from the DNS TTL
  fqdnz4/6    the same, ZOMBIE_GRACE seconds longer: what established connections look up
  <dir>_ports identity . l4proto . port range -> verdict   (TCP, UDP, SCTP)
  <dir>_icmp4 identity . ICMP type range      -> verdict   (ICMPv6: <dir>_icmp6)

The peer identity of a NEW packet (source on ingress, destination on egress) is world (2), then
the ipcache hit, then the fqdn hit, each lookup overwriting `meta mark`: the packet mark is the
register that carries the identity from the lookups into the verdict maps, inside our chains only.
Concatenating the address itself into the verdict maps would avoid the mark but multiply every
prefix by every port entry of its identity, and an FQDN element would have to be repeated per
port; with the mark, an FQDN update is one element whatever the policy. Every verdict chain
sets the mark again before accepting (0, or one of our tags), so an identity never leaves our
chains to collide with the proxy mark or the routing marks later in the path; a drop is logged
while the mark still holds the identity, so the NFLOG message carries the peer identity for free.

Order of things per packet:
  * loopback is never policed (the proxies talk over lo, and so does a workload to itself),
    except traffic to Docker's embedded DNS server (127.0.0.11, DOCKER_DNS): that is DNS egress
    like any other; a null DNAT keeps Docker's own NAT off the queries the DNS proxy gets, so it
    sees port 53;
  * packets of the proxies' own sockets (SO_MARK `state.proxy_mark`: each agent's own secret,
    `new_proxy_mark`, since CAP_NET_RAW suffices to set a mark) are accepted before anything
    looks at or rewrites the mark, and are never redirected; they are tracked in a conntrack
    zone of their own (PROXY_ZONE), so no workload packet can ride on a proxy connection's entry;
  * a packet leaving with a source address that is not the workload's own is dropped (forged
    with a raw socket); nothing comes in on the conntrack entry of a denied egress packet, nor
    from the wire as an answer to DNS that went to the DNS proxy;
  * replies (`ct direction reply`) and related ICMP are accepted: they never meet the policy
    (spec §6.6); every packet in the original direction does, the first one of a connection and
    every later one alike, so removing an allow cuts established connections at their next
    packet, as Cilium's per-packet policy lookup does. The verdict is cached in conntrack: a
    connection allowed in the kernel gets this table's stamp as its ct mark (`table_stamp`, a
    hash of the table's text) and its later packets are accepted on that stamp alone, which
    costs what the lookups cost (~10% of a small-request L3/L4 throughput, measured); a new
    table has another stamp, so each connection meets the new policy at its next packet. A
    re-checked connection's peer is looked up in the `fqdnz` maps, whose elements live
    ZOMBIE_GRACE seconds past the DNS TTL (Cilium keeps such "zombie" addresses while conntrack
    shows the connection; here an expired address keeps its connections until the next table
    that no longer knows it). An established connection the HTTP proxy never saw is cut when its
    port becomes L7-redirected (it cannot move into the proxy mid-stream); redirected
    connections keep their redirect ct mark and are looked up at every packet. The closed
    tables only police new connections;
  * IPv6 neighbour discovery (hop limit 255) and multicast listener discovery (hop limit 1) are
    always accepted (a default-deny IPv6 endpoint must still resolve its neighbours; Cilium
    answers ND itself); router advertisements, redirects and anything else from or to a
    link-local address are dropped (LINK6);
  * then the lookups and the verdict maps; a miss gets the direction's default (mode off: accept
    everything; default-deny: drop unless an entry allows; default-allow: accept unless denied).
Ingress is policed at prerouting (priority mangle, before nat so the original port is seen),
egress at output (priority mangle - 10, before the route chain and before nat).

Verdicts are small chains (`<dir>_allow`, `<dir>_deny`, ...) reached by `goto` from the maps:
  allow   -> ct mark = the table's stamp, mark 0, accept (L3/L4-only allows stay in the kernel,
             no Python on that path)
  allowed -> only with `compile_table(log_allowed=True)`: rate-limited
             `log group 1 prefix "l7gate:<dir>:ALLOWED"` (mark = peer identity), then allow;
             plain allows and the default-allow fallback go here, so flows can show allowed
             NEW connections (the packet itself stays in the kernel)
  deny    -> rate-limited `log group 1 prefix "l7gate:<dir>:POLICY_DENY"` (explicit deny),
             `...:AUTH_REQUIRED` (chain `<dir>_auth`: an allow that requires mutual
             authentication, which l7gate never gives) or `...:POLICY_DENIED` (default deny),
             logged while the mark is the peer identity;
             then a silent drop: the client hangs. Ingress drops right there (receive path,
             nobody is told). On egress a `drop` in the output hook would return EPERM to the
             sender (UDP sendto and ping fail at once instead of hanging), so the packet is
             tagged EGRESS_DROP_TAG; the route chain turns that into EGRESS_DROP_MARK, which
             policy routing sends to lo, and prerouting drops it on the way in. Without the
             policy routing, the postrouting chain drops it (EPERM then, but never out).
             Its conntrack entry outlives it: the entry gets ct mark EGRESS_DENIED_CT, and
             prerouting drops every packet on such an entry (a "reply" from the denied peer).
  http    -> a redirect entry with l7.kind "http" on TCP: `ct mark HTTP_REDIRECT_MARK`, accept;
             the nat chain (prerouting for ingress, output for egress) REDIRECTs connections with
             that ct mark to the HTTP proxy port; the proxy reads SO_ORIGINAL_DST (`origdst`).
  dns     -> a redirect entry with l7.kind "dns" on UDP or TCP, egress: `ct mark DNS_TPROXY_MARK`,
             accept; the route chain copies that ct mark into the packet mark for every
             original-direction packet of the connection (not only the first: a second query on the
             same UDP socket is established by then and must still reach the proxy), which
             triggers a reroute through policy routing (`proxy.datapath.routing`: fwmark ->
             table with `local 0.0.0.0/0 dev lo`); the packet comes back in on lo, where
             prerouting TPROXYs it to 127.0.0.1:dns_port (a socket with IP_TRANSPARENT; it reads
             the original server with IP_RECVORIGDSTADDR / getsockname). No proxy socket -> drop;
             no policy routing -> dropped in postrouting, never sent to the server unproxied.
             IPv6 DNS is TPROXYed to [::1]:dns_port: dropped unless the proxy listens there.
  other L7 kinds (kafka, l7proto, TLS serverNames) have no proxy here: their redirect entries
  drop (`<dir>_denied`, fail closed) unless an allow without L7 covers the peer (then every
  request would be allowed: accept); HTTP on UDP/SCTP is a plain allow.
`<dir>_allow` also replaces our redirect ct marks on new connections (with the stamp), so a
connection a newer policy merely allows is not redirected on the strength of an older one.
The input chain drops connections that reach a proxy port without having been redirected, so
peers cannot talk to the proxies directly.

IP protocols other than TCP/UDP/SCTP/ICMP/ICMPv6 (GRE, UDP-Lite, ...) are looked up by identity
alone in `<dir>_other`: only rules without ports decide them (an L3 allow or deny), as Cilium's
wildcard-protocol entries do.

Known gaps: an application's own SO_MARK on the first packet of a
policed connection is replaced by 0 after routing; the ct mark of redirected connections is ours;
a denied egress packet leaves a conntrack entry behind (it is confirmed on its way to lo: marked
EGRESS_DENIED_CT, nothing comes back on it); the drop reason is whatever the entry says -
mapstate does not emit deny entries that equal a default-deny direction's default, so those
explicit denies are logged as POLICY_DENIED.
"""
from __future__ import annotations

import hashlib
import ipaddress
import socket
from typing import Iterable

from proxy.datapath import ipcache as ipc
from proxy.datapath.constants import (
    DNS_PROXY_PORT, DNS_TPROXY_MARK, DOCKER_DNS, EGRESS_DENIED_CT, EGRESS_DROP_MARK, EGRESS_DROP_TAG,
    HTTP_PROXY_PORT, HTTP_REDIRECT_MARK, NFLOG_GROUP, PROXY_ZONE, TABLE, WORLD_ID, new_proxy_mark,
)
from proxy.datapath.state import DatapathState
from proxy.policy.mapstate import ALLOW, DENY, REDIRECT, MapEntry
from proxy.policy.repository import (AUTH_REQUIRED, DEFAULT_ALLOW, DEFAULT_DENY, OFF, POLICY_DENY,
                                     UNCHECKED_L7)

DIRECTIONS = ("ingress", "egress")
PEER = {"ingress": "saddr", "egress": "daddr"}  # which address names the peer
PORT_PROTOS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
ICMP_MAPS = {"ICMP": "icmp4", "ICMPv6": "icmp6"}
LOG_LIMIT = "limit rate 100/second burst 200 packets"
# IPv6 on the link, before the policy: neighbour discovery (hop limit 255: never from beyond the
# link, RFC 4861) and multicast listener messages (hop limit 1, link-local source). Router
# advertisements and redirects are not in it: a workload takes no routes from its peers. Any
# other packet from or to a link-local address is dropped: peers reach each other by their
# addresses, which carry identities; fe80::/10 would be `world`, a way around the policy.
LINK6 = [
    "ip6 hoplimit 255 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } "
    "accept",
    "ip6 hoplimit 1 ip6 saddr { fe80::/10, :: } icmpv6 type { mld-listener-query, mld-listener-report, "
    "mld-listener-done, mld2-listener-report } accept",
    "ip6 saddr fe80::/10 drop",
    "ip6 daddr fe80::/10 drop",
]
EGRESS_PRIORITY = -160  # before the route chain (mangle, -150) and nat (-100) on output
MODES = (OFF, DEFAULT_DENY, DEFAULT_ALLOW)
ALLOWED = "ALLOWED"  # NFLOG prefix reason of an allowed NEW connection (compile_table(log_allowed))
FQDN_MAPS = ("fqdn", "fqdnz")  # DNS-learned address -> identity: for new connections, for established
STAMP = "@STAMP@"  # stands for the table's stamp (`table_stamp`) until the text is complete
ZOMBIE_GRACE = 120  # seconds an established connection may outlive the TTL of its peer's DNS answer
DROP_CHAINS = {POLICY_DENY: "deny", AUTH_REQUIRED: "auth"}  # drop reason -> its chain (logged
# with that reason); any other drop goes to `<dir>_denied` (POLICY_DENIED)


# -- verdicts -----------------------------------------------------------------------------------
def redirect_target(direction: str, entry: MapEntry) -> str | None:
    """Which proxy a redirect entry goes to: 'http', 'dns', or None (allowed, not proxied)."""
    kind = entry.l7.kind if entry.l7 is not None else None
    if kind == "http" and entry.proto == "TCP":
        return "http"
    if kind == "dns" and direction == "egress" and entry.proto in ("UDP", "TCP"):
        return "dns"
    return None


def verdict_chain(direction: str, entry: MapEntry) -> str:
    """The chain a map entry jumps to."""
    if entry.verdict == ALLOW:
        return f"{direction}_allow"
    if entry.verdict == DENY:
        return f"{direction}_{DROP_CHAINS.get(entry.drop_reason, 'denied')}"
    if entry.verdict == REDIRECT:
        target = redirect_target(direction, entry)
        if target:
            return f"{direction}_{target}"
        # L7 rules without an l7gate proxy: closed, unless an allow without L7 covers the peer
        unchecked = entry.l7.kind in UNCHECKED_L7 and not entry.l7.allow_all
        return f"{direction}_denied" if unchecked else f"{direction}_allow"
    raise ValueError(f"unknown verdict {entry.verdict!r}")


def default_chain(direction: str, mode: str) -> str:
    """What a packet matching no entry gets (mapstate.default_verdict, by mode)."""
    if mode not in MODES:
        raise ValueError(f"unknown {direction} mode {mode!r}")
    return f"{direction}_denied" if mode == DEFAULT_DENY else f"{direction}_allow"


# -- elements -----------------------------------------------------------------------------------
def _range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _identity(n: int) -> str:
    """An identity as a mark value. Hex on purpose: nft parses `0x...` marks ~3x faster than
    decimal ones (212k vs 77k FQDN elements/s measured here)."""
    if not 0 <= int(n) < 1 << 32:
        raise ValueError(f"identity {n} does not fit a 32-bit mark")
    return f"{int(n):#x}"


def policy_elements(direction: str, entries: Iterable[MapEntry],
                    closed: bool = False, log_allowed: bool = False) -> dict[str, list[str]]:
    """Map name suffix ('ports', 'icmp4', 'icmp6') -> element lines `key : goto chain`.

    closed: redirects become drops (a proxy that is not there must not mean open traffic);
    log_allowed: plain allows go through `<dir>_allowed`, which logs the NEW packet first."""
    out: dict[str, list[str]] = {"ports": [], "icmp4": [], "icmp6": [], "other": []}
    last: dict[tuple[int, str], MapEntry] = {}  # sorted by lo: only the previous one can overlap
    for e in sorted(entries, key=lambda e: (e.identity, e.proto, e.lo)):
        ident = _identity(e.identity)
        if not 0 <= e.lo <= e.hi <= 65535:
            raise ValueError(f"bad port range {e.lo}-{e.hi} in {e}")
        prev = last.get((e.identity, e.proto))
        if prev is not None and e.lo <= prev.hi:
            raise ValueError(f"overlapping {direction} entries for identity {e.identity} {e.proto}: "
                             f"{prev.lo}-{prev.hi} and {e.lo}-{e.hi}")
        last[(e.identity, e.proto)] = e
        chain = verdict_chain(direction, e)
        if closed and e.verdict == REDIRECT and chain != f"{direction}_allow":
            chain = f"{direction}_denied"
        if log_allowed and chain == f"{direction}_allow":
            chain = f"{direction}_allowed"
        if e.proto in PORT_PROTOS:
            out["ports"].append(f"{ident} . {PORT_PROTOS[e.proto]} . {_range(e.lo, e.hi)} : goto {chain}")
        elif e.proto in ICMP_MAPS:
            if e.hi > 255:
                raise ValueError(f"ICMP type range {e.lo}-{e.hi} beyond 255")
            out[ICMP_MAPS[e.proto]].append(f"{ident} . {_range(e.lo, e.hi)} : goto {chain}")
        elif e.proto == "OTHER":
            out["other"].append(f"{ident} : goto {chain}")
        else:
            raise ValueError(f"unknown protocol {e.proto!r}")
    return out


def _address(ip: str) -> tuple[int, str]:
    """(version, canonical text) of an IP address; ValueError for anything else (nft would
    otherwise try to resolve a name). inet_pton first: ~10x faster than ipaddress for batches."""
    try:
        socket.inet_pton(socket.AF_INET, ip)
        return 4, ip
    except (OSError, TypeError):
        pass
    try:
        return 6, socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip))
    except (OSError, TypeError):
        raise ValueError(f"{ip!r} is not an IP address") from None


def fqdn_element(ip: str, identity: int, timeout: int, grace: int = 0) -> tuple[int, str]:
    """(IP version, element text) of one FQDN-learned IP; timeout 0 = no expiry, else `timeout`
    + `grace` seconds (the fqdnz maps' elements carry ZOMBIE_GRACE)."""
    version, addr = _address(ip)
    t = f" timeout {int(timeout) + grace}s" if timeout and timeout > 0 else ""
    return version, f"{addr}{t} : {_identity(identity)}"


def fqdn_add_command(elements: Iterable[tuple[str, int, int]], table: str = TABLE) -> str:
    """`add element` commands for [(ip, identity, timeout s)]: each address into both FQDN maps
    of its family (fqdn with the TTL, fqdnz with the TTL + ZOMBIE_GRACE)."""
    by_map: dict[str, list[str]] = {}
    for ip, ident, timeout in elements:
        for name, grace in (("fqdn", 0), ("fqdnz", ZOMBIE_GRACE)):
            v, text = fqdn_element(ip, ident, timeout, grace)
            by_map.setdefault(f"{name}{v}", []).append(text)
    return "".join(f"add element inet {table} {m} {{ {', '.join(items)} }}\n"
                   for m, items in sorted(by_map.items()))


def fqdn_delete_command(ips: Iterable[str], table: str = TABLE, maps: Iterable[str] = FQDN_MAPS) -> str:
    """`delete element` commands for the addresses, from each of `maps` (names without the
    family: "fqdn", "fqdnz"); every address must be present in each."""
    by_map: dict[str, list[str]] = {}
    for ip in ips:
        version, addr = _address(ip)
        for name in maps:
            by_map.setdefault(f"{name}{version}", []).append(addr)
    return "".join(f"delete element inet {table} {m} {{ {', '.join(items)} }}\n"
                   for m, items in sorted(by_map.items()))


# -- rendering ----------------------------------------------------------------------------------
def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _map(name: str, type_: str, flags: str, elements: list[str], comment: str = "") -> list[str]:
    lines = [f"\tmap {name} {{", f"\t\ttype {type_}", *([f"\t\tflags {flags}"] if flags else [])]
    if comment:
        lines.append(f"\t\tcomment {_quote(comment)}")
    if elements:
        lines.append("\t\telements = {")
        lines.extend(f"\t\t\t{e}," for e in elements)
        lines.append("\t\t}")
    lines.append("\t}")
    return lines


def _set(name: str, type_: str, elements: list[str], comment: str) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {type_}", "\t\tflags interval",
             f"\t\tcomment {_quote(comment)}"]
    if elements:
        lines.append(f"\t\telements = {{ {', '.join(elements)} }}")
    lines.append("\t}")
    return lines


def _chain(name: str, rules: list[str], hook: str = "", comment: str = "") -> list[str]:
    lines = [f"\tchain {name} {{"]
    if comment:
        lines.append(f"\t\tcomment {_quote(comment)}")
    if hook:
        lines.append(f"\t\t{hook}; policy accept;")
    lines.extend(f"\t\t{r}" for r in rules)
    lines.append("\t}")
    return lines


def _identity_maps(state: DatapathState | None) -> list[str]:
    cache = state.ipcache if state else {}
    fqdn = state.fqdn if state else {}
    out: list[str] = []
    for v in (4, 6):
        items = [f"{iv.nft()} : {_identity(iv.identity)}" for iv in ipc.flatten(cache, v)]
        out += _map(f"ipcache{v}", f"ipv{v}_addr : mark", "interval", items,
                    "peer address -> identity, longest prefix wins")
    comments = {"fqdn": "DNS-learned address -> identity, expires with the DNS TTL (new connections)",
                "fqdnz": "the same, kept ZOMBIE_GRACE s longer (established connections)"}
    for name, grace in (("fqdn", 0), ("fqdnz", ZOMBIE_GRACE)):
        for v in (4, 6):
            items = []
            for ip, (ident, timeout) in sorted(fqdn.items()):
                ver, text = fqdn_element(ip, ident, timeout, grace)
                if ver == v:
                    items.append(text)
            out += _map(f"{name}{v}", f"ipv{v}_addr : mark", "timeout", items, comments[name])
    local = [ipaddress.ip_address(ip) for ip in (state.local_ips if state else [])]
    for v in (4, 6):
        out += _set(f"local{v}", f"ipv{v}_addr", sorted(str(a) for a in local if a.version == v),
                    "this workload's addresses: the only sources its packets may leave with")
    return out


def _direction(direction: str, mode: str, entries: list[MapEntry], closed: bool,
               log_allowed: bool = False) -> list[str]:
    """Maps, verdict chains, peer lookup and policy chain of one direction."""
    d = direction
    elements = policy_elements(d, entries, closed, log_allowed)
    out: list[str] = []
    out += _map(f"{d}_ports", "mark . inet_proto . inet_service : verdict", "interval",
                elements["ports"], "identity . protocol . port range -> verdict")
    out += _map(f"{d}_icmp4", "mark . icmp_type : verdict", "interval", elements["icmp4"],
                "identity . ICMP type range -> verdict")
    out += _map(f"{d}_icmp6", "mark . icmpv6_type : verdict", "interval", elements["icmp6"],
                "identity . ICMPv6 type range -> verdict")
    out += _map(f"{d}_other", "mark : verdict", "", elements["other"],
                "identity -> verdict for IP protocols other than TCP/UDP/SCTP/ICMP/ICMPv6")
    ours = f"{{ {HTTP_REDIRECT_MARK:#x}, {DNS_TPROXY_MARK:#x} }}"
    out += _chain(f"{d}_allow", [
        f"ct state established ct mark != {ours} ct mark set {STAMP} meta mark set 0 accept",
        "ct state established meta mark set 0 accept",
        f"ct mark set {STAMP} meta mark set 0 accept",
    ], comment="allowed in the kernel, stamped with this table's ct mark; an older policy's "
               "redirect mark is undone")
    # Ingress drops happen on the receive path: nobody is told. A drop in the output hook would
    # hand EPERM to the sending socket (UDP sendto, ping fail at once), so a denied egress packet
    # is tagged instead, rerouted to lo by the route chain and dropped in prerouting: the client
    # hangs, as behind Cilium's drop in the datapath.
    drop = "drop" if d == "ingress" else \
        f"ct mark set {EGRESS_DENIED_CT:#x} meta mark set {EGRESS_DROP_TAG:#x} accept"
    for reason, name in (("POLICY_DENIED", "denied"), *DROP_CHAINS.items()):
        log = f"{LOG_LIMIT} log group {NFLOG_GROUP} prefix {_quote(f'l7gate:{d}:{reason}')}"
        out += _chain(f"{d}_{name}", [log, drop])
    if log_allowed:
        out += _chain(f"{d}_allowed", [
            f"ct state established goto {d}_allow",
            f"{LOG_LIMIT} log group {NFLOG_GROUP} prefix {_quote(f'l7gate:{d}:{ALLOWED}')}",
            f"goto {d}_allow"], comment="an allowed NEW connection, logged with the peer identity")
    out += _chain(f"{d}_http", [
        f"ct state established ct mark {HTTP_REDIRECT_MARK:#x} meta mark set 0 accept",
        # an established connection the proxy never saw cannot be moved to it: cut
        f"ct state established goto {d}_denied",
        f"ct mark set {HTTP_REDIRECT_MARK:#x} meta mark set 0 accept",
    ], comment="to the HTTP proxy: nat REDIRECT on this ct mark")
    if d == "egress":
        out += _chain("egress_dns", [f"ct mark set {DNS_TPROXY_MARK:#x} meta mark set 0 accept"],
                      comment="to the DNS proxy: route chain + policy routing + TPROXY on this ct mark")
    addr = PEER[d]
    out += _chain(f"peer_{d}", [
        f"meta mark set {WORLD_ID}",
        f"meta mark set ip {addr} map @ipcache4",
        f"meta mark set ip6 {addr} map @ipcache6",
        f"meta mark set ip {addr} map @fqdn4",
        f"meta mark set ip6 {addr} map @fqdn6",
    ], comment=f"meta mark = identity of the peer (ip {addr}): fqdn, else ipcache, else world")
    out += _chain(f"peer_{d}_established", [
        f"meta mark set {WORLD_ID}",
        f"meta mark set ip {addr} map @ipcache4",
        f"meta mark set ip6 {addr} map @ipcache6",
        f"meta mark set ip {addr} map @fqdnz4",
        f"meta mark set ip6 {addr} map @fqdnz6",
    ], comment="the same for an established connection: DNS-learned addresses stay a while longer")
    if mode == OFF and not closed:
        rules = [f"goto {d}_allow"]
        note = "mode off: not enforced"
    else:
        fallback = default_chain(d, mode)
        if log_allowed and fallback == f"{d}_allow":
            fallback = f"{d}_allowed"
        rules = [
            f"ct state established jump peer_{d}_established",
            f"ct state != established jump peer_{d}",
            f"meta l4proto icmp meta mark . icmp type vmap @{d}_icmp4",
            f"meta l4proto ipv6-icmp meta mark . icmpv6 type vmap @{d}_icmp6",
            f"meta l4proto {{ tcp, udp, sctp }} meta mark . meta l4proto . th dport vmap @{d}_ports",
            f"meta l4proto != {{ tcp, udp, sctp, icmp, ipv6-icmp }} meta mark vmap @{d}_other",
            f"goto {fallback}",
        ]
        note = f"mode {mode}"
        if closed and mode == DEFAULT_DENY:
            rules = [f"jump peer_{d}", f"goto {d}_denied"]
            note = "closed: default-deny direction, every new connection dropped"
        elif closed:
            note = f"closed, mode {mode}: redirected ports dropped"
    out += _chain(f"{d}_policy", rules, comment=note)
    return out


def _hooks(http_port: int, dns_port: int, proxy_mark: int, recheck: bool = True,
           own_addresses: bool = False) -> list[str]:
    """The base chains. recheck: original-direction packets of established connections meet the
    policy again, so removing an allow cuts them (spec 6.6); the closed tables only police new
    connections (recheck False): an agent starting or stopping leaves established ones alone.
    own_addresses: the sets local4/local6 hold every address of the workload, so a packet
    leaving with any other source is forged (a raw socket, CAP_NET_RAW) and dropped, as
    Cilium drops a pod's packet from an address not its own."""
    out: list[str] = []
    spoofed = ["oif != lo ip saddr != @local4 drop",  # (on lo only DNS to Docker's 127.0.0.11)
               "oif != lo ip6 saddr != @local6 ip6 saddr != fe80::/10 ip6 saddr != :: drop",
               ] if own_addresses else []
    if recheck:
        # replies skip policy; so do connections this very table accepted (its stamp)
        stamped, known = [f"ct mark {STAMP} accept"], ["ct state related accept", "ct direction reply accept"]
    else:
        stamped, known = [], ["ct state established,related accept"]
    # The proxies' own upstream connections live in a conntrack zone of their own. Otherwise a
    # workload socket that happens to reuse the 5-tuple of a finished proxy query (UDP entries
    # live 120 s) would be "established" and skip the DNS redirect: a bypass.
    out += _chain("raw_output", [
        f"oif != lo meta mark {proxy_mark:#x} ct zone set {PROXY_ZONE}",
    ], hook="type filter hook output priority -300",
        comment="the proxies' upstream traffic: its own conntrack zone")
    out += _chain("raw_prerouting", [
        f"iif != lo socket mark {proxy_mark:#x} ct zone set {PROXY_ZONE}",
    ], hook="type filter hook prerouting priority -300",
        comment="replies to the proxies' upstream sockets: the same zone")
    out += _chain("prerouting", [
        f"iif lo meta mark {EGRESS_DROP_MARK:#x} drop",
        f"iif lo meta mark {DNS_TPROXY_MARK:#x} goto dns_tproxy",
        "iif lo accept",
        *stamped,
        # a denied egress packet leaves a conntrack entry: no reply (nor related ICMP) on it
        f"ct mark {EGRESS_DENIED_CT:#x} drop",
        # the answers to TPROXYed DNS come from the proxy over lo; from the wire: forged
        f"ct direction reply ct mark {DNS_TPROXY_MARK:#x} drop",
        *known,
        *LINK6,
        "goto ingress_policy",
    ], hook="type filter hook prerouting priority -150", comment="ingress: policy")
    out += _chain("dns_tproxy", [
        f"meta l4proto udp tproxy ip to 127.0.0.1:{dns_port} accept",
        f"meta l4proto tcp tproxy ip to 127.0.0.1:{dns_port} accept",
        f"meta l4proto udp tproxy ip6 to [::1]:{dns_port} accept",
        f"meta l4proto tcp tproxy ip6 to [::1]:{dns_port} accept",
        "drop",
    ], comment="DNS looped back by policy routing; no transparent proxy socket: dropped")
    out += _chain("input", [
        "iif lo accept",
        "ct state established,related accept",
        f"meta l4proto {{ tcp, udp }} th dport {{ {http_port}, {dns_port} }} ct status & dnat != dnat drop",
    ], hook="type filter hook input priority 0", comment="proxy ports only through redirects")
    out += _chain("output", [
        f"meta mark {proxy_mark:#x} accept",
        # Docker's embedded DNS server answers at 127.0.0.11 on the container's own loopback (its
        # NAT rules pass the queries to dockerd): traffic to it is DNS egress, policed and proxied
        # like any DNS server's; the rest of loopback is not policed.
        f"oif lo ip daddr != {DOCKER_DNS} accept",
        "oif lo meta nfproto ipv6 accept",
        # DNS over UDP is re-checked even on an established flow (so are all original-direction
        # packets with recheck): a socket that started before a DNS policy (or a flow the policy
        # no longer lets through directly) must not keep talking to the server around the proxy.
        *([] if recheck else [
            f"ct direction original meta l4proto udp udp dport 53 ct mark != {DNS_TPROXY_MARK:#x} "
            "goto egress_policy"]),
        *stamped,
        *spoofed,
        *known,
        *LINK6,
        "goto egress_policy",
    ], hook=f"type filter hook output priority {EGRESS_PRIORITY}", comment="egress: policy")
    out += _chain("output_route", [
        f"meta mark {proxy_mark:#x} return",
        f"meta mark {EGRESS_DROP_TAG:#x} meta mark set {EGRESS_DROP_MARK:#x} return",
        f"ct direction original ct mark {DNS_TPROXY_MARK:#x} meta mark set {DNS_TPROXY_MARK:#x}",
    ], hook="type route hook output priority -150",
        comment="a mark changed here reroutes: denied packets and DNS go to lo (policy routing)")
    out += _chain("postrouting", [
        "oif lo accept",
        f"meta mark {{ {EGRESS_DROP_TAG:#x}, {EGRESS_DROP_MARK:#x}, {DNS_TPROXY_MARK:#x} }} drop",
    ], hook="type filter hook postrouting priority 0",
        comment="without the policy routing, denied packets and DNS never leave: dropped here")
    out += _chain("nat_prerouting", [
        f"ct mark {HTTP_REDIRECT_MARK:#x} meta l4proto tcp redirect to :{http_port}",
    ], hook="type nat hook prerouting priority -100")
    out += _chain("nat_output", [
        f"meta mark {proxy_mark:#x} return",
        f"ct mark {HTTP_REDIRECT_MARK:#x} meta l4proto tcp redirect to :{http_port}",
        # A null DNAT on the queries to Docker's DNS server that go to our DNS proxy: the first NAT
        # binding wins and this chain runs before Docker's (priority -100), so Docker's DNAT to its
        # server's real port stays off them and the proxy sees port 53, as the workload sent it.
        f"ct mark {DNS_TPROXY_MARK:#x} ip daddr {DOCKER_DNS} meta l4proto {{ udp, tcp }} th dport 53 "
        f"dnat ip to {DOCKER_DNS}:53",
    ], hook="type nat hook output priority -110")
    return out


def _port(p: int) -> int:
    if not 0 < int(p) < 65536:
        raise ValueError(f"bad proxy port {p}")
    return int(p)


def _script(body: list[str], table: str) -> str:
    text = "\n".join([f"add table inet {table}", f"delete table inet {table}",
                      f"table inet {table} {{", *body, "}", ""])
    return text.replace(STAMP, f"{table_stamp(text):#x}")


def table_stamp(text: str) -> int:
    """The ct mark a table stamps on the connections it accepts in the kernel: a hash of the
    table's own text, with the top bit set (never one of our small marks, never 0). Another
    table -> another stamp (2^-31 odds of a clash), so a connection meets the new policy at its
    next packet; the same table applied again keeps the connections it had accepted."""
    digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
    return 0x80000000 | (int.from_bytes(digest, "big") & 0x7FFFFFFF)


def compile_table(state: DatapathState, table: str = TABLE, log_allowed: bool = False) -> str:
    """The `nft -f` script that atomically replaces our table with the one `state` describes.

    log_allowed: also log every NEW connection a plain allow accepts (entry or default-allow
    mode; not redirects, not mode off) to NFLOG_GROUP with prefix `l7gate:<dir>:ALLOWED`, the
    mark holding the peer identity, rate-limited like the drops. The packets still never leave
    the kernel; only a copy of their headers is logged (what `l7gate observe` shows as
    policy-verdict ALLOWED)."""
    body = _identity_maps(state)
    for d in DIRECTIONS:
        body += _direction(d, state.mode(d), state.entries(d), closed=False, log_allowed=log_allowed)
    body += _hooks(_port(state.http_port), _port(state.dns_port), state.proxy_mark,
                   own_addresses=bool(state.local_ips))
    return _script(body, table)


def closed_table(state: DatapathState | None = None, table: str = TABLE,
                 proxy_mark: int | None = None) -> str:
    """The fail-closed table: what the agent installs first, and on a clean stop.

    Without a state (agent starting, nothing known yet): every new connection in both directions
    is dropped, except loopback and the proxies' own sockets; established ones keep going. With a
    state: default-deny directions drop every new connection, other directions keep their
    verdicts except that redirected ports are dropped.

    Agent killed -> fail closed: a table lives in the kernel, not in the process, so when the
    agent dies (even SIGKILL) the last table it applied stays in force unchanged. Its L3/L4
    verdicts keep working; ports it redirects point at the dead proxies: HTTP connections are
    REDIRECTed to a local port nobody listens on (connection refused), DNS is TPROXYed to a
    socket that does not exist and the tproxy chain drops it (no answer). The input chain drops
    direct connections to the proxy ports. Nothing opens: only a new agent replaces the table.

    proxy_mark: the mark that passes (the agent's own, secret); default the state's, or without
    a state a fresh secret one: the published default mark must never open a closed workload.
    """
    http_port = _port(state.http_port) if state else HTTP_PROXY_PORT
    dns_port = _port(state.dns_port) if state else DNS_PROXY_PORT
    if proxy_mark is None:
        proxy_mark = state.proxy_mark if state else new_proxy_mark()
    if state is None:
        state = DatapathState(ingress_mode=DEFAULT_DENY, egress_mode=DEFAULT_DENY)
    body = _identity_maps(state)
    for d in DIRECTIONS:
        body += _direction(d, state.mode(d), state.entries(d), closed=True)
    body += _hooks(http_port, dns_port, proxy_mark, recheck=False)
    return _script(body, table)
