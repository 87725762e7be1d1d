"""The pick executor: journaled orders drive belts and sorters; scales confirm.

Per order (`PickExecutor.start`, or `run` for the orders reloaded at start): make sure the
route's conveyors run, hand each task (one tote) to the sorter (`SorterPort.send`: exactly once
per cmd_id, never a blind re-send), and wait for two confirmations per task — the sorter's
result (DIVERTED into the pack station's lane) and the shelf's scale showing the units gone.
Both → CONFIRMED; all tasks confirmed → the order is SORTED; anything else → EXCEPTION with the
reason, and the reservation is released.

The executor decides nothing by assignment: what the devices report (the driver's answers and
errors, a lookup after a restart, a shelf's count) becomes a `TaskEvent`, and the pure task
machine (`controller.domain.orders.transition`, through the desk's `OrderBook.finish`) says
what follows. The drivers only transport: a sorter driver's own record of a command is the
mailbox handshake (did the write reach the PLC), not the task's lifecycle.

After a restart, open orders are reloaded and every unfinished command is reconciled with its
sorter (`SorterPort.lookup`, decided by `controller.domain.orders.reconcile_event`): DONE and
PENDING continue; a command the PLC never saw in the same PLC epoch is sent again with the
same cmd_id; anything that cannot be known (PLC restarted, no longer in its completion ring) is
UNKNOWN — shown, never guessed or replayed, until a supervisor resolves it.

The devices are narrow ports (`BeltPort`, `SorterPort`): what execution uses of the conveyor
and sorter drivers, so the executor can be driven by stand-ins in unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar, Protocol

from controller.config import PickingConfig
from controller.control import run_next
from controller.domain.events import BusEvent, PickTaskChanged, StockChanged
from controller.domain.model import ShelfStatus
from controller.domain.orders import (
    Order,
    OrderState,
    PickTask,
    PlcKnows,
    TaskEvent,
    TaskState,
    reconcile_event,
    transition,
)
from controller.ports import LinkState
from devices.errors import (
    CommandOutcomeUnknown,
    CommandRefused,
    DeviceError,
    ResultTimeout,
)
from devices.sorter import CmdIdBelowPlc, CommandLookup, CommandState, SortResult

log = logging.getLogger("floorhand.picking")

__all__ = [
    "BELT_FRESH_S",
    "DEVICES_FIRST_CHANCE_S",
    "RECONCILE_WAIT_S",
    "BeltPort",
    "OrderBook",
    "PickExecutor",
    "ShelfView",
    "SorterPort",
]

BELT_FRESH_S = 0.5
"""A belt (conveyor, sorter) seen running this recently is not read again before a pick (past
half of it, it is read again beside the pick); a PLC restart or a link drop ends it at once."""
DEVICES_FIRST_CHANCE_S = 5.0
"""At start-up, pick requests (MQTT commands queued in the broker session while the controller
was down, HTTP requests) wait at most this long for every conveyor and sorter link to have had
its first chance to connect (up with its map read, or a first attempt failed), so they are not
refused as "device unavailable" while the links are still connecting."""
RECONCILE_WAIT_S = 30.0
"""How long restart reconciliation waits for a sorter's link; a command it still cannot
decide then is UNKNOWN (visible in the order, for a person to resolve)."""

_PLC_KNOWS = {
    CommandState.NOT_SEEN: PlcKnows.NOT_SEEN,
    CommandState.PENDING: PlcKnows.PENDING,
    CommandState.DONE: PlcKnows.DONE,
    CommandState.UNKNOWN: PlcKnows.UNKNOWN,
}
"""The sorter driver's lookup answer in the domain's terms (reconcile_event)."""


# -- ports ------------------------------------------------------------------------------------
class ShelfView(Protocol):
    """What picking reads of a shelf: its count and status (ingest's `ShelfState` on one
    loop; an immutable `controller.services.picking.ShelfCount` on the control loop)."""

    @property
    def units(self) -> int | None: ...

    @property
    def status(self) -> ShelfStatus: ...


class _Watch(Protocol):
    def add_listener(self, callback: Callable[[LinkState, LinkState], None]) -> None: ...


class LinkPort(Protocol):
    """The part of a PLC's Modbus link execution looks at."""

    @property
    def state(self) -> LinkState: ...

    @property
    def last_down_reason(self) -> str | None: ...

    @property
    def watch(self) -> _Watch: ...

    async def wait_up(self, timeout_s: float) -> None: ...


class _Running(Protocol):
    @property
    def running(self) -> bool: ...


class BeltPort(Protocol):
    """A belt (conveyor or sorter): read whether it runs, start it."""

    KIND: ClassVar[str]

    @property
    def link(self) -> LinkPort: ...

    async def status(self) -> _Running: ...

    async def start(self) -> object: ...

    def add_epoch_listener(self, callback: Callable[[int | None, int], None]) -> None: ...


class _Outcome(Protocol):
    @property
    def result(self) -> SortResult: ...


class SorterPort(BeltPort, Protocol):
    """A sorter's mailbox: hand over a command, wait for its result, ask about an old one."""

    epoch: int | None

    @property
    def mailbox_known(self) -> bool: ...

    def add_mailbox_listener(self, callback: Callable[[int, int], None]) -> None: ...

    async def send(self, cmd_id: int, tote: int, lane: int) -> None: ...

    async def wait_result(self, cmd_id: int, *, timeout_s: float | None = None) -> _Outcome: ...

    async def lookup(self, cmd_id: int) -> CommandLookup: ...


class OrderBook(Protocol):
    """What the executor writes to (`controller.services.order_desk.OrderDesk`)."""

    def finish(self, task: PickTask, event: TaskEvent, reason: str | None) -> None: ...

    def store(self, order: Order, events: list[BusEvent]) -> None: ...

    def close(self, order: Order, events: Sequence[BusEvent] = ()) -> None: ...

    def renumber(self, order: Order, task: PickTask, floor: int) -> bool: ...

    def task_event(self, order: Order, task: PickTask) -> PickTaskChanged: ...

    def on_mailbox(self, sorter: str, epoch: int, highest_id: int) -> None: ...

    def publish(self, events: list[BusEvent]) -> None: ...


class PickExecutor:
    """Runs orders against the belts and sorters (module doc)."""

    def __init__(
        self,
        cfg: PickingConfig,
        *,
        conveyors: Mapping[str, BeltPort],
        sorters: Mapping[str, SorterPort],
        shelf_states: Mapping[str, ShelfView],
        clock: Callable[[], float],
        stats: defaultdict[str, int],
    ) -> None:
        self.cfg = cfg
        self.conveyors = dict(conveyors)
        self.sorters = dict(sorters)
        self.states = shelf_states
        self.clock = clock
        self.stats = stats
        self._book: OrderBook | None = None
        self._waiting: dict[str, list[tuple[PickTask, asyncio.Event]]] = defaultdict(list)
        self._queue: asyncio.Queue[Order] = asyncio.Queue()  # orders submitted before run()
        self._tg: asyncio.TaskGroup | None = None
        self._sent: set[str] = set()
        """Open orders a command of which was handed to a sorter (or may have been: every
        order reloaded at start): no longer cancellable."""
        self._belt_ok: dict[str, float] = {}
        self._belt_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._refreshing: set[str] = set()  # belts with a status read in the background
        self.devices_settled = asyncio.Event()
        """Set once every PLC link had its first chance to connect, or after
        ``DEVICES_FIRST_CHANCE_S`` (`run`); set from the start without PLCs."""
        self._device_changed = asyncio.Event()
        self._settled_listeners: list[Callable[[], None]] = []
        for name, driver in self.sorters.items():
            driver.add_mailbox_listener(self._mailbox_listener(name))
        for name, plc in (*self.sorters.items(), *self.conveyors.items()):
            plc.link.watch.add_listener(self._link_listener(name))
            plc.add_epoch_listener(self._epoch_listener(name))
        if not self.sorters and not self.conveyors:
            self.devices_settled.set()

    def bind(self, book: OrderBook) -> None:
        """The book the executor writes to (the desk, which in turn starts orders here)."""
        self._book = book

    @property
    def book(self) -> OrderBook:
        if self._book is None:
            raise RuntimeError("PickExecutor.bind(book) was not called")
        return self._book

    # -- the desk's view (Execution) ----------------------------------------------------------
    def start(self, order: Order) -> None:
        """Execute a newly journaled order: at once if `run` is running, else once it is. On
        the control loop the order's task goes before the work already queued there
        (`controller.control.run_next`): its first Modbus write follows the commit."""
        if self._tg is not None:
            run_next(self._tg.create_task(self._execute(order), name=f"order:{order.order_id}"))
        else:
            self._queue.put_nowait(order)

    def restored(self, orders: Iterable[Order]) -> None:
        """Orders reloaded at start: their commands may have reached a PLC."""
        self._sent.update(o.order_id for o in orders)

    def commands_sent(self, order_id: str) -> bool:
        return order_id in self._sent

    def unreachable(self, sorters: Iterable[str], conveyors: Iterable[str]) -> list[str]:
        # A sorter counts as down until its mailbox was read on the current connection: only
        # then is the cmd id counter known to be above the PLC's ack_id (OrderDesk.on_mailbox).
        return [
            *(s for s in sorters if not self.sorters[s].mailbox_known),
            *(c for c in conveyors if self.conveyors[c].link.state is not LinkState.UP),
        ]

    def sorter_epoch(self, sorter: str) -> int | None:
        return self.sorters[sorter].epoch

    def _link_listener(self, name: str) -> Callable[[LinkState, LinkState], None]:
        def on_link(old: LinkState, new: LinkState) -> None:
            if new is not LinkState.UP:
                self._belt_ok.pop(name, None)  # seen running on a connection that is gone
            self._device_changed.set()

        return on_link

    def _epoch_listener(self, name: str) -> Callable[[int | None, int], None]:
        def on_epoch(old: int | None, new: int) -> None:
            if old is not None:
                self._belt_ok.pop(name, None)  # a restarted PLC's belts stand still

        return on_epoch

    def _mailbox_listener(self, sorter: str) -> Callable[[int, int], None]:
        def on_mailbox(epoch: int, highest_id: int) -> None:
            self._device_changed.set()
            self.book.on_mailbox(sorter, epoch, highest_id)

        return on_mailbox

    # -- start-up -----------------------------------------------------------------------------
    def _first_chance_over(self) -> bool:
        """Every PLC link is usable for picks (sorters: map read on this connection) or has
        failed a connection attempt."""
        sorters_done = all(
            d.mailbox_known or d.link.last_down_reason is not None for d in self.sorters.values()
        )
        return sorters_done and all(
            d.link.state is LinkState.UP or d.link.last_down_reason is not None
            for d in self.conveyors.values()
        )

    async def _settle_devices(self) -> None:
        """Set `devices_settled` once every PLC link had its first chance to connect, at the
        latest after ``DEVICES_FIRST_CHANCE_S``."""
        try:
            async with asyncio.timeout(DEVICES_FIRST_CHANCE_S):
                while not self._first_chance_over():
                    self._device_changed.clear()
                    await self._device_changed.wait()
        except TimeoutError:
            log.warning(
                "PLC links still connecting after %.0f s: pick requests are answered now",
                DEVICES_FIRST_CHANCE_S,
            )
        self.devices_settled.set()
        for callback in tuple(self._settled_listeners):
            try:
                callback()
            except Exception:
                log.exception("devices-settled listener %r failed", callback)

    def add_settled_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when `devices_settled` is set by `run` (not if it was set from
        the start: a site without PLCs)."""
        self._settled_listeners.append(callback)

    async def wait_devices_settled(self) -> None:
        """Return once `devices_settled` (at once after start-up): a pick request that
        arrives while the PLC links are still making their first connection waits for them
        (bounded by ``DEVICES_FIRST_CHANCE_S``), then is served as usual."""
        if not self.devices_settled.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DEVICES_FIRST_CHANCE_S):
                    await self.devices_settled.wait()

    # -- execution ----------------------------------------------------------------------------
    async def run(self, reconcile: Sequence[Order] = ()) -> None:
        """Execute orders: the reconciled ones, then each new one as it is submitted."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if not self.devices_settled.is_set():
                    tg.create_task(self._settle_devices(), name="picking-settle")
                tg.create_task(self._keep_belts_fresh(), name="picking-belts-fresh")
                for old in reconcile:
                    self._sent.add(old.order_id)
                    tg.create_task(self._execute(old, reconcile=True), name=f"order:{old.order_id}")
                while True:  # orders submitted before the group existed
                    new = await self._queue.get()
                    if new.open:  # not cancelled meanwhile
                        tg.create_task(self._execute(new), name=f"order:{new.order_id}")
        finally:
            self._tg = None

    async def _execute(self, order: Order, *, reconcile: bool = False) -> None:
        try:
            await self._execute_tasks(order, reconcile)
        except Exception as exc:  # a bug must not take the controller down
            log.exception("order %s: execution failed", order.order_id)
            for task in order.tasks:
                if not task.final:
                    self.book.finish(task, TaskEvent.FAILED, f"internal error: {exc}")
        self.book.close(order)
        self._sent.discard(order.order_id)

    async def _execute_tasks(self, order: Order, reconcile: bool) -> None:
        open_tasks = [t for t in order.tasks if not t.final]
        if reconcile:
            for task in open_tasks:
                await self._reconcile(order, task)
        moving = [t for t in open_tasks if t.state in (TaskState.DISPATCHED, TaskState.ACCEPTED)]
        if moving:
            belts = {c for t in moving for c in t.conveyors} | {t.sorter for t in moving}
            failure = await self._start_belts(belts)
            if order.state is OrderState.CANCELLED:  # cancelled while the belts started
                return
            if failure is not None:
                for task in moving:
                    if task.state is TaskState.DISPATCHED:  # never sent: certainly not executed
                        self.book.finish(task, TaskEvent.FAILED, failure)
        waits = []
        for task in open_tasks:
            if task.final:
                self.book.store(order, [self.book.task_event(order, task)])
                continue
            done = asyncio.Event()
            shelf = self.states.get(task.shelf)
            if task.scale_confirmed or (
                shelf is not None and shelf.units is not None and shelf.units <= task.target_count
            ):
                done.set()
            else:
                self._waiting[task.shelf].append((task, done))
            if task.state is TaskState.DISPATCHED:
                self._sent.add(order.order_id)  # from here on the order cannot be cancelled
                await self._send(order, task)
            waits.append(self._await_task(order, task, done))
        await asyncio.gather(*waits)

    async def _start_belts(self, names: set[str]) -> str | None:
        """Start every belt of the route (conveyors, then the sorter) not known to be running;
        the reason of the first that cannot be started, else None."""
        for name in sorted(names, key=lambda n: (n in self.sorters, n)):
            driver: BeltPort = self.conveyors.get(name) or self.sorters[name]
            async with self._belt_locks[name]:
                age = time.monotonic() - self._belt_ok.get(name, -1e9)
                if age < BELT_FRESH_S:
                    if age > BELT_FRESH_S / 2:
                        self._refresh_belt(name, driver)
                    continue
                try:
                    status = await driver.status()
                    if not status.running:
                        await driver.start()  # retries a stale-heartbeat refusal
                except DeviceError as exc:
                    self._belt_ok.pop(name, None)
                    self.stats["belt_start_failed"] += 1
                    log.error("%s %s could not be started: %s", driver.KIND, name, exc)
                    return f"{driver.KIND} {name}: {exc}"
                self._belt_ok[name] = time.monotonic()
        return None

    async def _keep_belts_fresh(self) -> None:
        """Between picks too, read every belt seen running again past half its freshness, so
        the first pick after a pause goes straight to its sorter command as the picks of a busy
        minute do (it paid a conveyor and a sorter status read first: ~10 ms here, the slowest
        pick of an idle benchmark run). A belt found stopped or unreadable drops out (the next
        pick reads and starts it); one never seen running is not read."""
        while True:
            await asyncio.sleep(BELT_FRESH_S / 4)
            now = time.monotonic()
            for name, seen in list(self._belt_ok.items()):
                if now - seen > BELT_FRESH_S / 2:
                    driver: BeltPort | None = self.conveyors.get(name) or self.sorters.get(name)
                    if driver is not None:
                        self._refresh_belt(name, driver)

    def _refresh_belt(self, name: str, driver: BeltPort) -> None:
        """Read a belt's status in the background, past half its freshness: while picks keep
        coming, the next pick finds the belt fresh and goes straight to its sorter command
        instead of waiting for status reads (one pick in 25 paid ~5 ms for them at 50
        picks/s). A belt found stopped or unreadable is no longer fresh: the next pick takes
        the full path (read, start)."""
        if self._tg is None or name in self._refreshing:
            return
        self._refreshing.add(name)

        async def refresh() -> None:
            asked_at = time.monotonic()
            try:
                status = await driver.status()
            except Exception as exc:  # unreadable, or a bug: never the order tasks' group
                if not isinstance(exc, DeviceError):
                    log.exception("%s %s: background status read failed", driver.KIND, name)
                self._belt_ok.pop(name, None)
            else:
                if status.running:
                    if asked_at > self._belt_ok.get(name, -1e9):
                        self._belt_ok[name] = asked_at
                else:
                    self._belt_ok.pop(name, None)
            finally:
                self._refreshing.discard(name)

        self._tg.create_task(refresh(), name=f"belt-refresh:{name}")

    async def _send(self, order: Order, task: PickTask) -> None:
        driver = self.sorters[task.sorter]
        try:
            try:
                await driver.send(task.cmd_id, task.tote, task.lane)
            except CmdIdBelowPlc as exc:
                # Nothing was written: the PLC's ids moved past this one after it was drawn.
                if not self.book.renumber(order, task, exc.floor):
                    raise
                await driver.send(task.cmd_id, task.tote, task.lane)
        except CommandOutcomeUnknown as exc:
            self.book.finish(task, TaskEvent.LOST, str(exc))
            return
        except (CommandRefused, DeviceError, ValueError) as exc:
            self.book.finish(task, TaskEvent.FAILED, f"sorter {task.sorter}: {exc}")
            return
        transition(task, TaskEvent.ACCEPTED, self.clock())
        task.plc_epoch = driver.epoch
        # Not journaled: a restart reconciles a DISPATCHED command the same way (the PLC
        # knows whether it accepted it; see _reconcile).
        self.book.publish([self.book.task_event(order, task)])

    async def _reconcile(self, order: Order, task: PickTask) -> None:
        """Decide a command journaled before a restart (module doc)."""
        if task.state not in (TaskState.DISPATCHED, TaskState.ACCEPTED):
            return
        driver = self.sorters.get(task.sorter)
        if driver is None:
            self.book.finish(task, TaskEvent.LOST, f"sorter {task.sorter} is no longer configured")
            return
        try:
            await driver.link.wait_up(RECONCILE_WAIT_S)
            found = await driver.lookup(task.cmd_id)
        except (DeviceError, TimeoutError) as exc:
            self.book.finish(task, TaskEvent.LOST, f"sorter {task.sorter} unreachable: {exc}")
            return
        self.stats["reconciled"] += 1
        event = reconcile_event(
            task.state,
            task.plc_epoch,
            _PLC_KNOWS[found.state],
            found.epoch,
            found.result is SortResult.DIVERTED,
        )
        if event is None:
            # Never reached the PLC: stays DISPATCHED and is sent (same cmd_id) by the caller.
            log.info("order %s task %d: cmd %d never reached the PLC", order.order_id,
                     task.task_no, task.cmd_id)  # fmt: skip
        elif event is TaskEvent.LOST:
            self.book.finish(
                task,
                event,
                f"cmd {task.cmd_id}: sorter {task.sorter} says {found.state.value} "
                f"(epoch {found.epoch}, sent in epoch {task.plc_epoch})",
            )
        elif event is TaskEvent.ACCEPTED:
            transition(task, event, self.clock())
        else:
            self._on_result(task, found.result)

    async def _await_task(self, order: Order, task: PickTask, done: asyncio.Event) -> None:
        try:
            if task.state is TaskState.ACCEPTED:
                await self._await_result(task)
                if not task.final:
                    self.book.store(order, [self.book.task_event(order, task)])
            if task.state is TaskState.DIVERTED:
                deadline = task.updated_ts + self.cfg.scale_timeout_s
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
                # that races the event, and a stop must always end this task.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - self.clock())):
                        await done.wait()
                if done.is_set():
                    task.scale_confirmed = True
                    self.book.finish(task, TaskEvent.SCALE_CONFIRMED, None)
                else:
                    state = self.states.get(task.shelf)
                    now_units = state.units if state is not None else None
                    picked = None
                    if now_units is not None:
                        picked = max(0, task.target_count + task.qty - now_units)
                    task.picked_qty = picked
                    self.book.finish(
                        task,
                        TaskEvent.SCALE_TIMEOUT,
                        f"shelf {task.shelf} shows {picked} of {task.qty} unit(s) picked after "
                        f"{self.cfg.scale_timeout_s:g} s",
                    )
        finally:
            with contextlib.suppress(ValueError):
                self._waiting[task.shelf].remove((task, done))
            if not self._waiting[task.shelf]:
                self._waiting.pop(task.shelf, None)
        # One commit for the task's event and, when it was the last, the order's close.
        self.book.close(order, [self.book.task_event(order, task)])

    async def _await_result(self, task: PickTask) -> None:
        driver = self.sorters[task.sorter]
        try:
            outcome = await driver.wait_result(task.cmd_id, timeout_s=self.cfg.result_timeout_s)
        except ResultTimeout as exc:
            self.book.finish(task, TaskEvent.FAILED, str(exc))
            return
        except CommandOutcomeUnknown as exc:
            self.book.finish(task, TaskEvent.LOST, str(exc))
            return
        except DeviceError as exc:
            self.book.finish(task, TaskEvent.LOST, f"sorter {task.sorter}: {exc}")
            return
        self._on_result(task, outcome.result)

    def _on_result(self, task: PickTask, result: SortResult | None) -> None:
        task.result = result.value if result is not None else None
        if result is SortResult.DIVERTED:
            transition(task, TaskEvent.DIVERTED, self.clock())
        else:
            self.book.finish(
                task,
                TaskEvent.NOT_DIVERTED,
                f"sorter {task.sorter}: tote {task.tote} {task.result}",
            )

    # -- scales -------------------------------------------------------------------------------
    def on_events(self, events: list[BusEvent]) -> None:
        """Bus listener: a shelf's count fell → confirm waiting tasks on that shelf."""
        for ev in events:
            if not isinstance(ev, StockChanged):
                continue
            waiting = self._waiting.get(ev.shelf_id)
            if not waiting:
                continue
            units = ev.new_units
            for task, done in waiting:
                if units <= task.target_count:
                    done.set()
