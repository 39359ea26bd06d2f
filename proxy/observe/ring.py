"""A bounded ring of flows: the last `size` flows, history queries, and followers.

Memory is bounded twice: the ring keeps at most `size` flows (the oldest go first), and each
follower has its own bounded queue; a follower that falls behind loses the oldest queued flows
and is told how many (`Follower.lost`, reported like Hubble's `lost_events`).

Appends and follower wake-ups happen on the event loop thread (the proxies and the NFLOG reader
all run there); `snapshot`/`since`/`last` may be called from anywhere.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Iterator

from proxy.observe.flow import ProxyEvent, parse_time

Predicate = Callable[[dict], bool]
DEFAULT_SIZE = 4096


class Follower:
    """Async iterator over flows appended after it was created. Close it (or leave the
    `async with`) to stop receiving."""

    def __init__(self, ring: "FlowRing", maxsize: int) -> None:
        self._ring = ring
        self._queue: deque[tuple[int, dict]] = deque()
        self._maxsize = maxsize
        self._event = asyncio.Event()
        self.lost = 0  # flows dropped because this follower was too slow
        self.closed = False

    def _push(self, seq: int, flow: dict) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.lost += 1
        self._queue.append((seq, flow))
        self._event.set()

    def take_lost(self) -> int:
        n, self.lost = self.lost, 0
        return n

    def pending(self) -> list[tuple[int, dict]]:
        """What is queued now, without waiting."""
        out = list(self._queue)
        self._queue.clear()
        self._event.clear()
        return out

    async def next_batch(self) -> list[tuple[int, dict]]:
        """Wait until at least one flow is queued; return all queued (seq, flow)."""
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        return self.pending()

    def __aiter__(self) -> "Follower":
        return self

    async def __anext__(self) -> dict:
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        return self._queue.popleft()[1]

    def close(self) -> None:
        self.closed = True
        self._ring._followers.discard(self)
        try:
            self._event.set()
        except RuntimeError:  # its loop is already closed: nobody waits any more
            pass

    async def __aenter__(self) -> "Follower":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


def _built(item: dict | ProxyEvent, index: int) -> dict:
    """A ring item as a flow: a flow dict (index -1), or flow number `index` of a proxy event
    whose flows are built the first time one of them is read."""
    return item if index < 0 else item.flows()[index]


class FlowRing:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("ring size must be at least 1")
        self.size = size
        # (seq, time_ns, flow dict or proxy event, -1 or the flow's index in the event's flows)
        self._items: deque[tuple[int, int, dict | ProxyEvent, int]] = deque(maxlen=size)
        self._followers: set[Follower] = set()
        self.seq = 0  # flows ever appended

    def append(self, flow: dict, time_ns: int | None = None) -> int:
        """Keep `flow` (its `time` is parsed unless `time_ns` is given); wake followers."""
        self.seq += 1
        if time_ns is None:
            try:
                time_ns = parse_time(flow.get("time", ""))
            except ValueError:
                time_ns = 0
        self._items.append((self.seq, time_ns, flow, -1))
        for f in list(self._followers):
            f._push(self.seq, flow)
        return self.seq

    def append_event(self, event: ProxyEvent, time_ns: int) -> int:
        """Keep the flows of a proxy event, unbuilt until read (`ProxyEvent.flows`); they are
        built at once when someone follows. `time_ns`: the event's time, which `since` uses for
        all of its flows."""
        if self._followers:
            for flow in event.flows():
                self.append(flow, time_ns)
            return self.seq
        items = self._items
        for i in range(event.flow_count):
            self.seq += 1
            items.append((self.seq, time_ns, event, i))
        return self.seq

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[dict]:
        return (_built(item, i) for _, _, item, i in list(self._items))

    def snapshot(self, predicate: Predicate | None = None, since_ns: int | None = None,
                 last: int | None = None, upto_seq: int | None = None) -> list[tuple[int, dict]]:
        """(seq, flow) in arrival order: matching `predicate`, at or after `since_ns`, appended
        up to `upto_seq`, then only the last `last` of those."""
        out = [(seq, flow) for seq, t, flow in
               ((seq, t, _built(item, i)) for seq, t, item, i in list(self._items)
                if (since_ns is None or t >= since_ns) and (upto_seq is None or seq <= upto_seq))
               if predicate is None or predicate(flow)]
        if last is not None:
            out = out[-last:] if last > 0 else []
        return out

    def since(self, time_ns: int) -> list[dict]:
        return [f for _, f in self.snapshot(since_ns=time_ns)]

    def last(self, n: int) -> list[dict]:
        return [f for _, f in self.snapshot(last=n)]

    def follow(self, maxsize: int = 1024) -> Follower:
        """A follower that receives every flow appended from now on (on the loop thread)."""
        f = Follower(self, maxsize)
        self._followers.add(f)
        return f
