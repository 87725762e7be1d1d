"""``floorhand catalog import`` as a real process into a site's journal, then ``floorhand run``
against a real mosquitto serves the imported shelves (docs/catalogue.md)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from controller.adapters import catalog_store
from tests.controller_proc import ROOT, ControllerProcess
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import grams, topic, write_small_site
from tests.waiting import wait_for_condition


def floorhand(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


async def test_an_imported_catalogue_is_what_the_controller_serves(
    tmp_path: Path, mosquitto: MosquittoBroker, controllers: list[ControllerProcess]
) -> None:
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=3, catalogue_csv=True)
    csv = tmp_path / "catalogue.csv"

    dry = floorhand("catalog", "import", csv, "--site", site, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ shelf sh2" in dry.stdout
    assert "dry run: catalogue version 0 -> 1: 9 added, 0 removed, 0 changed" in dry.stdout
    assert not (tmp_path / "journal.sqlite").exists()  # a dry run writes nothing

    done = floorhand("catalog", "import", csv, "--site", site)
    assert done.returncode == 0, done.stderr
    assert "catalogue version 1" in done.stdout
    assert "9 added" in done.stdout

    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    shelves = await ctl.get("/api/v1/shelves")
    assert sorted(s["id"] for s in shelves) == ["sh0", "sh1", "sh2"]

    # The imported shelves count: a reading of scale s1 becomes shelf sh1's units.
    t0 = time.time()
    readings = [
        (
            topic("s1"),
            orjson.dumps({"device": "s1", "seq": i, "ts": t0 + i * 0.1, "grams": grams(7)}),
        )
        for i in range(10)
    ]
    await asyncio.to_thread(paho_publish, mosquitto.port, readings)

    async def units() -> dict[str, int | None]:
        return {s["id"]: s["units"] for s in await ctl.get("/api/v1/shelves")}

    await wait_for_condition(
        units, 15, what="sh1 at 7 units", until=lambda u: u["sh1"] == 7, interval_s=0.1
    )

    running = floorhand("catalog", "import", csv, "--site", site)
    assert running.returncode == 3
    assert running.stderr.splitlines()[-1] == (
        f"floorhand: the controller of site t is running (journal {tmp_path / 'journal.sqlite'} "
        "is locked): stop it to import a catalogue"
    )
    assert running.stderr.count("floorhand:") == 1


@pytest.mark.parametrize("fmt", ["csv"])
def test_a_bad_file_names_every_bad_row_and_imports_nothing(tmp_path: Path, fmt: str) -> None:
    site = write_small_site(tmp_path, mqtt_port=1883, scales=2, catalogue_csv=True)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "kind,id,reorder_point,safety_stock,max_stock,zone,scale,sku,unit_weight_g,capacity_units\n"
        "sku,K0,5,1,20,,,,,\n"
        "sku,K1,five,1,20,,,,,\n"
        "scale,s0,,,,Z,,,,\n"
        "shelf,sh0,,,,Z,s0,K9,50,20\n"
    )
    out = floorhand("catalog", "import", bad, "--site", site, "--format", fmt)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{bad}:3: sku K1 column reorder_point:" in out.stderr
    assert f"{bad}:5: shelf sh0 column sku: unknown SKU 'K9'" in out.stderr
    assert not (tmp_path / "journal.sqlite").exists()


async def test_an_inline_catalogue_is_journaled_at_start(
    tmp_path: Path, mosquitto: MosquittoBroker, controllers: list[ControllerProcess]
) -> None:
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=2)
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    assert await ctl.stop() == 0
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    try:
        (version,) = catalog_store.versions(db)
    finally:
        db.close()
    assert (version.version, version.source, version.actor, version.added) == (
        1,
        "site file",
        "controller",
        6,
    )
