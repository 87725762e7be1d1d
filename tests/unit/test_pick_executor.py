"""PickExecutor against stand-ins for its narrow belt and sorter ports (our own interfaces), with
the real desk and SQLite journal: the executor's decisions go through the pure task machine.
Against simulated PLCs: tests/integration/test_picking.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from controller.adapters.journal import Journal
from controller.control import ControlLoop
from controller.domain.model import ShelfStatus
from controller.domain.orders import Resolution
from controller.domain.stock import ShelfState
from controller.services.ingest import shelf_specs
from controller.services.pick_executor import BELT_FRESH_S
from controller.services.picking import PickingService, PickRequest
from devices.errors import CommandOutcomeUnknown
from devices.sorter import SortResult
from tests.unit.test_picking_service import Clock, link, site_with_route
from tests.waiting import wait_for_condition


class Belt:
    """A conveyor port: ``status()`` waits for ``gate`` (a belt slow to answer)."""

    KIND: ClassVar[str] = "conveyor"

    def __init__(self) -> None:
        self.link = link(True)
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked = asyncio.Event()
        self.running = True
        self.epoch_listeners: list[Callable[[int | None, int], None]] = []

    def add_epoch_listener(self, callback: Callable[[int | None, int], None]) -> None:
        self.epoch_listeners.append(callback)

    async def status(self) -> SimpleNamespace:
        self.asked.set()
        await self.gate.wait()
        return SimpleNamespace(running=self.running)

    async def start(self) -> object:
        return None


class Sorter(Belt):
    """A sorter port: records the commands handed to it; ``lost`` makes the next send's
    outcome unknown, as a PLC restart with the command pending would."""

    KIND: ClassVar[str] = "sorter"

    def __init__(self) -> None:
        super().__init__()
        self.epoch: int | None = 7
        self.mailbox_known = True
        self.sent: list[int] = []
        self.lost = False

    def add_mailbox_listener(self, callback: Callable[[int, int], None]) -> None:
        pass

    async def send(self, cmd_id: int, tote: int, lane: int) -> None:
        self.sent.append(cmd_id)
        if self.lost:
            raise CommandOutcomeUnknown(cmd_id, "PLC restarted (epoch 7 -> 8)")

    async def wait_result(self, cmd_id: int, *, timeout_s: float | None = None) -> SimpleNamespace:
        return SimpleNamespace(result=SortResult.DIVERTED)

    async def lookup(self, cmd_id: int) -> None:
        raise AssertionError("not after a restart")


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[tuple[PickingService, Belt, Sorter]]:
    site, clock = site_with_route(tmp_path), Clock()
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    specs = shelf_specs(site)
    states = {sid: ShelfState(spec) for sid, spec in specs.items()}
    for st in states.values():
        st.units, st.status, st.last_ts_s = 20, ShelfStatus.OK, clock.now
    belt, sorter = Belt(), Sorter()
    svc = PickingService(
        site,
        journal,
        states,
        specs,
        conveyors={"c1": belt},
        sorters={"s1": sorter},
        publish_bus=lambda events: None,
        clock=clock,
    )
    svc.restore()
    task = asyncio.create_task(svc.run())
    try:
        yield svc, belt, sorter
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        journal.close()


def executing(order_id: str) -> bool:
    return any(t.get_name() == f"order:{order_id}" for t in asyncio.all_tasks())


async def test_an_order_cancelled_while_its_belts_start_sends_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as (svc, belt, sorter):
        belt.gate.clear()  # the conveyor's status read is slow
        done = svc.submit(PickRequest("W-1", (("K0", 3),), "PS1"), key="k", principal="p")
        oid = done.order["order_id"]
        await asyncio.wait_for(belt.asked.wait(), 5)
        assert not svc.executor.commands_sent(oid)
        body = svc.cancel(oid, by="p")
        assert (body["state"], body["tasks"][0]["state"]) == ("CANCELLED", "CANCELLED")
        assert svc.reserved("sh0") == 0
        belt.gate.set()
        await wait_for_condition(lambda: not executing(oid), 5.0, what="the execution ended")
        assert sorter.sent == []


async def test_a_lost_command_is_unknown_until_a_person_resolves_it(tmp_path: Path) -> None:
    async with running(tmp_path) as (svc, _, sorter):
        sorter.lost = True
        done = svc.submit(PickRequest("W-1", (("K0", 3),), "PS1"), key="k", principal="p")
        oid = done.order["order_id"]
        body = await wait_for_condition(
            lambda: svc.get(oid),
            5.0,
            what="the order in EXCEPTION",
            until=lambda o: o is not None and o["state"] == "EXCEPTION",
        )
        assert body is not None
        assert body["tasks"][0]["state"] == "UNKNOWN"
        assert sorter.sent == [1]  # handed over once, never replayed
        body = svc.resolve(oid, 0, Resolution.CONFIRMED, by="sup", reason="in the tote")
        assert (body["state"], body["tasks"][0]["state"]) == ("SORTED", "CONFIRMED")
        assert svc.stats["task_resolved_confirmed"] == 1


async def _first_pick_then_age_the_belts(
    svc: PickingService, sorter: Sorter
) -> tuple[dict[str, float], float]:
    """One pick (the belts are seen running), then both belts made past half their freshness,
    still fresh: the executor's freshness map and the age given to them."""
    svc.submit(PickRequest("W-1", (("K0", 1),), "PS1"), key="k1", principal="p")
    await wait_for_condition(lambda: len(sorter.sent), 5.0, what="the first command")
    fresh = svc.executor._belt_ok
    aged = time.monotonic() - BELT_FRESH_S * 0.6
    fresh["c1"] = fresh["s1"] = aged
    return fresh, aged


async def test_a_belt_past_half_its_freshness_is_read_in_the_background(tmp_path: Path) -> None:
    """While picks keep coming, the belts' status reads happen beside them, not on a pick's way
    to its sorter command; a belt found stopped is read (and started) on the next pick's way."""
    async with running(tmp_path) as (svc, belt, sorter):
        fresh, aged = await _first_pick_then_age_the_belts(svc, sorter)
        belt.gate.clear()  # a status read now waits
        belt.asked.clear()
        svc.submit(PickRequest("W-2", (("K0", 1),), "PS1"), key="k2", principal="p")
        await wait_for_condition(lambda: len(sorter.sent) == 2, 5.0, what="the second command")
        await asyncio.wait_for(belt.asked.wait(), 5)  # read beside it, not before it
        assert fresh["c1"] == aged
        belt.gate.set()
        await wait_for_condition(lambda: fresh["c1"] > aged, 5.0, what="the conveyor refreshed")
        # Found stopped in the background: no longer fresh, so the next pick reads it itself.
        fresh["c1"] = time.monotonic() - BELT_FRESH_S * 0.6
        belt.running = False
        svc.submit(PickRequest("W-3", (("K0", 1),), "PS1"), key="k3", principal="p")
        await wait_for_condition(lambda: "c1" not in fresh, 5.0, what="the conveyor dropped")


async def test_between_picks_the_belts_seen_running_are_kept_fresh(tmp_path: Path) -> None:
    """The first pick after a pause finds its belts fresh, as in a busy minute: belts seen
    running are read again past half their freshness, picks or not."""
    async with running(tmp_path) as (svc, belt, sorter):
        fresh, aged = await _first_pick_then_age_the_belts(svc, sorter)
        await wait_for_condition(
            lambda: min(fresh.get("c1", aged), fresh.get("s1", aged)),
            5.0,
            what="both belts read again without a pick",
            until=lambda oldest: oldest > aged,
        )
        assert sorter.sent == [1]
        belt.running = False  # stopped meanwhile: dropped, the next pick reads and starts it
        fresh["c1"] = aged
        await wait_for_condition(lambda: "c1" not in fresh, 5.0, what="the conveyor dropped")


async def test_a_plc_restart_ends_its_belts_freshness(tmp_path: Path) -> None:
    """A restarted PLC's belts stand still: the next pick reads (and starts) them, however
    recently they were seen running (test_b6 sent a command to a stopped sorter without it)."""
    async with running(tmp_path) as (svc, belt, sorter):
        svc.submit(PickRequest("W-1", (("K0", 1),), "PS1"), key="k1", principal="p")
        await wait_for_condition(lambda: len(sorter.sent), 5.0, what="the first command")
        fresh = svc.executor._belt_ok
        assert {"c1", "s1"} <= fresh.keys()
        for callback in belt.epoch_listeners:
            callback(None, 7)  # first learnt: not a restart
        assert "c1" in fresh
        for callback in sorter.epoch_listeners:
            callback(7, 8)
        assert "s1" not in fresh
        assert "c1" in fresh


async def _command_vs_queued(tmp_path: Path) -> list[int]:
    """With the executor running: five callbacks queued on this loop, then an order submitted;
    how many commands the sorter had been handed when each callback ran."""
    async with running(tmp_path) as (svc, _, sorter):
        svc.submit(PickRequest("W-0", (("K0", 1),), "PS1"), key="k0", principal="p")
        await wait_for_condition(lambda: len(sorter.sent) == 1, 5.0, what="the first command")
        loop = asyncio.get_running_loop()
        seen: list[int] = []
        for _ in range(5):
            loop.call_soon(lambda: seen.append(len(sorter.sent)))
        svc.submit(PickRequest("W-1", (("K0", 1),), "PS1"), key="k1", principal="p")
        await wait_for_condition(lambda: len(seen) == 5, 5.0, what="the queued callbacks")
        return seen


@pytest.mark.parametrize("on_control_loop", [True, False], ids=["control-loop", "other-loop"])
async def test_a_new_orders_command_goes_before_the_work_queued_on_the_control_loop(
    tmp_path: Path, on_control_loop: bool
) -> None:
    if not on_control_loop:  # first-in, first-out: the queued work first
        assert await _command_vs_queued(tmp_path) == [1] * 5
        return
    control = ControlLoop("test-executor")
    control.start()
    try:
        task = control.spawn(_command_vs_queued(tmp_path), name="test")
        assert await asyncio.wait_for(task.result(), 10) == [2] * 5
    finally:
        assert control.close(timeout_s=2.0)
