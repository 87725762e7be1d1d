"""Domain model: shelf, SKU and reorder specifications, readings and status enums.

Specs are frozen and validated at construction: a bad value raises ``ValueError`` naming the
field, so the config layer can report the offending path and stop startup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

DERIVE: Final = -1
"""Default of the fields whose value is derived from others (``hysteresis_units``,
``settle_band_g``, ``spike_g``): pass nothing, or ``DERIVE``, to get the documented default."""


class ShelfStatus(StrEnum):
    """Health of one shelf's count."""

    UNKNOWN = "unknown"
    """No reading yet."""
    OK = "ok"
    """Settled and unambiguous: the count is current."""
    SETTLING = "settling"
    """Weight moving (pick or restock in progress): the last settled count is kept."""
    AMBIGUOUS = "ambiguous"
    """Settled but not a whole number of units (or out of range): the last count is kept."""
    STALE = "stale"
    """No fresh reading for longer than ``stale_after_s``."""


class StockState(StrEnum):
    """Stock level classification against a reorder policy."""

    OK = "ok"
    LOW = "low"
    CRITICAL = "critical"
    OUT = "out"
    UNKNOWN = "unknown"


SEVERITY_RANK: Final[dict[StockState, int]] = {
    StockState.OK: 0,
    StockState.LOW: 1,
    StockState.CRITICAL: 2,
    StockState.OUT: 3,
}
"""Order of alert severity, worst last. ``UNKNOWN`` has no rank: it is never a severity."""


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")


class OrderState(StrEnum):
    """Where an order is in its lifecycle (controller/domain/orders.py has the table)."""

    RECEIVED = "RECEIVED"
    VALIDATED = "VALIDATED"
    ALLOCATED = "ALLOCATED"
    PICKING = "PICKING"
    SORTED = "SORTED"
    PACKED = "PACKED"
    SHIPPED = "SHIPPED"
    EXCEPTION = "EXCEPTION"
    CANCELLED = "CANCELLED"


class TaskState(StrEnum):
    """Where a pick task (one tote) is (controller/domain/orders.py has the table)."""

    DISPATCHED = "DISPATCHED"
    ACCEPTED = "ACCEPTED"
    DIVERTED = "DIVERTED"
    CONFIRMED = "CONFIRMED"
    SHORT = "SHORT"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReorderPolicy:
    """When to alert for a stock level (units).

    ``hysteresis_units`` defaults to ``max(1, round(0.1 * reorder_point))``: an alert is resolved
    only once the level is above ``reorder_point + hysteresis_units`` for ``dwell_s``. A suggested
    order is rounded up to a whole number of ``pack_multiple`` units (reorder.suggested_order_qty).
    """

    reorder_point: int
    safety_stock: int
    max_stock: int
    hysteresis_units: int = DERIVE
    dwell_s: float = 5.0
    pack_multiple: int = 1
    """Units per supplier pack: a suggested order is a whole number of packs."""

    def __post_init__(self) -> None:
        if self.hysteresis_units == DERIVE:
            object.__setattr__(self, "hysteresis_units", max(1, round(0.1 * self.reorder_point)))
        # One expression for the common (valid) case: a site builds one policy per SKU at
        # start, 100k of them; the checks below name the field when it fails.
        if (
            0 <= self.safety_stock <= self.reorder_point <= self.max_stock
            and self.hysteresis_units >= 0
            and self.pack_multiple >= 1
            and 0 <= self.dwell_s < math.inf
        ):
            return
        _require(self.safety_stock >= 0, "safety_stock", "must be >= 0")
        _require(
            self.safety_stock <= self.reorder_point, "safety_stock", "must be <= reorder_point"
        )
        _require(self.reorder_point <= self.max_stock, "reorder_point", "must be <= max_stock")
        _require(self.hysteresis_units >= 0, "hysteresis_units", "must be >= 0")
        _require(self.pack_multiple >= 1, "pack_multiple", "must be >= 1")
        _require(
            math.isfinite(self.dwell_s) and self.dwell_s >= 0, "dwell_s", "must be finite, >= 0"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShelfSpec:
    """One shelf: a scale channel holding one SKU.

    ``tolerance_frac``: a unit estimate within ± this of an integer counts, else AMBIGUOUS.
    ``settle_band_g`` defaults to ``max(2.0, 0.2 * unit_weight_g)``; ``spike_g`` defaults to
    ``max(5 * unit_weight_g, 50.0)``. ``reorder`` is an optional per-shelf policy (alerts keyed
    by shelf instead of SKU).
    """

    shelf_id: str
    zone: str
    sku: str
    scale_id: str
    channel: int
    unit_weight_g: float
    tare_g: float
    capacity_units: int
    max_weight_g: float
    tolerance_frac: float = 0.3
    settle_window: int = 5
    settle_band_g: float = DERIVE
    spike_g: float = DERIVE
    stale_after_s: float = 30.0
    reorder: ReorderPolicy | None = None

    def __post_init__(self) -> None:
        if self.settle_band_g == DERIVE:
            band_g = 0.2 * self.unit_weight_g  # max(2.0, …) without a call: 100k specs at start
            object.__setattr__(self, "settle_band_g", band_g if band_g > 2.0 else 2.0)
        if self.spike_g == DERIVE:
            spike_g = 5.0 * self.unit_weight_g
            object.__setattr__(self, "spike_g", spike_g if spike_g > 50.0 else 50.0)
        # One expression for the common (valid) case (a spec per shelf at start, 100k of them;
        # NaN fails every comparison); the checks below name the field when it fails.
        if (
            self.channel >= 0
            and 0 < self.unit_weight_g < math.inf
            and 0 <= self.tare_g < self.max_weight_g < math.inf
            and self.capacity_units >= 0
            and 0 < self.tolerance_frac <= 0.5
            and self.settle_window >= 1
            and 0 <= self.settle_band_g < math.inf
            and 0 < self.spike_g < math.inf
            and 0 < self.stale_after_s < math.inf
        ):
            return
        _require(self.channel >= 0, "channel", "must be >= 0")
        _require(
            math.isfinite(self.unit_weight_g) and self.unit_weight_g > 0,
            "unit_weight_g",
            "must be finite, > 0",
        )
        _require(math.isfinite(self.tare_g) and self.tare_g >= 0, "tare_g", "must be finite, >= 0")
        _require(self.capacity_units >= 0, "capacity_units", "must be >= 0")
        _require(
            math.isfinite(self.max_weight_g) and self.max_weight_g > self.tare_g,
            "max_weight_g",
            "must be finite, > tare_g",
        )
        _require(0 < self.tolerance_frac <= 0.5, "tolerance_frac", "must be in (0, 0.5]")
        _require(self.settle_window >= 1, "settle_window", "must be >= 1")
        _require(
            math.isfinite(self.settle_band_g) and self.settle_band_g >= 0,
            "settle_band_g",
            "must be finite, >= 0",
        )
        _require(math.isfinite(self.spike_g) and self.spike_g > 0, "spike_g", "must be finite, > 0")
        _require(
            math.isfinite(self.stale_after_s) and self.stale_after_s > 0,
            "stale_after_s",
            "must be finite, > 0",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SkuSpec:
    """A stock-keeping unit and its reorder policy.

    The thresholds live once, in ``policy``; ``reorder_point``, ``safety_stock`` and
    ``max_stock`` are read-only views of it.
    """

    sku: str
    name: str
    lead_time_d: float
    policy: ReorderPolicy

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.lead_time_d) and self.lead_time_d >= 0,
            "lead_time_d",
            "must be finite, >= 0",
        )

    @property
    def reorder_point(self) -> int:
        return self.policy.reorder_point

    @property
    def safety_stock(self) -> int:
        return self.policy.safety_stock

    @property
    def max_stock(self) -> int:
        return self.policy.max_stock


class Reading(NamedTuple):
    """One weight sample from a scale channel. ``epoch`` changes when the device reboots and its
    ``seq`` restarts; ``ts_s`` is the device's Unix time. A NamedTuple: one is built per
    reading on the hot path."""

    device: str
    channel: int
    epoch: int
    seq: int
    ts_s: float
    weight_g: float
