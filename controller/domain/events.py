"""Domain events: what the stock and reorder logic tell the rest of the controller.

Every event is a frozen slotted dataclass with a ``kind`` (stable wire name) and ``as_dict()``
(JSON-safe: enums become their string values).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar

from controller.domain.model import ShelfStatus, StockState


class _Event:
    __slots__ = ()
    kind: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe dict with ``kind`` first."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        return out


@dataclass(frozen=True, slots=True)
class StockChanged(_Event):
    """A shelf's settled, unambiguous count changed (``old_units`` is None for the first)."""

    kind: ClassVar[str] = "stock_changed"
    shelf_id: str
    sku: str
    old_units: int | None
    new_units: int
    ts_s: float


@dataclass(frozen=True, slots=True)
class ShelfStatusChanged(_Event):
    """A shelf's status changed; ``reason`` says why (e.g. ``below_tare``, ``no_reading``)."""

    kind: ClassVar[str] = "shelf_status_changed"
    shelf_id: str
    old: ShelfStatus
    new: ShelfStatus
    ts_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class AlertRaised(_Event):
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
class AlertEscalated(_Event):
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
class AlertDeescalated(_Event):
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
class AlertResolved(_Event):
    """The episode ended: the level stayed above reorder point + hysteresis for the dwell."""

    kind: ClassVar[str] = "alert_resolved"
    key: str
    episode_id: str
    severity: StockState
    level: int
    raised_at_s: float
    ts_s: float


ShelfEvent = StockChanged | ShelfStatusChanged
AlertTransition = AlertRaised | AlertEscalated | AlertDeescalated | AlertResolved
DomainEvent = ShelfEvent | AlertTransition
