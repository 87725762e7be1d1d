"""Conveyor driver: start, stop, speed and status of one belt over Modbus TCP.

The register map is ``firmware-configs/plc/conveyor.toml``. Commands are idempotent (START
on a running belt changes nothing), so a command whose reply was lost is judged by its
effect on the read-back, and only STOP is ever written a second time. `ConveyorDriver.stop`
uses the link's STOP lane: it overtakes every queued request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from devices.errors import CommandRefused, DeviceFaulty, NoReply
from devices.link.modbus import Priority
from devices.plc import BeltFault, BeltState, PlcDriver, belt_fault, belt_state
from devices.registers import Access, RegisterType, Snapshot

__all__ = ["BeltFault", "BeltState", "ConveyorDriver", "ConveyorStatus"]


@dataclass(frozen=True, slots=True)
class ConveyorStatus:
    """One read of the whole conveyor map."""

    state: BeltState
    fault: BeltFault
    flags: frozenset[str]
    speed_actual_mm_s: float
    speed_setpoint_mm_s: float
    max_speed_mm_s: int
    belt_length_mm: int
    ramp_time_ms: int
    totes_on_belt: int
    totes_out: int
    last_tote_out: int
    heartbeat_echo: int
    epoch: int
    command_count: int
    uptime_s: int

    @property
    def running(self) -> bool:
        return self.state.moving

    @property
    def transit_time_s(self) -> float:
        """Belt length / current speed (inf when stopped)."""
        speed = self.speed_actual_mm_s
        return self.belt_length_mm / speed if speed > 0 else math.inf


class ConveyorDriver(PlcDriver):
    """Typed access to one conveyor PLC (unit ``unit`` behind ``link``)."""

    KIND: ClassVar[str] = "conveyor"
    REGISTERS: ClassVar[dict[str, tuple[RegisterType, Access]]] = {
        "speed_setpoint": (RegisterType.FLOAT32, "rw"),
        "induct_tote": (RegisterType.UINT32, "rw"),
        "belt_length_mm": (RegisterType.UINT32, "r"),
        "ramp_time_ms": (RegisterType.UINT16, "r"),
        "totes_on_belt": (RegisterType.UINT16, "r"),
        "totes_out": (RegisterType.UINT32, "r"),
        "last_tote_out": (RegisterType.UINT32, "r"),
        "max_speed": (RegisterType.UINT16, "r"),
    }

    async def status(self, *, priority: Priority = Priority.NORMAL) -> ConveyorStatus:
        """Read and decode the whole map."""
        return self._status(await self.read_snapshot(priority=priority))

    async def start(self) -> ConveyorStatus:
        """START; `CommandRefused` if the belt is not starting or running afterwards
        (e-stop, jam, no fresh heartbeat...)."""
        status = self._status(await self.start_snapshot())
        if not status.running:
            raise CommandRefused(
                f"{self.name}: start refused (state {status.state.value}, "
                f"fault {status.fault.value})"
            )
        return status

    async def stop(self) -> ConveyorStatus:
        """STOP through the priority lane; written once more if the read-back shows the belt
        still moving (a lost request: STOP is idempotent, repeating it is safe)."""
        status = self._status(await self.command("STOP", priority=Priority.STOP))
        if status.running:
            status = self._status(await self.command("STOP", priority=Priority.STOP))
        return status

    async def reset(self) -> ConveyorStatus:
        """RESET: clears a jam, a released e-stop, a watchdog trip (the belt stays stopped)."""
        return self._status(await self.command("RESET"))

    async def set_speed(self, speed_mm_s: float) -> ConveyorStatus:
        """Write the speed setpoint and verify it by reading it back.

        `ValueError` if outside the map's limits (nothing sent)."""
        self.ensure_up()
        address, registers = self.map.encode({"speed_setpoint": float(speed_mm_s)})
        lost: NoReply | None = None
        try:
            await self.link.write(self.unit, address, registers)
        except NoReply as exc:
            lost = exc  # idempotent: the read-back decides
        snapshot = await self.read_snapshot()
        wanted = self.map["speed_setpoint"].decode(registers)
        if snapshot.float_of("speed_setpoint") != wanted:
            if lost is not None:
                raise lost
            raise DeviceFaulty(
                f"{self.name}: speed setpoint reads back {snapshot.float_of('speed_setpoint')}, "
                f"wrote {wanted}"
            )
        return self._status(snapshot)

    async def induct(self, tote_id: int) -> None:
        """Report a tote placed at the belt start (what a scanner would write); the PLC
        counts a repeated id once, so a lost reply is checked by reading the id back."""
        self.ensure_up()
        address, registers = self.map.encode({"induct_tote": tote_id})
        try:
            await self.link.write(self.unit, address, registers)
        except NoReply:
            snapshot = await self.read_snapshot()
            if snapshot.int_of("induct_tote") != tote_id:
                raise

    def _status(self, s: Snapshot) -> ConveyorStatus:
        return ConveyorStatus(
            state=belt_state(s),
            fault=belt_fault(s),
            flags=s.flags_of("flags"),
            speed_actual_mm_s=s.float_of("speed_actual"),
            speed_setpoint_mm_s=s.float_of("speed_setpoint"),
            max_speed_mm_s=s.int_of("max_speed"),
            belt_length_mm=s.int_of("belt_length_mm"),
            ramp_time_ms=s.int_of("ramp_time_ms"),
            totes_on_belt=s.int_of("totes_on_belt"),
            totes_out=s.int_of("totes_out"),
            last_tote_out=s.int_of("last_tote_out"),
            heartbeat_echo=s.int_of("heartbeat_echo"),
            epoch=s.int_of("epoch"),
            command_count=s.int_of("command_count"),
            uptime_s=s.int_of("uptime_s"),
        )
