"""The durable journal: one SQLite (WAL) file holding the outbox and the controller's state.

Everything a batch of MQTT messages changes is written in ONE transaction: the readings (the
outbox rows the historian drains), dead letters, the per-device sequence cursors, the shelf
states and the domain events. The broker is acknowledged only after that commit, so after a
crash the state on disk and the set of acknowledged messages agree exactly: an acknowledged
reading is never lost, a redelivered one is recognised by its cursor and never applied twice.

The file is owned by one process at a time (an exclusive ``flock`` on ``<path>.lock``): a second
controller with the same journal refuses to start instead of fighting over it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from controller.domain.model import OrderState
from controller.domain.orders import OPEN_ORDER_STATES
from controller.ports import (
    Cursor,
    DeadLetter,
    DuplicateOrder,
    EventRow,
    IdempotencyRow,
    JournalUnavailable,
    OutboxEvent,
    OutboxReading,
    ReadingColumns,
    ReadingFields,
)
from controller.ports import JournalError as JournalError  # re-exported: callers' import

log = logging.getLogger("floorhand.journal")

SCHEMA_VERSION = 3
"""The journal layout this controller writes, kept in ``PRAGMA user_version`` (and, for
releases that only read it there, in ``meta.schema_version``). `MIGRATIONS` lead up to it."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    channel INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    weight_g REAL NOT NULL,
    shelf TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS readings_identity ON readings (device, epoch, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS device_cursors (
    device TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    window BLOB NOT NULL,
    ts REAL NOT NULL,
    applied INTEGER NOT NULL,
    floor INTEGER,
    holes BLOB,
    gaps INTEGER,
    missing INTEGER
);
CREATE TABLE IF NOT EXISTS shelf_states (shelf TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS alert_states (key TEXT PRIMARY KEY, body BLOB NOT NULL);
"""

# -- orders and pick commands (controller/services/picking.py) ----------------------------------
_OPEN_ORDER_STATES = frozenset(s.value for s in OPEN_ORDER_STATES)
_CLOSED_ORDER_STATES = (
    OrderState.SHIPPED.value,
    OrderState.EXCEPTION.value,
    OrderState.CANCELLED.value,
)
"""Orders ``trim_orders`` may delete once old enough (``[picking] keep_closed_days``)."""
_ORDER_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    external_id TEXT NOT NULL,
    state TEXT NOT NULL,
    open INTEGER NOT NULL,
    updated_ts REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS orders_external ON orders (channel, external_id);
CREATE INDEX IF NOT EXISTS orders_open ON orders (open) WHERE open = 1;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    digest TEXT NOT NULL,
    status INTEGER NOT NULL,
    order_id TEXT NOT NULL,
    created_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# -- shelf calibration overrides (ops API, controller/api/routes/ops.py) -- begin ----------------
_CALIBRATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS shelf_calibrations (shelf TEXT PRIMARY KEY, body BLOB NOT NULL);
"""
# -- shelf calibration overrides -- end -----------------------------------------------------------

_CURSOR_COLUMNS = {"floor": "INTEGER", "holes": "BLOB", "gaps": "INTEGER", "missing": "INTEGER"}
"""Columns journals written before gap accounting lack (added on open). Their rows carry a
``window`` bitmap of the 256 seqs below the newest instead (bit i ↔ seq − 1 − i), read once by
``_legacy_cursor``; cursors written since store an empty window."""


def _statements(script: str) -> list[str]:
    """The statements of a DDL script, run one by one: ``executescript`` would commit the
    migration's transaction half way."""
    return [stmt.strip() for stmt in script.split(";") if stmt.strip()]


def _migrate_to_1(db: sqlite3.Connection) -> None:
    """Layout 1, the baseline: what every journal before versioning (``user_version`` 0) had
    or lacked, completed. Creates the tables older layouts lack (orders, idempotency, counters,
    shelf_calibrations; all of them for a new file) and the gap-accounting cursor columns;
    a journal that already has them is left as it is."""
    for stmt in _statements(_SCHEMA + _ORDER_SCHEMA + _CALIBRATION_SCHEMA):
        db.execute(stmt)
    have = {r[1] for r in db.execute("PRAGMA table_info(device_cursors)")}
    for column, kind in _CURSOR_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE device_cursors ADD COLUMN {column} {kind}")


def _migrate_to_2(db: sqlite3.Connection) -> None:
    """Layout 2: the site's catalogue (SKUs, scales, shelves; controller/adapters/
    catalog_store.py): its records in file order, a row per catalogue version, and an audit row
    per record changed."""
    for stmt in _statements(
        """
        CREATE TABLE IF NOT EXISTS catalog_records (
            seq INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            body BLOB NOT NULL
        );
        CREATE UNIQUE INDEX IF NOT EXISTS catalog_records_id ON catalog_records (kind, id);
        CREATE TABLE IF NOT EXISTS catalog_versions (
            version INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            actor TEXT NOT NULL,
            source TEXT NOT NULL,
            detail TEXT NOT NULL,
            added INTEGER NOT NULL,
            removed INTEGER NOT NULL,
            changed INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS catalog_audit (
            id INTEGER PRIMARY KEY,
            version INTEGER NOT NULL,
            ts REAL NOT NULL,
            actor TEXT NOT NULL,
            source TEXT NOT NULL,
            kind TEXT NOT NULL,
            record_id TEXT NOT NULL,
            op TEXT NOT NULL,
            before BLOB,
            after BLOB
        );
        CREATE INDEX IF NOT EXISTS catalog_audit_record ON catalog_audit (kind, record_id);
        """
    ):
        db.execute(stmt)


_STATE_LOG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS state_log (id INTEGER PRIMARY KEY, body BLOB NOT NULL)"
)
_READING_BLOCKS_SCHEMA = """CREATE TABLE IF NOT EXISTS reading_blocks (
    id INTEGER PRIMARY KEY,
    n INTEGER NOT NULL,
    min_ts REAL NOT NULL,
    max_ts REAL NOT NULL,
    body BLOB NOT NULL
)"""


def _migrate_to_3(db: sqlite3.Connection) -> None:
    """Layout 3: reading blocks (`Journal.commit`: a group's readings in one row of
    ``reading_blocks``, in columns; the ``readings`` table keeps what older layouts wrote until
    the historian has it); the state log (a group's cursors and shelf states in one row,
    folded into ``device_cursors`` and ``shelf_states`` every `STATE_LOG_FOLD` rows and at
    close). And the ``readings`` table's identity index leads with the reading's timestamp,
    ``(ts, device, epoch, seq)`` instead of ``(device, epoch, seq)``. A group's readings have
    timestamps close to each other and to the newest already there, so its inserts (and the
    historian's deletes of the oldest) touch the index's last (first) pages, not one page per
    device: ~3 µs less per reading at 100 devices. A re-sent reading is the same reading, its
    timestamp included, so the index still finds it."""
    db.execute("DROP INDEX IF EXISTS readings_identity")
    db.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS readings_identity_ts "
        "ON readings (ts, device, epoch, seq)"
    )
    db.execute(_STATE_LOG_SCHEMA)
    db.execute(_READING_BLOCKS_SCHEMA)


Migration = tuple[int, str, Callable[[sqlite3.Connection], None]]

MIGRATIONS: tuple[Migration, ...] = (
    (1, "baseline: orders, idempotency, counters, calibrations, cursor gap columns", _migrate_to_1),
    (2, "the catalogue: records, versions, audit", _migrate_to_2),
    (3, "reading blocks, the state log, the readings index by timestamp", _migrate_to_3),
)
"""Step ``(n, what, fn)`` takes a journal from layout n − 1 to n, in one transaction that also
sets ``user_version`` to n. A layout change adds a step (and bumps `SCHEMA_VERSION`); a released
step is never edited, since journals on sites were migrated by it."""


class JournalTooNew(JournalError):
    """The journal was written by a newer Floorhand (a later layout): it is not touched."""


def _refuse_newer(db: sqlite3.Connection, path: Path) -> None:
    """JournalTooNew when ``db``'s layout is later than `SCHEMA_VERSION`; reads only."""
    layout = int(db.execute("PRAGMA user_version").fetchone()[0])
    if layout > SCHEMA_VERSION:
        raise JournalTooNew(
            f"journal {path} has layout {layout}, written by a newer Floorhand; this one reads "
            f"layouts up to {SCHEMA_VERSION}: refusing to open it (run the newer release, or "
            "restore a backup made by this one)"
        )


def _migrate(db: sqlite3.Connection, path: Path) -> tuple[int, ...]:
    """Run the steps of `MIGRATIONS` the journal lacks; the versions applied (``()``: none)."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    applied: list[int] = []
    for version, what, step in MIGRATIONS:
        if version <= found:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            db.execute(f"PRAGMA user_version={version}")
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(version),),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("journal %s: migrated to layout %d (%s)", path, version, what)
        applied.append(version)
    return tuple(applied)


CHECKPOINT_INTERVAL_S = 0.25
"""How often the checkpoint thread folds the WAL into the database."""

SECOND_BUSY_TIMEOUT_S = 0.2
"""How long a commit of the control loop's connection waits for its writer turn and SQLite's
write lock (held by an ingest commit for a few milliseconds, by the checkpoint thread's last
passive checkpoint before the WAL starts over 1–4 ms)
before it fails as `JournalUnavailable`: the waiting thread also sends the PLC heartbeats
(every 0.25 s, watchdog 1 s), so it never waits long."""

CHECKPOINT_BUSY_TIMEOUT_S = 0.1
"""Busy timeout of the checkpoint thread's connection (its passive checkpoints never wait for
a lock; this bounds anything else it might)."""

RESTART_RETRY_S = 5.0
"""After the WAL could not start over because a reader still needs its frames, the next try
waits this long (a backup reads for minutes: a writer turn every round would be wasted)."""

WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes of WAL frames past which the checkpoint thread makes the WAL start over (its last
checkpoint in a writer turn, `Journal._restart_wal`); also the size SQLite trims the file back
to when it does."""

WAL_PRESTART_MAX_TURNS = 5
"""The checkpoint thread starts the WAL over itself (`Journal._prestart_wal`) after a round
that ended in a complete checkpoint with at most this many ordinary commits (ingest's groups)
in it. Under ingest load the next group commit starts the WAL over within milliseconds, and a
pre-start there held the writer turn for milliseconds (its sync, with ingest writing): the
picks' commits waited for it, and their p99 under load doubled (measured)."""

SECURE_DELETE = "FAST"
"""``PRAGMA secure_delete`` of the journal's connections. Debian's SQLite is built with
SQLITE_SECURE_DELETE (on by default): every freed page is overwritten with zeros, so a delete
writes as many pages to the WAL as it frees. The state-log fold (~5 MB of rows at 20k msg/s)
then took 9–10 ms instead of ~1.3 ms, and every outbox delete of the historian wrote its freed
pages once more. FAST zeroes deleted content only where that costs no extra I/O; the journal
holds no secrets that would need more."""

STATE_LOG_FOLD = 256
"""Rows of the state log after which a commit folds it into the state tables; the folded
rows are then deleted `STATE_LOG_DELETE_ROWS` per commit (the folding one included), so the
log holds about this many rows at most, folded or not; `Journal.open` reads them on top of the
tables."""

STATE_LOG_DELETE_ROWS = 16
"""Folded state-log rows each commit deletes, oldest first (`Journal._write_states`). Emptying
the whole log in the folding commit (~256 rows with overflow pages) held the writer turn
1.7–1.9 ms at 20k msg/s; a pick's order commit waiting behind it paid that."""

STATE_LOG_FOLD_KEYS = 2048
"""Devices plus shelves the state log may hold before a commit folds it: a fold writes them
all in one transaction (~5 µs each), so a large site whose groups touch different shelves
folds more often instead of writing 100k rows at once."""

DEAD_LETTER_PAYLOAD_MAX = 4096
"""Bytes of a rejected payload kept for inspection (a 10 MB poison is not stored whole)."""


# Rows as selected (columns in field order) → typed rows: tuple.__new__ straight, without
# NamedTuple._make's method call (0.35 against 0.5–0.6 µs a row; the historian reads them all).
_as_reading: Callable[[tuple[Any, ...]], OutboxReading] = functools.partial(
    tuple.__new__, OutboxReading
)
_as_event: Callable[[tuple[Any, ...]], OutboxEvent] = functools.partial(tuple.__new__, OutboxEvent)


ROWS_PER_STATEMENT: Final = 256
"""Rows one multi-row INSERT carries (at most 10 columns: 2,560 parameters, under SQLite's
32,766)."""


@functools.lru_cache(maxsize=128)
def _rows_sql(head: str, width: int, rows: int, tail: str = "") -> str:
    one = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([one] * rows)}{tail}"


_ORDER_COMMIT_OBJECTS: Final = (
    "CREATE TEMP VIEW IF NOT EXISTS order_commit(kind, a, b, c, d, e, f, g) AS "
    "SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0",
    "CREATE TEMP TRIGGER IF NOT EXISTS order_commit_order INSTEAD OF INSERT ON order_commit "
    "WHEN NEW.kind = 0 BEGIN "
    "INSERT INTO orders(order_id, channel, external_id, state, open, updated_ts, body) "
    "VALUES (NEW.a, NEW.b, NEW.c, NEW.d, NEW.e, NEW.f, NEW.g) "
    "ON CONFLICT(order_id) DO UPDATE SET state=excluded.state, open=excluded.open, "
    "updated_ts=excluded.updated_ts, body=excluded.body; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS order_commit_counter INSTEAD OF INSERT ON order_commit "
    "WHEN NEW.kind = 1 BEGIN "
    "INSERT INTO counters(name, value) VALUES (NEW.a, NEW.b) "
    "ON CONFLICT(name) DO UPDATE SET value=max(value, excluded.value); END",
    # REPLACE: a key past its TTL may be used again (not yet trimmed here).
    "CREATE TEMP TRIGGER IF NOT EXISTS order_commit_key INSTEAD OF INSERT ON order_commit "
    "WHEN NEW.kind = 2 BEGIN "
    "INSERT OR REPLACE INTO idempotency(key, principal, digest, status, order_id, created_ts) "
    "VALUES (NEW.a, NEW.b, NEW.c, NEW.d, NEW.e, NEW.f); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS order_commit_event INSTEAD OF INSERT ON order_commit "
    "WHEN NEW.kind = 3 BEGIN "
    "INSERT INTO events(ts, kind, body) VALUES (NEW.a, NEW.b, NEW.c); END",
)
"""An order commit as rows of one INSERT into a view of the connection's own (TEMP: nothing
in the file; made when the connection opens): a trigger per row kind (0 order, 1 counter, 2
idempotency key, 3 event) writes it to its table, in the rows' order, with the values bound
as they are (no text round trip). Why: an order commit is written on the control loop's
thread, and Python's sqlite3 hands the interpreter lock to ingest around every statement
step; under load each hand-back costs up to a switch interval. Up to `ROWS_PER_STATEMENT`
rows, the commit is that one statement (its own transaction): one hand-back instead of eight
(BEGIN, a statement per table and per piece of events, COMMIT)."""

_ORDER_COMMIT_HEAD: Final = "INSERT INTO order_commit(kind, a, b, c, d, e, f, g)"

_ORDER_COMMIT_WIDTH: Final = 8


def _prepare_order_commit(db: sqlite3.Connection) -> None:
    for stmt in _ORDER_COMMIT_OBJECTS:
        db.execute(stmt)


def execute_rows(
    db: sqlite3.Connection, head: str, width: int, rows: Sequence[Sequence[Any]], tail: str = ""
) -> None:
    """``db.executemany(head + " VALUES (?,…)" + tail, rows)`` as multi-row statements (up to
    `ROWS_PER_STATEMENT` rows each; the rest in power-of-two pieces, so a few statement texts
    are cached). The same rows are written in the same order; OR IGNORE and ON CONFLICT apply
    per row as they do one by one. Why: Python's sqlite3 releases the interpreter lock around
    every row's step, and while another thread runs Python each re-acquisition waits up to the
    switch interval (5 ms): 500 rows through executemany took 6.5 s against 16 ms for one
    multi-row statement, measured with one busy thread beside it (1.26 against 0.47 ms alone)."""
    n = len(rows)
    at = 0
    while at < n:
        left = n - at
        size = ROWS_PER_STATEMENT if left >= ROWS_PER_STATEMENT else 1 << (left.bit_length() - 1)
        db.execute(
            _rows_sql(head, width, size, tail),
            [v for row in rows[at : at + size] for v in row],
        )
        at += size


def _insert_events(db: sqlite3.Connection, events: Sequence[EventRow]) -> None:
    if events:
        execute_rows(
            db,
            "INSERT INTO events(ts, kind, body)",
            3,
            [(e.ts_s, e.kind, orjson.dumps(e.body)) for e in events],
        )


# State rows are updated in place (an UPSERT), not deleted and re-inserted (INSERT OR REPLACE:
# a delete plus an insert in the table and in its primary-key index, per row, per group).
# Same rows, same columns: the file is the same for any reader.
_UPSERT_CURSOR = (
    "INSERT INTO device_cursors"
    "(device, epoch, seq, window, ts, applied, floor, holes, gaps, missing)",
    10,
    " ON CONFLICT(device) DO UPDATE SET epoch=excluded.epoch, "
    "seq=excluded.seq, window=excluded.window, ts=excluded.ts, applied=excluded.applied, "
    "floor=excluded.floor, holes=excluded.holes, gaps=excluded.gaps, missing=excluded.missing",
)
_UPSERT_SHELF_STATE = (
    "INSERT INTO shelf_states(shelf, body)",
    2,
    " ON CONFLICT(shelf) DO UPDATE SET body=excluded.body",
)
_UPSERT_ALERT_STATE = (
    "INSERT INTO alert_states(key, body)",
    2,
    " ON CONFLICT(key) DO UPDATE SET body=excluded.body",
)
"""(head, columns, tail) of each state UPSERT, for `execute_rows`."""

_RETRYABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
"""Primary SQLite result codes of a file that cannot be used just now. Not among them: a
constraint, a value SQLite cannot bind, an SQL error, a corrupt file (SQLITE_CORRUPT): trying
the same call again would fail the same way."""


def _failure(what: str, exc: Exception) -> JournalError:
    """The JournalError for ``exc``: JournalUnavailable when SQLite reports a condition
    that can pass (``sqlite3.OperationalError`` also covers SQL errors, hence the code)."""
    code = exc.sqlite_errorcode if isinstance(exc, sqlite3.OperationalError) else None
    if code is not None and code & 0xFF in _RETRYABLE_CODES:
        return JournalUnavailable(f"{what} failed: {exc}")
    return JournalError(f"{what} failed: {exc}")


class JournalLocked(JournalError):
    """Another process owns this journal."""


class DuplicateOrderError(JournalError, DuplicateOrder):
    """An order with the same (channel, external id) is already in the journal."""


@dataclass(frozen=True, slots=True)
class Restored:
    cursors: dict[str, Cursor]
    shelf_states: dict[str, dict[str, Any]]
    alert_states: dict[str, dict[str, Any]]
    outbox_rows: int
    torn_tail_bytes: int = 0
    """Bytes of an unfinished write (kill -9, power cut) SQLite discarded from the WAL."""


def _legacy_cursor(epoch: int, seq: int, window: bytes, ts_s: float, applied: int) -> Cursor:
    """A cursor saved as a 256-bit window: it accounts from the lowest seq it saw; the unseen
    seqs above that become its holes (each counted missing, as they were when they opened)."""
    bits = int.from_bytes(window, "little")
    if not bits:
        return Cursor(epoch, seq, ts_s, applied, seq)
    floor = seq - bits.bit_length()
    holes: list[tuple[int, int]] = []
    for s in range(floor + 1, seq):
        if not (bits >> (seq - 1 - s)) & 1:
            if holes and holes[-1][1] == s - 1:
                holes[-1] = (holes[-1][0], s)
            else:
                holes.append((s, s))
    missing = sum(b - a + 1 for a, b in holes)
    return Cursor(epoch, seq, ts_s, applied, floor, tuple(holes), len(holes), missing)


BLOCK_MAX_READINGS = 65_536
"""Most readings one ``reading_blocks`` row holds (a larger group is written as several)."""

_BLOCK_FORMAT = 1
_BLOCK_COLUMNS: Final = ("i", "i", "q", "q", "q", "d", "d")
"""Each column's ``array``/``memoryview`` type code: device and shelf (32-bit indexes into the
head's names), channel, epoch, seq (64-bit), ts, weight_g (64-bit floats); native order."""
_BLOCK_SIZES: Final = tuple(array(code).itemsize for code in _BLOCK_COLUMNS)
_SAME_TYPE: Final = {"i": ("i",), "q": ("q", "l"), "d": ("d",)}
"""Buffer formats of the same size and kind as each type code (numpy's int64 is ``l``)."""


def _columns_of(rows: Sequence[ReadingFields]) -> ReadingColumns:
    """Reading tuples (the reading-by-reading path, the rest of a split block) as columns:
    C-level passes only (``zip``, ``array`` from iterators), ~0.2 µs a reading."""
    devices, channels, epochs, seqs, ts, grams, shelves = zip(*rows, strict=True)
    device_names = list(dict.fromkeys(devices))
    shelf_names = list(dict.fromkeys(shelves))
    device_code = dict(zip(device_names, range(len(device_names)), strict=True))
    shelf_code = dict(zip(shelf_names, range(len(shelf_names)), strict=True))
    return ReadingColumns(
        device_names,
        shelf_names,
        array("i", map(device_code.__getitem__, devices)),
        array("i", map(shelf_code.__getitem__, shelves)),
        array("q", channels),
        array("q", epochs),
        array("q", seqs),
        array("d", ts),
        array("d", grams),
        float(min(ts)),
        float(max(ts)),
    )


def _encode_columns(cols: ReadingColumns, start: int, stop: int) -> tuple[bytes, float, float]:
    """``cols[start:stop]`` as one ``reading_blocks`` body: a JSON head (format, count, device
    and shelf names) and a line break, then each column's values as a native array (type
    codes `_BLOCK_COLUMNS`; the arrays' bytes as they are, their types checked, not
    converted). Numbers go in as bits, so they come out exactly as they went in. Also the
    group's smallest and largest timestamp (for `Journal.has_reading`)."""
    arrays = (
        cols.device, cols.shelf, cols.channel, cols.epoch, cols.seq, cols.ts_s, cols.weight_g,
    )  # fmt: skip
    parts = [
        orjson.dumps(
            [_BLOCK_FORMAT, min(len(cols), stop) - start, cols.device_names, cols.shelf_names]
        ),
        b"\n",
    ]
    for values, code, size in zip(arrays, _BLOCK_COLUMNS, _BLOCK_SIZES, strict=True):
        view = memoryview(values)
        if view.itemsize != size or view.format.lstrip("@=<") not in _SAME_TYPE[code]:
            raise ValueError(f"a reading column of type {view.format!r}, not {code!r}")
        parts.append(view[start:stop].tobytes())
    return b"".join(parts), cols.min_ts_s, cols.max_ts_s


def _decode_block(first_id: int, body: bytes) -> list[OutboxReading]:
    """The readings of a ``reading_blocks`` row (ids ``first_id`` on), in order."""
    try:
        end = body.index(b"\n")
        fmt, n, device_names, shelf_names = orjson.loads(body[:end])
        if fmt != _BLOCK_FORMAT:
            raise ValueError(f"block format {fmt!r}")
        at = end + 1
        view = memoryview(body)
        values: list[list[Any]] = []
        for code, size in zip(_BLOCK_COLUMNS, _BLOCK_SIZES, strict=True):
            values.append(view[at : at + size * n].cast(code).tolist())  # type: ignore[call-overload]
            at += size * n
        if at != len(body):
            raise ValueError(f"{len(body) - at} bytes past the columns")
        dev, shelf, channel, epoch, seq, ts, grams = values
        devices = list(map(device_names.__getitem__, dev))
        shelves = list(map(shelf_names.__getitem__, shelf))
    except (ValueError, TypeError, IndexError, orjson.JSONDecodeError) as exc:
        raise JournalError(f"unreadable reading block {first_id}: {exc}") from exc
    return list(
        map(
            _as_reading,
            zip(
                range(first_id, first_id + n), devices, channel, epoch, seq, ts, grams, shelves,
                strict=True,
            ),
        )
    )  # fmt: skip


_StateWrite = tuple[bool, dict[str, Cursor], dict[str, dict[str, Any]], int | None]
"""`Journal._write_states`: folded (or a log row), the cursors and the shelf states, and the
newest state-log id of folded rows still to delete (None: none left)."""


def _cursor_row(device: str, cursor: Cursor) -> tuple[Any, ...]:
    """A cursor as its ``device_cursors`` row (the columns earlier versions wrote: an empty
    window, holes as JSON, ``[]`` for none)."""
    epoch, seq, ts_s, applied, floor, holes, gaps, missing = cursor
    return (
        device, epoch, seq, b"", ts_s, applied, floor,
        orjson.dumps(holes) if holes else b"[]", gaps, missing,
    )  # fmt: skip


def _read_state_log(
    db: sqlite3.Connection,
) -> tuple[dict[str, Cursor], dict[str, dict[str, Any]], int]:
    """The state log merged in commit order: each device's newest cursor, each shelf's
    newest state, and the log's row count."""
    cursors: dict[str, Cursor] = {}
    states: dict[str, dict[str, Any]] = {}
    n = 0
    for (body,) in db.execute("SELECT body FROM state_log ORDER BY id"):
        group = orjson.loads(body)
        for device, epoch, seq, ts, applied, floor, holes, gaps, missing in group["c"]:
            cursors[device] = Cursor(
                epoch, seq, ts, applied, floor,
                tuple((int(a), int(b)) for a, b in holes), gaps, missing,
            )  # fmt: skip
        states.update(group["s"])
        n += 1
    return cursors, states, n


def saved_state(
    db: sqlite3.Connection,
) -> tuple[dict[str, tuple[Any, ...]], dict[str, dict[str, Any]]]:
    """Every device's cursor row and every shelf's state as the journal file holds them:
    ``device_cursors`` and ``shelf_states`` with the state log on top (for tools and tests
    that read a journal file; `Journal.open` does the same)."""
    cursors = {row[0]: tuple(row) for row in db.execute("SELECT * FROM device_cursors")}
    states = {
        shelf: orjson.loads(body)
        for shelf, body in db.execute("SELECT shelf, body FROM shelf_states")
    }
    log_cursors, log_states, _ = _read_state_log(db)
    cursors.update((device, _cursor_row(device, c)) for device, c in log_cursors.items())
    states.update(log_states)
    return cursors, states


def _read_readings(db: sqlite3.Connection, after_id: int, limit: int) -> list[OutboxReading]:
    """Up to ``limit`` readings with an id above ``after_id``, oldest first: the ``readings``
    table's (older layouts'), then the blocks'."""
    out = list(
        map(
            _as_reading,
            db.execute(
                "SELECT id, device, channel, epoch, seq, ts, weight_g, shelf FROM readings "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall(),
        )
    )
    if len(out) < limit:
        blocks = db.execute(
            "SELECT id, body FROM reading_blocks WHERE id > ? AND id + n > ? ORDER BY id",
            (after_id + 1 - BLOCK_MAX_READINGS, after_id + 1),
        )
        for first, body in blocks:
            readings = _decode_block(first, body)
            if first <= after_id:
                readings = readings[after_id + 1 - first :]
            out.extend(readings[: limit - len(out)])
            if len(out) >= limit:
                break
    return out


def saved_readings(db: sqlite3.Connection) -> list[OutboxReading]:
    """Every reading in a journal file's outbox, in id order (for tools and tests that read a
    journal file; `Journal.read_readings` reads the same)."""
    return _read_readings(db, 0, 1 << 62)


def _read_head(path: Path, n: int) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _order_commit_rows(
    orders: Sequence[dict[str, Any]],
    counters: dict[str, int] | None,
    idempotency: Sequence[IdempotencyRow],
    events: Sequence[EventRow],
) -> list[tuple[Any, ...]]:
    """The ``order_commit`` rows (kind, a … g) of an order commit: orders, then counters,
    then idempotency keys, then events, as the order desk hands them over."""
    rows: list[tuple[Any, ...]] = [
        (
            0,
            o["order_id"],
            o["channel"],
            o["external_id"],
            o["state"],
            1 if o["state"] in _OPEN_ORDER_STATES else 0,
            o["updated_ts"],
            orjson.dumps(o),
        )
        for o in orders
    ]
    if counters:
        rows.extend(
            (1, name, value, None, None, None, None, None) for name, value in counters.items()
        )
    rows.extend((2, *key, None) for key in idempotency)
    rows.extend((3, e.ts_s, e.kind, orjson.dumps(e.body), None, None, None, None) for e in events)
    return rows


class WriterTurns:
    """The write transactions of one process, one at a time, and the priority ones first.

    Like a lock, with one difference: when it is released, a waiting **priority** writer (the
    control loop's order journal) gets it before every waiting ordinary one (ingest's group
    commits, which come back to back under load). A plain lock is not fair: the main thread,
    holding the interpreter, took it again before the woken control thread ran, so an order
    commit waited behind several ingest commits (up to 108 ms measured at 16k msg/s, where
    one commit holds it 4–12 ms). A priority writer now waits for at most the commit in
    progress."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._held = False
        self._priority_waiting = 0
        self.waiting = 0
        """Writers waiting now (tests watch it)."""
        self.taken = 0
        """Turns taken so far."""
        self.ordinary_turns = 0
        """Turns taken by ordinary writers so far (ingest's group commits, mostly)."""

    def acquire(self, *, timeout: float, priority: bool = False) -> bool:
        """Take the turn, waiting at most ``timeout`` seconds; whether it was taken."""
        with self._cv:
            if not self._held and (priority or not self._priority_waiting):
                self._held = True
                self.taken += 1
                self.ordinary_turns += not priority
                return True
            self.waiting += 1
            if priority:
                self._priority_waiting += 1
            try:
                taken = self._cv.wait_for(
                    lambda: not self._held and (priority or not self._priority_waiting),
                    timeout,
                )
                if taken:
                    self._held = True
                    self.taken += 1
                    self.ordinary_turns += not priority
                return taken
            finally:
                self.waiting -= 1
                if priority:
                    self._priority_waiting -= 1
                    if not self._held:  # gave up: the ordinary writers may go again
                        self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self._held = False
            if self.waiting:
                self._cv.notify_all()


class Journal:
    """Synchronous SQLite journal: each connection is used from one thread only.

    Commits take ~0.1–0.5 ms for a group of hundreds of rows, so they run inline where the
    messages are read (measured here: a commit thread competing for the GIL is slower). The
    main loop owns this connection; the control loop (orders) commits through
    `second_connection`.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None
        self._synchronous = synchronous
        self._outbox_rows = 0
        self._rows_lock = threading.Lock()  # the control loop's connection counts here too
        self._writers = WriterTurns()  # one write transaction of this process at a time
        self._priority = False  # this connection's commits go before the ordinary ones
        self._primary: Journal | None = None
        self._busy_timeout_s = 5.0
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self.checkpoints = 0
        self.wal_restarts = 0
        self.wal_prestarts = 0
        """WALs started over by the checkpoint thread after a complete checkpoint
        (`_prestart_wal`)."""
        self._taken_after_prestart = -1  # the writer turns taken when the last pre-start ended
        self.wal_restarts_busy = 0
        """WAL restarts that gave up behind a reader on an older snapshot (`RESTART_RETRY_S`)."""
        self.wal_restart_s = 0.0
        """How long the last WAL restart held the writers (s): its checkpoint in a writer turn."""
        self._restart_after = 0.0  # time.monotonic() before which no WAL restart is tried
        self.checkpointed = threading.Event()
        """Set after each checkpoint (tests and tools wait on it)."""
        self.checkpoint_error: str | None = None
        self.migrated: tuple[int, ...] = ()
        """Layouts the last `open` migrated the file to (``()``: it was current)."""
        self._unfolded_cursors: dict[str, Cursor] = {}
        """Cursors in the state log, not yet in ``device_cursors``."""
        self._unfolded_states: dict[str, dict[str, Any]] = {}
        """Shelf states in the state log, not yet in ``shelf_states``."""
        self._log_rows = 0
        self._folded_upto: int | None = None
        """The newest id of the state-log rows already folded into the tables and not yet all
        deleted (None: no such rows). They are the same values as the tables, so reading
        them on top (a restart, an earlier version) changes nothing."""
        self.state_folds = 0
        self._next_reading_id = 1
        """The id the next journaled reading gets (ids of the ``readings`` table and of the
        blocks are one sequence)."""

    @property
    def outbox_rows(self) -> int:
        """Rows in the outbox (readings + events), as counted by every connection's commits."""
        if self._primary is not None:
            return self._primary.outbox_rows
        return self._outbox_rows

    @outbox_rows.setter
    def outbox_rows(self, value: int) -> None:
        self._outbox_rows = value

    def _add_rows(self, n: int) -> None:
        """Count ``n`` rows added (negative: removed) to the outbox; from either thread."""
        if self._primary is not None:
            self._primary._add_rows(n)
            return
        with self._rows_lock:
            self._outbox_rows = max(0, self._outbox_rows + n)

    def second_connection(
        self, *, busy_timeout_s: float = SECOND_BUSY_TIMEOUT_S, priority: bool = False
    ) -> Journal:
        """Another connection to the same journal file, for the control loop's thread (the
        order desk: orders, counters, idempotency keys and their events). Open it with
        `open_second` after this journal is open; close it before. SQLite's write lock
        serialises its transactions with this connection's (WAL: readers never wait);
        ``busy_timeout_s`` bounds how long one of its commits waits for that lock, because
        the waiting thread is the one that sends the PLC heartbeats. With ``priority`` its
        commits take their turn before every waiting commit of the ordinary connections
        (`WriterTurns`): the control loop's."""
        second = Journal(self.path, synchronous=self._synchronous)
        second._primary = self
        second._busy_timeout_s = busy_timeout_s
        second._priority = priority
        return second

    def open_second(self) -> None:
        """Open a connection made by `second_connection` (no lock, schema or restore: the
        primary did those)."""
        assert self._primary is not None, "open_second is for a second connection"
        try:
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False,
                timeout=self._busy_timeout_s,
            )  # fmt: skip
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(f"PRAGMA secure_delete={SECURE_DELETE}")
            _prepare_order_commit(db)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        self._db = db

    # -- lifecycle -------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the journal's lock file (``<path>.lock``, an exclusive ``flock``); idempotent.
        ``open`` takes it too; the CLI takes it earlier, before anything touches the broker."""
        if self._lock_fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLocked(
                f"journal {self.path} is in use by another controller process "
                "(same site identity): refusing to start"
            ) from None
        self._lock_fd = fd
        if self.path.exists():  # the CLI locks first: a newer layout is refused before the broker
            try:
                # Read-only: closing it must not checkpoint and reset the WAL, which would
                # hide a torn tail from `open` (and write before the checks `open` makes).
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
                try:
                    _refuse_newer(db, self.path)
                finally:
                    db.close()
            except JournalTooNew:
                self.close()
                raise
            except sqlite3.Error:
                pass  # an unreadable file: `open` reports it with its integrity check

    def open(self) -> Restored:
        self.lock()
        wal_header = _read_head(Path(f"{self.path}-wal"), 32)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self.close()
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        try:
            _refuse_newer(db, self.path)  # before anything writes: such a file stays untouched
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("PRAGMA temp_store=MEMORY")
            db.execute("PRAGMA cache_size=-16000")
            # Checkpoints run in the journal's own thread (below), never inside a commit on the
            # event loop: an automatic checkpoint there stalls ingest for 10–20 ms.
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(f"PRAGMA secure_delete={SECURE_DELETE}")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            integrity = db.execute("PRAGMA quick_check").fetchone()[0]
            if integrity != "ok":
                raise JournalError(f"journal {self.path} failed its integrity check: {integrity}")
            self.migrated = _migrate(db, self.path)
            _prepare_order_commit(db)
        except sqlite3.Error as exc:
            db.close()
            self.close()
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            self.close()
            raise
        self._db = db
        torn = self._torn_tail(wal_header)
        self._start_checkpointer()
        restored = self._restore()
        if torn:
            log.warning(
                "journal %s: discarded a torn or unfinished write of %d bytes at the end of the "
                "WAL (the process died mid-commit); every committed group is intact",
                self.path,
                torn,
            )
        return dataclasses.replace(restored, torn_tail_bytes=torn)

    def _torn_tail(self, header: bytes) -> int:
        """Bytes of the WAL past its last committed frame that belong to the current WAL
        generation (same salts) or end in a partial frame: a write that never committed.
        Frames of an earlier generation (other salts) are normal leftovers of a WAL reset."""
        wal = Path(f"{self.path}-wal")
        if len(header) < 32:
            return 0
        page_size = int.from_bytes(header[8:12], "big")
        if not 512 <= page_size <= 65_536:
            return 0
        salts = header[16:24]
        frame = 24 + page_size
        # A passive checkpoint reports how many frames SQLite recovered as committed.
        _, valid, _ = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        start = 32 + max(valid, 0) * frame
        try:
            size = wal.stat().st_size
            whole_end = 32 + (size - 32) // frame * frame  # a WAL is whole frames, normally
            torn = size - whole_end  # a partial frame: an interrupted write
            with wal.open("rb") as f:
                pos = start
                while pos + frame <= whole_end:
                    f.seek(pos)
                    if f.read(24)[8:16] != salts:
                        break  # an earlier generation's leftovers: not a torn write
                    torn += frame
                    pos += frame
        except OSError:
            return 0
        return torn

    def _start_checkpointer(self) -> None:
        self._stop_checkpoints.clear()
        thread = threading.Thread(
            target=self._checkpoint_loop, name=f"journal-checkpoint:{self.path.name}", daemon=True
        )
        self._checkpointer = thread
        thread.start()

    def _checkpoint_loop(self) -> None:
        """PASSIVE checkpoints from a second connection: they copy committed WAL frames into the
        database without blocking writers, so the WAL stays bounded while commits stay fast."""
        try:
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False,
                timeout=CHECKPOINT_BUSY_TIMEOUT_S,
            )  # fmt: skip
        except sqlite3.Error as exc:
            self.checkpoint_error = str(exc)
            return
        try:
            frame_bytes = int(db.execute("PRAGMA page_size").fetchone()[0]) + 24
            last_turns = self._writers.ordinary_turns
            while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL_S):
                try:
                    _, wal_frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    turns = self._writers.ordinary_turns
                    quiet, last_turns = turns - last_turns <= WAL_PRESTART_MAX_TURNS, turns
                    # Someone wrote since the last pre-start (not only the pre-start itself:
                    # an idle journal is not written every round).
                    written = self._writers.taken != self._taken_after_prestart
                    if (
                        wal_frames * frame_bytes > WAL_SIZE_LIMIT
                        and time.monotonic() >= self._restart_after
                    ):
                        # Under sustained writes a passive checkpoint never catches up: the
                        # next commit finds frames not yet copied, so the WAL never starts
                        # over and only grows. Past the limit, a last checkpoint in a writer
                        # turn of this process (`WriterTurns`) copies what came since the
                        # passive one (no commit is half-way), and the next commit writes the
                        # WAL from its start again (journal_size_limit trims the file).
                        self._restart_wal(db)
                    elif copied == wal_frames > 0 and quiet and written:
                        self._prestart_wal(db)
                    self.checkpoints += 1
                    self.checkpoint_error = None
                    self.checkpointed.set()
                except sqlite3.Error as exc:
                    self.checkpoint_error = str(exc)
        finally:
            db.close()

    def _prestart_wal(self, db: sqlite3.Connection) -> None:
        """Start the WAL over from the checkpoint thread, right after a checkpoint copied all
        of it, so that no commit of the loops has to. SQLite starts the WAL over at the first
        commit that finds every frame copied, and that commit writes a new WAL header and
        syncs it (even with ``synchronous=NORMAL``: SQLite's rule against an out-of-order write
        after a restart): ~1 ms here. With a checkpoint every `CHECKPOINT_INTERVAL_S`, one
        order commit in ~25 at 50 picks/s paid it (p99 1.2 ms against 0.1 alone). Here a
        one-row write (``meta.wal_prestart``) takes that commit's place, in a writer turn
        (`WriterTurns`, never waited for: a writer holding it starts the WAL over itself)."""
        if not self._writers.acquire(timeout=0.0):
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('wal_prestart', ?)",
                    (str(self.wal_prestarts + 1),),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.wal_prestarts += 1
        finally:
            self._taken_after_prestart = self._writers.taken
            self._writers.release()

    def _restart_wal(self, db: sqlite3.Connection) -> None:
        """Let the WAL start over (`_checkpoint_loop`): one more passive checkpoint outside
        the writer turn (it copies what the commits wrote during the one before), then a last
        one in a writer turn, which copies the few commits since. With every frame copied and
        no commit in between, the next commit writes the WAL from its start (SQLite does that
        itself when nothing in the WAL is still needed). The turn is held for a few commits'
        pages and two fsyncs: 1–3 ms at 20k msg/s here, where a RESTART checkpoint in the
        turn held the writers 35–45 ms (it copied everything since the last round). A reader on
        an older snapshot (a backup, an API read) keeps frames from being copied: then it
        gives up at once and tries again `RESTART_RETRY_S` later. Skipped if no turn came
        within the busy timeout (the next round tries again)."""
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if not self._writers.acquire(timeout=self._busy_timeout_s):
            return
        try:
            t0 = time.perf_counter()
            _, wal_frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.wal_restart_s = time.perf_counter() - t0
            if copied < wal_frames:  # a reader still on an older snapshot: try again later
                self.wal_restarts_busy += 1
                self._restart_after = time.monotonic() + RESTART_RETRY_S
            else:
                self.wal_restarts += 1
        finally:
            self._writers.release()

    def close(self) -> None:
        if (
            self._db is not None
            and self._primary is None
            and (self._log_rows or self._folded_upto is not None)
        ):
            try:
                self.fold_state_log()  # a cleanly closed journal has current state tables
            except JournalError as exc:
                log.warning("journal %s: state log not folded at close (kept): %s", self.path, exc)
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
            self._checkpointer = None
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise JournalError("journal is not open")
        return self._db

    def _restore(self) -> Restored:
        db = self.db
        cursors = {
            device: (
                _legacy_cursor(epoch, seq, window, ts, applied)
                if floor is None
                else Cursor(
                    epoch,
                    seq,
                    ts,
                    applied,
                    floor,
                    tuple((int(a), int(b)) for a, b in orjson.loads(holes)),
                    gaps,
                    missing,
                )
            )
            for device, epoch, seq, window, ts, applied, floor, holes, gaps, missing in db.execute(
                "SELECT device, epoch, seq, window, ts, applied, floor, holes, gaps, missing "
                "FROM device_cursors"
            )
        }
        shelves = {
            shelf: orjson.loads(body)
            for shelf, body in db.execute("SELECT shelf, body FROM shelf_states")
        }
        # The state log on top: every row is a group's changes, in commit order.
        unfolded_cursors, unfolded_states, self._log_rows = _read_state_log(db)
        cursors.update(unfolded_cursors)
        shelves.update(unfolded_states)
        self._unfolded_cursors, self._unfolded_states = unfolded_cursors, unfolded_states
        alerts = {
            key: orjson.loads(body)
            for key, body in db.execute("SELECT key, body FROM alert_states")
        }
        n_readings = self._count_readings(db)
        self._next_reading_id = self._newest_reading_id(db) + 1
        n_events = db.execute("SELECT count(*) FROM events").fetchone()[0]
        self.outbox_rows = int(n_readings) + int(n_events)
        return Restored(cursors, shelves, alerts, self.outbox_rows)

    # -- writes ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(
        self, what: str, *, one_statement: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """BEGIN … COMMIT; on any failure (a bad value included) roll back — never leave a
        transaction open — and raise JournalError (its cause is the original error):
        JournalUnavailable when the file cannot be written just now. ``one_statement``: the
        block runs one statement, which is its own transaction (no BEGIN, no COMMIT: SQLite
        takes the write lock, through the busy handler, before the statement writes, and
        undoes all of it if it fails)."""
        db = self.db
        # The connections of this process take turns (`WriterTurns`) first: a waiter is
        # woken the moment the holder commits (SQLite's busy handler would poll with sleeps
        # of 1, 2, 5, 10 … ms, and a connection that loses a few rounds against back-to-back
        # ingest commits waits tens of milliseconds), a priority one before the others.
        writers = (self._primary or self)._writers
        if not writers.acquire(timeout=self._busy_timeout_s, priority=self._priority):
            raise JournalUnavailable(
                f"{what} failed: the journal was busy for {self._busy_timeout_s:g} s"
            )
        try:
            # IMMEDIATE: the write lock is taken (through the busy handler) at BEGIN, so a
            # second connection's commit can never make this one fail half-way. A writing
            # statement outside a transaction takes it the same way before it reads.
            if one_statement:
                yield db
            else:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise _failure(what, exc) from exc
        except BaseException:  # any other error of the block (a caller's check): no commit
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        finally:
            writers.release()

    def transaction(self, what: str) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction of this connection (BEGIN IMMEDIATE … COMMIT), taking turns
        with the process's other connections; JournalError as for `commit`. For the short
        transactions of a catalogue change written from a worker thread (catalog_store)."""
        return self._transaction(what)

    @contextlib.contextmanager
    def _statement(self, what: str) -> Iterator[sqlite3.Connection]:
        """One statement outside a transaction: a SQLite failure becomes a JournalError
        (JournalUnavailable when it can pass)."""
        db = self.db
        try:
            yield db
        except sqlite3.Error as exc:
            raise _failure(what, exc) from exc

    def commit(
        self,
        readings: Sequence[ReadingFields] | ReadingColumns,
        dead_letters: Sequence[DeadLetter] = (),
        cursors: dict[str, Cursor] | None = None,
        shelf_states: dict[str, dict[str, Any]] | None = None,
        events: Sequence[EventRow] = (),
        alert_states: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write one group atomically. On failure nothing is written: JournalUnavailable
        (retryable: disk full, I/O error, locked), else JournalError (a value or a bug).
        Cursors and shelf states go to the state log (`_write_states`)."""
        write = None
        next_id = None
        with self._transaction("journal commit") as db:
            next_id = self._write_readings(db, readings) if readings else None
            if dead_letters:
                execute_rows(
                    db,
                    "INSERT INTO dead_letters(received_at, topic, reason, detail, size, payload)",
                    6,
                    [
                        (
                            d.received_at_s,
                            d.topic,
                            d.reason,
                            d.detail,
                            len(d.payload),
                            d.payload[:DEAD_LETTER_PAYLOAD_MAX],
                        )
                        for d in dead_letters
                    ],
                )
            if cursors or shelf_states:
                write = self._write_states(db, cursors or {}, shelf_states or {})
            if alert_states:
                head, width, tail = _UPSERT_ALERT_STATE
                execute_rows(
                    db, head, width, [(k, orjson.dumps(v)) for k, v in alert_states.items()], tail
                )
            _insert_events(db, events)
        self._states_written(write)
        if next_id is not None:
            self._next_reading_id = next_id
        self._add_rows(len(readings) + len(events))

    def _write_readings(
        self, db: sqlite3.Connection, readings: Sequence[ReadingFields] | ReadingColumns
    ) -> int:
        """The group's readings as ``reading_blocks`` rows (one per `BLOCK_MAX_READINGS`),
        numbered on from the newest id; the next free id. One INSERT of one body per group
        instead of a row and an index entry per reading (~2 µs a reading at 400 a group)."""
        first = self._next_reading_id
        columns = readings if isinstance(readings, ReadingColumns) else _columns_of(readings)
        for at in range(0, len(readings), BLOCK_MAX_READINGS):
            body, min_ts, max_ts = _encode_columns(columns, at, at + BLOCK_MAX_READINGS)
            n = min(len(readings) - at, BLOCK_MAX_READINGS)
            db.execute(
                "INSERT INTO reading_blocks(id, n, min_ts, max_ts, body) VALUES (?,?,?,?,?)",
                (first, n, min_ts, max_ts, body),
            )
            first += n
        return first

    def _write_states(
        self,
        db: sqlite3.Connection,
        cursors: dict[str, Cursor],
        shelf_states: dict[str, dict[str, Any]],
        *,
        fold: bool = False,
    ) -> _StateWrite:
        """Write cursors and shelf states in the open transaction: one state-log row (a
        single INSERT of one JSON body instead of an UPSERT per device and per shelf: the
        group's ~200 UPSERTs were ~1 ms of each 400-message commit). Every `STATE_LOG_FOLD`
        rows or past `STATE_LOG_FOLD_KEYS` keys, the rows the log holds are first folded into
        ``device_cursors`` and ``shelf_states``; folded rows are deleted
        `STATE_LOG_DELETE_ROWS` per commit, oldest first. Read on top of the tables (a
        restart before they are gone) they change nothing: each key's last folded value is
        the table's, and every newer value is in a newer row. With ``fold`` (close, tools)
        the log and these go into the tables and the log is emptied at once. Pass the result
        to `_states_written` once the transaction committed (not before: a rolled-back write
        must leave the journal's picture of its log as it was)."""
        if self._primary is not None:
            raise JournalError("cursors and shelf states are written by the primary connection")
        if fold:  # at close and for tools: everything into the tables, the log emptied
            self._upsert_states(
                db,
                {**self._unfolded_cursors, **cursors},
                {**self._unfolded_states, **shelf_states},
            )
            db.execute("DELETE FROM state_log")
            return True, {}, {}, None
        folded_upto = self._folded_upto
        folding = (
            self._log_rows + 1 >= STATE_LOG_FOLD
            or len(self._unfolded_cursors) + len(self._unfolded_states) >= STATE_LOG_FOLD_KEYS
        )
        if folding:
            # The log's rows into the tables; they stay until deleted a few per commit, and
            # are the tables' values (this group's come after them, in its own row).
            self._upsert_states(db, self._unfolded_cursors, self._unfolded_states)
            folded_upto = db.execute("SELECT max(id) FROM state_log").fetchone()[0]
        db.execute(
            "INSERT INTO state_log(body) VALUES (?)",
            (orjson.dumps({"c": [[k, *c] for k, c in cursors.items()], "s": shelf_states}),),
        )
        return folding, cursors, shelf_states, self._delete_folded(db, folded_upto)

    @staticmethod
    def _upsert_states(
        db: sqlite3.Connection, cursors: dict[str, Cursor], states: dict[str, dict[str, Any]]
    ) -> None:
        if cursors:
            head, width, tail = _UPSERT_CURSOR
            execute_rows(db, head, width, [_cursor_row(k, c) for k, c in cursors.items()], tail)
        if states:
            head, width, tail = _UPSERT_SHELF_STATE
            execute_rows(db, head, width, [(k, orjson.dumps(v)) for k, v in states.items()], tail)

    @staticmethod
    def _delete_folded(db: sqlite3.Connection, upto: int | None) -> int | None:
        """Delete the oldest `STATE_LOG_DELETE_ROWS` folded state-log rows (ids up to
        ``upto``); what ``_folded_upto`` becomes once the transaction commits."""
        if upto is None:
            return None
        deleted = db.execute(
            "DELETE FROM state_log WHERE id IN "
            "(SELECT id FROM state_log WHERE id <= ? ORDER BY id LIMIT ?)",
            (upto, STATE_LOG_DELETE_ROWS),
        ).rowcount
        return upto if deleted == STATE_LOG_DELETE_ROWS else None

    def _states_written(self, write: _StateWrite | None) -> None:
        """The transaction of `_write_states` committed: note its log row, or the fold."""
        if write is None:
            return
        folded, cursors, states, self._folded_upto = write
        if folded:  # the log holds this group's row now, or nothing (an explicit fold)
            self._unfolded_cursors = dict(cursors)
            self._unfolded_states = dict(states)
            self._log_rows = 1 if cursors or states else 0
            self.state_folds += 1
        else:
            self._unfolded_cursors.update(cursors)
            self._unfolded_states.update(states)
            self._log_rows += 1

    def fold_state_log(self) -> None:
        """Fold the state log into the state tables and empty it now (at close; tools)."""
        if not self._log_rows and self._folded_upto is None:
            return
        with self._transaction("state fold") as db:
            write = self._write_states(db, {}, {}, fold=True)
        self._states_written(write)

    def has_reading(self, device: str, epoch: int, seq: int, ts_s: float) -> bool:
        """Whether this reading is in the outbox (asked for a reading its device's cursor does
        not account for: an earlier epoch, or below the cursor's floor): the ``readings``
        table's identity index, then the blocks whose time range holds ``ts_s``."""
        with self._statement("outbox lookup") as db:
            row = db.execute(
                "SELECT 1 FROM readings WHERE ts=? AND device=? AND epoch=? AND seq=?",
                (ts_s, device, epoch, seq),
            ).fetchone()
            if row is not None:
                return True
            blocks = db.execute(
                "SELECT id, body FROM reading_blocks WHERE min_ts <= ? AND max_ts >= ?",
                (ts_s, ts_s),
            ).fetchall()
        key = (device, epoch, seq, ts_s)
        return any(
            (r.device, r.epoch, r.seq, r.ts_s) == key
            for first, body in blocks
            for r in _decode_block(first, body)
        )

    # -- outbox drain (the historian) --------------------------------------------------------
    def read_readings(self, after_id: int, limit: int) -> list[OutboxReading]:
        """Up to ``limit`` readings with an id above ``after_id``, oldest first: the
        ``readings`` table's (older layouts'), then the blocks'."""
        with self._statement("outbox read") as db:
            return _read_readings(db, after_id, limit)

    def read_events(self, after_id: int, limit: int) -> list[OutboxEvent]:
        """Up to ``limit`` events with an id above ``after_id``, oldest first."""
        with self._statement("outbox read") as db:
            rows = db.execute(
                "SELECT id, ts, kind, body FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return list(map(_as_event, rows))

    def commit_dead_letters(self, dead_letters: Sequence[DeadLetter]) -> None:
        """Record rows the historian could not deliver (one transaction)."""
        self.commit((), dead_letters=dead_letters)

    def delete_confirmed(self, readings_through: int | None, events_through: int | None) -> int:
        """Delete outbox rows up to these ids (inclusive) once the sink confirmed them."""
        n = 0
        with self._transaction("outbox delete") as db:
            if readings_through is not None:
                n += self._delete_readings_through(db, readings_through)
            if events_through is not None:
                n += db.execute("DELETE FROM events WHERE id <= ?", (events_through,)).rowcount
        self._add_rows(-n)
        return n

    def _delete_readings_through(self, db: sqlite3.Connection, through: int) -> int:
        """Delete the readings with ids up to ``through``: whole blocks, and the confirmed
        part of the block ``through`` ends inside (its rest is written again as a block that
        starts at ``through + 1``). How many were deleted."""
        n = int(db.execute("DELETE FROM readings WHERE id <= ?", (through,)).rowcount)
        n += int(
            db.execute(
                "SELECT coalesce(sum(n), 0) FROM reading_blocks WHERE id + n - 1 <= ?", (through,)
            ).fetchone()[0]
        )
        db.execute(
            "DELETE FROM reading_blocks WHERE id <= ? AND id + n - 1 <= ?", (through, through)
        )
        split = db.execute(
            "SELECT id, body FROM reading_blocks WHERE id <= ? ORDER BY id", (through,)
        ).fetchall()
        for first, body in split:
            readings = _decode_block(first, body)
            keep = [r[1:] for r in readings if r.id > through]
            db.execute("DELETE FROM reading_blocks WHERE id = ?", (first,))
            rest, min_ts, max_ts = _encode_columns(_columns_of(keep), 0, len(keep))
            db.execute(
                "INSERT INTO reading_blocks(id, n, min_ts, max_ts, body) VALUES (?,?,?,?,?)",
                (through + 1, len(keep), min_ts, max_ts, rest),
            )
            n += len(readings) - len(keep)
        return n

    def newest_ids(self) -> tuple[int, int]:
        """The ids of the newest reading and the newest event in the outbox (0: none)."""
        with self._statement("outbox read") as db:
            r = self._newest_reading_id(db)
            e = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        return r, int(e)

    @staticmethod
    def _newest_reading_id(db: sqlite3.Connection) -> int:
        table = int(db.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0])
        block = db.execute(
            "SELECT id + n - 1 FROM reading_blocks ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return max(table, int(block[0]) if block else 0)

    @staticmethod
    def _count_readings(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0]) + int(
            db.execute("SELECT coalesce(sum(n), 0) FROM reading_blocks").fetchone()[0]
        )

    def trim_outbox(self, keep_readings: int, keep_events: int) -> int:
        """With no historian: keep only the most recent rows of the outbox for inspection."""
        with self._transaction("outbox trim") as db:
            n = self._delete_readings_through(db, self._newest_reading_id(db) - keep_readings)
            n += db.execute(
                "DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?", (keep_events,)
            ).rowcount
        self._add_rows(-n)
        return n

    def trim_dead_letters(self, keep: int) -> int:
        with self._statement("dead-letter trim") as db:
            return int(
                db.execute(
                    "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
                    (keep,),
                ).rowcount
            )

    # -- inspection (API, tests, tools) ------------------------------------------------------
    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, received_at, topic, reason, detail, size, payload FROM dead_letters "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            {
                "id": r[0],
                "received_at": r[1],
                "topic": r[2],
                "reason": r[3],
                "detail": r[4],
                "size": r[5],
                "payload": bytes(r[6]).decode("utf-8", "replace"),
            }
            for r in rows
        ]

    def count(self, table: str) -> int:
        if table not in ("readings", "events", "dead_letters"):
            raise ValueError(table)
        if table == "readings":
            return self._count_readings(self.db)
        return int(self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def reading_identities(self) -> Iterable[tuple[str, int, int]]:
        return [(r.device, r.epoch, r.seq) for r in saved_readings(self.db)]

    # -- orders and pick commands ---------------------------------------------------------------
    def commit_orders(
        self,
        orders: Sequence[dict[str, Any]],
        *,
        counters: dict[str, int] | None = None,
        idempotency: Sequence[IdempotencyRow] = (),
        events: Sequence[EventRow] = (),
    ) -> None:
        """Upsert order bodies (``Order.as_dict()``), counters (sorter cmd ids, totes),
        idempotency keys and their events in one transaction; JournalError if nothing was
        written. A second order with the same (channel, external_id) is a JournalError too.

        Written through the connection's ``order_commit`` view (`_ORDER_COMMIT_OBJECTS`): up
        to `ROWS_PER_STATEMENT` rows as one statement, which SQLite commits on its own; more
        in pieces inside BEGIN IMMEDIATE … COMMIT."""
        try:  # the bodies are encoded before the writer turn is taken
            rows = _order_commit_rows(orders, counters, idempotency, events)
        except (TypeError, ValueError, KeyError) as exc:  # orjson's errors are TypeErrors
            raise _failure("order commit", exc) from exc
        if not rows:
            return
        try:
            if len(rows) <= ROWS_PER_STATEMENT:
                with self._transaction("order commit", one_statement=True) as db:
                    db.execute(
                        _rows_sql(_ORDER_COMMIT_HEAD, _ORDER_COMMIT_WIDTH, len(rows)),
                        [v for row in rows for v in row],
                    )
            else:
                with self._transaction("order commit") as db:
                    execute_rows(db, _ORDER_COMMIT_HEAD, _ORDER_COMMIT_WIDTH, rows)
        except JournalError as exc:
            cause = exc.__cause__
            if isinstance(cause, sqlite3.IntegrityError) and "orders.channel" in str(cause):
                raise DuplicateOrderError(f"order commit refused: {cause}") from cause
            raise
        self._add_rows(len(events))

    def open_orders(self) -> list[dict[str, Any]]:
        """Bodies of the orders still open (restart reconciliation), oldest first."""
        rows = self.db.execute("SELECT body FROM orders WHERE open = 1 ORDER BY rowid").fetchall()
        return [orjson.loads(r[0]) for r in rows]

    def recent_orders(self, limit: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT body FROM orders ORDER BY updated_ts DESC LIMIT ?", (limit,)
        ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    def order(self, order_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT body FROM orders WHERE order_id=?", (order_id,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def order_by_external(self, channel: str, external_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT body FROM orders WHERE channel=? AND external_id=?", (channel, external_id)
        ).fetchone()
        return None if row is None else orjson.loads(row[0])

    def idempotency_key(self, key: str) -> IdempotencyRow | None:
        row = self.db.execute(
            "SELECT key, principal, digest, status, order_id, created_ts FROM idempotency "
            "WHERE key=?",
            (key,),
        ).fetchone()
        return None if row is None else IdempotencyRow(*row)

    def idempotency_since(self, ts: float) -> list[IdempotencyRow]:
        """Keys used since ``ts`` (kept in memory by the picking service)."""
        rows = self.db.execute(
            "SELECT key, principal, digest, status, order_id, created_ts FROM idempotency "
            "WHERE created_ts >= ?",
            (ts,),
        ).fetchall()
        return [IdempotencyRow(*r) for r in rows]

    def externals_since(self, ts: float) -> list[tuple[str, str, str]]:
        """(channel, external_id, order_id) of orders updated since ``ts``."""
        rows = self.db.execute(
            "SELECT channel, external_id, order_id FROM orders WHERE updated_ts >= ?", (ts,)
        ).fetchall()
        return [(str(c), str(e), str(o)) for c, e, o in rows]

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.db.execute("SELECT name, value FROM counters")}

    def trim_orders(self, closed_before_ts: float) -> int:
        """Delete closed orders (SHIPPED, EXCEPTION, CANCELLED) last changed before
        ``closed_before_ts``; their events stay in the outbox/history. Open orders, and SORTED
        or PACKED ones still waiting to be packed or shipped, are never deleted."""
        with self._statement("order trim") as db:
            cur = db.execute(
                "DELETE FROM orders WHERE open = 0 AND state IN (?, ?, ?) AND updated_ts < ?",
                (*_CLOSED_ORDER_STATES, closed_before_ts),
            )
        return cur.rowcount

    def trim_idempotency(self, older_than_ts: float) -> int:
        with self._statement("idempotency trim") as db:
            cur = db.execute("DELETE FROM idempotency WHERE created_ts < ?", (older_than_ts,))
        return cur.rowcount

    # -- shelf calibration overrides (ops API) -- begin ------------------------------------------
    def shelf_calibrations(self) -> dict[str, dict[str, Any]]:
        """Saved calibration overrides by shelf (applied at start, before the shelf states)."""
        return {
            shelf: orjson.loads(body)
            for shelf, body in self.db.execute("SELECT shelf, body FROM shelf_calibrations")
        }

    def commit_calibration(
        self,
        shelf: str,
        calibration: dict[str, Any] | None,
        shelf_state: dict[str, Any],
        events: Sequence[EventRow] = (),
    ) -> None:
        """Save (``None``: delete) a shelf's calibration override together with the shelf state
        it produced and its events, in one transaction. JournalError: nothing written."""
        with self._transaction("calibration commit") as db:
            if calibration is None:
                db.execute("DELETE FROM shelf_calibrations WHERE shelf=?", (shelf,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO shelf_calibrations(shelf, body) VALUES (?,?)",
                    (shelf, orjson.dumps(calibration)),
                )
            write = self._write_states(db, {}, {shelf: shelf_state})
            _insert_events(db, events)
        self._states_written(write)
        self._add_rows(len(events))

    # -- shelf calibration overrides -- end --------------------------------------------------------
