"""Sorter driver: divert commands through the PLC's mailbox, exactly once per cmd_id.

The register map is ``firmware-configs/plc/sorter.toml``; the handshake is described for the
PLC programmer in ``docs/plc-integration.md``. In short:

* `SorterDriver.send` writes ``mb_cmd_id, mb_tote, mb_lane, mb_strobe=SUBMIT`` with one FC16
  and reads the status back until the PLC accepted it (``ack_id >= cmd_id``, the id in
  ``pending_ids`` or in the completion ring);
* `SorterDriver.wait_result` polls the status (one FC3 of the whole map, shared by every
  waiter) until the cmd_id shows up in the completion ring ``done_ids`` / ``done_results``;
* `SorterDriver.submit` is both.

Exactly once: a mailbox write is never re-sent blindly. When its reply is lost (timeout,
connection drop, malformed reply), the driver reads the PLC back: accepted → it waits for the
result; the mailbox does not hold the cmd_id and ``ack_id`` is below it → the write never
arrived, and only then is it sent again, with the same cmd_id (the PLC would also drop a
cmd_id not above its ``ack_id`` as a DUPLICATE). If the PLC cannot be read back within
``confirm_timeout_s``, or restarted (new ``epoch``) with the command pending, the command is
UNKNOWN: `CommandOutcomeUnknown`, never replayed. Ids must increase (per driver, and above the
PLC's ``ack_id``); `SorterDriver.lookup` tells what the PLC knows about an older id (restart
reconciliation).

Commands are serialised through the mailbox (one submission in flight, as the PLC has one
mailbox); any number of callers may wait for results at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from devices.errors import (
    CommandOutcomeUnknown,
    CommandRefused,
    DeviceBusy,
    DeviceConfigError,
    DeviceError,
    DeviceFaulty,
    DeviceUnavailable,
    NoReply,
    ResultTimeout,
)
from devices.link.modbus import ModbusLink, Priority
from devices.link.state import LinkState
from devices.plc import BeltFault, BeltState, PlcDriver, belt_fault, belt_state
from devices.registers import Access, RegisterMap, RegisterType, Snapshot

__all__ = [
    "CmdIdBelowPlc",
    "CommandLookup",
    "CommandState",
    "SortOutcome",
    "SortResult",
    "SorterDriver",
    "SorterStatus",
]

MAX_CMD_ID = 0xFFFFFFFF

MailboxListener = Callable[[int, int], None]
"""``callback(epoch, highest_id)``: the highest cmd_id the PLC knows in ``epoch``."""


class CmdIdBelowPlc(CommandRefused, DeviceConfigError):
    """A cmd_id not above the PLC's ``ack_id`` (or one this driver already used), certainly
    not executed: refused by `SorterDriver.send` before writing, or answered DUPLICATE by the
    PLC to its first mailbox write (the PLC's ids moved past it, by hand or another
    controller). ``floor`` is the id the next one must exceed. Also a `DeviceConfigError`, which
    the refusal before writing always was."""

    def __init__(self, message: str, floor: int) -> None:
        super().__init__(message)
        self.floor = floor


class SortResult(enum.Enum):
    """How a command ended (``last_result`` / ``done_results``)."""

    DIVERTED = "DIVERTED"
    RECIRCULATED = "RECIRCULATED"
    REJECTED = "REJECTED"


class CommandState(enum.Enum):
    """What the PLC (in its current epoch) knows about a cmd_id; see `SorterDriver.lookup`."""

    NOT_SEEN = "not_seen"  # above ack_id: never accepted in this epoch
    PENDING = "pending"  # accepted (or in the mailbox), not completed
    DONE = "done"  # in the completion ring, with its result
    UNKNOWN = "unknown"  # at or below ack_id but no longer in the ring


@dataclass(frozen=True, slots=True)
class CommandLookup:
    cmd_id: int
    state: CommandState
    result: SortResult | None
    epoch: int


@dataclass(frozen=True, slots=True)
class SortOutcome:
    """A completed command. Times are ``time.monotonic()``."""

    cmd_id: int
    result: SortResult
    epoch: int
    resends: int
    submitted_at: float
    first_write_at: float
    accepted_at: float
    done_at: float


@dataclass(frozen=True, slots=True)
class SorterStatus:
    """One read of the whole sorter map."""

    state: BeltState
    fault: BeltFault
    flags: frozenset[str]
    epoch: int
    heartbeat_echo: int
    speed_actual_mm_s: float
    lane_count: int
    lane_capacity: int
    lanes_full: frozenset[int]
    lane_fill: tuple[int, ...]
    queue_capacity: int
    queue_len: int
    mb_cmd_id: int
    mb_strobe: int
    mb_status: str
    ack_id: int
    last_done_id: int
    last_result: SortResult | None
    done_seq: int
    pending_ids: tuple[int, ...]
    done: tuple[tuple[int, SortResult | None], ...]
    command_count: int
    uptime_s: int

    @property
    def running(self) -> bool:
        return self.state.moving

    def result_of(self, cmd_id: int) -> SortResult | bool | None:
        """The ring's result for ``cmd_id``; False if it is not in the ring."""
        for done_id, result in self.done:
            if done_id == cmd_id:
                return result
        return False


class _Phase(enum.Enum):
    SENDING = "sending"
    UNCERTAIN = "uncertain"
    ACCEPTED = "accepted"
    DONE = "done"
    LOST = "lost"  # outcome unknown for good (PLC restarted, refused)
    NOT_EXECUTED = "not_executed"  # proven never received


class _Record:
    __slots__ = (
        "accepted_at",
        "cmd_id",
        "done",
        "done_at",
        "epoch",
        "first_write_at",
        "lane",
        "lost_reason",
        "phase",
        "resends",
        "result",
        "submitted_at",
        "tote",
    )

    def __init__(self, cmd_id: int, tote: int | None, lane: int | None, epoch: int) -> None:
        now = time.monotonic()
        self.cmd_id = cmd_id
        self.tote = tote
        self.lane = lane
        self.epoch = epoch
        self.phase = _Phase.SENDING
        self.result: SortResult | None = None
        self.done: asyncio.Future[SortResult] = asyncio.get_running_loop().create_future()
        self.done.add_done_callback(_retrieve)
        self.submitted_at = now
        self.first_write_at = 0.0
        self.accepted_at = 0.0
        self.done_at = 0.0
        self.resends = 0
        self.lost_reason = ""


def _retrieve(fut: asyncio.Future[SortResult]) -> None:
    if not fut.cancelled():
        fut.exception()  # an outcome nobody waited for is not an "unretrieved" error


_RESULT_NAMES = {r.value: r for r in SortResult}
_FINAL = (_Phase.DONE, _Phase.LOST, _Phase.NOT_EXECUTED)
_OPEN = (_Phase.SENDING, _Phase.UNCERTAIN)


class SorterDriver(PlcDriver):
    """Typed access to one sorter PLC (unit ``unit`` behind ``link``)."""

    KIND: ClassVar[str] = "sorter"
    REGISTERS: ClassVar[dict[str, tuple[RegisterType, Access]]] = {
        "mb_cmd_id": (RegisterType.UINT32, "rw"),
        "mb_tote": (RegisterType.UINT32, "rw"),
        "mb_lane": (RegisterType.UINT16, "rw"),
        "mb_strobe": (RegisterType.UINT16, "rw"),
        "lanes_full": (RegisterType.BITS, "r"),
        "lane_count": (RegisterType.UINT16, "r"),
        "lane_capacity": (RegisterType.UINT16, "r"),
        "queue_capacity": (RegisterType.UINT16, "r"),
        "queue_len": (RegisterType.UINT16, "r"),
        "mb_status": (RegisterType.UINT16, "r"),
        "ack_id": (RegisterType.UINT32, "r"),
        "last_done_id": (RegisterType.UINT32, "r"),
        "last_result": (RegisterType.UINT16, "r"),
        "done_seq": (RegisterType.UINT32, "r"),
        "pending_ids": (RegisterType.UINT32, "r"),
        "done_ids": (RegisterType.UINT32, "r"),
        "done_results": (RegisterType.UINT16, "r"),
        "lane_fill": (RegisterType.UINT16, "r"),
    }

    def __init__(
        self,
        link: ModbusLink,
        register_map: RegisterMap | None = None,
        *,
        unit: int = 1,
        name: str | None = None,
        confirm_timeout_s: float = 2.0,
        poll_interval_s: float = 0.02,
        max_resends: int = 3,
        keep_records: int = 10_000,
        **kwargs: object,
    ) -> None:
        super().__init__(
            link,
            register_map,
            unit=unit,
            name=name,
            confirm_timeout_s=confirm_timeout_s,
            poll_interval_s=poll_interval_s,
            **kwargs,  # type: ignore[arg-type]
        )
        self.map.require_values("mb_strobe", ["IDLE", "SUBMIT"])
        self.map.require_values("mb_status", ["IDLE", "ACCEPTED", "DUPLICATE", "INVALID"])
        self.max_resends = max_resends
        self.keep_records = keep_records
        self._submit = self.map["mb_strobe"].value_of("SUBMIT")
        self._mailbox = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._records: dict[int, _Record] = {}  # every known cmd_id (pruned when final)
        self._active: dict[int, _Record] = {}  # records whose outcome is not final
        self._highest_sent = 0
        self._status: SorterStatus | None = None
        self._status_at = 0.0
        self._status_connection = -1
        self._mailbox_listeners: list[MailboxListener] = []
        self._reported: tuple[int, int] | None = None
        self._read_event = asyncio.Event()  # set by every status read
        self.resends = 0  # mailbox writes sent again after a confirmed loss
        self.on_write: Callable[[int], None] | None = None  # benchmark/test probe

    # -- status ---------------------------------------------------------------------------

    def add_mailbox_listener(self, callback: MailboxListener) -> None:
        """Call ``callback(epoch, highest_id)`` after a status read whenever the highest cmd_id
        the PLC knows (``ack_id``, the mailbox, ``pending_ids``, the completion ring) or the
        epoch differs from the last report; the first read of every connection (the link's
        resync) always reports. Runs synchronously inside the read, before any caller sees
        the status: a listener that moves its id counter above ``highest_id`` does so before
        the next command can be drawn from it."""
        self._mailbox_listeners.append(callback)

    @property
    def mailbox_known(self) -> bool:
        """True once the map was read on the current connection (the epoch and ``ack_id`` are
        known): only then can a caller be sure its next cmd_id is above the PLC's."""
        return (
            self._status is not None
            and self._status_connection == self.link.connection_number
            and self.link.state is LinkState.UP
        )

    async def wait_mailbox_known(self, timeout_s: float) -> None:
        """Return once `mailbox_known` (the link's resync does the read); `TimeoutError` after
        ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while not self.mailbox_known:
                self._read_event.clear()
                await self._read_event.wait()

    @property
    def last_status(self) -> SorterStatus | None:
        """The most recent status read (by any caller), without I/O."""
        return self._status

    async def status(self, *, priority: Priority = Priority.NORMAL) -> SorterStatus:
        """Read and decode the whole map (also resolves waiting commands)."""
        await self.read_snapshot(priority=priority)
        assert self._status is not None
        return self._status

    async def start(self) -> SorterStatus:
        """START the sorter belt; `CommandRefused` if it is not starting or running after."""
        await self.start_snapshot()
        status = self._require_status()
        if not status.running:
            raise CommandRefused(
                f"{self.name}: start refused (state {status.state.value}, "
                f"fault {status.fault.value})"
            )
        return status

    async def stop(self) -> SorterStatus:
        """STOP through the priority lane (overtakes queued submissions); repeated once if the
        read-back shows the belt still moving."""
        await self.command("STOP", priority=Priority.STOP)
        if self._require_status().running:
            await self.command("STOP", priority=Priority.STOP)
        return self._require_status()

    async def reset(self) -> SorterStatus:
        await self.command("RESET")
        return self._require_status()

    # -- commands -------------------------------------------------------------------------

    async def submit(
        self, cmd_id: int, tote: int, lane: int, *, timeout_s: float | None = None
    ) -> SortOutcome:
        """Send a divert command and wait for its result (`send` + `wait_result`)."""
        await self.send(cmd_id, tote, lane)
        return await self.wait_result(cmd_id, timeout_s=timeout_s)

    async def send(self, cmd_id: int, tote: int, lane: int) -> None:
        """Hand a command to the PLC; returns once the PLC accepted it.

        Raises `DeviceUnavailable` / `DeviceBusy` / `DeviceConfigError` when it was certainly
        not executed (the same cmd_id may be sent again), `CommandOutcomeUnknown` when that
        cannot be known, `CommandRefused` when the PLC reports it as duplicate or invalid;
        `CmdIdBelowPlc` (a `CommandRefused`) when the id is not above the PLC's ids and was
        certainly not executed: a new id above ``floor`` may be sent for the same tote.
        Sending a cmd_id again joins the first submission (never a second execution).
        """
        if not 1 <= cmd_id <= MAX_CMD_ID:
            raise ValueError(f"cmd_id must be 1..{MAX_CMD_ID}, got {cmd_id}")
        self.map["mb_tote"].check(tote)
        self.map["mb_lane"].check(lane)
        self.ensure_up()
        async with self._mailbox:
            rec = self._records.get(cmd_id)
            if rec is not None:
                if rec.tote is not None and (rec.tote, rec.lane) != (tote, lane):
                    raise DeviceConfigError(
                        f"{self.name}: cmd_id {cmd_id} was used for tote {rec.tote} lane "
                        f"{rec.lane}, not tote {tote} lane {lane}"
                    )
                await self._join(rec)
                return
            status = self._status
            if (
                status is None
                or self._status_connection != self.link.connection_number
                or any(r.phase in _OPEN for r in self._active.values())
            ):
                # A read on this connection is needed: to learn the epoch after a
                # reconnect, or to decide a command whose outcome is still open.
                status = await self._refresh()
                self._settle_older(status)
            floor = max(self._highest_sent, status.ack_id)
            if cmd_id <= floor:
                raise CmdIdBelowPlc(
                    f"{self.name}: cmd_id {cmd_id} must be above {floor} (ids increase; "
                    "lookup() tells what the PLC knows about an older one)",
                    floor,
                )
            assert self.epoch is not None
            rec = _Record(cmd_id, tote, lane, self.epoch)
            previous_highest = self._highest_sent
            self._highest_sent = cmd_id
            self._records[cmd_id] = rec
            self._active[cmd_id] = rec
            self._prune()
            try:
                await self._deliver(rec)
            except _NotExecuted as exc:
                # Certainly not executed: forget it, so the same id can be sent again.
                if self._records.get(cmd_id) is rec:
                    del self._records[cmd_id]
                self._active.pop(cmd_id, None)
                if self._highest_sent == cmd_id:
                    self._highest_sent = previous_highest
                raise exc.error from None

    async def wait_result(self, cmd_id: int, *, timeout_s: float | None = None) -> SortOutcome:
        """Wait until an accepted command completes; `ResultTimeout` after ``timeout_s``
        (it stays pending), `CommandOutcomeUnknown` if the PLC restarted meanwhile."""
        rec = self._records.get(cmd_id)
        if rec is None:
            raise DeviceConfigError(
                f"{self.name}: cmd_id {cmd_id} was not sent by this driver (use lookup())"
            )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not rec.done.done():
            started = time.monotonic()
            wait_s = self.poll_interval_s
            if deadline is not None:
                if started >= deadline:
                    raise ResultTimeout(
                        f"{self.name}: command {cmd_id} not completed after {timeout_s:g} s"
                    )
                wait_s = min(wait_s, deadline - started)
            await asyncio.wait((rec.done,), timeout=wait_s)
            if rec.done.done():
                break
            if self.link.state is LinkState.UP:
                # Link trouble: the next round (or the epoch check) decides.
                with contextlib.suppress(DeviceError):
                    await self._refresh(newer_than=started)
        result = rec.done.result()
        return SortOutcome(
            cmd_id=cmd_id,
            result=result,
            epoch=rec.epoch,
            resends=rec.resends,
            submitted_at=rec.submitted_at,
            first_write_at=rec.first_write_at,
            accepted_at=rec.accepted_at,
            done_at=rec.done_at,
        )

    async def lookup(self, cmd_id: int) -> CommandLookup:
        """What the PLC knows about ``cmd_id`` in its current epoch (one fresh read).

        For reconciliation after a controller restart: DONE (with the result) and PENDING
        are certain; NOT_SEEN means not accepted in this epoch; UNKNOWN means accepted or
        skipped earlier and no longer in the 16-entry completion ring. A PENDING id can then
        be awaited with `wait_result`. Whether the id was sent in an *earlier* epoch is for
        the caller's journal to say (the epoch is in the answer).
        """
        status = await self._refresh()
        result = status.result_of(cmd_id)
        known = self._records.get(cmd_id)
        if result is False and known is not None and known.phase is _Phase.NOT_EXECUTED:
            return CommandLookup(cmd_id, CommandState.NOT_SEEN, None, status.epoch)
        if result is not False:
            state = CommandState.DONE
        elif cmd_id in status.pending_ids or (
            status.mb_cmd_id == cmd_id and status.mb_strobe == self._submit
        ):
            state = CommandState.PENDING
            if cmd_id not in self._records:
                rec = _Record(cmd_id, None, None, status.epoch)
                rec.phase = _Phase.ACCEPTED
                self._records[cmd_id] = rec
                self._active[cmd_id] = rec
        elif cmd_id > status.ack_id:
            state = CommandState.NOT_SEEN
        else:
            state = CommandState.UNKNOWN
        return CommandLookup(
            cmd_id=cmd_id,
            state=state,
            result=result if isinstance(result, SortResult) else None,
            epoch=status.epoch,
        )

    # -- internals ------------------------------------------------------------------------

    def _settle_older(self, status: SorterStatus) -> None:
        """Before a new mailbox write: a command whose outcome is still open must be decided,
        because the new write replaces it in the mailbox. The fresh ``status`` decides it:
        accepted (marked by `on_snapshot`), still waiting in the mailbox (then the mailbox is
        busy), or provably never received (NOT_EXECUTED)."""
        for rec in list(self._active.values()):
            if rec.phase not in _OPEN or rec.epoch != status.epoch:
                continue
            if status.mb_cmd_id == rec.cmd_id and status.mb_strobe == self._submit:
                raise DeviceBusy(
                    f"{self.name}: the mailbox still holds command {rec.cmd_id}, not yet taken"
                )
            rec.phase = _Phase.NOT_EXECUTED
            self._active.pop(rec.cmd_id, None)
            rec.lost_reason = "the mailbox write never reached the PLC"
            if not rec.done.done():
                rec.done.set_exception(
                    NoReply(f"{self.name}: command {rec.cmd_id}: {rec.lost_reason}")
                )

    async def _join(self, rec: _Record) -> None:
        """A second `send` of a known cmd_id: never a second write unless proven lost."""
        if rec.phase in (_Phase.ACCEPTED, _Phase.DONE):
            return
        if rec.phase is _Phase.LOST:
            raise CommandOutcomeUnknown(rec.cmd_id, rec.lost_reason)
        if rec.phase is _Phase.NOT_EXECUTED:
            raise NoReply(f"{self.name}: command {rec.cmd_id}: {rec.lost_reason}")
        try:
            await self._deliver(rec, resolve_first=True)
        except _NotExecuted as exc:
            if self._records.get(rec.cmd_id) is rec:
                del self._records[rec.cmd_id]
            self._active.pop(rec.cmd_id, None)
            raise exc.error from None

    async def _deliver(self, rec: _Record, *, resolve_first: bool = False) -> None:
        """Write the mailbox (again only after a read-back proved the write lost) until the
        PLC accepted the command."""
        address, registers = self.map.encode(
            {
                "mb_cmd_id": rec.cmd_id,
                "mb_tote": rec.tote or 0,
                "mb_lane": rec.lane or 0,
                "mb_strobe": self._submit,
            }
        )
        must_write = not resolve_first
        while True:
            if must_write:
                rec.phase = _Phase.SENDING
                if not rec.first_write_at:
                    rec.first_write_at = time.monotonic()
                if self.on_write is not None:
                    self.on_write(rec.cmd_id)
                try:
                    await self.link.write(self.unit, address, registers)
                except (NoReply, DeviceFaulty):
                    pass  # may have run: find out below
                except DeviceError as exc:
                    # Not sent (link down, queue full), busy or refused: not executed.
                    rec.phase = _Phase.UNCERTAIN
                    raise _NotExecuted(exc) from None
                if rec.phase is _Phase.SENDING:
                    rec.phase = _Phase.UNCERTAIN
            if await self._confirm(rec):
                return
            if rec.resends >= self.max_resends:
                raise _NotExecuted(
                    NoReply(
                        f"{self.name}: mailbox write of command {rec.cmd_id} did not reach the "
                        f"PLC in {rec.resends + 1} attempts"
                    )
                )
            rec.resends += 1
            self.resends += 1
            must_write = True

    async def _confirm(self, rec: _Record) -> bool:
        """Read back: True once accepted, False if the write provably never arrived."""
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            try:
                if self.link.state is not LinkState.UP:
                    await self.link.wait_up(max(0.0, deadline - time.monotonic()))
                status = await self._refresh(newer_than=time.monotonic())
            except DeviceError as exc:
                # Another read (the status poll, a concurrent command's confirm) may have
                # decided the command meanwhile: that wins over this failed read.
                if rec.phase in (_Phase.ACCEPTED, _Phase.DONE):
                    return True
                if rec.phase is _Phase.LOST:
                    raise CommandOutcomeUnknown(rec.cmd_id, rec.lost_reason) from None
                if time.monotonic() >= deadline:
                    rec.phase = _Phase.UNCERTAIN
                    raise CommandOutcomeUnknown(
                        rec.cmd_id,
                        f"PLC not readable for {self.confirm_timeout_s:g} s after the mailbox "
                        f"write ({exc})",
                    ) from None
                await asyncio.sleep(self.poll_interval_s)
                continue
            if rec.phase is _Phase.LOST:
                raise CommandOutcomeUnknown(rec.cmd_id, rec.lost_reason)
            if rec.phase in (_Phase.ACCEPTED, _Phase.DONE):
                return True
            if status.mb_cmd_id != rec.cmd_id:
                return False  # the mailbox never held it, and ack_id is below it
            if status.mb_status in ("DUPLICATE", "INVALID") and status.mb_strobe != self._submit:
                reason = f"PLC refused command {rec.cmd_id} as {status.mb_status}"
                self._lose(rec, reason)
                if status.mb_status == "DUPLICATE" and rec.resends == 0:
                    # Our only write of this id was refused: the id was used before (a hand
                    # write, another controller), this command was not executed.
                    raise CmdIdBelowPlc(
                        f"{self.name}: {reason} (ack_id {status.ack_id})", status.ack_id
                    )
                raise CommandRefused(f"{self.name}: {reason}")
            if time.monotonic() >= deadline:
                rec.phase = _Phase.UNCERTAIN
                raise CommandOutcomeUnknown(
                    rec.cmd_id,
                    f"still in the mailbox, not taken by the PLC after "
                    f"{self.confirm_timeout_s:g} s",
                )
            await asyncio.sleep(self.poll_interval_s)

    async def _refresh(self, *, newer_than: float | None = None) -> SorterStatus:
        """One status read shared by concurrent callers: a caller that arrives while a read
        is running, or after one finished past ``newer_than``, uses that read."""
        async with self._refresh_lock:
            fresh = self._status is not None and newer_than is not None
            if fresh and self._status_at > (newer_than or 0.0):
                return self._require_status()
            await self.read_snapshot()
        return self._require_status()

    def _require_status(self) -> SorterStatus:
        if self._status is None:
            raise DeviceUnavailable(f"{self.name}: no status read yet")
        return self._status

    def on_epoch_change(self, old: int | None, new: int) -> None:
        if old is None:
            return
        reason = f"PLC restarted (epoch {old} -> {new}) before the command completed"
        for rec in list(self._active.values()):
            if rec.epoch == old and rec.phase in (
                _Phase.SENDING,
                _Phase.UNCERTAIN,
                _Phase.ACCEPTED,
            ):
                self._lose(rec, reason)

    def on_snapshot(self, snapshot: Snapshot) -> None:
        super().on_snapshot(snapshot)  # epoch first: pending commands of an old epoch are lost
        status = self._decode(snapshot)
        new_connection = self._status_connection != self.link.connection_number
        self._status = status
        self._status_at = time.monotonic()
        self._status_connection = self.link.connection_number
        self._report_mailbox(status, force=new_connection)
        self._read_event.set()
        now = self._status_at
        for done_id, result in status.done:
            if not done_id:
                continue
            rec = self._records.get(done_id)
            if rec is None or rec.epoch != status.epoch or rec.phase in _FINAL:
                continue
            if not rec.accepted_at:
                rec.accepted_at = now
            if result is None:
                self._lose(rec, f"PLC reported an unknown result for command {done_id}")
                continue
            rec.phase = _Phase.DONE
            self._active.pop(rec.cmd_id, None)
            rec.result = result
            rec.done_at = now
            rec.done.set_result(result)
        # ack_id equal to the id: at most one command has an open outcome, and it is the last
        # one written (`_settle_older`), so nothing later can have raised ack_id past it.
        for rec in self._active.values():
            if (
                rec.phase in (_Phase.SENDING, _Phase.UNCERTAIN)
                and rec.epoch == status.epoch
                and (rec.cmd_id == status.ack_id or rec.cmd_id in status.pending_ids)
            ):
                rec.phase = _Phase.ACCEPTED
                rec.accepted_at = now

    def _report_mailbox(self, status: SorterStatus, *, force: bool) -> None:
        highest = max(
            status.ack_id,
            status.last_done_id,
            status.mb_cmd_id if status.mb_strobe == self._submit else 0,
            *status.pending_ids,
            *(done_id for done_id, _ in status.done),
        )
        report = (status.epoch, highest)
        if report == self._reported and not force:
            return
        self._reported = report
        for callback in tuple(self._mailbox_listeners):
            try:
                callback(status.epoch, highest)
            except Exception:
                self._log.exception("%s: mailbox listener %r failed", self.name, callback)

    def _lose(self, rec: _Record, reason: str) -> None:
        rec.phase = _Phase.LOST
        self._active.pop(rec.cmd_id, None)
        rec.lost_reason = reason
        if not rec.done.done():
            rec.done.set_exception(CommandOutcomeUnknown(rec.cmd_id, reason))

    def _prune(self) -> None:
        """Forget the oldest final records, in batches (a tenth of ``keep_records``)."""
        if len(self._records) <= self.keep_records + self.keep_records // 10:
            return
        excess = len(self._records) - self.keep_records
        for cmd_id in [k for k, r in self._records.items() if r.phase in _FINAL][:excess]:
            del self._records[cmd_id]

    def _decode(self, s: Snapshot) -> SorterStatus:
        results = self.map["done_results"]
        lanes_full = self.map["lanes_full"]
        lane_count = s.int_of("lane_count")
        return SorterStatus(
            state=belt_state(s),
            fault=belt_fault(s),
            flags=s.flags_of("flags"),
            epoch=s.int_of("epoch"),
            heartbeat_echo=s.int_of("heartbeat_echo"),
            speed_actual_mm_s=s.float_of("speed_actual"),
            lane_count=lane_count,
            lane_capacity=s.int_of("lane_capacity"),
            lanes_full=frozenset(
                bit + 1 for _, bit in lanes_full.bits if s.int_of("lanes_full") >> bit & 1
            ),
            lane_fill=s.ints_of("lane_fill")[:lane_count],
            queue_capacity=s.int_of("queue_capacity"),
            queue_len=s.int_of("queue_len"),
            mb_cmd_id=s.int_of("mb_cmd_id"),
            mb_strobe=s.int_of("mb_strobe"),
            mb_status=s.enum_of("mb_status") or "UNKNOWN",
            ack_id=s.int_of("ack_id"),
            last_done_id=s.int_of("last_done_id"),
            last_result=_result(s.enum_of("last_result")),
            done_seq=s.int_of("done_seq"),
            pending_ids=tuple(i for i in s.ints_of("pending_ids") if i),
            done=tuple(
                (done_id, _result(results.name_of(code)))
                for done_id, code in zip(
                    s.ints_of("done_ids"), s.ints_of("done_results"), strict=True
                )
                if done_id
            ),
            command_count=s.int_of("command_count"),
            uptime_s=s.int_of("uptime_s"),
        )


def _result(name: str | None) -> SortResult | None:
    return _RESULT_NAMES.get(name or "")


class _NotExecuted(Exception):
    """Internal: the mailbox write certainly did not execute; carries the error to raise."""

    def __init__(self, error: DeviceError) -> None:
        super().__init__(str(error))
        self.error = error
