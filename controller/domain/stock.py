"""Shelf stock: unit counting, per-shelf status, staleness and SKU levels.

``apply_reading`` is the hot path (up to tens of thousands of calls per second). The state of
every shelf lives in the columns of a `ShelfTable` (controller/domain/shelf_table.py, where the
rules run); ``ShelfState`` is one shelf's view of its row, owned by one task: ``apply_reading``
and ``check_stale`` update it in place and return it with the events it produced. Persist it
with ``to_dict`` and restore it with ``ShelfState.from_dict`` (or ``load`` into a row).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, cast

from controller.domain.events import ShelfEvent
from controller.domain.model import Reading, ShelfSpec, ShelfStatus
from controller.domain.scale import ScaleConditioner
from controller.domain.shelf_table import (
    MAX_FUTURE_S,
    STATUSES,
    RowSnapshot,
    ShelfTable,
    count,
    reason_of,
)

__all__ = [
    "MAX_FUTURE_S",
    "CountResult",
    "ShelfState",
    "ShelfStates",
    "apply_reading",
    "apply_weight",
    "check_stale",
    "count_units",
    "sku_level",
]

CountIssue = Literal["below_tare", "over_capacity", "between_units"]
StatusReason = Literal[
    "settling", "settled", "below_tare", "over_capacity", "between_units", "over_range",
    "no_reading", "late_reading",
]  # fmt: skip
IgnoredReason = Literal["non_finite", "out_of_order", "future_ts"]

# Members as module constants: ``ShelfStatus.OK`` is a class-attribute lookup through the enum
# metaclass (~15x a global's cost), paid per shelf in ``sku_level``.
_UNKNOWN: Final = ShelfStatus.UNKNOWN
_STALE: Final = ShelfStatus.STALE
_STATE_VERSION: Final = 1

ShelfSnapshot = RowSnapshot
"""``ShelfState.snapshot()``: the row's cells (controller/domain/shelf_table.py)."""

_COLUMNS_FROM: Final = 12
"""Shelves from which `ShelfStates.to_dicts` reads the table's columns at once (measured: 16
shelves 48 against 54 µs one by one; 4 shelves 24 against 14 µs)."""


@dataclass(frozen=True, slots=True)
class CountResult:
    """Units on a shelf for a weight. ``units`` is None exactly when ``ambiguous``."""

    units: int | None
    estimate: float
    ambiguous: bool
    reason: CountIssue | None = None


def count_units(weight_g: float, spec: ShelfSpec) -> CountResult:
    """Whole units for ``weight_g`` on ``spec``'s shelf; never negative.

    ``estimate = (weight_g - tare_g) / unit_weight_g`` counts when it is within
    ``tolerance_frac`` of an integer in ``[0, capacity_units]``; otherwise the result is
    ambiguous with reason ``below_tare``, ``over_capacity`` or ``between_units``.
    """
    units, estimate, reason = count(weight_g, spec)
    if reason is not None:
        return CountResult(None, estimate, True, cast(CountIssue, reason))
    return CountResult(units, estimate, False)


class ShelfState:
    """The state of one shelf: a view of its row in a `ShelfTable` (controller/domain/
    shelf_table.py), where the controller keeps every shelf's state in columns.

    ``ShelfState(spec)`` is a shelf that has never reported, on a table of its own (tests,
    states computed apart such as a recalibration); `ShelfStates` hands out views of the
    ingest service's table. A view is live: it reads and writes the row. ``units`` is the last
    confident count (kept while SETTLING, AMBIGUOUS or STALE); ``weight_g`` the last
    conditioned weight; ``last_ts_s`` the newest applied reading's time. ``ignored_reason``
    tells why the latest reading was ignored (None when it was applied); it is transient and
    not persisted.
    """

    __slots__ = ("_row", "_table", "shelf_id")

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
        table = ShelfTable.of((spec,))
        self._table = table
        self._row = 0
        self.shelf_id = spec.shelf_id
        table.set_status(0, status)
        table.set_reason(0, reason)
        table.set_units(0, units)
        table.set_weight(0, weight_g)
        table.set_last_ts(0, last_ts_s)
        if conditioner is not None:
            table.load_conditioner(0, conditioner.window, conditioner.pending, spec)

    @classmethod
    def view(cls, table: ShelfTable, row: int, shelf_id: str) -> ShelfState:
        """The state of ``table``'s row ``row`` (shelf ``shelf_id``)."""
        self = cls.__new__(cls)
        self._table = table
        self._row = row
        self.shelf_id = shelf_id
        return self

    @property
    def table_row(self) -> tuple[ShelfTable, int]:
        """The table and row this state is a view of."""
        return self._table, self._row

    @property
    def status(self) -> ShelfStatus:
        # The cell read inline (a view is read per item of every list answer).
        code: int = self._table._status[self._row]
        return STATUSES[code]

    @status.setter
    def status(self, value: ShelfStatus) -> None:
        self._table.set_status(self._row, value)

    @property
    def reason(self) -> str | None:
        return self._table.get_reason(self._row)

    @reason.setter
    def reason(self, value: str | None) -> None:
        self._table.set_reason(self._row, value)

    @property
    def units(self) -> int | None:
        units: int = self._table._units[self._row]
        return None if units < 0 else units

    @units.setter
    def units(self, value: int | None) -> None:
        self._table.set_units(self._row, value)

    @property
    def weight_g(self) -> float | None:
        weight_g: float = self._table._weight[self._row]
        return None if weight_g != weight_g else weight_g

    @weight_g.setter
    def weight_g(self, value: float | None) -> None:
        self._table.set_weight(self._row, value)

    @property
    def last_ts_s(self) -> float | None:
        ts_s: float = self._table._last[self._row]
        return None if ts_s != ts_s else ts_s

    @last_ts_s.setter
    def last_ts_s(self, value: float | None) -> None:
        self._table.set_last_ts(self._row, value)

    @property
    def ignored_reason(self) -> IgnoredReason | None:
        return cast("IgnoredReason | None", self._table.get_ignored(self._row))

    @property
    def conditioner(self) -> ScaleConditioner:
        return ScaleConditioner.view(self._table, self._row)

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
        table, row = self._table, self._row
        status, reason, units, weight_g, last_ts_s = table.cells(row)
        return {
            "v": _STATE_VERSION,
            "shelf_id": self.shelf_id,
            "status": status._value_,  # .value goes through the enum's descriptor: slower
            "reason": reason,
            "units": units,
            "weight_g": weight_g,
            "last_ts_s": last_ts_s,
            "window": table.get_window(row),
            "pending": table.get_pending(row),
        }

    def snapshot(self) -> ShelfSnapshot:
        """What ``restore`` needs to bring this state back (cheaper than ``to_dict``: taken on
        the hot path before a group mutates the state, used only to roll the group back)."""
        return self._table.snapshot(self._row)

    def restore(self, snapshot: ShelfSnapshot, spec: ShelfSpec) -> None:
        """Back to the state ``snapshot`` was taken of (in place)."""
        self._table.restore(self._row, snapshot)

    def load(self, data: Mapping[str, Any], spec: ShelfSpec) -> None:
        """Overwrite this state with a ``to_dict`` snapshot (``from_dict``'s checks)."""
        if data.get("v") != _STATE_VERSION:
            raise ValueError(f"unsupported ShelfState version: {data.get('v')!r}")
        if data["shelf_id"] != spec.shelf_id:
            raise ValueError(f"snapshot of shelf {data['shelf_id']!r}, not {spec.shelf_id!r}")
        # Every value converted (and so checked) before the row is written: a bad snapshot
        # leaves the row as it was.
        units = None if data["units"] is None else int(data["units"])
        if units is not None and units < 0:
            raise ValueError(f"units must be >= 0, got {units}")
        weight_g = None if data["weight_g"] is None else float(data["weight_g"])
        last_ts_s = None if data["last_ts_s"] is None else float(data["last_ts_s"])
        reason = None if data["reason"] is None else str(data["reason"])
        status = ShelfStatus(data["status"])
        window = [float(w) for w in data["window"]]
        pending = [float(w) for w in data["pending"]]
        table, row = self._table, self._row
        table.set_status(row, status)
        table.set_reason(row, reason)
        table.set_units(row, units)
        table.set_weight(row, weight_g)
        table.set_last_ts(row, last_ts_s)
        table.set_ignored(row, None)
        table.load_conditioner(row, window, pending, spec)

    def assign(self, other: ShelfState) -> None:
        """Overwrite this state with ``other``'s (e.g. one recalibrated apart)."""
        table, row = other.table_row
        self._table.copy_row(self._row, table, row)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], spec: ShelfSpec) -> ShelfState:
        """Restore a ``to_dict`` snapshot; raises ``ValueError`` on a foreign or bad one."""
        state = cls(spec)
        state.load(data, spec)
        return state


class ShelfStates(dict[str, ShelfState]):
    """Shelf id → `ShelfState`, every state a view of its row of one `ShelfTable` (the values
    are three-slot views, not the state: a lookup is a plain dict lookup). Setting a state
    copies its values into the shelf's row (a new shelf gets one); deleting frees the row. The
    other ways of changing a dict are refused (the table must follow every change)."""

    __slots__ = ("_specs", "table")

    def __init__(self, specs: Mapping[str, ShelfSpec]) -> None:
        super().__init__()
        self.table = ShelfTable.of(specs.values())
        self._specs = specs
        view = ShelfState.view
        table = self.table
        dict.update(self, {sid: view(table, row, sid) for sid, row in table.rows.items()})

    def row(self, shelf_id: str) -> int:
        """The shelf's row in ``table`` (KeyError: no such shelf)."""
        return self.table.rows[shelf_id]

    def __setitem__(self, shelf_id: str, state: ShelfState) -> None:
        mine = self.get(shelf_id)
        if mine is None:
            spec = self._specs.get(shelf_id)
            if spec is None:
                raise KeyError(f"no spec for shelf {shelf_id!r}")
            mine = self.add(spec)
        if state.table_row != mine.table_row:
            mine.assign(state)

    def add(self, spec: ShelfSpec) -> ShelfState:
        """A new shelf (UNKNOWN), or an existing one reset to new."""
        row = self.table.add(spec)
        view = ShelfState.view(self.table, row, spec.shelf_id)
        dict.__setitem__(self, spec.shelf_id, view)
        return view

    def __delitem__(self, shelf_id: str) -> None:
        self.table.remove(shelf_id)
        dict.__delitem__(self, shelf_id)

    def _refuse(self, *args: object, **kw: object) -> NoReturn:
        raise TypeError("ShelfStates: set, add or delete a shelf instead")

    update = pop = popitem = setdefault = clear = _refuse

    def status_counts(self) -> dict[str, int]:
        """Shelves per status value, every status present (one vectorised count over the
        table's status column)."""
        return {s._value_: n for s, n in zip(STATUSES, self.table.status_counts(), strict=True)}

    def to_dicts(self, shelf_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``{shelf id: states[shelf id].to_dict()}`` for many shelves at once: each column is
        read for all of them in one numpy operation (a group commit's shelf states)."""
        ids = list(shelf_ids)
        if len(ids) < _COLUMNS_FROM:  # (numpy's fixed cost per column read is more)
            return {sid: self[sid].to_dict() for sid in ids}
        table = self.table
        rows = [table.rows[sid] for sid in ids]
        status, reason, units, weight, last, wlen, wpos, window, plen, pending = table.columns(rows)
        statuses = [s._value_ for s in STATUSES]
        out: dict[str, dict[str, Any]] = {}
        for i, sid in enumerate(ids):
            u, w, t = units[i], weight[i], last[i]
            win = window[i][: wlen[i]]
            pos = wpos[i]
            out[sid] = {
                "v": _STATE_VERSION,
                "shelf_id": sid,
                "status": statuses[status[i]],
                "reason": reason_of(reason[i]),
                "units": None if u < 0 else u,
                "weight_g": None if w != w else w,
                "last_ts_s": None if t != t else t,
                "window": win[pos:] + win[:pos] if pos else win,
                "pending": pending[i][: plen[i]],
            }
        return out


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
    (``state`` is updated in place). The ingest hot path calls `ShelfTable.apply` on the row
    itself."""
    table, row = state.table_row
    return table.apply(row, spec, ts_s, weight_g, now_s, max_future_s)


def check_stale(
    state: ShelfState, spec: ShelfSpec, now_s: float
) -> tuple[ShelfState, tuple[ShelfEvent, ...]]:
    """Mark the shelf STALE (one event) when its newest reading is older than
    ``stale_after_s`` at ``now_s``. A shelf that never reported stays UNKNOWN."""
    table, row = state.table_row
    return state, table.check_stale(row, spec, now_s)


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
