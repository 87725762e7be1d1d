"""Operations API over HTTP: alert ack/snooze, manual PLC commands, zones, scales, tare and
calibration.

The controller app runs under a real uvicorn on 127.0.0.1 (in this process, so a test can wait
on the runtime's bus), with a real mosquitto, and simulated conveyor PLCs speaking Modbus TCP on
loopback. The restart test runs ``floorhand run`` as a child process and SIGKILLs it. Waits are
on bus events, the simulator's change events and link state watches, with timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from controller.api.app import create_app
from controller.bus import Subscription
from controller.config import load_site
from controller.runtime import Runtime
from devices.link.state import LinkState
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.plc import BeltState as SimBeltState
from simulators.sorter import SorterPlc
from tests.controller_proc import ControllerProcess
from tests.integration.test_sensing_e2e import PahoWatcher
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import auth_headers, topic, write_small_site

pytestmark = pytest.mark.timeout(90)

PROBLEM = "application/problem+json"
SUP, ENG = "test-supervisor", "test-engineer"


class OpsServer:
    def __init__(self, rt: Runtime, port: int) -> None:
        self.rt = rt
        self.base = f"http://127.0.0.1:{port}"
        self.ts = 0.0
        self.seq: dict[str, int] = {}
        # Set after every group of MQTT messages ingest processed (events or not).
        self.ingested = asyncio.Event()
        process = rt.ingest.on_messages

        def on_messages(msgs: list[Any]) -> None:
            process(msgs)
            self.ingested.set()

        rt.ingest.on_messages = on_messages  # type: ignore[method-assign]

    def client(self, role: str | None = "engineer") -> httpx.AsyncClient:
        headers = auth_headers(role) if role is not None else {}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=10.0)

    async def publish(self, device: str, grams: float, n: int = 6) -> None:
        """``n`` readings of ``grams`` from ``device``; returns once the controller applied them
        (its cursor reached the last sequence number)."""
        self.ts = max(self.ts, self.rt.clock())
        first = self.seq.get(device, -1) + 1
        msgs = []
        for i in range(n):
            self.ts += 0.01
            body = {"device": device, "seq": first + i, "ts": self.ts, "grams": grams}
            msgs.append((topic(device), orjson.dumps(body)))
        self.seq[device] = first + n - 1
        port = self.rt.site.mqtt.port
        await asyncio.to_thread(paho_publish, port, msgs)
        last = first + n - 1
        async with asyncio.timeout(10):
            while _cursor(self.rt, device) < last:
                self.ingested.clear()
                await self.ingested.wait()


def _cursor(rt: Runtime, device: str) -> int:
    cur = rt.ingest.cursors.get(device)
    return cur.seq if cur is not None else -1


async def next_event(sub: Subscription, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next event of ``sub`` whose wire dict (what the journal and the live frames carry)
    matches ``pred``: that dict."""
    async with asyncio.timeout(10):
        while True:
            ev = (await sub.get()).as_dict()
            if pred(ev):
                return ev


@contextlib.asynccontextmanager
async def ops_server(site_path: Path, **runtime_kw: Any) -> AsyncIterator[OpsServer]:
    site = load_site(site_path)
    rt = Runtime(site, **runtime_kw)
    app = create_app(site, runtime=rt)
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto
    # says TCP, and accepted sockets inherit it (proto 0 costs ~40 ms per response here).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn-under-test")
    try:
        async with asyncio.timeout(15):
            await rt.started.wait()
            await rt.link.wait_up(10)
        yield OpsServer(rt, sock.getsockname()[1])
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


def plc_table(port: int, plc_id: str = "conveyor-1", kind: str = "conveyor") -> str:
    return f"""
[[plcs]]
id = "{plc_id}"
kind = "{kind}"
port = {port}
"""


def assert_problem(r: httpx.Response, status: int, text: str = "") -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert text.lower() in (body["detail"] or "").lower(), body
    return body


def journal_events(path: Path, kind: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT body FROM events WHERE kind=? ORDER BY id", (kind,)).fetchall()
    finally:
        db.close()
    return [orjson.loads(r[0]) for r in rows]


# -- alerts ---------------------------------------------------------------------------------------


async def test_ack_and_snooze_survive_a_kill_and_restart(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> None:
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=2)
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    watcher = PahoWatcher(mosquitto.port, "fh/t/alerts/K0")
    await watcher.subscribed()
    try:
        t0 = time.time()
        msgs = [
            (topic("s0"), orjson.dumps({"device": "s0", "seq": i, "ts": t0 + i * 0.01, "grams": g}))
            for i, g in enumerate([1000.0] * 8)  # 5 units: LOW (reorder point 10)
        ]
        await asyncio.to_thread(paho_publish, mosquitto.port, msgs)
        _, raised = await watcher.wait_for(lambda t, b: b["active"])
        async with httpx.AsyncClient(
            base_url=ctl.base, headers=auth_headers("supervisor"), timeout=10
        ) as sup:
            r = await sup.post("/api/v1/alerts/K0/ack", json={"note": "PO 4711 placed"})
            assert r.status_code == 200, r.text
            acked = r.json()
            assert (acked["acked_by"], acked["ack_note"]) == (SUP, "PO 4711 placed")
            assert acked["episode"] == raised["episode"]
            before = time.time()
            r = await sup.post(
                "/api/v1/alerts/K0/snooze", json={"minutes": 30, "reason": "truck due 14:00"}
            )
            after = time.time()
            assert r.status_code == 200, r.text
            snoozed = r.json()
            assert before + 1800 <= snoozed["snoozed_until"] <= after + 1800
            assert (snoozed["snoozed_by"], snoozed["snooze_reason"]) == (SUP, "truck due 14:00")
            assert snoozed["acked_by"] == SUP, "a snooze keeps the ack"
        # Both went out on the retained alert topic.
        await watcher.wait_for(lambda t, b: b.get("snoozed_until") == snoozed["snoozed_until"])
    finally:
        watcher.close()

    await ctl.kill()  # SIGKILL: the 200s came after the commits
    acks = journal_events(tmp_path / "journal.sqlite", "alert_ack")
    snoozes = journal_events(tmp_path / "journal.sqlite", "alert_snooze")
    assert [(e["key"], e["by"], e["note"]) for e in acks] == [("K0", SUP, "PO 4711 placed")]
    assert [(e["key"], e["by"], e["reason"]) for e in snoozes] == [("K0", SUP, "truck due 14:00")]

    await ctl.start()
    alerts = {a["key"]: a for a in await ctl.get("/api/v1/alerts", role="supervisor")}
    k0 = alerts["K0"]
    assert k0["episode"] == raised["episode"]
    for field in ("acked_by", "acked_at", "ack_note", "snoozed_until", "snoozed_by"):
        assert k0[field] == snoozed[field], field
    assert alerts["K1"]["acked_by"] is None
    # A supervisor connecting now gets the retained state, ack and snooze included.
    late = PahoWatcher(mosquitto.port, "fh/t/alerts/K0")
    try:
        _, body = await late.wait_for(lambda t, b: True)
        assert (body["acked_by"], body["snoozed_until"]) == (SUP, snoozed["snoozed_until"])
    finally:
        late.close()


async def test_ack_snooze_errors_roles_and_bus_events(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=2)
    async with ops_server(site) as srv:
        events = srv.rt.bus.subscribe("test", kinds=frozenset({"alert_ack", "alert_snooze"}))
        async with (
            srv.client("supervisor") as sup,
            srv.client("engineer") as eng,
            srv.client("floor") as floor,
            srv.client(None) as anon,
        ):
            snooze_ok = {"minutes": 5, "reason": "x"}
            # No episode yet: 409; unknown keys: 404.
            assert_problem(await sup.post("/api/v1/alerts/K0/ack", json={}), 409, "no active")
            assert_problem(await sup.post("/api/v1/alerts/K0/snooze", json=snooze_ok), 409)
            assert_problem(await sup.post("/api/v1/alerts/nope/ack"), 404, "unknown alert key")
            assert_problem(await sup.post("/api/v1/alerts/shelf:sh0/snooze", json=snooze_ok), 404)
            # Roles: supervisors only.
            r = await anon.post("/api/v1/alerts/K0/ack")
            assert_problem(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
            assert_problem(await floor.post("/api/v1/alerts/K0/ack"), 403)
            assert_problem(await eng.post("/api/v1/alerts/K0/snooze", json=snooze_ok), 403)
            # Bad bodies: 422 problem+json naming the field.
            for bad, field in [
                ({}, "minutes"),
                ({"minutes": 0, "reason": "x"}, "minutes"),
                ({"minutes": 1441, "reason": "x"}, "minutes"),
                ({"minutes": "soon", "reason": "x"}, "minutes"),
                ({"minutes": 5}, "reason"),
                ({"minutes": 5, "reason": ""}, "reason"),
                ({"minutes": 5, "reason": "   "}, "reason"),
                ({"minutes": 5, "reason": "x" * 501}, "reason"),
                ({"minutes": 5, "reason": "x", "by": "someone-else"}, "by"),
            ]:
                r = await sup.post("/api/v1/alerts/K0/snooze", json=bad)
                assert_problem(r, 422, field)
            r = await sup.post(
                "/api/v1/alerts/K0/snooze",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
            assert_problem(r, 422)
            assert_problem(await sup.post("/api/v1/alerts/K0/ack", json={"note": 5}), 422, "note")
            assert_problem(await sup.post("/api/v1/alerts/K0/ack", json={"by": "x"}), 422, "by")

            # An episode: K0 at 2 units (CRITICAL).
            raised = srv.rt.bus.subscribe("raised", kinds=frozenset({"alert_raised"}))
            await srv.publish("s0", 700.0)
            await next_event(raised, lambda e: e["key"] == "K0")
            r = await sup.post("/api/v1/alerts/K0/ack")  # no body: no note
            assert r.status_code == 200, r.text
            assert (r.json()["acked_by"], r.json()["ack_note"]) == (SUP, "")
            ev = await next_event(events, lambda e: e["kind"] == "alert_ack")
            assert (ev["key"], ev["by"], ev["severity"], ev["notify"]) == (
                "K0",
                SUP,
                "critical",
                False,
            )
            r = await sup.post("/api/v1/alerts/K0/snooze", json={"minutes": 1440, "reason": "r"})
            assert r.status_code == 200, r.text
            ev = await next_event(events, lambda e: e["kind"] == "alert_snooze")
            assert ev["until_s"] == r.json()["snoozed_until"]
            listed = {a["key"]: a for a in (await sup.get("/api/v1/alerts")).json()}
            assert listed["K0"]["acked_by"] == SUP
            assert listed["K0"]["snoozed_until"] == ev["until_s"]
            assert listed["K1"]["snoozed_until"] is None
            # Restocked: the episode resolves and takes the ack and snooze with it.
            resolved = srv.rt.bus.subscribe("resolved", kinds=frozenset({"alert_resolved"}))
            await srv.publish("s0", 3500.0)  # 30 units
            ev = await next_event(resolved, lambda e: e["key"] == "K0")
            assert ev["notify"] is False, "a snoozed episode resolves quietly"
            listed = {a["key"]: a for a in (await sup.get("/api/v1/alerts")).json()}
            assert listed["K0"]["active"] is False
            assert (listed["K0"]["acked_by"], listed["K0"]["snoozed_until"]) == (None, None)
            assert_problem(await sup.post("/api/v1/alerts/K0/ack"), 409)


# -- PLC commands ---------------------------------------------------------------------------------


async def test_manual_plc_commands_reach_the_simulated_belt(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1")
    async with PlcHost(conveyor, seed=1) as host, PlcHost(sorter, seed=2) as sorter_host:
        site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=1)
        tables = plc_table(host.port) + plc_table(sorter_host.port, "sorter-1", "sorter")
        site.write_text(site.read_text() + tables)
        async with ops_server(site) as srv:
            rt = srv.rt
            plc = rt.plcs["conveyor-1"]
            await plc.link.watch.wait_for(LinkState.UP, 10)
            await rt.plcs["sorter-1"].link.watch.wait_for(LinkState.UP, 10)
            cmds = rt.bus.subscribe("cmds", kinds=frozenset({"plc_command"}))
            async with srv.client("engineer") as eng, srv.client("supervisor") as sup:
                # Not an engineer: refused before anything reaches the PLC.
                assert_problem(await sup.post("/api/v1/plcs/conveyor-1/start"), 403)
                assert_problem(await eng.post("/api/v1/plcs/nope/start"), 404, "unknown PLC")
                assert conveyor.command_count == 0

                r = await eng.post("/api/v1/plcs/conveyor-1/start")
                assert r.status_code == 200, r.text
                body = r.json()
                assert (body["plc"], body["command"], body["by"], body["result"]) == (
                    "conveyor-1",
                    "start",
                    ENG,
                    "ok",
                )
                assert body["status"]["state"] in ("STARTING", "RUNNING")
                assert body["status"]["running"] is True
                await conveyor.wait_until(lambda: conveyor.state is SimBeltState.RUNNING, 5)
                ev = await next_event(cmds, lambda e: True)
                assert (ev["command"], ev["by"], ev["role"], ev["result"]) == (
                    "start",
                    ENG,
                    "engineer",
                    "ok",
                )

                r = await eng.post("/api/v1/plcs/conveyor-1/stop")
                assert r.status_code == 200, r.text
                assert r.json()["status"]["state"] == "STOPPED"
                assert r.json()["status"]["running"] is False
                assert conveyor.state is SimBeltState.STOPPED
                assert not conveyor.moving
                assert conveyor.events_of("stop")[-1].detail == "command"
                ev = await next_event(cmds, lambda e: True)
                assert (ev["command"], ev["result"], ev["state"]) == ("stop", "ok", "STOPPED")

                # The sorter's belt, same commands.
                r = await eng.post("/api/v1/plcs/sorter-1/start")
                assert r.status_code == 200, r.text
                await sorter.wait_until(lambda: sorter.moving, 5)
                r = await eng.post("/api/v1/plcs/sorter-1/stop")
                assert r.status_code == 200, r.text
                assert r.json()["status"]["state"] == "STOPPED"
                assert not sorter.moving
                ev = await next_event(cmds, lambda e: e["command"] == "stop")
                assert (ev["plc"], ev["result"]) == ("sorter-1", "ok")

                # An e-stop on the floor: START is refused (409), with the PLC's reason.
                conveyor.press_estop()
                r = await eng.post("/api/v1/plcs/conveyor-1/start")
                assert_problem(r, 409, "estop")
                assert not conveyor.moving
                ev = await next_event(cmds, lambda e: True)
                assert (ev["command"], ev["result"]) == ("start", "refused")
                conveyor.release_estop()
                r = await eng.post("/api/v1/plcs/conveyor-1/reset")
                assert r.status_code == 200, r.text
                assert r.json()["status"]["fault"] == "NONE"
                assert conveyor.state is SimBeltState.STOPPED

                # The PLC leaves the network: START answers 503 at once, nothing is sent.
                await host.go_offline()
                await plc.link.watch.wait_for(LinkState.DOWN, 10)
                sent = conveyor.command_count
                t0 = time.monotonic()
                r = await eng.post("/api/v1/plcs/conveyor-1/start")
                elapsed_ms = (time.monotonic() - t0) * 1000
                assert_problem(r, 503, "link")
                assert r.headers.get("retry-after") == "1"
                print(f"start with the PLC link down: 503 in {elapsed_ms:.1f} ms")
                r = await eng.post("/api/v1/plcs/conveyor-1/stop")
                assert_problem(r, 503, "watchdog")
                assert conveyor.command_count == sent
                ev = await next_event(cmds, lambda e: e["command"] == "stop")
                assert ev["result"] == "unavailable"

    # Every manual command is in the journal, in order, with who and the outcome.
    rows = journal_events(tmp_path / "journal.sqlite", "plc_command")
    assert [(e["plc"], e["command"], e["result"]) for e in rows if e["plc"] == "sorter-1"] == [
        ("sorter-1", "start", "ok"),
        ("sorter-1", "stop", "ok"),
    ]
    assert {e["by"] for e in rows} == {ENG}
    assert [(e["command"], e["result"], e["by"]) for e in rows if e["plc"] == "conveyor-1"] == [
        ("start", "ok", ENG),
        ("stop", "ok", ENG),
        ("start", "refused", ENG),
        ("reset", "ok", ENG),
        ("start", "unavailable", ENG),
        ("stop", "unavailable", ENG),
    ]


# -- zones and scales -----------------------------------------------------------------------------


async def test_zones_and_scales(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=3, reporting_interval_s=30)
    async with ops_server(site) as srv:
        await srv.publish("s0", 2500.0)  # 20 units
        await srv.publish("s1", 800.0)  # 3 units
        async with srv.client("floor") as floor, srv.client("supervisor") as sup:
            r = await floor.get("/api/v1/zones")
            assert r.status_code == 200, r.text
            [zone] = r.json()
            assert (zone["id"], zone["shelves"], zone["scales"]) == ("Z", 3, 3)
            assert zone["skus"] == ["K0", "K1", "K2"]
            assert zone["shelf_status"] == {"ok": 2, "unknown": 1}
            r = await floor.get("/api/v1/zones/Z/stock")
            assert r.status_code == 200, r.text
            stock = r.json()
            shelves = {s["id"]: s for s in stock["shelves"]}
            assert set(shelves) == {"sh0", "sh1", "sh2"}
            assert (shelves["sh0"]["units"], shelves["sh0"]["tare_g"]) == (20, 500.0)
            skus = {s["sku"]: s for s in stock["skus"]}
            assert (skus["K0"]["units_in_zone"], skus["K0"]["level"], skus["K0"]["state"]) == (
                20,
                20,
                "ok",
            )
            assert (skus["K1"]["level"], skus["K1"]["state"]) == (3, "critical")
            assert (skus["K2"]["level"], skus["K2"]["state"]) == (None, "unknown")
            assert_problem(await floor.get("/api/v1/zones/nope/stock"), 404, "unknown zone")

            assert_problem(await floor.get("/api/v1/scales"), 403)
            r = await sup.get("/api/v1/scales")
            assert r.status_code == 200, r.text
            scales = {s["id"]: s for s in r.json()}
            assert scales["s0"]["status"] == "ok"
            assert scales["s0"]["last_seen"] is not None
            assert scales["s0"]["channels"] == [
                {"channel": 0, "shelf": "sh0", "shelf_status": "ok", "scale_factor": 1.0}
            ]
            assert (scales["s2"]["status"], scales["s2"]["last_seen"]) == ("unknown", None)


# -- tare and calibration -------------------------------------------------------------------------


async def test_tare_and_calibration_change_the_count_and_survive_a_restart(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=2, reporting_interval_s=30)
    async with ops_server(site) as srv:
        rt = srv.rt
        cal_events = rt.bus.subscribe("cal", kinds=frozenset({"shelf_calibrated"}))
        await srv.publish("s0", 2500.0)  # tare 500 + 20 × 100 g
        assert rt.ingest.states["sh0"].units == 20
        async with srv.client("engineer") as eng, srv.client("supervisor") as sup:
            # Errors first: nothing changes.
            assert_problem(await sup.post("/api/v1/shelves/sh0/tare", json={}), 403)
            assert_problem(await eng.post("/api/v1/shelves/nope/tare"), 404, "unknown shelf")
            assert_problem(
                await eng.post("/api/v1/shelves/nope/calibration", json={"scale_factor": 1.0}),
                404,
            )
            assert_problem(await eng.post("/api/v1/shelves/sh1/tare"), 409, "no fresh reading")
            for path, bad, field in [
                ("tare", {"tare_g": -1}, "tare_g"),
                ("tare", {"tare_g": "heavy"}, "tare_g"),
                ("tare", {"tare_g": 10_000}, "tare_g"),  # the scale's whole range
                ("tare", {"grams": 5}, "grams"),
                ("calibration", {}, "unit_weight_g"),
                ("calibration", {"scale_factor": 5}, "scale_factor"),
                ("calibration", {"scale_factor": 0.1}, "scale_factor"),
                ("calibration", {"unit_weight_g": 0}, "unit_weight_g"),
                ("calibration", {"unit_weight_g": 9_600}, "exceeds the scale"),
            ]:
                r = await eng.post(f"/api/v1/shelves/sh0/{path}", json=bad)
                assert_problem(r, 422, field)
            assert rt.ingest.states["sh0"].units == 20
            assert "sh0" not in rt.ingest.calibrations

            # An explicit tare: the count follows at once, evented and visible.
            r = await eng.post("/api/v1/shelves/sh0/tare", json={"tare_g": 1500})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["shelf"]["units"], body["shelf"]["tare_g"]) == (10, 1500.0)
            assert body["shelf"]["calibration"]["updated_by"] == ENG
            kinds = [e["kind"] for e in body["events"]]
            assert kinds == ["shelf_calibrated", "stock_changed"]
            assert (body["events"][1]["old_units"], body["events"][1]["new_units"]) == (20, 10)
            ev = await next_event(cal_events, lambda e: True)
            assert (ev["action"], ev["by"], ev["new"]["tare_g"]) == ("tare", ENG, 1500.0)
            shelves = {s["id"]: s for s in (await eng.get("/api/v1/shelves")).json()}
            assert (shelves["sh0"]["units"], shelves["sh0"]["tare_g"]) == (10, 1500.0)
            assert shelves["sh1"]["calibration"] is None
            assert (await eng.get("/api/v1/stock/K0")).json()["level"] == 10

            # Unit weight, then the channel's scale factor.
            r = await eng.post("/api/v1/shelves/sh0/calibration", json={"unit_weight_g": 50})
            assert r.status_code == 200, r.text
            assert r.json()["shelf"]["units"] == 20
            r = await eng.post("/api/v1/shelves/sh0/calibration", json={"scale_factor": 1.1})
            assert r.status_code == 200, r.text
            shelf = r.json()["shelf"]
            assert (shelf["units"], shelf["scale_factor"]) == (25, 1.1)  # (2750 − 1500) / 50
            assert shelf["weight_g"] == pytest.approx(2750.0)
            # New raw readings are corrected on the way in: 2590.9 g raw → 2850 g → 27 units.
            await srv.publish("s0", 2850.0 / 1.1)
            assert rt.ingest.states["sh0"].units == 27
            scales = {s["id"]: s for s in (await sup.get("/api/v1/scales")).json()}
            assert scales["s0"]["channels"][0]["scale_factor"] == 1.1

            # Tare to the settled gross weight (the product taken off first): count 0.
            r = await eng.post("/api/v1/shelves/sh0/tare")
            assert r.status_code == 200, r.text
            shelf = r.json()["shelf"]
            assert shelf["tare_g"] == pytest.approx(2850.0)
            assert shelf["units"] == 0
            # Moving weight (a step confirmed by two readings, not settled yet): no tare.
            await srv.publish("s0", 2850.0 / 1.1 + 400, n=2)
            assert rt.ingest.states["sh0"].status.value == "settling"
            assert_problem(await eng.post("/api/v1/shelves/sh0/tare", json={}), 409, "settled")
            await srv.publish("s0", 2850.0 / 1.1)
            assert rt.ingest.states["sh0"].units == 0

    # A restart applies the overrides again, before the shelf states.
    async with ops_server(site) as srv:
        rt = srv.rt
        spec = rt.specs["sh0"]
        assert (spec.tare_g, spec.unit_weight_g) == (pytest.approx(2850.0), 50.0)
        async with srv.client("engineer") as eng:
            shelves = {s["id"]: s for s in (await eng.get("/api/v1/shelves")).json()}
            sh0 = shelves["sh0"]
            assert (sh0["units"], sh0["unit_weight_g"], sh0["scale_factor"]) == (0, 50.0, 1.1)
            assert sh0["calibration"]["unit_weight_g"] == 50.0
            # Readings after the restart are still corrected: raw for 2850 + 3 × 50 g.
            srv.seq["s0"] = rt.ingest.cursors["s0"].seq
            await srv.publish("s0", (2850.0 + 150) / 1.1)
            assert rt.ingest.states["sh0"].units == 3
            # Back to the site file.
            r = await eng.delete("/api/v1/shelves/sh0/calibration")
            assert r.status_code == 200, r.text
            shelf = r.json()["shelf"]
            assert (shelf["tare_g"], shelf["unit_weight_g"], shelf["scale_factor"]) == (
                500.0,
                100.0,
                1.0,
            )
            assert shelf["calibration"] is None
            assert shelf["units"] == 22  # 2727.3 raw g: (2727.3 − 500) / 100
    rows = journal_events(tmp_path / "journal.sqlite", "shelf_calibrated")
    assert [e["action"] for e in rows] == ["tare", "calibration", "calibration", "tare", "reset"]
