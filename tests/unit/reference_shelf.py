"""The object-per-shelf implementation of the conditioning and counting rules, as it was
before the state moved into columns (controller/domain/shelf_table.py): the oracle that
tests/unit/test_shelf_table.py compares the table with. Test code only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from math import isfinite
from typing import Any, Final

from controller.domain.events import ShelfEvent, ShelfStatusChanged, StockChanged
from controller.domain.model import ShelfSpec, ShelfStatus

CountIssue = str
StatusReason = str
IgnoredReason = str
ShelfSnapshot = tuple[Any, ...]

_NO_EVENTS: Final[tuple[ShelfEvent, ...]] = ()
_UNKNOWN: Final = ShelfStatus.UNKNOWN
_OK: Final = ShelfStatus.OK
_SETTLING: Final = ShelfStatus.SETTLING
_AMBIGUOUS: Final = ShelfStatus.AMBIGUOUS
_STALE: Final = ShelfStatus.STALE
_STATE_VERSION: Final = 1
MAX_FUTURE_S: Final = 60.0

_SPIKE_MIN_WINDOW = 3
"""Below this a median says too little to call anything a spike."""
_CONFIRM_READINGS = 2


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    if n % 2:
        return sorted_values[mid]
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


class RefConditioner:
    """Mutable conditioner for one shelf, owned by that shelf's ``ShelfState``.

    ``push`` is on the hot path (every reading), hence a plain slotted class mutated in place
    with the median and settledness cached between readings.
    """

    __slots__ = ("_median", "_settled", "pending", "window")

    def __init__(
        self, window: Iterable[float] = (), pending: Iterable[float] = (), *, spec: ShelfSpec
    ) -> None:
        self.window: list[float] = list(window)
        self.pending: list[float] = list(pending)
        self._median = 0.0
        self._settled = False
        self._refresh(spec)

    def _refresh(self, spec: ShelfSpec) -> None:
        window = self.window
        excess = len(window) - spec.settle_window
        if excess > 0:
            del window[:excess]
        if not window:
            self._median = 0.0
            self._settled = False
            return
        ordered = sorted(window)
        self._median = _median(ordered)
        self._settled = (
            len(ordered) >= min(3, spec.settle_window)
            and ordered[-1] - ordered[0] <= spec.settle_band_g
        )

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def weight_g(self) -> float | None:
        """Median of the window, or ``None`` when it is empty."""
        return self._median if self.window else None

    def reset(self, spec: ShelfSpec) -> None:
        """Forget every reading (after a gap or an over-range reading)."""
        self.window.clear()
        self.pending.clear()
        self._refresh(spec)

    def push(self, weight_g: float, spec: ShelfSpec) -> tuple[bool, float, bool]:
        """Feed one reading; return ``(settled, weight_g, spike)``.

        ``weight_g`` is the window median; ``spike`` is true when this reading was held back.
        """
        window = self.window
        if len(window) >= _SPIKE_MIN_WINDOW and abs(weight_g - self._median) > spec.spike_g:
            pending = self.pending
            if pending and abs(weight_g - pending[-1]) <= spec.settle_band_g:
                pending.append(weight_g)
                if len(pending) >= _CONFIRM_READINGS:
                    self.window = pending
                    self.pending = []
                    self._refresh(spec)
                    return self._settled, self._median, False
            else:
                pending.clear()
                pending.append(weight_g)
            return self._settled, self._median, True
        if self.pending:
            self.pending.clear()
        # Inlined _refresh: this is the per-reading path.
        window.append(weight_g)
        size = spec.settle_window
        n = len(window)
        if n > size:
            del window[: n - size]
            n = size
        ordered = sorted(window)
        mid = n >> 1
        median_g = ordered[mid] if n & 1 else (ordered[mid - 1] + ordered[mid]) / 2.0
        settled = n >= (size if size < 3 else 3) and ordered[-1] - ordered[0] <= spec.settle_band_g
        self._median = median_g
        self._settled = settled
        return settled, median_g, False


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


class RefShelfState:
    """Mutable state of one shelf (see the module docstring for ownership).

    ``RefShelfState(spec)`` is a shelf that has never reported. ``units`` is the last confident
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
        conditioner: RefConditioner | None = None,
    ) -> None:
        self.shelf_id = spec.shelf_id
        self.status = status
        self.reason = reason
        self.units = units
        self.weight_g = weight_g
        self.last_ts_s = last_ts_s
        self.conditioner = conditioner if conditioner is not None else RefConditioner(spec=spec)
        self.ignored_reason: IgnoredReason | None = None

    def __repr__(self) -> str:
        return (
            f"RefShelfState({self.shelf_id!r}, status={self.status}, units={self.units}, "
            f"weight_g={self.weight_g}, last_ts_s={self.last_ts_s})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RefShelfState):
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
        self.conditioner = RefConditioner(window, pending, spec=spec)
        self.ignored_reason = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], spec: ShelfSpec) -> RefShelfState:
        """Restore a ``to_dict`` snapshot; raises ``ValueError`` on a foreign or bad one."""
        if data.get("v") != _STATE_VERSION:
            raise ValueError(f"unsupported RefShelfState version: {data.get('v')!r}")
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
            conditioner=RefConditioner(
                (float(w) for w in data["window"]),
                (float(w) for w in data["pending"]),
                spec=spec,
            ),
        )


def apply_weight(
    state: RefShelfState,
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
    state: RefShelfState, spec: ShelfSpec, now_s: float
) -> tuple[RefShelfState, tuple[ShelfEvent, ...]]:
    """Mark the shelf STALE (one event) when its newest reading is older than
    ``stale_after_s`` at ``now_s``. A shelf that never reported stays UNKNOWN."""
    last_ts_s = state.last_ts_s
    if last_ts_s is None or state.status is _STALE or now_s - last_ts_s <= spec.stale_after_s:
        return state, _NO_EVENTS
    old_status = state.status
    state.status = _STALE
    state.reason = "no_reading"
    return state, (ShelfStatusChanged(spec.shelf_id, old_status, _STALE, now_s, "no_reading"),)
