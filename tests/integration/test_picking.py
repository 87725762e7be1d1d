"""Picks end to end: API → journal → Modbus (simulated conveyor and sorter PLCs on 127.0.0.1)
→ sorter result → scale delta over a real mosquitto → stock and alerts; the idempotency
matrix (fault case A4); fail-fast when a device is down; restart reconciliation (B5, B6).

Waits are on the bus and the simulators' state with timeouts, never fixed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pymodbus.client import AsyncModbusTcpClient

from controller.api.app import create_app
from controller.api.routes.orders import OrderOut
from controller.config import load_site
from controller.domain.events import AlertNotice, AlertRaised, OrderException, OrderStateChanged
from controller.domain.model import OrderState, ShelfStatus
from controller.runtime import Runtime
from controller.services import pick_executor
from controller.services.picking import PickRequest
from devices.link.state import LinkState
from devices.registers import load_builtin_map
from devices.sorter import SorterDriver
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.plc import BeltState as SimBeltState
from simulators.sorter import SorterPlc
from tests.fork_server import ForkedController, ForkServer
from tests.integration.test_sensing_e2e import PahoWatcher, readings, running
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import auth_headers, write_small_site
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.timeout(90)


def picking_site(
    tmp_path: Path,
    mqtt_port: int,
    conveyor_port: int,
    sorter_port: int,
    *,
    scale_timeout_s: float = 20,
) -> Path:
    # Reporting interval 5 s: a shelf is STALE after 15 s, not 3 s, so a loaded test machine
    # delaying the readings does not make the stock "unknown" mid-test.
    path = write_small_site(tmp_path, mqtt_port=mqtt_port, scales=3, reporting_interval_s=5.0)
    text = path.read_text().replace(
        '[[zones]]\nid = "Z"\n',
        '[[zones]]\nid = "Z"\nconveyors = ["conveyor-1"]\nsorter = "sorter-1"\n',
    )
    text += f"""
[picking]
scale_timeout_s = {scale_timeout_s}
result_timeout_s = 20

# 1 s request time-out (default 0.5 s): bursts of 100 in-process HTTP requests can hold
# this 2-core test machine's event loop for longer than 0.5 s.
[[plcs]]
id = "conveyor-1"
kind = "conveyor"
port = {conveyor_port}
timeout_s = 1.0

[[plcs]]
id = "sorter-1"
kind = "sorter"
port = {sorter_port}
lanes = 8
timeout_s = 1.0

[[pack_stations]]
id = "PS1"
sorter = "sorter-1"
lane = 3
"""
    path.write_text(text)
    return path


async def bus_until(rt: Runtime, predicate: Callable[[], bool], timeout_s: float) -> None:
    """Wait until ``predicate()`` holds, re-checked after every bus publication (readings,
    order and task events all go through the bus)."""
    changed = asyncio.Event()
    rt.bus.add_listener(lambda events: changed.set())
    await wait_for_condition(predicate, timeout_s, what="a bus-visible condition", wake=changed)


def order_state(rt: Runtime, order_id: str) -> str | None:
    body = rt.picking.get(order_id)
    return None if body is None else str(body["state"])


class Floor:
    """Simulated PLCs + mosquitto + the runtime + an API client, for one test."""

    def __init__(self, rt: Runtime, client: httpx.AsyncClient, port: int) -> None:
        self.rt = rt
        self.client = client
        self.port = port
        # Woken after every ingest group (the bus only carries groups that changed something,
        # and a reading that changes nothing still moves the device's cursor).
        self.ingested = asyncio.Event()
        ingest = rt.ingest.on_messages

        def on_messages(msgs: list[Any]) -> None:
            ingest(msgs)
            self.ingested.set()

        rt.ingest.on_messages = on_messages  # type: ignore[method-assign]
        self.seq = 0
        self.last_ts = 0.0  # readings of a device must not go back in time (carried over restarts)

    async def shelf(self, device: str, units: int) -> None:
        """Publish a settled weight for ``device`` and wait until the controller counts it."""
        t0 = max(self.rt.clock() - 0.6, self.last_ts + 0.1)
        await asyncio.to_thread(paho_publish, self.port, readings(device, self.seq, units, 6, t0))
        self.seq += 6
        self.last_ts = t0 + 0.5
        shelf = "sh" + device[1:]
        await wait_for_condition(
            lambda: self._counted(device, shelf, units),
            10.0,
            what=f"{shelf} counted at {units} units",
            wake=self.ingested,
            context=lambda: (
                f"{shelf}: {self.rt.ingest.states[shelf]!r}; "
                f"rejected {dict(self.rt.ingest.rejected)} "
                f"msgs {self.rt.ingest.messages} readings {self.rt.ingest.readings} "
                f"cursor {self.rt.ingest.cursors.get(device)} seq {self.seq} "
                f"window {self.rt.ingest.states[shelf].conditioner.window} "
                f"pending {self.rt.ingest.states[shelf].conditioner.pending}"
            ),
        )

    def _counted(self, device: str, shelf: str, units: int) -> bool:
        """The readings just published are applied and the shelf is settled at ``units``."""
        cursor = self.rt.ingest.cursors.get(device)
        state = self.rt.ingest.states[shelf]
        return (
            cursor is not None
            and cursor.seq == self.seq - 1
            and state.units == units
            and state.status is ShelfStatus.OK
        )

    async def pick(
        self,
        key: str | None,
        body: dict[str, Any],
        role: str = "floor",
        *,
        auth: dict[str, str] | None = None,
    ) -> httpx.Response:
        headers = dict(auth) if auth is not None else auth_headers(role)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post("/api/v1/picks", json=body, headers=headers)


@contextlib.asynccontextmanager
async def floor(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    conveyor: PlcHost,
    sorter: PlcHost,
    *,
    sorter_port: int | None = None,
    scale_timeout_s: float = 20,
) -> AsyncIterator[Floor]:
    site = load_site(
        picking_site(
            tmp_path,
            mosquitto.port,
            conveyor.port,
            sorter_port or sorter.port,
            scale_timeout_s=scale_timeout_s,
        )
    )
    rt = Runtime(site)
    transport = httpx.ASGITransport(app=create_app(site, runtime=rt))
    async with (
        running(rt),
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
    ):
        # Pick commands have a session of their own: a command published before its first
        # SUBACK would find no subscription on a fresh broker.
        await rt.command_link.watch.wait_for(LinkState.UP, 10)
        for plc_id, plc in rt.plcs.items():
            if sorter_port is None or plc_id != "sorter-1":
                await plc.link.watch.wait_for(LinkState.UP, 10)
                if isinstance(plc.driver, SorterDriver):
                    # The drivers live on the control loop: wait there.
                    await rt.control.call_async(plc.driver.wait_mailbox_known, 10)
        yield Floor(rt, client, mosquitto.port)


ORDER = {"order_id": "W-1", "lines": [{"sku": "K0", "qty": 16}], "pack_station": "PS1"}
OTHER_FLOOR_TOKEN = "test-floor2-token-0123456789abcdef"


def other_floor_caller(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A second floor caller with its own token (named ``floor2``), added through the
    environment as an operator would; call before the app is built. Its auth headers."""
    monkeypatch.setenv("FLOORHAND_TOKEN_FLOOR2", f"floor:{OTHER_FLOOR_TOKEN}")
    return {"Authorization": f"Bearer {OTHER_FLOOR_TOKEN}"}


def pick_command(order_id: str, channel: str, qty: int) -> dict[str, Any]:
    """A pick request for the MQTT command topic: ``qty`` of K0 to PS1."""
    return {
        "order_id": order_id,
        "channel": channel,
        "lines": [{"sku": "K0", "qty": qty}],
        "pack_station": "PS1",
    }


async def hand_submit(port: int, cmd_id: int, tote: int, lane: int) -> None:
    """Write the sorter's mailbox as an integrator commissioning it by hand would: one FC16
    from their own Modbus client (pymodbus), ``mb_strobe = SUBMIT``."""
    reg_map = load_builtin_map("sorter")
    address, registers = reg_map.encode(
        {
            "mb_cmd_id": cmd_id,
            "mb_tote": tote,
            "mb_lane": lane,
            "mb_strobe": reg_map["mb_strobe"].value_of("SUBMIT"),
        }
    )
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2.0, retries=0)
    try:
        assert await client.connect()
        reply = await client.write_registers(address, registers, device_id=1)
        assert not reply.isError(), reply
    finally:
        client.close()


async def settled_task(rt: Runtime, order_id: str, timeout_s: float = 20) -> dict[str, Any]:
    """The order's first task once the sorter decided it (DIVERTED or a final state)."""

    def task() -> dict[str, Any]:
        body = rt.picking.get(order_id)
        assert body is not None
        first: dict[str, Any] = body["tasks"][0]
        return first

    await bus_until(rt, lambda: task()["state"] not in ("DISPATCHED", "ACCEPTED"), timeout_s)
    return task()


async def test_pick_end_to_end_to_shipped(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    floor2 = other_floor_caller(monkeypatch)
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh) as f,
    ):
        rt = f.rt
        await f.shelf("s0", 25)
        r = await f.pick("key-1", ORDER)
        assert r.status_code == 201, r.text
        order = r.json()
        OrderOut.model_validate(order)  # the hand-built wire body has the documented shape
        oid = order["order_id"]
        assert r.headers["Location"] == f"/api/v1/orders/{oid}"
        assert order["state"] == "PICKING"
        assert [h["state"] for h in order["history"]] == [
            "RECEIVED",
            "VALIDATED",
            "ALLOCATED",
            "PICKING",
        ]
        (task,) = order["tasks"]
        assert (task["shelf"], task["qty"], task["sorter"], task["lane"]) == (
            "sh0",
            16,
            "sorter-1",
            3,
        )
        assert task["conveyors"] == ["conveyor-1"]
        # Reserved: the same 25 units cannot be promised twice.
        assert rt.picking.available("sh0") == 9
        r2 = await f.pick("key-2", {**ORDER, "order_id": "W-2"})
        assert r2.status_code == 409, r2.text
        assert r2.headers["content-type"].startswith("application/problem+json")
        assert r2.json()["lines"][0]["available"] == 9

        # The sorter diverts the tote into lane 3; the belts were started for it.
        await bus_until(rt, lambda: sorter.last_done_id == task["cmd_id"], 20)
        assert sorter.last_result == "DIVERTED"
        assert sorter.executions[task["cmd_id"]] == 1
        assert conveyor.state in (SimBeltState.STARTING, SimBeltState.RUNNING)
        assert order_state(rt, oid) == "PICKING"  # the scale has not confirmed yet

        # The picker takes 16 units: the scale shows 9 → confirmed, SORTED; 9 < reorder point.
        await f.shelf("s0", 9)
        await bus_until(rt, lambda: order_state(rt, oid) == "SORTED", 10)
        body = (await f.client.get(f"/api/v1/orders/{oid}", headers=auth_headers("floor"))).json()
        (task,) = body["tasks"]
        assert (task["state"], task["result"], task["scale_confirmed"]) == (
            "CONFIRMED",
            "DIVERTED",
            True,
        )
        assert rt.picking.reserved("sh0") == 0
        # The stock crossed the reorder point (10): the alert is raised after its dwell.
        raised: list[AlertRaised] = []
        rt.bus.add_listener(
            lambda events: raised.extend(
                e.transition
                for e in events
                if isinstance(e, AlertNotice) and isinstance(e.transition, AlertRaised)
            )
        )
        await bus_until(rt, lambda: any(e.key == "K0" for e in raised), 10)
        alerts = (await f.client.get("/api/v1/alerts", headers=auth_headers("supervisor"))).json()
        k0 = next(a for a in alerts if a["sku"] == "K0")
        assert (k0["active"], k0["state"], k0["level"]) == (True, "low", 9)

        # Pack and ship (supervisor); the floor role may not; out of order is 409.
        sup = auth_headers("supervisor")
        r = await f.client.post(
            f"/api/v1/orders/{oid}/ship", json={"carrier": "DHL", "tracking": "1Z"}, headers=sup
        )
        assert r.status_code == 409
        r = await f.client.post(f"/api/v1/orders/{oid}/pack", headers=auth_headers("floor"))
        assert r.status_code == 403
        r = await f.client.post(f"/api/v1/orders/{oid}/pack", headers=sup)
        assert r.json()["state"] == "PACKED"
        r = await f.client.post(
            f"/api/v1/orders/{oid}/ship", json={"carrier": "DHL", "tracking": "1Z"}, headers=sup
        )
        shipped = r.json()
        assert (shipped["state"], shipped["carrier"], shipped["tracking"]) == (
            "SHIPPED",
            "DHL",
            "1Z",
        )
        # Shipped again with the same tracking number: the same order (200); with another
        # one: 409, and the first tracking number stays.
        r = await f.client.post(
            f"/api/v1/orders/{oid}/ship", json={"carrier": "DHL", "tracking": "1Z"}, headers=sup
        )
        assert (r.status_code, r.json()) == (200, shipped)
        r = await f.client.post(
            f"/api/v1/orders/{oid}/ship", json={"carrier": "DHL", "tracking": "2Z"}, headers=sup
        )
        assert r.status_code == 409, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"] == "urn:floorhand:problem:already_shipped"
        body = (await f.client.get(f"/api/v1/orders/{oid}", headers=sup)).json()
        assert (body["tracking"], body["history"]) == ("1Z", shipped["history"])
        states = [h["state"] for h in shipped["history"]]
        assert states == [
            "RECEIVED",
            "VALIDATED",
            "ALLOCATED",
            "PICKING",
            "SORTED",
            "PACKED",
            "SHIPPED",
        ]
        # Every transition is journaled as an event (→ outbox → history).
        kinds = [
            row[0]
            for row in rt.journal.db.execute("SELECT kind FROM events WHERE kind='order_state'")
        ]
        assert len(kinds) == 6
        # Its creator sees this order; another floor caller (its own token) does not.
        r = await f.client.get(f"/api/v1/orders/{oid}", headers=auth_headers("floor"))
        assert r.status_code == 200
        r = await f.client.get(f"/api/v1/orders/{oid}", headers=floor2)
        assert r.status_code == 404
        assert "tasks" not in r.json()  # only the id it asked for, in the detail
        r = await f.client.get("/api/v1/orders", headers=floor2)
        assert r.json() == []


async def test_idempotency_matrix(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A4: same key ×100 concurrently → 1 execution, one 201 and 99 replays (200, same
    order); same key other body → 422; no key → 400; same (channel, order id) under another
    key → the same order (200). Another floor caller (its own token) learns nothing of the
    order: its (channel, order id) → 409, its key → 422, neither with the order's id."""
    floor2 = other_floor_caller(monkeypatch)
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh) as f,
    ):
        rt = f.rt
        await f.shelf("s0", 30)
        body = {**ORDER, "lines": [{"sku": "K0", "qty": 2}]}
        # One request first: the app builds its schemas and route tables on first use.
        assert (await f.pick("warm-up", {**body, "order_id": "W-0"})).status_code == 201
        responses = await asyncio.gather(*(f.pick("dup-key", body) for _ in range(100)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * 99 + [201], codes
        ids = {r.json()["order_id"] for r in responses}
        assert len(ids) == 1
        replayed = [r for r in responses if r.headers.get("Idempotent-Replayed") == "true"]
        assert {r.status_code for r in replayed} == {200}
        assert len(replayed) == 99
        (first,) = [r for r in responses if r.status_code == 201]
        assert "Idempotent-Replayed" not in first.headers
        assert all(r.json()["lines"] == first.json()["lines"] for r in replayed)
        oid = ids.pop()
        assert rt.journal.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 2
        # Reserved: this order's 2 units, plus the warm-up's while it is still open.
        # Read on the control loop, which owns the orders, in one step with the reservation.
        open_units, reserved = await rt.control.call(
            lambda: (
                sum(t.qty for o in rt.picking.orders.values() for t in o.tasks if not t.final),
                rt.picking.reserved("sh0"),
            )
        )
        assert reserved == open_units
        assert rt.picking.get(oid)["tasks"][0]["state"] != "FAILED"  # type: ignore[index]

        other = await f.pick("dup-key", {**body, "lines": [{"sku": "K0", "qty": 3}]})
        assert other.status_code == 422
        assert other.json()["order_id"] == oid
        missing = await f.pick(None, body)
        assert missing.status_code == 400
        assert missing.headers["content-type"].startswith("application/problem+json")
        # Same order id from the same channel under another key: the same order, not a new one.
        again = await f.pick("another-key", body)
        assert (again.status_code, again.json()["order_id"]) == (200, oid)
        assert again.headers["Idempotent-Replayed"] == "true"
        changed = await f.pick("third-key", {**body, "lines": [{"sku": "K0", "qty": 5}]})
        assert changed.status_code == 409
        assert changed.json()["order_id"] == oid  # the caller's own order
        # The key belongs to its caller: another principal reusing it is refused, and learns
        # nothing of the order; nor does another floor caller posting the same order id.
        for refused, status in [
            (await f.pick("dup-key", body, role="engineer"), 422),
            (await f.pick("dup-key", body, auth=floor2), 422),
            (await f.pick("floor2-key", body, auth=floor2), 409),
            (
                await f.pick(
                    "floor2-key", {**body, "lines": [{"sku": "K0", "qty": 5}]}, auth=floor2
                ),
                409,
            ),
        ]:
            assert refused.status_code == status, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert oid not in refused.text, refused.text
            assert "tasks" not in refused.json()
        assert rt.journal.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 2

        task = rt.picking.get(oid)["tasks"][0]  # type: ignore[index]
        await bus_until(rt, lambda: sorter.last_done_id == task["cmd_id"], 20)
        assert sorter.executions[task["cmd_id"]] == 1
        assert sum(sorter.executions.values()) == 2  # the warm-up order and this one


async def test_bad_requests_are_refused_clearly(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh) as f,
    ):
        # Stock unknown (no reading yet) → 409, nothing reserved.
        r = await f.pick("k1", ORDER)
        assert r.status_code == 409
        assert r.json()["lines"][0]["code"] == "stock_unknown"
        await f.shelf("s0", 5)
        cases = [
            ({**ORDER, "lines": [{"sku": "NOPE", "qty": 1}]}, 422),
            ({**ORDER, "pack_station": "PS9"}, 422),
            ({**ORDER, "lines": [{"sku": "K0", "qty": 0}]}, 422),
            ({**ORDER, "lines": []}, 422),
            ({**ORDER, "lines": [{"sku": "K0", "qty": "two"}]}, 422),
            ({**ORDER, "lines": [{"sku": "K0", "qty": "2"}]}, 422),
            ({**ORDER, "extra": 1}, 422),
            ({**ORDER, "lines": [{"sku": "K0", "qty": 6}]}, 409),
        ]
        for i, (body, status) in enumerate(cases):
            r = await f.pick(f"bad-{i}", body)
            assert r.status_code == status, (body, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["detail"]
        r = await f.client.post(
            "/api/v1/picks",
            content=b"{not json",
            headers={
                **auth_headers("floor"),
                "Idempotency-Key": "x",
                "Content-Type": "application/json",
            },
        )
        assert r.status_code == 422
        r = await f.client.get("/api/v1/orders/none-such", headers=auth_headers("supervisor"))
        assert r.status_code == 404
        assert f.rt.picking.reserved("sh0") == 0
        assert not sorter.executions
        assert f.rt.journal.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 0


async def test_device_down_fails_fast(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """B4: with the sorter unreachable the API answers 503 + Retry-After at once, reserves
    nothing, and the same key works once the device is back."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
        await sh.go_offline()
        async with floor(mosquitto, tmp_path, ch, sh, sorter_port=sh.port) as f:
            await f.shelf("s0", 20)
            r = await f.pick("k-down", ORDER)
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["devices"] == ["sorter-1"]
            assert f.rt.picking.reserved("sh0") == 0
            await sh.go_online()
            # Picks use a sorter once its mailbox was read on the new connection (B6).
            driver = f.rt.plcs["sorter-1"].driver
            assert isinstance(driver, SorterDriver)
            await f.rt.control.call_async(driver.wait_mailbox_known, 10)
            r = await f.pick("k-down", ORDER)
            assert r.status_code == 201, r.text


async def test_restart_reconciles_open_commands(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """B5/B6: the controller stops while a tote is on the sorter; the next controller finds
    the command in the journal, asks the PLC, and finishes it without sending it again. A
    second order whose PLC restarted meanwhile is UNKNOWN, never replayed."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=0.5, lane_drain_s=0.0)
    async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
        async with floor(mosquitto, tmp_path, ch, sh) as f:
            await f.shelf("s0", 30)
            r = await f.pick("r-1", {**ORDER, "lines": [{"sku": "K0", "qty": 2}]})
            assert r.status_code == 201
            oid = r.json()["order_id"]
            cmd_id = r.json()["tasks"][0]["cmd_id"]
            await bus_until(f.rt, lambda: sorter.ack_id == cmd_id, 10)
            seq, last_ts = f.seq, f.last_ts
        # Controller gone (its shutdown stopped the belts); the tote is still on the sorter.
        assert sorter.last_done_id != cmd_id
        async with floor(mosquitto, tmp_path, ch, sh) as f2:
            f2.seq, f2.last_ts = seq, last_ts
            assert order_state(f2.rt, oid) == "PICKING"
            await f2.shelf("s0", 28)  # the picker took the 2 units meanwhile
            await bus_until(f2.rt, lambda: order_state(f2.rt, oid) == "SORTED", 30)
            assert sorter.executions[cmd_id] == 1
            assert f2.rt.picking.stats["reconciled"] == 1
            await f2.shelf("s0", 28)  # fresh readings: the shelf went STALE meanwhile
            r = await f2.pick(
                "r-2", {**ORDER, "order_id": "W-9", "lines": [{"sku": "K0", "qty": 1}]}
            )
            assert r.status_code == 201, r.text
            cmd2 = r.json()["tasks"][0]["cmd_id"]
            assert cmd2 > cmd_id  # ids keep increasing across restarts
            await bus_until(f2.rt, lambda: sorter.ack_id == cmd2, 10)
            oid2 = r.json()["order_id"]
        await sh.restart()  # new epoch: the pending command is lost with the PLC's memory
        async with floor(mosquitto, tmp_path, ch, sh) as f3:
            await bus_until(f3.rt, lambda: order_state(f3.rt, oid2) == "EXCEPTION", 30)
            body = f3.rt.picking.get(oid2)
            assert body is not None
            assert body["tasks"][0]["state"] == "UNKNOWN"
            assert "epoch" in body["tasks"][0]["reason"]
            assert sorter.executions[cmd2] == 1  # executed once, before the restart; not replayed
            assert f3.rt.picking.reserved("sh0") == 0


@pytest.mark.slow
async def test_b5_controller_killed_mid_command(
    mosquitto: MosquittoBroker, tmp_path: Path, controller_forks: ForkServer
) -> None:
    """B5 with a real process: ``floorhand run`` is SIGKILLed while a tote is on the sorter.
    The PLCs' watchdog stops both belts within 1.25 s; the restarted controller reconciles the
    command from its journal and the PLC's completion ring: executed once, order finished.

    Both processes are forked from the session's fork server (tests/fork_server.py): the same
    command in its own process, killed by PID. The sorter runs in real time: the tote needs
    about 4 s to its lane, the belts stop within 1.25 s of the kill, and the test checks that
    the tote was still on the belt."""
    conveyor = ConveyorPlc("conveyor-1", speed=20.0)
    sorter = SorterPlc("sorter-1", lane_drain_s=0.0)
    async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
        site = picking_site(tmp_path, mosquitto.port, ch.port, sh.port)
        ctl = ForkedController(site, tmp_path, controller_forks)
        await ctl.start()
        try:
            t0 = time.time() - 0.6
            await asyncio.to_thread(
                paho_publish,
                mosquitto.port,
                [
                    (
                        "fh/t/Z/scale/s0",
                        orjson.dumps(
                            {"device": "s0", "seq": i, "ts": t0 + i * 0.1, "grams": 500 + 30 * 100}
                        ),
                    )
                    for i in range(6)
                ],
            )
            async with httpx.AsyncClient(base_url=ctl.base, timeout=5.0) as client:
                body = {**ORDER, "lines": [{"sku": "K0", "qty": 2}]}
                headers = {**auth_headers("floor"), "Idempotency-Key": "kill-1"}
                r = await wait_for_condition(  # until the controller counted the shelf
                    lambda: client.post("/api/v1/picks", json=body, headers=headers),
                    15.0,
                    what="the pick accepted (201)",
                    until=lambda r: r.status_code == 201,
                    interval_s=0.1,
                    context=ctl.tail,
                )
                assert r.status_code == 201, r.text
                oid, cmd_id = r.json()["order_id"], r.json()["tasks"][0]["cmd_id"]
            await sorter.wait_until(lambda: sorter.ack_id == cmd_id and sorter.moving, 10.0)
            await ctl.kill()
            killed_at = time.monotonic()
            await sorter.wait_until(lambda: not sorter.moving, 2.0)
            await conveyor.wait_until(lambda: not conveyor.moving, 2.0)
            assert time.monotonic() - killed_at <= 1.25
            assert sorter.watchdog_tripped
            assert conveyor.watchdog_tripped
            assert sorter.last_done_id != cmd_id  # the tote is still on the belt

            await ctl.start()
            await wait_for_condition(
                lambda: ctl.get(f"/api/v1/orders/{oid}", role="supervisor"),
                30.0,
                what="the task DIVERTED or CONFIRMED after the restart",
                until=lambda order: order["tasks"][0]["state"] in ("DIVERTED", "CONFIRMED"),
                interval_s=0.1,
                context=lambda: (
                    f"{ctl.tail()}\nsorter: {list(sorter.events)[-10:]}\n"
                    f"conveyor: {list(conveyor.events)[-10:]}, heartbeat {conveyor.heartbeat}"
                ),
            )
            assert sorter.executions[cmd_id] == 1
            assert "order(s) to reconcile" in ctl.tail(200)
        finally:
            await ctl.stop()


async def test_mqtt_command_topic(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """Pick requests on ``<prefix>/<site>/cmd/picks``: a reply per request on ``…/result``
    with the HTTP path's statuses — 201 first, 200 for every replay (redelivery de-duplicated
    by (channel, order id), or the same key), 409 no stock, 422 invalid, 400 malformed (never
    executed); pick instructions go to ``<prefix>/<site>/picks/<zone>``."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    watcher = PahoWatcher(mosquitto.port, "fh/t/cmd/picks/result", client_id="replies")
    pickers = PahoWatcher(mosquitto.port, "fh/t/picks/#", client_id="pickers")
    await watcher.subscribed()
    await pickers.subscribed()
    try:
        async with (
            PlcHost(conveyor, seed=1) as ch,
            PlcHost(sorter, seed=2) as sh,
            floor(mosquitto, tmp_path, ch, sh) as f,
        ):
            await f.shelf("s0", 20)
            cmd = pick_command("M-1", "plant-b", 3)
            keyed = {**pick_command("M-2", "plant-b", 1), "idempotency_key": "mk-1"}
            payloads = [orjson.dumps(cmd), orjson.dumps(cmd), b"{oops", orjson.dumps([1])]
            payloads += [orjson.dumps(keyed), orjson.dumps(keyed)]
            too_many = pick_command("M-3", "plant-b", 100)  # 20 on the shelf
            unknown = {**pick_command("M-4", "plant-b", 1), "pack_station": "PS9"}
            payloads += [orjson.dumps(too_many), orjson.dumps(unknown)]
            await asyncio.to_thread(
                paho_publish, mosquitto.port, [("fh/t/cmd/picks", p) for p in payloads]
            )
            got: list[dict[str, Any]] = []
            for _ in range(len(payloads)):
                try:
                    _, reply = await watcher.wait_for(
                        lambda t, b: t == "fh/t/cmd/picks/result" and b not in got
                    )
                except TimeoutError:
                    raise AssertionError(f"replies so far: {got}; {f.rt.picking.stats}") from None
                got.append(reply)
            statuses = sorted(r["status"] for r in got)
            assert statuses == [200, 200, 201, 201, 400, 400, 409, 422], got
            codes = {r["order_id"]: r.get("code") for r in got if r["status"] in (409, 422)}
            assert codes == {"M-3": "insufficient_stock", "M-4": "invalid_pick"}
            # The first answer is 201, every replay (redelivery, or the same key again) 200
            # with the same order, as on the HTTP path.
            for external_id in ("M-1", "M-2"):
                mine = [r for r in got if r.get("order_id") == external_id]
                assert [r["status"] for r in mine] == [201, 200], mine
                assert [r["replayed"] for r in mine] == [False, True]
                assert mine[0]["order"]["order_id"] == mine[1]["order"]["order_id"]
            created = next(r for r in got if r["status"] == 201 and r["order_id"] == "M-1")
            order = created["order"]
            assert (order["channel"], order["external_id"]) == ("plant-b", "M-1")
            _, instruction = await pickers.wait_for(lambda t, b: t == "fh/t/picks/Z")
            assert (instruction["shelf"], instruction["qty"]) == ("sh0", 3)
            assert instruction["tote"] == order["tasks"][0]["tote"]
            assert f.rt.journal.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 2
            assert f.rt.picking.stats["invalid"] == 3
    finally:
        watcher.close()
        pickers.close()


async def test_short_pick_jam_and_full_lane_end_in_exception(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Explicit end states: the scale shows 1 of 2 units gone (SHORT), a jammed conveyor that
    cannot start (FAILED, nothing sent to the sorter), a full lane (RECIRCULATED → FAILED).
    Each order ends EXCEPTION with the reason, an ``order_exception`` event, no reservation."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0, max_recirculations=0)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh, scale_timeout_s=2) as f,
    ):
        rt = f.rt
        exceptions: list[OrderException] = []
        rt.bus.add_listener(
            lambda evs: exceptions.extend(e for e in evs if isinstance(e, OrderException))
        )
        await f.shelf("s0", 20)

        # Short: 2 units asked, the picker takes 1.
        r = await f.pick("short", {**ORDER, "order_id": "S-1", "lines": [{"sku": "K0", "qty": 2}]})
        short_id = r.json()["order_id"]
        await bus_until(rt, lambda: sorter.last_done_id == r.json()["tasks"][0]["cmd_id"], 20)
        await f.shelf("s0", 19)
        await bus_until(rt, lambda: order_state(rt, short_id) == "EXCEPTION", 10)
        (task,) = rt.picking.get(short_id)["tasks"]  # type: ignore[index]
        assert (task["state"], task["picked_qty"], task["result"]) == ("SHORT", 1, "DIVERTED")
        assert "1 of 2" in task["reason"]

        # Jam: the conveyor cannot start; the sorter never gets the command.
        conveyor.jam()
        await bus_until(rt, lambda: not conveyor.moving, 5)
        rt.picking.executor._belt_ok.clear()  # forget "seen running": the next pick reads it
        before = dict(sorter.executions)
        r = await f.pick("jam", {**ORDER, "order_id": "J-1", "lines": [{"sku": "K0", "qty": 1}]})
        jam_id = r.json()["order_id"]
        await bus_until(rt, lambda: order_state(rt, jam_id) == "EXCEPTION", 10)
        (task,) = rt.picking.get(jam_id)["tasks"]  # type: ignore[index]
        assert task["state"] == "FAILED"
        assert "conveyor-1" in task["reason"]
        assert dict(sorter.executions) == before

        # Full lane: the tote cannot be diverted into lane 3.
        conveyor.reset(conveyor.last_tick)
        sorter.set_lane_fill(3, sorter.lane_capacity)
        rt.picking.executor._belt_ok.clear()
        r = await f.pick("full", {**ORDER, "order_id": "F-1", "lines": [{"sku": "K0", "qty": 1}]})
        full_id = r.json()["order_id"]
        await bus_until(rt, lambda: order_state(rt, full_id) == "EXCEPTION", 20)
        (task,) = rt.picking.get(full_id)["tasks"]  # type: ignore[index]
        assert (task["state"], task["result"]) == ("FAILED", "RECIRCULATED")

        assert {e.order_id for e in exceptions} == {short_id, jam_id, full_id}
        assert rt.picking.reserved("sh0") == 0
        r = await f.client.get("/api/v1/orders?state=EXCEPTION", headers=auth_headers("supervisor"))
        assert {o["order_id"] for o in r.json()} == {short_id, jam_id, full_id}


async def test_b7_stop_overtakes_a_flood_of_picks(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """100 picks queue on a slow sorter (every request +20 ms); an engineer's STOP
    (``POST /api/v1/plcs/sorter-1/stop``) reaches the PLC ahead of the queued mailbox writes:
    at most the write already on the wire lands before it. (Its latency is a figure for a
    benchmark, not a timed assertion: on a loaded machine it measured 0.2-0.24 s.)"""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0, queue_capacity=8)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh) as f,
    ):
        rt = f.rt
        for device in ("s0", "s1", "s2"):
            await f.shelf(device, 40)
        sh.faults.latency_s = 0.02
        try:
            for i in range(100):
                req = PickRequest(f"FLOOD-{i}", ((f"K{i % 3}", 1),), "PS1", "wms")
                assert rt.picking.submit(req, key=f"flood-{i}", principal="wms").status == 201
            await sorter.wait_until(lambda: len(sorter.events_of("accept")) >= 2, 10.0)
            accepted_before = len(sorter.events_of("accept"))
            r = await f.client.post("/api/v1/plcs/sorter-1/stop", headers=auth_headers("engineer"))
            assert r.status_code == 200, r.text
            stop_event = sorter.events_of("stop")[-1]
            accepted_first = [e for e in sorter.events_of("accept") if e.t < stop_event.t]
            assert len(accepted_first) <= accepted_before + 1
            assert len(sorter.events_of("accept")) < 100
        finally:
            sh.faults.latency_s = 0.0


async def test_b6_cmd_ids_move_above_a_plc_that_is_ahead(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B6: the sorter knows ids above the journal's counter (here: written by hand, as an
    integrator commissioning the mailbox would; a restored journal or a replaced host looks
    the same). On connect the counter moves above the PLC's ack_id, journaled, before the
    first pick; a hand write while connected, and one after a PLC restart (new epoch), are
    overtaken too: every pick executes exactly once, none is refused."""
    # No background status read of the running belts between picks (`_keep_belts_fresh`):
    # one that came between the hand write and the next pick would move the counter before
    # it (also right, but not the path under test: the PLC's DUPLICATE and the renumbering).
    monkeypatch.setattr(pick_executor, "BELT_FRESH_S", 3600.0)
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    body = {**ORDER, "lines": [{"sku": "K0", "qty": 1}]}
    async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
        await hand_submit(sh.port, 1000, 71, 1)
        assert sorter.ack_id == 1000
        async with floor(mosquitto, tmp_path, ch, sh) as f:
            rt = f.rt
            counter = rt.journal.counters
            assert counter().get("cmd:sorter-1", 0) >= 1000  # moved on connect, journaled

            async def pick_above(order_id: str, hand_id: int) -> None:
                """A pick is diverted once, under a journaled cmd id above ``hand_id``."""
                await f.shelf("s0", 30)
                r = await f.pick(order_id, {**body, "order_id": order_id})
                assert r.status_code == 201, r.text
                task = await settled_task(rt, r.json()["order_id"])
                assert task["state"] == "DIVERTED", task
                assert counter()["cmd:sorter-1"] >= task["cmd_id"] > hand_id
                assert sorter.executions[task["cmd_id"]] == 1

            await pick_above("B6-1", 1000)
            assert rt.picking.stats["renumbered"] == 0  # its id was drawn above the PLC's

            # By hand again while the controller is connected (same epoch): the next id is
            # refused as DUPLICATE (not executed) and the tote sent again under a new id.
            await hand_submit(sh.port, 2000, 72, 1)
            await pick_above("B6-2", 2000)
            assert rt.picking.stats["renumbered"] == 1
            assert len(sorter.duplicates) == 1

            # A PLC restart (new epoch), its mailbox written by hand before the next pick.
            driver = rt.plcs["sorter-1"].driver
            assert isinstance(driver, SorterDriver)
            restarted = asyncio.Event()
            loop = asyncio.get_running_loop()
            # Called on the control loop's thread.
            driver.add_epoch_listener(lambda old, new: loop.call_soon_threadsafe(restarted.set))
            await sh.restart()
            await hand_submit(sh.port, 3000, 73, 1)
            await asyncio.wait_for(restarted.wait(), 10)
            await rt.control.call_async(driver.wait_mailbox_known, 10)
            assert driver.epoch == sorter.epoch
            await pick_above("B6-3", 3000)
            assert all(n == 1 for n in sorter.executions.values())
            assert rt.picking.stats["cmd_ids_moved"] >= 2


async def test_pick_command_queued_while_down_waits_for_the_plc_links(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Start-up order: a pick command published while the controller is down waits in its
    persistent session and arrives right after the broker connection, before the PLC links
    are up. It waits for them (bounded) and executes: 201, diverted, not 503."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    watcher = PahoWatcher(mosquitto.port, "fh/t/cmd/picks/result", client_id="replies")
    await watcher.subscribed()
    try:
        async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
            async with floor(mosquitto, tmp_path, ch, sh) as f:  # the session and the stock
                await f.shelf("s0", 20)
            cmd = pick_command("Q-1", "wms", 2)
            await asyncio.to_thread(
                paho_publish, mosquitto.port, [("fh/t/cmd/picks", orjson.dumps(cmd))]
            )
            async with floor(mosquitto, tmp_path, ch, sh) as f2:
                _, reply = await watcher.wait_for(
                    lambda t, b: t == "fh/t/cmd/picks/result" and b.get("order_id") == "Q-1"
                )
                assert reply["status"] == 201, reply
                task = await settled_task(f2.rt, reply["order"]["order_id"])
                assert task["state"] == "DIVERTED", task
                assert sorter.executions[task["cmd_id"]] == 1
                assert f2.rt.picking.devices_settled.is_set()
    finally:
        watcher.close()


def journaled(rt: Runtime, kind: str) -> list[dict[str, Any]]:
    """The journal's events of ``kind``, oldest first."""
    rows = rt.journal.db.execute("SELECT body FROM events WHERE kind=? ORDER BY id", (kind,))
    return [orjson.loads(body) for (body,) in rows]


def no_execution(order_id: str) -> bool:
    """The order's execution task has ended (or never ran)."""
    return all(t.get_name() != f"order:{order_id}" for t in asyncio.all_tasks())


async def test_cancel_an_order_before_its_command_is_sent(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel: a floor caller cancels its own order while the executor is still starting the
    belts (held here by holding the conveyor's start lock, so the window is certain), a
    supervisor any order; another floor caller gets the unknown-order answer, an engineer 403;
    again: 200 unchanged. Every task CANCELLED, the reservation released, the command never
    reaches the sorter, an ``order_state`` event on the bus and in the journal. Once a command
    went to the sorter: 409 ``not_cancellable``, for the owner and a supervisor alike."""
    floor2 = other_floor_caller(monkeypatch)
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=0.5, lane_drain_s=0.0)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh) as f,
    ):
        rt = f.rt
        seen: list[OrderStateChanged] = []
        rt.bus.add_listener(lambda evs: seen.extend(e for e in evs if type(e) is OrderStateChanged))
        await f.shelf("s0", 20)
        belts = rt.picking.executor._belt_locks["conveyor-1"]
        await rt.control.call_async(belts.acquire)  # the executor's lock, on its loop
        try:
            a = await f.pick(
                "c-a", {**ORDER, "order_id": "C-A", "lines": [{"sku": "K0", "qty": 2}]}
            )
            b = await f.pick(
                "c-b", {**ORDER, "order_id": "C-B", "lines": [{"sku": "K0", "qty": 3}]}
            )
            assert (a.status_code, b.status_code) == (201, 201), (a.text, b.text)
            oid_a, oid_b = a.json()["order_id"], b.json()["order_id"]
            cmds = {a.json()["tasks"][0]["cmd_id"], b.json()["tasks"][0]["cmd_id"]}
            assert rt.picking.reserved("sh0") == 5

            unknown = await f.client.post("/api/v1/orders/nope/cancel", headers=floor2)
            other = await f.client.post(f"/api/v1/orders/{oid_a}/cancel", headers=floor2)
            assert (unknown.status_code, other.status_code) == (404, 404)
            assert other.headers["content-type"] == "application/problem+json"
            assert other.json() == {**unknown.json(), "detail": f"no order {oid_a!r}"}
            r = await f.client.post(
                f"/api/v1/orders/{oid_a}/cancel", headers=auth_headers("engineer")
            )
            assert r.status_code == 403, r.text
            r = await f.client.post(
                f"/api/v1/orders/{oid_a}/cancel",
                json={"reason": " "},
                headers=auth_headers("floor"),
            )
            assert r.status_code == 422, r.text
            assert order_state(rt, oid_a) == "PICKING"  # refusals changed nothing

            r = await f.client.post(
                f"/api/v1/orders/{oid_a}/cancel",
                json={"reason": "customer withdrew"},
                headers=auth_headers("floor"),
            )
            assert r.status_code == 200, r.text
            body = OrderOut.model_validate(r.json())
            assert body.state == "CANCELLED"
            assert body.reason == "cancelled by test-floor: customer withdrew"
            assert [t.state for t in body.tasks] == ["CANCELLED"]
            again = await f.client.post(
                f"/api/v1/orders/{oid_a}/cancel", headers=auth_headers("floor")
            )
            assert (again.status_code, again.json()) == (200, r.json())
            r = await f.client.post(
                f"/api/v1/orders/{oid_b}/cancel", headers=auth_headers("supervisor")
            )
            assert r.status_code == 200, r.text
            assert r.json()["reason"] == "cancelled by test-supervisor"
            assert rt.picking.reserved("sh0") == 0
        finally:
            await rt.control.call(belts.release)
        await wait_for_condition(
            lambda: no_execution(oid_a) and no_execution(oid_b), 10.0, what="executions ended"
        )
        assert not cmds & set(sorter.executions)  # never reached the sorter
        assert sorter.ack_id < min(cmds)
        cancelled = [(e.order_id, e.old) for e in seen if e.new is OrderState.CANCELLED]
        assert cancelled == [(oid_a, "PICKING"), (oid_b, "PICKING")]
        assert [
            (e["order_id"], e["reason"])
            for e in journaled(rt, "order_state")
            if e["new"] == "CANCELLED"
        ] == [
            (oid_a, "cancelled by test-floor: customer withdrew"),
            (oid_b, "cancelled by test-supervisor"),
        ]
        assert {e["order_id"] for e in journaled(rt, "pick_task") if e["state"] == "CANCELLED"} == {
            oid_a,
            oid_b,
        }
        assert rt.journal.db.execute("SELECT sum(open) FROM orders").fetchone()[0] == 0

        # Executing: the command went to the sorter (slow belt: the tote is still on it).
        r = await f.pick("c-c", {**ORDER, "order_id": "C-C", "lines": [{"sku": "K0", "qty": 1}]})
        assert r.status_code == 201, r.text
        oid_c, cmd_c = r.json()["order_id"], r.json()["tasks"][0]["cmd_id"]
        await bus_until(rt, lambda: sorter.ack_id == cmd_c, 10)
        for role in ("floor", "supervisor"):
            r = await f.client.post(f"/api/v1/orders/{oid_c}/cancel", headers=auth_headers(role))
            assert r.status_code == 409, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert (r.json()["type"], r.json()["state"]) == (
                "urn:floorhand:problem:not_cancellable",
                "PICKING",
            )
        assert order_state(rt, oid_c) == "PICKING"
        assert rt.picking.reserved("sh0") == 1


async def test_a_supervisor_resolves_an_unknown_task(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The sorter PLC restarts with a tote on its belt: the task is UNKNOWN, the order
    EXCEPTION. A supervisor resolves it through the API with the outcome and a reason
    (journaled with who and when); every task CONFIRMED → the order is SORTED and can be packed.
    A floor caller: 403; a task that is not UNKNOWN (resolving twice): 409; no such task or
    order: 404; a bad body: 422. Resolving as FAILED keeps the order EXCEPTION."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=0.3, lane_drain_s=0.0)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh) as f,
    ):
        rt = f.rt
        await f.shelf("s0", 20)
        oids = []
        for n in range(2):
            r = await f.pick(
                f"u-{n}", {**ORDER, "order_id": f"U-{n}", "lines": [{"sku": "K0", "qty": 1}]}
            )
            assert r.status_code == 201, r.text
            oids.append(r.json()["order_id"])
            cmd_id = r.json()["tasks"][0]["cmd_id"]
            await bus_until(rt, lambda: sorter.ack_id == cmd_id, 10)  # noqa: B023
        await sh.restart()  # both totes pending: their outcome is lost with the PLC's memory
        for oid in oids:
            await bus_until(rt, lambda: order_state(rt, oid) == "EXCEPTION", 20)  # noqa: B023
        picked, empty = oids
        url = f"/api/v1/orders/{picked}/tasks/0/resolve"
        finding = {"outcome": "CONFIRMED", "reason": "tote found in lane 3 with the unit"}

        for role in ("floor", "engineer"):
            r = await f.client.post(url, json=finding, headers=auth_headers(role))
            assert r.status_code == 403, r.text
        for bad in ({"outcome": "PICKED", "reason": "x"}, {"outcome": "CONFIRMED"}, {}):
            r = await f.client.post(url, json=bad, headers=auth_headers("supervisor"))
            assert r.status_code == 422, (bad, r.text)
        for missing in (
            f"/api/v1/orders/{picked}/tasks/5/resolve",
            "/api/v1/orders/no/tasks/0/resolve",
        ):
            r = await f.client.post(missing, json=finding, headers=auth_headers("supervisor"))
            assert r.status_code == 404, r.text
            assert r.headers["content-type"] == "application/problem+json"
        assert rt.picking.get(picked)["tasks"][0]["state"] == "UNKNOWN"  # type: ignore[index]

        before = time.time()
        r = await f.client.post(url, json=finding, headers=auth_headers("supervisor"))
        assert r.status_code == 200, r.text
        body = OrderOut.model_validate(r.json())
        (task,) = body.tasks
        assert (body.state, task.state, task.resolved_by) == (
            "SORTED",
            "CONFIRMED",
            "test-supervisor",
        )
        assert task.resolved_ts is not None
        assert task.resolved_ts >= before
        assert task.reason is not None
        assert task.reason.startswith(
            "resolved CONFIRMED by test-supervisor: tote found in lane 3 with the unit (was: "
        )
        assert [h.state for h in body.history][-2:] == ["EXCEPTION", "SORTED"]
        (event,) = [e for e in journaled(rt, "pick_task") if e.get("by")]
        assert (event["order_id"], event["state"], event["by"]) == (
            picked,
            "CONFIRMED",
            "test-supervisor",
        )
        assert [
            (e["old"], e["new"]) for e in journaled(rt, "order_state") if e["order_id"] == picked
        ][-1] == ("EXCEPTION", "SORTED")

        r = await f.client.post(url, json=finding, headers=auth_headers("supervisor"))
        assert r.status_code == 409, r.text
        assert (r.json()["type"], r.json()["state"]) == (
            "urn:floorhand:problem:task_not_unknown",
            "CONFIRMED",
        )
        r = await f.client.post(f"/api/v1/orders/{picked}/pack", headers=auth_headers("supervisor"))
        assert (r.status_code, r.json()["state"]) == (200, "PACKED")

        r = await f.client.post(
            f"/api/v1/orders/{empty}/tasks/0/resolve",
            json={"outcome": "FAILED", "reason": "tote empty"},
            headers=auth_headers("supervisor"),
        )
        assert r.status_code == 200, r.text
        assert (r.json()["state"], r.json()["tasks"][0]["state"]) == ("EXCEPTION", "FAILED")
        assert rt.picking.reserved("sh0") == 0
        # A closed order cannot be cancelled.
        r = await f.client.post(
            f"/api/v1/orders/{empty}/cancel", headers=auth_headers("supervisor")
        )
        assert (r.status_code, r.json()["state"]) == (409, "EXCEPTION")
