"""Shelf stock: unit counting, per-shelf status, staleness and SKU levels.

``apply_reading`` is the hot path (up to tens of thousands of calls per second). ``ShelfState``
is therefore a small mutable object owned by its caller: ``apply_reading`` and ``check_stale``
update it in place and return it with the events it produced. Use one state per shelf, from one
task; persist it with ``to_dict`` and restore it with ``ShelfState.from_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import isfinite
from typing import Any, Final, Literal

from controller.domain.events import ShelfEvent, ShelfStatusChanged, StockChanged
from controller.domain.model import Reading, ShelfSpec, ShelfStatus
from controller.domain.scale import ScaleConditioner

CountIssue = Literal["below_tare", "over_capacity", "between_units"]
StatusReason = Literal[
    "settling", "settled", "below_tare", "over_capacity", "between_units", "over_range",
    "no_reading", "late_reading",
]  # fmt: skip
IgnoredReason = Literal["non_finite", "out_of_order", "future_ts"]

MAX_FUTURE_S: Final = 60.0
"""Default tolerance for reading timestamps ahead of ``now_s``. A reading further in the future
is ignored: accepted, it would make every later (correct) reading look out of order."""

_NO_EVENTS: Final[tuple[ShelfEvent, ...]] = ()
# Members as module constants: ``ShelfStatus.OK`` is a class-attribute lookup through the enum
# metaclass (~15x a global's cost), paid per reading on the hot path and per shelf per tick.
_UNKNOWN: Final = ShelfStatus.UNKNOWN
_OK: Final = ShelfStatus.OK
_SETTLING: Final = ShelfStatus.SETTLING
_AMBIGUOUS: Final = ShelfStatus.AMBIGUOUS
_STALE: Final = ShelfStatus.STALE
_STATE_VERSION: Final = 1

ShelfSnapshot = tuple[
    ShelfStatus, str | None, int | None, float | None, float | None,
    tuple[float, ...], tuple[float, ...],
]  # fmt: skip
"""``ShelfState.snapshot()``: status, reason, units, weight, newest time, window, pending."""


@dataclass(frozen=True, slots=True)
class CountResult:
    """Units on a shelf for a weight. ``units`` is None exactly when ``ambiguous``."""

    units: int | None
    estimate: float
    ambiguous: bool
    reason: CountIssue | None = None


def _count(weight_g: float, spec: ShelfSpec) -> tuple[int, float, CountIssue | None]:
    """``(units, estimate, issue)``; ``units`` is meaningful only when ``issue`` is None."""
    estimate = (weight_g - spec.tare_g) / spec.unit_weight_g
    tolerance = spec.tolerance_frac
    if estimate < -tolerance:
        return 0, estimate, "below_tare"
    if estimate > spec.capacity_units + tolerance:
        return 0, estimate, "over_capacity"
    units = round(estimate)
    if abs(estimate - units) > tolerance:
        return 0, estimate, "between_units"
    return (units if units > 0 else 0), estimate, None


def count_units(weight_g: float, spec: ShelfSpec) -> CountResult:
    """Whole units for ``weight_g`` on ``spec``'s shelf; never negative.

    ``estimate = (weight_g - tare_g) / unit_weight_g`` counts when it is within
    ``tolerance_frac`` of an integer in ``[0, capacity_units]``; otherwise the result is
    ambiguous with reason ``below_tare``, ``over_capacity`` or ``between_units``.
    """
    units, estimate, reason = _count(weight_g, spec)
    if reason is not None:
        return CountResult(None, estimate, True, reason)
    return CountResult(units, estimate, False)


class ShelfState:
    """Mutable state of one shelf (see the module docstring for ownership).

    ``ShelfState(spec)`` is a shelf that has never reported. ``units`` is the last confident
    count (kept while SETTLING, AMBIGUOUS or STALE); ``weight_g`` the last conditioned weight;
    ``last_ts_s`` the newest applied reading's time. ``ignored_reason`` tells why the latest
    reading was ignored (None when it was applied); it is transient and not persisted.
    """

    __slots__ = (
        "conditioner",
        "ignored_reason",
        "last_ts_s",
        "reason",
        "shelf_id",
        "status",
        "units",
        "weight_g",
    )

    def __init__(
        self,
        spec: ShelfSpec,
        *,
        status: ShelfStatus = ShelfStatus.UNKNOWN,
        reason: str | None = None,
        units: int | None = None,
        weight_g: float | None = None,
        last_ts_s: float | None = None,
        conditioner: ScaleConditioner | None = None,
    ) -> None:
        self.shelf_id = spec.shelf_id
        self.status = status
        self.reason = reason
        self.units = units
        self.weight_g = weight_g
        self.last_ts_s = last_ts_s
        self.conditioner = conditioner if conditioner is not None else ScaleConditioner(spec=spec)
        self.ignored_reason: IgnoredReason | None = None

    def __repr__(self) -> str:
        return (
            f"ShelfState({self.shelf_id!r}, status={self.status}, units={self.units}, "
            f"weight_g={self.weight_g}, last_ts_s={self.last_ts_s})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShelfState):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe snapshot (the conditioner's window included)."""
        return {
            "v": _STATE_VERSION,
            "shelf_id": self.shelf_id,
            "status": self.status._value_,  # .value goes through the enum's descriptor: slower
            "reason": self.reason,
            "units": self.units,
            "weight_g": self.weight_g,
            "last_ts_s": self.last_ts_s,
            "window": list(self.conditioner.window),
            "pending": list(self.conditioner.pending),
        }

    def snapshot(self) -> ShelfSnapshot:
        """What ``restore`` needs to bring this state back (cheaper than ``to_dict``: taken on
        the hot path before a group mutates the state, used only to roll the group back)."""
        conditioner = self.conditioner
        return (
            self.status,
            self.reason,
            self.units,
            self.weight_g,
            self.last_ts_s,
            tuple(conditioner.window),
            tuple(conditioner.pending),
        )

    def restore(self, snapshot: ShelfSnapshot, spec: ShelfSpec) -> None:
        """Back to the state ``snapshot`` was taken of (in place)."""
        status, reason, units, weight_g, last_ts_s, window, pending = snapshot
        self.status = status
        self.reason = reason
        self.units = units
        self.weight_g = weight_g
        self.last_ts_s = last_ts_s
        self.conditioner = ScaleConditioner(window, pending, spec=spec)
        self.ignored_reason = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], spec: ShelfSpec) -> ShelfState:
        """Restore a ``to_dict`` snapshot; raises ``ValueError`` on a foreign or bad one."""
        if data.get("v") != _STATE_VERSION:
            raise ValueError(f"unsupported ShelfState version: {data.get('v')!r}")
        if data["shelf_id"] != spec.shelf_id:
            raise ValueError(f"snapshot of shelf {data['shelf_id']!r}, not {spec.shelf_id!r}")
        units = data["units"]
        weight_g = data["weight_g"]
        last_ts_s = data["last_ts_s"]
        reason = data["reason"]
        return cls(
            spec,
            status=ShelfStatus(data["status"]),
            reason=None if reason is None else str(reason),
            units=None if units is None else int(units),
            weight_g=None if weight_g is None else float(weight_g),
            last_ts_s=None if last_ts_s is None else float(last_ts_s),
            conditioner=ScaleConditioner(
                (float(w) for w in data["window"]),
                (float(w) for w in data["pending"]),
                spec=spec,
            ),
        )


def apply_reading(
    state: ShelfState,
    spec: ShelfSpec,
    reading: Reading,
    now_s: float,
    *,
    max_future_s: float = MAX_FUTURE_S,
) -> tuple[ShelfState, tuple[ShelfEvent, ...]]:
    """Apply one reading of ``spec``'s scale channel to ``state`` (in place).

    Returns the state and the events: ``StockChanged`` when a settled, unambiguous count differs
    from the last one; ``ShelfStatusChanged`` on every status change. Ignored, with no event and
    ``state.ignored_reason`` set: non-finite weights, readings older than the newest applied one
    (equal timestamps are applied; the caller dedups by sequence number), and readings more than
    ``max_future_s`` ahead of ``now_s``. A reading older than ``stale_after_s`` at ``now_s`` is
    applied but leaves the shelf STALE; one after a gap longer than ``stale_after_s`` restarts
    settling from scratch.
    """
    return state, apply_weight(
        state, spec, reading.ts_s, reading.weight_g, now_s, max_future_s=max_future_s
    )


def apply_weight(
    state: ShelfState,
    spec: ShelfSpec,
    ts_s: float,
    weight_g: float,
    now_s: float,
    *,
    max_future_s: float = MAX_FUTURE_S,
) -> tuple[ShelfEvent, ...]:
    """``apply_reading`` for a reading given as its time and weight; returns only the events
    (``state`` is updated in place). The ingest hot path calls this, without building a
    ``Reading``."""
    last_ts_s = state.last_ts_s
    if not (isfinite(weight_g) and isfinite(ts_s)):
        state.ignored_reason = "non_finite"
        return _NO_EVENTS
    if last_ts_s is not None and ts_s < last_ts_s:
        state.ignored_reason = "out_of_order"
        return _NO_EVENTS
    if ts_s > now_s + max_future_s:
        state.ignored_reason = "future_ts"
        return _NO_EVENTS
    state.ignored_reason = None
    state.last_ts_s = ts_s
    conditioner = state.conditioner
    stale_after_s = spec.stale_after_s
    if last_ts_s is not None and ts_s - last_ts_s > stale_after_s:
        conditioner.reset(spec)

    events: tuple[ShelfEvent, ...] = _NO_EVENTS
    status: ShelfStatus
    reason: StatusReason
    if weight_g > spec.max_weight_g:
        conditioner.reset(spec)
        status, reason = _AMBIGUOUS, "over_range"
    else:
        settled, median_g, _spike = conditioner.push(weight_g, spec)
        state.weight_g = median_g
        if not settled:
            status, reason = _SETTLING, "settling"
        else:
            units, _estimate, issue = _count(median_g, spec)
            if issue is not None:
                status, reason = _AMBIGUOUS, issue
            else:
                status, reason = _OK, "settled"
                old_units = state.units
                if units != old_units:
                    state.units = units
                    events = (StockChanged(spec.shelf_id, spec.sku, old_units, units, ts_s),)
    if now_s - ts_s > stale_after_s:
        status, reason = _STALE, "late_reading"

    old_status = state.status
    if status is not old_status:
        state.status = status
        state.reason = reason
        events = (
            *events,
            ShelfStatusChanged(spec.shelf_id, old_status, status, ts_s, reason),
        )
    return events


def check_stale(
    state: ShelfState, spec: ShelfSpec, now_s: float
) -> tuple[ShelfState, tuple[ShelfEvent, ...]]:
    """Mark the shelf STALE (one event) when its newest reading is older than
    ``stale_after_s`` at ``now_s``. A shelf that never reported stays UNKNOWN."""
    last_ts_s = state.last_ts_s
    if last_ts_s is None or state.status is _STALE or now_s - last_ts_s <= spec.stale_after_s:
        return state, _NO_EVENTS
    old_status = state.status
    state.status = _STALE
    state.reason = "no_reading"
    return state, (ShelfStatusChanged(spec.shelf_id, old_status, _STALE, now_s, "no_reading"),)


def sku_level(shelf_states: Iterable[ShelfState]) -> int | None:
    """Units of one SKU over its shelves, or None when unknown: no shelves, or any shelf STALE,
    UNKNOWN or without a count yet. SETTLING and AMBIGUOUS shelves contribute their last
    confident count."""
    total = 0
    seen = False
    for state in shelf_states:
        units = state.units
        status = state.status
        if units is None or status is _STALE or status is _UNKNOWN:
            return None
        total += units
        seen = True
    return total if seen else None
