"""The list reads page and filter (docs/api.md, "Pages"): ``/stock``, ``/shelves``,
``/devices``, ``/scales`` and ``/alerts`` answer at most ``limit`` items (default 1000, at most
5000) after an opaque cursor, filtered by zone, state and text, with ``X-Total-Count``,
``X-Next-Cursor`` and ``Link: <…>; rel="next"``; a bad ``limit``, ``cursor``, state or ``q`` is a
422 problem naming the parameter.

Real uvicorn on 127.0.0.1 with the real runtime and a real mosquitto (``ops_server`` of
test_api_ops.py); states come from readings published by paho, so the state indexes are moved
by the controller's own events.
"""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.test_api_ops import OpsServer, assert_problem, ops_server
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.zoned_sites import write_site_in_zones, zone_of, zone_topic

pytestmark = pytest.mark.timeout(120)

# path -> (the id field of an item, the name of its state filter, a state value, its ids' prefix)
LISTS: dict[str, tuple[str, str, str, str]] = {
    "/api/v1/stock": ("sku", "state", "unknown", "K"),
    "/api/v1/shelves": ("id", "status", "unknown", "sh"),
    "/api/v1/devices": ("id", "state", "unknown", "s"),
    "/api/v1/scales": ("id", "state", "unknown", "s"),
    "/api/v1/alerts": ("key", "state", "unknown", "K"),
}

UNKNOWN_KEY_CURSOR = "c1." + base64.urlsafe_b64encode(b"nothing-here").decode().rstrip("=")
"""A well-formed cursor (list_index.encode_cursor) naming no item."""


def _ids(r: httpx.Response, path: str) -> list[str]:
    assert r.status_code == 200, r.text
    field = LISTS[path][0]
    return [item[field] for item in r.json()]


async def _walk(client: httpx.AsyncClient, url: str) -> tuple[list[str], int]:
    """Every id of the list at ``url``, following ``Link: rel="next"``; and the pages taken."""
    path = url.split("?")[0]
    ids: list[str] = []
    pages = 0
    next_url: str | None = url
    while next_url is not None:
        r = await client.get(next_url)
        ids += _ids(r, path)
        pages += 1
        link = r.headers.get("link")
        cursor = r.headers.get("x-next-cursor")
        if link is None:
            assert cursor is None
            next_url = None
        else:
            assert cursor is not None
            m = re.fullmatch(r'<([^>]+)>; rel="next"', link)
            assert m is not None, link
            next_url = m.group(1)
            assert next_url.startswith(path + "?")
            assert f"cursor={cursor}" in next_url
    return ids, pages


async def test_every_list_read_pages_by_default_and_follows_next(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    n = 1003
    site = write_site_in_zones(tmp_path, zones=2, mqtt_port=mosquitto.port, scales=n)
    async with ops_server(site) as srv, srv.client("engineer") as eng:
        for path, (_, state_name, state, prefix) in LISTS.items():
            everything = [f"{prefix}{i}" for i in range(n)]
            # Default limit 1000, the whole count in X-Total-Count, then the rest after the cursor.
            r = await eng.get(path)
            assert _ids(r, path) == everything[:1000], path
            assert r.headers["x-total-count"] == str(n)
            assert r.headers["x-next-cursor"]
            ids, pages = await _walk(eng, path)
            assert (ids, pages) == (everything, 2), path
            # limit up to 5000; the last page has neither X-Next-Cursor nor Link.
            r = await eng.get(path, params={"limit": 5000})
            assert _ids(r, path) == everything, path
            assert "x-next-cursor" not in r.headers
            assert "link" not in r.headers
            assert r.headers["x-total-count"] == str(n)
            ids, pages = await _walk(eng, f"{path}?limit=300")
            assert (ids, pages) == (everything, 4), path
            # A zone: its items only, in site order, counted; an unknown zone is an empty list.
            z1 = [f"{prefix}{i}" for i in range(n) if zone_of(i, 2) == "Z1"]
            ids, pages = await _walk(eng, f"{path}?zone=Z1&limit=200")
            assert (ids, pages) == (z1, 3), path
            r = await eng.get(path, params={"zone": "Z1", "limit": 7})
            assert r.headers["x-total-count"] == str(len(z1)) == "501"
            r = await eng.get(path, params={"zone": "nowhere"})
            assert (_ids(r, path), r.headers["x-total-count"]) == ([], "0")
            # Text: a case-insensitive substring of the id, across pages.
            hits = [f"{prefix}100", *(f"{prefix}{i}" for i in range(1000, n))]
            ids, pages = await _walk(eng, f"{path}?q={prefix.upper()}100&limit=3")
            assert (ids, pages) == (hits, 2), path
            ids, _ = await _walk(eng, f"{path}?q={prefix}100&zone=Z0")
            assert ids == [h for h in hits if zone_of(int(h[len(prefix) :]), 2) == "Z0"]
            # Nothing reported yet: every item is in the unknown state.
            r = await eng.get(path, params={state_name: state, "zone": "Z0", "limit": 2})
            assert _ids(r, path) == [f"{prefix}0", f"{prefix}2"]
            assert r.headers["x-total-count"] == "502"

            # 422 problems naming the parameter.
            for params, name in (
                ({"limit": 0}, "limit"),
                ({"limit": 5001}, "limit"),
                ({"limit": "many"}, "limit"),
                ({"cursor": "garbage"}, "cursor"),
                ({"cursor": "c1.!!"}, "cursor"),
                ({"cursor": UNKNOWN_KEY_CURSOR}, "cursor"),
                ({state_name: "sideways"}, state_name),
                ({"q": ""}, "q"),
                ({"q": "x" * 101}, "q"),
            ):
                assert_problem(await eng.get(path, params=params), 422, f"query.{name}")
        # A cursor of another list names no item of this one.
        r = await eng.get("/api/v1/stock", params={"limit": 1})
        cursor = r.headers["x-next-cursor"]
        assert_problem(await eng.get("/api/v1/shelves", params={"cursor": cursor}), 422, "cursor")
        # The roles are unchanged: floor reads stock and shelves, not devices, scales, alerts.
        async with srv.client("floor") as floor:
            for path in ("/api/v1/stock?limit=1", "/api/v1/shelves?zone=Z0"):
                assert (await floor.get(path)).status_code == 200
            for path in ("/api/v1/devices?limit=1", "/api/v1/scales", "/api/v1/alerts?q=K"):
                assert_problem(await floor.get(path), 403)


async def _answer(client: httpx.AsyncClient, path: str, **params: Any) -> tuple[list[str], str]:
    r = await client.get(path, params=params)
    return _ids(r, path.split("?")[0]), r.headers["x-total-count"]


async def test_state_filters_follow_the_readings(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The state indexes are built on the first filtered read, then moved by the controller's
    events: a shelf counted, a SKU going critical and back, an alert raised and resolved. A
    cursor taken before a change still gives the rest of the list."""
    site = write_site_in_zones(
        tmp_path, zones=2, mqtt_port=mosquitto.port, scales=6, reporting_interval_s=30
    )
    async with ops_server(site) as srv, srv.client("supervisor") as sup:
        stock, shelves, alerts = "/api/v1/stock", "/api/v1/shelves", "/api/v1/alerts"
        devices = "/api/v1/devices"
        # Built now, while everything is unknown.
        assert await _answer(sup, stock, state="unknown") == ([f"K{i}" for i in range(6)], "6")
        assert await _answer(sup, shelves, status="ok") == ([], "0")
        assert await _answer(sup, alerts, state="critical") == ([], "0")
        assert await _answer(sup, devices, state="ok") == ([], "0")
        page = await sup.get(stock, params={"state": "ok", "limit": 1})
        assert (_ids(page, stock), page.headers["x-total-count"]) == ([], "0")

        sub = srv.rt.bus.subscribe("test", kinds=frozenset({"alert_raised", "alert_resolved"}))
        try:
            await _publish(srv, "s0", 2500.0)  # 20 units: ok
            await _publish(srv, "s1", 800.0)  # 3 units: critical
            await _publish(srv, "s3", 2000.0)  # 15 units: ok
            assert await _answer(sup, stock, state="critical") == (["K1"], "1")
            assert await _answer(sup, stock, state="ok") == (["K0", "K3"], "2")
            assert await _answer(sup, stock, state="ok", zone="Z1") == (["K3"], "1")
            assert await _answer(sup, stock, state="unknown") == (["K2", "K4", "K5"], "3")
            assert await _answer(sup, shelves, status="ok", zone="Z0") == (["sh0"], "1")
            assert await _answer(sup, shelves, status="ok", q="SH3") == (["sh3"], "1")
            assert await _answer(sup, devices, state="ok") == (["s0", "s1", "s3"], "3")
            assert await _answer(sup, devices, state="unknown", zone="Z0") == (["s2", "s4"], "2")
            raised = await _next(sub, "alert_raised")
            assert raised["key"] == "K1"
            assert await _answer(sup, alerts, active="true") == (["K1"], "1")
            assert await _answer(sup, alerts, state="critical", zone="Z1") == (["K1"], "1")
            assert await _answer(sup, alerts, active="true", zone="Z0") == ([], "0")

            # A cursor after K0 in the ok list; K1 recovers before the next page is read.
            first = await sup.get(stock, params={"state": "ok", "limit": 1})
            assert (_ids(first, stock), first.headers["x-total-count"]) == (["K0"], "2")
            cursor = first.headers["x-next-cursor"]
            await _publish(srv, "s1", 3500.0)  # 30 units: ok
            assert await _answer(sup, stock, state="ok", cursor=cursor) == (["K1", "K3"], "3")
            assert await _answer(sup, stock, state="critical") == ([], "0")
            assert (await _next(sub, "alert_resolved"))["key"] == "K1"
            assert await _answer(sup, alerts, active="true") == ([], "0")
            assert await _answer(sup, alerts, active="false", state="ok") == (
                ["K0", "K1", "K3"],
                "3",
            )
        finally:
            sub.close()


async def _publish(srv: OpsServer, device: str, grams: float, n: int = 6) -> None:
    """``n`` readings of ``grams`` from ``device`` on its zone's topic; returns
    once the controller applied them (its cursor reached the last sequence number)."""
    first = srv.seq.get(device, -1) + 1
    srv.ts = max(srv.ts, srv.rt.clock())
    msgs = []
    for i in range(n):
        srv.ts += 0.01
        body = {"device": device, "seq": first + i, "ts": srv.ts, "grams": grams}
        msgs.append((zone_topic(device, 2), orjson.dumps(body)))
    srv.seq[device] = first + n - 1
    await asyncio.to_thread(paho_publish, srv.rt.site.mqtt.port, msgs)
    async with asyncio.timeout(10):
        while (cur := srv.rt.ingest.cursors.get(device)) is None or cur.seq < first + n - 1:
            srv.ingested.clear()
            await srv.ingested.wait()


async def _next(sub: Any, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            body: dict[str, Any] = (await sub.get()).as_dict()
            if body["kind"] == kind:
                return body
