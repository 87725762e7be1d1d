"""The live WebSocket (/api/v1/live) on a real uvicorn over loopback, real WebSocket clients.

The controller app runs in this process (so a test can read the hub's counters and put marker
events on the runtime bus); the broker is a real mosquitto and the readings of the event test go
through it like any scale's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

from controller.api import live as live_module
from controller.api.app import create_app
from controller.api.auth import Principal, Role
from controller.api.live import (
    CLOSE_BAD_SCOPE,
    CLOSE_FORBIDDEN_ORIGIN,
    CLOSE_UNAUTHORIZED,
    LiveClient,
    LiveHub,
    Message,
    origin_allowed,
)
from controller.config import load_site
from controller.domain.events import Event
from controller.runtime import Runtime
from tests.integration.test_sensing_e2e import readings
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import grams, topic, write_small_site

TOKEN = "live-test-token-0123456789abcdef"
FLOOR_TOKEN = "live-floor-token-0123456789abcdef"


class LiveServer:
    """The controller app under uvicorn on a listening socket we own (its buffer sizes too)."""

    def __init__(self, rt: Runtime, app: Any, sock: socket.socket) -> None:
        self.rt = rt
        self.app = app
        self.sock = sock
        self.port: int = sock.getsockname()[1]

    @property
    def hub(self) -> LiveHub:
        hub: LiveHub = self.app.state.live
        return hub

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/live"

    def connect(self, **kwargs: Any) -> Any:
        kwargs.setdefault("proxy", None)
        kwargs.setdefault("max_size", None)
        kwargs.setdefault("open_timeout", 10)
        return connect(kwargs.pop("url", self.url), **kwargs)


@contextlib.asynccontextmanager
async def live_server(
    tmp_path: Path,
    broker: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
    *,
    send_buffer: int | None = None,
    extra_api: str = "",
    scales: int = 2,
    zones: int = 1,
    reporting_interval_s: float = 1.0,
) -> AsyncIterator[LiveServer]:
    site_path = write_small_site(
        tmp_path,
        mqtt_port=broker.port,
        scales=scales,
        zones=zones,
        reporting_interval_s=reporting_interval_s,
    )
    if extra_api:
        text = site_path.read_text().replace("[api]\n", "[api]\n" + extra_api + "\n", 1)
        site_path.write_text(text)
    monkeypatch.setenv("FLOORHAND_TOKEN_VIEWER", f"supervisor:{TOKEN}")
    monkeypatch.setenv("FLOORHAND_TOKEN_PICKER", f"floor:{FLOOR_TOKEN}")
    site = load_site(site_path)
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        # Accepted connections inherit it: a client that stops reading fills it quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn-under-test")
    try:
        async with asyncio.timeout(15):
            await rt.started.wait()
        yield LiveServer(rt, app, sock)
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


async def recv_messages(ws: ClientConnection, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The messages of the next frame (each frame is a JSON array of messages)."""
    async with asyncio.timeout(timeout_s):
        frame = await ws.recv()
    body = orjson.loads(frame)
    assert isinstance(body, list), body
    return body


async def wait_message(ws: ClientConnection, pred: Any, timeout_s: float = 15.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            for msg in await recv_messages(ws, timeout_s):
                if pred(msg):
                    return msg


async def close_code(ws: ClientConnection, timeout_s: float = 10.0) -> tuple[int | None, str]:
    """Read until the server closes; the close code and reason it sent."""
    async with asyncio.timeout(timeout_s):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


def bearer(token: str) -> list[Subprotocol]:
    return [Subprotocol("bearer"), Subprotocol(token)]


async def test_token_is_required_and_checked(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with live_server(tmp_path, mosquitto, monkeypatch) as srv:
        async with srv.connect() as ws:
            assert await close_code(ws) == (CLOSE_UNAUTHORIZED, "missing or invalid bearer token")
        async with srv.connect(subprotocols=bearer("not-a-valid-token-at-all")) as ws:
            assert ws.subprotocol == "bearer"
            assert (await close_code(ws))[0] == CLOSE_UNAUTHORIZED
        async with srv.connect(url=srv.url + "?token=wrong-token-0123456789") as ws:
            assert (await close_code(ws))[0] == CLOSE_UNAUTHORIZED
        assert srv.hub.refused["token"] == 3
        assert srv.hub.connections == 0

        # Any role may read: a floor token by subprotocol, a supervisor token by query string
        # and by Authorization header.
        for kwargs in (
            {"subprotocols": bearer(FLOOR_TOKEN)},
            {"url": srv.url + f"?token={TOKEN}"},
            {"additional_headers": {"Authorization": f"Bearer {TOKEN}"}},
        ):
            async with srv.connect(**kwargs) as ws:
                hello, snapshot = await recv_messages(ws)
                assert hello["type"] == "hello"
                assert snapshot["type"] == "snapshot"
                assert [s["id"] for s in snapshot["shelves"]] == ["sh0", "sh1"]
                assert {s["sku"] for s in snapshot["skus"]} == {"K0", "K1"}
        assert srv.hub.connections == 3
        assert hello["principal"] == {"name": "viewer", "role": "supervisor"}


async def test_foreign_origin_is_refused(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = 'allowed_origins = ["https://dash.example:8443"]'
    async with live_server(tmp_path, mosquitto, monkeypatch, extra_api=allowed) as srv:
        async with srv.connect(
            subprotocols=bearer(TOKEN), origin=Origin("http://evil.example")
        ) as ws:
            assert await close_code(ws) == (CLOSE_FORBIDDEN_ORIGIN, "origin not allowed")
        # Same host and port as the page that was served: allowed; so is the configured one.
        for origin in (f"http://127.0.0.1:{srv.port}", "https://dash.example:8443"):
            async with srv.connect(subprotocols=bearer(TOKEN), origin=Origin(origin)) as ws:
                hello, _ = await recv_messages(ws)
                assert hello["type"] == "hello"
        # The same host on another port is another origin.
        async with srv.connect(
            subprotocols=bearer(TOKEN), origin=Origin(f"http://127.0.0.1:{srv.port + 1}")
        ) as ws:
            assert (await close_code(ws))[0] == CLOSE_FORBIDDEN_ORIGIN
        assert srv.hub.refused == {"origin": 2, "token": 0}


async def test_stock_changes_and_alerts_arrive(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with live_server(tmp_path, mosquitto, monkeypatch) as srv:
        await srv.rt.link.wait_up(10)
        async with srv.connect(subprotocols=bearer(TOKEN)) as ws:
            _, snapshot = await recv_messages(ws)
            sh0 = next(s for s in snapshot["shelves"] if s["id"] == "sh0")
            assert sh0["status"] == "unknown"
            assert sh0["units"] is None
            t0 = srv.rt.clock()
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 6, t0))
            msg = await wait_message(
                ws, lambda m: m["type"] == "shelf" and m["shelf"]["units"] == 25
            )
            assert msg["shelf"]["id"] == "sh0"
            assert msg["shelf"]["sku"] == {"sku": "K0", "level": 25, "state": "ok"}
            # The shelf empties: the shelf update says OUT and the alert follows.
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 6, 0, 8, t0 + 1))
            msg = await wait_message(
                ws, lambda m: m["type"] == "shelf" and m["shelf"]["units"] == 0
            )
            assert msg["shelf"]["sku"]["state"] == "out"
            alert = await wait_message(ws, lambda m: m["type"] == "alert")
            assert alert["event"]["kind"] == "alert_raised"
            assert alert["event"]["key"] == "K0"
            assert alert["alert"]["active"] is True
            assert alert["alert"]["severity"] == "out"
            # A stats message comes every second: the page's heartbeat and ingest counter.
            stats = await wait_message(ws, lambda m: m["type"] == "stats")
            assert stats["readings"] >= 14
            assert stats["mqtt"] == "up"
            # Bad input from the client is answered and counted; the connection stays.
            await ws.send("not json")
            err = await wait_message(ws, lambda m: m["type"] == "error")
            assert "type" in err["detail"] or "JSON" in err["detail"] or err["detail"]
            assert srv.hub.bad_client_messages == 1
            await ws.send(orjson.dumps({"type": "ping", "id": 7}).decode())
            pong = await wait_message(ws, lambda m: m["type"] == "pong")
            assert pong["id"] == 7
            await ws.send(orjson.dumps({"type": "resync"}).decode())
            snap = await wait_message(ws, lambda m: m["type"] == "snapshot")
            assert next(s for s in snap["shelves"] if s["id"] == "sh0")["units"] == 0
            assert [a["key"] for a in snap["alerts"]] == ["K0"]


async def test_slow_client_drops_oldest_and_others_get_everything(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops reading fills its socket, then its queue: its oldest messages are
    dropped and counted; the publisher never waits and the other client gets every event."""
    n = 3000
    async with live_server(tmp_path, mosquitto, monkeypatch, send_buffer=16_384) as srv:
        slow_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
        slow_sock.connect(("127.0.0.1", srv.port))
        srv.hub.queue_size = 50  # the slow client's queue
        async with srv.connect(subprotocols=bearer(TOKEN), sock=slow_sock, max_queue=1) as slow:
            await recv_messages(slow)  # hello + snapshot; then it stops reading
            srv.hub.queue_size = 10 * n  # the fast client's
            async with srv.connect(subprotocols=bearer(TOKEN)) as fast:
                await recv_messages(fast)
                await _fan_out(srv, slow, fast, n)


@dataclass(frozen=True, slots=True)
class Marker(Event):
    """A test event; its frames carry ``{"kind": "test_marker", "ts", "seq", "pad"}``."""

    kind: ClassVar[str] = "test_marker"
    WIRE_NAMES: ClassVar[dict[str, str]] = {"ts_s": "ts"}
    ts_s: float
    seq: int
    pad: str


def _markers(frame: list[dict[str, Any]], seqs: list[int], notices: list[dict[str, Any]]) -> None:
    for m in frame:
        if m["type"] == "event" and m["event"]["kind"] == "test_marker":
            seqs.append(m["event"]["seq"])
        elif m["type"] == "dropped":
            notices.append(m)


async def _fan_out(srv: LiveServer, slow: ClientConnection, fast: ClientConnection, n: int) -> None:
    pad = "x" * 1000
    fast_seqs: list[int] = []
    fast_dropped: list[dict[str, Any]] = []

    async def read_fast() -> None:
        while len(fast_seqs) < n and not fast_dropped:
            _markers(await recv_messages(fast), fast_seqs, fast_dropped)

    reader = asyncio.create_task(read_fast())
    for first in range(0, n, 100):
        srv.rt.bus.publish([Marker(0.0, i, pad) for i in range(first, first + 100)])
        await asyncio.sleep(0)  # let the senders run between groups, as between ingest reads
    async with asyncio.timeout(30):
        await reader
    assert fast_dropped == []
    assert fast_seqs == list(range(n))

    slow_client = srv.hub.clients[1]
    assert slow_client.dropped > 0
    assert srv.hub.dropped_total == slow_client.dropped

    # Now the slow client reads: a `dropped` notice, the newest events in order, and finally
    # the last event; what it got plus what it was told it lost is everything.
    got: list[int] = []
    notices: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while not got or got[-1] != n - 1:
            _markers(await recv_messages(slow), got, notices)
    assert got == sorted(got)
    assert notices, "the slow client was not told about the drops"
    assert sum(m["count"] for m in notices) == slow_client.dropped
    assert notices[-1]["total"] == slow_client.dropped
    # Nothing is lost without being counted. (The count can exceed the markers lost by the
    # odd non-marker message — a periodic `stats` frame — dropped from the same queue.)
    assert len(got) + slow_client.dropped >= n
    assert len(got) <= n


def zone_readings(device: str, zone: str, first_seq: int, units: int, n: int, t0: float) -> Any:
    """Steady readings of a scale of zone ``zone`` (``readings`` is for the one-zone site)."""
    return [
        (topic(device, zone), orjson.dumps({"device": device, "seq": first_seq + i,
                                            "ts": t0 + i * 0.1, "grams": grams(units)}))
        for i in range(n)
    ]  # fmt: skip


def overview_of(zones: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{zone: {state: count}}`` without the zero counts."""
    return {z["zone"]: {k: v for k, v in z["states"].items() if v} for z in zones}


async def test_zone_scope_snapshot_shelves_and_overview(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client of zone Z1 gets Z1's shelves in its snapshot and Z1's shelf messages only, the
    overview of every zone as it changes; ``subscribe`` moves it to Z0 (a new snapshot); an
    unknown zone is refused with 4400 or an ``error`` message."""
    async with live_server(
        tmp_path, mosquitto, monkeypatch, scales=4, zones=2, reporting_interval_s=60.0
    ) as srv:
        await srv.rt.link.wait_up(10)
        async with srv.connect(url=srv.url + "?zone=Z1", subprotocols=bearer(TOKEN)) as ws:
            hello, snapshot = await recv_messages(ws)
            assert hello["scope"]["kind"] == "zone"
            assert hello["scope"]["zone"] == "Z1"
            assert hello["scope"]["default"] == "site"  # 4 shelves: the whole site by default
            assert hello["scope"]["site_scope_max_shelves"] == 5_000  # documented default
            assert snapshot["scope"] == hello["scope"]
            assert [s["id"] for s in snapshot["shelves"]] == ["sh2", "sh3"]
            assert [k["sku"] for k in snapshot["skus"]] == ["K2", "K3"]
            assert overview_of(snapshot["overview"]) == {
                "Z0": {"unknown": 2},
                "Z1": {"unknown": 2},
            }
            t0 = srv.rt.clock()
            # sh0 (Z0) first, then sh2 (Z1): only sh2 arrives; the overview counts both.
            await asyncio.to_thread(
                paho_publish, mosquitto.port, zone_readings("s0", "Z0", 0, 0, 6, t0)
            )
            await asyncio.to_thread(
                paho_publish, mosquitto.port, zone_readings("s2", "Z1", 0, 25, 6, t0)
            )
            seen: list[dict[str, Any]] = []
            want = {"Z0": {"out": 1, "unknown": 1}, "Z1": {"ok": 1, "unknown": 1}}

            def record(m: dict[str, Any]) -> bool:
                seen.append(m)
                return m["type"] == "overview" and overview_of(m["zones"]) == want

            overview = await wait_message(ws, record)
            assert overview["version"] >= 1
            # The alert of K0 (zone Z0) reaches every client: the feed is site-wide.
            alerts = [m["alert"]["key"] for m in seen if m["type"] == "alert"]
            if not alerts:
                alert = await wait_message(ws, lambda m: m["type"] == "alert")
                alerts.append(alert["alert"]["key"])
            assert alerts[0] == "K0"
            shelves = [
                (m["shelf"]["id"], m["shelf"]["units"]) for m in seen if m["type"] == "shelf"
            ]
            assert {sid for sid, _ in shelves} == {"sh2"}
            assert shelves[-1] == ("sh2", 25)

            await ws.send(orjson.dumps({"type": "subscribe", "zone": "Z0"}).decode())
            snap = await wait_message(ws, lambda m: m["type"] == "snapshot")
            assert snap["scope"]["zone"] == "Z0"
            assert [(s["id"], s["units"]) for s in snap["shelves"]] == [("sh0", 0), ("sh1", None)]
            assert [a["key"] for a in snap["alerts"]] == ["K0"]
            await ws.send(orjson.dumps({"type": "subscribe", "zone": "nope"}).decode())
            err = await wait_message(ws, lambda m: m["type"] == "error")
            assert "unknown zone 'nope'" in err["detail"]

        async with srv.connect(url=srv.url + "?zone=nope", subprotocols=bearer(TOKEN)) as ws:
            code, reason = await close_code(ws)
            assert code == CLOSE_BAD_SCOPE
            assert "unknown zone" in reason


async def test_large_site_defaults_to_the_overview(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above ``SITE_SCOPE_MAX_SHELVES`` a client that names no scope gets the overview alone (no
    shelves, no shelf messages); ``?scope=site`` still gets everything."""
    monkeypatch.setattr(live_module, "SITE_SCOPE_MAX_SHELVES", 3)
    async with live_server(tmp_path, mosquitto, monkeypatch, scales=4, zones=2) as srv:
        async with srv.connect(subprotocols=bearer(TOKEN)) as ws:
            hello, snapshot = await recv_messages(ws)
            assert hello["scope"]["kind"] == "overview"
            assert hello["scope"]["default"] == "overview"
            assert snapshot["shelves"] == []
            assert snapshot["skus"] == []
            assert [z["shelves"] for z in snapshot["overview"]] == [2, 2]
        async with srv.connect(url=srv.url + "?scope=site", subprotocols=bearer(TOKEN)) as ws:
            hello, snapshot = await recv_messages(ws)
            assert hello["scope"]["kind"] == "site"
            assert len(snapshot["shelves"]) == 4


async def test_joining_clients_share_one_snapshot_and_miss_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 clients connecting at once cost one snapshot build per scope; a client that joins
    after a change gets the shared (older) snapshot and then the change, so its picture is
    current."""
    monkeypatch.setattr(live_module, "SNAPSHOT_REUSE_S", 60.0)
    # No shelf goes STALE while the overview is compared.
    async with live_server(tmp_path, mosquitto, monkeypatch, reporting_interval_s=60.0) as srv:
        await srv.rt.link.wait_up(10)
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(srv.connect(subprotocols=bearer(TOKEN)))
            await recv_messages(first)
            builds = srv.hub.snapshot_builds
            conns = await asyncio.gather(
                *(stack.enter_async_context(srv.connect(subprotocols=bearer(TOKEN)))
                  for _ in range(30))
            )  # fmt: skip
            for ws in conns:
                _, snapshot = await recv_messages(ws)
                assert len(snapshot["shelves"]) == 2
            assert srv.hub.snapshot_builds == builds  # the first client's snapshot, shared
            t0 = srv.rt.clock()
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 6, t0))
            want = {"Z": {"ok": 1, "unknown": 1}}
            seen: list[dict[str, Any]] = []

            def record(m: dict[str, Any]) -> bool:
                seen.append(m)
                return m["type"] == "overview" and overview_of(m["zones"]) == want

            # The hub's overview has the change before the late client joins.
            await wait_message(first, record)
            assert ("sh0", 25) in [(m["shelf"]["id"], m["shelf"]["units"]) for m in seen
                                   if m["type"] == "shelf"]  # fmt: skip
            late = await stack.enter_async_context(srv.connect(subprotocols=bearer(TOKEN)))
            _, snapshot = await recv_messages(late)
            assert srv.hub.snapshot_builds == builds
            assert next(s for s in snapshot["shelves"] if s["id"] == "sh0")["units"] is None
            msg = await wait_message(late, lambda m: m["type"] == "shelf")
            assert (msg["shelf"]["id"], msg["shelf"]["units"]) == ("sh0", 25)
            # The shared snapshot's overview is as old as the snapshot: the current one follows.
            assert overview_of(snapshot["overview"]) == {"Z": {"unknown": 2}}
            ov = await wait_message(late, lambda m: m["type"] == "overview", timeout_s=5)
            assert overview_of(ov["zones"]) == want


async def test_shared_snapshots_expire_and_the_log_is_bounded(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached snapshot serves joins for ``SNAPSHOT_REUSE_S`` (1 s by default), then the next
    join builds a new one; state messages beyond ``SNAPSHOT_LOG_MAX`` (20,000) after it drop the
    cache, so the next join builds afresh and gets no replay."""
    assert (live_module.SNAPSHOT_REUSE_S, live_module.SNAPSHOT_LOG_MAX) == (1.0, 20_000)
    async with live_server(tmp_path, mosquitto, monkeypatch) as srv:
        await srv.rt.link.wait_up(10)
        hub = srv.hub
        async with srv.connect(subprotocols=bearer(TOKEN)) as first:
            await recv_messages(first)
            builds = hub.snapshot_builds
            monkeypatch.setattr(live_module, "SNAPSHOT_REUSE_S", 0.0)
            async with srv.connect(subprotocols=bearer(TOKEN)) as ws:
                await recv_messages(ws)
            assert hub.snapshot_builds == builds + 1  # expired: built again
            monkeypatch.setattr(live_module, "SNAPSHOT_REUSE_S", 60.0)
            monkeypatch.setattr(live_module, "SNAPSHOT_LOG_MAX", 1)
            async with srv.connect(subprotocols=bearer(TOKEN)) as ws:
                await recv_messages(ws)
            assert hub.snapshot_builds == builds + 1  # in the window again: shared
            t0 = srv.rt.clock()
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 6, t0))
            await wait_message(first, lambda m: m["type"] == "shelf" and m["shelf"]["units"] == 25)
            async with srv.connect(subprotocols=bearer(TOKEN)) as ws:
                _, snapshot = await recv_messages(ws)
            assert hub.snapshot_builds == builds + 2  # the log overflowed: the cache was dropped
            assert next(s for s in snapshot["shelves"] if s["id"] == "sh0")["units"] == 25


async def test_dashboard_assets_are_served_safely(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        live_server(tmp_path, mosquitto, monkeypatch) as srv,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}") as http,
    ):
        r = await http.get("/")
        assert r.status_code == 307
        assert r.headers["location"] == "/dashboard/"
        r = await http.get("/dashboard/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert '<script type="module" src="js/main.js">' in r.text
        r = await http.get("/dashboard/js/main.js")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/javascript")
        for bad in ("/dashboard/../pyproject.toml", "/dashboard/%2e%2e/pyproject.toml",
                    "/dashboard/js/nope.js", "/dashboard/.hidden"):  # fmt: skip
            r = await http.get(bad)
            assert r.status_code == 404, bad
        # The assets are not part of the API description.
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/dashboard")]


def test_origin_rules() -> None:
    assert origin_allowed(None, "127.0.0.1:8080", ())  # not a browser
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", ())
    assert origin_allowed("HTTP://Controller.Local:8080/", "controller.local:8080", ())
    assert origin_allowed("https://ctl.example", "ctl.example:443", ())
    assert not origin_allowed("http://127.0.0.1:8081", "127.0.0.1:8080", ())
    assert not origin_allowed("https://127.0.0.1:8080", "127.0.0.1:8080:1", ())
    assert not origin_allowed("null", "127.0.0.1:8080", ())
    assert not origin_allowed("http://evil.example", "127.0.0.1:8080", ())
    assert origin_allowed("http://wall.example:3000", "x:1", ("http://wall.example:3000",))
    assert origin_allowed("http://anything.example", "x:1", ("*",))


class _Hub:
    dropped_total = 0


def test_client_queue_drops_oldest_and_coalesces_shelves() -> None:
    hub: Any = _Hub()
    principal = Principal("t", Role.FLOOR)
    c = LiveClient(hub, 1, principal, maxsize=3)
    shelf_a1 = Message({"n": 1}, key="shelf:a")
    c.offer(shelf_a1)
    c.offer(Message({"n": 2}))
    shelf_a3 = Message({"n": 3}, key="shelf:a")
    c.offer(shelf_a3)  # replaces the queued shelf:a in place
    assert [m.body["n"] for m in c.take(10)] == [3, 2]
    assert c.coalesced == 1
    for n in range(4, 9):
        c.offer(Message({"n": n}, key="shelf:b" if n == 4 else None))
    # 5 offered into 3 places: the two oldest (4 = shelf:b, 5) are gone, counted.
    assert c.dropped == 2
    assert hub.dropped_total == 2
    assert c.unreported == 2
    c.offer(Message({"n": 9}, key="shelf:b"))  # shelf:b was dropped: a new entry, not a merge
    assert [m.body["n"] for m in c.take(10)] == [7, 8, 9]
    assert c.pending == {}
