"""Sorter PLC simulator: a command mailbox, a belt carrying totes to lanes, a completion ring.

Serves ``firmware-configs/plc/sorter.toml``. The handshake (``docs/plc-integration.md``):

1. the controller writes ``mb_cmd_id, mb_tote, mb_lane, mb_strobe = SUBMIT`` in one FC16;
2. the PLC takes the mailbox in the same scan: a cmd_id of 0 is INVALID; a cmd_id not above
   ``ack_id`` (this epoch) is a DUPLICATE and is *not* executed again; with the queue full the
   whole write is refused with exception 06 (busy) and nothing changes; otherwise the command
   is ACCEPTED: ``ack_id = cmd_id``, the tote enters the induct, ``mb_strobe`` back to IDLE;
3. the tote travels ``induct_mm + (lane - 1) × lane_pitch_mm`` at the belt speed; at its lane
   it is DIVERTED if the lane has room, else it recirculates (another ``loop_mm``) up to
   ``max_recirculations`` times and ends RECIRCULATED (overflow exit); an unknown lane travels
   to the end and is REJECTED;
4. completion: ``last_done_id``, ``last_result``, ``done_seq`` and the 16-slot ring
   ``done_ids`` / ``done_results`` are updated; the command leaves ``pending_ids``.

Lanes are emptied by their pack station, one tote every ``lane_drain_s`` (0: never). The
mailbox is processed when written, and the belt moves only while it runs, so the watchdog,
jams and the e-stop hold every tote where it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devices.registers import RegisterMap
from simulators.plc import EXC_DEVICE_BUSY, BeltPlc, SimEvent, Value

__all__ = ["RING_SIZE", "SimEvent", "SorterPlc"]

RING_SIZE = 16
PENDING_SLOTS = 8
MAX_LANES = 16


@dataclass(slots=True)
class _Tote:
    cmd_id: int
    tote: int
    lane: int
    target_mm: float
    pos_mm: float = 0.0
    recirculations: int = 0


class SorterPlc(BeltPlc):
    """The sorter's behaviour behind its register map."""

    kind = "sorter"

    def __init__(
        self,
        plc_id: str,
        register_map: RegisterMap | None = None,
        *,
        lanes: int = 8,
        lane_capacity: int = 6,
        queue_capacity: int = 8,
        belt_speed_mm_s: float = 1_000.0,
        induct_mm: float = 2_000.0,
        lane_pitch_mm: float = 1_000.0,
        loop_mm: float = 20_000.0,
        max_recirculations: int = 2,
        lane_drain_s: float = 20.0,
        **kwargs: Any,
    ) -> None:
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be 1..{MAX_LANES}")
        if not 1 <= queue_capacity <= PENDING_SLOTS:
            raise ValueError(f"queue_capacity must be 1..{PENDING_SLOTS}")
        self.lanes = lanes
        self.lane_capacity = lane_capacity
        self.queue_capacity = queue_capacity
        self.induct_mm = induct_mm
        self.lane_pitch_mm = lane_pitch_mm
        self.loop_mm = loop_mm
        self.max_recirculations = max_recirculations
        self.lane_drain_s = lane_drain_s
        # Over the simulator's whole life (across reboots), for exactly-once checks.
        self.executions: Counter[int] = Counter()
        self.completions: list[tuple[float, int, str]] = []
        self.duplicates: list[int] = []
        super().__init__(plc_id, register_map, max_speed_mm_s=belt_speed_mm_s, **kwargs)

    def boot(self, now: float) -> None:
        super().boot(now)
        self.queue: list[_Tote] = []
        self.ack_id = 0
        self.last_done_id = 0
        self.last_result = "NONE"
        self.done_seq = 0
        self.done_ids = [0] * RING_SIZE
        self.done_results = [0] * RING_SIZE
        self.lane_fill = [0] * self.lanes
        self.drain_clock = [0.0] * self.lanes
        self.mb_status = "IDLE"

    def values(self, now: float) -> dict[str, Value | Sequence[Value]]:
        out = super().values(now)
        out["lanes_full"] = sum(
            1 << i for i, fill in enumerate(self.lane_fill) if fill >= self.lane_capacity
        )
        out["lane_count"] = self.lanes
        out["lane_capacity"] = self.lane_capacity
        out["queue_capacity"] = self.queue_capacity
        out["queue_len"] = len(self.queue)
        out["mb_status"] = self.map["mb_status"].value_of(self.mb_status)
        out["ack_id"] = self.ack_id
        out["last_done_id"] = self.last_done_id
        out["last_result"] = self.map["last_result"].value_of(self.last_result)
        out["done_seq"] = self.done_seq
        pending = [t.cmd_id for t in self.queue[:PENDING_SLOTS]]
        out["pending_ids"] = pending + [0] * (PENDING_SLOTS - len(pending))
        out["done_ids"] = list(self.done_ids)
        out["done_results"] = list(self.done_results)
        out["lane_fill"] = self.lane_fill + [0] * (MAX_LANES - self.lanes)
        return out

    def flag_names(self) -> set[str]:
        names = super().flag_names()
        if len(self.queue) >= self.queue_capacity:
            names.add("queue_full")
        return names

    def apply(self, updates: Mapping[str, Value], now: float) -> int | None:
        strobe_reg = self.map["mb_strobe"]
        strobe = updates.get("mb_strobe")
        if strobe is None or int(strobe) != strobe_reg.value_of("SUBMIT"):
            return super().apply(updates, now)
        merged: dict[str, int] = {}
        for name in ("mb_cmd_id", "mb_tote", "mb_lane"):
            value = updates.get(name, self.stored[name])
            merged[name] = int(value) if isinstance(value, int | float) else 0
        cmd_id = int(merged["mb_cmd_id"])
        if cmd_id == 0:
            self.mb_status = "INVALID"
            self.event(now, "invalid", "cmd_id 0")
        elif cmd_id <= self.ack_id:
            self.mb_status = "DUPLICATE"
            self.duplicates.append(cmd_id)
            self.event(now, "duplicate", f"ack_id {self.ack_id}", cmd_id)
        elif len(self.queue) >= self.queue_capacity:
            return EXC_DEVICE_BUSY
        else:
            lane = int(merged["mb_lane"])
            valid = 1 <= lane <= self.lanes
            target = self.induct_mm + ((lane - 1) if valid else self.lanes) * self.lane_pitch_mm
            self.queue.append(_Tote(cmd_id, int(merged["mb_tote"]), lane, target))
            self.ack_id = cmd_id
            self.mb_status = "ACCEPTED"
            self.executions[cmd_id] += 1
            self.event(now, "accept", f"tote {merged['mb_tote']} lane {lane}", cmd_id)
        code = super().apply(updates, now)
        self.stored["mb_strobe"] = strobe_reg.value_of("IDLE")
        return code

    def step(self, now: float, dt: float) -> None:
        super().step(now, dt)
        if self.lane_drain_s <= 0:
            return
        sim_dt = dt * self.speed
        for lane, fill in enumerate(self.lane_fill):
            if fill <= 0:
                self.drain_clock[lane] = 0.0
                continue
            self.drain_clock[lane] += sim_dt
            if self.drain_clock[lane] >= self.lane_drain_s:
                self.drain_clock[lane] = 0.0
                self.lane_fill[lane] -= 1

    def move(self, now: float, distance_mm: float) -> None:
        finished: list[tuple[_Tote, str]] = []
        for tote in self.queue:
            tote.pos_mm += distance_mm
            if tote.pos_mm < tote.target_mm:
                continue
            if not 1 <= tote.lane <= self.lanes:
                finished.append((tote, "REJECTED"))
            elif self.lane_fill[tote.lane - 1] < self.lane_capacity:
                self.lane_fill[tote.lane - 1] += 1
                finished.append((tote, "DIVERTED"))
            elif tote.recirculations < self.max_recirculations:
                tote.recirculations += 1
                tote.target_mm += self.loop_mm
                self.event(now, "recirculate", f"lane {tote.lane} full", tote.cmd_id)
            else:
                finished.append((tote, "RECIRCULATED"))
        for tote, result in finished:
            self.queue.remove(tote)
            self._complete(now, tote.cmd_id, result)

    def _complete(self, now: float, cmd_id: int, result: str) -> None:
        slot = self.done_seq % RING_SIZE
        self.done_seq += 1
        self.done_ids[slot] = cmd_id
        self.done_results[slot] = self.map["last_result"].value_of(result)
        self.last_done_id = cmd_id
        self.last_result = result
        self.completions.append((now, cmd_id, result))
        self.event(now, "done", result, cmd_id)

    def set_lane_fill(self, lane: int, fill: int) -> None:
        """Test/demo hook: set how many totes lane ``lane`` (1-based) holds."""
        self.lane_fill[lane - 1] = fill
        self.drain_clock[lane - 1] = 0.0
        self.touch()
