"""Conveyor PLC simulator: a belt of ``length_mm`` carrying totes from its start to its end.

Serves ``firmware-configs/plc/conveyor.toml``. Writing a tote id to ``induct_tote`` places a
tote at the belt start (what a photo-eye and a scanner report when a picker pushes a tote on);
it travels at the belt's actual speed and is delivered at the end after ``length / speed``
(plus the ramp when the belt was starting), counted in ``totes_out`` / ``last_tote_out``.
Totes keep at least ``tote_pitch_mm`` apart: a full belt answers an induct with exception 06.
Everything else (commands, ramp, jams, e-stop, watchdog, epoch) is `simulators.plc.BeltPlc`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from devices.registers import RegisterMap
from simulators.plc import EXC_DEVICE_BUSY, EXC_ILLEGAL_VALUE, BeltPlc, SimEvent, Value

__all__ = ["ConveyorPlc", "SimEvent"]


class ConveyorPlc(BeltPlc):
    """The conveyor's behaviour behind its register map."""

    kind = "conveyor"

    def __init__(
        self,
        plc_id: str,
        register_map: RegisterMap | None = None,
        *,
        length_mm: float = 12_000.0,
        max_speed_mm_s: float = 2_000.0,
        initial_speed_mm_s: float = 500.0,
        tote_pitch_mm: float = 400.0,
        **kwargs: Any,
    ) -> None:
        self.length_mm = length_mm
        self.initial_speed_mm_s = initial_speed_mm_s
        self.tote_pitch_mm = tote_pitch_mm
        super().__init__(plc_id, register_map, max_speed_mm_s=max_speed_mm_s, **kwargs)

    def boot(self, now: float) -> None:
        super().boot(now)
        self.stored["speed_setpoint"] = float(self.initial_speed_mm_s)
        self.totes: list[list[float]] = []  # [tote id, position mm]
        self.totes_out = 0
        self.last_tote_out = 0
        self.last_inducted = 0
        self.delivered: list[tuple[float, int]] = []

    def nominal_speed(self) -> float:
        return float(self.stored["speed_setpoint"])  # type: ignore[arg-type]

    @property
    def capacity(self) -> int:
        return max(1, int(self.length_mm // self.tote_pitch_mm))

    def values(self, now: float) -> dict[str, Value | Sequence[Value]]:
        out = super().values(now)
        out["belt_length_mm"] = int(self.length_mm)
        out["ramp_time_ms"] = min(0xFFFF, int(self.ramp_s * 1000))
        out["totes_on_belt"] = len(self.totes)
        out["totes_out"] = self.totes_out
        out["last_tote_out"] = self.last_tote_out
        out["max_speed"] = min(0xFFFF, int(self.max_speed_mm_s))
        return out

    def apply(self, updates: Mapping[str, Value], now: float) -> int | None:
        setpoint = updates.get("speed_setpoint")
        if setpoint is not None and float(setpoint) > self.max_speed_mm_s:
            return EXC_ILLEGAL_VALUE
        tote = updates.get("induct_tote")
        if tote is not None:
            tote_id = int(tote)
            if tote_id and tote_id != self.last_inducted:
                if len(self.totes) >= self.capacity or any(
                    pos < self.tote_pitch_mm for _, pos in self.totes
                ):
                    return EXC_DEVICE_BUSY
                self.totes.append([float(tote_id), 0.0])
                self.last_inducted = tote_id
                self.event(now, "induct", f"tote {tote_id}", tote_id)
        return super().apply(updates, now)

    def place_tote(self, tote_id: int, now: float) -> bool:
        """A tote pushed on by hand (no Modbus); False if the belt start is occupied."""
        return self.apply({"induct_tote": tote_id}, now) is None

    def move(self, now: float, distance_mm: float) -> None:
        kept: list[list[float]] = []
        for tote in self.totes:
            tote[1] += distance_mm
            if tote[1] >= self.length_mm:
                tote_id = int(tote[0])
                self.totes_out += 1
                self.last_tote_out = tote_id
                self.delivered.append((now, tote_id))
                self.event(now, "tote_out", f"tote {tote_id}", tote_id)
            else:
                kept.append(tote)
        self.totes = kept
