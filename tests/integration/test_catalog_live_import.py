"""A big catalogue import into a running controller (docs/catalogue.md, "A big import on a
running controller"): ``floorhand run`` as a child process with a real mosquitto, readings
published by paho throughout, a changed catalogue of thousands of SKUs sent with ``PUT
/api/v1/catalog`` and with ``floorhand catalog import --url``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.catalog_files import catalogue_site, changed_catalogue
from tests.controller_proc import ROOT, SHARED_SSL, ControllerProcess
from tests.loadgen import AckedPublisher
from tests.mosquitto import MosquittoBroker
from tests.sites import TOKENS, auth_headers
from tests.waiting import wait_for_condition

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

SKUS = 5_000
"""Big enough that reading, validating and comparing it takes a good part of a second here,
small enough for CI."""


async def _site(tmp_path: Path, mosquitto: MosquittoBroker) -> tuple[Path, Path]:
    site = catalogue_site(tmp_path, mosquitto.port, SKUS, "floorhand-test")
    csv = tmp_path / "catalogue.csv"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controller", "catalog", "import", str(csv), "--site", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return site, csv


async def _applied(client: httpx.AsyncClient) -> int:
    """Readings the controller applied from scale s0 (the first page of /devices)."""
    r = await client.get("/api/v1/devices", params={"limit": 1})
    r.raise_for_status()
    device = r.json()[0]
    assert device["id"] == "s0"
    return int(device["applied"])


async def _version(client: httpx.AsyncClient) -> int:
    """The catalogue version in force."""
    r = await client.get("/api/v1/catalog/versions")
    r.raise_for_status()
    return int(r.headers["x-catalog-version"])


async def test_readings_are_applied_while_a_big_import_is_in_flight(
    tmp_path: Path, mosquitto: MosquittoBroker, controllers: list[ControllerProcess]
) -> None:
    site, csv = await _site(tmp_path, mosquitto)
    body = changed_catalogue(csv, SKUS)
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start(ready_timeout_s=60.0)
    pub = AckedPublisher(mosquitto.port, ["s0"], rate=200.0, client_id="live-import-load")
    pub.start()
    try:
        async with httpx.AsyncClient(
            base_url=ctl.base, headers=auth_headers("engineer"), timeout=120.0, verify=SHARED_SSL
        ) as client:
            await wait_for_condition(
                lambda: _applied(client),
                20.0,
                what="readings of s0 applied before the import",
                until=lambda n: n > 0,
                interval_s=0.05,
                context=ctl.tail,
            )
            at_start = await _applied(client)
            put = asyncio.create_task(
                client.put("/api/v1/catalog", content=body, headers={"Content-Type": "text/csv"})
            )
            # Polled until the PUT answers: readings applied before the new catalogue is in
            # force (the version read after the count is still 1), i.e. while the body was
            # read, validated and compared, not after a hold ended.
            before_change: list[int] = []
            while not put.done():
                n = await _applied(client)
                if await _version(client) == 1:
                    before_change.append(n)
                await asyncio.wait({put}, timeout=0.02)  # the next poll, or the answer
            r = await put
            assert r.status_code == 200, r.text
            counts = r.json()["counts"]
            assert counts == {"add": 3 * (SKUS // 100), "remove": 0, "change": SKUS}
            assert await _version(client) == 2
            assert max(before_change, default=at_start) > at_start, (
                f"no reading applied while the import was read and checked "
                f"({len(before_change)} polls, applied stayed {at_start}): the main loop was "
                "held from the request to the change"
            )
            after = await _applied(client)
            await wait_for_condition(
                lambda: _applied(client),
                20.0,
                what="readings of s0 applied after the import",
                until=lambda n: n > after,
                interval_s=0.05,
                context=ctl.tail,
            )
            stock = (await client.get("/api/v1/stock/K1")).json()
            assert stock["reorder_point"] == 11
    finally:
        await asyncio.to_thread(pub.stop)


async def test_cli_import_of_thousands_of_rows_into_a_running_controller(
    tmp_path: Path, mosquitto: MosquittoBroker, controllers: list[ControllerProcess]
) -> None:
    site, csv = await _site(tmp_path, mosquitto)
    changed = tmp_path / "changed.csv"
    changed.write_bytes(changed_catalogue(csv, SKUS))
    token = tmp_path / "token"
    token.write_text(TOKENS["engineer"] + "\n")
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start(ready_timeout_s=60.0)
    args = [sys.executable, "-m", "controller", "catalog", "import", str(changed)]
    args += ["--url", ctl.base, "--token-file", str(token)]
    done = await asyncio.to_thread(
        subprocess.run, args, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    size = changed.stat().st_size
    assert f"catalog: sending {size} bytes to {ctl.base}/api/v1/catalog" in done.stderr
    assert f"catalog: sent {size}/{size} bytes" in done.stderr
    assert "catalog: uploaded; the controller validates and applies it" in done.stderr
    adds = 3 * (SKUS // 100)
    assert f"catalogue version 1 -> 2: {adds} added, 0 removed, {SKUS} changed" in done.stdout
    assert f"+ shelf sh{SKUS}" in done.stdout
    async with httpx.AsyncClient(
        base_url=ctl.base, headers=auth_headers("supervisor"), timeout=30.0, verify=SHARED_SSL
    ) as client:
        versions = (await client.get("/api/v1/catalog/versions")).json()
        assert versions["version"] == 2
        assert versions["versions"][-1]["changed"] == SKUS
    # An invalid row: the controller's 422 names it by the file's line, exit 2.
    bad = changed.read_text().replace("sku,K7,11,", "sku,K7,x,", 1)
    changed.write_text(bad)
    done = await asyncio.to_thread(
        subprocess.run, args, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "422" in done.stderr
    assert f"{changed}:9: sku K7 column reorder_point" in done.stderr
