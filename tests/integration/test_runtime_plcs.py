"""The runtime connects the site's ``[[plcs]]``: simulated conveyor and sorter PLCs over real
Modbus TCP on 127.0.0.1, a real mosquitto, the API showing each PLC's link state.

Waits are on the link state watches, the simulator's change events and the bus, with timeouts;
never on fixed sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.api.app import create_app
from controller.config import load_site
from controller.runtime import Runtime
from devices.conveyor import ConveyorDriver
from devices.link.state import LinkState
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.plc import BeltState as SimBeltState
from simulators.sorter import SorterPlc
from tests.integration.test_picking import bus_until
from tests.integration.test_sensing_e2e import readings, running
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import auth_headers, write_small_site

pytestmark = pytest.mark.timeout(60)


def plc_tables(conveyor_port: int, sorter_port: int) -> str:
    return f"""
[[plcs]]
id = "conveyor-1"
kind = "conveyor"
port = {conveyor_port}
length_mm = 12000
speed_mm_s = 500

[[plcs]]
id = "sorter-1"
kind = "sorter"
port = {sorter_port}
lanes = 8
lane_capacity = 6
"""


def heartbeats_since(model: ConveyorPlc, t0: float) -> int:
    return sum(1 for t, w in model.writes if t >= t0 and "heartbeat" in w)


async def test_runtime_connects_plcs_and_reports_them(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=50.0, lane_drain_s=0.0)
    async with PlcHost(conveyor, seed=1) as conveyor_host, PlcHost(sorter, seed=2) as sorter_host:
        path = write_small_site(tmp_path, mqtt_port=mosquitto.port)
        path.write_text(path.read_text() + plc_tables(conveyor_host.port, sorter_host.port))
        site = load_site(path)
        rt = Runtime(site)
        assert set(rt.plcs) == {"conveyor-1", "sorter-1"}
        transport = httpx.ASGITransport(app=create_app(site, runtime=rt))
        async with (
            running(rt),
            httpx.AsyncClient(
                transport=transport, base_url="http://api", headers=auth_headers()
            ) as client,
        ):
            # Both links come up (first heartbeat round done) and the resync reads the epoch.
            for plc in rt.plcs.values():
                await plc.link.watch.wait_for(LinkState.UP, 10)
            epochs = asyncio.Event()
            loop = asyncio.get_running_loop()

            def check_epochs(*_: Any) -> None:  # called on the control loop's thread
                if all(p.driver.epoch is not None for p in rt.plcs.values()):
                    loop.call_soon_threadsafe(epochs.set)

            for plc in rt.plcs.values():
                plc.driver.add_epoch_listener(check_epochs)
            check_epochs()
            await asyncio.wait_for(epochs.wait(), 5)
            # The PLC links run on the control loop, not on this (ingest's) loop.
            tasks = await rt.control.call(lambda: {t.get_name() for t in asyncio.all_tasks()})
            assert {"modbus:conveyor-1", "modbus:sorter-1"} <= tasks
            assert not {"modbus:conveyor-1", "modbus:sorter-1"} & {
                t.get_name() for t in asyncio.all_tasks()
            }

            # The runtime started no belt and sent no command: heartbeats and reads only.
            assert conveyor.state is SimBeltState.STOPPED
            assert not any("command" in w for _, w in conveyor.writes)
            assert not any("command" in w or "mb_strobe" in w for _, w in sorter.writes)

            r = await client.get("/api/v1/plcs")
            assert r.status_code == 200
            plcs = {p["id"]: p for p in r.json()}
            assert plcs["conveyor-1"]["kind"] == "conveyor"
            assert plcs["sorter-1"]["kind"] == "sorter"
            assert plcs["conveyor-1"]["endpoint"] == f"127.0.0.1:{conveyor_host.port}"
            for p in plcs.values():
                assert (p["link"], p["health"], p["fault"]) == ("up", "ok", None)
            assert plcs["conveyor-1"]["epoch"] == conveyor.epoch
            assert plcs["sorter-1"]["epoch"] == sorter.epoch
            r = await client.get("/api/v1/health")
            health = r.json()
            assert health["status"] == "ok"
            assert health["mqtt"]["state"] == "up"  # existing fields unchanged
            assert health["plcs"] == {
                "conveyor-1": {"link": "up", "health": "ok", "epoch": conveyor.epoch},
                "sorter-1": {"link": "up", "health": "ok", "epoch": sorter.epoch},
            }
            assert (await client.get("/api/v1/ready")).status_code == 200
            devices = (await client.get("/api/v1/devices")).json()
            assert {d["id"] for d in devices} == {s.id for s in site.scales}

            # The heartbeat keeps the simulated belt's watchdog (1 s) satisfied: a belt the
            # test starts keeps running over several watchdog periods.
            driver = rt.plcs["conveyor-1"].driver
            assert isinstance(driver, ConveyorDriver)
            status = await rt.control.call_async(driver.start)
            assert status.state.moving
            t0 = conveyor.last_tick
            await conveyor.wait_until(lambda: heartbeats_since(conveyor, t0) >= 8, 5)
            assert conveyor.last_tick - t0 > 1.5
            assert conveyor.moving
            assert conveyor.events_of("watchdog") == []
            assert conveyor.heartbeat_fresh(conveyor.last_tick)

            # One PLC leaves the network: its link goes down, the API shows it, the rest of
            # the runtime goes on (the other PLC stays up, readings are still ingested).
            sorter_link = rt.plcs["sorter-1"].link
            await sorter_host.go_offline()
            await sorter_link.watch.wait_for(LinkState.DOWN, 5)
            r = await client.get("/api/v1/plcs")
            plcs = {p["id"]: p for p in r.json()}
            assert plcs["sorter-1"]["link"] in ("down", "connecting")
            assert plcs["sorter-1"]["last_down_reason"]
            assert plcs["conveyor-1"]["link"] == "up"
            health = (await client.get("/api/v1/health")).json()
            assert health["plcs"]["sorter-1"]["link"] in ("down", "connecting")
            assert health["plcs"]["conveyor-1"]["link"] == "up"
            assert health["status"] == "degraded"
            assert health["ready"] is True  # sensing does not depend on the PLCs
            base = rt.ingest.readings
            await asyncio.to_thread(
                paho_publish, mosquitto.port, readings("s0", 0, 20, 5, rt.clock())
            )
            await bus_until(rt, lambda: rt.ingest.readings >= base + 5, 10)
            assert rt.ingest.states["sh0"].units == 20
            assert rt.plcs["conveyor-1"].link.state is LinkState.UP
            assert conveyor.moving

            # The PLC comes back: the link reconnects by itself, same epoch (no restart).
            await sorter_host.go_online()
            await sorter_link.watch.wait_for(LinkState.UP, 5)
            assert rt.plcs["sorter-1"].driver.restarts == 0

        # The runtime stopped: its shutdown sent STOP to the running belt (the safe stop,
        # before the links closed); the PLC's watchdog would have stopped it otherwise.
        assert not conveyor.moving
        assert [e.detail for e in conveyor.events_of("stop")][-1:] == ["command"]
        assert conveyor.events_of("watchdog") == []
