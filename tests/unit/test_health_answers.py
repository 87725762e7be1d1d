"""The health, device, alert and PLC answers, pinned field for field on one state: /health,
/ready, /devices, /alerts, /plcs, /scales, the runtime's /metrics lines and the live feed's
snapshot and stats, recorded before SupervisionService and the read models replaced the API's
own reads of the runtime (commit 4dd9882). The JSON must not change."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.api.app import create_app
from controller.config import load_site
from controller.domain.calibration import ShelfCalibration
from controller.domain.model import ShelfStatus, StockState
from controller.domain.reorder import AlertState, Episode
from controller.ports import Cursor
from controller.runtime import Runtime
from tests.sites import auth_headers
from tests.unit.test_read_models import _CountingTuple, _set_state, write_zoned_site

NOW_S = 1_700_000_100.0

READS = [
    "/api/v1/health",
    "/api/v1/ready",
    "/api/v1/devices",
    "/api/v1/alerts",
    "/api/v1/alerts?active=true",
    "/api/v1/alerts?active=false",
    "/api/v1/plcs",
    "/api/v1/scales",
]
ANSWERS = Path(__file__).parent.parent / "data" / "health_api_answers.json"
"""Stem of the recorded answers: ``health_api_answers_<history backend>.json``."""

_SINCE = re.compile(r'"since_s": ?[0-9.e+-]+')


def _site(tmp_path: Path, history: str) -> Any:
    path = write_zoned_site(tmp_path, zones=2, shelves_per_zone=2)
    path.write_text(path.read_text().replace("backend = 'none'", f"backend = '{history}'"))
    with path.open("a") as f:
        f.write('\n[[plcs]]\nid = "conveyor-1"\nkind = "conveyor"\nport = 1\n')
        f.write('\n[[plcs]]\nid = "sorter-1"\nkind = "sorter"\nport = 2\nheartbeat = false\n')
    return load_site(path)


def _set_scene(rt: Runtime) -> None:
    """Started, broker link not up (so: not ready, degraded), one stale shelf, an active alert,
    ingest counters, two devices seen (one with a gap, one offline)."""
    _set_state(rt, "sh0_0", ShelfStatus.OK, 2)
    _set_state(rt, "sh1_1", ShelfStatus.STALE, 7)
    episode = Episode("ep-1", StockState.CRITICAL, 1_700_000_000.0, 2, 1)
    rt.alerts.alerts["shelf:sh0_0"] = AlertState("shelf:sh0_0", StockState.CRITICAL, 2, episode)
    ing = rt.ingest
    ing.messages, ing.readings, ing.commits = 40, 38, 12
    ing.commit_failures, ing.ignored_retained, ing.late_readings = 1, 2, 3
    ing.rejected["bad_json"] += 2
    ing.last_commit_error = "disk I/O error"
    dev = ing.devices["s0_0"]
    dev.last_seen_s, dev.gaps, dev.missing_readings = NOW_S - 5, 1, 4
    ing.devices["s1_1"].last_seen_s = NOW_S - 500
    ing.devices["s1_1"].online = False
    ing.devices["s1_0"].last_seen_s = NOW_S - 500  # stale, not offline
    ing.calibrations["sh1_0"] = ShelfCalibration(
        "sh1_0", scale_factor=1.1, updated_at_s=NOW_S - 9, updated_by="eng"
    )
    ing.cursors["s0_0"] = Cursor(3, 17, NOW_S - 5, applied=15)
    rt.started.set()
    rt.supervision.started_at_s = NOW_S - 60


async def _answers(rt: Runtime, site: Any) -> dict[str, Any]:
    app = create_app(site, runtime=rt)
    got: dict[str, Any] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for path in READS:
            r = await client.get(path, headers=auth_headers("engineer"))
            got[path] = {"status": r.status_code, "body": _SINCE.sub('"since_s": 0', r.text)}
        r = await client.get("/metrics", headers=auth_headers("engineer"))
        lines = [
            ln
            for ln in r.text.splitlines()
            if ln.startswith("floorhand_")
            # Not the scene's: the HTTP and pick figures, the process's main-loop pauses
            # (`controller.control.Precedence`) and the control thread's scheduling (both
            # added after the recording).
            and not ln.startswith(
                (
                    "floorhand_http",
                    "floorhand_pick",
                    "floorhand_build_info",
                    "floorhand_main_loop",
                    "floorhand_control_loop",
                )
            )
        ]
        got["/metrics"] = {"status": r.status_code, "lines": lines}
    hub = app.state.live
    snap = hub.snapshot()
    snap["t"] = 0  # the hub's own clock
    for plc in snap["plcs"]:
        plc["since_s"] = 0
    got["live.snapshot"] = snap
    got["live.stats"] = hub.stats()
    return got


@pytest.mark.parametrize("history", ["none", "sqlite"])
async def test_health_device_alert_and_plc_answers_are_unchanged(
    tmp_path: Path, history: str
) -> None:
    site = _site(tmp_path, history)
    rt = Runtime(site, clock=lambda: NOW_S)
    _set_scene(rt)
    got = await _answers(rt, site)
    path = ANSWERS.with_name(f"{ANSWERS.stem}_{history}.json")
    if os.environ.get("FLOORHAND_RECORD_ANSWERS"):
        path.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(path.read_text())
    assert json.loads(got["/api/v1/health"]["body"])["status"] == "degraded"
    assert got["/api/v1/ready"]["status"] == 503


async def test_device_scale_and_alert_reads_never_walk_the_site(tmp_path: Path) -> None:
    """Which scale is in which zone, its staleness bound and its channels' shelves are indexed
    once when the app is built: a read walks no site list (it walked the scales, and for
    /scales every shelf spec, on each request)."""
    site = load_site(write_zoned_site(tmp_path, zones=4, shelves_per_zone=50))
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    for name in ("shelves", "skus", "zones", "scales"):
        object.__setattr__(site, name, _CountingTuple(getattr(site, name)))
    _CountingTuple.walks = 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for path, n in (("/api/v1/devices", 200), ("/api/v1/scales", 200), ("/api/v1/alerts", 52)):
            r = await client.get(path, headers=auth_headers("engineer"))
            assert r.status_code == 200
            assert len(r.json()) == n, path  # 50 SKUs, KX, the shelf with its own policy
    assert _CountingTuple.walks == 0
