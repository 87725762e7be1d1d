"""The PLC side runs on its own event loop: a blocked ingest loop delays no heartbeat and no
pick command (docs/architecture.md, "Two event loops").

The PLC simulators run on a loop of their own in another thread (they stand for real PLCs,
which do not share the controller's loop); a bus listener blocks the ingest loop until the
simulators have seen what the test expects — heartbeats over more than a watchdog period and
the mailbox write of a pick command that arrived over MQTT — so each observation is made
while the ingest loop is provably still blocked (the listener has not returned). On a single
loop the listener would wait in vain and time out."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from controller.domain.events import BusEvent, StockChanged
from controller.runtime import Runtime
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.plc import PlcModel
from simulators.sorter import SorterPlc
from tests.integration.test_picking import floor, pick_command
from tests.integration.test_sensing_e2e import PahoWatcher, readings
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.timeout(60)

BLOCK_LIMIT_S = 10.0
"""The longest the listener blocks the ingest loop (it returns as soon as all was seen)."""


class Written:
    """Wakes threads waiting for a model's writes (the model's write runs on the simulators'
    thread)."""

    def __init__(self, model: PlcModel) -> None:
        self.model = model
        self.cond = threading.Condition()
        write = model.write

        def watched(address: int, registers: list[int], now: float) -> int | None:
            out = write(address, registers, now)
            with self.cond:
                self.cond.notify_all()
            return out

        model.write = watched  # type: ignore[method-assign]

    def count(self, name: str) -> int:
        return sum(1 for _, w in list(self.model.writes) if name in w)

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Block the calling thread until ``predicate()`` (re-checked at every write)."""
        with self.cond:
            return self.cond.wait_for(predicate, timeout_s)


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port


@contextlib.asynccontextmanager
async def plcs_in_thread(*models: PlcModel) -> AsyncIterator[list[_Port]]:
    """Serve the models with `PlcHost` on an event loop in a thread of their own."""
    ready = threading.Event()
    ports: list[_Port] = []
    stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for seed, model in enumerate(models, 1):
                host = await stack.enter_async_context(PlcHost(model, seed=seed))
                ports.append(_Port(host.port))
            done = asyncio.Event()
            stop.append((asyncio.get_running_loop(), done))
            ready.set()
            await done.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="plc-sims", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10), "PLC simulators did not start"
    try:
        yield ports
    finally:
        loop, done = stop[0]
        loop.call_soon_threadsafe(done.set)
        await asyncio.to_thread(thread.join, 10)


async def test_a_blocked_ingest_loop_delays_no_heartbeat_and_no_pick_command(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    conveyor_writes, sorter_writes = Written(conveyor), Written(sorter)
    watcher = PahoWatcher(mosquitto.port, "fh/t/cmd/picks/result", client_id="replies")
    await watcher.subscribed()
    try:
        async with (
            plcs_in_thread(conveyor, sorter) as (ch, sh),
            floor(mosquitto, tmp_path, ch, sh) as f,  # type: ignore[arg-type]
        ):
            rt: Runtime = f.rt
            await f.shelf("s0", 20)
            seen: dict[str, Any] = {}

            def block_ingest(events: list[BusEvent]) -> None:
                """On the first count of shelf sh1: block this (the ingest) loop until the
                simulators saw six heartbeats (1.5 s, watchdog 1 s) and the mailbox write of
                the pick command published just before the readings."""
                if seen or not any(
                    isinstance(e, StockChanged) and e.shelf_id == "sh1" for e in events
                ):
                    return
                seen["blocked"] = True
                beats = conveyor_writes.count("heartbeat")
                seen["heartbeats"] = conveyor_writes.wait(
                    lambda: conveyor_writes.count("heartbeat") >= beats + 6, BLOCK_LIMIT_S
                )
                seen["mailbox_write"] = sorter_writes.wait(
                    lambda: sorter_writes.count("mb_strobe") >= 1, BLOCK_LIMIT_S
                )

            rt.bus.add_listener(block_ingest)
            assert sorter_writes.count("mb_strobe") == 0
            # A running belt: a gap in the heartbeats would trip its watchdog (1 s).
            belt = rt.plcs["conveyor-1"].driver
            await rt.control.call_async(belt.start)
            assert conveyor.moving
            # The command first, then the readings that make the listener block: the command
            # is handed to the control loop before (or in the same group as) the readings.
            command = ("fh/t/cmd/picks", orjson.dumps(pick_command("ISO-1", "plant-b", 2)))
            await asyncio.to_thread(
                paho_publish,
                mosquitto.port,
                [command, *readings("s1", 0, 10, 6, rt.clock() - 0.6)],
            )
            _, reply = await watcher.wait_for(lambda t, b: b.get("order_id") == "ISO-1")
            # The command has a session of its own (the control loop's): its reply may come
            # before the readings have blocked this loop. Wait for the listener to have run
            # (it returns once its observations are made).
            await wait_for_condition(
                lambda: "mailbox_write" in seen, BLOCK_LIMIT_S, what="the blocking listener ran"
            )
            assert seen.get("blocked"), "the listener never ran"
            assert seen["heartbeats"], "heartbeats stopped while the ingest loop was blocked"
            assert seen["mailbox_write"], "the pick waited for the blocked ingest loop"
            assert reply["status"] == 201, reply
            assert conveyor.events_of("watchdog") == []
            assert sorter.events_of("watchdog") == []
            assert conveyor.moving
    finally:
        watcher.close()
