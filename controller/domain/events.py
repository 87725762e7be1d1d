"""Domain events: what the stock and reorder logic tell the rest of the controller.

Every event is a frozen slotted dataclass with a ``kind`` (stable wire name), ``as_dict()``
(JSON-safe: enums become their string values, nested `Value` objects dicts; ``kind`` first,
then the fields in declaration order) and ``from_dict()`` (the inverse). The bus carries the
typed events; the dict is the wire format, made at the edges: journal event bodies, history
points, MQTT and the live WebSocket carry it, so a field's name, order and type are part of
the format. Events that were hand-built dicts before
they had a type (``seq_gap``…) keep their wire name ``ts`` for the field ``ts_s``
(``WIRE_NAMES``); a field named in ``OMIT_NONE`` is left off the wire while it is None (a field
added to a kind later, so its earlier bodies keep their bytes), and takes its default when a
body does not carry it.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from typing import Any, ClassVar

from controller.domain.model import OrderState, ShelfStatus, StockState, TaskState

_BY_KIND: dict[str, type[Event]] = {}


class Value:
    """A value object nested in an event: on the wire, a dict of its fields."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> typing.Self:
        return cls(**{f.name: body[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@functools.cache
def _wire_fields(cls: type[Event]) -> tuple[tuple[str, str, bool], ...]:
    """Per event class: (field, wire name, left off while None) of each field, in order
    (``dataclasses.fields`` per ``as_dict`` call was a tenth of an event's cost)."""
    return tuple(
        (f.name, cls.WIRE_NAMES.get(f.name, f.name), f.name in cls.OMIT_NONE)
        for f in fields(cls)  # type: ignore[arg-type]
    )


class Event:
    """Base of every typed event (see the module docstring)."""

    __slots__ = ()
    kind: ClassVar[str]
    WIRE_NAMES: ClassVar[dict[str, str]] = {}
    """Field name → wire name, where they differ."""
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()
    """Fields left off the wire while they are None."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):
            _BY_KIND[kind] = cls  # the slotted class that @dataclass builds comes last

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe dict with ``kind`` first."""
        out: dict[str, Any] = {"kind": self.kind}
        for name, wire_name, omit_none in _wire_fields(type(self)):  # type: ignore[arg-type]
            value = getattr(self, name)
            if value is None:
                if omit_none:
                    continue
            elif isinstance(value, Enum):
                value = value.value
            elif isinstance(value, Value):
                value = value.as_dict()
            out[wire_name] = value
        return out

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> typing.Self:
        """The event of a wire dict (``as_dict``'s inverse); keys it does not know are ignored.
        ``KeyError``, ``TypeError`` or ``ValueError`` for a body that is not this event."""
        if body.get("kind") != cls.kind:
            raise ValueError(f"not a {cls.kind} event: {body.get('kind')!r}")
        hints = typing.get_type_hints(cls)
        names = cls.WIRE_NAMES
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            wire = names.get(f.name, f.name)
            if wire not in body and f.name in cls.OMIT_NONE and f.default is not MISSING:
                kwargs[f.name] = f.default
                continue
            value = body[wire]
            hint = hints[f.name]
            if isinstance(hint, type) and issubclass(hint, Enum):
                value = hint(value)
            elif isinstance(hint, type) and issubclass(hint, Value):
                value = hint.from_dict(value)
            kwargs[f.name] = value
        return cls(**kwargs)


_Event = Event  # the name domain.reorder imports


def event_from_dict(body: dict[str, Any]) -> Event:
    """The typed event of a wire dict, by its ``kind``; ``ValueError`` for an unknown kind."""
    cls = _BY_KIND.get(str(body.get("kind")))
    if cls is None:
        raise ValueError(f"unknown event kind {body.get('kind')!r}")
    return cls.from_dict(body)


@dataclass(frozen=True, slots=True)
class StockChanged(Event):
    """A shelf's settled, unambiguous count changed (``old_units`` is None for the first)."""

    kind: ClassVar[str] = "stock_changed"
    shelf_id: str
    sku: str
    old_units: int | None
    new_units: int
    ts_s: float


@dataclass(frozen=True, slots=True)
class ShelfStatusChanged(Event):
    """A shelf's status changed; ``reason`` says why (e.g. ``below_tare``, ``no_reading``)."""

    kind: ClassVar[str] = "shelf_status_changed"
    shelf_id: str
    old: ShelfStatus
    new: ShelfStatus
    ts_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class AlertRaised(Event):
    """A new alert episode; ``threshold`` is the limit of ``severity`` (reorder point, safety
    stock or 0)."""

    kind: ClassVar[str] = "alert_raised"
    key: str
    episode_id: str
    severity: StockState
    level: int
    threshold: int
    suggested_order_qty: int
    ts_s: float


@dataclass(frozen=True, slots=True)
class AlertEscalated(Event):
    """The episode got worse (LOW → CRITICAL → OUT)."""

    kind: ClassVar[str] = "alert_escalated"
    key: str
    episode_id: str
    old_severity: StockState
    new_severity: StockState
    level: int
    threshold: int
    ts_s: float


@dataclass(frozen=True, slots=True)
class AlertDeescalated(Event):
    """The episode got better but is not resolved (e.g. OUT → LOW)."""

    kind: ClassVar[str] = "alert_deescalated"
    key: str
    episode_id: str
    old_severity: StockState
    new_severity: StockState
    level: int
    threshold: int
    ts_s: float


@dataclass(frozen=True, slots=True)
class AlertResolved(Event):
    """The episode ended: the level stayed above reorder point + hysteresis for the dwell."""

    kind: ClassVar[str] = "alert_resolved"
    key: str
    episode_id: str
    severity: StockState
    level: int
    raised_at_s: float
    ts_s: float


_TS = {"ts_s": "ts"}


@dataclass(frozen=True, slots=True)
class SeqGap(Event):
    """A scale's sequence jumped: ``missing`` readings between ``after_seq`` and ``seq`` never
    arrived (yet); ``ts_s`` is the time of the reading at ``seq``."""

    kind: ClassVar[str] = "seq_gap"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    ts_s: float
    device: str
    after_seq: int
    seq: int
    missing: int


@dataclass(frozen=True, slots=True)
class SeqGapFilled(Event):
    """Late readings of one device and epoch arrived in one group and filled ``filled`` of its
    missing seqs, between ``first_seq`` and ``last_seq``; ``ts_s`` is the newest one's time."""

    kind: ClassVar[str] = "seq_gap_filled"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    ts_s: float
    device: str
    epoch: int
    first_seq: int
    last_seq: int
    filled: int


@dataclass(frozen=True, slots=True)
class OrderStateChanged(Event):
    """An order moved from ``old`` to ``new`` (``reason`` for EXCEPTION, CANCELLED, pack/ship
    confirmations and resolutions)."""

    kind: ClassVar[str] = "order_state"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    ts_s: float
    order_id: str
    channel: str
    external_id: str
    old: OrderState
    new: OrderState
    reason: str | None


@dataclass(frozen=True, slots=True)
class OrderException(OrderStateChanged):
    """The same transition into EXCEPTION, announced once more under its own kind (for the
    listeners that only want the exceptions)."""

    kind: ClassVar[str] = "order_exception"

    @classmethod
    def of(cls, event: OrderStateChanged) -> OrderException:
        return cls(**{f.name: getattr(event, f.name) for f in fields(event)})


@dataclass(frozen=True, slots=True)
class PickTaskChanged(Event):
    """A pick task (one tote, ``cmd_id`` on ``sorter``) is now in ``state``; ``by`` names the
    person who resolved it from UNKNOWN (absent from the wire otherwise)."""

    kind: ClassVar[str] = "pick_task"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"by"})
    ts_s: float
    order_id: str
    task_no: int
    sku: str
    qty: int
    shelf: str
    sorter: str
    cmd_id: int
    tote: int
    state: TaskState
    result: str | None
    reason: str | None
    by: str | None = None


@dataclass(frozen=True, slots=True)
class PlcCommandIssued(Event):
    """A manual PLC command (``start``, ``stop``, ``reset``) by ``by`` with ``role``, whatever
    its ``result`` (``ok`` or why not); ``state`` and ``fault`` as read back (None without)."""

    kind: ClassVar[str] = "plc_command"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    ts_s: float
    plc: str
    command: str
    by: str
    role: str
    result: str
    detail: str
    state: str | None
    fault: str | None


@dataclass(frozen=True, slots=True)
class CmdIdsMoved(Event):
    """A status read showed ``sorter`` knowing cmd ids up to ``new`` (link ``epoch``), above the
    journal's counter ``old``: the counter moved above it."""

    kind: ClassVar[str] = "cmd_ids_moved"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    ts_s: float
    sorter: str
    epoch: int
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class CatalogChanged(Event):
    """The catalogue of a running controller changed to ``version`` (by ``by``, through
    ``source``): ``added``, ``removed``, ``changed`` records; ``skus`` and ``shelves`` the ids
    of the SKUs and shelves among them; ``ended`` the alert keys whose episode ended because
    their target went."""

    kind: ClassVar[str] = "catalog_changed"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    ts_s: float
    version: int
    by: str
    source: str
    added: int
    removed: int
    changed: int
    skus: tuple[str, ...] = ()
    shelves: tuple[str, ...] = ()
    ended: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> typing.Self:
        """``as_dict``'s inverse (the id lists come back as tuples)."""
        ev = super(CatalogChanged, cls).from_dict(body)  # slots: no zero-argument super()
        values: dict[str, Any] = {f.name: getattr(ev, f.name) for f in fields(cls)}
        for name in ("skus", "shelves", "ended"):
            values[name] = tuple(values[name])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class CalibrationValues(Value):
    """A shelf's conversion at one moment: tare, unit weight, scale factor."""

    tare_g: float
    unit_weight_g: float
    scale_factor: float


@dataclass(frozen=True, slots=True)
class ShelfCalibrated(Event):
    """A shelf was tared, calibrated or reset (``action``) by ``by``: its conversion went from
    ``old`` to ``new``."""

    kind: ClassVar[str] = "shelf_calibrated"
    WIRE_NAMES: ClassVar[dict[str, str]] = _TS
    ts_s: float
    shelf_id: str
    sku: str
    scale: str
    channel: int
    action: str
    by: str
    old: CalibrationValues
    new: CalibrationValues


@dataclass(frozen=True, slots=True)
class AlertNotice:
    """An alert transition as the alert service journals and publishes it: with the SKU, the
    suggested order quantity at that moment (None while the level is unknown) and whether it
    notifies (false while snoozed, except a raise or an escalation)."""

    transition: AlertTransition
    sku: str
    suggested_order_qty: int | None
    notify: bool

    @property
    def kind(self) -> str:
        return self.transition.kind

    def as_dict(self) -> dict[str, Any]:
        """The transition's dict, then ``sku``, ``suggested_order_qty`` (in place for a raise,
        which has its own) and ``notify``."""
        body = self.transition.as_dict()
        body["sku"] = self.sku
        body["suggested_order_qty"] = self.suggested_order_qty
        body["notify"] = self.notify
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> AlertNotice:
        """``as_dict``'s inverse; ``ValueError`` for a body that is no alert transition."""
        transition = event_from_dict(body)
        if not isinstance(transition, AlertTransition):
            raise ValueError(f"not an alert transition: {body.get('kind')!r}")
        return cls(transition, body["sku"], body["suggested_order_qty"], body["notify"])


ALERT_MANUAL_KINDS = frozenset({"alert_ack", "alert_snooze", "alert_snooze_ended"})
"""Kinds of domain.reorder's ``AlertManualEvent`` (defined there: it imports this module)."""


@dataclass(frozen=True, slots=True)
class AlertManualNotice:
    """An acknowledgement, snooze or snooze end (``domain.reorder.AlertManualEvent``) as the
    alert service journals and publishes it: with the SKU and whether it notifies."""

    event: Event
    sku: str
    notify: bool

    def __post_init__(self) -> None:
        if self.event.kind not in ALERT_MANUAL_KINDS:
            raise ValueError(f"not a manual alert event: {self.event.kind!r}")

    @property
    def kind(self) -> str:
        return self.event.kind

    def as_dict(self) -> dict[str, Any]:
        """The event's dict, then ``sku`` and ``notify``."""
        body = self.event.as_dict()
        body["sku"] = self.sku
        body["notify"] = self.notify
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> AlertManualNotice:
        """``as_dict``'s inverse; ``ValueError`` for a body that is no manual alert event."""
        return cls(event_from_dict(body), body["sku"], body["notify"])


ShelfEvent = StockChanged | ShelfStatusChanged
AlertTransition = AlertRaised | AlertEscalated | AlertDeescalated | AlertResolved
DomainEvent = ShelfEvent | AlertTransition
BusEvent = Event | AlertNotice | AlertManualNotice
"""What the bus carries: a typed event, or an alert notice (a transition with its SKU...).
Each has a ``kind`` and an ``as_dict()``, the wire dict the edges (journal, MQTT, the live
WebSocket, history) serialise."""
