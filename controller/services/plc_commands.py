"""Manual belt commands (start, stop, reset) on a conveyor or sorter PLC, for engineers.

The drivers do the protocol work: START and RESET fail fast with ``DeviceUnavailable`` when the
link is not UP; STOP goes through the link's priority lane and is written once more if the
read-back still shows the belt moving. This service adds the record: every manual command,
whatever its outcome, is journaled as a ``plc_command`` event (who, what, result, the state
read back) and published on the bus. The outcome is returned as data; the API maps it to a
status code.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from controller.domain.events import BusEvent, PlcCommandIssued
from controller.ports import EventRow, JournalPort
from devices.conveyor import ConveyorDriver, ConveyorStatus
from devices.errors import (
    CommandRefused,
    DeviceBusy,
    DeviceError,
    DeviceFaulty,
    DeviceUnavailable,
    NoReply,
)
from devices.sorter import SorterDriver, SorterStatus

log = logging.getLogger("floorhand.plc_commands")

Command = Literal["start", "stop", "reset"]
Result = Literal["ok", "refused", "unavailable", "busy", "no_reply", "faulty", "error"]
COMMANDS: tuple[Command, ...] = ("start", "stop", "reset")


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    plc: str
    command: Command
    by: str
    result: Result
    detail: str
    at_s: float
    status: ConveyorStatus | SorterStatus | None
    """The status read back (``None`` when the command failed before or without a read)."""


def _classify(exc: DeviceError) -> Result:
    # Order matters: NoReply is a DeviceUnavailable, DeviceFaulty a ProtocolError.
    if isinstance(exc, CommandRefused):
        return "refused"
    if isinstance(exc, NoReply):
        return "no_reply"
    if isinstance(exc, DeviceUnavailable):
        return "unavailable"
    if isinstance(exc, DeviceBusy):
        return "busy"
    if isinstance(exc, DeviceFaulty):
        return "faulty"
    return "error"


DeviceCall = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
"""How a driver's coroutine is run: on the loop its link runs on (the runtime's control loop:
``ControlLoop.call_async``)."""


async def _here(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


class PlcCommandService:
    """Runs manual commands and keeps their record (journal + bus)."""

    def __init__(
        self,
        journal: JournalPort,
        publish_events: Callable[[list[BusEvent]], None],
        clock: Callable[[], float],
        device_call: DeviceCall | None = None,
    ) -> None:
        self._journal = journal
        self._device_call: DeviceCall = device_call if device_call is not None else _here
        self._publish_events = publish_events
        self._clock = clock
        self.counts: dict[tuple[str, str], int] = {}
        """Commands by (command, result)."""

    async def run(
        self,
        plc_id: str,
        driver: ConveyorDriver | SorterDriver,
        command: Command,
        *,
        by: str,
        role: str,
    ) -> CommandOutcome:
        """`execute` then `record`, on the caller's loop."""
        outcome = await self.execute(plc_id, driver, command, by=by)
        self.record(outcome, role)
        return outcome

    async def execute(
        self, plc_id: str, driver: ConveyorDriver | SorterDriver, command: Command, *, by: str
    ) -> CommandOutcome:
        """Run the command on the PLC (through ``device_call``: the control loop) and say how
        it went; touches no state of the caller's (safe from the HTTP loop)."""
        status: ConveyorStatus | SorterStatus | None = None
        result: Result = "ok"
        detail = ""
        try:
            if command == "start":
                status = await self._device_call(driver.start)
            elif command == "stop":
                status = await self._device_call(driver.stop)
            elif command == "reset":
                status = await self._device_call(driver.reset)
            else:  # pragma: no cover - the API validates the command
                raise ValueError(f"unknown command {command!r}")
        except DeviceError as exc:
            result = _classify(exc)
            detail = str(exc)
        now = self._clock()
        return CommandOutcome(plc_id, command, by, result, detail, now, status)

    def record(self, o: CommandOutcome, role: str) -> None:
        """Count, journal and publish the outcome (on the loop that owns the journal and
        the bus)."""
        key = (o.command, o.result)
        self.counts[key] = self.counts.get(key, 0) + 1
        event = PlcCommandIssued(
            o.at_s,
            o.plc,
            o.command,
            o.by,
            role,
            o.result,
            o.detail,
            o.status.state.value if o.status is not None else None,
            o.status.fault.value if o.status is not None else None,
        )
        if o.result == "ok":
            log.info("%s: %s by %s -> %s", o.plc, o.command, o.by, event.state)
        else:
            log.warning("%s: %s by %s failed (%s): %s", o.plc, o.command, o.by, o.result, o.detail)
        try:
            self._journal.commit((), events=[EventRow(o.at_s, event.kind, event.as_dict())])
        except Exception as exc:
            # The command already happened on the PLC; the caller still gets its outcome.
            log.error("could not journal the %s command on %s: %s", o.command, o.plc, exc)
        self._publish_events([event])
