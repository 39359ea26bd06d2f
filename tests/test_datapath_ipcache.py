"""ipcache flattening: nested prefixes become disjoint intervals with longest-prefix-match answers."""
import ipaddress
import random
from pathlib import Path

import pytest
import yaml

from proxy.datapath import ipcache

CASES = yaml.safe_load((Path(__file__).parent / "data/datapath/ipcache_cases.yaml").read_text())["cases"]


def as_rows(intervals):
    return [[iv.first, iv.last, iv.identity] for iv in intervals]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_flatten_case(case):
    cache = {str(k): v for k, v in case["ipcache"].items()}
    assert as_rows(ipcache.flatten(cache, 4)) == case["v4"]
    assert as_rows(ipcache.flatten(cache, 6)) == [[str(ipaddress.ip_address(a)), str(ipaddress.ip_address(b)), i]
                                                  for a, b, i in case["v6"]]


def lpm(cache, addr):
    """The reference answer: the longest prefix holding addr, by brute force."""
    best = None
    for net, ident in ipcache.parse_prefixes(cache).items():
        if addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, ident)
    return best[1] if best else None


@pytest.mark.parametrize("seed", range(20))
def test_flattened_intervals_answer_like_longest_prefix_match(seed):
    rng = random.Random(seed)
    cache = {}
    for _ in range(rng.randrange(1, 40)):
        plen = rng.choice([8, 12, 16, 20, 24, 28, 30, 32])
        addr = ipaddress.IPv4Address(rng.choice([0x0A000000, 0x0A010000, 0xC0000200]) + rng.randrange(1 << 12))
        cache[str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))] = rng.randrange(1, 6)
    intervals = ipcache.flatten(cache, 4)
    for a, b in zip(intervals, intervals[1:]):
        assert a.hi < b.lo, "intervals are sorted and disjoint"
        assert not (a.hi + 1 == b.lo and a.identity == b.identity), "neighbours with one identity merge"
    probes = [int(ipaddress.ip_network(p).network_address) + d for p in cache for d in (-1, 0, 1)]
    probes += [int(ipaddress.ip_network(p).broadcast_address) + d for p in cache for d in (-1, 0, 1)]
    probes += [rng.choice([0x0A000000, 0x0A010000, 0xC0000200]) + rng.randrange(1 << 13) for _ in range(300)]
    for n in probes:
        addr = ipaddress.IPv4Address(n % (1 << 32))
        assert ipcache.lookup(intervals, str(addr), None) == lpm(cache, addr), str(addr)


def test_one_prefix_with_two_identities_is_an_error():
    with pytest.raises(ValueError, match="10.0.0.0/24"):
        ipcache.flatten({"10.0.0.0/24": 1, "10.0.0.9/24": 2}, 4)


def test_element_text_is_an_address_or_a_range():
    ivs = ipcache.flatten({"10.0.0.0/24": 300, "10.0.0.7": 256}, 4)
    assert [iv.nft() for iv in ivs] == ["10.0.0.0-10.0.0.6", "10.0.0.7", "10.0.0.8-10.0.0.255"]


def test_ten_thousand_endpoints_flatten():
    cache = {f"10.{i >> 8 & 255}.{i & 255}.1/32": 256 + i for i in range(10000)}
    cache["10.0.0.0/8"] = 16777217
    ivs = ipcache.flatten(cache, 4)  # speed is measured in bench/, not asserted here
    assert len(ivs) == 20001
