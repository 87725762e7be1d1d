"""`floorhand run` leaves the objects alive after its start out of Python's cyclic garbage
collections (`gc.freeze`): at 100k SKUs a full collection walked ~1M objects and stopped the
loop ~250 ms each time one ran. What a live catalogue change leaves alive joins them."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_api_catalog import JSONL, export, journal_site, jsonl, sku_of
from tests.integration.test_api_ops import ops_server
from tests.mosquitto import MosquittoBroker


def _tracked(obj: object) -> bool:
    """Whether ``obj`` is in a generation the cyclic collector walks (not frozen)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield None
    gc.unfreeze()  # leave no frozen heap to the next test


async def test_a_started_runtime_freezes_its_heap_and_a_change_joins_it(
    tmp_path: Path, mosquitto: MosquittoBroker, unfrozen: None
) -> None:
    site = journal_site(tmp_path, mosquitto.port)
    assert gc.get_freeze_count() == 0
    async with ops_server(site, freeze_heap=True) as srv:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert not _tracked(srv.rt.ingest.specs)  # alive at start: frozen
        _, records = await export(srv)
        sku_of(records, "K1")["reorder_point"] = 11
        async with srv.client("engineer") as c:
            r = await c.put(
                "/api/v1/catalog", content=jsonl(records), headers={"Content-Type": JSONL}
            )
        assert r.status_code == 200, r.text
        targets = srv.rt.alerts.targets["K1"]  # the change's new target
        assert targets.policy.reorder_point == 11
        assert not _tracked(targets)  # what the change left alive joined the frozen heap
        assert gc.get_freeze_count() >= frozen


async def test_a_runtime_freezes_nothing_unless_asked(
    tmp_path: Path, mosquitto: MosquittoBroker, unfrozen: None
) -> None:
    async with ops_server(journal_site(tmp_path, mosquitto.port)):
        assert gc.get_freeze_count() == 0
