"""The catalogue in the journal (layout 2): records, versions and the audit trail.

``catalog_records`` holds the current catalogue, one row per SKU, scale or shelf in file order
(``body``: the record's values as a JSON array, in the order of the column names kept once in
``meta`` under ``catalog_columns``; every value validated on import). Each change makes a
new version: a ``catalog_versions`` row (who, from where, how many records added, removed,
changed) and one ``catalog_audit`` row per record changed (``op`` add / remove / change, the
whole record before and after). A catalogue is never half replaced: `replace` (an import, the
start) writes in one transaction; a change on a running controller is staged in short
transactions and swapped in by one (`stage`, `swap`, `finish` below). Audit rows older than
``[journal] catalog_audit_keep_days`` are deleted at each start (`keep_audit`, which records the
retention in ``meta`` and removes what an interrupted change left staged) and by each new
version.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson

from controller.adapters.journal import execute_rows
from controller.catalog.diff import CatalogueDiff, diff
from controller.catalog.records import (
    COLUMNS,
    KINDS,
    Catalogue,
    Model,
    builder,
    flat,
    shared_columns,
)
from controller.config import JournalConfig, ScaleConfig, ShelfConfig, SkuConfig
from controller.ports import JournalError

CATALOG_LAYOUT = 2
"""The journal layout that has the catalogue tables."""

_COLUMNS_KEY = "catalog_columns"
"""``meta`` key of the columns (per kind, in order) of the records' bodies: each body is a JSON
array of values in that order, so the column names are stored once, not per record."""


@dataclass(frozen=True, slots=True)
class VersionRow:
    version: int
    ts_s: float
    actor: str
    source: str
    detail: str
    added: int
    removed: int
    changed: int


def _has_tables(db: sqlite3.Connection) -> bool:
    layout = int(db.execute("PRAGMA user_version").fetchone()[0])
    return layout >= CATALOG_LAYOUT


def current_version(db: sqlite3.Connection) -> int:
    """The latest catalogue version (0: the journal never held a catalogue)."""
    if not _has_tables(db):
        return 0
    row = db.execute("SELECT max(version) FROM catalog_versions").fetchone()
    return int(row[0] or 0)


_POSITIVE_ZERO = 0.0


def _sharing(columns: dict[str, list[str]]) -> dict[str, Callable[[list[Any]], list[Any]]]:
    """Per kind, what makes equal values of a row read back share one object: each row decodes
    into new strings and numbers, while a catalogue repeats most of them (zones, formats, the
    scale and SKU ids a shelf names, weights, tolerances, intervals). Only the columns that
    repeat (`shared_columns`), each with the memo of its type: the rows hold what the import
    validated (an int column ints, a float column floats), so ``1`` never becomes ``1.0``; a
    zero keeps its sign. The row is changed in place and returned."""
    strs = cast(dict[str, str], {}).setdefault
    ints = cast(dict[int, int], {}).setdefault
    floats = cast(dict[float, float], {}).setdefault
    copysign = math.copysign

    def sharing(at: dict[type, tuple[int, ...]]) -> Callable[[list[Any]], list[Any]]:
        str_at, int_at, float_at = at[str], at[int], at[float]

        def share(row: list[Any]) -> list[Any]:
            for i in str_at:
                x = row[i]
                row[i] = strs(x, x)
            for i in int_at:
                x = row[i]
                row[i] = ints(x, x)
            for i in float_at:
                x = row[i]
                if x:
                    row[i] = floats(x, x)
                elif x is not None and copysign(1.0, x) > 0:
                    row[i] = _POSITIVE_ZERO
            return row

        return share

    return {k: sharing(shared_columns(k, columns.get(k, COLUMNS[k]))) for k in KINDS}


def load(db: sqlite3.Connection, *, share: bool = True) -> Catalogue | None:
    """The journal's catalogue, built without validation (it was validated when written);
    ``None`` when the journal has none. ``share``: equal values share one object (`_sharing`),
    for a catalogue kept (it costs about a quarter of the time of a load and saves a third of
    its memory); not for one compared and dropped."""
    version = current_version(db)
    if version == 0:
        return None
    row = db.execute("SELECT value FROM meta WHERE key = ?", (_COLUMNS_KEY,)).fetchone()
    columns: dict[str, list[str]] = orjson.loads(row[0]) if row else {}
    build: dict[str, Callable[[list[Any]], Model]] = {
        k: builder(k, columns.get(k, COLUMNS[k])) for k in KINDS
    }
    by_kind: dict[str, list[Model]] = {k: [] for k in KINDS}
    rows = db.execute("SELECT kind, body FROM catalog_records ORDER BY seq")
    if share:
        shares = _sharing(columns)
        steps = {k: (by_kind[k].append, build[k], shares[k]) for k in KINDS}
        for kind, body in rows:
            append, built, shared = steps[kind]
            append(built(shared(orjson.loads(body))))
    else:
        for kind, body in rows:
            by_kind[kind].append(build[kind](orjson.loads(body)))
    return Catalogue(
        cast(tuple[SkuConfig, ...], tuple(by_kind["sku"])),
        cast(tuple[ScaleConfig, ...], tuple(by_kind["scale"])),
        cast(tuple[ShelfConfig, ...], tuple(by_kind["shelf"])),
        version=version,
    )


def read_journal(path: Path) -> Catalogue | None:
    """The catalogue of the journal file at ``path`` through a read-only connection (safe
    while the controller runs; it neither locks nor migrates); ``None`` when the file does not
    exist or holds no catalogue. JournalError when it cannot be read."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the catalogue of journal {path}: {exc}") from exc
    try:
        return load(db)
    except (sqlite3.Error, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise JournalError(f"cannot read the catalogue of journal {path}: {exc}") from exc
    finally:
        db.close()


def versions(db: sqlite3.Connection) -> list[VersionRow]:
    """Every catalogue version, oldest first."""
    if not _has_tables(db):
        return []
    return [
        VersionRow(*row)
        for row in db.execute(
            "SELECT version, ts, actor, source, detail, added, removed, changed "
            "FROM catalog_versions ORDER BY version"
        )
    ]


def audit(db: sqlite3.Connection, kind: str, record_id: str) -> list[dict[str, Any]]:
    """The audit rows of one record, oldest first."""
    return [
        {
            "version": v,
            "ts": ts,
            "actor": actor,
            "source": source,
            "op": op,
            "before": orjson.loads(b) if b is not None else None,
            "after": orjson.loads(a) if a is not None else None,
        }
        for v, ts, actor, source, op, b, a in db.execute(
            "SELECT version, ts, actor, source, op, before, after FROM catalog_audit "
            f"WHERE kind = ? AND record_id = ? AND {_IN_FORCE} ORDER BY id",
            (kind, record_id),
        )
    ]


def version_audit(db: sqlite3.Connection, version: int) -> list[dict[str, Any]]:
    """The audit rows of one version, in the order they were written."""
    if not _has_tables(db):
        return []
    return [
        {
            "kind": kind,
            "id": record_id,
            "op": op,
            "before": orjson.loads(b) if b is not None else None,
            "after": orjson.loads(a) if a is not None else None,
        }
        for kind, record_id, op, b, a in db.execute(
            "SELECT kind, record_id, op, before, after FROM catalog_audit WHERE version = ? "
            f"AND {_IN_FORCE} ORDER BY id",
            (version,),
        )
    ]


_AUDIT_KEEP_KEY = "catalog_audit_keep_days"
"""``meta`` key of the audit retention the controller last started with (``[journal]
catalog_audit_keep_days``), which every new version applies, also one an import writes."""

DEFAULT_AUDIT_KEEP_DAYS: float = JournalConfig.model_fields["catalog_audit_keep_days"].default


def keep_audit(
    db: sqlite3.Connection, keep_days: float, clock: Callable[[], float] = time.time
) -> int:
    """At start: remove what an interrupted live change left staged (`clean_staged`), record
    the site's audit retention for the versions written later (by the controller or an import)
    and delete the audit rows older than it. Returns the audit rows deleted.
    ``db`` as for `replace`."""
    if not _has_tables(db):
        return 0
    clean_staged(db)
    with _transaction(db, "the catalogue audit could not be trimmed"):
        db.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            (_AUDIT_KEEP_KEY, orjson.dumps(keep_days).decode()),
        )
        return _trim_audit(db, keep_days, clock())


@contextmanager
def _transaction(db: sqlite3.Connection, failed: str) -> Iterator[None]:
    """One write transaction: committed at the end of the block (unless the block rolled it
    back itself), rolled back on any exception; a SQLite error raised as JournalError."""
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        if db.in_transaction:
            db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise JournalError(f"{failed}: {exc}") from exc
        raise


def _kept_days(db: sqlite3.Connection) -> float:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (_AUDIT_KEEP_KEY,)).fetchone()
    return float(orjson.loads(row[0])) if row else DEFAULT_AUDIT_KEEP_DAYS


def _trim_audit(
    db: sqlite3.Connection, keep_days: float, now_s: float, limit: int | None = None
) -> int:
    """Delete the audit rows written before ``now_s - keep_days`` (at most ``limit``, the
    oldest first); how many. Rows are appended in time order, so the old ones are the first
    ids: found from the start of the table (no index on ``ts``; the cost is the rows deleted),
    with ``ts`` checked again (a clock stepped back never deletes a young row)."""
    cutoff = now_s - keep_days * 86_400.0
    young = db.execute(
        "SELECT id FROM catalog_audit WHERE ts >= ? ORDER BY id LIMIT 1", (cutoff,)
    ).fetchone()
    end = young[0] if young is not None else 1 << 62
    if limit is None:
        return int(
            db.execute("DELETE FROM catalog_audit WHERE id < ? AND ts < ?", (end, cutoff)).rowcount
        )
    return int(
        db.execute(
            "DELETE FROM catalog_audit WHERE id IN (SELECT id FROM catalog_audit WHERE id < ? "
            "AND ts < ? ORDER BY id LIMIT ?)",
            (end, cutoff, limit),
        ).rowcount
    )


def _dumps(record: dict[str, Any] | None) -> bytes | None:
    return None if record is None else orjson.dumps(record)


WRITE_PROGRESS_EVERY = 10_000
"""Records between two progress calls of `replace`."""


def replace(
    db: sqlite3.Connection,
    catalogue: Catalogue,
    *,
    actor: str,
    source: str,
    detail: str,
    clock: Callable[[], float] = time.time,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, CatalogueDiff]:
    """Make ``catalogue`` the journal's catalogue, in one transaction: a new version and its
    audit rows when it differs from the stored one (else nothing is written). Returns the
    version now current and the changes. ``db`` is a journal connection at layout 2 or later,
    outside a transaction."""
    clean_staged(db)
    with _transaction(db, "the catalogue could not be written"):
        before = load(db, share=False) or Catalogue()
        changes = diff(before, catalogue)
        if not changes and before.same_records(catalogue):
            db.execute("ROLLBACK")
            return before.version, changes
        version = before.version + 1
        now = clock()
        counts = changes.counts()
        db.execute(
            "INSERT INTO catalog_versions(version, ts, actor, source, detail, added, removed, "
            "changed) VALUES (?,?,?,?,?,?,?,?)",
            (
                version,
                now,
                actor,
                source,
                detail,
                counts["add"],
                counts["remove"],
                counts["change"],
            ),
        )
        execute_rows(
            db,
            "INSERT INTO catalog_audit(version, ts, actor, source, kind, record_id, op, before, "
            "after)",
            9,
            [
                (version, now, actor, source, c.kind, c.id, c.op, _dumps(c.before), _dumps(c.after))
                for c in changes.changes
            ],
        )
        _trim_audit(db, _kept_days(db), now)
        # The records are rewritten whole, so their order is the new file's.
        db.execute("DELETE FROM catalog_records")
        db.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            (_COLUMNS_KEY, orjson.dumps(COLUMNS).decode()),
        )
        total = len(catalogue)
        rows: list[tuple[str, str, bytes]] = []
        written = 0
        known = {(c.kind, c.id): c.after for c in changes.changes if c.after is not None}
        for kind in KINDS:
            columns = COLUMNS[kind]
            for model in catalogue.records(kind):
                rec = known.get((kind, model.id)) or flat(kind, model)
                rows.append((kind, model.id, orjson.dumps([rec[c] for c in columns])))
                if len(rows) == WRITE_PROGRESS_EVERY:
                    written += _insert(db, rows)
                    if progress is not None:
                        progress(written, total)
        if rows or not written:
            written += _insert(db, rows)
            if progress is not None:
                progress(written, total)
    return version, changes


def _insert(db: sqlite3.Connection, rows: list[tuple[str, str, bytes]]) -> int:
    execute_rows(db, "INSERT INTO catalog_records(kind, id, body)", 3, rows)
    n = len(rows)
    rows.clear()
    return n


# -- a change written beside a running controller (controller/catalog/live.py) ----------------
#
# `replace` writes in one transaction, which holds SQLite's write lock for its whole length: on
# a running controller every ingest commit waits for it (17 s at 100k records). A live change
# is written in short transactions instead, each taking turns with ingest's commits:
#
# 1. `stage` (a worker thread, its own connection): the new records go into a staging table,
#    its audit rows into ``catalog_audit`` under the coming version, both in slices of
#    `SLICE_ROWS`; ``meta`` names what is staged (`_STAGED_KEY`), so the next start or change
#    can remove it.
# 2. `swap` (one short transaction): checks that the version is still the one the change was
#    planned against, renames the staging table into place and writes the version row. Until
#    it commits the journal holds the old catalogue whole: readers never see half a change,
#    and the coming version's audit rows are not read (`_IN_FORCE`).
# 3. `finish` (a worker thread): trims the audit and deletes the old records in slices.
#
# A crash (kill -9) anywhere leaves either the old catalogue or the new one, whole; what it
# leaves staged is removed by `clean_staged` (at start, through `keep_audit`, and before each
# change).

Transaction = Callable[[str], AbstractContextManager[sqlite3.Connection]]
"""A connection's `Journal.transaction`: one short write transaction, named for its error."""

SLICE_ROWS = 1_000
"""Rows written per short transaction of a live change: ingest's commits wait for at most one
(a change of 10k SKUs, 30k records and 10k audit rows, on a shared 2-core machine: median
6.5 ms, at most 11 ms; slices of 2,000 rows took 13-25 ms)."""

_STAGING = "catalog_records_staged"
_OLD = "catalog_records_old"
_STAGED_KEY = "catalog_staged"
"""``meta`` key of a staged change: its version and the first audit row id it wrote."""
_INDEX_NAMES = ("catalog_records_id", "catalog_records_id_b")
"""The unique (kind, id) index of the records goes with the table when it is renamed into
place: the staging table takes whichever name is free."""
_IN_FORCE = "version <= (SELECT coalesce(max(version), 0) FROM catalog_versions)"
"""Audit rows of versions written: not those a change in progress has staged."""


class VersionMoved(JournalError):
    """The journal's catalogue version is not the one a change was planned against."""

    def __init__(self, expected: int, found: int) -> None:
        self.expected = expected
        self.found = found
        super().__init__(
            f"the catalogue changed meanwhile (version {expected} -> {found}): read it again "
            "and make the change against the version in force"
        )


@dataclass(frozen=True, slots=True)
class Staged:
    """A change written up to its swap: the version it makes, from which, its counts."""

    version: int
    from_version: int
    ts_s: float
    actor: str
    source: str
    detail: str
    counts: dict[str, int]


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master")}


def clean_staged(db: sqlite3.Connection) -> bool:
    """Remove what a change interrupted before its swap (or before its `finish`) left: the
    staging table, its audit rows (their version was never written), the old records. ``db``
    outside a transaction. Returns whether anything was left."""
    if not _has_tables(db) or not _left_staged(db):
        return False
    with _transaction(db, "the catalogue change left staged could not be removed"):
        _clean(db)
    return True


def _left_staged(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT 1 FROM meta WHERE key = ?", (_STAGED_KEY,)).fetchone()
    return row is not None or bool(_tables(db) & {_STAGING, _OLD})


def _clean(db: sqlite3.Connection) -> None:
    """`clean_staged`'s work, in the caller's transaction."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (_STAGED_KEY,)).fetchone()
    if row is not None:
        staged = orjson.loads(row[0])
        version = int(staged["version"])
        if current_version(db) < version:
            db.execute(
                "DELETE FROM catalog_audit WHERE id >= ? AND version = ?",
                (int(staged["audit_from"]), version),
            )
        db.execute("DELETE FROM meta WHERE key = ?", (_STAGED_KEY,))
    for table in (_STAGING, _OLD):
        db.execute(f"DROP TABLE IF EXISTS {table}")


def _write_slice(tx: Transaction, head: str, width: int, rows: list[tuple[Any, ...]]) -> None:
    """One short transaction of a staged change, in multi-row statements (`execute_rows`: row
    by row, each step of a worker's executemany waited for the interpreter lock behind the
    main loop, and the slice held the journal's write turn from ingest for seconds)."""
    with tx("the catalogue change could not be staged") as db:
        execute_rows(db, head, width, rows)


def _check_version(db: sqlite3.Connection, expected: int) -> None:
    found = current_version(db)
    if found != expected:
        raise VersionMoved(expected, found)


def stage(
    tx: Transaction,
    catalogue: Catalogue,
    changes: CatalogueDiff,
    *,
    from_version: int,
    actor: str,
    source: str,
    detail: str,
    clock: Callable[[], float] = time.time,
) -> Staged:
    """Steps 1 of a live change (module comment above): the records of ``catalogue`` and the
    audit rows of ``changes`` (its diff against version ``from_version``, the one in force)
    written beside the catalogue in force, in short transactions of ``tx`` (a connection's
    `Journal.transaction`: each takes turns with the process's other writers). From a worker
    thread. VersionMoved when the journal is past ``from_version``; JournalError when it
    cannot be written (what was staged stays until `clean_staged`)."""
    version = from_version + 1
    now = clock()
    with tx("the catalogue change could not be staged") as db:
        _check_version(db, from_version)
        _clean(db)
        names = _tables(db)
        index = next(n for n in _INDEX_NAMES if n not in names)
        db.execute(
            f"CREATE TABLE {_STAGING} (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
            "id TEXT NOT NULL, body BLOB NOT NULL)"
        )
        db.execute(f"CREATE UNIQUE INDEX {index} ON {_STAGING} (kind, id)")
        audit_from = int(
            db.execute("SELECT coalesce(max(id), 0) + 1 FROM catalog_audit").fetchone()[0]
        )
        db.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            (_STAGED_KEY, orjson.dumps({"version": version, "audit_from": audit_from}).decode()),
        )
    # Each slice encoded before its transaction (which only writes), one slice alive at a
    # time: encoded whole, a catalogue's rows took several times its size (orjson's bytes
    # keep their buffer's spare capacity).
    known = {(c.kind, c.id): c.after for c in changes.changes if c.after is not None}
    insert = f"INSERT INTO {_STAGING}(kind, id, body)"
    for kind in KINDS:
        columns = COLUMNS[kind]
        models = catalogue.records(kind)
        for i in range(0, len(models), SLICE_ROWS):
            rows: list[tuple[Any, ...]] = []
            for model in models[i : i + SLICE_ROWS]:
                rec = known.get((kind, model.id)) or flat(kind, model)
                rows.append((kind, model.id, orjson.dumps([rec[c] for c in columns])))
            _write_slice(tx, insert, 3, rows)
    insert = (
        "INSERT INTO catalog_audit(version, ts, actor, source, kind, record_id, op, before, after)"
    )
    for i in range(0, len(changes.changes), SLICE_ROWS):
        rows = [
            (version, now, actor, source, c.kind, c.id, c.op, _dumps(c.before), _dumps(c.after))
            for c in changes.changes[i : i + SLICE_ROWS]
        ]
        _write_slice(tx, insert, 9, rows)
    return Staged(version, from_version, now, actor, source, detail, changes.counts())


def swap(tx: Transaction, staged: Staged) -> int:
    """Step 2 (module comment above): the staged records become the catalogue and
    ``staged.version`` the version in force, in one short transaction. Returns the version.
    VersionMoved when the journal moved past the version the change was planned against;
    JournalError when it cannot be written (the old catalogue stays in force)."""
    with tx("the catalogue could not be written") as db:
        _check_version(db, staged.from_version)
        counts = staged.counts
        db.execute(
            "INSERT INTO catalog_versions(version, ts, actor, source, detail, added, removed, "
            "changed) VALUES (?,?,?,?,?,?,?,?)",
            (
                staged.version,
                staged.ts_s,
                staged.actor,
                staged.source,
                staged.detail,
                counts["add"],
                counts["remove"],
                counts["change"],
            ),
        )
        db.execute(f"ALTER TABLE catalog_records RENAME TO {_OLD}")
        db.execute(f"ALTER TABLE {_STAGING} RENAME TO catalog_records")
        db.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            (_COLUMNS_KEY, orjson.dumps(COLUMNS).decode()),
        )
        db.execute("DELETE FROM meta WHERE key = ?", (_STAGED_KEY,))
    return staged.version


def finish(tx: Transaction, staged: Staged) -> None:
    """Step 3 (module comment above): the audit trimmed to its retention and the replaced
    records deleted, in short transactions. From a worker thread; JournalError when it cannot
    (the next change or start does it: `clean_staged`)."""
    # A slice per transaction: when a big import's audit (100k rows and more) ages out, it
    # would be deleted at once.
    while True:
        with tx("the catalogue audit could not be trimmed") as db:
            if _trim_audit(db, _kept_days(db), staged.ts_s, limit=SLICE_ROWS) < SLICE_ROWS:
                break
    delete = f"DELETE FROM {_OLD} WHERE seq IN (SELECT seq FROM {_OLD} ORDER BY seq LIMIT ?)"
    while True:
        with tx("the replaced catalogue records could not be deleted") as db:
            if _OLD not in _tables(db):
                return
            if db.execute(delete, (SLICE_ROWS,)).rowcount < SLICE_ROWS:
                db.execute(f"DROP TABLE {_OLD}")
                return
