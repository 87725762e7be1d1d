"""The in-process event bus: an ordered queue drained to listeners and bounded subscriptions.

Contract:

* ``publish`` appends the group to the bus's queue; if no drain is running, it drains at once
  (so a publisher outside the bus still sees its group delivered before ``publish`` returns).
* One drain delivers groups first in, first out: each group goes to every listener (in the
  order they were added), then to every subscription, before the next group starts.
* A listener that publishes while the drain runs only appends to the queue: its events are
  delivered after the group that caused them, never re-entrantly in the middle of it. So event
  order is causal order: a ``stock_changed`` is seen by every consumer before the
  ``alert_raised`` it caused.
* A listener that raises is counted (``listener_errors``, per listener in
  ``listener_errors_by_name``) and logged once per listener and exception type with the
  group's event kinds; delivery to the other listeners and subscriptions goes on, and nothing
  propagates to the publisher (the ingest commit and ack are already done when it publishes).

Events are typed (``controller.domain.events.BusEvent``: frozen event classes and the alert
notices); listeners dispatch on their type and read attributes. The wire dict (``as_dict()``)
is made only at the edges that serialise (journal, MQTT, the live WebSocket, history).

Publishing never blocks and never waits on a consumer (the control path must not wait on the
dashboard or history): each subscription is a bounded deque with a stated overflow policy,
drop-oldest, and a counter of what it dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable

from controller.domain.events import BusEvent

log = logging.getLogger("floorhand.bus")

Listener = Callable[[list[BusEvent]], None]


class Subscription:
    """A bounded queue of events for one consumer. Iterate with ``async for``."""

    def __init__(self, bus: Bus, name: str, maxsize: int, kinds: frozenset[str] | None) -> None:
        self._bus = bus
        self.name = name
        self.kinds = kinds
        self._items: deque[BusEvent] = deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.delivered = 0

    def offer(self, event: BusEvent) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1  # deque(maxlen) drops the oldest on append
        self._items.append(event)
        self._ready.set()

    def get_nowait(self) -> BusEvent | None:
        if self._items:
            self.delivered += 1
            return self._items.popleft()
        self._ready.clear()
        return None

    async def get(self, timeout_s: float | None = None) -> BusEvent:
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

    async def __aiter__(self) -> AsyncIterator[BusEvent]:
        while True:
            yield await self.get()


class Bus:
    """Typed events (``BusEvent``), in groups delivered in publish order (the module docstring
    states the contract)."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[tuple[str, Listener]] = []
        self._queue: deque[list[BusEvent]] = deque()
        self._draining = False
        self._logged: set[tuple[str, type[BaseException]]] = set()
        self.published = 0
        self.listener_errors = 0
        self.listener_errors_by_name: Counter[str] = Counter()

    def subscribe(
        self, name: str, *, maxsize: int = 10_000, kinds: frozenset[str] | None = None
    ) -> Subscription:
        sub = Subscription(self, name, maxsize, kinds)
        self._subs.add(sub)
        return sub

    def add_listener(self, fn: Listener, *, name: str | None = None) -> None:
        """A synchronous listener called with each published group, in publish order. It must
        be fast; it may publish (queued behind the current group). An exception it raises is
        counted under ``name`` (default: the callable's qualified name) and logged once."""
        label = name if name is not None else str(getattr(fn, "__qualname__", repr(fn)))
        self._listeners.append((label, fn))

    def publish(self, events: list[BusEvent]) -> None:
        """Queue ``events`` (one group) and, unless a drain is already running (a listener is
        publishing), deliver everything queued before returning."""
        if not events:
            return
        self.published += len(events)
        self._queue.append(list(events))  # the caller may reuse its list
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                self._deliver(self._queue.popleft())
        finally:
            self._draining = False

    def _deliver(self, events: list[BusEvent]) -> None:
        for name, fn in self._listeners:
            try:
                fn(events)
            except Exception as exc:
                self._listener_failed(name, events, exc)
        for sub in self._subs:
            kinds = sub.kinds
            for ev in events:
                if kinds is None or ev.kind in kinds:
                    sub.offer(ev)

    def _listener_failed(self, name: str, events: list[BusEvent], exc: Exception) -> None:
        self.listener_errors += 1
        self.listener_errors_by_name[name] += 1
        key = (name, type(exc))
        if key in self._logged or len(self._logged) >= 1000:
            return
        self._logged.add(key)
        kinds = ", ".join(sorted({ev.kind for ev in events}))
        log.error(
            "bus listener %s failed on %s (later failures of this kind are only counted): %s",
            name,
            kinds,
            exc,
            exc_info=exc,
        )

    @property
    def queued(self) -> int:
        """Groups waiting for the running drain (0 outside a drain)."""
        return len(self._queue)

    @property
    def subscriptions(self) -> list[Subscription]:
        return sorted(self._subs, key=lambda s: s.name)
