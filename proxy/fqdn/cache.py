"""The FQDN cache (spec §9.3): which IPs each queried name resolved to, and until when.

The DNS proxy records `qname -> IPs` with the answer's TTL; toFQDNs selection reads it; a GC
loop calls `expire` and closes what it returns. Time is always passed in (`now`, seconds, any
monotonic origin), so the cache is pure and testable without sleeping.

Never does I/O, never parses DNS messages (the proxy hands in names, IPs and the TTL it computed),
never tracks connections: keeping "zombie" IPs alive while a connection uses them is the
datapath's job, using what `expire` reports.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.fqdn.matchpattern import Matcher, normalize_name

DEFAULT_MIN_TTL = 0  # `--tofqdns-min-ttl` since 1.14
DEFAULT_MAX_IPS_PER_NAME = 1000  # `--tofqdns-endpoint-max-ip-per-hostname` since Dec 2024
_NAME = re.compile(r"^[-a-zA-Z0-9_.]+$")


@functools.lru_cache(maxsize=65536)  # asked for the same few addresses on every answer
def normalize_ip(ip: str) -> str:
    """Canonical text of an IP (IPv6 compressed, IPv4-mapped IPv6 unmapped); ValueError if bad."""
    addr = ipaddress.ip_address(ip.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _address_order(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


@dataclass(frozen=True)
class CacheEntry:
    """One (name, IP) row of `fqdn cache list`; ttl/expires_at are None for a pinned entry."""
    name: str
    ip: str
    ttl_remaining: int | None
    expires_at: float | None


@dataclass
class _Learned:
    expires_at: float  # math.inf for entries that never expire (`--fqdn-cache`)
    seq: int  # insertion order, to break ties when evicting


@dataclass
class DNSCache:
    """name -> {ip -> expiry}, plus the reverse index toFQDNs and flows need."""
    min_ttl: int = DEFAULT_MIN_TTL
    max_ips_per_name: int = DEFAULT_MAX_IPS_PER_NAME
    _forward: dict[str, dict[str, _Learned]] = field(default_factory=dict, repr=False)
    _reverse: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _seq: int = field(default=0, repr=False)
    # Bumped whenever the live (name, ip) pairs may have changed (a new or revived pair, an
    # eviction, expiry): what was derived from the cache (identities, decisions) is stale then.
    # A refreshed TTL on a live pair does not bump it.
    generation: int = field(default=0, repr=False)

    def update(self, name: str, ips: Iterable[str], ttl: float, now: float) -> list[tuple[str, str]]:
        """Record an answer; return the (name, ip) pairs evicted by the per-name limit.

        The TTL is raised to `min_ttl`. An IP already known keeps the later of its two expiries.
        Over the limit, the IPs that expire first go first (ties: learned first).
        """
        expires_at = now + max(ttl, self.min_ttl)
        return self._add(normalize_name(name), [normalize_ip(ip) for ip in ips], expires_at, now)

    def _add(self, name: str, ips: list[str], expires_at: float,
             now: float = -math.inf) -> list[tuple[str, str]]:
        known = self._forward.setdefault(name, {})
        for ip in ips:
            self._seq += 1
            old = known.get(ip)
            if old is None:
                known[ip] = _Learned(expires_at, self._seq)
                self._reverse.setdefault(ip, set()).add(name)
                self.generation += 1
            elif expires_at > old.expires_at:
                if old.expires_at <= now:
                    self.generation += 1  # it had expired: revived
                known[ip] = _Learned(expires_at, self._seq)
        over = len(known) - self.max_ips_per_name
        if over <= 0:
            return []
        self.generation += 1
        oldest = sorted(known, key=lambda ip: (known[ip].expires_at, known[ip].seq))[:over]
        for ip in oldest:
            self._remove(name, ip)
        return [(name, ip) for ip in oldest]

    def _remove(self, name: str, ip: str) -> None:
        del self._forward[name][ip]
        if not self._forward[name]:
            del self._forward[name]
        names = self._reverse[ip]
        names.discard(name)
        if not names:
            del self._reverse[ip]

    def lookup(self, name: str, now: float) -> set[str]:
        """The unexpired IPs of a name."""
        known = self._forward.get(normalize_name(name), {})
        return {ip for ip, e in known.items() if e.expires_at > now}

    def names_for_ip(self, ip: str, now: float) -> set[str]:
        """The names an IP is currently cached under (for flows and toFQDNs identities)."""
        ip = normalize_ip(ip)
        return {n for n in self._reverse.get(ip, ()) if self._forward[n][ip].expires_at > now}

    def select(self, matcher: Matcher, now: float) -> set[str]:
        """IPs of every cached name the toFQDNs selector matches (spec §9.4)."""
        return {ip for name in self._forward if matcher.matches_normalized(name)
                for ip in self.lookup(name, now)}

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop expired entries; return the (name, ip) pairs removed, sorted, for the datapath."""
        gone = sorted((name, ip) for name, known in self._forward.items()
                      for ip, e in known.items() if e.expires_at <= now)
        for name, ip in gone:
            self._remove(name, ip)
        if gone:
            self.generation += 1
        return gone

    def entries(self, now: float) -> list[CacheEntry]:
        """Unexpired rows for `fqdn cache list`, by name then address."""
        rows = []
        for name in sorted(self._forward):
            known = self._forward[name]
            for ip in sorted(known, key=_address_order):
                e = known[ip]
                if e.expires_at == math.inf:
                    rows.append(CacheEntry(name, ip, None, None))
                elif e.expires_at > now:
                    rows.append(CacheEntry(name, ip, math.ceil(e.expires_at - now), e.expires_at))
        return rows

    @classmethod
    def from_pairs(cls, pairs: Iterable[str], **options) -> DNSCache:
        """A cache from `--fqdn-cache NAME=IP[,IP]...` strings; those entries never expire."""
        cache = cls(**options)
        for pair in pairs:
            name, sep, ips = pair.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"--fqdn-cache {pair!r}: expected NAME=IP[,IP]...")
            if not name or not _NAME.match(name):
                raise ValueError(f"--fqdn-cache {pair!r}: invalid name {name!r} "
                                 "(letters, digits, '-', '_' and '.' only)")
            addresses = []
            for ip in ips.split(","):
                try:
                    addresses.append(normalize_ip(ip))
                except ValueError:
                    raise ValueError(f"--fqdn-cache {pair!r}: {ip.strip()!r} is not an IP address") from None
            cache._add(normalize_name(name), addresses, math.inf)
        return cache
