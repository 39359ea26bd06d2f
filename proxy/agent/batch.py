"""Group commit: what many callers ask for within one loop turn is written in one call.

The DNS proxy learns an answer per query and must not release it before the datapath holds its
IPs. One nftables transaction per answer caps the proxy at the transaction rate; a batch per loop
turn costs one transaction for all the answers that arrived together, and each caller still
resumes only once the transaction that carried its items returned.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, flush: Callable[[list[T]], None]) -> None:
        self.flush = flush  # synchronous: the whole batch in one call
        self._items: list[T] = []
        self._done: asyncio.Future | None = None
        self.batches = 0  # flushes so far

    async def add(self, items: Iterable[T]) -> None:
        """Queue `items`; return once they are written (or raise what the write raised)."""
        done = self._done
        if done is None:
            loop = asyncio.get_running_loop()
            done = self._done = loop.create_future()
            loop.call_soon(self._run)
        self._items.extend(items)
        # shielded: a caller that gives up (a timeout) must not cancel the others' wait
        await asyncio.shield(done)

    def _run(self) -> None:
        items, done = self._items, self._done
        self._items, self._done = [], None
        self.batches += 1
        try:
            self.flush(items)
        except Exception as e:
            done.set_exception(e)
        else:
            done.set_result(None)
