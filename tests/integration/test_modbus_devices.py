"""Conveyor and sorter drivers against the PLC simulators over real Modbus TCP on 127.0.0.1.

Every fault is injected at run time in the simulated PLC (pymodbus server action hook) or in
its fault proxy. Tests wait on the simulator's state or on the link's state watch, with
timeouts; never on fixed sleeps. The b1–b8 prefixes number the actuation fault cases (a lost
reply, a PLC restart, a dropped link, ...); each test's name and body state its fault and pass
criterion.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from devices.conveyor import ConveyorDriver
from devices.errors import (
    CommandOutcomeUnknown,
    CommandRefused,
    DeviceBusy,
    DeviceConfigError,
    DeviceFaulty,
    DeviceUnavailable,
    IllegalAddress,
    NoReply,
)
from devices.link.modbus import DeviceHealth, ModbusLink, ModbusLinkConfig
from devices.link.state import LinkState
from devices.plc import BeltFault, BeltState, PlcDriver
from devices.registers import Register, RegisterType
from devices.sorter import CommandState, SorterDriver, SortResult
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost, free_port
from simulators.plc import BeltPlc
from simulators.plc import BeltState as SimBeltState
from simulators.sorter import SorterPlc
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
D = TypeVar("D", bound=PlcDriver)
M = TypeVar("M", bound=BeltPlc)


@dataclass
class Rig(Generic[M, D]):
    model: M
    host: PlcHost
    link: ModbusLink
    driver: D


@contextlib.asynccontextmanager
async def running_link(link: ModbusLink) -> AsyncIterator[asyncio.Task[None]]:
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(link.run(), name=f"{link.name}.run")
        try:
            yield task
        finally:
            await link.disconnect()


@contextlib.asynccontextmanager
async def rig(
    model: M,
    make_driver: Callable[[ModbusLink], D],
    *,
    seed: int | None = 1,
    **link_config: Any,
) -> AsyncIterator[Rig[M, D]]:
    async with PlcHost(model, seed=seed) as host:
        link = ModbusLink(ModbusLinkConfig(port=host.port, **link_config), name=model.plc_id)
        driver = make_driver(link)
        synced = asyncio.Event()
        driver.add_epoch_listener(lambda old, new: synced.set())
        async with running_link(link):
            await link.wait_up(5.0)
            async with asyncio.timeout(5.0):
                await synced.wait()  # first resync done: no test fault catches it
            yield Rig(model, host, link, driver)


def conveyor_rig(
    **kw: Any,
) -> contextlib.AbstractAsyncContextManager[Rig[ConveyorPlc, ConveyorDriver]]:
    model = ConveyorPlc("conveyor-1", **kw)
    return rig(model, ConveyorDriver)


def sorter_rig(
    link_config: dict[str, Any] | None = None,
    driver_config: dict[str, Any] | None = None,
    **kw: Any,
) -> contextlib.AbstractAsyncContextManager[Rig[SorterPlc, SorterDriver]]:
    kw.setdefault("speed", 50.0)
    kw.setdefault("lane_drain_s", 0.0)
    model = SorterPlc("sorter-1", **kw)
    return rig(
        model,
        lambda link: SorterDriver(link, **(driver_config or {})),
        **(link_config or {}),
    )


def mailbox_writes(model: SorterPlc, cmd_id: int) -> int:
    return sum(1 for _, w in model.writes if w.get("mb_cmd_id") == cmd_id and w.get("mb_strobe"))


# -- every register: round trip and read-back -----------------------------------------------------


def sample(reg: Register) -> int | float:
    if reg.name == "command":
        return reg.value_of("NONE")  # a real command would act; NONE round-trips
    if reg.name == "mb_strobe":
        return reg.value_of("IDLE")
    if reg.type is RegisterType.FLOAT32:
        return 321.5
    if reg.type is RegisterType.UINT32:
        return 0x0001_0000 + reg.address  # both words non-zero: word order matters
    return 0x0100 + reg.address


@pytest.mark.parametrize("kind", ["conveyor", "sorter"])
async def test_every_register_round_trips_and_reads_back(kind: str) -> None:
    setup = conveyor_rig() if kind == "conveyor" else sorter_rig()
    async with setup as r:  # type: ignore[attr-defined]
        reg_map = r.driver.map
        link = r.link
        for reg in reg_map.registers:
            if not reg.writable or reg.name == "heartbeat":
                continue
            value = sample(reg)
            address, words = reg_map.encode({reg.name: value})
            await link.write(1, address, words)
            back = reg_map.decode(address, await link.read(1, address, len(words)))
            assert back.raw()[reg.name] == value, reg.name
            assert r.model.stored[reg.name] == value, reg.name
        # read-only registers: what the driver decodes is what the PLC holds
        snap = await r.driver.read_snapshot()
        plc = r.model.values(time.monotonic())
        for reg in reg_map.registers:
            got = snap.raw()[reg.name]
            want = plc[reg.name] if reg.name != "heartbeat" else r.model.heartbeat
            if reg.name == "uptime_s":
                assert abs(int(got) - int(want)) <= 1  # type: ignore[arg-type]
            elif isinstance(want, list):
                assert list(got) == want, reg.name  # type: ignore[arg-type]
            else:
                assert got == want, reg.name
        assert snap.int_of("heartbeat_echo") == r.model.heartbeat > 0
        assert snap.int_of("epoch") == r.model.epoch == r.driver.epoch
        # a read-only register refuses writes: IllegalAddress, never retried
        epoch = reg_map["epoch"]
        before = r.host.requests[16]
        with pytest.raises(IllegalAddress):
            await link.write(1, epoch.address, epoch.encode(7))
        assert r.host.requests[16] == before + 1
        assert r.model.epoch != 7
        # past the end of the map: illegal address as well
        with pytest.raises(IllegalAddress):
            await link.read(1, reg_map.max_address, 2)


# -- conveyor behaviour ---------------------------------------------------------------------------


async def test_conveyor_start_ramp_transit_speed_and_stop() -> None:
    async with conveyor_rig(speed=20.0, length_mm=2000.0, ramp_s=1.0) as r:
        model, conveyor = r.model, r.driver
        status = await conveyor.start()
        assert status.state in (BeltState.STARTING, BeltState.RUNNING)
        await model.wait_until(lambda: model.state is SimBeltState.RUNNING, 5.0)
        status = await conveyor.set_speed(1000.0)
        assert status.speed_setpoint_mm_s == 1000.0
        await model.wait_until(lambda: model.speed_actual == 1000.0, 5.0)
        status = await conveyor.status()
        assert status.state is BeltState.RUNNING
        assert "running" in status.flags
        assert status.belt_length_mm == 2000
        assert status.transit_time_s == pytest.approx(2.0)
        placed = time.monotonic()
        await conveyor.induct(4711)
        await model.wait_until(lambda: model.totes_out == 1, 5.0)
        delivered_at, tote = model.delivered[0]
        assert tote == 4711
        # 2000 mm at 1000 mm/s = 2 s of belt time = 0.1 s at speed 20 (+ one tick)
        assert 0.08 <= delivered_at - placed <= 0.3
        status = await conveyor.status()
        assert (status.totes_out, status.last_tote_out, status.totes_on_belt) == (1, 4711, 0)
        with pytest.raises(ValueError, match="maximum"):
            await conveyor.set_speed(2600.0)  # above the map's max: nothing sent
        with pytest.raises(DeviceConfigError):
            await conveyor.set_speed(2200.0)  # the PLC's own limit (2000): exception 03
        status = await conveyor.stop()
        assert status.state is BeltState.STOPPED
        assert status.speed_actual_mm_s == 0.0


async def test_conveyor_estop_and_jam_need_reset() -> None:
    async with conveyor_rig(speed=20.0) as r:
        model, conveyor = r.model, r.driver
        await conveyor.start()
        model.press_estop()
        status = await conveyor.status()
        assert status.state is BeltState.ESTOP
        assert status.fault is BeltFault.ESTOP
        assert "estop" in status.flags
        with pytest.raises(CommandRefused, match="ESTOP"):
            await conveyor.start()
        model.release_estop()
        with pytest.raises(CommandRefused):
            await conveyor.start()  # released, but still latched until RESET
        assert (await conveyor.reset()).state is BeltState.STOPPED
        assert (await conveyor.start()).running
        model.jam()
        status = await conveyor.status()
        assert status.state is BeltState.JAMMED
        assert status.fault is BeltFault.JAM
        with pytest.raises(CommandRefused, match="JAMMED"):
            await conveyor.start()
        await conveyor.reset()
        assert (await conveyor.start()).running


async def test_start_refused_for_a_stale_heartbeat_is_retried_then_given_up() -> None:
    """A START the PLC refuses for want of a fresh heartbeat (WATCHDOG) is sent again after a
    heartbeat interval, three times in all; other refusals are not retried."""
    async with conveyor_rig(speed=20.0) as r:
        model, conveyor = r.model, r.driver
        r.link.remove_heartbeat(conveyor.unit, conveyor.map["heartbeat"].address)
        await model.wait_until(lambda: not model.heartbeat_fresh(model.last_tick), 3.0)
        with pytest.raises(CommandRefused, match="WATCHDOG"):
            await conveyor.start()
        assert len(model.events_of("start_refused")) == 3
        model.press_estop()
        with pytest.raises(CommandRefused, match="ESTOP"):
            await conveyor.start()
        assert len(model.events_of("start_refused")) == 4  # not retried


# -- sorter behaviour -----------------------------------------------------------------------------


async def test_sorter_divert_recirculate_reject() -> None:
    async with sorter_rig(lanes=4, lane_capacity=1, max_recirculations=1) as r:
        model, sorter = r.model, r.driver
        await sorter.start()
        first = await sorter.submit(1, 501, 2, timeout_s=5)
        assert first.result is SortResult.DIVERTED
        second = await sorter.submit(2, 502, 2, timeout_s=5)  # lane 2 now full
        assert second.result is SortResult.RECIRCULATED
        assert [e.cmd_id for e in model.events_of("recirculate")] == [2]
        third = await sorter.submit(3, 503, 9, timeout_s=5)  # no lane 9
        assert third.result is SortResult.REJECTED
        status = await sorter.status()
        assert status.lanes_full == {2}
        assert status.lane_fill == (0, 1, 0, 0)
        assert (status.last_done_id, status.last_result) == (3, SortResult.REJECTED)
        assert status.done == (
            (1, SortResult.DIVERTED),
            (2, SortResult.RECIRCULATED),
            (3, SortResult.REJECTED),
        )
        assert status.ack_id == 3
        assert status.pending_ids == ()
        assert status.done_seq == 3
        assert first.first_write_at <= first.accepted_at <= first.done_at
        assert dict(model.executions) == {1: 1, 2: 1, 3: 1}
        lookup = await sorter.lookup(2)
        assert (lookup.state, lookup.result) == (CommandState.DONE, SortResult.RECIRCULATED)
        assert (await sorter.lookup(99)).state is CommandState.NOT_SEEN


async def test_same_cmd_id_twice_runs_once_and_ids_must_increase() -> None:
    async with sorter_rig() as r:
        model, sorter = r.model, r.driver
        await sorter.start()
        a, b = await asyncio.gather(sorter.submit(7, 70, 1), sorter.submit(7, 70, 1))
        assert a.result is b.result is SortResult.DIVERTED
        assert model.executions[7] == 1
        assert mailbox_writes(model, 7) == 1
        again = await sorter.submit(7, 70, 1)  # a completed command is never replayed
        assert again.result is SortResult.DIVERTED
        assert mailbox_writes(model, 7) == 1
        with pytest.raises(DeviceConfigError, match="tote 70"):
            await sorter.send(7, 71, 1)
        with pytest.raises(DeviceConfigError, match="must be above 7"):
            await sorter.send(5, 50, 1)


# -- B1 / B2 / B3: lost reply, lost request, late reply -------------------------------------------


async def test_b1_reply_lost_after_execution_runs_once() -> None:
    async with sorter_rig() as r:
        model, sorter = r.model, r.driver
        await sorter.start()
        mailbox = sorter.map["mb_cmd_id"].address
        r.host.faults.add("drop_reply", 1, function_codes={16}, address=mailbox)
        started = time.monotonic()
        outcome = await sorter.submit(10, 100, 3)
        assert time.monotonic() - started <= 2.0  # result known ≤ 2 s
        assert outcome.result is SortResult.DIVERTED
        assert outcome.resends == 0
        assert r.link.stats.timeouts == 1
        assert model.executions[10] == 1
        assert mailbox_writes(model, 10) == 1
        assert r.host.faults.hits["drop_reply"] == 1


async def test_b2_request_lost_is_resent_with_same_id_and_runs_once() -> None:
    async with sorter_rig() as r:
        model, sorter = r.model, r.driver
        await sorter.start()
        mailbox = sorter.map["mb_cmd_id"].address
        r.host.faults.add("drop_request", 1, function_codes={16}, address=mailbox)
        outcome = await sorter.submit(11, 110, 2)
        assert outcome.result is SortResult.DIVERTED
        assert outcome.resends == 1
        assert sorter.resends == 1
        assert model.executions[11] == 1
        assert mailbox_writes(model, 11) == 1
        assert r.host.faults.hits["drop_request"] == 1


async def test_outcome_unknown_while_unreachable_then_reconciled() -> None:
    async with sorter_rig(driver_config={"confirm_timeout_s": 1.0}) as r:
        model, sorter, faults = r.model, r.driver, r.host.faults
        await sorter.start()
        mailbox = sorter.map["mb_cmd_id"].address
        faults.add("drop_reply", 1, function_codes={16}, address=mailbox)
        send = asyncio.ensure_future(sorter.send(20, 200, 1))
        await model.wait_until(lambda: model.executions[20] == 1, 2.0)
        faults.black_hole = True  # executed, reply lost, and now the PLC is unreachable
        with pytest.raises(CommandOutcomeUnknown, match="not readable"):
            await send
        faults.black_hole = False
        await r.link.wait_up(5.0)
        lookup = await sorter.lookup(20)
        assert lookup.state is CommandState.DONE
        assert lookup.result is SortResult.DIVERTED
        outcome = await sorter.wait_result(20, timeout_s=2.0)
        assert outcome.result is SortResult.DIVERTED
        await sorter.send(20, 200, 1)  # joining it again sends nothing
        assert mailbox_writes(model, 20) == 1
        assert model.executions[20] == 1


async def test_lost_request_while_unreachable_is_proven_not_executed() -> None:
    async with sorter_rig(driver_config={"confirm_timeout_s": 1.0}) as r:
        model, sorter, faults = r.model, r.driver, r.host.faults
        await sorter.start()
        mailbox = sorter.map["mb_cmd_id"].address
        faults.add("drop_request", 1, function_codes={16}, address=mailbox)
        send = asyncio.ensure_future(sorter.send(30, 300, 1))
        await model.wait_until(lambda: faults.hits["drop_request"] == 1, 2.0)
        faults.black_hole = True
        with pytest.raises(CommandOutcomeUnknown):
            await send
        faults.black_hole = False
        await r.link.wait_up(5.0)
        status = await sorter.status()
        assert status.fault is BeltFault.WATCHDOG  # no heartbeat got through meanwhile
        await sorter.start()
        assert (await sorter.submit(31, 310, 2, timeout_s=5)).result is SortResult.DIVERTED
        # sending 31 needed the mailbox: the read-back before it proved 30 never arrived
        with pytest.raises(NoReply, match="never reached"):
            await sorter.wait_result(30)
        assert (await sorter.lookup(30)).state is CommandState.NOT_SEEN
        assert model.executions[30] == 0
        assert model.executions[31] == 1


async def test_b3_late_reply_is_never_taken_for_a_newer_request() -> None:
    async with sorter_rig() as r:
        reg_map, link = r.driver.map, r.link
        tote = reg_map["mb_tote"]
        await link.write(1, *reg_map.encode({"mb_tote": 111}))
        r.host.faults.add("delay_reply", 1, function_codes={3}, delay_s=0.7)
        with pytest.raises(NoReply):
            await link.read(1, tote.address, 2)  # its reply (111) comes 0.2 s too late
        r.model.stored["mb_tote"] = 222  # the PLC changed it meanwhile
        newer = await link.read(1, tote.address, 2)
        assert tote.decode(newer) == 222
        assert link.stats.stale_replies == 1
        assert link.stats.malformed == 0
        assert link.state is LinkState.UP
        assert link.health is DeviceHealth.OK


async def test_cancelled_request_reply_is_not_a_fault() -> None:
    async with sorter_rig() as r:
        r.host.faults.add("delay_reply", 1, function_codes={3}, delay_s=0.2)
        task = asyncio.ensure_future(r.link.read(1, 0, 4))
        await r.host.model.wait_until(lambda: r.host.faults.hits["delay_reply"] == 1, 2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await r.link.write(1, *r.driver.map.encode({"mb_tote": 5}))  # reply arrives after
        assert (await r.driver.status()).mb_cmd_id == 0
        assert r.link.stats.malformed == 0
        assert r.link.health is DeviceHealth.OK


# -- B4: unreachable, half-open, fail fast --------------------------------------------------------


async def test_b4_unreachable_fails_fast() -> None:
    link = ModbusLink(ModbusLinkConfig(port=free_port()), name="nowhere")
    conveyor = ConveyorDriver(link)
    async with running_link(link):
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable):
            await conveyor.start()
        with pytest.raises(DeviceUnavailable):
            await link.wait_up(0.3)
        assert time.monotonic() - started < 0.5
        assert link.state is not LinkState.UP


async def test_b4_plc_goes_offline_then_back() -> None:
    async with conveyor_rig() as r:
        down = asyncio.ensure_future(r.link.watch.wait_for(LinkState.DOWN, 1.5))
        await r.host.go_offline()
        await down  # noticed at once (connection reset), well within 1.5 s
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable):
            await r.driver.status()
        assert time.monotonic() - started < 0.05
        await r.host.go_online()
        await r.link.wait_up(3.0)
        assert (await r.driver.status()).epoch == r.model.epoch


async def test_b4_half_open_link_noticed_and_belt_stopped_by_watchdog() -> None:
    async with conveyor_rig(speed=20.0) as r:
        model = r.model
        await r.driver.start()
        await model.wait_until(lambda: model.moving, 2.0)
        r.host.faults.black_hole = True  # connection stays open, nothing is answered
        t0 = time.monotonic()
        await r.link.watch.wait_for(LinkState.DOWN, 1.5)
        noticed_s = time.monotonic() - t0
        await model.wait_until(lambda: not model.moving, 1.5)
        trip = model.events_of("watchdog")[-1]
        assert trip.t - t0 <= 1.25
        assert noticed_s <= 1.5
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable):
            await r.driver.start()
        assert time.monotonic() - started < 0.05
        r.host.faults.black_hole = False


# -- watchdog: the controller dies ----------------------------------------------------------------


async def test_controller_killed_belt_stops_and_stays_stopped_until_started() -> None:
    model = ConveyorPlc("conveyor-1", speed=20.0)
    async with PlcHost(model) as host:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.modbus_client_proc",
            str(host.port),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(15.0):
                assert (await proc.stdout.readline()).strip() == b"RUNNING"
            await model.wait_until(lambda: model.moving, 2.0)
            proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await model.wait_until(lambda: not model.moving, 2.0)
            assert time.monotonic() - killed_at <= 1.25
            assert model.watchdog_tripped
            assert model.events_of("watchdog")
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        # a new controller connects: heartbeats flow again, the belt stays stopped
        link = ModbusLink(ModbusLinkConfig(port=host.port), name="new-controller")
        conveyor = ConveyorDriver(link)
        async with running_link(link):
            await link.wait_up(5.0)
            beats = model.heartbeat
            await model.wait_until(lambda: model.heartbeat >= beats + 3, 3.0)
            status = await conveyor.status()
            assert status.state is BeltState.STOPPED
            assert status.fault is BeltFault.WATCHDOG
            assert "watchdog_tripped" in status.flags
            assert (await conveyor.start()).running  # re-enabled only by a START


async def test_link_task_cancelled_belt_stops() -> None:
    model = ConveyorPlc("conveyor-1")
    async with PlcHost(model) as host:
        link = ModbusLink(ModbusLinkConfig(port=host.port), name="ctl")
        conveyor = ConveyorDriver(link)
        task = asyncio.ensure_future(link.run())
        try:
            await link.wait_up(5.0)
            await conveyor.start()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stopped_at = time.monotonic()
        await model.wait_until(lambda: not model.moving, 2.0)
        assert time.monotonic() - stopped_at <= 1.25


# -- B6: PLC restart ------------------------------------------------------------------------------


async def test_b6_plc_restart_new_epoch_resync_no_replay() -> None:
    async with sorter_rig() as r:
        model, sorter = r.model, r.driver
        await sorter.start()
        for cmd_id in (1, 2, 3):
            assert (await sorter.submit(cmd_id, cmd_id, 1)).result is SortResult.DIVERTED
        await sorter.stop()  # the next command stays pending on the belt
        await sorter.send(4, 4, 1)
        pending = asyncio.ensure_future(sorter.wait_result(4))
        old_epoch = sorter.epoch
        resynced = asyncio.Event()
        sorter.add_epoch_listener(lambda old, new: resynced.set())
        writes_at_restart = len(model.writes)
        restarted_at = time.monotonic()
        await r.host.restart()
        async with asyncio.timeout(2.0):
            await resynced.wait()
        assert time.monotonic() - restarted_at <= 2.0
        assert sorter.epoch == model.epoch != old_epoch
        assert sorter.restarts == 1
        with pytest.raises(CommandOutcomeUnknown, match="restarted"):
            await pending
        lookup = await sorter.lookup(4)
        assert lookup.state is CommandState.NOT_SEEN
        assert lookup.epoch == model.epoch
        # nothing was replayed to the new PLC: only heartbeats written since the restart
        since_restart = list(model.writes)[writes_at_restart:]
        assert since_restart
        assert all(set(w) == {"heartbeat"} for _, w in since_restart)
        assert not any(mailbox_writes(model, i) > 1 for i in (1, 2, 3, 4))
        assert dict(model.executions) == {1: 1, 2: 1, 3: 1, 4: 1}
        await sorter.start()
        assert (await sorter.submit(5, 5, 2)).result is SortResult.DIVERTED
        assert (await sorter.submit(3, 3, 1)).result is SortResult.DIVERTED  # old result
        assert model.executions[3] == 1


# -- B7: STOP overtakes a backlog on a slow PLC ---------------------------------------------------


async def test_b7_stop_behind_100_queued_submits_reaches_plc_first() -> None:
    async with sorter_rig(speed=200.0) as r:
        model, sorter = r.model, r.driver
        await sorter.start()
        r.host.faults.latency_s = 0.02  # every request takes 20 ms more
        submits = [asyncio.ensure_future(sorter.submit(100 + i, i, 1 + i % 8)) for i in range(100)]
        reads: list[asyncio.Future[Any]] = []
        try:
            await model.wait_until(lambda: len(model.events_of("accept")) >= 2, 5.0)
            # The submits queue on the sorter's mailbox; add a backlog in the link itself.
            reads = [asyncio.ensure_future(sorter.status()) for _ in range(30)]
            await wait_for_condition(
                r.link.queued,
                1.0,
                what="30 requests queued",
                until=lambda n: n >= 30,
                interval_s=0.001,
            )
            accepted_before = len(model.events_of("accept"))
            called = time.monotonic()
            status = await sorter.stop()
            stop_event = model.events_of("stop")[-1]
            assert stop_event.t - called <= 0.2
            assert len([e for e in model.events_of("accept") if e.t < stop_event.t]) <= (
                accepted_before + 1
            )
            assert status.state is BeltState.STOPPED
            assert len(model.events_of("accept")) < 100
        finally:
            for task in submits + reads:
                task.cancel()
            await asyncio.gather(*submits, *reads, return_exceptions=True)
            r.host.faults.latency_s = 0.0


# -- B8: malformed replies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("garbage", "protocol id"),
        ("bad_protocol", "protocol id"),
        ("short_frame", "short or long frame"),
        ("wrong_unit", "unit 2, expected unit 1"),
        ("wrong_function", "function code"),
        ("device_failure", "device failure"),
    ],
)
async def test_b8_malformed_reply_marks_faulty_and_recovers(kind: str, reason: str) -> None:
    async with conveyor_rig() as r:
        link = r.link
        health: list[DeviceHealth] = []
        link.add_health_listener(lambda h, fault: health.append(h))
        r.host.faults.add(kind, 1, function_codes={3})
        with pytest.raises(DeviceFaulty, match=reason) as info:
            await r.driver.status()
        assert reason in info.value.reason
        assert link.health is DeviceHealth.FAULTY
        assert health == [DeviceHealth.FAULTY]
        assert link.fault is not None
        assert reason in link.fault.reason
        await link.wait_up(3.0)  # reconnected (or never dropped, for an exception reply)
        status = await r.driver.status()
        assert status.epoch == r.model.epoch
        assert link.stats.malformed == (0 if kind == "device_failure" else 1)


# -- busy and illegal address ---------------------------------------------------------------------


async def test_busy_is_retried_and_executes_once() -> None:
    async with conveyor_rig() as r:
        r.host.faults.add("busy", 3, function_codes={16})
        status = await r.driver.set_speed(700.0)
        assert status.speed_setpoint_mm_s == 700.0
        assert r.link.stats.busy_retries == 3
        assert sum(1 for _, w in r.model.writes if "speed_setpoint" in w) == 1


async def test_busy_for_too_long_raises_device_busy() -> None:
    model = ConveyorPlc("conveyor-1")
    async with rig(model, ConveyorDriver, busy_retry_s=0.2) as r:
        r.host.faults.add("busy", None, function_codes={16})
        started = time.monotonic()
        with pytest.raises(DeviceBusy):
            await r.driver.set_speed(700.0)
        assert time.monotonic() - started < 0.5
        assert not any("speed_setpoint" in w for _, w in r.model.writes)
        r.host.faults.clear()


async def test_illegal_address_is_a_config_error_never_retried() -> None:
    async with conveyor_rig() as r:
        before = r.host.requests[3]
        r.host.faults.add("illegal_address", 1, function_codes={3})
        with pytest.raises(IllegalAddress):
            await r.driver.status()
        assert r.host.requests[3] == before + 1
        assert r.link.state is LinkState.UP
        assert r.link.health is DeviceHealth.OK


# -- the plcs command -----------------------------------------------------------------------------


async def test_plcs_command_serves_site_plcs_with_control_port(tmp_path: Path) -> None:
    conveyor_port, sorter_port, control_port = free_port(), free_port(), free_port()
    site = tmp_path / "site.toml"
    site.write_text(
        f"""
[site]
id = "t"

[[plcs]]
id = "conveyor-1"
kind = "conveyor"
port = {conveyor_port}
length_mm = 8000

[[plcs]]
id = "sorter-1"
kind = "sorter"
port = {sorter_port}
lanes = 6
"""
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        "plcs",
        str(site),
        "--control-port",
        str(control_port),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15.0):
            while b"running" not in (line := await proc.stdout.readline()):
                assert line, "plcs exited early"
        link = ModbusLink(ModbusLinkConfig(port=conveyor_port), name="c")
        conveyor = ConveyorDriver(link)
        async with running_link(link):
            await link.wait_up(5.0)
            status = await conveyor.status()
            assert status.belt_length_mm == 8000
            assert status.state is BeltState.STOPPED
            reader, writer = await asyncio.open_connection("127.0.0.1", control_port)
            writer.write(b"conveyor-1 estop on\nlist\n")
            assert (await reader.readline()).strip() == b"ok"
            assert (await reader.readline()).strip() == b"ok"
            listing = [(await reader.readline()).decode() for _ in range(2)]
            assert "sorter-1 sorter 127.0.0.1:" in listing[1]
            writer.close()
            assert (await conveyor.status()).state is BeltState.ESTOP
        sorter_link = ModbusLink(ModbusLinkConfig(port=sorter_port), name="s")
        sorter = SorterDriver(sorter_link)
        async with running_link(sorter_link):
            await sorter_link.wait_up(5.0)
            assert (await sorter.status()).lane_count == 6
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10.0):
            assert await proc.wait() == 0
