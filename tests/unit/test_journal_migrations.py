"""Journal layouts: ``PRAGMA user_version`` and the migrations that lead to it.

A journal written by the release before versioning (tests/data/journal-before-versioning.sql)
and one of an older layout are migrated with their data; a current journal is opened as it is;
a journal from a newer release is refused and left untouched; a failing step changes nothing."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from controller.adapters import journal as journal_module
from controller.adapters.journal import (
    SCHEMA_VERSION,
    Journal,
    JournalError,
    JournalTooNew,
)
from controller.ports import Cursor, ReadingRow

RELEASED = Path(__file__).resolve().parents[1] / "data" / "journal-before-versioning.sql"


def _user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def _layout(path: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        db.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_journal_written_before_versioning_is_migrated_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)
    db.executescript(RELEASED.read_text(encoding="utf-8"))
    db.close()
    assert _user_version(path) == 0

    j = Journal(path)
    restored = j.open()
    try:
        assert j.migrated == tuple(range(1, SCHEMA_VERSION + 1))
        assert restored.cursors == {
            "scale-a1": Cursor(
                3, 4, 1_800_000_004.0, 3, floor=1, holes=((3, 3),), gaps=1, missing=1
            )
        }
        assert restored.shelf_states == {"A-01": {"units": 12, "status": "ok"}}
        assert restored.alert_states == {"SKU-1": {"state": "low", "episode": 1}}
        assert restored.outbox_rows == 4  # 3 readings + 1 event
        assert j.has_reading("scale-a1", 3, 2, 1_800_000_002.0)
        assert not j.has_reading("scale-a1", 3, 2, 1_800_000_003.0)  # a different reading
        indexes = {r[1] for r in j.db.execute("PRAGMA index_list(readings)")}
        assert "readings_identity_ts" in indexes
        assert "readings_identity" not in indexes
        assert [o["order_id"] for o in j.open_orders()] == ["o-1"]
        key = j.idempotency_key("key-1")
        assert key is not None
        assert key.order_id == "o-1"
        assert j.counters() == {"sorter_cmd_id": 7}
        assert j.shelf_calibrations()["A-01"]["tare_g"] == 10.0
        j.commit([ReadingRow("scale-a1", 0, 3, 5, 1_800_000_005.0, 1200.0, "A-01")])
        # The older rows are read first, the new block's reading after them, one id sequence.
        outbox = j.read_readings(0, 10)
        assert [(r.id, r.seq) for r in outbox] == [(1, 1), (2, 2), (3, 4), (4, 5)]
        assert j.delete_confirmed(3, None) == 3
        assert [r.id for r in j.read_readings(0, 10)] == [4]
    finally:
        j.close()
    assert _user_version(path) == SCHEMA_VERSION
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    db.close()


def test_reopening_a_current_journal_migrates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    j.open()
    assert j.migrated == tuple(range(1, SCHEMA_VERSION + 1))  # a new file: every step
    j.commit([ReadingRow("d1", 0, 0, 1, 1.0, 5.0, "s1")])
    j.close()
    before = _layout(path)

    j = Journal(path)
    assert j.open().outbox_rows == 1
    j.close()
    assert j.migrated == ()
    assert _layout(path) == before
    assert _user_version(path) == SCHEMA_VERSION


def test_an_older_layout_without_orders_or_gap_columns_is_completed(tmp_path: Path) -> None:
    """The layout of the first releases: no orders/idempotency/counters/calibration tables,
    cursors as a 256-bit window without gap columns."""
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE device_cursors (device TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
        "seq INTEGER NOT NULL, window BLOB NOT NULL, ts REAL NOT NULL, applied INTEGER NOT NULL);"
        "CREATE TABLE shelf_states (shelf TEXT PRIMARY KEY, body BLOB NOT NULL);"
        "INSERT INTO shelf_states VALUES ('s1', '{\"units\": 4}');"
    )
    db.close()
    j = Journal(path)
    try:
        assert j.open().shelf_states == {"s1": {"units": 4}}
        assert j.migrated == tuple(range(1, SCHEMA_VERSION + 1))
        j.commit_orders([], counters={"sorter_cmd_id": 1})
        assert j.counters() == {"sorter_cmd_id": 1}
    finally:
        j.close()
    tables = {name for name, _ in _layout(path)}
    assert {"orders", "idempotency", "counters", "shelf_calibrations", "readings"} <= tables


def test_a_journal_from_a_newer_release_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    j.open()
    j.commit([ReadingRow("d1", 0, 0, 1, 1.0, 5.0, "s1")])
    j.close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    before = _digest(path)

    for _ in range(2):  # refused again: the first refusal released the journal's lock
        with pytest.raises(JournalTooNew, match="written by a newer Floorhand") as err:
            Journal(path).open()
        assert f"layout {SCHEMA_VERSION + 1}" in str(err.value)
    with pytest.raises(JournalTooNew):
        Journal(path).lock()  # what the CLI takes before the broker
    assert _digest(path) == before
    assert _user_version(path) == SCHEMA_VERSION + 1


def test_floorhand_run_refuses_a_newer_journal_in_one_line_before_the_broker(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    j.open()
    j.close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    site = Path(__file__).resolve().parents[2] / "firmware-configs" / "sites" / "demo.toml"
    flags = [
        "--journal",
        str(path),
        "--api-bind",
        "127.0.0.1:0",
        "--mqtt-url",
        "mqtt://127.0.0.1:1",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "controller", "run", str(site), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"floorhand: journal {path} has layout {SCHEMA_VERSION + 1}")
    assert "Traceback" not in proc.stderr


def test_a_failing_migration_step_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    j.open()
    j.close()

    def broken_step(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        db.execute("SELECT no_such_column FROM readings")

    monkeypatch.setattr(journal_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(
        journal_module,
        "MIGRATIONS",
        (*journal_module.MIGRATIONS, (SCHEMA_VERSION + 1, "broken", broken_step)),
    )
    with pytest.raises(JournalError, match="no_such_column"):
        Journal(path).open()
    assert _user_version(path) == SCHEMA_VERSION
    assert "half_done" not in {name for name, _ in _layout(path)}
