"""The history of a shelf moved to another SKU by a live catalogue change (docs/catalogue.md,
"Changing a running controller"): the controller under a real uvicorn with a real mosquitto and
the real SQLite history sink; readings published by paho."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson
import pytest

from tests.integration.test_api_catalog import journal_site, patch
from tests.integration.test_api_ops import ops_server
from tests.mosquitto import MosquittoBroker
from tests.sites import grams

pytestmark = pytest.mark.timeout(90)


def history_series(path: Path, measurement: str, shelf: str) -> dict[tuple[str, str], int]:
    """Points per (zone, sku) tag pair of a shelf's series in the SQLite history file."""
    table = "weight" if measurement == "weight" else "points"
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            f"SELECT s.tags, count(*) FROM {table} p JOIN series s ON s.id = p.series "
            "WHERE s.measurement = ? AND s.shelf = ? GROUP BY s.id",
            (measurement, shelf),
        ).fetchall()
    finally:
        db.close()
    out: dict[tuple[str, str], int] = {}
    for tags_blob, n in rows:
        tags = dict(orjson.loads(tags_blob))
        key = (tags["zone"], tags["sku"])
        out[key] = out.get(key, 0) + n
    return out


async def test_a_moved_shelfs_history_takes_the_new_sku_from_the_change_on(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    site = journal_site(tmp_path, mosquitto.port, history_backend="sqlite")
    async with ops_server(site) as srv:
        rt = srv.rt
        history = rt.history
        assert history is not None
        await srv.publish("s1", grams(8))  # 6 readings of sh1 as a K1 shelf
        # Whether the historian drained them yet or not, they were journaled under K1.
        r = await patch(srv, [{"kind": "shelf", "id": "sh1", "sku": "K2"}])
        assert r.status_code == 200, r.text
        await srv.publish("s1", grams(9))  # 6 readings of sh1 as a K2 shelf
        history.wake()
        async with asyncio.timeout(20):
            await history.wait_for(lambda: rt.journal.outbox_rows == 0)
    path = tmp_path / "history.sqlite"
    assert history_series(path, "weight", "sh1") == {("Z", "K1"): 6, ("Z", "K2"): 6}
    stock = history_series(path, "stock", "sh1")
    assert stock[("Z", "K1")] >= 1  # the count of 8
    assert stock[("Z", "K2")] >= 1  # the count of 9, after the change
