"""The catalogue in the journal (layout 2): records, versions and the audit trail.

``catalog_records`` holds the current catalogue, one row per SKU, scale or shelf in file order
(``body``: the record's values as a JSON array, in the order of the column names kept once in
``meta`` under ``catalog_columns``; every value validated on import). Each change makes a
new version: a ``catalog_versions`` row (who, from where, how many records added, removed,
changed) and one ``catalog_audit`` row per record changed (``op`` add / remove / change, the
whole record before and after). Writes happen in one transaction: a catalogue is never half
replaced. Audit rows older than ``[journal] catalog_audit_keep_days`` are deleted at each start
(`keep_audit`, which records the retention in ``meta``) and by each new version.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson

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
            "WHERE kind = ? AND record_id = ? ORDER BY id",
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
            "ORDER BY id",
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
    """At start: record the site's audit retention for the versions written later (by the
    controller or an import) and delete the audit rows older than it. Returns the rows deleted.
    ``db`` as for `replace`."""
    if not _has_tables(db):
        return 0
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


def _trim_audit(db: sqlite3.Connection, keep_days: float, now_s: float) -> int:
    """Delete the audit rows written before ``now_s - keep_days``. Rows are appended in time
    order, so the old ones are the first ids: found from the start of the table (no index on
    ``ts``; the cost is the rows deleted), with ``ts`` checked again (a clock stepped back
    never deletes a young row)."""
    cutoff = now_s - keep_days * 86_400.0
    young = db.execute(
        "SELECT id FROM catalog_audit WHERE ts >= ? ORDER BY id LIMIT 1", (cutoff,)
    ).fetchone()
    if young is None:
        return int(db.execute("DELETE FROM catalog_audit WHERE ts < ?", (cutoff,)).rowcount)
    return int(
        db.execute("DELETE FROM catalog_audit WHERE id < ? AND ts < ?", (young[0], cutoff)).rowcount
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
        db.executemany(
            "INSERT INTO catalog_audit(version, ts, actor, source, kind, record_id, op, before, "
            "after) VALUES (?,?,?,?,?,?,?,?,?)",
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
    db.executemany("INSERT INTO catalog_records(kind, id, body) VALUES (?,?,?)", rows)
    n = len(rows)
    rows.clear()
    return n
