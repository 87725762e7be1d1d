"""Orders and pick tasks: the state machines, pure (no I/O, no clock: times are parameters).

An order is one pick request from a floor system: lines (sku, qty) for a pack station. It is
allocated to shelves (`controller.domain.routing`), split into pick tasks (one tote each: a
shelf, a quantity, a sorter command), and followed to the pack station:

    RECEIVED → VALIDATED → ALLOCATED → PICKING → SORTED → PACKED → SHIPPED
         └──────────┴───────────┴──────────┴──→ CANCELLED (before any command was sent)
                      └──────────┴──────────┴─────────┴──→ EXCEPTION ──→ SORTED
                                         (every UNKNOWN task resolved as picked by a person)

A task is DISPATCHED once its sorter command id is journaled, ACCEPTED when the PLC took the
command, DIVERTED when the sorter reports the tote in the pack station's lane, and CONFIRMED
when, in addition, the shelf's scale shows the quantity gone. Anything else ends in SHORT
(the scale did not show the quantity), FAILED (jam, refused, device down, recirculated,
rejected), CANCELLED (its order was cancelled before the command was sent) or UNKNOWN (the
outcome of a sorter command cannot be known after a restart — shown to people, never
guessed, until a supervisor resolves it as CONFIRMED or FAILED).

Task states change only through `transition` (the table `TASK_TRANSITIONS`): execution, restart
reconciliation (`reconcile_event`), cancellation and resolution all use it, so an illegal
change (CONFIRMED → FAILED, resolving a task that is not UNKNOWN) raises `InvalidTransition`.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from controller.domain.events import OrderStateChanged, PickTaskChanged
from controller.domain.model import OrderState, TaskState

__all__ = [
    "FINAL_TASK_STATES",
    "OPEN_ORDER_STATES",
    "TASK_TRANSITIONS",
    "InvalidTransition",
    "NotCancellable",
    "Order",
    "OrderState",
    "PickTask",
    "PlcKnows",
    "Resolution",
    "TaskEvent",
    "TaskState",
    "body_digest",
    "next_task_state",
    "reconcile_event",
    "transition",
]


_NEXT: dict[OrderState, frozenset[OrderState]] = {
    OrderState.RECEIVED: frozenset(
        {OrderState.VALIDATED, OrderState.EXCEPTION, OrderState.CANCELLED}
    ),
    OrderState.VALIDATED: frozenset(
        {OrderState.ALLOCATED, OrderState.EXCEPTION, OrderState.CANCELLED}
    ),
    OrderState.ALLOCATED: frozenset(
        {OrderState.PICKING, OrderState.EXCEPTION, OrderState.CANCELLED}
    ),
    OrderState.PICKING: frozenset({OrderState.SORTED, OrderState.EXCEPTION, OrderState.CANCELLED}),
    OrderState.SORTED: frozenset({OrderState.PACKED, OrderState.EXCEPTION}),
    OrderState.PACKED: frozenset({OrderState.SHIPPED, OrderState.EXCEPTION}),
    OrderState.SHIPPED: frozenset(),
    # Only when every task is CONFIRMED (UNKNOWN tasks resolved by a person): see transition.
    OrderState.EXCEPTION: frozenset({OrderState.SORTED}),
    OrderState.CANCELLED: frozenset(),
}

OPEN_ORDER_STATES = frozenset(
    {OrderState.RECEIVED, OrderState.VALIDATED, OrderState.ALLOCATED, OrderState.PICKING}
)
"""States in which an order still holds reservations and may drive devices."""


FINAL_TASK_STATES = frozenset(
    {TaskState.CONFIRMED, TaskState.SHORT, TaskState.FAILED, TaskState.UNKNOWN, TaskState.CANCELLED}
)
"""States execution does not change any more (UNKNOWN only a person, by resolving it)."""


class TaskEvent(enum.Enum):
    """What happened to a task's command or shelf: the inputs of `transition`."""

    ACCEPTED = "accepted"
    """The PLC took the command (the mailbox write was confirmed, or it is pending there)."""
    DIVERTED = "diverted"
    """The sorter reports the tote in the pack station's lane."""
    NOT_DIVERTED = "not_diverted"
    """The sorter reports another result (RECIRCULATED, REJECTED, unreadable)."""
    FAILED = "failed"
    """Certainly not done: a belt could not start, the PLC refused the command, no result in
    time, or an internal error."""
    LOST = "lost"
    """The command's outcome cannot be known (PLC restarted, not readable, out of its ring)."""
    SCALE_CONFIRMED = "scale_confirmed"
    """The shelf's count fell to the task's target."""
    SCALE_TIMEOUT = "scale_timeout"
    """The shelf did not show the units gone within the scale time-out."""
    CANCELLED = "cancelled"
    """Its order was cancelled before the command was handed to the sorter."""
    RESOLVED_PICKED = "resolved_picked"
    """A person found the units picked into the pack station (an UNKNOWN task)."""
    RESOLVED_NOT_PICKED = "resolved_not_picked"
    """A person found the units were not picked (an UNKNOWN task)."""


_SENT = (TaskState.DISPATCHED, TaskState.ACCEPTED)

TASK_TRANSITIONS: dict[tuple[TaskState, TaskEvent], TaskState] = {
    (TaskState.DISPATCHED, TaskEvent.ACCEPTED): TaskState.ACCEPTED,
    (TaskState.ACCEPTED, TaskEvent.ACCEPTED): TaskState.ACCEPTED,
    # DISPATCHED too: ACCEPTED is not journaled, so a restart finds a result for a DISPATCHED task.
    **{(s, TaskEvent.DIVERTED): TaskState.DIVERTED for s in _SENT},
    **{(s, TaskEvent.NOT_DIVERTED): TaskState.FAILED for s in _SENT},
    **{(s, TaskEvent.LOST): TaskState.UNKNOWN for s in _SENT},
    **{(s, TaskEvent.FAILED): TaskState.FAILED for s in (*_SENT, TaskState.DIVERTED)},
    (TaskState.DIVERTED, TaskEvent.SCALE_CONFIRMED): TaskState.CONFIRMED,
    (TaskState.DIVERTED, TaskEvent.SCALE_TIMEOUT): TaskState.SHORT,
    (TaskState.DISPATCHED, TaskEvent.CANCELLED): TaskState.CANCELLED,
    (TaskState.UNKNOWN, TaskEvent.RESOLVED_PICKED): TaskState.CONFIRMED,
    (TaskState.UNKNOWN, TaskEvent.RESOLVED_NOT_PICKED): TaskState.FAILED,
}
"""(state, event) → next state; every pair not listed is an `InvalidTransition`."""


class InvalidTransition(ValueError):
    """A state change the lifecycle does not allow (an order SHIPPED before PACKED, a task
    CONFIRMED → FAILED, resolving a task that is not UNKNOWN)."""


class NotCancellable(InvalidTransition):
    """An order that cannot be cancelled any more: a command was handed to its sorter, or it
    is closed."""


class PlcKnows(enum.Enum):
    """What a sorter PLC knows about a command in its current epoch (restart reconciliation)."""

    NOT_SEEN = "not_seen"
    PENDING = "pending"
    DONE = "done"
    UNKNOWN = "unknown"


class Resolution(enum.StrEnum):
    """A person's finding for an UNKNOWN task: the resulting task state."""

    CONFIRMED = "CONFIRMED"
    FAILED = "FAILED"


def next_task_state(state: TaskState, event: TaskEvent) -> TaskState:
    """The table's answer for ``event`` in ``state``; `InvalidTransition` if none."""
    new = TASK_TRANSITIONS.get((state, event))
    if new is None:
        raise InvalidTransition(f"task {state.value}: {event.value} is not allowed")
    return new


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
    resolved_by: str | None = None
    """Who resolved the task (UNKNOWN → CONFIRMED / FAILED), when a person did."""
    resolved_ts: float | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_TASK_STATES

    def event(self, order_id: str, *, by: str | None = None) -> PickTaskChanged:
        """The task as it stands, as a ``pick_task`` event (``by``: who resolved it)."""
        return PickTaskChanged(
            self.updated_ts,
            order_id,
            self.task_no,
            self.sku,
            self.qty,
            self.shelf,
            self.sorter,
            self.cmd_id,
            self.tote,
            self.state,
            self.result,
            self.reason,
            by=by,
        )

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
            # Only when resolved: the journal bytes of every other task stay as they were.
            **(
                {"resolved_by": self.resolved_by, "resolved_ts": self.resolved_ts}
                if self.resolved_by is not None
                else {}
            ),
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
            resolved_by=d.get("resolved_by"),
            resolved_ts=d.get("resolved_ts"),
        )


def transition(task: PickTask, event: TaskEvent, ts: float, reason: str | None = None) -> TaskState:
    """Apply ``event`` to ``task`` by the table (`TASK_TRANSITIONS`); returns the old state.

    A final state takes ``reason`` (None for CONFIRMED); CONFIRMED also sets ``picked_qty`` to
    the task's quantity. `InvalidTransition` (the task unchanged) for a pair not in the table.
    """
    new = next_task_state(task.state, event)
    old = task.state
    task.state = new
    task.updated_ts = ts
    if new in FINAL_TASK_STATES:
        task.reason = reason
        if new is TaskState.CONFIRMED:
            task.picked_qty = task.qty
    elif reason is not None:
        task.reason = reason
    return old


def reconcile_event(
    state: TaskState,
    sent_epoch: int | None,
    knows: PlcKnows,
    plc_epoch: int,
    diverted: bool,
) -> TaskEvent | None:
    """Restart reconciliation of a task journaled as ``state`` (sent in PLC epoch
    ``sent_epoch``), from what its sorter knows in ``plc_epoch`` (``diverted``: the result of a
    DONE command). None: the command never reached the PLC and is sent again with the same
    cmd_id (only a DISPATCHED task, only in the same PLC epoch). Everything else that cannot be
    known is LOST (→ UNKNOWN): never replayed, never guessed."""
    if state not in _SENT:
        raise InvalidTransition(f"task {state.value}: nothing to reconcile")
    if knows is PlcKnows.DONE:
        return TaskEvent.DIVERTED if diverted else TaskEvent.NOT_DIVERTED
    if knows is PlcKnows.PENDING:
        return TaskEvent.ACCEPTED
    same_epoch = sent_epoch is not None and sent_epoch == plc_epoch
    if knows is PlcKnows.NOT_SEEN and same_epoch and state is TaskState.DISPATCHED:
        return None
    return TaskEvent.LOST


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

    def transition(
        self, new: OrderState, ts: float, reason: str | None = None
    ) -> OrderStateChanged:
        """Move to ``new``; returns the ``order_state`` event. `InvalidTransition` otherwise."""
        if new not in _NEXT[self.state] or (
            self.state is OrderState.EXCEPTION
            and not (self.tasks and all(t.state is TaskState.CONFIRMED for t in self.tasks))
        ):
            raise InvalidTransition(
                f"order {self.order_id}: {self.state.value} → {new.value} is not allowed"
            )
        old = self.state
        self.state = new
        self.updated_ts = ts
        self.history.append((ts, new.value, reason))
        if new in (OrderState.EXCEPTION, OrderState.CANCELLED):
            self.reason = reason
        elif old is OrderState.EXCEPTION:
            self.reason = None  # resolved: the exception's reason stays in the history
        return OrderStateChanged(
            ts, self.order_id, self.channel, self.external_id, old, new, reason
        )

    def tasks_final(self) -> bool:
        return all(t.final for t in self.tasks)

    def cancel(self, ts: float, reason: str, *, commands_sent: bool) -> OrderStateChanged:
        """Cancel an open order none of whose commands was handed to a sorter
        (``commands_sent``: an execution fact the caller knows). Every task becomes CANCELLED;
        returns the ``order_state`` event. `NotCancellable` (nothing changed) otherwise."""
        if not self.open or commands_sent:
            why = "a command was handed to the sorter" if self.open else "it is closed"
            raise NotCancellable(
                f"order {self.order_id} ({self.state.value}) cannot be cancelled: {why}"
            )
        if any(t.state is not TaskState.DISPATCHED for t in self.tasks):
            raise NotCancellable(f"order {self.order_id}: a task is past DISPATCHED")
        for task in self.tasks:
            transition(task, TaskEvent.CANCELLED, ts, reason)
        return self.transition(OrderState.CANCELLED, ts, reason)

    def resolve(
        self, task: PickTask, resolution: Resolution, ts: float, *, by: str, reason: str
    ) -> list[OrderStateChanged]:
        """A person's finding for an UNKNOWN ``task`` of this order: CONFIRMED (the units were
        picked into the pack station) or FAILED. An EXCEPTION order whose tasks are then all
        CONFIRMED becomes SORTED (it can be packed); an open order goes on as before. Returns
        the ``order_state`` events (none or one). `InvalidTransition` if the task is not
        UNKNOWN (nothing changed)."""
        event = (
            TaskEvent.RESOLVED_PICKED
            if resolution is Resolution.CONFIRMED
            else TaskEvent.RESOLVED_NOT_PICKED
        )
        was = task.reason
        transition(task, event, ts, f"resolved {resolution.value} by {by}: {reason} (was: {was})")
        task.resolved_by, task.resolved_ts = by, ts
        self.updated_ts = ts
        if self.state is OrderState.EXCEPTION and all(
            t.state is TaskState.CONFIRMED for t in self.tasks
        ):
            return [self.transition(OrderState.SORTED, ts, f"task {task.task_no} resolved by {by}")]
        return []

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
