"""HTTP is served from an event loop of its own: a blocked ingest loop delays no HTTP pick
(docs/architecture.md, "Three event loops").

The controller is served as ``floorhand run`` serves it (`controller.api.loops.serve_apart`:
uvicorn on its own loop in its own thread, the runtime on the calling loop, which is the
test's). A bus listener blocks the ingest loop and, while it blocks, sends
``POST /api/v1/picks`` from the blocked thread itself and waits for the sorter simulator (on a
loop in another thread, as a real PLC is) to see the order's mailbox write. The observations
are made while the ingest loop is provably still blocked (the listener has not returned). With
uvicorn on the ingest loop the request waits in vain and times out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from controller.__main__ import _notify_systemd
from controller.api.app import create_app
from controller.api.deps import PUBLIC
from controller.api.loops import LoopWatch, on_http_loop, serve_apart
from controller.config import load_site
from controller.domain.events import BusEvent, StockChanged
from controller.runtime import Runtime
from controller.sdnotify import Notifier
from devices.link.state import LinkState
from devices.sorter import SorterDriver
from simulators.conveyor import ConveyorPlc
from simulators.sorter import SorterPlc
from tests.integration.test_api_ops import next_event
from tests.integration.test_control_loop import Written, plcs_in_thread
from tests.integration.test_picking import Floor, picking_site
from tests.integration.test_sensing_e2e import readings
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import TOKENS, auth_headers, write_small_site
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.timeout(60)

BLOCK_LIMIT_S = 8.0
"""The longest the listener blocks the ingest loop (it returns as soon as all was seen)."""


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def thread_name() -> str:
    return threading.current_thread().name


@on_http_loop
class _ApartRoute(APIRoute):
    """A route class marked for the HTTP loop, as the pick routes' is."""


WEDGE = threading.Event()
"""Holds the thread of a request to ``/api/v1/test/wedge`` until set (at most 20 s)."""


async def wedge_http_loop() -> str:
    WEDGE.wait(20)  # blocks the thread, so the HTTP loop (as a hung library call would)
    return "released"


def add_thread_routes(app: FastAPI) -> None:
    """Two probes answering the name of the thread that ran them: an ordinary route and one
    of a class marked `on_http_loop`; and the wedge, on the HTTP loop."""
    app.add_api_route("/api/v1/test/thread", thread_name, dependencies=PUBLIC)
    apart = APIRouter(route_class=_ApartRoute)
    apart.add_api_route("/api/v1/test/thread-apart", thread_name, dependencies=PUBLIC)
    apart.add_api_route("/api/v1/test/wedge", wedge_http_loop, dependencies=PUBLIC)
    app.include_router(apart)


@contextlib.asynccontextmanager
async def served_apart(
    site_path: Path, *, watch: Watched | None = None
) -> AsyncIterator[tuple[Runtime, int]]:
    """The runtime on this loop, uvicorn on a loop of its own (`serve_apart`, as
    ``floorhand run`` does); yields the runtime and the API port once both are up. With
    ``watch``: the systemd notifications of ``floorhand run`` after every supervision tick
    (``watch.notifier``)."""
    site = load_site(site_path)
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    add_thread_routes(app)
    sock = _listening_socket()
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    )
    if watch is not None:
        rt.supervision.after_tick.append(
            lambda: _notify_systemd(watch.notifier, rt, server, watch.http)
        )
    http = watch.http if watch is not None else None
    task = asyncio.create_task(serve_apart(server, [sock], app, watch=http), name="uvicorn-apart")
    try:
        async with asyncio.timeout(15):
            await rt.started.wait()
            await rt.link.wait_up(10)
        yield rt, sock.getsockname()[1]
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


async def test_a_blocked_ingest_loop_delays_no_http_pick(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    sorter_writes = Written(sorter)
    async with plcs_in_thread(conveyor, sorter) as (ch, sh):
        site = picking_site(tmp_path, mosquitto.port, ch.port, sh.port)
        async with served_apart(site) as (rt, port):
            for plc in rt.plcs.values():
                await plc.link.watch.wait_for(LinkState.UP, 10)
                if isinstance(plc.driver, SorterDriver):
                    await rt.control.call_async(plc.driver.wait_mailbox_known, 10)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                f = Floor(rt, client, mosquitto.port)
                await f.shelf("s0", 20)
                seen: dict[str, Any] = {}
                unblocked = asyncio.Event()

                def block_ingest(events: list[BusEvent]) -> None:
                    """On the first count of shelf sh1: block this (the ingest) loop, and from
                    this very thread send a pick over HTTP and wait for its mailbox write."""
                    if seen or not any(
                        isinstance(e, StockChanged) and e.shelf_id == "sh1" for e in events
                    ):
                        return
                    seen["blocked"] = True
                    try:
                        r = httpx.post(
                            f"http://127.0.0.1:{port}/api/v1/picks",
                            json={
                                "order_id": "HTTP-1",
                                "lines": [{"sku": "K0", "qty": 2}],
                                "pack_station": "PS1",
                            },
                            headers={**auth_headers("floor"), "Idempotency-Key": "http-1"},
                            timeout=BLOCK_LIMIT_S,
                        )
                        seen["status"] = r.status_code
                        seen["body"] = r.text
                    except httpx.HTTPError as exc:
                        seen["status"] = repr(exc)
                    seen["mailbox_write"] = sorter_writes.wait(
                        lambda: sorter_writes.count("mb_strobe") >= 1, BLOCK_LIMIT_S
                    )
                    unblocked.set()

                rt.bus.add_listener(block_ingest)
                assert sorter_writes.count("mb_strobe") == 0
                await f.shelf("s1", 10)  # its StockChanged makes the listener block
                async with asyncio.timeout(3 * BLOCK_LIMIT_S):
                    await unblocked.wait()
                assert seen["status"] == 201, f"the HTTP pick waited for ingest: {seen}"
                assert seen["mailbox_write"], "the pick's first Modbus write waited for ingest"
                # And the API still answers everything else once ingest runs again.
                r = await client.get("/api/v1/orders/" + _order_id(seen), headers=auth_headers())
                assert r.status_code == 200, r.text
                r = await client.get("/api/v1/health")
                assert r.status_code == 200, r.text
    # The stop left nothing behind on either loop (a lifespan cut short logs an error).
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_blocked_ingest_loop_delays_no_plc_stop(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An engineer's STOP reaches the conveyor while the ingest loop is blocked (the safe
    stop must not wait behind an ingest group); its record is journaled once ingest runs."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    conveyor_writes = Written(conveyor)
    async with plcs_in_thread(conveyor, sorter) as (ch, sh):
        site = picking_site(tmp_path, mosquitto.port, ch.port, sh.port)
        async with served_apart(site) as (rt, port):
            for plc in rt.plcs.values():
                await plc.link.watch.wait_for(LinkState.UP, 10)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                f = Floor(rt, client, mosquitto.port)
                await f.shelf("s0", 20)
                commands_before = conveyor_writes.count("command")
                seen: dict[str, Any] = {}
                unblocked = asyncio.Event()
                sub = rt.bus.subscribe("test")

                def block_ingest(events: list[BusEvent]) -> None:
                    """On the first count of shelf sh1: block this (the ingest) loop, and from
                    this very thread send the STOP over HTTP and wait for its write."""
                    if seen or not any(
                        isinstance(e, StockChanged) and e.shelf_id == "sh1" for e in events
                    ):
                        return
                    seen["blocked"] = True
                    seen["stop_write"] = False
                    done = seen["done"] = threading.Event()

                    def stop() -> None:
                        try:
                            r = httpx.post(
                                f"http://127.0.0.1:{port}/api/v1/plcs/conveyor-1/stop",
                                headers=auth_headers("engineer"),
                                timeout=3 * BLOCK_LIMIT_S,
                            )
                            seen["status"] = r.status_code
                        except httpx.HTTPError as exc:
                            seen["status"] = repr(exc)
                        done.set()

                    # The answer waits for the record on this loop: send it from another
                    # thread, and watch the PLC from here.
                    threading.Thread(target=stop, name="stop-client", daemon=True).start()
                    seen["stop_write"] = conveyor_writes.wait(
                        lambda: conveyor_writes.count("command") > commands_before,
                        BLOCK_LIMIT_S,
                    )
                    seen["answered_while_blocked"] = done.is_set()
                    unblocked.set()

                rt.bus.add_listener(block_ingest)
                await f.shelf("s1", 10)  # its StockChanged makes the listener block
                async with asyncio.timeout(3 * BLOCK_LIMIT_S):
                    await unblocked.wait()
                assert seen["stop_write"], f"the STOP waited for ingest: {seen}"
                assert not seen["answered_while_blocked"]  # its record is written on this loop
                assert await asyncio.to_thread(seen["done"].wait, 10)
                assert seen["status"] == 200, seen
                ev = await next_event(sub, lambda e: e["kind"] == "plc_command")
                assert (ev["plc"], ev["command"], ev["result"]) == ("conveyor-1", "stop", "ok")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def _order_id(seen: dict[str, Any]) -> str:
    body: dict[str, Any] = orjson.loads(seen["body"])
    return str(body["order_id"])


async def test_every_kind_of_request_crosses_the_loops(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Served apart, each kind of request answers as on one loop: routes on the home loop
    (their exception handlers there too), routes on the HTTP loop, requests no route takes,
    a streamed body over the limit, the scrape, and the live WebSocket both ways."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=2)
    site.write_text(site.read_text().replace("[api]\n", "[api]\nmax_body_bytes = 4096\n", 1))
    async with (
        served_apart(site) as (rt, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        # Which thread runs a route: the home loop's (this test's, the main thread) unless
        # its route class is marked for the HTTP loop (the ``http`` thread).
        assert (await client.get("/api/v1/test/thread")).json() == threading.main_thread().name
        assert (await client.get("/api/v1/test/thread-apart")).json() == "http"
        assert (await client.get("/api/v1/health")).status_code == 200
        r = await client.get("/api/v1/stock")  # home loop: 401 from its dependency
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["content-type"].startswith("application/problem+json")
        r = await client.get("/api/v1/stock", headers=auth_headers())
        assert r.status_code == 200, r.text
        assert r.json()
        r = await client.get("/api/v1/no-such-thing")  # no route: the HTTP loop
        assert r.status_code == 404, r.text
        r = await client.delete("/api/v1/health")
        assert r.status_code == 405, r.text
        assert "GET" in r.headers["allow"]
        picks = {**auth_headers("floor"), "Idempotency-Key": "k-1"}
        r = await client.post("/api/v1/picks", json={"order_id": "o"}, headers=picks)
        assert r.status_code == 422, r.text  # the HTTP loop's route: validation

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(64):
                yield b" " * 1024

        # Read on the HTTP loop before the hop: counted there, refused past the limit.
        r = await client.post(
            "/api/v1/alerts/K0/ack", content=chunks(), headers=auth_headers("supervisor")
        )
        assert r.status_code == 413, r.text
        r = await client.post("/api/v1/alerts/K0/ack", json={}, headers=auth_headers("supervisor"))
        assert r.status_code == 409, r.text  # under the limit: the route (no active episode)
        text = (await client.get("/metrics", headers=auth_headers())).text
        assert 'floorhand_http_requests_total{method="GET",route="/api/v1/stock",status="401"}' in (
            text
        )
        assert "floorhand_http_body_too_large_total 1.0" in text

        url = f"ws://127.0.0.1:{port}/api/v1/live"
        sub = [Subprotocol("bearer"), Subprotocol(TOKENS["supervisor"])]
        async with connect(url, subprotocols=sub, proxy=None, open_timeout=10) as ws:
            hello, snapshot = await _frame(ws)
            assert (hello["type"], snapshot["type"]) == ("hello", "snapshot")
            await ws.send(orjson.dumps({"type": "ping", "id": 7}))  # client → home loop
            async with asyncio.timeout(15):
                while not any(m["type"] == "pong" and m["id"] == 7 for m in await _frame(ws)):
                    pass
            t0 = rt.clock() - 0.6
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 6, t0))
            async with asyncio.timeout(15):
                while not any(
                    m["type"] == "shelf" and m["shelf"]["units"] == 25 for m in await _frame(ws)
                ):
                    pass
        bad = [Subprotocol("bearer"), Subprotocol("not-a-valid-token-at-all")]
        async with connect(url, subprotocols=bad, proxy=None, open_timeout=10) as ws:
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            assert ws.close_code == 4401
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def _frame(ws: ClientConnection) -> list[dict[str, Any]]:
    async with asyncio.timeout(10):
        body: list[dict[str, Any]] = orjson.loads(await ws.recv())
    return body


WATCHDOG_S = 0.4
"""The watchdog interval asked for here: WATCHDOG=1 is due every 0.2 s (each 0.5 s tick)."""


class Watched:
    """``floorhand run``'s notifier, talking to a socket of the test (the systemd end), and
    the watch of the HTTP loop."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.notifier = Notifier(str(path), WATCHDOG_S)
        self.http = LoopWatch("http")
        self.watchdogs: list[float] = []
        self.arrived = asyncio.Event()

    async def receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            if b"WATCHDOG=1" in data.splitlines():
                self.watchdogs.append(time.monotonic())
                self.arrived.set()

    async def fed(self, count: int, timeout_s: float = 15.0) -> None:
        await wait_for_condition(
            lambda: len(self.watchdogs) >= count,
            timeout_s,
            what=f"{count} WATCHDOG=1",
            wake=self.arrived,
        )


async def test_a_wedged_http_loop_stops_feeding_the_watchdog(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The systemd watchdog is fed from the main loop's supervision tick; a request that
    wedges the HTTP loop (its thread blocked) stops the feeding as a wedged main loop does
    (systemd would kill and restart the controller), and it resumes once the loop runs."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=2)
    watched = Watched(tmp_path / "notify.sock")
    receiver = asyncio.create_task(watched.receive())
    try:
        async with served_apart(site, watch=watched) as (_, port):
            await watched.fed(2)
            wedged = asyncio.create_task(
                asyncio.to_thread(
                    httpx.get, f"http://127.0.0.1:{port}/api/v1/test/wedge", timeout=30
                )
            )
            try:
                await wait_for_condition(
                    lambda: time.monotonic() - watched.watchdogs[-1],
                    15.0,
                    what="a watchdog gap of 3 watchdog intervals while the HTTP loop is wedged",
                    until=lambda silent_s: silent_s > 3 * WATCHDOG_S + 2.5,
                    interval_s=0.1,
                    wake=watched.arrived,
                )
            finally:
                WEDGE.set()
            assert (await wedged).status_code == 200
            await watched.fed(len(watched.watchdogs) + 2)
    finally:
        WEDGE.clear()
        receiver.cancel()
        watched.sock.close()
