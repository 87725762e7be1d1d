"""A SKU's pack multiple (docs/catalogue.md, the ``pack_multiple`` column): imported and
exported with the catalogue, changed by a supervisor through the API, and the suggested order
quantity rounded up to whole packs. The controller under a real uvicorn with a real mosquitto;
readings published by paho."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.__main__ import main
from tests.integration.test_api_catalog import export, journal_site, patch, sku_of
from tests.integration.test_api_ops import OpsServer, next_event, ops_server
from tests.mosquitto import MosquittoBroker
from tests.sites import grams, write_small_site

pytestmark = pytest.mark.timeout(90)


def site_with_packs(tmp_path: Path, port: int, packs: dict[str, int]) -> Path:
    """The small site (K0..K2 reorder 10, safety 3, max 40) with a ``pack_multiple`` column in
    its catalogue file (empty cells: the default), imported into its journal."""
    site = write_small_site(tmp_path, mqtt_port=port, scales=3, catalogue_csv=True)
    csv = tmp_path / "catalogue.csv"
    header, *rows = csv.read_text().splitlines()
    cells = [f"{row},{packs.get(row.split(',')[1], '')}" for row in rows]
    csv.write_text("\n".join([f"{header},pack_multiple", *cells]) + "\n")
    assert main(["catalog", "import", str(csv), "--site", str(site)]) == 0
    return site


async def alert_of(srv: OpsServer, key: str) -> dict[str, object]:
    async with srv.client("supervisor") as c:
        r = await c.get("/api/v1/alerts", params={"q": key})
    assert r.status_code == 200, r.text
    return next(a for a in r.json() if a["key"] == key)


async def test_pack_multiple_imports_exports_and_a_supervisor_changes_it(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    async with ops_server(site_with_packs(tmp_path, mosquitto.port, {"K1": 12})) as srv:
        _, records = await export(srv)
        assert [sku_of(records, k)["pack_multiple"] for k in ("K0", "K1", "K2")] == [1, 12, 1]
        _, lines = await export(srv, "csv")
        assert "pack_multiple" in lines[0]["line"].split(",")
        async with srv.client("supervisor") as c:
            stock = (await c.get("/api/v1/stock/K1")).json()
        assert stock["pack_multiple"] == 12
        # A replenishment parameter like the thresholds: a supervisor may change it.
        r = await patch(srv, [{"kind": "sku", "id": "K1", "pack_multiple": 5}], "supervisor")
        assert r.status_code == 200, r.text
        assert r.json()["changes"][0]["columns"] == {"pack_multiple": {"before": 12, "after": 5}}
        r = await patch(srv, [{"kind": "sku", "id": "K1", "pack_multiple": 0}], "supervisor")
        assert r.status_code == 422, r.text
        assert "pack_multiple" in r.text
        _, records = await export(srv)
        assert sku_of(records, "K1")["pack_multiple"] == 5


async def test_a_catalogue_without_the_column_reads_the_default(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """The catalogue file of the release before (no ``pack_multiple`` column) imports; every
    SKU exports with packs of 1."""
    async with ops_server(journal_site(tmp_path, mosquitto.port)) as srv:
        _, records = await export(srv)
        assert [sku_of(records, k)["pack_multiple"] for k in ("K0", "K1", "K2")] == [1, 1, 1]


async def test_the_suggested_order_of_a_raised_alert_is_whole_packs(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    async with ops_server(site_with_packs(tmp_path, mosquitto.port, {"K1": 12})) as srv:
        sub = srv.rt.bus.subscribe("test")
        try:
            await srv.publish("s1", grams(8))  # K1 at 8 <= reorder point 10: raised LOW
            raised = await next_event(
                sub, lambda e: e["kind"] == "alert_raised" and e["key"] == "K1"
            )
        finally:
            sub.close()
        # 32 short of max_stock 40 (not a multiple of 12): 3 packs, 36 units.
        assert raised["suggested_order_qty"] == 36
        assert (await alert_of(srv, "K1"))["suggested_order_qty"] == 36
        r = await patch(srv, [{"kind": "sku", "id": "K1", "pack_multiple": 5}], "supervisor")
        assert r.status_code == 200, r.text
        assert (await alert_of(srv, "K1"))["suggested_order_qty"] == 35  # 7 packs of 5
