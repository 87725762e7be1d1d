"""The SQLite journal: atomic groups, restore, single owner, bounded dead letters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from controller import ports
from controller.adapters import journal as journal_module
from controller.adapters.journal import Journal, JournalError, JournalLocked, execute_rows
from controller.ports import Cursor, DeadLetter, EventRow, JournalUnavailable, ReadingRow
from tests.waiting import wait_for_condition_sync


def row(seq: int, device: str = "d1") -> ReadingRow:
    return ReadingRow(device, 0, 0, seq, 1.0 + seq, 100.0, "shelf-1")


CURSOR = Cursor(0, 40, 3.0, 7, floor=2, holes=((5, 9), (12, 12)), gaps=3, missing=6)


def test_commit_and_restore(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    assert j.open().outbox_rows == 0
    j.commit(
        [row(1), row(2)],
        [DeadLetter(1.0, "t", "bad_json", "x", b"x" * 10_000)],
        {"d1": CURSOR},
        {"shelf-1": {"units": 3}},
        [EventRow(1.0, "stock_changed", {"kind": "stock_changed"})],
        {"SKU-1": {"state": "low"}},
    )
    j.close()
    j2 = Journal(tmp_path / "j.sqlite")
    restored = j2.open()
    assert restored.cursors == {"d1": CURSOR}
    assert restored.shelf_states == {"shelf-1": {"units": 3}}
    assert restored.alert_states == {"SKU-1": {"state": "low"}}
    assert restored.outbox_rows == 3
    assert restored.torn_tail_bytes == 0
    letter = j2.dead_letters(1)[0]
    assert letter["size"] == 10_000
    assert len(letter["payload"]) == 4096
    j2.close()


def test_cursor_saved_as_a_window_is_read_as_gaps(tmp_path: Path) -> None:
    """A journal from before gap accounting: the cursor's 256-bit window (bit i ↔ seq − 1 − i)
    becomes a floor at the lowest seq seen and holes at the unseen ones above it."""
    path = tmp_path / "j.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE device_cursors (device TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
        "seq INTEGER NOT NULL, window BLOB NOT NULL, ts REAL NOT NULL, applied INTEGER NOT NULL)"
    )
    seen_below = [99, 98, 96, 95, 91, 90]  # of seq 100: 97 and 92-94 never arrived
    bits = sum(1 << (100 - 1 - s) for s in seen_below)
    db.execute(
        "INSERT INTO device_cursors VALUES ('d1', 2, 100, ?, 5.0, 7)",
        (bits.to_bytes(64, "little"),),
    )
    db.execute("INSERT INTO device_cursors VALUES ('d2', 0, 4, ?, 5.0, 1)", (bytes(64),))
    db.commit()
    db.close()
    j = Journal(path)
    restored = j.open()
    assert restored.cursors == {
        "d1": Cursor(2, 100, 5.0, 7, floor=90, holes=((92, 94), (97, 97)), gaps=2, missing=4),
        "d2": Cursor(0, 4, 5.0, 1, floor=4),
    }
    j.commit([], cursors={"d1": restored.cursors["d1"]._replace(seq=101)})
    j.close()
    assert Journal(path).open().cursors["d1"].holes == ((92, 94), (97, 97))


def test_state_rows_are_overwritten_with_the_same_columns(tmp_path: Path) -> None:
    """Cursors, shelf and alert states committed again replace their row's values (one row per
    key); the columns hold what earlier versions wrote (an empty holes list as ``[]``)."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit([], cursors={"d1": CURSOR}, shelf_states={"s": {"u": 1}}, alert_states={"k": {"a": 1}})
    later = Cursor(1, 3, 4.0, 8, floor=3)
    j.commit([], cursors={"d1": later}, shelf_states={"s": {"u": 2}}, alert_states={"k": {"a": 2}})
    db = j.db
    assert db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 2
    j.fold_state_log()
    assert db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 0
    assert db.execute("SELECT * FROM device_cursors").fetchall() == [
        ("d1", 1, 3, b"", 4.0, 8, 3, b"[]", 0, 0)
    ]
    assert db.execute("SELECT * FROM shelf_states").fetchall() == [("s", b'{"u":2}')]
    assert db.execute("SELECT * FROM alert_states").fetchall() == [("k", b'{"a":2}')]
    j.close()
    j2 = Journal(tmp_path / "j.sqlite")
    restored = j2.open()
    j2.close()
    assert restored.cursors == {"d1": later}
    assert restored.shelf_states == {"s": {"u": 2}}


def _group(n: int, start: int = 0, device: str = "d1") -> list[ReadingRow]:
    return [
        ReadingRow(
            device, i % 2, 3, start + i, 1_800_000_000.0 + (start + i) / 7, 0.1 * i, f"S{i % 3}"
        )
        for i in range(n)
    ]


def test_readings_are_written_in_blocks_and_read_back_exactly(tmp_path: Path) -> None:
    """A commit's readings are one ``reading_blocks`` row; they read back with the same values
    (numbers as bits: 0.1 * i, 2**62, 1e-300) and ids that go on from the older layouts'
    ``readings`` rows, one sequence."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.db.execute(
        "INSERT INTO readings(id, device, channel, epoch, seq, ts, weight_g, shelf) "
        "VALUES (41, 'old', 0, 0, 1, 1.5, 2.5, 'S0')"
    )
    j.close()
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    first = _group(5)
    odd = [ReadingRow("d2", 7, 2**62, 2**62 + 1, 1e-300, 1e-300, 'shelf ü "q"')]
    j.commit(first)
    j.commit(odd)
    assert j.db.execute("SELECT id, n FROM reading_blocks ORDER BY id").fetchall() == [
        (42, 5),
        (47, 1),
    ]
    got = j.read_readings(0, 100)
    assert [r.id for r in got] == [41, 42, 43, 44, 45, 46, 47]
    assert [tuple(r[1:]) for r in got[1:]] == [tuple(r) for r in first + odd]
    assert [type(v) for v in got[-1]] == [int, str, int, int, int, float, float, str]
    assert j.read_readings(43, 2) == got[3:5]  # from the middle of a block
    assert j.count("readings") == 7
    assert j.newest_ids()[0] == 47
    j.close()


def test_a_confirmed_part_of_a_block_is_deleted_and_the_rest_kept(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit(_group(10))
    j.commit(_group(10, start=10))
    before = j.read_readings(0, 100)
    assert j.outbox_rows == 20
    assert j.delete_confirmed(13, None) == 13  # one block whole, 3 of the next
    assert j.read_readings(0, 100) == before[13:]
    assert j.count("readings") == 7
    assert j.outbox_rows == 7
    assert j.trim_outbox(keep_readings=4, keep_events=0) == 3
    assert j.read_readings(0, 100) == before[16:]
    assert j.newest_ids()[0] == 20
    j.close()


def test_reading_ids_go_on_from_the_newest_after_a_restart(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit(_group(3))
    j.close()
    j = Journal(tmp_path / "j.sqlite")
    assert j.open().outbox_rows == 3
    j.commit(_group(2, start=3))
    assert [r.id for r in j.read_readings(0, 10)] == [1, 2, 3, 4, 5]
    j.delete_confirmed(5, None)
    j.close()
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit(_group(1, start=5))  # an empty outbox at start: numbering starts again
    assert [r.id for r in j.read_readings(0, 10)] == [1]
    j.close()


def test_a_reading_in_a_block_is_found_by_its_identity(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    group = _group(6)
    j.commit(group)
    r = group[4]
    assert j.has_reading(r.device, r.epoch, r.seq, r.ts_s)
    assert not j.has_reading(r.device, r.epoch, r.seq, r.ts_s + 0.001)  # another reading
    assert not j.has_reading("d9", r.epoch, r.seq, r.ts_s)
    j.close()


def test_an_unreadable_block_is_a_journal_error(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit(_group(3))
    j.db.execute("UPDATE reading_blocks SET body = substr(body, 1, length(body) - 1)")
    with pytest.raises(JournalError, match="unreadable reading block 1"):
        j.read_readings(0, 10)
    j.close()


def test_second_owner_is_refused(tmp_path: Path) -> None:
    a = Journal(tmp_path / "j.sqlite")
    a.open()
    with pytest.raises(JournalLocked, match="in use by another controller"):
        Journal(tmp_path / "j.sqlite").open()
    a.close()
    b = Journal(tmp_path / "j.sqlite")
    b.open()
    b.close()


def test_failed_group_writes_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit([row(1)])
    j.db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON events BEGIN SELECT RAISE(FAIL, 'boom'); END"
    )
    with pytest.raises(JournalError, match="boom"):
        j.commit([row(2)], events=[EventRow(1.0, "k", {})], cursors={"d1": Cursor(0, 2, 1.0)})
    assert j.count("readings") == 1
    assert j.db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 0
    j.fold_state_log()
    assert j.db.execute("SELECT count(*) FROM device_cursors").fetchone()[0] == 0
    j.close()


def _crash_copy(j: Journal, dest: Path) -> Path:
    """The journal's files as a kill -9 leaves them (the WAL with its committed frames, no
    close): copied while it is open."""
    dest.mkdir()
    for suffix in ("", "-wal"):
        src = Path(f"{j.path}{suffix}")
        if src.exists():
            Path(f"{dest / j.path.name}{suffix}").write_bytes(src.read_bytes())
    return dest / j.path.name


def test_the_state_log_is_a_row_per_group_and_restores_after_a_crash(tmp_path: Path) -> None:
    """Cursors and shelf states are written as one state-log row per commit; a restart without
    a clean close (the tables never folded) restores the newest of each, in commit order."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit([], cursors={"d1": CURSOR}, shelf_states={"s": {"u": 1}, "t": {"u": 5}})
    later = CURSOR._replace(seq=41, applied=8)
    j.commit([row(1)], cursors={"d1": later, "d2": Cursor(1, 0, 2.0)}, shelf_states={"s": {"u": 2}})
    assert j.db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 2
    assert j.db.execute("SELECT count(*) FROM device_cursors").fetchone()[0] == 0
    cursors, states = journal_module.saved_state(j.db)
    assert states == {"s": {"u": 2}, "t": {"u": 5}}
    assert set(cursors) == {"d1", "d2"}
    crashed = _crash_copy(j, tmp_path / "crash")
    j.close()
    j2 = Journal(crashed)
    restored = j2.open()
    assert restored.cursors == {"d1": later, "d2": Cursor(1, 0, 2.0)}
    assert restored.cursors["d1"].holes == ((5, 9), (12, 12))
    assert restored.shelf_states == {"s": {"u": 2}, "t": {"u": 5}}
    # What the log held is folded by the next fold (here: the clean close).
    j2.commit([], shelf_states={"t": {"u": 6}})
    j2.close()
    db = sqlite3.connect(crashed)
    try:
        assert db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 0
        assert dict(db.execute("SELECT shelf, body FROM shelf_states")) == {
            "s": b'{"u":2}',
            "t": b'{"u":6}',
        }
        assert db.execute("SELECT device, seq FROM device_cursors ORDER BY device").fetchall() == [
            ("d1", 41),
            ("d2", 0),
        ]
    finally:
        db.close()


def test_the_state_log_is_folded_every_state_log_fold_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "STATE_LOG_FOLD", 3)
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    log_rows = []
    for n in range(1, 8):
        j.commit([], cursors={"d1": Cursor(0, n, float(n))}, shelf_states={"s": {"u": n}})
        log_rows.append(j.db.execute("SELECT count(*) FROM state_log").fetchone()[0])
    # Rows 1, 2; the third commit folds them into the tables (deleted with it: fewer than
    # STATE_LOG_DELETE_ROWS) and writes its own row: 1 row, and so on.
    assert log_rows == [1, 2, 1, 2, 1, 2, 1]
    assert j.state_folds == 3
    assert j.db.execute("SELECT body FROM shelf_states").fetchall() == [(b'{"u":6}',)]
    crashed = _crash_copy(j, tmp_path / "crash")
    j.close()
    j2 = Journal(crashed)
    restored = j2.open()
    j2.close()
    assert restored.cursors["d1"].seq == 7
    assert restored.shelf_states == {"s": {"u": 7}}


def test_a_fold_does_not_write_the_pages_it_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's SQLite zeroes every freed page by default (SQLITE_SECURE_DELETE): emptying a
    state log of ~2 MB then wrote ~2 MB more to the WAL. The journal's connections run with
    ``secure_delete=FAST``: the fold writes the state tables and the freelist, not the pages."""
    monkeypatch.setattr(journal_module, "CHECKPOINT_INTERVAL_S", 3600.0)  # the WAL only grows
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    wal = tmp_path / "j.sqlite-wal"
    try:
        big = {"window": [1234.5 + i for i in range(40)], "pending": [], "reason": "x" * 200}
        for n in range(100):  # rows of ~20 KB: each on a chain of overflow pages
            j.commit([], shelf_states={f"s{i}": {**big, "n": n} for i in range(30)})
        log_bytes = j.db.execute("SELECT sum(length(body)) FROM state_log").fetchone()[0]
        assert log_bytes > 1_500_000
        before = wal.stat().st_size
        j.fold_state_log()
        assert j.db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 0
        assert wal.stat().st_size - before < log_bytes / 10
    finally:
        j.close()


def test_folded_rows_are_deleted_a_few_per_commit_and_change_nothing_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold writes the log's rows into the tables and leaves them for the next commits to
    delete, `STATE_LOG_DELETE_ROWS` each (emptying the log in the folding commit held the
    writer turn ~1.8 ms at 20k msg/s). Until they are gone, a restart (or a tool, or an
    earlier version) reads them on top of the tables and gets the newest values: the folding
    commit's own changes, to a key those rows hold too, are in a row after them."""
    monkeypatch.setattr(journal_module, "STATE_LOG_FOLD", 4)
    monkeypatch.setattr(journal_module, "STATE_LOG_DELETE_ROWS", 1)
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    try:
        for n in range(1, 4):  # rows 1-3: "s" and "d1" move on, "t" once
            j.commit([], cursors={"d1": Cursor(0, n, float(n))}, shelf_states={"s": {"u": n}})
        # The fourth commit folds rows 1-3 and changes "s" and "d1" once more, in its own row.
        j.commit([], cursors={"d1": Cursor(0, 4, 4.0)}, shelf_states={"s": {"u": 4}})
        assert j.state_folds == 1
        assert dict(j.db.execute("SELECT shelf, body FROM shelf_states")) == {"s": b'{"u":3}'}
        ids = [i for (i,) in j.db.execute("SELECT id FROM state_log ORDER BY id")]
        assert ids == [2, 3, 4]  # row 1 deleted with the fold, rows 2 and 3 still there
        crashed = _crash_copy(j, tmp_path / "crash")
        # The next commits delete one folded row each.
        j.commit([], shelf_states={"t": {"u": 1}})
        assert [i for (i,) in j.db.execute("SELECT id FROM state_log ORDER BY id")] == [3, 4, 5]
        j.commit([], shelf_states={"t": {"u": 2}})
        assert [i for (i,) in j.db.execute("SELECT id FROM state_log ORDER BY id")] == [4, 5, 6]
        assert j.state_folds == 1
    finally:
        j.close()
    j2 = Journal(crashed)
    restored = j2.open()
    try:
        assert restored.shelf_states == {"s": {"u": 4}}
        assert restored.cursors["d1"].seq == 4
        assert journal_module.saved_state(j2.db)[1] == {"s": {"u": 4}}
    finally:
        j2.close()
    db = sqlite3.connect(crashed)  # closed cleanly: everything folded, the log empty
    try:
        assert db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 0
        assert dict(db.execute("SELECT shelf, body FROM shelf_states")) == {"s": b'{"u":4}'}
    finally:
        db.close()


@pytest.mark.parametrize(("fold", "delete"), [(4, 1), (32, 16), (256, 16)])
def test_the_state_log_never_holds_more_than_state_log_fold_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fold: int, delete: int
) -> None:
    """Folded rows waiting to be deleted and unfolded ones together: at most `STATE_LOG_FOLD`
    (what `Journal.open` reads on top of the tables; docs/architecture.md)."""
    monkeypatch.setattr(journal_module, "STATE_LOG_FOLD", fold)
    monkeypatch.setattr(journal_module, "STATE_LOG_DELETE_ROWS", delete)
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    try:
        most = 0
        for n in range(3 * fold + 5):
            j.commit([], shelf_states={"s": {"u": n}})
            most = max(most, j.db.execute("SELECT count(*) FROM state_log").fetchone()[0])
        assert j.state_folds >= 3
        assert fold - 1 <= most <= fold
    finally:
        j.close()


def test_the_state_log_is_folded_past_state_log_fold_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups that touch different shelves fold sooner: a fold writes every key the log holds,
    so their number is bounded too."""
    monkeypatch.setattr(journal_module, "STATE_LOG_FOLD_KEYS", 10)
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    for n in range(4):
        j.commit([], shelf_states={f"s{n}-{i}": {"u": i} for i in range(4)})
    # 4, 8 keys in the log; the third commit (8 < 10) adds 4 more; the fourth folds those 12
    # into the table and writes its own 4 in a row of the log.
    assert j.state_folds == 1
    assert j.db.execute("SELECT count(*) FROM state_log").fetchone()[0] == 1
    assert j.db.execute("SELECT count(*) FROM shelf_states").fetchone()[0] == 12
    assert len(journal_module.saved_state(j.db)[1]) == 16
    j.close()


def test_a_rolled_back_state_write_is_not_folded_later(tmp_path: Path) -> None:
    """A commit that fails after writing its state-log row leaves nothing behind: the journal's
    picture of its log is only updated once a transaction committed."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit([], shelf_states={"s": {"u": 1}})
    j.db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON events BEGIN SELECT RAISE(FAIL, 'boom'); END"
    )
    with pytest.raises(JournalError, match="boom"):
        j.commit([], shelf_states={"s": {"u": 99}, "x": {"u": 99}}, events=[EventRow(1.0, "k", {})])
    j.fold_state_log()
    assert dict(j.db.execute("SELECT shelf, body FROM shelf_states")) == {"s": b'{"u":1}'}
    j.close()


def test_a_second_connection_does_not_write_states(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    second = j.second_connection()
    second.open_second()
    try:
        with pytest.raises(JournalError, match="primary connection"):
            second.commit([], shelf_states={"s": {"u": 1}})
    finally:
        second.close()
        j.close()


def test_outbox_drain_and_dead_letter_bound(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    j.commit([row(i) for i in range(10)], [DeadLetter(1.0, "t", "r", "", b"") for _ in range(30)])
    rows = j.read_readings(0, 4)
    assert [r.seq for r in rows] == [0, 1, 2, 3]
    assert j.delete_confirmed(rows[-1].id, None) == 4
    assert j.outbox_rows == 6
    j.commit([], events=[EventRow(1.0, "k", {}) for _ in range(5)])
    assert j.trim_outbox(keep_readings=2, keep_events=1) == 4 + 4
    assert j.count("readings") == 2
    assert j.count("events") == 1
    assert j.outbox_rows == 3
    j.trim_dead_letters(10)
    assert j.count("dead_letters") == 10
    j.close()


def fill_to_the_limit(j: Journal) -> int:
    """Cap the file at its present size: the next commit that needs a page fails as a full
    disk does (SQLITE_FULL), without filling a real disk."""
    pages = int(j.db.execute("PRAGMA page_count").fetchone()[0])
    j.db.execute(f"PRAGMA max_page_count={pages}")
    return pages


def test_a_full_disk_is_journal_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    fill_to_the_limit(j)
    big = [ReadingRow("d1", 0, 0, i, 1.0, 100.0, "s" * 200) for i in range(2_000)]
    with pytest.raises(JournalUnavailable, match="full") as caught:
        j.commit(big, events=[EventRow(1.0, "k", {})])
    assert isinstance(caught.value, JournalError)  # callers that catch JournalError still do
    assert JournalError is ports.JournalError  # one class: the API need not import the adapter
    assert j.count("readings") == 0
    assert j.outbox_rows == 0
    j.db.execute("PRAGMA max_page_count=1073741823")  # space again: the same group commits
    j.commit(big)
    assert j.count("readings") == 2_000
    j.close()


def test_a_value_the_journal_cannot_store_is_not_journal_unavailable(tmp_path: Path) -> None:
    """A caller's bug (an integer SQLite cannot hold, a body JSON cannot encode) is a
    JournalError, never JournalUnavailable: retrying it would never succeed."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    for bad in (
        {"readings": [ReadingRow("d1", 0, 0, 2**70, 1.0, 100.0, "s")]},
        {"readings": (), "events": [EventRow(1.0, "k", {"x": {1, 2}})]},
    ):
        with pytest.raises(JournalError) as caught:
            j.commit(**bad)  # type: ignore[arg-type]
        assert not isinstance(caught.value, JournalUnavailable), caught.value
    assert j.count("readings") == 0
    j.close()


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "j.sqlite"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError):
        Journal(p).open()
    assert not isinstance(JournalError("x"), sqlite3.Error)


def test_checkpoints_run_outside_commits_and_bound_the_wal(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    assert j.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for g in range(50):
        j.commit([row(g * 100 + i) for i in range(100)])
    j.checkpointed.clear()
    assert j.checkpointed.wait(5), "the checkpoint thread did not run"
    assert j.checkpoint_error is None
    # After a checkpoint the next commits reuse the WAL from its start instead of growing it.
    wal = tmp_path / "j.sqlite-wal"
    size = wal.stat().st_size
    for g in range(50, 100):
        j.commit([row(g * 100 + i) for i in range(100)])
    j.checkpointed.clear()
    assert j.checkpointed.wait(5)
    assert wal.stat().st_size <= max(size * 2, 4 * 1024 * 1024)
    j.close()


def test_past_the_wal_limit_the_wal_starts_over_in_a_writer_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under sustained writes passive checkpoints never let the WAL start over. Past the
    limit the checkpoint thread takes a writer turn of the process for its last checkpoint:
    commits wait for it on the turns (woken at once), not in SQLite's busy handler (sleeps of
    up to 100 ms), and the next commit writes the WAL from its start instead of growing it."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    wal = tmp_path / "j.sqlite-wal"
    try:
        for g in range(10):
            j.commit([row(g * 100 + i) for i in range(100)])
        assert j._writers.acquire(timeout=1.0)  # a commit in progress
        monkeypatch.setattr(journal_module, "WAL_SIZE_LIMIT", 0)
        try:
            wait_for_condition_sync(
                lambda: j._writers.waiting, timeout_s=5.0, what="the checkpointer waiting"
            )
            assert j.wal_restarts == 0
        finally:
            j._writers.release()
        wait_for_condition_sync(lambda: j.wal_restarts, timeout_s=5.0, what="a WAL restart")
        assert j.checkpoint_error is None
        assert j.wal_restart_s > 0
        monkeypatch.setattr(journal_module, "WAL_SIZE_LIMIT", 1 << 40)
        size = wal.stat().st_size
        j.commit([row(5000 + i) for i in range(100)])
        assert wal.stat().st_size <= size  # written from the WAL's start: it did not grow
    finally:
        j.close()


def test_a_wal_restart_behind_a_reader_gives_up_and_frees_the_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL restart holds the writer turn: behind a reader on an older snapshot (a backup,
    an API read) its checkpoint cannot copy every frame; it gives up at once, then lets
    the commits go and tries again RESTART_RETRY_S later, not at every round."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    reader = sqlite3.connect(tmp_path / "j.sqlite", isolation_level=None)
    try:
        j.commit([row(i) for i in range(100)])
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM readings").fetchone()  # holds its snapshot
        j.commit([row(100 + i) for i in range(100)])
        monkeypatch.setattr(journal_module, "WAL_SIZE_LIMIT", 0)
        monkeypatch.setattr(journal_module, "RESTART_RETRY_S", 1.0)
        wait_for_condition_sync(
            lambda: j.wal_restarts_busy, timeout_s=2.0, what="a restart given up behind the reader"
        )
        assert j.wal_restarts == 0
        j.commit([row(200 + i) for i in range(100)])  # the writers are free again
        # Not tried again at every checkpoint round while the reader stays (0.25 s each).
        rounds = j.checkpoints
        wait_for_condition_sync(
            lambda: j.checkpoints >= rounds + 2, timeout_s=2.0, what="two checkpoint rounds"
        )
        assert j.wal_restarts_busy == 1
        reader.execute("COMMIT")
        wait_for_condition_sync(lambda: j.wal_restarts, timeout_s=5.0, what="a WAL restart")
    finally:
        reader.close()
        j.close()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 255, 256, 257, 700])
def test_multi_row_statements_write_what_executemany_writes(n: int) -> None:
    """`execute_rows` (many rows per statement: Python's sqlite3 releases the interpreter lock
    around every row's step, and each re-acquisition can wait 5 ms while another thread runs)
    writes the same rows in the same order, OR IGNORE and ON CONFLICT per row as executemany."""
    rows = [(i % 97, f"v{i}", float(i)) for i in range(n)]  # keys repeat: conflicts in a batch
    got, want = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    for db in (got, want):
        db.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v, x)")
        db.execute("CREATE TABLE u(k INTEGER UNIQUE, v, x)")
    execute_rows(
        got, "INSERT INTO t(k, v, x)", 3, rows, " ON CONFLICT(k) DO UPDATE SET v=excluded.v"
    )
    want.executemany(
        "INSERT INTO t(k, v, x) VALUES (?,?,?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", rows
    )
    execute_rows(got, "INSERT OR IGNORE INTO u(k, v, x)", 3, rows)
    want.executemany("INSERT OR IGNORE INTO u(k, v, x) VALUES (?,?,?)", rows)
    for table in ("t", "u"):
        query = f"SELECT rowid, k, v, x FROM {table} ORDER BY rowid"
        assert got.execute(query).fetchall() == want.execute(query).fetchall()


def _columns(n: int, *, seq_type: str = "q") -> ports.ReadingColumns:
    from array import array

    return ports.ReadingColumns(
        ["d1", "d2"],
        ["S0", "S1", "S2"],
        array("i", [i % 2 for i in range(n)]),
        array("i", [i % 3 for i in range(n)]),
        array("q", [0] * n),
        array("q", [1] * n),
        array(seq_type, range(n)),
        array("d", [1_800_000_000.0 + i / 3 for i in range(n)]),
        array("d", [0.1 * i for i in range(n)]),
        1_800_000_000.0,
        1_800_000_000.0 + (n - 1) / 3,
    )


def test_a_group_in_columns_is_a_block_of_the_same_readings(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    cols = _columns(7)
    j.commit(cols)
    assert [tuple(r[1:]) for r in j.read_readings(0, 100)] == cols.rows()
    assert j.has_reading("d2", 1, 5, 1_800_000_000.0 + 5 / 3)
    with pytest.raises(JournalError, match="reading column of type 'i'"):
        j.commit(_columns(3, seq_type="i"))  # a 32-bit seq column is refused, not misread
    assert j.count("readings") == 7
    j.close()


def _wal_salts(path: Path) -> bytes:
    """The salts of the WAL's header: new ones each time the WAL starts over."""
    with open(f"{path}-wal", "rb") as f:
        return f.read(32)[16:24]


def _order(n: int) -> dict[str, object]:
    return {
        "order_id": f"o-{n}", "channel": "api", "external_id": f"e-{n}", "state": "PICKING",
        "updated_ts": 1.0, "tasks": [{"cmd_id": n, "tote": n}],
    }  # fmt: skip


def test_after_a_complete_checkpoint_the_checkpoint_thread_starts_the_wal_over(
    tmp_path: Path,
) -> None:
    """SQLite starts the WAL over at the first commit that finds all of it copied, and that
    commit syncs the new WAL header (~1 ms, even with synchronous=NORMAL): with a checkpoint
    every 0.25 s, an order commit every few rounds paid it. On a quiet journal the checkpoint
    thread starts it over first: the next order commits append to the WAL as it stands (its
    salts stay), and a journal nobody writes is not written every round."""
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    j.open()
    desk = j.second_connection(priority=True)
    desk.open_second()
    try:
        for n in range(3):
            desk.commit_orders([_order(n)], counters={"order": n})
        wait_for_condition_sync(lambda: j.wal_prestarts, timeout_s=5.0, what="a WAL pre-start")
        assert j.checkpoint_error is None
        salts = _wal_salts(path)
        desk.commit_orders([_order(3)], counters={"order": 3})
        assert _wal_salts(path) == salts, "the order commit started the WAL over itself"
        # A quiet journal: after the pre-start's frames are copied, no more pre-starts.
        prestarts = j.wal_prestarts
        rounds = j.checkpoints
        wait_for_condition_sync(
            lambda: j.checkpoints >= rounds + 3, timeout_s=5.0, what="three checkpoint rounds"
        )
        assert j.wal_prestarts <= prestarts + 1  # the one for order 3's commit
        stable = j.wal_prestarts
        rounds = j.checkpoints
        wait_for_condition_sync(
            lambda: j.checkpoints >= rounds + 3, timeout_s=5.0, what="three more rounds"
        )
        assert j.wal_prestarts == stable
        assert desk.order_by_external("api", "e-3") is not None
    finally:
        desk.close()
        j.close()


def test_under_ingest_load_the_next_group_commit_starts_the_wal_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More ordinary commits in a round than WAL_PRESTART_MAX_TURNS: no pre-start (it would
    sync ingest's unsynced frames while holding the writer turn)."""
    monkeypatch.setattr(journal_module, "WAL_PRESTART_MAX_TURNS", -1)  # every round is busy
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    try:
        for g in range(5):
            j.commit([row(g * 100 + i) for i in range(100)])
        rounds = j.checkpoints
        wait_for_condition_sync(
            lambda: j.checkpoints >= rounds + 3, timeout_s=5.0, what="three checkpoint rounds"
        )
        assert j.wal_prestarts == 0
    finally:
        j.close()


def _order_commit_inputs(
    n: int, state: str = "PICKING"
) -> tuple[list[dict[str, object]], dict[str, int], list[ports.IdempotencyRow], list[EventRow]]:
    orders = [{**_order(i), "state": state, "updated_ts": 1.0 + i / 3} for i in range(n)]
    # The second commit's counters are lower for some names: the higher value is kept.
    counters = {f"cmd:s{i % 7}": i - 3 * (state != "PICKING") * (i % 2) for i in range(n)}
    keys = [
        ports.IdempotencyRow(f"k{i}", "floor", f"d{i}", 201, f"o-{i}", 2.0 + i / 7)
        for i in range(n)
    ]
    events = [
        EventRow(3.0 + i / 11, "order_state", {"order_id": f"o-{i}", "n": i}) for i in range(2 * n)
    ]
    return orders, counters, keys, events  # type: ignore[return-value]


def _order_tables(db: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the order commit's tables with each value's storage class."""
    out = {}
    for table, cols in (
        ("orders", "order_id, channel, external_id, state, open, updated_ts, body"),
        ("counters", "name, value"),
        ("idempotency", "key, principal, digest, status, order_id, created_ts"),
        ("events", "id, ts, kind, body"),
    ):
        typed = ", ".join(f"{c}, typeof({c})" for c in cols.split(", "))
        out[table] = db.execute(f"SELECT {typed} FROM {table} ORDER BY rowid").fetchall()
    return out


@pytest.mark.parametrize("n", [1, 3, 60])  # 60: 300 rows, more than one statement carries
def test_an_order_commit_writes_what_a_statement_per_table_wrote(tmp_path: Path, n: int) -> None:
    """The order commit goes through the connection's ``order_commit`` view (a trigger per
    row kind): the file holds the same rows, values and storage classes as the statements per
    table wrote before (the previous version reads it), upserts included (a second commit
    moves the orders on, keeps the higher counter, replaces the keys)."""
    got, want = Journal(tmp_path / "got.sqlite"), Journal(tmp_path / "want.sqlite")
    got.open()
    want.open()
    desk = got.second_connection(priority=True)
    desk.open_second()
    try:
        for state in ("PICKING", "SORTED"):
            orders, counters, keys, events = _order_commit_inputs(n, state)
            desk.commit_orders(orders, counters=counters, idempotency=keys, events=events)
            db = want.db
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO orders(order_id, channel, external_id, state, open, updated_ts, "
                "body) VALUES (?,?,?,?,?,?,?) ON CONFLICT(order_id) DO UPDATE SET "
                "state=excluded.state, open=excluded.open, updated_ts=excluded.updated_ts, "
                "body=excluded.body",
                [
                    (
                        o["order_id"],
                        o["channel"],
                        o["external_id"],
                        o["state"],
                        int(o["state"] == "PICKING"),
                        o["updated_ts"],
                        orjson.dumps(o),
                    )
                    for o in orders
                ],
            )
            db.executemany(
                "INSERT INTO counters(name, value) VALUES (?,?) "
                "ON CONFLICT(name) DO UPDATE SET value=max(value, excluded.value)",
                list(counters.items()),
            )
            db.executemany(
                "INSERT OR REPLACE INTO idempotency(key, principal, digest, status, order_id, "
                "created_ts) VALUES (?,?,?,?,?,?)",
                keys,
            )
            db.executemany(
                "INSERT INTO events(ts, kind, body) VALUES (?,?,?)",
                [(e.ts_s, e.kind, orjson.dumps(e.body)) for e in events],
            )
            db.execute("COMMIT")
        assert _order_tables(desk.db) == _order_tables(want.db)
        assert len(_order_tables(desk.db)["events"]) == 4 * n
    finally:
        desk.close()
        got.close()
        want.close()


def test_an_order_commit_is_one_statement(tmp_path: Path) -> None:
    """A pick's order commit (an order, its counters, its key, its events) is one statement,
    no BEGIN or COMMIT: on the control loop's thread each statement hands the interpreter
    lock to ingest (up to a switch interval back under load)."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    desk = j.second_connection(priority=True)
    desk.open_second()
    try:
        orders, counters, keys, events = _order_commit_inputs(1)
        seen: list[str] = []
        desk.db.set_trace_callback(seen.append)  # once per statement and per trigger run
        desk.commit_orders(orders, counters=counters, idempotency=keys, events=events)
        desk.db.set_trace_callback(None)
        assert len(set(seen)) == 1, seen
        assert seen[0].startswith("INSERT INTO order_commit"), seen[0]
        assert not desk.db.in_transaction
        assert desk.order("o-0") == orders[0]
    finally:
        desk.close()
        j.close()


def test_an_order_commit_the_journal_cannot_encode_is_a_journal_error(tmp_path: Path) -> None:
    """A body orjson cannot encode is a JournalError (its cause the original), as any value
    the journal cannot store; nothing is written and the writer turn is free."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    desk = j.second_connection(priority=True)
    desk.open_second()
    try:
        with pytest.raises(JournalError, match="order commit failed") as info:
            desk.commit_orders([{**_order(1), "bad": {1, 2}}])  # a set: not JSON
        assert isinstance(info.value.__cause__, TypeError)
        with pytest.raises(JournalError, match="order commit failed"):
            desk.commit_orders([_order(2)], events=[EventRow(1.0, "k", {"x": object()})])
        assert desk.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 0
        desk.commit_orders([_order(3)])  # the turn was given back
        assert desk.order("o-3") is not None
    finally:
        desk.close()
        j.close()


@pytest.mark.parametrize("n", [2, 60])
def test_a_refused_order_commit_writes_nothing(tmp_path: Path, n: int) -> None:
    """One statement or several in a transaction: an order commit refused by its last order
    (another order's channel and external id) leaves nothing of it behind."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    desk = j.second_connection(priority=True)
    desk.open_second()
    try:
        desk.commit_orders([{**_order(999), "external_id": "taken"}])
        before = _order_tables(desk.db)
        orders, counters, keys, events = _order_commit_inputs(n)
        orders[-1] = {**orders[-1], "external_id": "taken"}
        with pytest.raises(journal_module.DuplicateOrderError):
            desk.commit_orders(orders, counters=counters, idempotency=keys, events=events)
        assert _order_tables(desk.db) == before
        assert not desk.db.in_transaction
    finally:
        desk.close()
        j.close()
