"""What the conveyor and sorter drivers share: belt state, commands, epoch tracking.

A driver is a thin typed adapter over a register map (`devices.registers`) and a
`devices.link.modbus.ModbusLink`. It registers its heartbeat register with the link (the
link writes it every 250 ms) and a resync hook (run after every reconnection: re-read the
PLC, notice a new epoch). Every call fails fast with `DeviceUnavailable` when the link is not
UP, and nothing here retries on its own except what is safe by construction (an idempotent
STOP whose effect could not be confirmed).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import ClassVar

from devices.errors import DeviceFaulty, DeviceUnavailable, NoReply
from devices.link.modbus import ModbusLink, Priority
from devices.link.state import LinkState
from devices.registers import Access, RegisterMap, RegisterType, Snapshot, load_builtin_map

__all__ = ["BeltFault", "BeltState", "EpochListener", "PlcDriver"]

EpochListener = Callable[[int | None, int], None]


class BeltState(enum.Enum):
    """The ``state`` register of a conveyor or a sorter."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    JAMMED = "JAMMED"
    ESTOP = "ESTOP"
    FAULT = "FAULT"
    UNKNOWN = "UNKNOWN"  # a number the map does not name

    @property
    def moving(self) -> bool:
        return self in (BeltState.STARTING, BeltState.RUNNING)


class BeltFault(enum.Enum):
    """The ``fault_code`` register."""

    NONE = "NONE"
    JAM = "JAM"
    ESTOP = "ESTOP"
    WATCHDOG = "WATCHDOG"
    OVERLOAD = "OVERLOAD"
    START_REFUSED = "START_REFUSED"
    UNKNOWN = "UNKNOWN"


def belt_state(snapshot: Snapshot) -> BeltState:
    name = snapshot.enum_of("state")
    try:
        return BeltState(name) if name is not None else BeltState.UNKNOWN
    except ValueError:
        return BeltState.UNKNOWN


def belt_fault(snapshot: Snapshot) -> BeltFault:
    name = snapshot.enum_of("fault_code")
    try:
        return BeltFault(name) if name is not None else BeltFault.UNKNOWN
    except ValueError:
        return BeltFault.UNKNOWN


_U16: tuple[RegisterType, Access] = (RegisterType.UINT16, "r")
BASE_REGISTERS: dict[str, tuple[RegisterType, Access]] = {
    "heartbeat": (RegisterType.UINT16, "rw"),
    "command": (RegisterType.UINT16, "rw"),
    "epoch": (RegisterType.UINT32, "r"),
    "heartbeat_echo": _U16,
    "state": _U16,
    "fault_code": _U16,
    "flags": (RegisterType.BITS, "r"),
    "command_count": _U16,
    "speed_actual": (RegisterType.FLOAT32, "r"),
    "uptime_s": (RegisterType.UINT32, "r"),
}


WATCHDOG_START_ATTEMPTS = 3
WATCHDOG_START_RETRY_S = 0.3
"""A START refused for a stale heartbeat is tried again after about one heartbeat interval."""


class PlcDriver:
    """Base of `ConveyorDriver` and `SorterDriver`; not used directly."""

    KIND: ClassVar[str] = ""
    REGISTERS: ClassVar[dict[str, tuple[RegisterType, Access]]] = {}

    def __init__(
        self,
        link: ModbusLink,
        register_map: RegisterMap | None = None,
        *,
        unit: int = 1,
        name: str | None = None,
        confirm_timeout_s: float = 2.0,
        poll_interval_s: float = 0.02,
        logger: logging.Logger | None = None,
    ) -> None:
        reg_map = register_map if register_map is not None else load_builtin_map(self.KIND)
        reg_map.require(self.KIND, {**BASE_REGISTERS, **self.REGISTERS})
        reg_map.require_values("state", [s.value for s in BeltState if s is not BeltState.UNKNOWN])
        reg_map.require_values("command", ["NONE", "START", "STOP", "RESET"])
        if not 0 <= unit <= 255:
            raise ValueError(f"unit must be 0..255, got {unit}")
        self.map = reg_map
        self.link = link
        self.unit = unit
        self.name = name or f"{self.KIND}@{link.name}"
        self.confirm_timeout_s = confirm_timeout_s
        self.poll_interval_s = poll_interval_s
        self._log = logger if logger is not None else logging.getLogger(type(self).__module__)
        self._blocks = reg_map.blocks()
        self.epoch: int | None = None
        self.restarts = 0
        self._epoch_listeners: list[EpochListener] = []
        link.add_heartbeat(unit, reg_map["heartbeat"].address)
        link.add_up_hook(f"{self.name}.resync", self.resync)

    # -- common surface -------------------------------------------------------------------

    def add_epoch_listener(self, callback: EpochListener) -> None:
        """Call ``callback(old_epoch, new_epoch)`` when the driver first learns the PLC's
        epoch (old is None) and whenever it changes (the PLC restarted)."""
        self._epoch_listeners.append(callback)

    async def resync(self) -> None:
        """Re-read the whole map and notice a new epoch (the link runs it on every connect)."""
        await self.read_snapshot()

    async def read_snapshot(self, *, priority: Priority = Priority.NORMAL) -> Snapshot:
        """Read every register of the map (one FC3 per contiguous block) and decode it."""
        self.ensure_up()
        values: dict[str, object] = {}
        for address, count in self._blocks:
            registers = await self.link.read(self.unit, address, count, priority=priority)
            values.update(self.map.decode(address, registers).raw())
        snapshot = Snapshot(self.map, values)  # type: ignore[arg-type]
        self.on_snapshot(snapshot)
        return snapshot

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """Every fresh read passes here (subclasses extend); tracks the epoch."""
        epoch = snapshot.int_of("epoch")
        old = self.epoch
        if epoch == old:
            return
        self.epoch = epoch
        if old is not None:
            self.restarts += 1
            self._log.warning("%s: PLC restarted (epoch %d -> %d)", self.name, old, epoch)
        self.on_epoch_change(old, epoch)
        for callback in tuple(self._epoch_listeners):
            try:
                callback(old, epoch)
            except Exception:
                self._log.exception("%s: epoch listener %r failed", self.name, callback)

    def on_epoch_change(self, old: int | None, new: int) -> None:
        """Hook for subclasses (called before the listeners)."""

    def ensure_up(self) -> None:
        """Raise `DeviceUnavailable` at once unless the link is UP."""
        state = self.link.state
        if state is not LinkState.UP:
            raise DeviceUnavailable(f"{self.name}: link {self.link.name} is {state.value}")

    # -- belt commands --------------------------------------------------------------------

    async def start_snapshot(self) -> Snapshot:
        """START and read back. A belt stopped by its watchdog refuses START until the PLC has
        seen the heartbeat change (docs/plc-integration.md §2), which it may only register on
        a later scan after a reconnect: such a refusal is retried after about one heartbeat
        interval (``WATCHDOG_START_ATTEMPTS`` in all). The caller judges the final snapshot."""
        snapshot = await self.command("START")
        for _ in range(WATCHDOG_START_ATTEMPTS - 1):
            if belt_state(snapshot).moving or belt_fault(snapshot) is not BeltFault.WATCHDOG:
                break
            await asyncio.sleep(WATCHDOG_START_RETRY_S)
            snapshot = await self.command("START")
        return snapshot

    async def command(self, name: str, *, priority: Priority = Priority.NORMAL) -> Snapshot:
        """Write ``command = name`` and read back until the PLC took it.

        A write whose reply was lost (`NoReply`) is not re-sent: the read-back shows what
        happened and the caller judges by the effect (belt commands are idempotent).
        """
        self.ensure_up()
        address, registers = self.map.encode({"command": self.map["command"].value_of(name)})
        lost: NoReply | None = None
        try:
            await self.link.write(self.unit, address, registers, priority=priority)
        except NoReply as exc:
            lost = exc
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            snapshot = await self._read_back(priority, deadline, lost)
            if snapshot.enum_of("command") == "NONE" or lost is not None:
                return snapshot
            if time.monotonic() >= deadline:
                raise DeviceFaulty(
                    f"{self.name}: PLC did not take command {name} within "
                    f"{self.confirm_timeout_s:g} s"
                )
            await asyncio.sleep(self.poll_interval_s)

    async def _read_back(
        self, priority: Priority, deadline: float, lost: NoReply | None
    ) -> Snapshot:
        """A snapshot, waiting for the link to come back until ``deadline`` if needed."""
        while True:
            try:
                if self.link.state is not LinkState.UP:
                    await self.link.wait_up(max(0.0, deadline - time.monotonic()))
                return await self.read_snapshot(priority=priority)
            except DeviceUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise (lost or exc) from None
                await asyncio.sleep(self.poll_interval_s)
