"""The in-process event bus: synchronous fan-out to bounded per-subscriber queues.

Publishing never blocks and never waits on a consumer (the control path must not wait on the
dashboard or history): each subscription is a bounded deque with a stated overflow policy,
drop-oldest, and a counter of what it dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any


class Subscription:
    """A bounded queue of events for one consumer. Iterate with ``async for``."""

    def __init__(self, bus: Bus, name: str, maxsize: int, kinds: frozenset[str] | None) -> None:
        self._bus = bus
        self.name = name
        self.kinds = kinds
        self._items: deque[dict[str, Any]] = deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.delivered = 0

    def offer(self, event: dict[str, Any]) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1  # deque(maxlen) drops the oldest on append
        self._items.append(event)
        self._ready.set()

    def get_nowait(self) -> dict[str, Any] | None:
        if self._items:
            self.delivered += 1
            return self._items.popleft()
        self._ready.clear()
        return None

    async def get(self, timeout_s: float | None = None) -> dict[str, Any]:
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        self._bus._subs.discard(self)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.get()


class Bus:
    """Events are JSON-safe dicts with at least ``kind`` and ``ts``."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self.published = 0

    def subscribe(
        self, name: str, *, maxsize: int = 10_000, kinds: frozenset[str] | None = None
    ) -> Subscription:
        sub = Subscription(self, name, maxsize, kinds)
        self._subs.add(sub)
        return sub

    def add_listener(self, fn: Callable[[list[dict[str, Any]]], None]) -> None:
        """A synchronous listener called with each published group (it must be fast and must
        not raise; exceptions are the listener's bug and propagate to the publisher)."""
        self._listeners.append(fn)

    def publish(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        self.published += len(events)
        for fn in self._listeners:
            fn(events)
        for sub in self._subs:
            kinds = sub.kinds
            for ev in events:
                if kinds is None or ev["kind"] in kinds:
                    sub.offer(ev)

    @property
    def subscriptions(self) -> list[Subscription]:
        return sorted(self._subs, key=lambda s: s.name)
