"""The FQDN cache (spec §9.3) as scripts: each case is a list of calls with the answer expected.

A step is (method, args, expected); expected `ANY` means "not checked" (the call only sets up).
Time is the `now` argument, so nothing sleeps.
"""
from __future__ import annotations

import pytest

from proxy.fqdn.cache import CacheEntry, DNSCache, normalize_ip
from proxy.fqdn.matchpattern import compile_name, compile_pattern

ANY = object()
GH = "api.github.com."

CASES = [
    ("lookup before expiry", {}, [
        ("update", ("api.github.com", ["1.2.3.4"], 30, 100.0), []),
        ("lookup", ("api.github.com", 129.9), {"1.2.3.4"}),
    ]),
    ("expired at now + ttl", {}, [
        ("update", ("api.github.com", ["1.2.3.4"], 30, 100.0), ANY),
        ("lookup", ("api.github.com", 130.0), set()),
    ]),
    ("name normalised on update and lookup", {}, [
        ("update", ("API.GitHub.com", ["1.2.3.4"], 30, 0.0), ANY),
        ("lookup", ("api.github.com.", 1.0), {"1.2.3.4"}),
        ("lookup", ("Api.Github.Com", 1.0), {"1.2.3.4"}),
    ]),
    ("IPs normalised (IPv6 compressed, IPv4-mapped unmapped)", {}, [
        ("update", ("v6.example", ["2001:DB8:0:0:0:0:0:1", "::ffff:10.0.0.1"], 30, 0.0), ANY),
        ("lookup", ("v6.example", 1.0), {"2001:db8::1", "10.0.0.1"}),
        ("names_for_ip", ("2001:db8::0:1", 1.0), {"v6.example."}),
    ]),
    ("min TTL raises a short TTL", {"min_ttl": 3600}, [
        ("update", ("api.github.com", ["1.2.3.4"], 5, 0.0), ANY),
        ("lookup", ("api.github.com", 3599.0), {"1.2.3.4"}),
        ("lookup", ("api.github.com", 3600.0), set()),
    ]),
    ("min TTL 0 by default: ttl 0 is expired at once", {}, [
        ("update", ("api.github.com", ["1.2.3.4"], 0, 10.0), ANY),
        ("lookup", ("api.github.com", 10.0), set()),
    ]),
    ("re-learning extends the expiry", {}, [
        ("update", ("api.github.com", ["1.2.3.4"], 10, 0.0), ANY),
        ("update", ("api.github.com", ["1.2.3.4"], 10, 5.0), ANY),
        ("lookup", ("api.github.com", 14.0), {"1.2.3.4"}),
    ]),
    ("a shorter later TTL does not shorten it", {}, [
        ("update", ("api.github.com", ["1.2.3.4"], 100, 0.0), ANY),
        ("update", ("api.github.com", ["1.2.3.4"], 1, 5.0), ANY),
        ("lookup", ("api.github.com", 50.0), {"1.2.3.4"}),
    ]),
    ("IPs accumulate per name", {}, [
        ("update", ("api.github.com", ["1.1.1.1"], 60, 0.0), ANY),
        ("update", ("api.github.com", ["2.2.2.2"], 60, 1.0), ANY),
        ("lookup", ("api.github.com", 2.0), {"1.1.1.1", "2.2.2.2"}),
    ]),
    ("max IPs per name evicts the oldest", {"max_ips_per_name": 2}, [
        ("update", ("api.github.com", ["1.1.1.1"], 60, 0.0), []),
        ("update", ("api.github.com", ["2.2.2.2"], 60, 1.0), []),
        ("update", ("api.github.com", ["3.3.3.3"], 60, 2.0), [(GH, "1.1.1.1")]),
        ("lookup", ("api.github.com", 3.0), {"2.2.2.2", "3.3.3.3"}),
        ("names_for_ip", ("1.1.1.1", 3.0), set()),
    ]),
    ("limit within one answer keeps the last IPs", {"max_ips_per_name": 2}, [
        ("update", ("api.github.com", ["1.1.1.1", "2.2.2.2", "3.3.3.3"], 60, 0.0), [(GH, "1.1.1.1")]),
        ("lookup", ("api.github.com", 1.0), {"2.2.2.2", "3.3.3.3"}),
    ]),
    ("limit is per name", {"max_ips_per_name": 1}, [
        ("update", ("a.example", ["1.1.1.1"], 60, 0.0), []),
        ("update", ("b.example", ["2.2.2.2"], 60, 0.0), []),
        ("lookup", ("a.example", 1.0), {"1.1.1.1"}),
    ]),
    ("reverse lookup across names", {}, [
        ("update", ("a.example", ["1.1.1.1"], 60, 0.0), ANY),
        ("update", ("b.example", ["1.1.1.1"], 10, 0.0), ANY),
        ("names_for_ip", ("1.1.1.1", 5.0), {"a.example.", "b.example."}),
        ("names_for_ip", ("1.1.1.1", 20.0), {"a.example."}),
        ("names_for_ip", ("9.9.9.9", 5.0), set()),
    ]),
    ("expire returns what the datapath must close", {}, [
        ("update", ("a.example", ["1.1.1.1", "2.2.2.2"], 10, 0.0), ANY),
        ("update", ("b.example", ["3.3.3.3"], 100, 0.0), ANY),
        ("expire", (9.0,), []),
        ("expire", (10.0,), [("a.example.", "1.1.1.1"), ("a.example.", "2.2.2.2")]),
        ("expire", (11.0,), []),
        ("lookup", ("b.example", 11.0), {"3.3.3.3"}),
    ]),
    ("an IP shared by two names is reported once per name", {}, [
        ("update", ("a.example", ["1.1.1.1"], 10, 0.0), ANY),
        ("update", ("b.example", ["1.1.1.1"], 10, 0.0), ANY),
        ("expire", (10.0,), [("a.example.", "1.1.1.1"), ("b.example.", "1.1.1.1")]),
        ("names_for_ip", ("1.1.1.1", 0.0), set()),
    ]),
    ("entries: sorted rows with remaining TTL", {}, [
        ("update", ("b.example", ["10.0.0.2", "10.0.0.10", "2001:db8::1"], 30, 100.0), ANY),
        ("update", ("a.example", ["10.0.0.1"], 60, 100.0), ANY),
        ("entries", (110.0,), [
            CacheEntry("a.example.", "10.0.0.1", 50, 160.0),
            CacheEntry("b.example.", "10.0.0.2", 20, 130.0),
            CacheEntry("b.example.", "10.0.0.10", 20, 130.0),
            CacheEntry("b.example.", "2001:db8::1", 20, 130.0),
        ]),
        ("entries", (140.0,), [CacheEntry("a.example.", "10.0.0.1", 20, 160.0)]),
    ]),
]


def run_script(options, steps):
    cache = DNSCache(**options)
    for i, (method, args, expected) in enumerate(steps):
        got = getattr(cache, method)(*args)
        if expected is not ANY:
            assert got == expected, f"step {i}: {method}{args}"


@pytest.mark.parametrize("case,options,steps", CASES, ids=[c for c, *_ in CASES])
def test_cache_script(case, options, steps):
    run_script(options, steps)


SELECT = [
    ("pattern selects matching names", "*.github.com", False, {"1.1.1.1", "2.2.2.2"}),
    ("multi-label pattern", "**.github.com", False, {"1.1.1.1", "2.2.2.2", "3.3.3.3"}),
    ("lone star selects all cached names", "*", False, {"1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"}),
    ("matchName is exact", "api.github.com", True, {"1.1.1.1"}),
]


@pytest.mark.parametrize("case,selector,is_name,expected", SELECT, ids=[c for c, *_ in SELECT])
def test_select(case, selector, is_name, expected):
    cache = DNSCache()
    cache.update("api.github.com", ["1.1.1.1"], 60, 0.0)
    cache.update("support.github.com", ["2.2.2.2"], 60, 0.0)
    cache.update("a.b.github.com", ["3.3.3.3"], 60, 0.0)
    cache.update("example.org", ["4.4.4.4"], 60, 0.0)
    cache.update("old.github.com", ["5.5.5.5"], 1, 0.0)  # expired by now=10
    matcher = compile_name(selector) if is_name else compile_pattern(selector)
    assert cache.select(matcher, 10.0) == expected


FROM_PAIRS = [
    ("one pair, two IPs", ["api.github.com=1.2.3.4,1.2.3.5"], "api.github.com", {"1.2.3.4", "1.2.3.5"}),
    ("same name twice merges", ["a.example=1.1.1.1", "A.example.=2.2.2.2"], "a.example", {"1.1.1.1", "2.2.2.2"}),
    ("spaces around IPs", ["a.example= 1.1.1.1 , ::1"], "a.example", {"1.1.1.1", "::1"}),
]


@pytest.mark.parametrize("case,pairs,name,expected", FROM_PAIRS, ids=[c for c, *_ in FROM_PAIRS])
def test_from_pairs_never_expires(case, pairs, name, expected):
    cache = DNSCache.from_pairs(pairs)
    assert cache.lookup(name, 1e12) == expected
    assert cache.expire(1e12) == []
    assert all(e.ttl_remaining is None and e.expires_at is None for e in cache.entries(1e12))


BAD_PAIRS = [
    ("no equals sign", "api.github.com", "expected NAME=IP"),
    ("empty name", "=1.2.3.4", "invalid name ''"),
    ("bad name characters", "api github.com=1.2.3.4", "invalid name 'api github.com'"),
    ("no IP", "api.github.com=", "'' is not an IP address"),
    ("bad IP", "api.github.com=1.2.3.4,1.2.3", "'1.2.3' is not an IP address"),
    ("trailing comma", "api.github.com=1.2.3.4,", "'' is not an IP address"),
]


@pytest.mark.parametrize("case,pair,message", BAD_PAIRS, ids=[c for c, *_ in BAD_PAIRS])
def test_from_pairs_rejects_malformed(case, pair, message):
    with pytest.raises(ValueError) as err:
        DNSCache.from_pairs([pair])
    assert message in str(err.value) and repr(pair) in str(err.value)


def test_from_pairs_honours_the_ip_limit():
    cache = DNSCache.from_pairs(["a.example=1.1.1.1,2.2.2.2,3.3.3.3"], max_ips_per_name=2)
    assert cache.lookup("a.example", 0.0) == {"2.2.2.2", "3.3.3.3"}


def test_update_rejects_bad_ip():
    with pytest.raises(ValueError):
        DNSCache().update("a.example", ["not-an-ip"], 30, 0.0)


IPS = [("1.2.3.4", "1.2.3.4"), ("2001:DB8::0001", "2001:db8::1"), ("::ffff:1.2.3.4", "1.2.3.4"),
       (" 10.0.0.1 ", "10.0.0.1")]


@pytest.mark.parametrize("raw,expected", IPS, ids=[r for r, _ in IPS])
def test_normalize_ip(raw, expected):
    assert normalize_ip(raw) == expected


def test_generation_moves_when_live_pairs_change_not_on_a_refresh():
    c = DNSCache(max_ips_per_name=2)
    g = [c.generation]

    def moved() -> bool:
        g.append(c.generation)
        return g[-1] != g[-2]

    c.update("a.example", ["1.1.1.1"], 10, now=0)
    assert moved()  # new pair
    c.update("A.example.", ["1.1.1.1"], 20, now=5)
    assert not moved()  # same live pair, later expiry
    c.update("b.example", ["1.1.1.1"], 10, now=5)
    assert moved()  # the IP has a new name
    c.update("a.example", ["1.1.1.1"], 10, now=100)
    assert moved()  # had expired: revived
    c.update("a.example", ["2.2.2.2", "3.3.3.3"], 10, now=100)
    assert moved()  # new pairs and an eviction
    c.expire(now=1000)
    assert moved()
    c.expire(now=1000)
    assert not moved()
