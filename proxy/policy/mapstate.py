"""The PolicyMap: a resolved direction flattened into (identity, protocol, port range) entries.

This is the last engine stage (Cilium `mapstate.go`): the datapath compiles only these entries.
For each peer identity and protocol the port space is cut where any entry's range starts or
ends; each piece gets the decision `DirectionPolicy.lookup` gives for it (the same code `trace`
uses), and neighbouring pieces with the same decision are merged. Emitted: pieces whose verdict
differs from the direction's default, redirects, and explicit denies and AUTH_REQUIRED drops (so
a kernel drop can say why rather than POLICY_DENIED even where the default is deny).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from proxy.policy.identity import Identity
from proxy.policy.repository import (AUTH_REQUIRED, DEFAULT_ALLOW, OFF, POLICY_DENY, Decision,
                                     DirectionPolicy, L7Policy)
from proxy.policy.rule import ALL

ALLOW, DENY, REDIRECT = "allow", "deny", "redirect"
# OTHER: every IP protocol but these five (GRE, UDP-Lite, ...): only rules without ports decide
# it, as Cilium's wildcard-protocol entries do (an L3 allow or deny covers every protocol)
PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "OTHER")
PORT_MAX = {"ICMP": 255, "ICMPv6": 255, "OTHER": 0}


@dataclass(frozen=True)
class MapEntry:
    identity: int
    proto: str
    lo: int
    hi: int
    verdict: str  # allow | deny | redirect
    drop_reason: str | None = None
    l7: L7Policy | None = None


def verdict_of(d: Decision) -> str:
    if not d.allowed:
        return DENY
    return REDIRECT if d.redirect else ALLOW


def default_verdict(dp: DirectionPolicy) -> str:
    """What a packet matching no entry gets: allow when not enforced or default-allow."""
    return ALLOW if dp.mode in (OFF, DEFAULT_ALLOW) else DENY


def flatten(dp: DirectionPolicy, identities: Iterable[Identity]) -> list[MapEntry]:
    if dp.mode == OFF:
        return []
    default = default_verdict(dp)
    out: list[MapEntry] = []
    for ident in identities:
        matched = dp.entries_for(ident)
        for proto in PROTOCOLS:
            top = PORT_MAX.get(proto, 65535)
            cuts = {0, top + 1}
            for _, specs in matched:
                for s in specs:
                    if s.proto == ALL or s.proto == proto:
                        cuts.add(min(s.lo, top + 1))
                        cuts.add(min(s.hi, top) + 1)
            edges = sorted(cuts)
            run = None  # (lo, hi, decision)
            for lo, nxt in zip(edges, edges[1:]):
                d = dp.lookup(ident, proto, lo)
                if run and _same(run[2], d):
                    run = (run[0], nxt - 1, run[2])
                    continue
                if run:
                    _emit(out, ident.id, proto, run, default)
                run = (lo, nxt - 1, d)
            if run:
                _emit(out, ident.id, proto, run, default)
    return out


def _same(a: Decision, b: Decision) -> bool:
    """Same datapath outcome (who decided may differ: that is for flows, not for the map)."""
    return verdict_of(a) == verdict_of(b) and a.drop_reason == b.drop_reason and a.l7 == b.l7


def _emit(out: list[MapEntry], ident: int, proto: str, run, default: str) -> None:
    lo, hi, d = run
    v = verdict_of(d)
    if v != default or v == REDIRECT or d.drop_reason in (POLICY_DENY, AUTH_REQUIRED):
        out.append(MapEntry(ident, proto, lo, hi, v, d.drop_reason, d.l7))
