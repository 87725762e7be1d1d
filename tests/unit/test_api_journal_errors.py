"""A change the journal cannot store answers 503 problem+json (the routes catch the ports'
JournalError, which every journal failure derives from, without importing the adapter)."""

from __future__ import annotations

from pathlib import Path

import httpx

from controller.api.app import create_app
from controller.config import load_site
from controller.domain.model import StockState
from controller.domain.reorder import AlertState, Episode
from controller.runtime import Runtime
from tests.sites import auth_headers
from tests.unit.test_read_models import write_zoned_site


async def test_a_change_the_journal_cannot_store_is_a_503_problem(tmp_path: Path) -> None:
    site = load_site(write_zoned_site(tmp_path, zones=1, shelves_per_zone=1))
    rt = Runtime(site)  # not run: the journal is not open, every commit fails
    episode = Episode("ep-1", StockState.CRITICAL, 1_700_000_000.0, 2, 1)
    rt.alerts.alerts["K0"] = AlertState("K0", StockState.CRITICAL, 2, episode)
    app = create_app(site, runtime=rt)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        changes = [
            ("/api/v1/alerts/K0/ack", "supervisor", {"note": "seen"}),
            ("/api/v1/alerts/K0/snooze", "supervisor", {"minutes": 5, "reason": "restock"}),
            ("/api/v1/shelves/sh0_0/calibration", "engineer", {"scale_factor": 1.1}),
        ]
        for path, role, body in changes:
            r = await client.post(path, headers=auth_headers(role), json=body)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert "journal could not store the change" in r.json()["detail"]
    assert rt.alerts.alerts["K0"].episode is not None
    assert rt.alerts.alerts["K0"].episode.acked_by is None  # nothing changed
