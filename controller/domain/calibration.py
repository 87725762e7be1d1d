"""Shelf calibration at run time: tare, unit weight and a per-channel scale factor.

A ``ShelfCalibration`` overrides the site file's values for one shelf (``None`` keeps the file's
value). ``calibrated_spec`` derives the shelf's spec from the file's spec and the override;
``recalibrate`` carries a shelf's state over to the new spec and recounts its units at once
from the settled weight, so a tare or a new unit weight changes the count without waiting for
the next reading.

The scale factor is a gain on the channel's raw grams (``grams = raw × factor``); the shelf's
conditioning window holds corrected grams, so a new factor rescales the window by
``new / old``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from controller.domain.events import ShelfEvent, ShelfStatusChanged, StockChanged
from controller.domain.model import DERIVE, ShelfSpec, ShelfStatus
from controller.domain.stock import ShelfState, count_units

MIN_SCALE_FACTOR: Final = 0.5
MAX_SCALE_FACTOR: Final = 2.0
MIN_UNIT_WEIGHT_G: Final = 0.1
_STATE_VERSION: Final = 1


class CalibrationError(ValueError):
    """A calibration value outside its bounds, or inconsistent with the shelf's scale."""


class NotSettled(CalibrationError):
    """The shelf's weight is not settled: there is no gross weight to tare to."""


@dataclass(frozen=True, slots=True)
class ShelfCalibration:
    """Override of one shelf's calibration (``None``: the site file's value)."""

    shelf_id: str
    tare_g: float | None = None
    unit_weight_g: float | None = None
    scale_factor: float = 1.0
    updated_at_s: float = 0.0
    updated_by: str = ""

    @property
    def empty(self) -> bool:
        """Nothing overridden."""
        return self.tare_g is None and self.unit_weight_g is None and self.scale_factor == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": _STATE_VERSION,
            "shelf_id": self.shelf_id,
            "tare_g": self.tare_g,
            "unit_weight_g": self.unit_weight_g,
            "scale_factor": self.scale_factor,
            "updated_at_s": self.updated_at_s,
            "updated_by": self.updated_by,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShelfCalibration:
        if data.get("v") != _STATE_VERSION:
            raise ValueError(f"unsupported ShelfCalibration version: {data.get('v')!r}")
        tare_g = data["tare_g"]
        unit_weight_g = data["unit_weight_g"]
        return cls(
            str(data["shelf_id"]),
            None if tare_g is None else float(tare_g),
            None if unit_weight_g is None else float(unit_weight_g),
            float(data["scale_factor"]),
            float(data["updated_at_s"]),
            str(data["updated_by"]),
        )


def calibrated_spec(base: ShelfSpec, cal: ShelfCalibration | None) -> ShelfSpec:
    """``base`` (from the site file) with ``cal``'s overrides; ``CalibrationError`` when the
    result is not a valid shelf (tare at or above the scale's range, a unit that does not fit).
    The settle band and spike threshold follow the unit weight (their documented defaults)."""
    if cal is None or cal.empty:
        return base
    factor = cal.scale_factor
    if not (math.isfinite(factor) and MIN_SCALE_FACTOR <= factor <= MAX_SCALE_FACTOR):
        raise CalibrationError(
            f"scale_factor must be in [{MIN_SCALE_FACTOR}, {MAX_SCALE_FACTOR}], got {factor}"
        )
    unit_g = base.unit_weight_g if cal.unit_weight_g is None else cal.unit_weight_g
    tare_g = base.tare_g if cal.tare_g is None else cal.tare_g
    if not (math.isfinite(unit_g) and unit_g >= MIN_UNIT_WEIGHT_G):
        raise CalibrationError(f"unit_weight_g must be >= {MIN_UNIT_WEIGHT_G}, got {unit_g}")
    if not (math.isfinite(tare_g) and 0 <= tare_g < base.max_weight_g):
        raise CalibrationError(
            f"tare_g must be in [0, {base.max_weight_g:g}) (the scale's range), got {tare_g:g}"
        )
    if tare_g + unit_g > base.max_weight_g:
        raise CalibrationError(
            f"one unit of {unit_g:g} g on a tare of {tare_g:g} g exceeds the scale's range "
            f"({base.max_weight_g:g} g)"
        )
    try:
        return dataclasses.replace(
            base, unit_weight_g=unit_g, tare_g=tare_g, settle_band_g=DERIVE, spike_g=DERIVE
        )
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


def settled_gross_g(state: ShelfState) -> float:
    """The shelf's current settled gross weight (to tare to); ``NotSettled`` when the weight is
    moving, has no fresh reading, or was never seen."""
    weight_g = state.conditioner.weight_g
    if state.status in (ShelfStatus.UNKNOWN, ShelfStatus.STALE) or weight_g is None:
        raise NotSettled(f"shelf {state.shelf_id} has no fresh reading (status {state.status})")
    if state.status is ShelfStatus.SETTLING or not state.conditioner.settled:
        raise NotSettled(f"shelf {state.shelf_id} is not settled (status {state.status})")
    return weight_g


def recalibrate(
    state: ShelfState, new_spec: ShelfSpec, gain: float, now_s: float
) -> tuple[ShelfState, tuple[ShelfEvent, ...]]:
    """A new state for ``new_spec`` (``state`` is not touched): the window rescaled by ``gain``
    (new factor / old factor) and, when the weight is settled and fresh, the units recounted.
    Events are stamped ``now_s``. A moving, stale or unknown shelf keeps its count: the next
    settled reading counts with the new spec."""
    body = state.to_dict()
    if gain != 1.0:
        body["window"] = [w * gain for w in body["window"]]
        body["pending"] = [w * gain for w in body["pending"]]
        if body["weight_g"] is not None:
            body["weight_g"] = body["weight_g"] * gain
    new = ShelfState.from_dict(body, new_spec)
    weight_g = new.conditioner.weight_g
    if (
        new.status not in (ShelfStatus.OK, ShelfStatus.AMBIGUOUS)
        or not new.conditioner.settled
        or weight_g is None
    ):
        return new, ()
    events: list[ShelfEvent] = []
    result = count_units(weight_g, new_spec)
    if result.units is None:
        status, reason = ShelfStatus.AMBIGUOUS, str(result.reason)
    else:
        status, reason = ShelfStatus.OK, "settled"
        if result.units != new.units:
            events.append(
                StockChanged(new_spec.shelf_id, new_spec.sku, new.units, result.units, now_s)
            )
            new.units = result.units
    if status is not new.status or reason != new.reason:
        if status is not new.status:
            events.append(ShelfStatusChanged(new_spec.shelf_id, new.status, status, now_s, reason))
        new.status = status
        new.reason = reason
    return new, tuple(events)
