"""The order desk: pick requests become journaled orders; the book of orders and reservations.

`OrderDesk.submit` is synchronous and does no I/O but one journal commit, so concurrent
requests are serialised by the event loop: the idempotency check, the (channel, external id)
check, validation, allocation (`controller.domain.routing`), the reservation and the journal
commit of the order — with every task's sorter cmd_id — happen with no await in between. A
duplicate request therefore always sees the first one's journaled result, and a cmd_id is in
the journal before it can reach a PLC.

The desk answers with domain outcomes (`Submitted`, the order as a dict) and refuses with
`PickRefused` subclasses that say what is wrong (`InvalidPick`, `PickConflict`,
`OrderNotFound`, `PickUnavailable`), never with a transport's status code: the HTTP and MQTT
adapters map them (`controller.services.pick_wire.status_of`).

It is also the book the executor (`controller.services.pick_executor`) writes to: every task
change goes through `finish` (the pure task machine + the reservation), every order change
through `store` / `close` (one journal commit with its events, then the announcements), cmd ids
through the journaled counters (`on_mailbox`, `renumber`).

Sorter cmd ids come from a journaled counter per sorter. The PLC may know higher ids (a journal
restored from a backup, a replaced controller host, a mailbox written by hand): every status
read of a sorter reports the highest id it knows and the counter is moved above it and
journaled before a pick can draw an id from it (`on_mailbox`); a task whose id the PLC overtook
between allocation and sending (nothing was written) gets a new id, journaled, once
(`renumber`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from controller.config import PickingConfig
from controller.domain.events import (
    BusEvent,
    CmdIdsMoved,
    OrderException,
    OrderStateChanged,
    PickTaskChanged,
)
from controller.domain.model import ShelfSpec, ShelfStatus
from controller.domain.orders import (
    FINAL_TASK_STATES,
    InvalidTransition,
    NotCancellable,
    Order,
    OrderState,
    PickTask,
    Resolution,
    TaskEvent,
    TaskState,
    body_digest,
    transition,
)
from controller.domain.routing import AllocationError, StockSource, Topology, plan
from controller.ports import DuplicateOrder, EventRow, IdempotencyRow, OrderJournalPort
from devices.errors import DeviceError

if TYPE_CHECKING:
    from controller.services.pick_executor import ShelfView

log = logging.getLogger("floorhand.picking")

__all__ = [
    "HOUSEKEEPING_S",
    "Execution",
    "InvalidPick",
    "OrderDesk",
    "OrderNotFound",
    "PickConflict",
    "PickInternal",
    "PickRefused",
    "PickRequest",
    "PickUnavailable",
    "Submitted",
]

HOUSEKEEPING_S = 600.0
"""How often expired idempotency keys are forgotten."""


class PickRefused(Exception):
    """A request the desk does not serve: ``code`` names why (``insufficient_stock`` ...),
    ``extra`` carries the details a caller may see, ``retry_after_s`` when retrying helps."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        extra: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra or {}
        self.retry_after_s = retry_after_s


class InvalidPick(PickRefused):
    """The request itself is wrong: unknown SKU or pack station, a line that cannot be routed,
    an Idempotency-Key used for another request."""


class PickConflict(PickRefused):
    """The request clashes with the state: not enough stock, another order with the same id, a
    lifecycle step out of order, an order that cannot be cancelled, a task not UNKNOWN."""


class OrderNotFound(PickRefused):
    """No such order (or, for the API's floor callers, not theirs), or no such task."""


class PickUnavailable(PickRefused):
    """Not now: a device on the route is down, the journal failed; safe to retry."""


class PickInternal(PickRefused):
    """The journal lost something it should have (a key that outlived its order)."""


@dataclass(frozen=True, slots=True)
class PickRequest:
    external_id: str
    lines: tuple[tuple[str, int], ...]
    pack_station: str
    channel: str = "api"

    def digest(self) -> str:
        return body_digest(
            {
                "order_id": self.external_id,
                "lines": [[s, q] for s, q in self.lines],
                "pack_station": self.pack_station,
                "channel": self.channel,
            }
        )


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submission's outcome: a new order (``replayed`` False), or the order as it stands now
    for a replay (the same key with the same body, or the same caller's (channel, external id)
    with the same lines)."""

    order: dict[str, Any]
    replayed: bool

    @property
    def status(self) -> int:
        """The status both adapters answer with (201 new, 200 replay); kept for the callers
        of `PickingService.submit` that read it (benchmarks/pick_latency.py)."""
        return 200 if self.replayed else 201


class Execution(Protocol):
    """What the desk needs from the executor (`controller.services.pick_executor`)."""

    def start(self, order: Order) -> None:
        """Execute a newly journaled order (now, or once the executor runs)."""

    def commands_sent(self, order_id: str) -> bool:
        """A command of the order was (or may have been) handed to a sorter."""

    def unreachable(self, sorters: Iterable[str], conveyors: Iterable[str]) -> list[str]:
        """The devices among these a pick cannot use now (sorters: mailbox not read on the
        current connection; conveyors: link not up)."""

    def sorter_epoch(self, sorter: str) -> int | None:
        """The sorter PLC's boot epoch as last read."""


_TASK_DONE = frozenset(
    {TaskState.CONFIRMED, TaskState.SHORT, TaskState.FAILED, TaskState.CANCELLED}
)
"""Task states that take no more units from their shelf."""


class OrderDesk:
    """Orders from submission to shipment, with the reservations of their open tasks."""

    def __init__(
        self,
        cfg: PickingConfig,
        *,
        site_id: str,
        topic_prefix: str,
        topology: Topology,
        skus: Iterable[str],
        journal: OrderJournalPort,
        shelf_states: Mapping[str, ShelfView],
        specs: Mapping[str, ShelfSpec],
        execution: Execution,
        publish_bus: Callable[[list[BusEvent]], None],
        publish_mqtt: Callable[[str, bytes], None] | None,
        clock: Callable[[], float],
        stats: defaultdict[str, int],
    ) -> None:
        self.cfg = cfg
        self.site_id = site_id
        self.topology = topology
        self.skus = frozenset(skus)
        self.journal = journal
        self.states = shelf_states
        self.execution = execution
        self.publish_bus = publish_bus
        self.publish_mqtt = publish_mqtt
        self.clock = clock
        self.stats = stats
        self._prefix = f"{topic_prefix}/{site_id}"
        self._shelves_of: dict[str, list[ShelfSpec]] = defaultdict(list)
        for spec in specs.values():
            self._shelves_of[spec.sku].append(spec)
        self.orders: dict[str, Order] = {}  # open orders
        self._closed: OrderedDict[str, Order] = OrderedDict()
        self._reserved: dict[str, int] = defaultdict(int)  # shelf -> units held by open tasks
        self._counters: dict[str, int] = {}
        # Idempotency keys and (channel, external id) → order id of the last TTL, so a
        # submission reads no table; older ones: the journal's unique index (DuplicateOrder).
        self._keys: dict[str, IdempotencyRow] = {}
        self._externals: dict[tuple[str, str], str] = {}

    # -- a live catalogue change (docs/catalogue.md) ---------------------------------------------
    def apply_catalogue(
        self,
        skus: frozenset[str],
        specs: list[ShelfSpec],
        removed_skus: frozenset[str],
        moved_shelves: frozenset[str],
    ) -> list[str]:
        """On the control loop: take the new SKUs and shelves, unless an open pick task takes
        units of a removed SKU or from a shelf that moves to another SKU (or goes); then
        nothing changes and each such task is named (``order O-1 task 2: …``)."""
        conflicts = [
            f"order {order.order_id} task {t.task_no}: "
            + (f"SKU {t.sku} removed" if t.sku in removed_skus else f"shelf {t.shelf} moves")
            for order in self.orders.values()
            for t in order.tasks
            if t.state not in _TASK_DONE and (t.sku in removed_skus or t.shelf in moved_shelves)
        ]
        if conflicts:
            return conflicts
        self.skus = skus
        shelves_of: dict[str, list[ShelfSpec]] = defaultdict(list)
        for spec in specs:
            shelves_of[spec.sku].append(spec)
        self._shelves_of = shelves_of
        return []

    # -- restore -------------------------------------------------------------------------------
    def restore(self) -> list[Order]:
        """Load counters and open orders from the journal; rebuild reservations. Returns the
        open orders (to reconcile once the executor runs)."""
        self._counters = dict(self.journal.counters())
        since = self.clock() - self.cfg.idempotency_ttl_h * 3600
        self._keys = {row.key: row for row in self.journal.idempotency_since(since)}
        self._externals = {(c, e): o for c, e, o in self.journal.externals_since(since)}
        opened = [Order.from_dict(d) for d in self.journal.open_orders()]
        for order in opened:
            self.orders[order.order_id] = order
            for task in order.tasks:
                if not task.final and not task.scale_confirmed:
                    self._reserved[task.shelf] += task.qty
        return opened

    # -- queries -------------------------------------------------------------------------------
    def get(self, order_id: str) -> dict[str, Any] | None:
        order = self.orders.get(order_id) or self._closed.get(order_id)
        if order is not None:
            return order.as_dict()
        return self.journal.order(order_id)

    def recent(self, *, limit: int = 100, state: OrderState | None = None) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for order in list(self.orders.values()) + list(self._closed.values()):
            seen[order.order_id] = order.as_dict()
        if len(seen) < limit:
            for d in self.journal.recent_orders(limit):
                seen.setdefault(d["order_id"], d)
        out = sorted(seen.values(), key=lambda d: d["updated_ts"], reverse=True)
        if state is not None:
            out = [d for d in out if d["state"] == state.value]
        return out[:limit]

    def reserved(self, shelf_id: str) -> int:
        return self._reserved.get(shelf_id, 0)

    def available(self, shelf_id: str) -> int | None:
        state = self.states.get(shelf_id)
        if state is None or state.units is None:
            return None
        if state.status in (ShelfStatus.STALE, ShelfStatus.UNKNOWN):
            return None
        return max(0, state.units - self._reserved.get(shelf_id, 0))

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, req: PickRequest, *, key: str | None, principal: str) -> Submitted:
        """Validate, allocate, reserve and journal an order (no await: see the module doc),
        then hand it to the executor.

        Raises `InvalidPick` (invalid, not routable, key reused with another body or by
        another caller), `PickConflict` (no stock, a conflicting order), `PickUnavailable`
        (a device on the route is down, the journal failed). No refusal carries anything of
        another caller's order."""
        digest = req.digest()
        if key is not None:
            row = self._keys.get(key)  # every key younger than the TTL is in memory
            if row is not None:
                if row.digest != digest or row.principal != principal:
                    self.stats["idempotency_mismatch"] += 1
                    raise InvalidPick(
                        "idempotency_key_reused",
                        f"Idempotency-Key {key!r} was used for a different request",
                        extra={"order_id": row.order_id} if row.principal == principal else None,
                    )
                self.stats["replayed"] += 1
                return Submitted(self._original(row.order_id), True)
        known = self._externals.get((req.channel, req.external_id))
        if known is not None:
            return self._same_order(req, self._original(known), principal)
        self._validate(req)
        now = self.clock()
        sources = {
            sku: [
                StockSource(s.shelf_id, s.zone, self.available(s.shelf_id))
                for s in self._shelves_of.get(sku, ())
            ]
            for sku in {sku for sku, _ in req.lines}
        }
        try:
            plans = plan(req.lines, req.pack_station, self.topology, sources)
        except AllocationError as exc:
            self.stats["rejected_stock"] += 1
            unknown = any(p.code == "no_route" for p in exc.problems)
            refusal = InvalidPick if unknown else PickConflict
            raise refusal(
                "not_routable" if unknown else "insufficient_stock",
                str(exc),
                extra={
                    "lines": [
                        {
                            "line": p.line_no,
                            "sku": p.sku,
                            "code": p.code,
                            "detail": p.detail,
                            "available": p.available,
                        }
                        for p in exc.problems
                    ]
                },
            ) from None
        down = self.execution.unreachable(
            sorted({p.sorter for p in plans}), sorted({c for p in plans for c in p.conveyors})
        )
        if down:
            self.stats["device_unavailable"] += 1
            raise PickUnavailable(
                "device_unavailable",
                f"device(s) on the route are not reachable: {', '.join(down)}",
                extra={"devices": down},
                retry_after_s=2.0,
            )
        counters = dict(self._counters)
        order_no = counters.get("order", 0) + 1
        counters["order"] = order_no
        order = Order(
            order_id=f"{self.site_id}-{order_no:08d}",
            channel=req.channel,
            external_id=req.external_id,
            pack_station=req.pack_station,
            lines=list(req.lines),
            created_ts=now,
            principal=principal,
        )
        events: list[BusEvent] = [order.transition(OrderState.VALIDATED, now)]
        pending: dict[str, int] = defaultdict(int)
        for n, p in enumerate(plans):
            counters["tote"] = tote = counters.get("tote", 0) + 1
            cmd_key = f"cmd:{p.sorter}"
            counters[cmd_key] = cmd_id = counters.get(cmd_key, 0) + 1
            state = self.states[p.shelf]
            units = state.units or 0
            before = self._reserved.get(p.shelf, 0) + pending[p.shelf]
            pending[p.shelf] += p.qty
            order.tasks.append(
                PickTask(
                    task_no=n,
                    line_no=p.line_no,
                    sku=p.sku,
                    qty=p.qty,
                    shelf=p.shelf,
                    zone=p.zone,
                    conveyors=p.conveyors,
                    sorter=p.sorter,
                    lane=p.lane,
                    tote=tote,
                    cmd_id=cmd_id,
                    target_count=units - before - p.qty,
                    plc_epoch=self.execution.sorter_epoch(p.sorter),
                    updated_ts=now,
                )
            )
        events.append(order.transition(OrderState.ALLOCATED, now))
        events.append(order.transition(OrderState.PICKING, now))
        body = order.as_dict()
        idem = (
            [IdempotencyRow(key, principal, digest, 201, order.order_id, now)]
            if key is not None
            else []
        )
        try:
            self.journal.commit_orders(
                [body],
                counters=counters,
                idempotency=idem,
                events=[EventRow(now, e.kind, e.as_dict()) for e in events],
            )
        except DuplicateOrder:
            # Older than the in-memory window: the journal's unique index caught it.
            existing = self.journal.order_by_external(req.channel, req.external_id)
            if existing is None:
                raise PickUnavailable("journal_unavailable", "order lookup failed") from None
            self._externals[(req.channel, req.external_id)] = existing["order_id"]
            return self._same_order(req, existing, principal)
        except Exception as exc:
            self.stats["journal_failed"] += 1
            log.error("could not journal order %s: %s", order.order_id, exc)
            raise PickUnavailable("journal_unavailable", f"order not stored: {exc}") from exc
        self._counters = counters
        if idem:
            self._keys[idem[0].key] = idem[0]
        self._externals[(req.channel, req.external_id)] = order.order_id
        for shelf, qty in pending.items():
            self._reserved[shelf] += qty
        self.orders[order.order_id] = order
        self.stats["accepted"] += 1
        # Execution first (its first step reaches the Modbus write without waiting for
        # anything), then the announcements (bus, MQTT order state, pick instructions).
        self.execution.start(order)
        asyncio.get_running_loop().call_soon(self._announce_new, order, events)
        return Submitted(body, False)

    def _announce_new(self, order: Order, events: list[BusEvent]) -> None:
        self._announce(order, events)
        for task in order.tasks:
            self._publish_task(order, task)

    def _same_order(self, req: PickRequest, existing: dict[str, Any], principal: str) -> Submitted:
        """A request for an order that exists: the same order (replay) if the same caller sent
        it with the same lines and pack station, else a conflict. Another caller's order is
        never shown, not even its id: the (channel, order id) is taken, nothing more."""
        if existing.get("principal") != principal:
            self.stats["conflict"] += 1
            raise PickConflict(
                "order_exists",
                f"order {req.external_id!r} from channel {req.channel!r} was submitted by "
                "another caller",
            )
        same = [[s, q] for s, q in req.lines] == [list(x) for x in existing["lines"]] and (
            req.pack_station == existing["pack_station"]
        )
        if not same:
            self.stats["conflict"] += 1
            raise PickConflict(
                "order_exists",
                f"order {req.external_id!r} from channel {req.channel!r} exists with "
                "different lines or pack station",
                extra={"order_id": existing["order_id"]},
            )
        self.stats["deduplicated"] += 1
        return Submitted(existing, True)

    def _original(self, order_id: str) -> dict[str, Any]:
        """The order as it stands (a replay answers with the order's current state)."""
        body = self.get(order_id)
        if body is None:  # the key outlived its order: should not happen
            raise PickInternal("order_missing", f"order {order_id} is not in the journal")
        return body

    def _validate(self, req: PickRequest) -> None:
        problems: list[str] = []
        if not req.external_id:
            problems.append("order_id is empty")
        if not req.lines:
            problems.append("no lines")
        if len(req.lines) > self.cfg.max_lines:
            problems.append(f"{len(req.lines)} lines, at most {self.cfg.max_lines}")
        for i, (sku, qty) in enumerate(req.lines):
            if sku not in self.skus:
                problems.append(f"lines[{i}]: unknown SKU {sku!r}")
            if qty <= 0:
                problems.append(f"lines[{i}]: qty must be > 0")
        if req.pack_station not in self.topology.stations:
            known = ", ".join(sorted(self.topology.stations)) or "none configured"
            problems.append(f"unknown pack station {req.pack_station!r} (known: {known})")
        if problems:
            self.stats["invalid"] += 1
            raise InvalidPick("invalid_pick", "; ".join(problems))

    # -- cmd ids ------------------------------------------------------------------------------
    def on_mailbox(self, sorter: str, epoch: int, highest_id: int) -> None:
        """A status read of ``sorter``: move its cmd id counter above the highest id the PLC
        knows (journaled). Runs inside the read, before any command can use the counter."""
        key = f"cmd:{sorter}"
        old = self._counters.get(key, 0)
        if highest_id <= old:
            return
        counters = {**self._counters, key: highest_id}
        now = self.clock()
        event = CmdIdsMoved(now, sorter, epoch, old, highest_id)
        # In memory even if the commit fails: every order commit carries all counters, so no
        # id drawn from the moved counter can reach the PLC before the move is on disk.
        self._counters = counters
        self.stats["cmd_ids_moved"] += 1
        log.warning(
            "sorter %s knows cmd ids up to %d (epoch %d), the journal's counter was %d: "
            "moved above it",
            sorter,
            highest_id,
            epoch,
            old,
        )
        try:
            self.journal.commit_orders(
                [], counters=counters, events=[EventRow(now, event.kind, event.as_dict())]
            )
        except Exception as exc:
            self.stats["journal_failed"] += 1
            log.error("could not journal the cmd id counter of %s: %s", sorter, exc)
        self.publish_bus([event])

    def renumber(self, order: Order, task: PickTask, floor: int) -> bool:
        """Give a task that was never sent a cmd id above ``floor`` (journaled with the order
        before it is sent). False if the journal refused it."""
        key = f"cmd:{task.sorter}"
        counters = dict(self._counters)
        counters[key] = new_id = max(counters.get(key, 0), floor) + 1
        old_id, task.cmd_id = task.cmd_id, new_id
        task.plc_epoch = self.execution.sorter_epoch(task.sorter)
        task.updated_ts = self.clock()
        try:
            self.journal.commit_orders([order.as_dict()], counters=counters)
        except Exception as exc:
            task.cmd_id = old_id
            self.stats["journal_failed"] += 1
            log.error("could not journal the new cmd id of order %s: %s", order.order_id, exc)
            return False
        self._counters = counters
        self.stats["renumbered"] += 1
        log.warning("order %s task %d: cmd %d is not above the PLC's ids; sent as cmd %d",
                    order.order_id, task.task_no, old_id, new_id)  # fmt: skip
        return True

    # -- pack / ship / cancel / resolve -------------------------------------------------------
    def pack(self, order_id: str, *, by: str) -> dict[str, Any]:
        order = self._any_order(order_id)
        return self._advance(order, OrderState.PACKED, by=by)

    def ship(self, order_id: str, *, by: str, carrier: str, tracking: str) -> dict[str, Any]:
        """PACKED → SHIPPED with the carrier and tracking number. Again with the same ones:
        the order unchanged (idempotent); with others: `PickConflict` ``already_shipped`` (a
        shipment's tracking number is never replaced silently)."""
        order = self._any_order(order_id)
        if order.state is OrderState.SHIPPED and (order.carrier, order.tracking) != (
            carrier,
            tracking,
        ):
            self.stats["conflict"] += 1
            raise PickConflict(
                "already_shipped",
                f"order {order_id} was shipped with carrier {order.carrier!r} tracking "
                f"{order.tracking!r}",
            )
        if order.state is OrderState.PACKED:
            order.carrier, order.tracking = carrier, tracking
        return self._advance(order, OrderState.SHIPPED, by=by)

    def cancel(self, order_id: str, *, by: str, reason: str | None = None) -> dict[str, Any]:
        """Cancel an open order none of whose commands was handed to a sorter yet (its belts
        are being started, or it waits for the executor): every task CANCELLED, the
        reservation released, journaled with an ``order_state`` event (bus, MQTT order topic).
        A cancelled order again: unchanged. `OrderNotFound`; `PickConflict`
        ``not_cancellable`` (a command was handed to the sorter, or the order is closed). Who
        may cancel which order is the caller's business (the API: a floor caller only its own)."""
        order = self._any_order(order_id)
        if order.state is OrderState.CANCELLED:  # repeated: idempotent
            return order.as_dict()
        now = self.clock()
        text = f"cancelled by {by}" + (f": {reason}" if reason else "")
        try:
            event = order.cancel(now, text, commands_sent=self.execution.commands_sent(order_id))
        except NotCancellable as exc:
            self.stats["cancel_refused"] += 1
            raise PickConflict(
                "not_cancellable", str(exc), extra={"state": order.state.value}
            ) from None
        for task in order.tasks:
            self._release(task)
        self.stats["orders_cancelled"] += 1
        log.info("order %s %s", order_id, text)
        self.store(order, [*(self.task_event(order, t) for t in order.tasks), event])
        return order.as_dict()

    def resolve(
        self, order_id: str, task_no: int, resolution: Resolution, *, by: str, reason: str
    ) -> dict[str, Any]:
        """A supervisor's finding for an UNKNOWN task (``resolution``: CONFIRMED, the units
        are in the pack station; FAILED, they are not), journaled with who, when and why (a
        ``pick_task`` event with ``by``). An EXCEPTION order whose tasks are then all CONFIRMED
        becomes SORTED. `OrderNotFound` (order or task); `PickConflict` ``task_not_unknown``."""
        order = self._any_order(order_id)
        task = next((t for t in order.tasks if t.task_no == task_no), None)
        if task is None:
            raise OrderNotFound("task_not_found", f"order {order_id} has no task {task_no}")
        try:
            events = order.resolve(task, resolution, self.clock(), by=by, reason=reason)
        except InvalidTransition:
            self.stats["resolve_refused"] += 1
            raise PickConflict(
                "task_not_unknown",
                f"task {task_no} of order {order_id} is {task.state.value}: only an UNKNOWN "
                "task can be resolved",
                extra={"state": task.state.value},
            ) from None
        self.stats[f"task_resolved_{resolution.value.lower()}"] += 1
        log.warning("order %s task %d: %s", order_id, task_no, task.reason)
        self.store(order, [task.event(order.order_id, by=by), *events])
        return order.as_dict()

    def _any_order(self, order_id: str) -> Order:
        order = self.orders.get(order_id) or self._closed.get(order_id)
        if order is not None:
            return order
        body = self.journal.order(order_id)
        if body is None:
            raise OrderNotFound("order_not_found", f"no order {order_id!r}")
        return Order.from_dict(body)

    def _advance(self, order: Order, new: OrderState, *, by: str) -> dict[str, Any]:
        if order.state is new:  # repeated confirmation: idempotent
            return order.as_dict()
        try:
            event = order.transition(new, self.clock(), reason=f"by {by}")
        except InvalidTransition as exc:
            raise PickConflict("invalid_transition", str(exc)) from None
        if new is OrderState.PACKED:
            order.packed_by = by
        else:
            order.shipped_by = by
        self.store(order, [event])
        return order.as_dict()

    # -- the executor's book ------------------------------------------------------------------
    def finish(self, task: PickTask, event: TaskEvent, reason: str | None) -> None:
        """Apply ``event`` (the pure task machine) and, when the task becomes final, release
        its reservation. `InvalidTransition` for a change the machine does not allow."""
        old = transition(task, event, self.clock(), reason)
        if old in FINAL_TASK_STATES or not task.final:
            return
        self._release(task)
        if reason is not None:
            log.warning("task %d (cmd %d, tote %d) %s: %s", task.task_no, task.cmd_id,
                        task.tote, task.state.value, reason)  # fmt: skip

    def _release(self, task: PickTask) -> None:
        """A task just became final: its units are no longer held for it."""
        held = self._reserved.get(task.shelf, 0) - task.qty
        if held > 0:
            self._reserved[task.shelf] = held
        else:
            self._reserved.pop(task.shelf, None)
        self.stats[f"task_{task.state.value.lower()}"] += 1

    def task_event(self, order: Order, task: PickTask) -> PickTaskChanged:
        """The task's ``pick_task`` event."""
        return task.event(order.order_id)

    def publish(self, events: list[BusEvent]) -> None:
        """Announce events that are not journaled (a task ACCEPTED: a restart asks the PLC)."""
        self.publish_bus(events)

    def close(self, order: Order, events: Sequence[BusEvent] = ()) -> None:
        """All tasks final: SORTED if every one was confirmed, else EXCEPTION (journaled
        together with ``events``, the last task's)."""
        if not order.tasks_final() or not order.open:
            if events:
                self.store(order, list(events))
            return
        now = self.clock()
        bad = [t for t in order.tasks if t.state is not TaskState.CONFIRMED]
        if bad:
            reason = "; ".join(f"task {t.task_no} {t.state.value}: {t.reason}" for t in bad)
            event = order.transition(OrderState.EXCEPTION, now, reason)
            self.stats["orders_exception"] += 1
            closing: list[BusEvent] = [event, OrderException.of(event)]
        else:
            closing = [order.transition(OrderState.SORTED, now)]
            self.stats["orders_sorted"] += 1
        self.store(order, [*events, *closing])

    def store(self, order: Order, events: list[BusEvent]) -> None:
        """Journal the order's new state with its events, then announce them. A journal
        failure is logged and the state kept in memory; the next store writes it again."""
        now = self.clock()
        try:
            self.journal.commit_orders(
                [order.as_dict()], events=[EventRow(now, e.kind, e.as_dict()) for e in events]
            )
        except Exception as exc:
            self.stats["journal_failed"] += 1
            log.error("could not journal order %s: %s", order.order_id, exc)
        if not order.open:
            self.orders.pop(order.order_id, None)
            self._closed[order.order_id] = order
            self._closed.move_to_end(order.order_id)
            while len(self._closed) > self.cfg.keep_closed_orders:
                self._closed.popitem(last=False)
        if any(isinstance(e, OrderStateChanged) for e in events):
            self._announce(order, events)  # bus + the order's MQTT topic
        else:
            self.publish_bus(events)

    def _announce(self, order: Order, events: list[BusEvent]) -> None:
        self.publish_bus(events)
        if self.publish_mqtt is not None:
            body = orjson.dumps(
                {
                    "order_id": order.order_id,
                    "external_id": order.external_id,
                    "channel": order.channel,
                    "state": order.state.value,
                    "reason": order.reason,
                    "ts": order.updated_ts,
                }
            )
            with contextlib.suppress(DeviceError):
                self.publish_mqtt(f"{self._prefix}/orders/{order.order_id}", body)

    def _publish_task(self, order: Order, task: PickTask) -> None:
        """Pick instruction for the zone's pickers (pick-to-light, handhelds, the simulator)."""
        if self.publish_mqtt is None:
            return
        body = orjson.dumps(
            {
                "order_id": order.order_id,
                "task_no": task.task_no,
                "shelf": task.shelf,
                "sku": task.sku,
                "qty": task.qty,
                "tote": task.tote,
                "pack_station": order.pack_station,
            }
        )
        with contextlib.suppress(DeviceError):
            self.publish_mqtt(f"{self._prefix}/picks/{task.zone}", body)

    # -- housekeeping -------------------------------------------------------------------------
    async def housekeeping(self) -> None:
        """Forget idempotency keys and external ids older than the TTL (memory and journal),
        and delete closed orders past ``keep_closed_days``."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            cutoff = self.clock() - self.cfg.idempotency_ttl_h * 3600
            self._keys = {k: r for k, r in self._keys.items() if r.created_ts >= cutoff}
            live = {o.order_id for o in self.orders.values()}
            self._externals = {
                k: oid
                for k, oid in self._externals.items()
                if oid in live or self._updated_after(oid, cutoff)
            }
            try:
                self.journal.trim_idempotency(cutoff)
                dropped = self.journal.trim_orders(self.clock() - self.cfg.keep_closed_days * 86400)
                if dropped:
                    log.info("deleted %d closed order(s) past their retention", dropped)
            except Exception as exc:
                log.error("order housekeeping failed: %s", exc)

    def _updated_after(self, order_id: str, cutoff: float) -> bool:
        order = self._closed.get(order_id)
        return order is not None and order.updated_ts >= cutoff
