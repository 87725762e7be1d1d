"""The catalogue in the journal: layout 2 migrated from layout 1, versions and audit rows, and
the start rule (inline site file catalogue, or the journal's, or a clear error)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from controller.adapters import catalog_store
from controller.adapters.journal import SCHEMA_VERSION, Journal
from controller.catalog.diff import diff
from controller.catalog.records import COLUMNS, Catalogue
from controller.catalog.start import NoCatalogue, inline_catalogue, settle_catalogue, with_catalogue
from controller.catalog.validate import parse
from controller.config import ConfigError, JournalConfig, SiteConfig, load_site
from controller.ports import JournalError, ReadingRow
from tests.sites import write_small_site

LAYOUT_1 = Path(__file__).resolve().parents[1] / "data" / "journal-layout-1.sql"


def _catalogue(site: SiteConfig, text: str) -> Catalogue:
    return parse(text.encode(), "csv", {z.id for z in site.zones}, "c.csv")[0]


def _topology_site(tmp_path: Path, scales: int = 2) -> tuple[SiteConfig, str]:
    path = write_small_site(tmp_path, mqtt_port=1883, scales=scales, catalogue_csv=True)
    return load_site(path), (tmp_path / "catalogue.csv").read_text()


def _replace(path: Path, cat: Catalogue, actor: str = "alice") -> tuple[int, int]:
    j = Journal(path)
    j.open()
    try:
        version, changes = catalog_store.replace(
            j.db, cat, actor=actor, source="import", detail="c.csv", clock=lambda: 1000.0
        )
        return version, len(changes.changes)
    finally:
        j.close()


def test_a_layout_1_journal_migrates_keeps_its_state_and_takes_a_catalogue(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)
    db.executescript(LAYOUT_1.read_text(encoding="utf-8"))
    db.close()
    j = Journal(path)
    restored = j.open()
    try:
        assert j.migrated == tuple(range(2, SCHEMA_VERSION + 1))  # the catalogue's step on
        assert restored.shelf_states == {"sh0": {"units": 10, "status": "ok"}}
        assert restored.outbox_rows == 1
        assert catalog_store.load(j.db) is None  # migrated, still no catalogue
        j.commit([ReadingRow("s0", 0, 1, 2, 1_800_000_002.0, 1400.0, "sh0")])
    finally:
        j.close()
    site, text = _topology_site(tmp_path)
    assert _replace(path, _catalogue(site, text)) == (1, 6)
    stored = catalog_store.read_journal(path)
    assert stored is not None
    assert stored.version == 1
    assert stored.same_records(_catalogue(site, text))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_each_change_is_a_version_with_an_audit_row_per_record(tmp_path: Path) -> None:
    site, text = _topology_site(tmp_path)
    path = site.journal.path
    first = _catalogue(site, text)
    assert _replace(path, first) == (1, 6)
    assert _replace(path, first) == (1, 0)  # the same catalogue: no new version
    edited = text.replace("sku,K1,10,3,40", "sku,K1,12,3,40")
    changed = _catalogue(site, edited.replace("shelf,sh1,,,,,Z,,,s1,K1,100.0,500.0,40\n", ""))
    assert _replace(path, changed, actor="bob") == (2, 2)
    db = sqlite3.connect(path)
    (body,) = db.execute("SELECT body FROM catalog_records WHERE kind='sku' AND id='K0'").fetchone()
    # values only, in the order of the columns kept once in meta
    (columns,) = db.execute("SELECT value FROM meta WHERE key = 'catalog_columns'").fetchone()
    assert orjson.loads(columns)["sku"] == list(COLUMNS["sku"])
    assert orjson.loads(body)[:8] == ["K0", "", 10, 3, 40, 7.0, None, 0.2]
    rows = catalog_store.versions(db)
    assert [(v.version, v.actor, v.added, v.removed, v.changed) for v in rows] == [
        (1, "alice", 6, 0, 0),
        (2, "bob", 0, 1, 1),
    ]
    trail = catalog_store.audit(db, "sku", "K1")
    assert [(a["version"], a["op"], a["actor"]) for a in trail] == [
        (1, "add", "alice"),
        (2, "change", "bob"),
    ]
    assert (trail[1]["before"]["reorder_point"], trail[1]["after"]["reorder_point"]) == (10, 12)
    (gone,) = catalog_store.audit(db, "shelf", "sh1")[1:]
    assert (gone["op"], gone["after"], gone["before"]["sku"]) == ("remove", None, "K1")
    db.close()


def test_a_site_with_no_catalogue_anywhere_does_not_start(tmp_path: Path) -> None:
    site, _ = _topology_site(tmp_path)
    with pytest.raises(NoCatalogue) as err:
        with_catalogue(site)
    assert "floorhand catalog import FILE --site SITE" in str(err.value)


def test_the_journals_catalogue_is_the_sites_when_the_file_declares_none(
    tmp_path: Path,
) -> None:
    site, text = _topology_site(tmp_path)
    cat = _catalogue(site, text)
    _replace(site.journal.path, cat)
    full, version = with_catalogue(site)
    assert version == 1
    assert (full.skus, full.scales, full.shelves) == (cat.skus, cat.scales, cat.shelves)
    assert full.sku("K1").reorder_point == 10
    assert full.zones == site.zones
    assert full.api == site.api
    # A zone the site file no longer has stops the start, naming the record.
    db = sqlite3.connect(site.journal.path)
    db.execute("UPDATE catalog_records SET body = replace(body, '\"Z\"', '\"Y\"') WHERE id='s0'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError) as err:
        with_catalogue(site)
    assert ("catalogue scale s0", "zone 'Y' is not in the site file") in err.value.errors


def test_an_inline_catalogue_is_journaled_as_a_site_file_version_when_it_changes(
    tmp_path: Path,
) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=1883, scales=2))
    assert with_catalogue(site) == (site, 0)
    j = Journal(site.journal.path)
    j.open()
    try:
        assert settle_catalogue(site, j.db, 0, lambda: 5.0) == 1
        assert settle_catalogue(site, j.db, 0, lambda: 6.0) == 1  # unchanged
        fewer = site.model_copy(update={"shelves": site.shelves[:1]})
        assert settle_catalogue(fewer, j.db, 0, lambda: 7.0) == 2
        (v1, v2) = catalog_store.versions(j.db)
        assert (v1.source, v1.added, v2.source, v2.removed) == ("site file", 6, "site file", 1)
        stored = catalog_store.load(j.db)
        assert stored is not None
        assert stored.same_records(inline_catalogue(fewer))
    finally:
        j.close()


DAY_S = 86_400.0


def _replace_at(path: Path, cat: Catalogue, now_s: float) -> int:
    j = Journal(path)
    j.open()
    try:
        version, _ = catalog_store.replace(
            j.db, cat, actor="alice", source="import", detail="c.csv", clock=lambda: now_s
        )
        return version
    finally:
        j.close()


def _audit_versions(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [v for (v,) in db.execute("SELECT version FROM catalog_audit ORDER BY id")]
    finally:
        db.close()


def test_the_audit_retention_defaults_to_90_days_and_must_be_positive() -> None:
    assert JournalConfig().catalog_audit_keep_days == 90.0
    assert catalog_store.DEFAULT_AUDIT_KEEP_DAYS == 90.0
    for bad in (0, -1, float("inf")):
        with pytest.raises(ValidationError):
            JournalConfig(catalog_audit_keep_days=bad)


def test_a_new_version_deletes_the_audit_rows_older_than_the_retention(tmp_path: Path) -> None:
    site, text = _topology_site(tmp_path)
    path = site.journal.path
    first = _catalogue(site, text)
    t0 = 1_000_000.0
    assert _replace_at(path, first, t0) == 1
    second = _catalogue(site, text.replace("sku,K1,10,3,40", "sku,K1,12,3,40"))
    assert _replace_at(path, second, t0 + 89 * DAY_S) == 2
    assert _audit_versions(path) == [1] * 6 + [2]  # within 90 days: kept
    third = _catalogue(site, text.replace("sku,K1,10,3,40", "sku,K1,13,3,40"))
    assert _replace_at(path, third, t0 + 91 * DAY_S) == 3
    assert _audit_versions(path) == [2, 3]  # version 1's rows are 91 days old
    db = sqlite3.connect(path)
    try:
        # The versions themselves stay: who, when, from where, how many.
        assert [(v.version, v.added, v.changed) for v in catalog_store.versions(db)] == [
            (1, 6, 0),
            (2, 0, 1),
            (3, 0, 1),
        ]
        assert catalog_store.version_audit(db, 1) == []
        assert [a["version"] for a in catalog_store.audit(db, "sku", "K1")] == [2, 3]
    finally:
        db.close()


def test_the_sites_audit_retention_applies_at_start_and_to_later_versions(
    tmp_path: Path,
) -> None:
    site, text = _topology_site(tmp_path)
    path = site.journal.path
    t0 = 1_000_000.0
    assert _replace_at(path, _catalogue(site, text), t0) == 1
    short = site.model_copy(
        update={"journal": site.journal.model_copy(update={"catalog_audit_keep_days": 1.0})}
    )
    j = Journal(path)
    j.open()
    try:
        # A clock stepped back: rows from its future are young, never deleted.
        assert settle_catalogue(short, j.db, 1, lambda: t0 - DAY_S) == 1
        assert _audit_versions(path) == [1] * 6
        assert settle_catalogue(short, j.db, 1, lambda: t0 + 2 * DAY_S) == 1
        assert _audit_versions(path) == []
    finally:
        j.close()
    # An import after that start keeps to the site's retention, not the default.
    edited = _catalogue(site, text.replace("sku,K1,10,3,40", "sku,K1,12,3,40"))
    assert _replace_at(path, edited, t0 + 3 * DAY_S) == 2
    back = _catalogue(site, text)
    assert _replace_at(path, back, t0 + 4.5 * DAY_S) == 3
    assert _audit_versions(path) == [3]


def test_a_journal_catalogue_is_not_compared_again_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime settles the site it runs: the topology with the journal's catalogue merged
    in (`with_catalogue`), which declares SKUs, scales and shelves like an inline site. Taken
    for one, its catalogue was read back, compared with itself and found unchanged at every
    start (3.2 s of a 20k-SKU start, seconds more at 100k)."""
    site, text = _topology_site(tmp_path)
    _replace(site.journal.path, _catalogue(site, text))
    full, version = with_catalogue(site)
    compared: list[object] = []
    monkeypatch.setattr(catalog_store, "replace", lambda *a, **k: compared.append(a))
    j = Journal(site.journal.path)
    j.open()
    try:
        assert settle_catalogue(full, j.db, version, lambda: 5.0) == version
    finally:
        j.close()
    assert compared == []


def test_an_audit_trim_that_fails_is_logged_and_the_start_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site, text = _topology_site(tmp_path)
    assert _replace_at(site.journal.path, _catalogue(site, text), 1_000_000.0) == 1

    def failing(*args: object) -> int:
        raise JournalError("the catalogue audit could not be trimmed: disk I/O error")

    monkeypatch.setattr(catalog_store, "keep_audit", failing)
    j = Journal(site.journal.path)
    j.open()
    try:
        with caplog.at_level(logging.ERROR, logger="floorhand.catalog"):
            assert settle_catalogue(site, j.db, 1, lambda: 2_000_000.0) == 1
    finally:
        j.close()
    assert "the catalogue audit could not be trimmed: disk I/O error" in caplog.text
    assert _audit_versions(site.journal.path) == [1] * 6


# -- a live change: staged in short transactions, swapped in by one ---------------------------


def _dump(db: sqlite3.Connection) -> dict[str, Any]:
    """What a reader of the journal sees of its catalogue (records in order, versions, audit)."""
    return {
        "records": db.execute("SELECT kind, id, body FROM catalog_records ORDER BY seq").fetchall(),
        "versions": [
            (v.version, v.actor, v.added, v.removed, v.changed) for v in catalog_store.versions(db)
        ],
        "audit": db.execute(
            "SELECT version, ts, actor, source, kind, record_id, op, before, after "
            "FROM catalog_audit ORDER BY id"
        ).fetchall(),
        "columns": db.execute("SELECT value FROM meta WHERE key = 'catalog_columns'").fetchone(),
    }


def _staged_write(
    j: Journal, before: Catalogue, after: Catalogue, from_version: int | None = None
) -> int:
    staged = catalog_store.stage(
        j.transaction,
        after,
        diff(before, after),
        from_version=before.version if from_version is None else from_version,
        actor="bob",
        source="import",
        detail="c.csv",
        clock=lambda: 1000.0,
    )
    version = catalog_store.swap(j.transaction, staged)
    catalog_store.finish(j.transaction, staged)
    return version


def test_a_staged_change_writes_what_one_transaction_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stage + swap + finish (short transactions, 2 rows each here) leave the journal as
    `replace` (one transaction) does: records in the new file's order, the version row, the
    audit rows; several changes in a row (the index of the records changes name each time)."""
    monkeypatch.setattr(catalog_store, "SLICE_ROWS", 2)
    site, text = _topology_site(tmp_path, scales=3)
    first = _catalogue(site, text)
    edits = [
        text.replace("sku,K1,10,3,40", "sku,K1,12,3,40"),
        text.replace("shelf,sh1,,,,,Z,,,s1,K1,100.0,500.0,40\n", ""),
        text.replace("sku,K2,10,3,40", "sku,K2,9,3,40"),
    ]
    dumps: dict[str, list[dict[str, Any]]] = {}
    for way in ("one", "staged"):
        path = tmp_path / f"{way}.sqlite"
        _replace(path, first)
        j = Journal(path)
        j.open()
        try:
            for edit in edits:
                cat = _catalogue(site, edit)
                if way == "one":
                    catalog_store.replace(
                        j.db,
                        cat,
                        actor="bob",
                        source="import",
                        detail="c.csv",
                        clock=lambda: 1000.0,
                    )
                else:
                    current = catalog_store.load(j.db)
                    assert current is not None
                    assert _staged_write(j, current, cat) == current.version + 1
                dumps.setdefault(way, []).append(_dump(j.db))
            tables = {r[0] for r in j.db.execute("SELECT name FROM sqlite_master")}
            assert not {t for t in tables if t.startswith("catalog_records_") and "_id" not in t}
            assert j.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            j.close()
        stored = catalog_store.read_journal(path)
        assert stored is not None
        assert stored.version == 4
        assert stored.same_records(_catalogue(site, edits[-1]))
    assert dumps["staged"] == dumps["one"]


def test_a_change_planned_against_another_version_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    site, text = _topology_site(tmp_path)
    path = site.journal.path
    first = _catalogue(site, text)
    _replace(path, first)
    changed = _catalogue(site, text.replace("sku,K1,10,3,40", "sku,K1,12,3,40"))
    j = Journal(path)
    j.open()
    try:
        current = catalog_store.load(j.db)
        assert current is not None
        kept = _dump(j.db)
        with pytest.raises(catalog_store.VersionMoved, match=r"version 0 -> 1"):
            _staged_write(j, current, changed, from_version=0)
        assert _dump(j.db) == kept
        # Moved between the staging and the swap (by a writer that first removes what is
        # staged, as every catalogue write does): the swap refuses.
        staged = catalog_store.stage(
            j.transaction,
            changed,
            diff(current, changed),
            from_version=1,
            actor="bob",
            source="api",
            detail="PUT",
        )
        catalog_store.replace(j.db, changed, actor="carol", source="import", detail="c.csv")
        moved = _dump(j.db)
        with pytest.raises(catalog_store.VersionMoved, match=r"version 1 -> 2"):
            catalog_store.swap(j.transaction, staged)
        assert _dump(j.db) == moved
        audit = catalog_store.version_audit(j.db, 2)
        assert [(a["id"], a["op"]) for a in audit] == [("K1", "change")]
        assert [a["actor"] for a in catalog_store.audit(j.db, "sku", "K1")][-1:] == ["carol"]
        assert not catalog_store.clean_staged(j.db)
    finally:
        j.close()


def test_a_staged_change_trims_the_audit_in_short_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit rows past the retention (a big import's, aged out) are deleted a slice per
    transaction after a live change, as far as the first young row (a clock stepped back
    never deletes a young row)."""
    monkeypatch.setattr(catalog_store, "SLICE_ROWS", 2)
    site, text = _topology_site(tmp_path, scales=3)
    first = _catalogue(site, text)
    path = site.journal.path
    assert _replace(path, first) == (1, 9)  # 9 audit rows at ts 1000
    j = Journal(path)
    j.open()
    try:
        db = j.db
        db.execute("UPDATE catalog_audit SET ts = 5e9 WHERE record_id = 'sh2'")  # young, last
        transactions: list[str] = []

        def counted(what: str) -> Any:
            transactions.append(what)
            return j.transaction(what)

        current = catalog_store.load(db)
        assert current is not None
        changed = _catalogue(site, text.replace("sku,K1,10,3,40", "sku,K1,12,3,40"))
        staged = catalog_store.stage(
            counted, changed, diff(current, changed), from_version=1, actor="bob",
            source="api", detail="PUT", clock=lambda: 1000.0 + 91 * 86_400.0,
        )  # fmt: skip
        catalog_store.swap(counted, staged)
        transactions.clear()
        catalog_store.finish(counted, staged)
        trims = [t for t in transactions if "audit" in t]
        assert len(trims) == 5  # 8 old rows, 2 per transaction, and the one that finds none
        left = db.execute("SELECT version, record_id FROM catalog_audit ORDER BY id").fetchall()
        assert left == [(1, "sh2"), (2, "K1")]
    finally:
        j.close()
