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
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from controller.config import SiteConfig
from controller.domain.events import BusEvent
from controller.domain.model import ShelfSpec
from controller.domain.orders import Order, OrderState, Resolution
from controller.domain.routing import Station, Topology, ZoneRoute
from controller.domain.stock import ShelfState
from controller.ports import OrderJournalPort
from controller.services.order_desk import OrderDesk, PickRefused, PickRequest, Submitted
from controller.services.pick_executor import (
    DEVICES_FIRST_CHANCE_S,
    BeltPort,
    PickExecutor,
    SorterPort,
)
from controller.services.pick_wire import answer_command

__all__ = [
    "DEVICES_FIRST_CHANCE_S",
    "PickRefused",
    "PickRequest",
    "PickingService",
    "Submitted",
    "topology",
]


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
    ) -> None:
        self.stats: defaultdict[str, int] = defaultdict(int)
        self.executor = PickExecutor(
            site.picking,
            conveyors=conveyors,
            sorters=sorters,
            shelf_states=shelf_states,
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
            shelf_states=shelf_states,
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
        opened = self.desk.restore()
        self.executor.restored(opened)
        return opened

    async def run(self, reconcile: Sequence[Order] = ()) -> None:
        """Execute orders (the reconciled ones, then each new one) and keep the desk tidy."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.desk.housekeeping(), name="picking-housekeeping")
            tg.create_task(self.executor.run(reconcile), name="picking-executor")

    # -- the desk ------------------------------------------------------------------------------
    def get(self, order_id: str) -> dict[str, Any] | None:
        return self.desk.get(order_id)

    def recent(self, *, limit: int = 100, state: OrderState | None = None) -> list[dict[str, Any]]:
        return self.desk.recent(limit=limit, state=state)

    def reserved(self, shelf_id: str) -> int:
        return self.desk.reserved(shelf_id)

    def available(self, shelf_id: str) -> int | None:
        return self.desk.available(shelf_id)

    def submit(self, req: PickRequest, *, key: str | None, principal: str) -> Submitted:
        """`OrderDesk.submit`: no await between the idempotency check and the journal commit."""
        return self.desk.submit(req, key=key, principal=principal)

    def pack(self, order_id: str, *, by: str) -> dict[str, Any]:
        return self.desk.pack(order_id, by=by)

    def ship(self, order_id: str, *, by: str, carrier: str, tracking: str) -> dict[str, Any]:
        return self.desk.ship(order_id, by=by, carrier=carrier, tracking=tracking)

    def cancel(self, order_id: str, *, by: str, reason: str | None = None) -> dict[str, Any]:
        return self.desk.cancel(order_id, by=by, reason=reason)

    def resolve(
        self, order_id: str, task_no: int, resolution: Resolution, *, by: str, reason: str
    ) -> dict[str, Any]:
        return self.desk.resolve(order_id, task_no, resolution, by=by, reason=reason)

    # -- the MQTT channel ----------------------------------------------------------------------
    def on_command(self, payload: bytes) -> tuple[int, dict[str, Any]]:
        """A pick request from the MQTT command topic (docs/picking.md): the `PickIn` body
        plus optional ``channel`` and ``idempotency_key``. Returns (status, reply body);
        never raises."""
        return answer_command(
            payload,
            lambda req, key, principal: self.desk.submit(req, key=key, principal=principal),
            self.stats,
        )

    # -- the executor --------------------------------------------------------------------------
    def on_events(self, events: list[BusEvent]) -> None:
        """Bus listener: a shelf's count fell → confirm waiting tasks on that shelf."""
        self.executor.on_events(events)

    def add_settled_listener(self, callback: Callable[[], None]) -> None:
        self.executor.add_settled_listener(callback)

    async def wait_devices_settled(self) -> None:
        await self.executor.wait_devices_settled()
