"""The stock read model behind /api/v1/stock, /shelves and /zones: answers pinned field for
field on one state, and reads that cost O(result), never a scan of the site per shelf."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.api.app import create_app
from controller.config import SiteConfig, load_site
from controller.domain.calibration import ShelfCalibration
from controller.domain.model import ShelfStatus, StockState
from controller.domain.reorder import AlertState, Episode
from controller.domain.stock import ShelfState
from controller.runtime import Runtime
from controller.services.queries import StockQueries
from tests.sites import api_token_lines, auth_headers


def write_zoned_site(folder: Path, *, zones: int, shelves_per_zone: int) -> Path:
    """Zones ``Z<z>``; one 1-channel scale per shelf; shelf ``sh<z>_<i>`` holds SKU ``K<i>``,
    so every SKU has one shelf in each zone. Shelf ``sh0_0`` has its own reorder policy; SKU
    ``KX`` has no shelf at all."""
    lines = ['[site]\nid = "t"\n', '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n']
    lines += [f'[journal]\npath = "{folder / "journal.sqlite"}"\n', "[history]\nbackend = 'none'\n"]
    lines += ['[api]\nbind = "127.0.0.1:0"\n', *api_token_lines()]
    for z in range(zones):
        lines.append(f'[[zones]]\nid = "Z{z}"\nname = "Zone {z}"\n')
    for i in range(shelves_per_zone):
        lines.append(
            f'[[skus]]\nid = "K{i}"\nname = "Thing {i}"\nreorder_point = 10\n'
            "safety_stock = 3\nmax_stock = 80\n"
        )
    lines.append('[[skus]]\nid = "KX"\nreorder_point = 1\nsafety_stock = 0\nmax_stock = 5\n')
    for z in range(zones):
        for i in range(shelves_per_zone):
            lines.append(f'[[scales]]\nid = "s{z}_{i}"\nzone = "Z{z}"\nmax_weight_g = 10000.0\n')
            lines.append(
                f'[[shelves]]\nid = "sh{z}_{i}"\nzone = "Z{z}"\nlocation = "A{z}-{i:02d}"\n'
                f'scale = "s{z}_{i}"\nsku = "K{i}"\nunit_weight_g = 100.0\ntare_g = 500.0\n'
                "capacity_units = 40\n"
            )
            if (z, i) == (0, 0):
                lines.append("[shelves.reorder]\nreorder_point = 4\nsafety_stock = 1\n")
    path = folder / "site.toml"
    path.write_text("\n".join(lines))
    return path


def _set_state(rt: Runtime, shelf_id: str, status: ShelfStatus, units: int | None) -> None:
    spec = rt.specs[shelf_id]
    weight = None if units is None else spec.tare_g + units * spec.unit_weight_g
    rt.ingest.states[shelf_id] = ShelfState(
        spec, status=status, units=units, weight_g=weight, last_ts_s=1_700_000_000.5
    )


async def _get(app: Any, path: str, role: str = "floor") -> Any:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.get(path, headers=auth_headers(role))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def site(tmp_path: Path) -> SiteConfig:
    return load_site(write_zoned_site(tmp_path, zones=2, shelves_per_zone=2))


def _set_scene(rt: Runtime) -> None:
    """Every kind of shelf and SKU the answers distinguish: counted, settling, stale, never
    seen, calibrated, and an active alert episode in zone Z0 only (shelf:sh0_0)."""
    _set_state(rt, "sh0_0", ShelfStatus.OK, 2)
    _set_state(rt, "sh1_0", ShelfStatus.OK, 30)
    _set_state(rt, "sh0_1", ShelfStatus.SETTLING, 4)
    _set_state(rt, "sh1_1", ShelfStatus.STALE, 7)
    spec = rt.specs["sh1_0"]
    rt.specs["sh1_0"] = dataclasses.replace(spec, tare_g=450.0)
    rt.ingest.calibrations["sh1_0"] = ShelfCalibration(
        "sh1_0", tare_g=450.0, scale_factor=1.1, updated_at_s=1_700_000_001.0, updated_by="eng"
    )
    episode = Episode("ep-1", StockState.CRITICAL, 1_700_000_000.0, 2, 1)
    rt.alerts.alerts["shelf:sh0_0"] = AlertState("shelf:sh0_0", StockState.CRITICAL, 2, episode)


READS = [
    "/api/v1/stock",
    "/api/v1/stock?zone=Z1",
    "/api/v1/stock?zone=nowhere",
    "/api/v1/stock?state=unknown",
    "/api/v1/stock?zone=Z0&state=ok",
    "/api/v1/stock/K0",
    "/api/v1/stock/KX",
    "/api/v1/shelves",
    "/api/v1/shelves?zone=Z1",
    "/api/v1/shelves?status=ok",
    "/api/v1/shelves?zone=Z0&status=settling",
    "/api/v1/zones",
    "/api/v1/zones/Z0/stock",
    "/api/v1/zones/Z1/stock",
]
ANSWERS = Path(__file__).parent.parent / "data" / "read_api_answers.json"
"""The answers of ``READS`` on ``_set_scene``, recorded from the API before the read model
replaced its per-shelf scans (commit d848835): the JSON must not change."""


async def test_stock_shelf_and_zone_answers_are_unchanged(site: SiteConfig) -> None:
    rt = Runtime(site)
    _set_scene(rt)
    app = create_app(site, runtime=rt)
    got = {path: await _get(app, path) for path in READS}
    if os.environ.get("FLOORHAND_RECORD_ANSWERS"):
        ANSWERS.write_text(json.dumps(got, indent=1, sort_keys=False) + "\n")
    assert got == json.loads(ANSWERS.read_text())
    assert [s["id"] for s in got["/api/v1/shelves"]] == ["sh0_0", "sh0_1", "sh1_0", "sh1_1"]
    assert json.dumps(got) == json.dumps(json.loads(ANSWERS.read_text()))  # key order too


async def test_a_404_for_unknown_sku_zone_and_the_shelf_alert_key(site: SiteConfig) -> None:
    app = create_app(site, runtime=Runtime(site))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for path in ("/api/v1/stock/nope", "/api/v1/stock/shelf:sh0_0", "/api/v1/zones/Q/stock"):
            r = await client.get(path, headers=auth_headers("floor"))
            assert r.status_code == 404, path
            assert r.headers["content-type"] == "application/problem+json"
        r = await client.post("/api/v1/shelves/nope/tare", headers=auth_headers("engineer"))
        assert (r.status_code, r.json()["detail"]) == (404, "unknown shelf 'nope'")


class _CountingTuple(tuple[Any, ...]):
    """A site list that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Iterator[Any]:
        type(self).walks += 1
        return super().__iter__()


async def test_stock_and_shelf_reads_never_walk_the_site_per_shelf(tmp_path: Path) -> None:
    """The cause of the O(N²) /shelves and /stock: each shelf's answer looked its site entry up
    by walking every shelf. Once the app is built, a read walks no site list at all."""
    site = load_site(write_zoned_site(tmp_path, zones=4, shelves_per_zone=250))
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    for name in ("shelves", "skus", "zones", "scales"):
        object.__setattr__(site, name, _CountingTuple(getattr(site, name)))
    _CountingTuple.walks = 0
    shelves = await _get(app, "/api/v1/shelves")
    stock = await _get(app, "/api/v1/stock")
    zone = await _get(app, "/api/v1/zones/Z2/stock")
    assert len(shelves) == 1000
    assert sum(len(s["shelves"]) for s in stock) == 1000
    assert len(zone["shelves"]) == 250
    assert _CountingTuple.walks == 0


class _CountingStates(dict[str, ShelfState]):
    """Shelf states that count reads per shelf."""

    def __init__(self, states: dict[str, ShelfState]) -> None:
        super().__init__(states)
        self.reads: Counter[str] = Counter()

    def __getitem__(self, key: str) -> ShelfState:
        self.reads[key] += 1
        return super().__getitem__(key)


def test_a_zone_query_reads_only_the_shelves_of_its_zone(tmp_path: Path) -> None:
    site = load_site(write_zoned_site(tmp_path, zones=4, shelves_per_zone=250))
    rt = Runtime(site)
    states = _CountingStates(rt.ingest.states)
    queries = StockQueries(site, rt.specs, states, rt.ingest.calibrations, rt.alerts)
    assert len(queries.shelves(zone="Z1")) == 250
    assert set(states.reads) == {f"sh1_{i}" for i in range(250)}
    assert max(states.reads.values()) == 1
    states.reads.clear()
    assert [v.sku.id for v in queries.stock(zone="Z3")][:3] == ["K0", "K1", "K2"]
    # Each SKU of the zone: its level (which stops at the first unknown shelf) and its 4 shelf
    # views (one per zone): every shelf of those SKUs is read once or twice, none more.
    assert len(states.reads) == 1000
    assert set(states.reads.values()) <= {1, 2}
    states.reads.clear()
    assert queries.shelves(zone="nowhere") == []
    assert queries.stock(zone="nowhere") == []
    assert not states.reads
    assert [v.spec.shelf_id for v in queries.shelves(status="unknown")][:2] == ["sh0_0", "sh0_1"]
