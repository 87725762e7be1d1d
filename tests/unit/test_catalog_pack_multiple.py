"""A SKU's ``pack_multiple`` column: validated, defaulted to 1 where a catalogue file or a
journal of the release before has no such column, written and read back with the others."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from controller.adapters import catalog_store
from controller.adapters.journal import Journal
from controller.catalog.formats import CatalogueInvalid
from controller.catalog.records import COLUMNS, HEADER, Catalogue
from controller.catalog.validate import parse
from controller.config import SkuConfig
from tests.sites import write_small_site

ZONES = {"Z"}


def test_pack_multiple_defaults_to_1_and_is_bounded() -> None:
    sku = SkuConfig(id="K", reorder_point=1, safety_stock=0, max_stock=10)
    assert sku.pack_multiple == 1
    assert SkuConfig(id="K", reorder_point=1, safety_stock=0, max_stock=10, pack_multiple=1_000_000)
    for bad in (0, -3, 1_000_001):
        with pytest.raises(ValidationError, match="pack_multiple"):
            SkuConfig(id="K", reorder_point=1, safety_stock=0, max_stock=10, pack_multiple=bad)
    assert "pack_multiple" in COLUMNS["sku"]
    assert "pack_multiple" in HEADER


def _old_csv(tmp_path: Path) -> str:
    """The test site's catalogue file: written as the release before wrote them (no
    ``pack_multiple`` column)."""
    write_small_site(tmp_path, mqtt_port=1883, scales=2, catalogue_csv=True)
    text = (tmp_path / "catalogue.csv").read_text()
    assert "pack_multiple" not in text
    return text


def test_csv_and_jsonl_with_and_without_the_column(tmp_path: Path) -> None:
    old = _old_csv(tmp_path)
    cat = parse(old.encode(), "csv", ZONES, "old.csv")[0]
    assert [s.pack_multiple for s in cat.skus] == [1, 1]
    header, *rows = old.splitlines()
    with_col = "\n".join(
        [f"{header},pack_multiple", *(f"{r},{'6' if r.startswith('sku,K1') else ''}" for r in rows)]
    )
    cat = parse(with_col.encode(), "csv", ZONES, "new.csv")[0]
    assert [s.pack_multiple for s in cat.skus] == [1, 6]
    line = b'{"kind": "sku", "id": "K9", "reorder_point": 2, "safety_stock": 1, "max_stock": 9, '
    jsonl = [line + b'"pack_multiple": 4}', line + b'"pack_multiple": 0}']
    assert parse(jsonl[0], "jsonl", ZONES, "a.jsonl")[0].skus[0].pack_multiple == 4
    with pytest.raises(CatalogueInvalid) as info:
        parse(jsonl[1], "jsonl", ZONES, "b.jsonl")
    assert [(e.line, e.column) for e in info.value.errors] == [(1, "pack_multiple")]


def test_a_journal_of_the_release_before_reads_back_with_packs_of_1(tmp_path: Path) -> None:
    """A journal whose stored columns (``meta`` ``catalog_columns``) and record bodies have no
    ``pack_multiple``: every SKU reads back with the default, the other columns as stored."""
    cat = parse(_old_csv(tmp_path).encode(), "csv", ZONES, "old.csv")[0]
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    j.open()
    try:
        catalog_store.replace(j.db, cat, actor="a", source="import", detail="c", clock=lambda: 1.0)
    finally:
        j.close()
    db = sqlite3.connect(path)
    try:
        (columns_json,) = db.execute(
            "SELECT value FROM meta WHERE key = 'catalog_columns'"
        ).fetchone()
        columns = orjson.loads(columns_json)
        at = columns["sku"].index("pack_multiple")
        del columns["sku"][at]
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'catalog_columns'",
            (orjson.dumps(columns).decode(),),
        )
        for seq, body in db.execute(
            "SELECT seq, body FROM catalog_records WHERE kind = 'sku'"
        ).fetchall():
            values = orjson.loads(body)
            del values[at]
            db.execute(
                "UPDATE catalog_records SET body = ? WHERE seq = ?", (orjson.dumps(values), seq)
            )
        db.commit()
    finally:
        db.close()
    j = Journal(path)
    j.open()
    try:
        loaded = catalog_store.load(j.db)
    finally:
        j.close()
    assert loaded is not None
    assert [s.pack_multiple for s in loaded.skus] == [1, 1]
    assert Catalogue(loaded.skus, loaded.scales, loaded.shelves).same_records(cat)
