"""Picking: pick requests become orders, orders drive conveyors and sorters, scales confirm.

`PickingService` is the facade the runtime and the API hold; the work is split by job:

* `controller.services.order_desk.OrderDesk` — idempotency, validation, allocation,
  reservation, the journal of orders and cmd ids, pack / ship / cancel / resolve; it answers
  with domain outcomes and refuses with `PickRefused` subclasses, never a status code;
* `controller.services.pick_executor.PickExecutor` — belts, sorter commands, scale
  confirmation and restart reconciliation against narrow sorter/belt ports, through the pure
  task state machine (`controller.domain.orders`);
* the channels: HTTP (controller/api/routes/orders.py) and MQTT (`on_command`, through
  `controller.services.pick_wire.answer_command`) share one schema, `PickIn`, and one mapping
  of refusals to statuses (`pick_wire.status_of`).

With a `controller.control.ControlLoop` (the runtime's), the desk and the executor belong to
that loop's thread: every call from elsewhere is carried over to it (`submit_async` and
`on_control` for the API, `answer_commands` for the MQTT channel; the plain methods block the
calling thread until the control loop answered, for tests and tools), and they read shelves
from `shelves`, immutable `ShelfCount` snapshots handed over from ingest's loop by the bus
listener `on_events` (docs/architecture.md, "Three event loops"). The HTTP routes call
`submit_async` / `on_control` from the HTTP loop (`controller.api.loops`): they cross to
the control loop as the main loop would, and touch nothing of ingest's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from controller.config import SiteConfig
from controller.control import ControlLoop
from controller.domain.events import BusEvent, StockChanged
from controller.domain.model import ShelfSpec, ShelfStatus
from controller.domain.orders import Order, OrderState, Resolution
from controller.domain.routing import Station, Topology, ZoneRoute
from controller.domain.stock import ShelfState
from controller.ports import OrderJournalPort
from controller.services.order_desk import OrderDesk, PickRefused, PickRequest, Submitted
from controller.services.pick_executor import (
    DEVICES_FIRST_CHANCE_S,
    BeltPort,
    PickExecutor,
    ShelfView,
    SorterPort,
)
from controller.services.pick_wire import answer_command

__all__ = [
    "DEVICES_FIRST_CHANCE_S",
    "PickRefused",
    "PickRequest",
    "PickingService",
    "ShelfCount",
    "Submitted",
    "topology",
]


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ShelfCount:
    """A shelf's count and status at one moment: what the control loop reads of a shelf
    (ingest's `ShelfState` is mutable and belongs to the main loop)."""

    units: int | None
    status: ShelfStatus

    @classmethod
    def of(cls, state: ShelfView) -> ShelfCount:
        """The count of ``state``: one shared object per (units, status), since frozen (a
        site of 100k shelves holds a few hundred of them, not 100k)."""
        key = (state.units, state.status)
        count = _COUNTS.get(key)
        if count is None:
            if len(_COUNTS) >= _MAX_SHARED_COUNTS:
                return cls(*key)
            count = _COUNTS[key] = cls(*key)
        return count


_COUNTS: dict[tuple[int | None, ShelfStatus], ShelfCount] = {}
_MAX_SHARED_COUNTS = 100_000
"""Bound of the shared counts (units × statuses seen); beyond it a count is its own object."""


def topology(site: SiteConfig) -> Topology:
    return Topology(
        zones={z.id: ZoneRoute(tuple(z.conveyors), z.sorter) for z in site.zones},
        stations={p.id: Station(p.sorter, p.lane) for p in site.pack_stations},
    )


class PickingService:
    """One desk and one executor for a site, wired to each other (module doc)."""

    def __init__(
        self,
        site: SiteConfig,
        journal: OrderJournalPort,
        shelf_states: Mapping[str, ShelfState],
        specs: Mapping[str, ShelfSpec],
        *,
        conveyors: Mapping[str, BeltPort],
        sorters: Mapping[str, SorterPort],
        publish_bus: Callable[[list[BusEvent]], None],
        publish_mqtt: Callable[[str, bytes], None] | None = None,
        clock: Callable[[], float] = time.time,
        control: ControlLoop | None = None,
    ) -> None:
        self.stats: defaultdict[str, int] = defaultdict(int)
        self._control = control
        self._source = shelf_states
        self.shelves: dict[str, ShelfCount] = {}
        """With a control loop: the snapshots the desk and the executor read (`on_events`)."""
        # Handed over from the main loop, coalesced: at most one callback queued at a time.
        self._handover = threading.Lock()
        self._pending_counts: dict[str, ShelfCount] = {}
        self._pending_stock: list[BusEvent] = []
        self._pending_posted = False
        states: Mapping[str, ShelfView] = self.shelves if control is not None else shelf_states
        self.executor = PickExecutor(
            site.picking,
            conveyors=conveyors,
            sorters=sorters,
            shelf_states=states,
            clock=clock,
            stats=self.stats,
        )
        self.desk = OrderDesk(
            site.picking,
            site_id=site.site.id,
            topic_prefix=site.mqtt.topic_prefix,
            topology=topology(site),
            skus=(s.id for s in site.skus),
            journal=journal,
            shelf_states=states,
            specs=specs,
            execution=self.executor,
            publish_bus=publish_bus,
            publish_mqtt=publish_mqtt,
            clock=clock,
            stats=self.stats,
        )
        self.executor.bind(self.desk)
        self.devices_settled: asyncio.Event = self.executor.devices_settled
        """Set once every PLC link had its first chance to connect (`run`), or from the
        start without PLCs."""

    @property
    def orders(self) -> dict[str, Order]:
        """The open orders."""
        return self.desk.orders

    def restore(self) -> list[Order]:
        """Load counters and open orders from the journal; rebuild reservations. Returns the
        open orders (to reconcile once `run` starts)."""
        if self._control is not None:
            self.shelves.update({sid: ShelfCount.of(st) for sid, st in self._source.items()})
        opened = self.desk.restore()
        self.executor.restored(opened)
        return opened

    # -- crossing to the control loop ----------------------------------------------------------
    def _sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the control loop (blocking the caller until it answered), or at
        once without one (or on it)."""
        if self._control is None:
            return fn(*args)
        return self._control.call_blocking(fn, *args)

    async def on_control(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the control loop, awaited from the caller's loop (the API's)."""
        if self._control is None:
            return fn(*args)
        return await self._control.call(fn, *args)

    async def submit_async(self, req: PickRequest, *, key: str | None, principal: str) -> Submitted:
        """The API's submission: on the control loop, after the start-up wait for the PLC
        links (`wait_devices_settled`), so it waits behind nothing of the main loop."""

        async def submit() -> Submitted:
            await self.executor.wait_devices_settled()
            return self.submit(req, key=key, principal=principal)

        if self._control is None:
            done = await submit()
            if not done.replayed:
                # One loop: let the order's execution task take its first step (up to the
                # sorter's Modbus write) before the caller serialises its answer.
                await asyncio.sleep(0)
            return done
        # At the head of the control loop's queue: a submission waits behind nothing queued
        # there before it (module doc of controller.control, "Commands first").
        return await self._control.call_first(submit)

    async def run(self, reconcile: Sequence[Order] = ()) -> None:
        """Execute orders (the reconciled ones, then each new one) and keep the desk tidy."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.desk.housekeeping(), name="picking-housekeeping")
            tg.create_task(self.executor.run(reconcile), name="picking-executor")

    # -- the desk ------------------------------------------------------------------------------
    # Each of these runs on the control loop (module doc); the API awaits them through
    # `on_control`, and from another thread they block until the control loop answered.
    def get(self, order_id: str) -> dict[str, Any] | None:
        return self._sync(self.desk.get, order_id)

    def recent(self, *, limit: int = 100, state: OrderState | None = None) -> list[dict[str, Any]]:
        return self._sync(lambda: self.desk.recent(limit=limit, state=state))

    def reserved(self, shelf_id: str) -> int:
        return self._sync(self.desk.reserved, shelf_id)

    def available(self, shelf_id: str) -> int | None:
        return self._sync(self.desk.available, shelf_id)

    def submit(self, req: PickRequest, *, key: str | None, principal: str) -> Submitted:
        """`OrderDesk.submit`: no await between the idempotency check and the journal commit."""
        return self._sync(lambda: self.desk.submit(req, key=key, principal=principal))

    def pack(self, order_id: str, *, by: str) -> dict[str, Any]:
        return self._sync(lambda: self.desk.pack(order_id, by=by))

    def ship(self, order_id: str, *, by: str, carrier: str, tracking: str) -> dict[str, Any]:
        return self._sync(
            lambda: self.desk.ship(order_id, by=by, carrier=carrier, tracking=tracking)
        )

    def cancel(self, order_id: str, *, by: str, reason: str | None = None) -> dict[str, Any]:
        return self._sync(lambda: self.desk.cancel(order_id, by=by, reason=reason))

    def resolve(
        self, order_id: str, task_no: int, resolution: Resolution, *, by: str, reason: str
    ) -> dict[str, Any]:
        return self._sync(
            lambda: self.desk.resolve(order_id, task_no, resolution, by=by, reason=reason)
        )

    # -- the MQTT channel ----------------------------------------------------------------------
    def on_command(self, payload: bytes) -> tuple[int, dict[str, Any]]:
        """A pick request from the MQTT command topic (docs/picking.md): the `PickIn` body
        plus optional ``channel`` and ``idempotency_key``. Returns (status, reply body);
        never raises."""
        return answer_command(
            payload,
            lambda req, key, principal: self.submit(req, key=key, principal=principal),
            self.stats,
        )

    def answer_commands(
        self,
        payloads: Sequence[bytes],
        reply: Callable[[list[tuple[int, dict[str, Any]]]], None],
    ) -> None:
        """Answer MQTT pick commands in their order, on the control loop, then hand the
        answers to ``reply`` (called on the control loop: it crosses back itself)."""

        def answer() -> None:
            reply([self.on_command(p) for p in payloads])

        if self._control is None:
            answer()
        else:
            self._control.post(answer)

    # -- the executor --------------------------------------------------------------------------
    def on_events(self, events: list[BusEvent]) -> None:
        """Bus listener: a shelf's count fell → confirm waiting tasks on that shelf. With a
        control loop (this runs on ingest's loop, after the commit): the changed shelves'
        counts as snapshots, then the events, handed over in one FIFO callback. Groups that
        arrive while that callback is still queued join it (in order), so a burst of ingest
        groups wakes the control thread once, not once per group."""
        if self._control is None:
            self.executor.on_events(events)
            return
        changed = {sid for e in events if isinstance(sid := getattr(e, "shelf_id", None), str)}
        if not changed:
            return
        counts = {sid: ShelfCount.of(self._source[sid]) for sid in changed if sid in self._source}
        stock = [e for e in events if isinstance(e, StockChanged)]
        with self._handover:
            self._pending_counts.update(counts)
            self._pending_stock.extend(stock)
            if self._pending_posted:
                return
            self._pending_posted = True
        self._control.post(self._on_shelves)

    def _on_shelves(self) -> None:
        """On the control loop: the snapshots and stock events handed over since the last
        call, the snapshots first."""
        with self._handover:
            counts, self._pending_counts = self._pending_counts, {}
            stock, self._pending_stock = self._pending_stock, []
            self._pending_posted = False
        self.shelves.update(counts)
        if stock:
            self.executor.on_events(stock)

    def add_settled_listener(self, callback: Callable[[], None]) -> None:
        self.executor.add_settled_listener(callback)

    async def wait_devices_settled(self) -> None:
        await self.executor.wait_devices_settled()
