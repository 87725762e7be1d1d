"""The embedded history sink: a local SQLite file with retention and downsampled queries.

The default when no InfluxDB is configured, so the demo and the API have history with no server.
Same semantics as InfluxDB: a point is identified by its series (measurement + tags) and its
millisecond timestamp, and writing it again overwrites it (``INSERT OR REPLACE``), so a retried
batch adds nothing.

All SQLite work runs on the sink's own single worker thread with its own connection: the event
loop never waits on a history write, a retention pass or a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from controller.adapters.journal import execute_rows
from controller.ports import (
    HistoryPoint,
    HistoryQuery,
    ShelfHistoryRaw,
    SinkRejected,
    SinkUnavailable,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    measurement TEXT NOT NULL,
    tags BLOB NOT NULL,
    shelf TEXT,
    sku TEXT,
    UNIQUE (measurement, tags)
);
CREATE INDEX IF NOT EXISTS series_shelf ON series (measurement, shelf);
CREATE INDEX IF NOT EXISTS series_sku ON series (measurement, sku);
CREATE TABLE IF NOT EXISTS weight (
    series INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    weight_g REAL NOT NULL,
    seq INTEGER,
    epoch INTEGER,
    PRIMARY KEY (series, ts_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS points (
    series INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    fields BLOB NOT NULL,
    PRIMARY KEY (series, ts_ms)
) WITHOUT ROWID;
"""

RETENTION_CHECK_S = 60.0
"""How often a write also removes points older than the retention period."""


class SqliteHistorySink:
    """History in a local SQLite file. ``weight`` points get typed columns (they are the bulk);
    every other measurement stores its fields as JSON."""

    backend = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        retention_days: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.retention_ms = int(retention_days * 86_400_000)
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-sqlite")
        self._db: sqlite3.Connection | None = None
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._next_prune_s = 0.0
        self.pruned = 0

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- thread side -------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise SinkUnavailable(f"history file {self.path}: {exc}") from None
            self._db = db
        return self._db

    def _series_id(
        self, db: sqlite3.Connection, measurement: str, tags: tuple[tuple[str, str], ...]
    ) -> int:
        key = (measurement, tags)
        sid = self._series.get(key)
        if sid is not None:
            return sid
        blob = orjson.dumps(tags)
        d = dict(tags)
        db.execute(
            "INSERT OR IGNORE INTO series(measurement, tags, shelf, sku) VALUES (?,?,?,?)",
            (measurement, blob, d.get("shelf"), d.get("sku")),
        )
        row = db.execute(
            "SELECT id FROM series WHERE measurement=? AND tags=?", (measurement, blob)
        ).fetchone()
        sid = int(row[0])
        self._series[key] = sid
        return sid

    def _write_sync(self, points: Sequence[HistoryPoint]) -> None:
        db = self._conn()
        try:
            db.execute("BEGIN")
            weights = []
            others = []
            for p in points:
                sid = self._series_id(db, p.measurement, p.tags)
                if p.measurement == "weight":
                    f = dict(p.fields)
                    weights.append((sid, p.ts_ms, f["weight_g"], f.get("seq"), f.get("epoch")))
                else:
                    others.append((sid, p.ts_ms, orjson.dumps(dict(p.fields))))
            # Multi-row statements: this runs in the sink's worker thread, and each statement
            # step hands the interpreter lock to the main loop (`execute_rows`).
            if weights:
                execute_rows(
                    db,
                    "INSERT OR REPLACE INTO weight(series, ts_ms, weight_g, seq, epoch)",
                    5,
                    weights,
                )
            if others:
                execute_rows(db, "INSERT OR REPLACE INTO points(series, ts_ms, fields)", 3, others)
            db.execute("COMMIT")
        except (sqlite3.IntegrityError, KeyError, TypeError, ValueError) as exc:
            self._rollback(db)
            raise SinkRejected(f"history file {self.path}: bad point: {exc!r}") from None
        except sqlite3.Error as exc:
            self._rollback(db)
            raise SinkUnavailable(f"history file {self.path}: write failed: {exc}") from None
        now_s = self._clock()
        if now_s >= self._next_prune_s:
            self._next_prune_s = now_s + RETENTION_CHECK_S
            self._prune_sync(now_s)

    def _rollback(self, db: sqlite3.Connection) -> None:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        self._series.clear()  # ids inserted by a rolled-back transaction are not real

    def _prune_sync(self, now_s: float) -> int:
        db = self._conn()
        cutoff = int(now_s * 1000) - self.retention_ms
        n = 0
        try:
            for (sid,) in db.execute("SELECT id FROM series").fetchall():
                n += db.execute(
                    "DELETE FROM weight WHERE series=? AND ts_ms < ?", (sid, cutoff)
                ).rowcount
                n += db.execute(
                    "DELETE FROM points WHERE series=? AND ts_ms < ?", (sid, cutoff)
                ).rowcount
        except sqlite3.Error as exc:
            raise SinkUnavailable(f"history file {self.path}: retention failed: {exc}") from None
        self.pruned += n
        return n

    def _query_sync(self, q: HistoryQuery) -> list[ShelfHistoryRaw]:
        db = self._conn()
        col, value = ("shelf", q.shelf) if q.shelf is not None else ("sku", q.sku)
        every = q.every_ms
        try:
            w_rows = db.execute(
                f"SELECT s.shelf, (w.ts_ms / :every) * :every AS b, avg(w.weight_g), "
                f"min(w.weight_g), max(w.weight_g), count(*) "
                f"FROM series s JOIN weight w ON w.series = s.id "
                f"WHERE s.measurement = 'weight' AND s.{col} = :value "
                f"AND w.ts_ms >= :lo AND w.ts_ms < :hi GROUP BY s.shelf, b ORDER BY b",
                {"every": every, "value": value, "lo": q.from_ms, "hi": q.to_ms},
            ).fetchall()
            # SQLite: with max(), the bare columns come from the row holding the maximum.
            u_rows = db.execute(
                f"SELECT s.shelf, (p.ts_ms / :every) * :every AS b, max(p.ts_ms), "
                f"json_extract(p.fields, '$.units') "
                f"FROM series s JOIN points p ON p.series = s.id "
                f"WHERE s.measurement = 'stock' AND s.{col} = :value "
                f"AND p.ts_ms >= :lo AND p.ts_ms < :hi GROUP BY s.shelf, b ORDER BY b",
                {"every": every, "value": value, "lo": q.from_ms, "hi": q.to_ms},
            ).fetchall()
            b_rows = db.execute(
                f"SELECT s.shelf, max(p.ts_ms), json_extract(p.fields, '$.units') "
                f"FROM series s JOIN points p ON p.series = s.id "
                f"WHERE s.measurement = 'stock' AND s.{col} = :value AND p.ts_ms < :lo "
                f"GROUP BY s.shelf",
                {"value": value, "lo": q.from_ms},
            ).fetchall()
        except sqlite3.Error as exc:
            raise SinkUnavailable(f"history file {self.path}: query failed: {exc}") from None
        weight: dict[str, list[tuple[int, float, float, float, int]]] = {}
        units: dict[str, list[tuple[int, int]]] = {}
        before: dict[str, int] = {}
        for shelf, b, mean, lo, hi, n in w_rows:
            weight.setdefault(shelf, []).append((int(b), float(mean), float(lo), float(hi), n))
        for shelf, b, _t, u in u_rows:
            if u is not None:
                units.setdefault(shelf, []).append((int(b), int(u)))
        for shelf, _t, u in b_rows:
            if u is not None:
                before[shelf] = int(u)
        shelves = sorted(set(weight) | set(units) | set(before))
        return [
            ShelfHistoryRaw(s, weight.get(s, []), units.get(s, []), before.get(s)) for s in shelves
        ]

    def _count_sync(self, measurement: str) -> int:
        db = self._conn()
        if measurement == "weight":
            return int(db.execute("SELECT count(*) FROM weight").fetchone()[0])
        return int(
            db.execute(
                "SELECT count(*) FROM points p JOIN series s ON s.id = p.series "
                "WHERE s.measurement = ?",
                (measurement,),
            ).fetchone()[0]
        )

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- loop side ---------------------------------------------------------------------------
    async def write(self, points: Sequence[HistoryPoint]) -> None:
        if points:
            await self._run(self._write_sync, list(points))

    async def query(self, query: HistoryQuery) -> list[ShelfHistoryRaw]:
        result: list[ShelfHistoryRaw] = await self._run(self._query_sync, query)
        return result

    async def prune(self) -> int:
        """Remove points older than the retention period now (also done by writes)."""
        n: int = await self._run(self._prune_sync, self._clock())
        return n

    async def count(self, measurement: str) -> int:
        n: int = await self._run(self._count_sync, measurement)
        return n

    async def aclose(self) -> None:
        await self._run(self._close_sync)
        self._executor.shutdown(wait=False)
