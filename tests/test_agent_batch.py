"""Group commit: callers of one loop turn share one flush, each resumes after its own flush."""
from __future__ import annotations

import asyncio

from proxy.agent.batch import Batcher


def test_callers_of_one_turn_share_one_flush_and_later_ones_get_the_next():
    flushed: list[list[int]] = []
    order: list[str] = []

    async def caller(b: Batcher, name: str, items: list[int]) -> None:
        await b.add(items)
        order.append(name)
        assert any(set(items) <= set(f) for f in flushed)  # written before the caller resumes

    async def main() -> None:
        b = Batcher(flushed.append)
        await asyncio.gather(caller(b, "a", [1]), caller(b, "b", [2, 3]), caller(b, "c", []))
        await caller(b, "d", [4])
        assert b.batches == 2

    asyncio.run(main())
    assert flushed == [[1, 2, 3], [4]]
    assert sorted(order[:3]) == ["a", "b", "c"] and order[3] == "d"


def test_a_failed_flush_raises_in_every_caller_and_the_next_batch_is_fresh():
    calls = []

    def flush(items):
        calls.append(items)
        if len(calls) == 1:
            raise OSError("nft failed")

    async def main() -> None:
        b = Batcher(flush)
        results = await asyncio.gather(b.add([1]), b.add([2]), return_exceptions=True)
        assert [type(r) for r in results] == [OSError, OSError]
        await b.add([3])

    asyncio.run(main())
    assert calls == [[1, 2], [3]]


def test_a_caller_that_gives_up_does_not_cancel_the_others():
    async def main() -> None:
        flushed = []
        b = Batcher(flushed.append)
        impatient = asyncio.ensure_future(b.add([1]))
        patient = asyncio.ensure_future(b.add([2]))
        await asyncio.sleep(0)  # both queued their items and wait
        impatient.cancel()
        await patient
        assert flushed == [[1, 2]]
        assert impatient.cancelled()

    asyncio.run(main())
