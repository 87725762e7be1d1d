"""Orders and pick tasks: the state machines, pure (no I/O, no clock: times are parameters).

An order is one pick request from a floor system: lines (sku, qty) for a pack station. It is
allocated to shelves (`controller.domain.routing`), split into pick tasks (one tote each: a
shelf, a quantity, a sorter command), and followed to the pack station:

    RECEIVED → VALIDATED → ALLOCATED → PICKING → SORTED → PACKED → SHIPPED
                      └──────────┴──────────┴─────────┴──→ EXCEPTION

A task is DISPATCHED once its sorter command id is journaled, ACCEPTED when the PLC took the
command, DIVERTED when the sorter reports the tote in the pack station's lane, and CONFIRMED
when, in addition, the shelf's scale shows the quantity gone. Anything else ends in SHORT
(the scale did not show the quantity), FAILED (jam, refused, device down, recirculated,
rejected) or UNKNOWN (the outcome of a sorter command cannot be known after a restart — shown
to people, never guessed).
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FINAL_TASK_STATES",
    "OPEN_ORDER_STATES",
    "InvalidTransition",
    "Order",
    "OrderState",
    "PickTask",
    "TaskState",
    "body_digest",
]


class OrderState(enum.StrEnum):
    RECEIVED = "RECEIVED"
    VALIDATED = "VALIDATED"
    ALLOCATED = "ALLOCATED"
    PICKING = "PICKING"
    SORTED = "SORTED"
    PACKED = "PACKED"
    SHIPPED = "SHIPPED"
    EXCEPTION = "EXCEPTION"


_NEXT: dict[OrderState, frozenset[OrderState]] = {
    OrderState.RECEIVED: frozenset({OrderState.VALIDATED, OrderState.EXCEPTION}),
    OrderState.VALIDATED: frozenset({OrderState.ALLOCATED, OrderState.EXCEPTION}),
    OrderState.ALLOCATED: frozenset({OrderState.PICKING, OrderState.EXCEPTION}),
    OrderState.PICKING: frozenset({OrderState.SORTED, OrderState.EXCEPTION}),
    OrderState.SORTED: frozenset({OrderState.PACKED, OrderState.EXCEPTION}),
    OrderState.PACKED: frozenset({OrderState.SHIPPED, OrderState.EXCEPTION}),
    OrderState.SHIPPED: frozenset(),
    OrderState.EXCEPTION: frozenset(),
}

OPEN_ORDER_STATES = frozenset(
    {OrderState.RECEIVED, OrderState.VALIDATED, OrderState.ALLOCATED, OrderState.PICKING}
)
"""States in which an order still holds reservations and may drive devices."""


class TaskState(enum.StrEnum):
    DISPATCHED = "DISPATCHED"
    ACCEPTED = "ACCEPTED"
    DIVERTED = "DIVERTED"
    CONFIRMED = "CONFIRMED"
    SHORT = "SHORT"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"


FINAL_TASK_STATES = frozenset(
    {TaskState.CONFIRMED, TaskState.SHORT, TaskState.FAILED, TaskState.UNKNOWN}
)


class InvalidTransition(ValueError):
    """An order state change the lifecycle does not allow (e.g. SHIPPED before PACKED)."""


def body_digest(body: Any) -> str:
    """A stable digest of a request body (key order does not matter)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(slots=True)
class PickTask:
    """One tote: ``qty`` units of ``sku`` from ``shelf`` to ``lane`` of ``sorter``."""

    task_no: int
    line_no: int
    sku: str
    qty: int
    shelf: str
    zone: str
    conveyors: tuple[str, ...]
    sorter: str
    lane: int
    tote: int
    cmd_id: int
    target_count: int
    """The shelf count at or below which the scale confirms this task (count at allocation
    minus every earlier open task on the shelf minus ``qty``)."""
    state: TaskState = TaskState.DISPATCHED
    result: str | None = None
    reason: str | None = None
    plc_epoch: int | None = None
    picked_qty: int | None = None
    scale_confirmed: bool = False
    updated_ts: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL_TASK_STATES

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_no": self.task_no,
            "line_no": self.line_no,
            "sku": self.sku,
            "qty": self.qty,
            "shelf": self.shelf,
            "zone": self.zone,
            "conveyors": list(self.conveyors),
            "sorter": self.sorter,
            "lane": self.lane,
            "tote": self.tote,
            "cmd_id": self.cmd_id,
            "target_count": self.target_count,
            "state": self.state.value,
            "result": self.result,
            "reason": self.reason,
            "plc_epoch": self.plc_epoch,
            "picked_qty": self.picked_qty,
            "scale_confirmed": self.scale_confirmed,
            "updated_ts": self.updated_ts,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PickTask:
        return cls(
            task_no=int(d["task_no"]),
            line_no=int(d["line_no"]),
            sku=str(d["sku"]),
            qty=int(d["qty"]),
            shelf=str(d["shelf"]),
            zone=str(d["zone"]),
            conveyors=tuple(d["conveyors"]),
            sorter=str(d["sorter"]),
            lane=int(d["lane"]),
            tote=int(d["tote"]),
            cmd_id=int(d["cmd_id"]),
            target_count=int(d["target_count"]),
            state=TaskState(d["state"]),
            result=d.get("result"),
            reason=d.get("reason"),
            plc_epoch=d.get("plc_epoch"),
            picked_qty=d.get("picked_qty"),
            scale_confirmed=bool(d.get("scale_confirmed", False)),
            updated_ts=float(d.get("updated_ts", 0.0)),
        )


@dataclass(slots=True)
class Order:
    order_id: str
    channel: str
    external_id: str
    pack_station: str
    lines: list[tuple[str, int]]
    created_ts: float
    principal: str = ""
    state: OrderState = OrderState.RECEIVED
    updated_ts: float = 0.0
    tasks: list[PickTask] = field(default_factory=list)
    history: list[tuple[float, str, str | None]] = field(default_factory=list)
    """(ts, state, reason) of every transition, oldest first."""
    reason: str | None = None
    carrier: str | None = None
    tracking: str | None = None
    packed_by: str | None = None
    shipped_by: str | None = None

    def __post_init__(self) -> None:
        if not self.history:
            self.history.append((self.created_ts, self.state.value, None))
            self.updated_ts = self.created_ts

    @property
    def open(self) -> bool:
        return self.state in OPEN_ORDER_STATES

    def can(self, new: OrderState) -> bool:
        return new in _NEXT[self.state]

    def transition(self, new: OrderState, ts: float, reason: str | None = None) -> dict[str, Any]:
        """Move to ``new``; returns the ``order_state`` event. `InvalidTransition` otherwise."""
        if new not in _NEXT[self.state]:
            raise InvalidTransition(
                f"order {self.order_id}: {self.state.value} → {new.value} is not allowed"
            )
        old = self.state
        self.state = new
        self.updated_ts = ts
        self.history.append((ts, new.value, reason))
        if new is OrderState.EXCEPTION:
            self.reason = reason
        return {
            "kind": "order_state",
            "ts": ts,
            "order_id": self.order_id,
            "channel": self.channel,
            "external_id": self.external_id,
            "old": old.value,
            "new": new.value,
            "reason": reason,
        }

    def tasks_final(self) -> bool:
        return all(t.final for t in self.tasks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "channel": self.channel,
            "external_id": self.external_id,
            "pack_station": self.pack_station,
            "lines": [[sku, qty] for sku, qty in self.lines],
            "created_ts": self.created_ts,
            "principal": self.principal,
            "state": self.state.value,
            "updated_ts": self.updated_ts,
            "tasks": [t.as_dict() for t in self.tasks],
            "history": [list(h) for h in self.history],
            "reason": self.reason,
            "carrier": self.carrier,
            "tracking": self.tracking,
            "packed_by": self.packed_by,
            "shipped_by": self.shipped_by,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Order:
        return cls(
            order_id=str(d["order_id"]),
            channel=str(d["channel"]),
            external_id=str(d["external_id"]),
            pack_station=str(d["pack_station"]),
            lines=[(str(s), int(q)) for s, q in d["lines"]],
            created_ts=float(d["created_ts"]),
            principal=str(d.get("principal", "")),
            state=OrderState(d["state"]),
            updated_ts=float(d["updated_ts"]),
            tasks=[PickTask.from_dict(t) for t in d.get("tasks", [])],
            history=[(float(ts), str(s), r) for ts, s, r in d.get("history", [])],
            reason=d.get("reason"),
            carrier=d.get("carrier"),
            tracking=d.get("tracking"),
            packed_by=d.get("packed_by"),
            shipped_by=d.get("shipped_by"),
        )
