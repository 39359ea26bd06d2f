"""The flow ring: bounded, queryable by time and count, followed without gaps or unbounded queues."""
from __future__ import annotations

import asyncio

import pytest

from proxy.observe.flow import rfc3339
from proxy.observe.ring import FlowRing

T0 = 1_700_000_000_000_000_000


def flow(i: int) -> dict:
    return {"time": rfc3339(T0 + i * 1_000_000_000), "verdict": "FORWARDED", "n": i}


def test_the_ring_keeps_only_its_size():
    ring = FlowRing(size=5)
    for i in range(100):
        ring.append(flow(i))
    assert len(ring) == 5 and ring.seq == 100
    assert [f["n"] for f in ring] == [95, 96, 97, 98, 99]


def test_last_n_and_since():
    ring = FlowRing(size=50)
    for i in range(20):
        ring.append(flow(i))
    assert [f["n"] for f in ring.last(3)] == [17, 18, 19]
    assert ring.last(0) == []
    assert [f["n"] for f in ring.since(T0 + 15 * 1_000_000_000)] == [15, 16, 17, 18, 19]


def test_snapshot_filters_before_cutting_to_last():
    ring = FlowRing(size=50)
    for i in range(20):
        ring.append(flow(i))
    odd = ring.snapshot(lambda f: f["n"] % 2 == 1, last=2)
    assert [f["n"] for _, f in odd] == [17, 19]


def test_a_size_below_one_is_refused():
    with pytest.raises(ValueError):
        FlowRing(0)


def test_a_follower_gets_every_new_flow_in_order():
    async def main():
        ring = FlowRing(size=3)
        ring.append(flow(0))
        got = []
        async with ring.follow() as follower:
            async def consume():
                async for f in follower:
                    got.append(f["n"])
                    if len(got) == 10:
                        return
            task = asyncio.ensure_future(consume())
            for i in range(1, 11):
                ring.append(flow(i))
                await asyncio.sleep(0)
            await asyncio.wait_for(task, 1)
        assert got == list(range(1, 11))  # more than the ring holds, none lost
        assert not ring._followers
    asyncio.run(main())


def test_a_slow_follower_loses_the_oldest_and_is_told_how_many():
    async def main():
        ring = FlowRing(size=100)
        follower = ring.follow(maxsize=4)
        for i in range(10):
            ring.append(flow(i))
        batch = await follower.next_batch()
        assert [f["n"] for _, f in batch] == [6, 7, 8, 9]
        assert follower.take_lost() == 6 and follower.take_lost() == 0
        follower.close()
    asyncio.run(main())
