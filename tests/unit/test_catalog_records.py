"""Catalogue records read back from the journal (controller/catalog/records.py `builder`,
controller/adapters/catalog_store.py `load`): built without validation, sharing one fields set
per model and the values that repeat, and still the same records as validated ones: equal,
dumped alike, copied and diffed alike."""

from __future__ import annotations

import copy
import math
import pickle
import sqlite3
import tracemalloc
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from controller.adapters import catalog_store
from controller.adapters.journal import Journal
from controller.catalog.diff import diff
from controller.catalog.records import COLUMNS, KINDS, SHELF_REORDER, Catalogue, builder, flat
from controller.catalog.validate import parse

ZONES = {"Z", "north"}
# Every kind of value a record holds: optional columns set and unset, a per-shelf reorder
# policy (two shelves alike), an ESPHome scale's sensor list, a negative zero, ints > 256.
JSONL = b"""\
{"kind":"sku","id":"K1","name":"bolts","reorder_point":10,"safety_stock":3,"max_stock":400}
{"kind":"sku","id":"K2","reorder_point":300,"safety_stock":0,"max_stock":1000,"hysteresis_units":7,"lead_time_d":0.5}
{"kind":"scale","id":"s1","zone":"Z","max_weight_g":10000}
{"kind":"scale","id":"e1","zone":"north","format":"esphome","channels":2,"esphome_node":"n1","esphome_sensors":["a","b"]}
{"kind":"shelf","id":"sh1","zone":"Z","location":"A-01","scale":"s1","sku":"K1","unit_weight_g":100,"tare_g":-0.0,"capacity_units":40}
{"kind":"shelf","id":"sh2","zone":"north","scale":"e1","channel":0,"sku":"K2","unit_weight_g":2.5,"tare_g":500,"capacity_units":300,"shelf_reorder_point":5,"shelf_safety_stock":1}
{"kind":"shelf","id":"sh3","zone":"north","scale":"e1","channel":1,"sku":"K1","unit_weight_g":100,"capacity_units":40,"shelf_reorder_point":5,"shelf_safety_stock":1}
"""


def _validated() -> Catalogue:
    return parse(JSONL, "jsonl", ZONES, "c.jsonl")[0]


def _stored(tmp_path: Path, cat: Catalogue) -> Catalogue:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    j.open()
    try:
        catalog_store.replace(j.db, cat, actor="t", source="import", detail="c.jsonl")
    finally:
        j.close()
    back = catalog_store.read_journal(path)
    assert back is not None
    return back


def test_records_read_back_are_the_validated_ones(tmp_path: Path) -> None:
    validated = _validated()
    back = _stored(tmp_path, validated)
    assert back.same_records(validated)
    assert not diff(back, validated)
    assert not diff(validated, back)
    for kind in KINDS:
        for ours, theirs in zip(back.records(kind), validated.records(kind), strict=True):
            assert ours == theirs
            assert theirs == ours
            assert hash(ours) == hash(theirs)
            assert repr(ours) == repr(theirs)
            assert list(ours.model_dump().items()) == list(theirs.model_dump().items())
            assert ours.model_dump_json() == theirs.model_dump_json()
            assert flat(kind, ours) == flat(kind, theirs)
            assert [type(v) for v in ours.__dict__.values()] == [
                type(v) for v in theirs.__dict__.values()
            ]
    assert math.copysign(1.0, back.shelves[0].tare_g) == -1.0  # a zero keeps its sign
    assert back.scales[1].esphome_sensors == ("a", "b")


def test_records_read_back_share_one_fields_set_that_pydantic_only_copies(
    tmp_path: Path,
) -> None:
    back = _stored(tmp_path, _validated())
    sh1, sh2, _ = back.shelves
    assert sh1.model_fields_set is sh2.model_fields_set  # one set per model, not per record
    assert sh1.model_fields_set == set(type(sh1).model_fields)
    everything = set(sh1.model_fields_set)
    assert sh1.model_dump(exclude_unset=True) == sh1.model_dump()

    moved = sh1.model_copy(update={"tare_g": 3.0})
    assert (moved.tare_g, moved.id, sh1.tare_g) == (3.0, "sh1", -0.0)
    assert moved.model_fields_set == everything
    deep = sh2.model_copy(update={"capacity_units": 1}, deep=True)
    assert deep.capacity_units == 1
    assert deep.reorder == sh2.reorder
    assert copy.deepcopy(sh2) == sh2
    assert pickle.loads(pickle.dumps(sh2)) == sh2

    with pytest.raises(ValidationError):
        sh1.tare_g = 1.0  # type: ignore[misc]  # frozen: refused before the fields set is touched
    with pytest.raises(TypeError, match="read-only"):
        sh1.model_fields_set.add("elsewhere")
    with pytest.raises(TypeError, match="read-only"):
        sh1.model_fields_set.discard("tare_g")
    assert sh2.model_fields_set == everything  # nothing leaked into the other records


def test_values_that_repeat_are_one_object(tmp_path: Path) -> None:
    back = _stored(tmp_path, _validated())
    (k1, k2), (s1, e1), (sh1, sh2, sh3) = back.skus, back.scales, back.shelves
    assert sh1.scale is s1.id
    assert sh2.scale is e1.id is sh3.scale
    assert sh1.sku is k1.id is sh3.sku
    assert sh2.sku is k2.id
    assert sh2.zone is e1.zone is sh3.zone
    assert sh1.unit_weight_g is sh3.unit_weight_g
    assert sh1.capacity_units is sh3.capacity_units
    assert sh2.reorder is sh3.reorder  # the same per-shelf policy: one frozen object
    assert k2.reorder_point is sh2.capacity_units == 300  # large ints too
    assert type(sh2.tare_g) is float
    assert type(sh2.capacity_units) is int


def test_a_journal_with_its_columns_in_another_order_reads_the_same_records(
    tmp_path: Path,
) -> None:
    validated = _validated()
    _stored(tmp_path, validated)
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)
    with db:
        columns = {k: list(reversed(COLUMNS[k])) for k in KINDS}
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'catalog_columns'",
            (orjson.dumps(columns).decode(),),
        )
        for seq, body in db.execute("SELECT seq, body FROM catalog_records").fetchall():
            db.execute(
                "UPDATE catalog_records SET body = ? WHERE seq = ?",
                (orjson.dumps(list(reversed(orjson.loads(body)))), seq),
            )
    db.close()
    back = catalog_store.read_journal(path)
    assert back is not None
    assert back.same_records(validated)
    for ours, theirs in zip(back.shelves, validated.shelves, strict=True):
        assert list(ours.model_dump()) == list(theirs.model_dump())


def test_a_catalogue_read_for_a_comparison_only_is_the_same_without_sharing(
    tmp_path: Path,
) -> None:
    validated = _validated()
    _stored(tmp_path, validated)
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    try:
        compared = catalog_store.load(db, share=False)
    finally:
        db.close()
    assert compared is not None
    assert compared.same_records(validated)
    assert not diff(compared, validated)


def test_records_read_back_hold_their_values_in_key_sharing_dicts(tmp_path: Path) -> None:
    """A record's values share one key table with the other records of its kind (a shelf's
    ~185 bytes against ~470 for a dict of its own: ~50 MB at 100k SKUs + scales + shelves);
    the models behave the same, and a copy changed by ``model_copy`` is only the copy."""
    for kind in KINDS:
        columns = COLUMNS[kind]
        rows = [[f"{kind}{i}-{c}" for c in columns] for i in range(2_000)]
        for row in rows:  # valid enough for the builder: no list, no reorder columns
            for c, name in enumerate(columns):
                if name in ("esphome_sensors", *SHELF_REORDER):
                    row[c] = None
        build = builder(kind, columns)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            plain = [dict(zip(columns, list(row), strict=True)) for row in rows]
            between = tracemalloc.get_traced_memory()[0]
            built = [build(list(row)) for row in rows]
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        # The models, an object each on top of their values, take less than the plain dicts
        # of the same values alone (before: the plain dicts and the objects).
        assert after - between < between - before, kind
        assert [m.__dict__["id"] for m in built] == [d["id"] for d in plain]
    validated = _validated()
    back = _stored(tmp_path, validated)
    shelf = back.shelves[0]
    moved = shelf.model_copy(update={"zone": "Z9"})
    assert (moved.zone, shelf.zone) == ("Z9", validated.shelves[0].zone)
    assert shelf == validated.shelves[0]
