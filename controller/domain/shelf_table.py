"""Per-shelf state in columns: one row per shelf, numpy arrays for every field.

A site of 100k shelves kept as Python objects costs a state object, a conditioner, two lists
and a float object per window value for each shelf (~0.5 kB); here a shelf is one row of
fixed-width columns (status, reason, units, weight, newest reading time, the conditioner's
window, pending suspects, median, settledness, staleness bound, and the spec values a group
is computed with: ~170 bytes at the default window of 5), and the staleness check is one
vectorised comparison over the time column (`ShelfTable.due_stale`) instead of a Python loop
over the shelves.

A group of readings (`ShelfTable.apply_group`) is computed in columns: each reading's window
is a row of one matrix, sorted in one call, so medians, settledness, counts and statuses of the
group are array operations; the shelves that are not the common case go reading by reading.

The reading-by-reading path (`ShelfTable.apply`, one call per reading) reads and writes single cells
through ``memoryview`` s of the arrays: a memoryview item is a plain Python ``int``/``float``
at list-index cost, where indexing the numpy array itself builds a numpy scalar (several
times slower). The views are rebuilt whenever the arrays are reallocated (growth).

Absent values have sentinels: ``units`` −1 (no count yet), ``weight_g`` and ``last_ts_s`` NaN.
Status and reason are small codes (`STATUSES`, `reason_code`).

This module is the one implementation of the conditioning and counting rules described in
controller/domain/scale.py and controller/domain/stock.py (whose classes are views of a row).
Single-threaded: one table belongs to one task (the ingest service's, on the main loop).
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Callable, Iterable, Mapping
from math import isfinite
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from controller.domain.events import ShelfEvent, ShelfStatusChanged, StockChanged
from controller.domain.model import ShelfSpec, ShelfStatus

MAX_FUTURE_S: Final = 60.0
"""Default tolerance for reading timestamps ahead of ``now_s``. A reading further in the future
is ignored: accepted, it would make every later (correct) reading look out of order."""

SPIKE_MIN_WINDOW: Final = 3
"""Below this a median says too little to call anything a spike."""
CONFIRM_READINGS: Final = 2
"""Consecutive agreeing suspects that are accepted as a step (the pending column's width)."""
DEFAULT_WIDTH: Final = 5
"""Window columns of a table built without specs (a spec's ``settle_window`` default)."""

STATUSES: Final[tuple[ShelfStatus, ...]] = tuple(ShelfStatus)
"""Status code → status (a code is the index)."""
STATUS_CODE: Final[dict[ShelfStatus, int]] = {s: i for i, s in enumerate(STATUSES)}
_UNKNOWN: Final = STATUS_CODE[ShelfStatus.UNKNOWN]
_OK: Final = STATUS_CODE[ShelfStatus.OK]
_SETTLING: Final = STATUS_CODE[ShelfStatus.SETTLING]
_AMBIGUOUS: Final = STATUS_CODE[ShelfStatus.AMBIGUOUS]
_STALE: Final = STATUS_CODE[ShelfStatus.STALE]

_REASONS: list[str | None] = [
    None, "settling", "settled", "below_tare", "over_capacity", "between_units", "over_range",
    "no_reading", "late_reading",
]  # fmt: skip
"""Reason code → reason. The rules only give these; a restored state may carry another (an
older release's), which gets the next code (`reason_code`)."""
_REASON_CODE: dict[str | None, int] = {r: i for i, r in enumerate(_REASONS)}
_REASON_OF: Final[tuple[str, ...]] = tuple(r or "" for r in _REASONS)
"""The reasons the rules give (every code ``apply`` emits), as non-optional strings."""
_MAX_REASONS: Final = 127  # int8
_R_SETTLING: Final = _REASON_CODE["settling"]
_R_SETTLED: Final = _REASON_CODE["settled"]
_R_OVER_RANGE: Final = _REASON_CODE["over_range"]
_R_NO_READING: Final = _REASON_CODE["no_reading"]
_R_LATE: Final = _REASON_CODE["late_reading"]
_R_ISSUE: Final = {
    issue: _REASON_CODE[issue] for issue in ("below_tare", "over_capacity", "between_units")
}

IGNORED: Final[tuple[str | None, ...]] = (None, "non_finite", "out_of_order", "future_ts")
"""Ignored-reading code → why the shelf's latest reading was ignored (0: it was applied)."""
_I_NON_FINITE, _I_OUT_OF_ORDER, _I_FUTURE = 1, 2, 3

NAN: Final = float("nan")
_NO_EVENTS: Final[tuple[ShelfEvent, ...]] = ()

RowSnapshot = tuple[int, int, int, float, float, float, bool, tuple[float, ...], tuple[float, ...]]
"""``ShelfTable.snapshot``: status, reason, units, weight, newest time, median, settled, window,
pending (codes and sentinels as stored)."""


RowsSnapshot = tuple[npt.NDArray[np.intp], tuple[npt.NDArray[Any], ...]]
"""``ShelfTable.save_rows``: the rows, and a copy of each column's cells of them."""

_ROW_COLUMNS: Final = (
    "status", "reason", "units", "weight_g", "last_ts_s", "median_g", "settled", "window_len",
    "window_pos", "window", "pending_len", "pending", "ignored",
)  # fmt: skip
"""The columns a row's state is (``stale_after_s`` follows the spec, not the readings)."""


GROUP_COLUMNS_FROM: Final = 32
"""Readings from which `ShelfTable.apply_group` computes in columns (some 100 array
operations of fixed cost); a smaller group goes through `ShelfTable.apply` one by one."""

SPEC_PARAMS: Final = (
    "settle_window", "max_weight_g", "spike_g", "settle_band_g", "tare_g", "unit_weight_g",
    "tolerance_frac", "capacity_units",
)  # fmt: skip
"""The spec values `ShelfTable.apply_group` computes with, a column each of ``spec_params``
(kept with the row's spec by `ShelfTable.add` and `ShelfTable.set_spec`)."""


_params: Callable[[ShelfSpec], tuple[float, ...]] = operator.attrgetter(*SPEC_PARAMS)
"""A spec's `SPEC_PARAMS` values, in order (a row of ``spec_params``)."""

_tag_order = operator.itemgetter(0, 1)
"""Sort key of `ShelfTable.apply_group`'s tagged events: the reading's place, then the
event's place among that reading's."""


def _cells(column: npt.NDArray[Any]) -> Any:
    """A flat memoryview of a column (native format: items are Python ints, floats, bools).
    Typed ``Any``: typeshed types every memoryview item as ``int``."""
    data: Any = column.data
    return data.cast("B").cast(column.dtype.char)


def reason_code(reason: str | None) -> int:
    """The code of ``reason`` (a new one is registered; at most 127 distinct reasons)."""
    code = _REASON_CODE.get(reason)
    if code is None:
        if len(_REASONS) >= _MAX_REASONS:
            raise ValueError(f"too many distinct shelf status reasons (new: {reason!r})")
        code = _REASON_CODE[reason] = len(_REASONS)
        _REASONS.append(reason)
    return code


def reason_of(code: int) -> str | None:
    return _REASONS[code]


def count(weight_g: float, spec: ShelfSpec) -> tuple[int, float, str | None]:
    """``(units, estimate, issue)``; ``units`` is meaningful only when ``issue`` is None
    (controller/domain/stock.py ``count_units`` states the rule)."""
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


def _summary(window: list[float], size: int, band_g: float) -> tuple[float, bool]:
    """Median and settledness of a non-empty window already trimmed to ``size``."""
    n = len(window)
    ordered = sorted(window)
    mid = n >> 1
    median_g = ordered[mid] if n & 1 else (ordered[mid - 1] + ordered[mid]) / 2.0
    return median_g, n >= (size if size < 3 else 3) and ordered[-1] - ordered[0] <= band_g


class ShelfTable:
    """Columns of per-shelf state, a row per shelf (see the module docstring).

    ``rows`` maps a shelf id to its row; ``ids`` a row to its shelf id (``None``: a free row,
    reused by the next `add`). The numpy columns are public for vectorised reads; write cells
    only through the methods (they keep the memoryviews, medians and sentinels consistent).
    """

    __slots__ = (
        "_free", "_ign", "_last", "_med", "_pend", "_plen", "_reason", "_set", "_stale_after",
        "_status", "_units", "_weight", "_win", "_wlen", "_wpos", "ids", "ignored", "last_ts_s",
        "median_g", "pending", "pending_len", "reason", "rows", "settled", "spec_params",
        "stale_after_s",
        "status", "units", "weight_g", "width", "window", "window_len", "window_pos",
    )  # fmt: skip

    def __init__(self, capacity: int = 0, *, width: int = DEFAULT_WIDTH) -> None:
        self.width = max(1, width)
        self.rows: dict[str, int] = {}
        self.ids: list[str | None] = []
        self._free: list[int] = []
        self._allocate(max(1, capacity))

    @classmethod
    def of(cls, specs: Iterable[ShelfSpec]) -> ShelfTable:
        """A table with a new (UNKNOWN) row for each spec, in order."""
        specs = list(specs)
        width = max((s.settle_window for s in specs), default=DEFAULT_WIDTH)
        table = cls(len(specs), width=max(width, DEFAULT_WIDTH))
        ids: list[str | None] = [s.shelf_id for s in specs]
        rows = {sid: row for row, sid in enumerate(ids) if sid is not None}
        if len(rows) != len(ids):  # a shelf twice: the later spec wins, as add() would
            for spec in specs:
                table.add(spec)
            return table
        # New columns are already cleared (a shelf that never reported): only the ids and
        # the staleness bounds to set, in bulk.
        table.ids = ids
        table.rows = rows
        table.stale_after_s[: len(specs)] = [s.stale_after_s for s in specs]
        if specs:
            table.spec_params[: len(specs)] = [_params(s) for s in specs]
        return table

    # -- storage -------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        """Columns for ``capacity`` rows (existing rows copied over)."""
        old = len(self.ids) if hasattr(self, "status") else 0
        w = self.width

        def column(dtype: npt.DTypeLike, fill: float | int, name: str) -> npt.NDArray[Any]:
            shape: tuple[int, ...] = (capacity,)
            if name == "window":
                shape = (capacity, w)
            elif name == "pending":
                shape = (capacity, CONFIRM_READINGS)
            elif name == "spec_params":
                shape = (capacity, len(SPEC_PARAMS))
            new = np.full(shape, fill, dtype=dtype)
            if old:
                prev = getattr(self, name)
                new[: prev.shape[0], ...] = prev
            return new

        self.status = column(np.int8, _UNKNOWN, "status")
        self.reason = column(np.int8, 0, "reason")
        self.units = column(np.int64, -1, "units")
        self.weight_g = column(np.float64, NAN, "weight_g")
        self.last_ts_s = column(np.float64, NAN, "last_ts_s")
        self.median_g = column(np.float64, 0.0, "median_g")
        self.settled = column(np.bool_, False, "settled")
        self.window_len = column(np.uint8, 0, "window_len")
        self.window_pos = column(np.uint8, 0, "window_pos")
        self.window = column(np.float64, 0.0, "window")
        self.pending_len = column(np.uint8, 0, "pending_len")
        self.pending = column(np.float64, 0.0, "pending")
        self.stale_after_s = column(np.float64, NAN, "stale_after_s")
        self.spec_params = column(np.float64, NAN, "spec_params")
        self.ignored = column(np.int8, 0, "ignored")
        self._views()

    def _views(self) -> None:
        self._status = _cells(self.status)
        self._reason = _cells(self.reason)
        self._units = _cells(self.units)
        self._weight = _cells(self.weight_g)
        self._last = _cells(self.last_ts_s)
        self._med = _cells(self.median_g)
        self._set = _cells(self.settled)
        self._wlen = _cells(self.window_len)
        self._wpos = _cells(self.window_pos)
        self._win = _cells(self.window)  # flat: row * width + i
        self._plen = _cells(self.pending_len)
        self._pend = _cells(self.pending)
        self._stale_after = _cells(self.stale_after_s)
        self._ign = _cells(self.ignored)

    @property
    def capacity(self) -> int:
        return int(self.status.shape[0])

    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        """Bytes held by the columns."""
        return sum(
            int(getattr(self, n).nbytes)
            for n in (
                "status", "reason", "units", "weight_g", "last_ts_s", "median_g", "settled",
                "window_len", "window_pos", "window", "pending_len", "pending", "stale_after_s",
                "spec_params",
                "ignored",
            )
        )  # fmt: skip

    def add(self, spec: ShelfSpec) -> int:
        """A new row for ``spec``'s shelf (UNKNOWN, no reading); its row number. A shelf that
        already has a row keeps it (reset to new)."""
        sid = spec.shelf_id
        if spec.settle_window > self.width:
            self._widen(spec.settle_window)
        row = self.rows.get(sid)
        if row is None:
            if self._free:
                row = self._free.pop()
                self.ids[row] = sid
            else:
                row = len(self.ids)
                if row >= self.capacity:
                    self._allocate(max(8, 2 * self.capacity))
                self.ids.append(sid)
            self.rows[sid] = row
        self.clear(row)
        self._stale_after[row] = spec.stale_after_s
        self.spec_params[row] = _params(spec)
        return row

    def remove(self, shelf_id: str) -> None:
        """Free the shelf's row (KeyError when it has none)."""
        row = self.rows.pop(shelf_id)
        self.clear(row)
        self._stale_after[row] = NAN
        self.spec_params[row] = NAN
        self.ids[row] = None
        self._free.append(row)

    def set_spec(self, row: int, spec: ShelfSpec) -> None:
        """The row's shelf has a new spec (calibration, catalogue change): its staleness
        bound and window width follow."""
        if spec.settle_window > self.width:
            self._widen(spec.settle_window)
        self._stale_after[row] = spec.stale_after_s
        self.spec_params[row] = _params(spec)

    def _widen(self, width: int) -> None:
        window = self.window
        self.width = width
        self.window = np.zeros((window.shape[0], width), dtype=np.float64)
        self.window[:, : window.shape[1]] = window
        self._views()

    def clear(self, row: int) -> None:
        """The row back to a shelf that never reported."""
        self._status[row] = _UNKNOWN
        self._reason[row] = 0
        self._units[row] = -1
        self._weight[row] = NAN
        self._last[row] = NAN
        self._ign[row] = 0
        self.reset_window(row)

    # -- cells (`ShelfState` reads status, units, weight and time straight from the views:
    # a state is read per item of every list answer) -------------------------------------
    def set_status(self, row: int, status: ShelfStatus) -> None:
        self._status[row] = STATUS_CODE[status]

    def get_reason(self, row: int) -> str | None:
        code: int = self._reason[row]
        return _REASONS[code]

    def set_reason(self, row: int, reason: str | None) -> None:
        self._reason[row] = reason_code(reason)

    def set_units(self, row: int, units: int | None) -> None:
        if units is not None and units < 0:
            raise ValueError(f"units must be >= 0, got {units}")
        self._units[row] = -1 if units is None else units

    def set_weight(self, row: int, weight_g: float | None) -> None:
        self._weight[row] = NAN if weight_g is None else weight_g

    def set_last_ts(self, row: int, ts_s: float | None) -> None:
        self._last[row] = NAN if ts_s is None else ts_s

    def get_ignored(self, row: int) -> str | None:
        code: int = self._ign[row]
        return IGNORED[code]

    def set_ignored(self, row: int, reason: str | None) -> None:
        self._ign[row] = IGNORED.index(reason)

    def get_window(self, row: int) -> list[float]:
        """The window, oldest first. A full window is a ring: ``window_pos`` is its oldest
        cell (the next one written)."""
        base = row * self.width
        window: list[float] = self._win[base : base + self._wlen[row]].tolist()
        pos = self._wpos[row]
        return window[pos:] + window[:pos] if pos else window

    def get_pending(self, row: int) -> list[float]:
        base = row * CONFIRM_READINGS
        pending: list[float] = self._pend[base : base + self._plen[row]].tolist()
        return pending

    def is_settled(self, row: int) -> bool:
        return bool(self._set[row])

    def median(self, row: int) -> float | None:
        """The window's median, or None when it is empty."""
        median_g: float = self._med[row]
        return median_g if self._wlen[row] else None

    def load_conditioner(
        self, row: int, window: Iterable[float], pending: Iterable[float], spec: ShelfSpec
    ) -> None:
        """Set the row's window and pending suspects (a restore): the window keeps its newest
        ``settle_window`` values, pending its newest ``CONFIRM_READINGS``."""
        pend = [float(w) for w in pending][-CONFIRM_READINGS:]
        base = row * CONFIRM_READINGS
        for i, w in enumerate(pend):
            self._pend[base + i] = w
        self._plen[row] = len(pend)
        self._set_window(row, [float(w) for w in window], spec)

    def _set_window(self, row: int, window: list[float], spec: ShelfSpec) -> None:
        size = spec.settle_window
        if size > self.width:
            self._widen(size)
        if len(window) > size:
            del window[: len(window) - size]
        n = len(window)
        base = row * self.width
        if n:
            self._win[base : base + n] = array("d", window)
            median_g, settled = _summary(window, size, spec.settle_band_g)
        else:
            median_g, settled = 0.0, False
        self._wlen[row] = n
        self._wpos[row] = 0
        self._med[row] = median_g
        self._set[row] = settled

    def reset_window(self, row: int) -> None:
        """Forget the conditioner's readings (after a gap or an over-range reading)."""
        self._wlen[row] = 0
        self._wpos[row] = 0
        self._plen[row] = 0
        self._med[row] = 0.0
        self._set[row] = False

    def snapshot(self, row: int) -> RowSnapshot:
        """What `restore` needs to bring the row back (rollback of a group): taken on the hot
        path at a shelf's first reading of a group, so the cells are read straight."""
        n = self._wlen[row]
        base = row * self.width
        if n:
            window: tuple[float, ...] = tuple(self._win[base : base + n].tolist())
            pos = self._wpos[row]
            if pos:
                window = window[pos:] + window[:pos]
        else:
            window = ()
        plen = self._plen[row]
        pbase = row * CONFIRM_READINGS
        return (
            self._status[row],
            self._reason[row],
            self._units[row],
            self._weight[row],
            self._last[row],
            self._med[row],
            self._set[row],
            window,
            tuple(self._pend[pbase : pbase + plen].tolist()) if plen else (),
        )

    def columns(self, rows: list[int]) -> tuple[list[Any], ...]:
        """Status codes, reason codes, units, weights, newest times, window lengths, window
        positions, window rows, pending lengths and pending rows of ``rows`` (Python lists,
        one numpy read per column; sentinels as stored)."""
        idx = np.asarray(rows, dtype=np.intp)
        return (
            self.status[idx].tolist(),
            self.reason[idx].tolist(),
            self.units[idx].tolist(),
            self.weight_g[idx].tolist(),
            self.last_ts_s[idx].tolist(),
            self.window_len[idx].tolist(),
            self.window_pos[idx].tolist(),
            self.window[idx].tolist(),
            self.pending_len[idx].tolist(),
            self.pending[idx].tolist(),
        )

    def cells(
        self, row: int
    ) -> tuple[ShelfStatus, str | None, int | None, float | None, float | None]:
        """The row's status, reason, units, weight and newest reading time (None for absent
        values), read in one call (a state's JSON form is built from them per commit)."""
        units: int = self._units[row]
        weight_g: float = self._weight[row]
        ts_s: float = self._last[row]
        return (
            STATUSES[self._status[row]],
            _REASONS[self._reason[row]],
            None if units < 0 else units,
            None if weight_g != weight_g else weight_g,
            None if ts_s != ts_s else ts_s,
        )

    def restore(self, row: int, snap: RowSnapshot) -> None:
        """The row as `snapshot` saw it."""
        status, reason, units, weight_g, last_ts_s, median_g, settled, window, pending = snap
        self._status[row] = status
        self._reason[row] = reason
        self._units[row] = units
        self._weight[row] = weight_g
        self._last[row] = last_ts_s
        self._ign[row] = 0
        n = len(window)
        base = row * self.width
        if n:
            self._win[base : base + n] = array("d", window)
        self._wlen[row] = n
        self._wpos[row] = 0
        pbase = row * CONFIRM_READINGS
        for i, w in enumerate(pending):
            self._pend[pbase + i] = w
        self._plen[row] = len(pending)
        self._med[row] = median_g
        self._set[row] = settled

    def copy_row(self, row: int, source: ShelfTable, source_row: int) -> None:
        """Copy another table's row into ``row`` (a state computed apart, installed)."""
        snap = source.snapshot(source_row)
        if len(snap[7]) > self.width:
            self._widen(len(snap[7]))
        self.restore(row, snap)
        self._ign[row] = source._ign[source_row]

    # -- the rules ---------------------------------------------------------------------------
    def push(self, row: int, weight_g: float, spec: ShelfSpec) -> tuple[bool, float, bool]:
        """Feed one reading to the row's conditioner; ``(settled, median, spike)`` (the rules:
        controller/domain/scale.py)."""
        n = self._wlen[row]
        if n >= SPIKE_MIN_WINDOW and abs(weight_g - self._med[row]) > spec.spike_g:
            plen = self._plen[row]
            pbase = row * CONFIRM_READINGS
            pend = self._pend
            if plen and abs(weight_g - pend[pbase + plen - 1]) <= spec.settle_band_g:
                # Two agreeing suspects (CONFIRM_READINGS): a step, the new window.
                suspects: list[float] = pend[pbase : pbase + plen].tolist()
                suspects.append(weight_g)
                self._plen[row] = 0
                self._set_window(row, suspects, spec)
                return bool(self._set[row]), self._med[row], False
            pend[pbase] = weight_g
            self._plen[row] = 1
            return bool(self._set[row]), self._med[row], True
        if self._plen[row]:
            self._plen[row] = 0
        size = spec.settle_window
        base = row * self.width
        win = self._win
        if n == size:  # full: the new value replaces the oldest (the ring's position)
            pos = self._wpos[row]
            win[base + pos] = weight_g
            pos += 1
            self._wpos[row] = pos if pos < size else 0
        elif n < size and not self._wpos[row] and size <= self.width:
            win[base + n] = weight_g
            n += 1
            self._wlen[row] = n
        else:  # the spec's window changed size: an ordered window again
            window = self.get_window(row)
            window.append(weight_g)
            self._set_window(row, window, spec)
            return bool(self._set[row]), self._med[row], False
        values: list[float] = win[base : base + n].tolist()
        values.sort()
        mid = n >> 1
        median_g = values[mid] if n & 1 else (values[mid - 1] + values[mid]) / 2.0
        settled = n >= (size if size < 3 else 3) and values[-1] - values[0] <= spec.settle_band_g
        self._med[row] = median_g
        self._set[row] = settled
        return settled, median_g, False

    def apply(
        self,
        row: int,
        spec: ShelfSpec,
        ts_s: float,
        weight_g: float,
        now_s: float,
        max_future_s: float = MAX_FUTURE_S,
    ) -> tuple[ShelfEvent, ...]:
        """Apply one reading of the row's shelf; the events (the rules:
        controller/domain/stock.py ``apply_reading``). The ingest hot path."""
        last_ts_s: float = self._last[row]
        if not (isfinite(weight_g) and isfinite(ts_s)):
            self._ign[row] = _I_NON_FINITE
            return _NO_EVENTS
        seen = last_ts_s == last_ts_s  # not NaN: the shelf has a reading
        if seen and ts_s < last_ts_s:
            self._ign[row] = _I_OUT_OF_ORDER
            return _NO_EVENTS
        if ts_s > now_s + max_future_s:
            self._ign[row] = _I_FUTURE
            return _NO_EVENTS
        self._ign[row] = 0
        self._last[row] = ts_s
        stale_after_s = spec.stale_after_s
        if seen and ts_s - last_ts_s > stale_after_s:
            self.reset_window(row)

        events: tuple[ShelfEvent, ...] = _NO_EVENTS
        if weight_g > spec.max_weight_g:
            self.reset_window(row)
            status, reason = _AMBIGUOUS, _R_OVER_RANGE
        else:
            n = self._wlen[row]
            size = spec.settle_window
            if n == size and not self._plen[row] and abs(weight_g - self._med[row]) <= spec.spike_g:
                # `push`'s common case inlined (a full window, no suspect pending, no spike):
                # the new value replaces the oldest.
                base = row * self.width
                pos = self._wpos[row]
                win = self._win
                win[base + pos] = weight_g
                pos += 1
                self._wpos[row] = pos if pos < size else 0
                values: list[float] = win[base : base + n].tolist()
                values.sort()
                mid = n >> 1
                median_g = values[mid] if n & 1 else (values[mid - 1] + values[mid]) / 2.0
                settled = (
                    n >= (size if size < 3 else 3) and values[-1] - values[0] <= spec.settle_band_g
                )
                self._med[row] = median_g
                self._set[row] = settled
            else:
                settled, median_g, _spike = self.push(row, weight_g, spec)
            self._weight[row] = median_g
            if not settled:
                status, reason = _SETTLING, _R_SETTLING
            else:
                units, _estimate, issue = count(median_g, spec)
                if issue is not None:
                    status, reason = _AMBIGUOUS, _R_ISSUE[issue]
                else:
                    status, reason = _OK, _R_SETTLED
                    old_units: int = self._units[row]
                    if units != old_units:
                        self._units[row] = units
                        events = (
                            StockChanged(
                                spec.shelf_id,
                                spec.sku,
                                None if old_units < 0 else old_units,
                                units,
                                ts_s,
                            ),
                        )
        if now_s - ts_s > stale_after_s:
            status, reason = _STALE, _R_LATE

        old_status: int = self._status[row]
        if status != old_status:
            self._status[row] = status
            self._reason[row] = reason
            events = (
                *events,
                ShelfStatusChanged(
                    spec.shelf_id, STATUSES[old_status], STATUSES[status], ts_s, _REASON_OF[reason]
                ),
            )
        return events

    # -- a group of readings at once -------------------------------------------------------
    def save_rows(self, rows: npt.NDArray[np.intp]) -> RowsSnapshot:
        """Every cell of ``rows`` (copies), for `restore_rows`: a group's rollback."""
        return rows, tuple(getattr(self, name)[rows] for name in _ROW_COLUMNS)

    def restore_rows(self, saved: RowsSnapshot) -> None:
        """``rows`` as `save_rows` saw them."""
        rows, columns = saved
        for name, values in zip(_ROW_COLUMNS, columns, strict=True):
            column = getattr(self, name)
            if name == "window" and values.shape[1] != column.shape[1]:  # widened since
                column[rows] = 0.0
                column[rows, : values.shape[1]] = values
            else:
                column[rows] = values

    def apply_group(
        self,
        rows: npt.NDArray[np.intp],
        ts_s: npt.NDArray[np.float64],
        weights_g: npt.NDArray[np.float64],
        specs: Mapping[int, ShelfSpec],
        now_s: float,
        max_future_s: float = MAX_FUTURE_S,
    ) -> tuple[list[ShelfEvent], RowsSnapshot]:
        """`apply` for many readings at once, in arrival order (``rows[i]``, ``ts_s[i]``,
        ``weights_g[i]``; ``specs``: each row's spec). The same states and the same events, in
        the order `apply` would give them one reading after the other.

        A shelf whose readings are the common case (a full window, no suspect pending, in
        order, no spike, no gap, in range) is computed in columns: each reading's window is
        one row of a matrix gathered from the shelf's window and the group's readings, sorted
        in one call, so the medians, settledness, counts and statuses of the whole group are a
        few array operations. Any other shelf's readings go through `apply` one by one (its
        readings only: shelves are independent). Returns the events and the rows as they were
        before (`restore_rows` undoes the group)."""
        n = len(rows)
        if not n or n < GROUP_COLUMNS_FROM:  # one by one: cheaper than the arrays' fixed cost
            saved = self.save_rows(np.unique(rows))
            t_list, w_list = ts_s.tolist(), weights_g.tolist()
            events: list[ShelfEvent] = []
            for row, t, w in zip(rows.tolist(), t_list, w_list, strict=True):
                events.extend(self.apply(row, specs[row], t, w, now_s, max_future_s))
            return events, saved
        tagged, saved_first = self._tagged_group(
            rows, ts_s, weights_g, np.arange(n), specs, now_s, max_future_s, fill_first=True
        )
        assert saved_first is not None
        tagged.sort(key=_tag_order)
        return [ev for _, _, ev in tagged], saved_first

    def _tagged_group(
        self,
        rows: npt.NDArray[np.intp],
        ts_s: npt.NDArray[np.float64],
        weights_g: npt.NDArray[np.float64],
        origin: npt.NDArray[np.intp],
        specs: Mapping[int, ShelfSpec],
        now_s: float,
        max_future_s: float,
        *,
        fill_first: bool,
    ) -> tuple[list[tuple[int, int, ShelfEvent]], RowsSnapshot | None]:
        """`apply_group`'s work: the events tagged with their reading's place in the group
        (``origin[i]``, the nth event of it), unsorted; and, with ``fill_first``, the rows as
        they were before. With ``fill_first``, a shelf whose window is not full yet (a first
        start, a new shelf) and holds no suspect first gets its first readings, up to a full
        window, through `apply`; the group's other readings are then computed as usual, that
        shelf's rest in columns too."""
        n = len(rows)
        order = np.argsort(rows, kind="stable")
        r = rows[order]
        t = ts_s[order]
        w = weights_g[order]
        first = np.empty(n, dtype=np.bool_)
        first[0] = True
        np.not_equal(r[1:], r[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        ends = np.empty_like(starts)
        ends[:-1] = starts[1:] - 1
        ends[-1] = n - 1
        seg = np.cumsum(first) - 1
        u = r[starts]
        saved = self.save_rows(u) if fill_first else None
        ulist = u.tolist()
        params = self.spec_params[u]
        size = params[:, 0].astype(np.intp)
        max_weight, spike_g, band_g, tare_u, unit_u, tol_u, cap_u = params[:, 1:].T
        if fill_first:
            filling = np.flatnonzero((self.window_len[u] < size) & (self.pending_len[u] == 0))
            if len(filling):
                # Their first readings, up to a full window each, through `apply`; then the
                # group's other readings as a group of their own (a shelf still not full then
                # goes one by one). Shelves are independent and each shelf's readings keep
                # their order, so the tags merge the two in arrival order.
                take = np.minimum(
                    size[filling] - self.window_len[u[filling]], ends[filling] - starts[filling] + 1
                )
                consumed = np.zeros(n, dtype=np.bool_)
                ts_sorted, w_sorted = t.tolist(), w.tolist()
                at = origin[order].tolist()
                filled: list[tuple[int, int, ShelfEvent]] = []
                for j, m in zip(filling.tolist(), take.tolist(), strict=True):
                    first_i = int(starts[j])
                    self._one_by_one(
                        ulist[j], specs, range(first_i, first_i + m), ts_sorted, w_sorted, at,
                        now_s, max_future_s, filled,
                    )  # fmt: skip
                    consumed[first_i : first_i + m] = True
                rest = np.sort(order[~consumed])  # their places in the input: arrival order
                if len(rest):
                    more, _ = self._tagged_group(
                        rows[rest], ts_s[rest], weights_g[rest], origin[rest], specs, now_s,
                        max_future_s, fill_first=False,
                    )  # fmt: skip
                    filled.extend(more)
                return filled, saved
        stale = self.stale_after_s[u]
        last_u = self.last_ts_s[u]
        med_u = self.median_g[u]
        # The shelves that can be computed in columns: a full window, nothing pending.
        full = (self.window_len[u] == size) & (self.pending_len[u] == 0) & ~np.isnan(last_u)
        prev_t = np.empty(n)
        prev_t[1:] = t[:-1]
        prev_t[starts] = last_u
        bad = ~(np.isfinite(t) & np.isfinite(w))
        bad |= t < prev_t  # out of order: ignored
        bad |= (t - prev_t) > stale[seg]  # after a gap: settling starts over
        bad |= t > now_s + max_future_s
        bad |= w > max_weight[seg]
        med = np.zeros(n)
        settled = np.zeros(n, dtype=np.bool_)
        windows: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.float64], int]] = []
        for s in sorted(set(size[full].tolist())):  # (np.unique: ~50 µs of fixed cost)
            cls = np.flatnonzero(full & (size == s))
            k = ends[cls] - starts[cls] + 1
            local = np.repeat(np.arange(len(cls)), k)
            pos = np.arange(len(local)) - np.repeat(np.cumsum(k) - k, k)
            at = starts[cls][local] + pos  # the readings, in sorted order
            span = s + k
            offset = np.cumsum(span) - span
            # Per shelf: its window oldest first, then its readings of the group.
            seq = np.empty(int(span.sum()))
            shelves = u[cls]
            ring = (self.window_pos[shelves].astype(np.intp)[:, None] + np.arange(s)) % s
            old = self.window[shelves[:, None], ring]
            seq[(offset[:, None] + np.arange(s)).ravel()] = old.ravel()
            own = offset[local] + s + pos
            seq[own] = w[at]
            win = seq[own[:, None] - (s - 1) + np.arange(s)]  # the window after each reading
            win.sort(axis=1)
            mid = s >> 1
            med[at] = win[:, mid] if s & 1 else (win[:, mid - 1] + win[:, mid]) / 2.0
            settled[at] = (win[:, -1] - win[:, 0]) <= band_g[cls][local]
            windows.append((cls, seq[(offset + k)[:, None] + np.arange(s)], s))
        prev_med = np.empty(n)
        prev_med[1:] = med[:-1]
        prev_med[starts] = med_u
        bad |= (size[seg] >= SPIKE_MIN_WINDOW) & (np.abs(w - prev_med) > spike_g[seg])
        fast = full & ~np.logical_or.reduceat(bad, starts)

        # Counts and statuses of every reading (used for the fast shelves only).
        tare, unit, tol, cap = tare_u[seg], unit_u[seg], tol_u[seg], cap_u[seg]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            estimate = (med - tare) / unit
            below = estimate < -tol
            over = estimate > cap + tol
            rounded = np.round(estimate)
            between = np.abs(estimate - rounded) > tol
            issue = below | over | between
            ok = settled & ~issue
            units = np.where(ok, np.maximum(rounded, 0.0), -1.0).astype(np.int64)
        status = np.where(settled, np.where(issue, _AMBIGUOUS, _OK), _SETTLING)
        reason = np.where(
            settled,
            np.where(
                below,
                _R_ISSUE["below_tare"],
                np.where(
                    over,
                    _R_ISSUE["over_capacity"],
                    np.where(between, _R_ISSUE["between_units"], _R_SETTLED),
                ),
            ),
            _R_SETTLING,
        )
        late = (now_s - t) > stale[seg]
        status[late] = _STALE
        reason[late] = _R_LATE
        index = np.arange(n)
        # The count after each reading: the newest settled, unambiguous one of the shelf.
        newest_ok = np.maximum.accumulate(np.where(ok, index, -1))
        units_u = self.units[u]
        units_after = np.where(
            newest_ok >= starts[seg], units[np.maximum(newest_ok, 0)], units_u[seg]
        )
        units_before = np.empty(n, dtype=np.int64)
        units_before[1:] = units_after[:-1]
        units_before[starts] = units_u
        status_u = self.status[u]
        status_before = np.empty(n, dtype=status_u.dtype)
        status_before[1:] = status[:-1]
        status_before[starts] = status_u
        stock_event = ok & (units != units_before)
        status_event = status != status_before
        # A shelf's reason changes with its status only.
        newest_change = np.maximum.accumulate(np.where(status_event, index, -1))
        last_change = newest_change[ends]
        reason_end = np.where(
            last_change >= starts, reason[np.maximum(last_change, 0)], self.reason[u]
        )

        # Write the fast shelves' rows.
        fs = np.flatnonzero(fast)
        if len(fs):
            fu, fe = u[fs], ends[fs]
            self.last_ts_s[fu] = t[fe]
            self.ignored[fu] = 0
            self.median_g[fu] = med[fe]
            self.weight_g[fu] = med[fe]
            self.settled[fu] = settled[fe]
            self.units[fu] = units_after[fe]
            self.status[fu] = status[fe]
            self.reason[fu] = reason_end[fs]
            for cls, window, s in windows:
                keep = fast[cls]
                self.window[u[cls[keep]], :s] = window[keep]
                self.window_pos[u[cls[keep]]] = 0

        # Events, tagged with their reading's place in the group.
        tagged: list[tuple[int, int, ShelfEvent]] = []
        fast_reading = fast[seg]
        at_of = origin[order]
        for i in np.flatnonzero(fast_reading & (stock_event | status_event)).tolist():
            spec = specs[ulist[seg[i]]]
            ts = float(t[i])
            at_i = int(at_of[i])
            if stock_event[i]:
                old_units = int(units_before[i])
                tagged.append(
                    (
                        at_i,
                        0,
                        StockChanged(
                            spec.shelf_id,
                            spec.sku,
                            None if old_units < 0 else old_units,
                            int(units[i]),
                            ts,
                        ),
                    )
                )
            if status_event[i]:
                tagged.append(
                    (
                        at_i,
                        1,
                        ShelfStatusChanged(
                            spec.shelf_id,
                            STATUSES[int(status_before[i])],
                            STATUSES[int(status[i])],
                            ts,
                            _REASON_OF[int(reason[i])],
                        ),
                    )
                )
        slow = np.flatnonzero(~fast)
        if len(slow):
            t_list, w_list, order_list = t.tolist(), w.tolist(), at_of.tolist()
            for j in slow.tolist():
                self._one_by_one(
                    ulist[j], specs, range(int(starts[j]), int(ends[j]) + 1), t_list, w_list,
                    order_list, now_s, max_future_s, tagged,
                )  # fmt: skip
        return tagged, saved

    def _one_by_one(
        self,
        row: int,
        specs: Mapping[int, ShelfSpec],
        readings: range,
        ts_s: list[float],
        weights_g: list[float],
        at: list[int],
        now_s: float,
        max_future_s: float,
        out: list[tuple[int, int, ShelfEvent]],
    ) -> None:
        """`apply` one shelf's ``readings`` (places in the sorted group), each event tagged
        with its reading's place in the group (``at``) and its rank among that reading's."""
        spec = specs[row]
        for i in readings:
            for nth, ev in enumerate(
                self.apply(row, spec, ts_s[i], weights_g[i], now_s, max_future_s)
            ):
                out.append((at[i], nth, ev))

    def check_stale(self, row: int, spec: ShelfSpec, now_s: float) -> tuple[ShelfEvent, ...]:
        """STALE (one event) when the row's newest reading is older than ``stale_after_s`` at
        ``now_s``; a shelf that never reported stays UNKNOWN."""
        last_ts_s: float = self._last[row]
        status: int = self._status[row]
        if last_ts_s != last_ts_s or status == _STALE or now_s - last_ts_s <= spec.stale_after_s:
            return _NO_EVENTS
        self._status[row] = _STALE
        self._reason[row] = _R_NO_READING
        old = STATUSES[status]
        return (ShelfStatusChanged(spec.shelf_id, old, ShelfStatus.STALE, now_s, "no_reading"),)

    def status_counts(self) -> list[int]:
        """Shelves per status code (index: the code; free rows not counted)."""
        used = len(self.ids)
        counts: list[int] = np.bincount(self.status[:used], minlength=len(STATUSES)).tolist()
        counts[_UNKNOWN] -= len(self._free)  # a free row is cleared to UNKNOWN
        return counts

    def due_stale(self, now_s: float) -> npt.NDArray[np.intp]:
        """Rows whose newest reading is older than their staleness bound at ``now_s`` and that
        are not STALE yet (vectorised: never-reported and free rows hold NaN times and never
        qualify)."""
        with np.errstate(invalid="ignore"):
            late = (now_s - self.last_ts_s) > self.stale_after_s
        late &= self.status != _STALE
        return np.flatnonzero(late)
