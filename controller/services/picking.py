"""Picking: pick requests become orders, orders drive conveyors and sorters, scales confirm.

`PickingService.submit` is synchronous and does no I/O but one journal commit, so concurrent
requests are serialised by the event loop: the idempotency check, the (channel, external id)
check, validation, allocation (`controller.domain.routing`), the reservation and the journal
commit of the order — with every task's sorter cmd_id — happen with no await in between. A
duplicate request therefore always sees the first one's journaled result, and a cmd_id is in
the journal before it can reach a PLC.

Execution (`PickingService.run`) then, per order: makes sure the route's conveyors run, hands
each task (one tote) to the sorter (`SorterDriver.send`: exactly once per cmd_id, never a
blind re-send), and waits for two confirmations per task — the sorter's result (DIVERTED into
the pack station's lane) and the shelf's scale showing the units gone. Both → CONFIRMED; all
tasks confirmed → the order is SORTED; anything else → EXCEPTION with the reason, and the
reservation is released.

Sorter cmd ids come from a journaled counter per sorter. The PLC may know higher ids (a journal
restored from a backup, a replaced controller host, a mailbox written by hand): every status
read of a sorter reports the highest id it knows (`SorterDriver.add_mailbox_listener`; always
on connect, so also after a PLC restart) and the counter is moved above it and journaled
before a pick can draw an id from it; picks to a sorter whose mailbox has not been read on its
current connection are refused like a sorter that is down. A task whose id the PLC overtook
between allocation and sending (nothing was written) gets a new id, journaled, once.

After a restart, open orders are reloaded and every unfinished command is reconciled with its
sorter (`SorterDriver.lookup`): DONE and PENDING continue; a command the PLC never saw in the
same PLC epoch is sent again with the same cmd_id; anything that cannot be known (PLC
restarted, no longer in its completion ring) is UNKNOWN — shown, never guessed or replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from controller.config import SiteConfig
from controller.domain.model import ShelfSpec, ShelfStatus
from controller.domain.orders import (
    FINAL_TASK_STATES,
    InvalidTransition,
    NotCancellable,
    Order,
    OrderState,
    PickTask,
    PlcKnows,
    Resolution,
    TaskEvent,
    TaskState,
    body_digest,
    reconcile_event,
    transition,
)
from controller.domain.routing import (
    AllocationError,
    Station,
    StockSource,
    Topology,
    ZoneRoute,
    plan,
)
from controller.domain.stock import ShelfState
from controller.ports import DuplicateOrder, EventRow, IdempotencyRow, OrderJournalPort
from devices.conveyor import ConveyorDriver
from devices.errors import (
    CommandOutcomeUnknown,
    CommandRefused,
    DeviceError,
    ResultTimeout,
)
from devices.link.state import LinkState
from devices.sorter import CmdIdBelowPlc, CommandState, SorterDriver, SortResult

log = logging.getLogger("floorhand.picking")

_PLC_KNOWS = {
    CommandState.NOT_SEEN: PlcKnows.NOT_SEEN,
    CommandState.PENDING: PlcKnows.PENDING,
    CommandState.DONE: PlcKnows.DONE,
    CommandState.UNKNOWN: PlcKnows.UNKNOWN,
}
"""The sorter driver's lookup answer in the domain's terms (reconcile_event)."""

__all__ = ["PickError", "PickRequest", "PickingService", "Submitted"]

HOUSEKEEPING_S = 600.0
"""How often expired idempotency keys are forgotten."""
BELT_FRESH_S = 0.5
"""A belt (conveyor, sorter) seen running this recently is not read again before a pick."""
DEVICES_FIRST_CHANCE_S = 5.0
"""At start-up, pick requests (MQTT commands queued in the broker session while the controller
was down, HTTP requests) wait at most this long for every conveyor and sorter link to have had
its first chance to connect (up with its map read, or a first attempt failed), so they are not
refused as "device unavailable" while the links are still connecting."""
RECONCILE_WAIT_S = 30.0
"""How long restart reconciliation waits for a sorter's link; a command it still cannot
decide then is UNKNOWN (visible in the order, for a person to resolve)."""


class PickError(Exception):
    """A request that cannot be served: ``status`` is the HTTP status the API answers with."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        extra: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra or {}
        self.retry_after_s = retry_after_s


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
    """The answer to a submission: 201 with the new order, or 200 for a replay (the same key
    with the same body, or the same caller's (channel, external id) with the same lines), with
    the order as it stands now."""

    status: int  # 201 created, 200 replayed
    order: dict[str, Any]
    replayed: bool


def topology(site: SiteConfig) -> Topology:
    return Topology(
        zones={z.id: ZoneRoute(tuple(z.conveyors), z.sorter) for z in site.zones},
        stations={p.id: Station(p.sorter, p.lane) for p in site.pack_stations},
    )


class PickingService:
    def __init__(
        self,
        site: SiteConfig,
        journal: OrderJournalPort,
        shelf_states: Mapping[str, ShelfState],
        specs: Mapping[str, ShelfSpec],
        *,
        conveyors: Mapping[str, ConveyorDriver],
        sorters: Mapping[str, SorterDriver],
        publish_bus: Callable[[list[dict[str, Any]]], None],
        publish_mqtt: Callable[[str, bytes], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.site = site
        self.cfg = site.picking
        self.journal = journal
        self.states = shelf_states
        self.specs = specs
        self.conveyors = dict(conveyors)
        self.sorters = dict(sorters)
        self.publish_bus = publish_bus
        self.publish_mqtt = publish_mqtt
        self.clock = clock
        self.topology = topology(site)
        self.skus = {s.id for s in site.skus}
        self._shelves_of: dict[str, list[ShelfSpec]] = defaultdict(list)
        for spec in specs.values():
            self._shelves_of[spec.sku].append(spec)
        self._prefix = f"{site.mqtt.topic_prefix}/{site.site.id}"
        self.orders: dict[str, Order] = {}  # open orders
        self._closed: OrderedDict[str, Order] = OrderedDict()
        self._reserved: dict[str, int] = defaultdict(int)  # shelf -> units held by open tasks
        self._waiting: dict[str, list[tuple[PickTask, asyncio.Event]]] = defaultdict(list)
        self._counters: dict[str, int] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()  # orders submitted before run()
        self._tg: asyncio.TaskGroup | None = None
        # Idempotency keys and (channel, external id) → order id of the last TTL, so a
        # submission reads no table; older ones: the journal's unique index (DuplicateOrder).
        self._keys: dict[str, IdempotencyRow] = {}
        self._externals: dict[tuple[str, str], str] = {}
        self._sent: set[str] = set()
        """Open orders a command of which was handed to a sorter (or may have been: every
        order reloaded at start): no longer cancellable."""
        self._belt_ok: dict[str, float] = {}
        self._belt_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.stats: dict[str, int] = defaultdict(int)
        self.devices_settled = asyncio.Event()
        """Set once every PLC link had its first chance to connect, or after
        ``DEVICES_FIRST_CHANCE_S`` (`run`); set from the start without PLCs."""
        self._device_changed = asyncio.Event()
        self._settled_listeners: list[Callable[[], None]] = []
        for name, driver in self.sorters.items():
            driver.add_mailbox_listener(self._mailbox_listener(name))
        for plc in (*self.sorters.values(), *self.conveyors.values()):
            plc.link.watch.add_listener(lambda old, new: self._device_changed.set())
        if not self.sorters and not self.conveyors:
            self.devices_settled.set()

    # -- restore -------------------------------------------------------------------------------
    def restore(self) -> list[Order]:
        """Load counters and open orders from the journal; rebuild reservations. Returns the
        open orders (to reconcile once `run` starts)."""
        self._counters = dict(self.journal.counters())
        since = self.clock() - self.cfg.idempotency_ttl_h * 3600
        self._keys = {row.key: row for row in self.journal.idempotency_since(since)}
        self._externals = {(c, e): o for c, e, o in self.journal.externals_since(since)}
        opened = [Order.from_dict(d) for d in self.journal.open_orders()]
        for order in opened:
            self.orders[order.order_id] = order
            self._sent.add(order.order_id)
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
        """Validate, allocate, reserve and journal an order (no await: see the module doc).

        Raises `PickError` (422 invalid / key reused with another body or by another caller,
        409 no stock or a conflicting order, 503 a device on the route is down or the journal
        failed). No answer carries anything of another caller's order."""
        digest = req.digest()
        if key is not None:
            row = self._keys.get(key)  # every key younger than the TTL is in memory
            if row is not None:
                if row.digest != digest or row.principal != principal:
                    self.stats["idempotency_mismatch"] += 1
                    raise PickError(
                        422,
                        "idempotency_key_reused",
                        f"Idempotency-Key {key!r} was used for a different request",
                        extra={"order_id": row.order_id} if row.principal == principal else None,
                    )
                self.stats["replayed"] += 1
                return Submitted(200, self._original(row.order_id), True)
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
            raise PickError(
                422 if unknown else 409,
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
        self._require_devices({p.sorter for p in plans}, {c for p in plans for c in p.conveyors})
        counters = dict(self._counters)
        order_no = counters.get("order", 0) + 1
        counters["order"] = order_no
        order = Order(
            order_id=f"{self.site.site.id}-{order_no:08d}",
            channel=req.channel,
            external_id=req.external_id,
            pack_station=req.pack_station,
            lines=list(req.lines),
            created_ts=now,
            principal=principal,
        )
        events = [order.transition(OrderState.VALIDATED, now)]
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
                    plc_epoch=self.sorters[p.sorter].epoch,
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
                events=[EventRow(now, "order_state", e) for e in events],
            )
        except DuplicateOrder:
            # Older than the in-memory window: the journal's unique index caught it.
            existing = self.journal.order_by_external(req.channel, req.external_id)
            if existing is None:
                raise PickError(503, "journal_unavailable", "order lookup failed") from None
            self._externals[(req.channel, req.external_id)] = existing["order_id"]
            return self._same_order(req, existing, principal)
        except Exception as exc:
            self.stats["journal_failed"] += 1
            log.error("could not journal order %s: %s", order.order_id, exc)
            raise PickError(503, "journal_unavailable", f"order not stored: {exc}") from exc
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
        if self._tg is not None:
            self._tg.create_task(self._execute(order), name=f"order:{order.order_id}")
        else:
            self._queue.put_nowait(order.order_id)
        asyncio.get_running_loop().call_soon(self._announce_new, order, events)
        return Submitted(201, body, False)

    def _announce_new(self, order: Order, events: list[dict[str, Any]]) -> None:
        self._announce(order, events)
        for task in order.tasks:
            self._publish_task(order, task)

    def _same_order(self, req: PickRequest, existing: dict[str, Any], principal: str) -> Submitted:
        """A request for an order that exists: the same order (replay) if the same caller sent
        it with the same lines and pack station, else 409. Another caller's order is never
        shown, not even its id: the (channel, order id) is taken, nothing more."""
        if existing.get("principal") != principal:
            self.stats["conflict"] += 1
            raise PickError(
                409,
                "order_exists",
                f"order {req.external_id!r} from channel {req.channel!r} was submitted by "
                "another caller",
            )
        same = [[s, q] for s, q in req.lines] == [list(x) for x in existing["lines"]] and (
            req.pack_station == existing["pack_station"]
        )
        if not same:
            self.stats["conflict"] += 1
            raise PickError(
                409,
                "order_exists",
                f"order {req.external_id!r} from channel {req.channel!r} exists with "
                "different lines or pack station",
                extra={"order_id": existing["order_id"]},
            )
        self.stats["deduplicated"] += 1
        return Submitted(200, existing, True)

    def _original(self, order_id: str) -> dict[str, Any]:
        """The order as it stands (a replay answers with the order's current state)."""
        body = self.get(order_id)
        if body is None:  # the key outlived its order: should not happen
            raise PickError(500, "order_missing", f"order {order_id} is not in the journal")
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
            raise PickError(422, "invalid_pick", "; ".join(problems))

    def _require_devices(self, sorters: set[str], conveyors: set[str]) -> None:
        # A sorter counts as down until its mailbox was read on the current connection: only
        # then is the cmd id counter known to be above the PLC's ack_id (_on_mailbox).
        down = [
            *(s for s in sorted(sorters) if not self.sorters[s].mailbox_known),
            *(c for c in sorted(conveyors) if self.conveyors[c].link.state is not LinkState.UP),
        ]
        if down:
            self.stats["device_unavailable"] += 1
            raise PickError(
                503,
                "device_unavailable",
                f"device(s) on the route are not reachable: {', '.join(down)}",
                extra={"devices": down},
                retry_after_s=2.0,
            )

    # -- cmd ids ------------------------------------------------------------------------------
    def _mailbox_listener(self, sorter: str) -> Callable[[int, int], None]:
        def on_mailbox(epoch: int, highest_id: int) -> None:
            self._on_mailbox(sorter, epoch, highest_id)

        return on_mailbox

    def _on_mailbox(self, sorter: str, epoch: int, highest_id: int) -> None:
        """A status read of ``sorter``: move its cmd id counter above the highest id the PLC
        knows (journaled). Runs inside the read, before any command can use the counter."""
        self._device_changed.set()
        key = f"cmd:{sorter}"
        old = self._counters.get(key, 0)
        if highest_id <= old:
            return
        counters = {**self._counters, key: highest_id}
        now = self.clock()
        body = {
            "kind": "cmd_ids_moved",
            "ts": now,
            "sorter": sorter,
            "epoch": epoch,
            "old": old,
            "new": highest_id,
        }
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
                [], counters=counters, events=[EventRow(now, "cmd_ids_moved", body)]
            )
        except Exception as exc:
            self.stats["journal_failed"] += 1
            log.error("could not journal the cmd id counter of %s: %s", sorter, exc)
        self.publish_bus([body])

    def _renumber(self, order: Order, task: PickTask, floor: int) -> bool:
        """Give a task that was never sent a cmd id above ``floor`` (journaled with the order
        before it is sent). False if the journal refused it."""
        key = f"cmd:{task.sorter}"
        counters = dict(self._counters)
        counters[key] = new_id = max(counters.get(key, 0), floor) + 1
        old_id, task.cmd_id = task.cmd_id, new_id
        task.plc_epoch = self.sorters[task.sorter].epoch
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

    def on_command(self, payload: bytes) -> tuple[int, dict[str, Any]]:
        """A pick request from the MQTT command topic (docs/picking.md): the same body as the
        API plus optional ``channel`` and ``idempotency_key``. Returns (status, reply body);
        never raises. Access control is the broker's ACL on the command topic."""
        try:
            body = orjson.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("the payload is not a JSON object")
            lines = body.get("lines")
            if not isinstance(lines, list):
                raise ValueError("lines must be a list of {sku, qty}")
            parsed: list[tuple[str, int]] = []
            for i, line in enumerate(lines):
                if not isinstance(line, dict):
                    raise ValueError(f"lines[{i}] is not an object")
                sku, qty = line.get("sku"), line.get("qty")
                if not isinstance(sku, str) or type(qty) is not int:
                    raise ValueError(f"lines[{i}] needs a string sku and an integer qty")
                parsed.append((sku, qty))
            order_id, station = body.get("order_id"), body.get("pack_station")
            channel = body.get("channel", "mqtt")
            key = body.get("idempotency_key")
            if not isinstance(order_id, str) or not isinstance(station, str):
                raise ValueError("order_id and pack_station must be strings")
            if not isinstance(channel, str) or not channel or len(channel) > 64:
                raise ValueError("channel must be a non-empty string (at most 64 characters)")
            if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 255):
                raise ValueError("idempotency_key must be a string of 1..255 characters")
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            self.stats["invalid"] += 1
            return 400, {"code": "bad_command", "detail": str(exc)}
        req = PickRequest(order_id, tuple(parsed), station, channel)
        try:
            done = self.submit(req, key=key, principal=f"mqtt:{channel}")
        except PickError as exc:
            return exc.status, {
                "order_id": order_id,
                "code": exc.code,
                "detail": exc.detail,
                **exc.extra,
            }
        return done.status, {"order_id": order_id, "order": done.order, "replayed": done.replayed}

    # -- pack / ship ----------------------------------------------------------------------
    def pack(self, order_id: str, *, by: str) -> dict[str, Any]:
        order = self._closed_order(order_id)
        return self._advance(order, OrderState.PACKED, by=by)

    def ship(self, order_id: str, *, by: str, carrier: str, tracking: str) -> dict[str, Any]:
        """PACKED → SHIPPED with the carrier and tracking number. Again with the same ones:
        the order unchanged (idempotent); with others: 409 ``already_shipped`` (a shipment's
        tracking number is never replaced silently)."""
        order = self._closed_order(order_id)
        if order.state is OrderState.SHIPPED and (order.carrier, order.tracking) != (
            carrier,
            tracking,
        ):
            self.stats["conflict"] += 1
            raise PickError(
                409,
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
        A cancelled order again: unchanged. `PickError` 404 unknown, 409 ``not_cancellable``
        (a command was handed to the sorter, or the order is closed). Who may cancel which
        order is the caller's business (the API: a floor caller only its own)."""
        order = self._closed_order(order_id)
        if order.state is OrderState.CANCELLED:  # repeated: idempotent
            return order.as_dict()
        now = self.clock()
        text = f"cancelled by {by}" + (f": {reason}" if reason else "")
        try:
            event = order.cancel(now, text, commands_sent=order_id in self._sent)
        except NotCancellable as exc:
            self.stats["cancel_refused"] += 1
            raise PickError(
                409, "not_cancellable", str(exc), extra={"state": order.state.value}
            ) from None
        for task in order.tasks:
            self._release(task)
        self.stats["orders_cancelled"] += 1
        log.info("order %s %s", order_id, text)
        self._store(order, [*(self._task_event(order, t) for t in order.tasks), event])
        return order.as_dict()

    def resolve(
        self, order_id: str, task_no: int, resolution: Resolution, *, by: str, reason: str
    ) -> dict[str, Any]:
        """A supervisor's finding for an UNKNOWN task (``resolution``: CONFIRMED, the units
        are in the pack station; FAILED, they are not), journaled with who, when and why (a
        ``pick_task`` event with ``by``). An EXCEPTION order whose tasks are then all CONFIRMED
        becomes SORTED. `PickError` 404 unknown order or task, 409 ``task_not_unknown``."""
        order = self._closed_order(order_id)
        task = next((t for t in order.tasks if t.task_no == task_no), None)
        if task is None:
            raise PickError(404, "task_not_found", f"order {order_id} has no task {task_no}")
        try:
            events = order.resolve(task, resolution, self.clock(), by=by, reason=reason)
        except InvalidTransition:
            self.stats["resolve_refused"] += 1
            raise PickError(
                409,
                "task_not_unknown",
                f"task {task_no} of order {order_id} is {task.state.value}: only an UNKNOWN "
                "task can be resolved",
                extra={"state": task.state.value},
            ) from None
        self.stats[f"task_resolved_{resolution.value.lower()}"] += 1
        log.warning("order %s task %d: %s", order_id, task_no, task.reason)
        self._store(order, [{**self._task_event(order, task), "by": by}, *events])
        return order.as_dict()

    def _closed_order(self, order_id: str) -> Order:
        order = self.orders.get(order_id) or self._closed.get(order_id)
        if order is not None:
            return order
        body = self.journal.order(order_id)
        if body is None:
            raise PickError(404, "order_not_found", f"no order {order_id!r}")
        return Order.from_dict(body)

    def _advance(self, order: Order, new: OrderState, *, by: str) -> dict[str, Any]:
        if order.state is new:  # repeated confirmation: idempotent
            return order.as_dict()
        try:
            event = order.transition(new, self.clock(), reason=f"by {by}")
        except InvalidTransition as exc:
            raise PickError(409, "invalid_transition", str(exc)) from None
        if new is OrderState.PACKED:
            order.packed_by = by
        else:
            order.shipped_by = by
        self._store(order, [event])
        return order.as_dict()

    # -- events ---------------------------------------------------------------------------
    def on_events(self, events: list[dict[str, Any]]) -> None:
        """Bus listener: a shelf's count fell → confirm waiting tasks on that shelf."""
        for ev in events:
            if ev.get("kind") != "stock_changed":
                continue
            waiting = self._waiting.get(ev["shelf_id"])
            if not waiting:
                continue
            units = ev["new_units"]
            for task, done in waiting:
                if units <= task.target_count:
                    done.set()

    def _announce(self, order: Order, events: list[dict[str, Any]]) -> None:
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

    def _store(self, order: Order, events: list[dict[str, Any]]) -> None:
        """Journal the order's new state with its events, then announce them. A journal
        failure is logged and the state kept in memory; the next store writes it again."""
        now = self.clock()
        try:
            self.journal.commit_orders(
                [order.as_dict()], events=[EventRow(now, e["kind"], e) for e in events]
            )
        except Exception as exc:
            self.stats["journal_failed"] += 1
            log.error("could not journal order %s: %s", order.order_id, exc)
        if not order.open:
            self.orders.pop(order.order_id, None)
            self._sent.discard(order.order_id)
            self._closed[order.order_id] = order
            self._closed.move_to_end(order.order_id)
            while len(self._closed) > self.cfg.keep_closed_orders:
                self._closed.popitem(last=False)
        if any(e["kind"] == "order_state" for e in events):
            self._announce(order, events)  # bus + the order's MQTT topic
        else:
            self.publish_bus(events)

    # -- start-up -------------------------------------------------------------------------
    def _first_chance_over(self) -> bool:
        """Every PLC link is usable for picks (sorters: map read on this connection) or has
        failed a connection attempt."""
        sorters_done = all(
            d.mailbox_known or d.link.last_down_reason is not None for d in self.sorters.values()
        )
        return sorters_done and all(
            d.link.state is LinkState.UP or d.link.last_down_reason is not None
            for d in self.conveyors.values()
        )

    async def _settle_devices(self) -> None:
        """Set `devices_settled` once every PLC link had its first chance to connect, at the
        latest after ``DEVICES_FIRST_CHANCE_S``."""
        try:
            async with asyncio.timeout(DEVICES_FIRST_CHANCE_S):
                while not self._first_chance_over():
                    self._device_changed.clear()
                    await self._device_changed.wait()
        except TimeoutError:
            log.warning(
                "PLC links still connecting after %.0f s: pick requests are answered now",
                DEVICES_FIRST_CHANCE_S,
            )
        self.devices_settled.set()
        for callback in tuple(self._settled_listeners):
            try:
                callback()
            except Exception:
                log.exception("devices-settled listener %r failed", callback)

    def add_settled_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when `devices_settled` is set by `run` (not if it was set from
        the start: a site without PLCs)."""
        self._settled_listeners.append(callback)

    async def wait_devices_settled(self) -> None:
        """Return once `devices_settled` (at once after start-up): a pick request that
        arrives while the PLC links are still making their first connection waits for them
        (bounded by ``DEVICES_FIRST_CHANCE_S``), then is served as usual."""
        if not self.devices_settled.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DEVICES_FIRST_CHANCE_S):
                    await self.devices_settled.wait()

    # -- execution ------------------------------------------------------------------------
    async def run(self, reconcile: Sequence[Order] = ()) -> None:
        """Execute orders: the reconciled ones, then each new one as it is submitted."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if not self.devices_settled.is_set():
                    tg.create_task(self._settle_devices(), name="picking-settle")
                tg.create_task(self._housekeeping(), name="picking-housekeeping")
                for old in reconcile:
                    tg.create_task(self._execute(old, reconcile=True), name=f"order:{old.order_id}")
                while True:  # orders submitted before the group existed
                    order_id = await self._queue.get()
                    new = self.orders.get(order_id)
                    if new is not None:
                        tg.create_task(self._execute(new), name=f"order:{order_id}")
        finally:
            self._tg = None

    async def _housekeeping(self) -> None:
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

    async def _execute(self, order: Order, *, reconcile: bool = False) -> None:
        try:
            await self._execute_tasks(order, reconcile)
        except Exception as exc:  # a bug must not take the controller down
            log.exception("order %s: execution failed", order.order_id)
            for task in order.tasks:
                if not task.final:
                    self._finish(task, TaskEvent.FAILED, f"internal error: {exc}")
        self._close(order)

    async def _execute_tasks(self, order: Order, reconcile: bool) -> None:
        open_tasks = [t for t in order.tasks if not t.final]
        if reconcile:
            for task in open_tasks:
                await self._reconcile(order, task)
        moving = [t for t in open_tasks if t.state in (TaskState.DISPATCHED, TaskState.ACCEPTED)]
        if moving:
            belts = {c for t in moving for c in t.conveyors} | {t.sorter for t in moving}
            failure = await self._start_belts(belts)
            if order.state is OrderState.CANCELLED:  # cancelled while the belts started
                return
            if failure is not None:
                for task in moving:
                    if task.state is TaskState.DISPATCHED:  # never sent: certainly not executed
                        self._finish(task, TaskEvent.FAILED, failure)
        waits = []
        for task in open_tasks:
            if task.final:
                self._store(order, [self._task_event(order, task)])
                continue
            done = asyncio.Event()
            shelf = self.states.get(task.shelf)
            if task.scale_confirmed or (
                shelf is not None and shelf.units is not None and shelf.units <= task.target_count
            ):
                done.set()
            else:
                self._waiting[task.shelf].append((task, done))
            if task.state is TaskState.DISPATCHED:
                self._sent.add(order.order_id)  # from here on the order cannot be cancelled
                await self._send(order, task)
            waits.append(self._await_task(order, task, done))
        await asyncio.gather(*waits)

    async def _start_belts(self, names: set[str]) -> str | None:
        """Start every belt of the route (conveyors, then the sorter) not known to be running;
        the reason of the first that cannot be started, else None."""
        for name in sorted(names, key=lambda n: (n in self.sorters, n)):
            driver: ConveyorDriver | SorterDriver = self.conveyors.get(name) or self.sorters[name]
            async with self._belt_locks[name]:
                if time.monotonic() - self._belt_ok.get(name, -1e9) < BELT_FRESH_S:
                    continue
                try:
                    status = await driver.status()
                    if not status.running:
                        await driver.start()  # retries a stale-heartbeat refusal
                except DeviceError as exc:
                    self._belt_ok.pop(name, None)
                    self.stats["belt_start_failed"] += 1
                    log.error("%s %s could not be started: %s", driver.KIND, name, exc)
                    return f"{driver.KIND} {name}: {exc}"
                self._belt_ok[name] = time.monotonic()
        return None

    async def _send(self, order: Order, task: PickTask) -> None:
        driver = self.sorters[task.sorter]
        try:
            try:
                await driver.send(task.cmd_id, task.tote, task.lane)
            except CmdIdBelowPlc as exc:
                # Nothing was written: the PLC's ids moved past this one after it was drawn.
                if not self._renumber(order, task, exc.floor):
                    raise
                await driver.send(task.cmd_id, task.tote, task.lane)
        except CommandOutcomeUnknown as exc:
            self._finish(task, TaskEvent.LOST, str(exc))
            return
        except (CommandRefused, DeviceError, ValueError) as exc:
            self._finish(task, TaskEvent.FAILED, f"sorter {task.sorter}: {exc}")
            return
        transition(task, TaskEvent.ACCEPTED, self.clock())
        task.plc_epoch = driver.epoch
        # Not journaled: a restart reconciles a DISPATCHED command the same way (the PLC
        # knows whether it accepted it; see _reconcile).
        self.publish_bus([self._task_event(order, task)])

    async def _reconcile(self, order: Order, task: PickTask) -> None:
        """Decide a command journaled before a restart (module doc)."""
        if task.state not in (TaskState.DISPATCHED, TaskState.ACCEPTED):
            return
        driver = self.sorters.get(task.sorter)
        if driver is None:
            self._finish(task, TaskEvent.LOST, f"sorter {task.sorter} is no longer configured")
            return
        try:
            await driver.link.wait_up(RECONCILE_WAIT_S)
            found = await driver.lookup(task.cmd_id)
        except (DeviceError, TimeoutError) as exc:
            self._finish(task, TaskEvent.LOST, f"sorter {task.sorter} unreachable: {exc}")
            return
        self.stats["reconciled"] += 1
        event = reconcile_event(
            task.state,
            task.plc_epoch,
            _PLC_KNOWS[found.state],
            found.epoch,
            found.result is SortResult.DIVERTED,
        )
        if event is None:
            # Never reached the PLC: stays DISPATCHED and is sent (same cmd_id) by the caller.
            log.info("order %s task %d: cmd %d never reached the PLC", order.order_id,
                     task.task_no, task.cmd_id)  # fmt: skip
        elif event is TaskEvent.LOST:
            self._finish(
                task,
                event,
                f"cmd {task.cmd_id}: sorter {task.sorter} says {found.state.value} "
                f"(epoch {found.epoch}, sent in epoch {task.plc_epoch})",
            )
        elif event is TaskEvent.ACCEPTED:
            transition(task, event, self.clock())
        else:
            self._on_result(task, found.result)

    async def _await_task(self, order: Order, task: PickTask, done: asyncio.Event) -> None:
        try:
            if task.state is TaskState.ACCEPTED:
                await self._await_result(task)
                if not task.final:
                    self._store(order, [self._task_event(order, task)])
            if task.state is TaskState.DIVERTED:
                deadline = task.updated_ts + self.cfg.scale_timeout_s
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
                # that races the event, and a stop must always end this task.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - self.clock())):
                        await done.wait()
                if done.is_set():
                    task.scale_confirmed = True
                    self._finish(task, TaskEvent.SCALE_CONFIRMED, None)
                else:
                    state = self.states.get(task.shelf)
                    now_units = state.units if state is not None else None
                    picked = None
                    if now_units is not None:
                        picked = max(0, task.target_count + task.qty - now_units)
                    task.picked_qty = picked
                    self._finish(
                        task,
                        TaskEvent.SCALE_TIMEOUT,
                        f"shelf {task.shelf} shows {picked} of {task.qty} unit(s) picked after "
                        f"{self.cfg.scale_timeout_s:g} s",
                    )
        finally:
            with contextlib.suppress(ValueError):
                self._waiting[task.shelf].remove((task, done))
            if not self._waiting[task.shelf]:
                self._waiting.pop(task.shelf, None)
        if order.tasks_final():
            self._close(order, [self._task_event(order, task)])  # one commit for both
        else:
            self._store(order, [self._task_event(order, task)])

    async def _await_result(self, task: PickTask) -> None:
        driver = self.sorters[task.sorter]
        try:
            outcome = await driver.wait_result(task.cmd_id, timeout_s=self.cfg.result_timeout_s)
        except ResultTimeout as exc:
            self._finish(task, TaskEvent.FAILED, str(exc))
            return
        except CommandOutcomeUnknown as exc:
            self._finish(task, TaskEvent.LOST, str(exc))
            return
        except DeviceError as exc:
            self._finish(task, TaskEvent.LOST, f"sorter {task.sorter}: {exc}")
            return
        self._on_result(task, outcome.result)

    def _on_result(self, task: PickTask, result: SortResult | None) -> None:
        task.result = result.value if result is not None else None
        if result is SortResult.DIVERTED:
            transition(task, TaskEvent.DIVERTED, self.clock())
        else:
            self._finish(
                task,
                TaskEvent.NOT_DIVERTED,
                f"sorter {task.sorter}: tote {task.tote} {task.result}",
            )

    def _finish(self, task: PickTask, event: TaskEvent, reason: str | None) -> None:
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

    def _task_event(self, order: Order, task: PickTask) -> dict[str, Any]:
        return {
            "kind": "pick_task",
            "ts": task.updated_ts,
            "order_id": order.order_id,
            "task_no": task.task_no,
            "sku": task.sku,
            "qty": task.qty,
            "shelf": task.shelf,
            "sorter": task.sorter,
            "cmd_id": task.cmd_id,
            "tote": task.tote,
            "state": task.state.value,
            "result": task.result,
            "reason": task.reason,
        }

    def _close(self, order: Order, events: Sequence[dict[str, Any]] = ()) -> None:
        """All tasks final: SORTED if every one was confirmed, else EXCEPTION (journaled
        together with ``events``, the last task's)."""
        if not order.tasks_final() or not order.open:
            if events:
                self._store(order, list(events))
            return
        now = self.clock()
        bad = [t for t in order.tasks if t.state is not TaskState.CONFIRMED]
        if bad:
            reason = "; ".join(f"task {t.task_no} {t.state.value}: {t.reason}" for t in bad)
            event = order.transition(OrderState.EXCEPTION, now, reason)
            self.stats["orders_exception"] += 1
            closing = [event, {**event, "kind": "order_exception"}]
        else:
            closing = [order.transition(OrderState.SORTED, now)]
            self.stats["orders_sorted"] += 1
        self._store(order, [*events, *closing])
