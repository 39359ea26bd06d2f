"""The ipcache as disjoint address intervals, longest prefix first (pure).

nftables interval maps refuse overlapping elements, while the ipcache is a set of prefixes that
may nest (an endpoint's /32 inside a CIDR rule's /24 inside a /8). Prefixes either nest or are
disjoint, so one sweep over them sorted by (start, length) with a stack of enclosing prefixes
paints every address with the identity of the longest prefix holding it - exactly what a
longest-prefix-match lookup (Cilium's LPM ipcache) would answer. Adjacent intervals with the
same identity are merged; addresses in no prefix are left out (the datapath calls them world).

Never does: talk to the kernel, decide identities, or treat IPv4 and IPv6 as one space.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Interval:
    lo: int  # first address, as an integer
    hi: int  # last address, inclusive
    identity: int
    version: int  # 4 or 6

    def _addr(self, n: int) -> str:
        cls = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        return str(cls(n))

    @property
    def first(self) -> str:
        return self._addr(self.lo)

    @property
    def last(self) -> str:
        return self._addr(self.hi)

    def nft(self) -> str:
        """The element key as nft reads it: one address, or `first-last`."""
        return self.first if self.lo == self.hi else f"{self.first}-{self.last}"


def parse_prefixes(ipcache: dict[str, int]) -> dict[IPNet, int]:
    """Normalise keys ("10.0.0.2", "10.0.0.5/24" -> 10.0.0.0/24); a prefix given twice with two
    identities is a bug upstream and raises ValueError rather than picking one silently."""
    out: dict[IPNet, int] = {}
    for text, ident in ipcache.items():
        net = ipaddress.ip_network(text, strict=False)
        if out.get(net, ident) != ident:
            raise ValueError(f"ipcache: {net} maps to both {out[net]} and {ident}")
        out[net] = ident
    return out


def flatten(ipcache: dict[str, int], version: int) -> list[Interval]:
    """Disjoint intervals of one address family, sorted, longest prefix match semantics."""
    nets = sorted(((n, i) for n, i in parse_prefixes(ipcache).items() if n.version == version),
                  key=lambda ni: (int(ni[0].network_address), ni[0].prefixlen))
    return _sweep([(int(n.network_address), int(n.broadcast_address), i) for n, i in nets], version)


def _sweep(items: Iterable[tuple[int, int, int]], version: int) -> list[Interval]:
    out: list[Interval] = []

    def paint(lo: int, hi: int, ident: int) -> None:
        if lo > hi:
            return
        if out and out[-1].hi + 1 == lo and out[-1].identity == ident:
            out[-1] = Interval(out[-1].lo, hi, ident, version)
        else:
            out.append(Interval(lo, hi, ident, version))

    stack: list[tuple[int, int, int]] = []  # enclosing prefixes, innermost last
    cursor = 0  # the first address not painted yet
    for start, end, ident in items:
        while stack and stack[-1][1] < start:  # close prefixes that end before this one
            _, top_end, top_id = stack.pop()
            paint(cursor, top_end, top_id)
            cursor = top_end + 1
        if stack:  # the enclosing prefix owns the gap up to this one
            paint(cursor, start - 1, stack[-1][2])
        cursor = start
        stack.append((start, end, ident))
    while stack:
        _, top_end, top_id = stack.pop()
        paint(cursor, top_end, top_id)
        cursor = top_end + 1
    return out


def lookup(intervals: list[Interval], addr: str, default: int) -> int:
    """The identity the flattened map gives `addr` (binary search; for tests and tools)."""
    n = int(ipaddress.ip_address(addr))
    lo, hi = 0, len(intervals)
    while lo < hi:
        mid = (lo + hi) // 2
        if intervals[mid].hi < n:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(intervals) and intervals[lo].lo <= n:
        return intervals[lo].identity
    return default
