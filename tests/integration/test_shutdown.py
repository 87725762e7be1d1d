"""The controller always stops (fault case M11: docs/architecture.md, "Stopping").

First at the Modbus link: a cancellation that arrives in the same loop step as a pymodbus
result (a failed connect, a heartbeat reply) must still end `ModbusLink.run`. pymodbus awaits
through ``asyncio.wait_for``, which on Python 3.11 can drop such a cancellation; the link used
to keep reconnecting (or heartbeating) forever and ``floorhand run`` never exited.

Then the whole process: ``floorhand run`` started and stopped with SIGTERM/SIGINT in each link
state (broker down, PLCs unreachable, links mid-connect, commands in flight, history sink
hanging), each stop bounded; a second signal exits at once; a stop that overruns its bound
dumps every thread's stack and exits non-zero.

The 50 stops of the five conditions (10 each) are each a ``floorhand run`` process of its own,
stopped by a signal and checked on its own. To keep them cheap: every start after the first of
a condition is forked from tests/fork_server.py (the same command in its own process, without
re-importing FastAPI and the controller: that was most of a stop's cost), and a condition's
stops run in a few independent lanes at once (own controller, journal, PLCs and broker each),
since most of a stop's time is waiting on the owner gate or a retry cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from controller.__main__ import EXIT_SIGNAL_BASE, EXIT_STOP_OVERRUN, STOP_BOUND_S
from devices.conveyor import ConveyorDriver
from devices.link.modbus import ModbusLink, ModbusLinkConfig
from devices.link.state import LinkState
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost, free_port
from simulators.plc import BeltPlc
from simulators.sorter import SorterPlc
from tests.controller_proc import SHARED_SSL, ControllerProcess
from tests.fork_server import ForkedController, ForkServer
from tests.integration.test_picking import ORDER, picking_site
from tests.mosquitto import MosquittoBroker, paho_publish, running_mosquitto
from tests.sites import auth_headers
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.timeout(180)

LOOP_STEPS = 40
"""Cancel points swept, in event loop steps after the trigger: wide enough to cover the
whole connect (or request/reply) path on loopback several times over."""


def cancel_after_steps(task: asyncio.Task[Any], steps: int) -> None:
    """Cancel ``task`` exactly ``steps`` event-loop iterations from now."""
    loop = asyncio.get_running_loop()

    def step(left: int) -> None:
        if left == 0:
            task.cancel()
        else:
            loop.call_soon(step, left - 1)

    step(steps)


def cancel_on_first_connect(link: ModbusLink, task: asyncio.Task[None], steps: int) -> None:
    """Cancel ``task`` ``steps`` loop iterations after ``link`` first enters CONNECTING (the
    state is set synchronously right before the connect attempt starts)."""

    def on_change(old: LinkState, new: LinkState) -> None:
        if new is LinkState.CONNECTING:
            link.watch.remove_listener(on_change)
            cancel_after_steps(task, steps)

    link.watch.add_listener(on_change)


async def ends_within(task: asyncio.Task[None], link: ModbusLink, timeout_s: float) -> bool:
    """True if ``task`` ended (cancelled) within ``timeout_s``; otherwise stop it through
    `disconnect` (so the test can go on) and return False."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        assert task.cancelled(), f"run() ended without the cancellation: {task!r}"
        return True
    await link.disconnect()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(5.0):
            await task
    return False


async def test_modbus_link_run_ends_when_cancelled_at_any_step_of_a_failing_connect() -> None:
    """The PLC refuses connections (not running): a cancel at each loop step of the connect
    attempt ends run(). Before the fix, cancels landing as the refusal came back were lost
    and the link went on reconnecting."""
    port = free_port()  # nobody listens: every connect is refused
    stuck: list[int] = []
    for steps in range(LOOP_STEPS):
        link = ModbusLink(
            ModbusLinkConfig(port=port, backoff_initial_s=0.05, backoff_max_s=0.05),
            name=f"plc-refused-{steps}",
        )
        task = asyncio.create_task(link.run(), name=link.name)
        cancel_on_first_connect(link, task, steps)
        if not await ends_within(task, link, 2.0):
            stuck.append(steps)
    assert stuck == [], f"run() ignored a cancel issued {stuck} loop steps into the connect"


class HookedConveyor(ConveyorPlc):
    """A conveyor simulator that calls ``on_write`` once, from inside the next register write
    it serves (the link's heartbeat), before the reply goes out."""

    on_write: Callable[[], None] | None = None

    def write(self, address: int, registers: list[int], now: float) -> int | None:
        code = super().write(address, registers, now)
        hook, self.on_write = self.on_write, None
        if hook is not None:
            hook()
        return code


async def test_modbus_link_run_ends_when_cancelled_at_any_step_of_a_heartbeat() -> None:
    """Link UP, heartbeats every 250 ms: a cancel at each loop step around a heartbeat's
    request and reply ends run(). Before the fix a cancel landing with the reply was lost in
    the heartbeat task, which heartbeated on while run() waited for it."""
    model = HookedConveyor("conveyor-1")
    stuck: list[int] = []
    # Same event loop as the link, no proxy: the request/reply path takes the same loop steps
    # every time, so each cancel point is hit deterministically.
    async with PlcHost(model, proxy=False) as host:
        for steps in range(LOOP_STEPS):
            link = ModbusLink(ModbusLinkConfig(port=host.port), name=f"plc-up-{steps}")
            ConveyorDriver(link, unit=1, name="conveyor-1")  # registers the heartbeat
            task = asyncio.create_task(link.run(), name=link.name)
            await link.wait_up(5.0)
            model.on_write = lambda task=task, steps=steps: cancel_after_steps(task, steps)
            if not await ends_within(task, link, 2.0):
                stuck.append(steps)
    assert stuck == [], f"run() ignored a cancel issued {stuck} loop steps into a heartbeat"


# ---------------------------------------------------------------------------------------------
# `floorhand run` as a process


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts connections, reads everything and never answers:
    a broker that never sends CONNACK, a PLC that never replies, a database that never
    answers a write."""

    def __init__(self) -> None:
        self.port = 0
        self.received = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> BlackHole:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65_536):
                self.received.set()


def stops_received(model: BeltPlc) -> int:
    """STOP commands the simulated PLC executed (the watchdog's stops are not counted)."""
    return sum(1 for e in model.events_of("stop") if e.detail == "command")


def stop_signal(i: int) -> signal.Signals:
    return signal.SIGTERM if i % 2 == 0 else signal.SIGINT


async def stop_bounded(ctl: ControllerProcess, sig: signal.Signals) -> None:
    """Stop with ``sig``: exit code 0 within the documented bound."""
    code = await ctl.stop(timeout_s=STOP_BOUND_S + 5.0, sig=sig)
    took = ctl.stopped_after_s[-1]
    print(f"stop {sig.name}: exit {code} after {took:.3f} s")  # figures for `pytest -s`
    assert code == 0, f"{sig.name}: exit code {code} after {took:.2f} s\n{ctl.tail(60)}"
    assert took <= STOP_BOUND_S, f"{sig.name}: exit after {took:.2f} s\n{ctl.tail(60)}"
    text = ctl.log_text()
    assert "overran" not in text
    assert "still running" not in text  # no runtime task had to be abandoned


async def plcs_up(ctl: ControllerProcess, timeout_s: float = 15.0) -> None:
    """Wait until the controller reports every PLC link up (polling its API, bounded)."""
    headers = auth_headers("engineer")
    async with httpx.AsyncClient(
        base_url=ctl.base, timeout=5.0, headers=headers, verify=SHARED_SSL
    ) as client:

        async def plcs() -> Any:
            r = await client.get("/api/v1/plcs")
            r.raise_for_status()
            return r.json()

        await wait_for_condition(
            plcs,
            timeout_s,
            what="every PLC link up",
            until=lambda plcs: bool(plcs) and all(p["link"] == "up" for p in plcs),
            interval_s=0.05,
            context=ctl.tail,
        )


@contextlib.asynccontextmanager
async def plc_pair() -> AsyncIterator[tuple[ConveyorPlc, SorterPlc, PlcHost, PlcHost]]:
    conveyor = ConveyorPlc("conveyor-1", speed=20.0)
    sorter = SorterPlc("sorter-1", speed=0.3, lane_drain_s=0.0)
    async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
        yield conveyor, sorter, ch, sh


def with_history(site: Path, text: str) -> Path:
    body = site.read_text()
    assert '[history]\nbackend = "none"\n' in body
    site.write_text(body.replace('[history]\nbackend = "none"\n', text))
    return site


class Shelf:
    """Readings for shelf sh0 (scale s0), seq increasing across controller restarts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seq = 0

    async def publish(self, units: int, count: int = 3) -> None:
        t0 = time.time() - 0.1 * count
        msgs = []
        for i in range(count):
            self.seq += 1
            body = {"device": "s0", "seq": self.seq, "ts": t0 + 0.1 * i, "grams": 500 + units * 100}
            msgs.append(("fh/t/Z/scale/s0", orjson.dumps(body)))
        await asyncio.to_thread(paho_publish, self.port, msgs)


async def submit_pick(ctl: ControllerProcess, order_id: str) -> int:
    """POST one pick of 1 unit of K0; retried until the controller has counted the shelf.
    Returns the command id of its sorter task."""
    body = {**ORDER, "order_id": order_id, "lines": [{"sku": "K0", "qty": 1}]}
    headers = {**auth_headers("floor"), "Idempotency-Key": f"key-{order_id}"}
    async with httpx.AsyncClient(base_url=ctl.base, timeout=5.0, verify=SHARED_SSL) as client:
        r = await wait_for_condition(  # until the controller counted the shelf
            lambda: client.post("/api/v1/picks", json=body, headers=headers),
            15.0,
            what=f"pick {order_id} accepted (201)",
            until=lambda r: r.status_code == 201,
            interval_s=0.1,
            context=ctl.tail,
        )
    assert r.status_code == 201, f"{r.status_code} {r.text}\n{ctl.tail()}"
    cmd_id: int = r.json()["tasks"][0]["cmd_id"]
    return cmd_id


STOPS_PER_CONDITION = 10
"""Five conditions: 50 bounded stops in all (issue 10 asks for at least 50)."""


@pytest.fixture
async def fork_server() -> AsyncIterator[ForkServer]:
    """Starts ``floorhand run`` without paying the interpreter's imports each time
    (tests/fork_server.py); still one process per start, signalled by PID."""
    async with ForkServer() as server:
        yield server


async def in_lanes(lanes: int, stop: Callable[[int, range], Coroutine[Any, Any, None]]) -> None:
    """The condition's stops split over ``lanes`` independent set-ups run at once: lane ``k``
    does stops ``k, k + lanes, ...`` (so every stop keeps its index, its signal and its own
    assertions). Each lane has its own controller, journal, PLCs and broker (or none): the
    stops of one lane never see another's. Most of a stop's time is waiting (the owner gate,
    a random point of a retry cycle, a handshake time-out), which lanes overlap."""
    async with asyncio.TaskGroup() as tg:
        for lane in range(lanes):
            tg.create_task(stop(lane, range(lane, STOPS_PER_CONDITION, lanes)), name=f"lane-{lane}")


def lane_folder(tmp_path: Path, lane: int) -> Path:
    folder = tmp_path / f"lane-{lane}"
    folder.mkdir()
    return folder


@pytest.mark.slow
async def test_m11_stops_with_the_broker_down(
    tmp_path: Path, controllers: list[ControllerProcess], fork_server: ForkServer
) -> None:
    """Nobody listens on the broker port; the PLCs are up. Every stop: STOP reaches both
    PLCs, exit 0 within the bound."""

    async def lane(k: int, stops: range) -> None:
        rng = random.Random(1100 + k)
        async with plc_pair() as (conveyor, sorter, ch, sh):
            folder = lane_folder(tmp_path, k)
            site = picking_site(folder, free_port(), ch.port, sh.port)
            ctl = ForkedController(site, folder, fork_server, exec_first=k == 0)
            controllers.append(ctl)
            for i in stops:
                await ctl.start(wait_ready=False)
                await plcs_up(ctl)
                await asyncio.sleep(rng.uniform(0, 0.5))  # a random point of the retry cycle
                before = stops_received(conveyor), stops_received(sorter)
                await stop_bounded(ctl, stop_signal(i))
                assert stops_received(conveyor) > before[0], ctl.tail()
                assert stops_received(sorter) > before[1], ctl.tail()

    await in_lanes(5, lane)


@pytest.mark.slow
async def test_m11_stops_with_plcs_unreachable_and_an_open_order(
    tmp_path: Path, controllers: list[ControllerProcess], fork_server: ForkServer
) -> None:
    """The field report: an open order in the journal, PLCs not running (refused), the
    broker up. First an order is left open (controller killed mid-command), then the
    controller is started and stopped with the PLCs gone."""

    async def lane(k: int, stops: range) -> None:
        rng = random.Random(1200 + k)
        folder = lane_folder(tmp_path, k)
        async with running_mosquitto(folder / "mosquitto") as broker:
            async with plc_pair() as (_, sorter, ch, sh):
                site = picking_site(folder, broker.port, ch.port, sh.port)
                ctl = ForkedController(site, folder, fork_server, exec_first=k == 0)
                controllers.append(ctl)
                await ctl.start()
                await Shelf(broker.port).publish(units=30)
                cmd_id = await submit_pick(ctl, f"open-{k}")
                await sorter.wait_until(lambda: sorter.ack_id == cmd_id, 10.0)
                await ctl.kill()
            # The PLC hosts are gone: their ports refuse connections.
            for i in stops:
                await ctl.start()
                assert "open order(s) to reconcile" in ctl.log_text()
                await asyncio.sleep(rng.uniform(0, 0.5))
                await stop_bounded(ctl, stop_signal(i))

    await in_lanes(2, lane)


@pytest.mark.slow
async def test_m11_stops_with_links_mid_connect(
    tmp_path: Path, controllers: list[ControllerProcess], fork_server: ForkServer
) -> None:
    """The broker and both PLCs accept TCP connections and never answer: the MQTT handshake
    (5 s CONNACK time-out) and the PLCs' first heartbeat are pending when the signal comes."""

    async def lane(k: int, stops: range) -> None:
        rng = random.Random(1300 + k)
        async with BlackHole() as broker, BlackHole() as conveyor, BlackHole() as sorter:
            folder = lane_folder(tmp_path, k)
            site = picking_site(folder, broker.port, conveyor.port, sorter.port)
            ctl = ForkedController(site, folder, fork_server, exec_first=k == 0)
            controllers.append(ctl)
            for i in stops:
                await ctl.start(wait_ready=False)
                async with asyncio.timeout(10):
                    await broker.received.wait()  # the CONNECT is out, no CONNACK will come
                    await sorter.received.wait()  # the first heartbeat is out, no reply comes
                await asyncio.sleep(rng.uniform(0, 1.0))  # within the handshake / retry cycles
                await stop_bounded(ctl, stop_signal(i))
                for hole in (broker, conveyor, sorter):
                    hole.received.clear()

    await in_lanes(5, lane)


@pytest.mark.slow
async def test_m11_stops_with_commands_in_flight(
    tmp_path: Path, controllers: list[ControllerProcess], fork_server: ForkServer
) -> None:
    """Broker and PLCs up, a pick executing (the sorter accepted its command, belts
    running): every stop sends STOP to both PLCs and exits 0 within the bound. Each round
    has fresh PLCs and a fresh journal (a stopped sorter keeps its totes: rounds would pile
    them up until its induct refuses new ones)."""

    async def lane(k: int, stops: range) -> None:
        async with running_mosquitto(lane_folder(tmp_path, k) / "mosquitto") as broker:
            for i in stops:
                folder = tmp_path / f"round-{i}"
                folder.mkdir()
                async with plc_pair() as (conveyor, sorter, ch, sh):
                    site = picking_site(folder, broker.port, ch.port, sh.port)
                    ctl = ForkedController(site, folder, fork_server, exec_first=i == 0)
                    controllers.append(ctl)
                    await ctl.start()
                    await plcs_up(ctl)
                    await Shelf(broker.port).publish(units=30)
                    cmd_id = await submit_pick(ctl, f"inflight-{i}")

                    def executing(sorter: SorterPlc = sorter, cmd_id: int = cmd_id) -> bool:
                        return sorter.ack_id == cmd_id and sorter.moving

                    await sorter.wait_until(executing, 10.0)
                    before = stops_received(conveyor), stops_received(sorter)
                    await stop_bounded(ctl, stop_signal(i))
                    assert stops_received(conveyor) > before[0], ctl.tail()
                    assert stops_received(sorter) > before[1], ctl.tail()

    await in_lanes(2, lane)


@pytest.mark.slow
async def test_m11_stops_with_the_history_sink_hanging(
    tmp_path: Path, controllers: list[ControllerProcess], fork_server: ForkServer
) -> None:
    """The InfluxDB server accepts the write and never answers (HTTP time-out 300 s): the
    write blocks influxdb-client's thread. The stop abandons it (the batch stays in the
    outbox) and exits 0 within the bound; STOP still reaches the PLCs."""

    async def lane(k: int, stops: range) -> None:
        folder = lane_folder(tmp_path, k)
        async with (
            running_mosquitto(folder / "mosquitto") as broker,
            plc_pair() as (conveyor, sorter, ch, sh),
            BlackHole() as influx,
        ):
            site = with_history(
                picking_site(folder, broker.port, ch.port, sh.port),
                "[history]\n"
                'backend = "influxdb2"\n'
                f'url = "http://127.0.0.1:{influx.port}"\n'
                'org = "o"\nbucket = "b"\ntimeout_s = 300\nflush_interval_s = 0.1\n',
            )
            ctl = ForkedController(
                site, folder, fork_server, exec_first=k == 0, env={"FLOORHAND_INFLUX_TOKEN": "t"}
            )
            controllers.append(ctl)
            for i in stops:
                influx.received.clear()
                await ctl.start()
                await plcs_up(ctl)
                async with asyncio.timeout(10):
                    await influx.received.wait()  # a write is on the wire, never answered
                before = stops_received(conveyor), stops_received(sorter)
                await stop_bounded(ctl, stop_signal(i))
                assert stops_received(conveyor) > before[0], ctl.tail()
                assert stops_received(sorter) > before[1], ctl.tail()
            assert "still busy" in ctl.log_text()

    await in_lanes(2, lane)


@contextlib.contextmanager
def journal_write_locked(journal: Path) -> Iterator[None]:
    """Hold the journal's SQLite write lock from another connection (someone's sqlite3 shell
    left a transaction open): every commit of the controller then blocks the event loop, in C,
    for SQLite's 5 s busy time-out."""
    db = sqlite3.connect(journal, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


async def test_m11_a_stop_that_overruns_dumps_every_thread_and_exits_non_zero(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> None:
    """The event loop is stuck in a blocked journal commit (C code: no Python signal
    handler can run). The stop bound still holds: after STOP_BOUND_S the stack of every
    thread is on stderr, exit code EXIT_STOP_OVERRUN."""
    site = picking_site(tmp_path, mosquitto.port, free_port(), free_port())
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    with journal_write_locked(tmp_path / "journal.sqlite"):
        t0 = time.monotonic()
        ctl.signal(signal.SIGTERM)
        code = await ctl.wait_exit(STOP_BOUND_S + 5.0)
        took = time.monotonic() - t0
    text = ctl.log_text()
    assert code == EXIT_STOP_OVERRUN, f"exit {code}\n{ctl.tail(80)}"
    assert took <= STOP_BOUND_S + 1.0, took
    assert "overran its 5 s bound" in text
    assert "most recent call first" in text  # faulthandler's dump
    assert "stop-guard" in text or "Current thread" in text
    assert "journal.py" in text, ctl.tail(80)  # where the main thread was stuck


async def test_m11_a_second_signal_exits_at_once(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> None:
    """A stop that hangs (the journal blocked as above): a second SIGTERM ends the process
    at once with 128 + 15, without waiting for the bound and without a stack dump."""
    site = picking_site(tmp_path, mosquitto.port, free_port(), free_port())
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    with journal_write_locked(tmp_path / "journal.sqlite"):
        ctl.signal(signal.SIGTERM)
        await ctl.wait_log("SIGTERM: stopping")
        ctl.signal(signal.SIGTERM)
        code = await ctl.wait_exit(STOP_BOUND_S + 5.0)
    text = ctl.log_text()
    assert code == EXIT_SIGNAL_BASE + signal.SIGTERM, f"exit {code}\n{ctl.tail(80)}"
    assert "second SIGTERM: exiting at once" in text
    assert "overran" not in text
