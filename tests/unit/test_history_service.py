"""The historian's drain loop against a real journal and scripted sinks: confirm-then-delete,
retry with the same bytes, bisection of rejected batches, corrupt rows, unique series times."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from controller.adapters.influx import (
    InfluxV1Sink,
    LineEncoder,
    flux_for,
    parse_flux_history,
    parse_influxql_history,
)
from controller.adapters.journal import Journal
from controller.domain.events import CatalogChanged
from controller.ports import (
    EventRow,
    HistoryPoint,
    HistoryQuery,
    JournalUnavailable,
    OutboxEvent,
    ReadingRow,
    ShelfHistoryRaw,
    SinkRejected,
    SinkUnavailable,
)
from controller.services.history import (
    NUDGE_WINDOW_MS,
    SCHEMA,
    SHELF_STATUSES,
    TRANSITIONS,
    HistoryService,
    HistorySettings,
    PointBuilder,
    TimeAssigner,
    Topology,
    fill_buckets,
)

TOPO = Topology("t", {"sh1": ("Z", "K1"), "sh2": ("Z", "K2")}, {"s1": "Z", "s2": "Z"})
FAST = HistorySettings(batch_size=100, backoff_initial_s=0.001, backoff_max_s=0.01)


class MemorySink:
    """Stores points by (series, ts) like InfluxDB; scripted failures."""

    backend = "memory"

    def __init__(self) -> None:
        self.points: dict[tuple[str, tuple[tuple[str, str], ...], int], HistoryPoint] = {}
        self.requests: list[bytes] = []
        self.fail_next = 0
        self.lose_reply_next = 0
        self.reject_if: Callable[[HistoryPoint], bool] = lambda p: False
        self.written = asyncio.Event()
        self.changed = asyncio.Condition()
        self._enc = LineEncoder()

    async def write(self, points: Sequence[HistoryPoint]) -> None:
        self.requests.append(self._enc.encode(points))
        async with self.changed:
            self.changed.notify_all()
        if self.fail_next:
            self.fail_next -= 1
            raise SinkUnavailable("connection refused")
        bad = [p for p in points if self.reject_if(p)]
        for p in points:
            if p not in bad:  # InfluxDB 1.x stores the good points of a partial write
                self.points[(p.measurement, p.tags, p.ts_ms)] = p
        if bad:
            raise SinkRejected("HTTP 400: field type conflict", status=400)
        if self.lose_reply_next:
            self.lose_reply_next -= 1
            raise SinkUnavailable("reply lost")
        self.written.set()

    async def query(self, query: HistoryQuery) -> list[ShelfHistoryRaw]:
        return []

    async def aclose(self) -> None:
        pass


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    j.open()
    yield j
    j.close()


def readings(
    n: int, *, start_seq: int = 1, ts0: float = 1_795_600_000.0, dt: float = 0.5
) -> list[ReadingRow]:
    return [
        ReadingRow("s1", 0, 1, start_seq + i, ts0 + i * dt, 1000.0 + i, "sh1") for i in range(n)
    ]


def stock_event(ts: float, units: int, old: int | None, sku: str = "K1") -> EventRow:
    body = {
        "kind": "stock_changed",
        "shelf_id": "sh1",
        "sku": sku,
        "old_units": old,
        "new_units": units,
        "ts_s": ts,
    }
    return EventRow(ts, "stock_changed", body)


async def test_drains_in_batches_and_deletes_only_confirmed(journal: Journal) -> None:
    journal.commit(readings(250), events=[stock_event(1_795_600_000.0, 5, None)])
    sink = MemorySink()
    svc = HistoryService(journal, sink, TOPO, FAST)
    assert await svc.drain_once() is True  # full batch: more waiting
    assert journal.count("readings") == 250 - 99  # 1 event + 99 readings in the first batch
    while await svc.drain_once():
        pass
    assert journal.count("readings") == 0
    assert journal.count("events") == 0
    assert len(sink.points) == 251
    w = next(p for p in sink.points.values() if p.measurement == "weight")
    assert dict(w.tags) == {
        "site": "t",
        "zone": "Z",
        "shelf": "sh1",
        "sku": "K1",
        "device": "s1",
        "channel": "0",
    }
    assert dict(w.fields) == {"epoch": 1, "seq": 1, "weight_g": 1000.0}
    assert w.ts_ms == 1_795_600_000_000
    stock = next(p for p in sink.points.values() if p.measurement == "stock")
    assert dict(stock.fields) == {"units": 5}  # no delta for the first count
    assert svc.stats.state == "up"


async def test_rows_committed_after_the_outbox_emptied_are_delivered(journal: Journal) -> None:
    """Ids start again at 1 when the controller restarts on an empty outbox
    (test_reading_ids_go_on_from_the_newest_after_a_restart); within a run they go on. The
    drain reads from the head, so it skips neither."""
    sink = MemorySink()
    svc = HistoryService(journal, sink, TOPO, FAST)
    journal.commit(readings(30))
    await svc.drain_once()
    assert journal.count("readings") == 0
    journal.commit(readings(5, start_seq=100, ts0=1_795_700_000.0))
    assert journal.read_readings(0, 1)[0].id == 31  # numbering goes on within a run
    await svc.drain_once()
    assert len(sink.points) == 35
    assert journal.count("readings") == 0


async def test_outage_retries_same_bytes_and_keeps_rows(journal: Journal) -> None:
    journal.commit(readings(10))
    sink = MemorySink()
    sink.fail_next = 5
    svc = HistoryService(journal, sink, TOPO, FAST)
    task = asyncio.create_task(svc.drain_once())
    async with sink.changed:
        await asyncio.wait_for(sink.changed.wait_for(lambda: len(sink.requests) >= 3), 5)
    assert journal.count("readings") == 10  # nothing deleted while down
    assert svc.stats.state == "down"
    await asyncio.wait_for(task, 5)
    assert len(set(sink.requests)) == 1  # every retry sent exactly the same bytes
    assert len(sink.requests) == 6
    assert journal.count("readings") == 0
    assert len(sink.points) == 10
    assert svc.stats.state == "up"


async def test_lost_reply_adds_no_point(journal: Journal) -> None:
    journal.commit(readings(50))
    sink = MemorySink()
    sink.lose_reply_next = 2  # stored, but we never hear so: resent twice
    svc = HistoryService(journal, sink, TOPO, FAST)
    await svc.drain_once()
    assert len(sink.requests) == 3
    assert len(sink.points) == 50


async def test_rejected_point_is_bisected_dead_lettered_once_rest_lands(journal: Journal) -> None:
    journal.commit(readings(64))
    sink = MemorySink()
    sink.reject_if = lambda p: dict(p.fields).get("seq") == 37
    svc = HistoryService(journal, sink, TOPO, FAST)
    await svc.drain_once()
    assert len(sink.points) == 63
    assert journal.count("readings") == 0
    letters = journal.dead_letters(10)
    assert len(letters) == 1
    assert letters[0]["reason"] == "history_rejected"
    assert orjson.loads(letters[0]["payload"])["fields"]["seq"] == 37
    # Found by bisection: log2(64) + 1 requests hold it; once alone and rejected it is never
    # sent again.
    holding = [r for r in sink.requests if b"seq=37i" in r]
    assert len(holding) == 7
    assert svc.stats.dead_lettered == 1
    journal.commit(readings(5, start_seq=100))
    await svc.drain_once()
    assert sum(b"seq=37i" in r for r in sink.requests) == 7


async def test_corrupt_rows_are_dead_lettered_and_skipped(journal: Journal) -> None:
    journal.commit(readings(3), events=[stock_event(1_795_600_001.0, 4, 5)])
    journal.db.execute(
        "INSERT INTO events(ts, kind, body) VALUES (?, 'stock_changed', ?)",
        (1_795_600_002.0, b'{"kind": "stock_changed", "shelf_id": "sh1", "new_u'),
    )
    journal.db.execute(
        "INSERT INTO readings(device, channel, epoch, seq, ts, weight_g, shelf) "
        "VALUES ('s1', 0, 1, 99, 'garbage', 1.0, 'sh1')"
    )
    journal.outbox_rows += 2
    journal.commit(readings(2, start_seq=200))
    sink = MemorySink()
    svc = HistoryService(journal, sink, TOPO, FAST)
    await svc.drain_once()
    assert journal.count("readings") == 0
    assert journal.count("events") == 0
    assert len(sink.points) == 6
    reasons = sorted(d["reason"] for d in journal.dead_letters(10))
    assert reasons == ["history_corrupt_row", "history_corrupt_row"]
    assert svc.stats.corrupt_rows == 2
    stock = next(p for p in sink.points.values() if p.measurement == "stock")
    assert dict(stock.fields) == {"units": 4, "delta": -1}


async def test_journal_failure_keeps_the_loop_alive_and_rebuilds_the_same_times(
    journal: Journal,
) -> None:
    """A failing outbox delete (disk full) must neither kill the task nor shift the rebuilt
    batch's series times (that would store every point twice)."""
    same_ms = [ReadingRow("s1", 0, 1, i, 1_795_600_000.0, float(i), "sh1") for i in range(1, 41)]
    journal.commit(same_ms)
    sink = MemorySink()
    svc = HistoryService(
        journal,
        sink,
        TOPO,
        HistorySettings(batch_size=100, backoff_initial_s=0.001, backoff_max_s=0.01),
    )
    original = journal.delete_confirmed
    calls = 0

    def failing_once(r: int | None, e: int | None) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk full")
        return original(r, e)

    journal.delete_confirmed = failing_once  # type: ignore[method-assign]
    task = asyncio.create_task(svc.run())
    try:
        await asyncio.wait_for(svc.wait_for(lambda: journal.count("readings") == 0), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert calls == 2
    assert len(sink.requests) == 2
    assert sink.requests[0] == sink.requests[1]  # rebuilt identically
    assert len(sink.points) == 40


async def test_a_bug_in_the_drain_is_not_retried_as_an_unavailable_journal(
    journal: Journal,
) -> None:
    """Only JournalUnavailable (and the state file's OSError) mean "retry with backoff": a
    programming error ends ``run`` with its traceback instead of a retry loop that reports
    it as an outbox failure forever."""
    journal.commit(readings(5))
    svc = HistoryService(journal, MemorySink(), TOPO, FAST)

    def buggy(after_id: int, limit: int) -> list[OutboxEvent]:
        raise TypeError("read_events() got an unexpected keyword argument 'after'")

    journal.read_events = buggy  # type: ignore[method-assign]
    with pytest.raises(TypeError, match="unexpected keyword"):
        await asyncio.wait_for(svc.run(), 5)
    assert svc.stats.last_error is None
    assert journal.count("readings") == 5


async def test_an_unavailable_journal_is_retried_until_it_is_back(journal: Journal) -> None:
    journal.commit(readings(5))
    sink = MemorySink()
    svc = HistoryService(journal, sink, TOPO, FAST)
    original = journal.read_events
    calls = 0

    def locked(after_id: int, limit: int) -> list[OutboxEvent]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise JournalUnavailable("outbox read failed: database is locked")
        return original(after_id, limit)

    journal.read_events = locked  # type: ignore[method-assign]
    task = asyncio.create_task(svc.run())
    try:
        await asyncio.wait_for(svc.wait_for(lambda: journal.count("readings") == 0), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert calls >= 3
    assert len(sink.points) == 5


def test_time_assigner_makes_series_times_unique() -> None:
    a = TimeAssigner()
    tags = (("shelf", "sh1"),)
    burst = [a.assign(HistoryPoint("weight", tags, (("f", 1.0),), 1000)) for _ in range(3000)]
    assert [p.ts_ms for p in burst] == list(range(1000, 4000))  # a burst of one receive time
    other = a.assign(HistoryPoint("weight", (("shelf", "sh2"),), (("f", 1.0),), 1000))
    assert other.ts_ms == 1000  # other series untouched
    later = a.assign(HistoryPoint("weight", tags, (("f", 1.0),), 10_000))
    assert later.ts_ms == 10_000
    stepped = a.assign(HistoryPoint("weight", tags, (("f", 1.0),), 10_000 - NUDGE_WINDOW_MS - 5))
    assert stepped.ts_ms == 10_000 - NUDGE_WINDOW_MS - 5  # a big clock step back keeps its time


def weight_point(seq: int, ts_ms: int, epoch: int = 1) -> HistoryPoint:
    fields = (("epoch", epoch), ("seq", seq), ("weight_g", 1.0))
    return HistoryPoint("weight", (("shelf", "sh1"),), fields, ts_ms)


def test_time_assigner_keeps_a_late_readings_own_time_and_the_series_state() -> None:
    """A reading delivered after newer ones (fault case M7) is stored at its own millisecond,
    whether it is 1 ms or an hour behind, and the series carries on as if it never came."""
    a = TimeAssigner()
    burst = [a.assign(weight_point(s, 10_000)) for s in (10, 11, 12)]
    assert [p.ts_ms for p in burst] == [10_000, 10_001, 10_002]
    assert a.assign(weight_point(7, 9_999)).ts_ms == 9_999  # within the nudge window
    assert a.assign(weight_point(3, 10_000 - 3_600_000)).ts_ms == 10_000 - 3_600_000
    assert a.assign(weight_point(8, 9_998, epoch=0)).ts_ms == 9_998  # a previous boot
    assert a.assign(weight_point(13, 10_000)).ts_ms == 10_003  # the burst goes on after 10_002
    # A clock that stepped back under a newer seq is still nudged (never two rows in one ms).
    assert a.assign(weight_point(14, 9_990)).ts_ms == 10_004
    a2 = TimeAssigner()
    a2.restore(a.snapshot())
    assert a2.assign(weight_point(9, 9_997)).ts_ms == 9_997
    assert a2.assign(weight_point(15, 10_000)).ts_ms == 10_005


def test_time_assigner_keeps_late_readings_of_one_millisecond_apart() -> None:
    """Late readings stamped in one millisecond (a burst, a coarse clock) must not overwrite
    each other: each takes the next millisecond no late point of its series has used."""
    a = TimeAssigner()
    a.assign(weight_point(100, 50_000))
    late = [a.assign(weight_point(s, t)) for s, t in ((10, 9_000), (11, 9_000), (12, 9_001))]
    assert [p.ts_ms for p in late] == [9_000, 9_001, 9_002]
    down = [a.assign(weight_point(s, t)) for s, t in ((22, 8_002), (21, 8_001), (20, 8_001))]
    assert [p.ts_ms for p in down] == [8_002, 8_001, 8_003]
    a2 = TimeAssigner()
    a2.restore(a.snapshot())
    assert a2.assign(weight_point(13, 9_000)).ts_ms == 9_003  # remembered across a restart
    assert a2.assign(weight_point(101, 50_000)).ts_ms == 50_001
    # The same late reading journaled again (its first copy had left the outbox) lands on the
    # point it made the first time: overwritten, not added.
    assert a2.assign(weight_point(11, 9_000)).ts_ms == 9_001


def test_a_late_reading_never_takes_the_millisecond_of_the_readings_around_its_gap() -> None:
    """A late reading lands strictly between the two in-order points around its gap, never on
    their milliseconds (found by the broker-restart test: seq 1524, late, stamped in the same
    millisecond as seq 1523, the last reading before the gap, overwrote it in history)."""
    a = TimeAssigner()
    before = a.assign(weight_point(1523, 993))
    after = a.assign(weight_point(1902, 5_000))  # the gap: 1524..1901
    late = [
        a.assign(weight_point(s, t))
        for s, t in ((1524, 993), (1525, 996), (1901, 5_000), (1900, 4_999))
    ]
    assert [p.ts_ms for p in late] == [994, 996, 4_999, 4_998]
    assert len({before.ts_ms, after.ts_ms, *(p.ts_ms for p in late)}) == 6
    a2 = TimeAssigner()
    a2.restore(a.snapshot())  # the gap and its late points are remembered across a restart
    assert a2.assign(weight_point(1526, 990)).ts_ms == 995
    assert a2.assign(weight_point(1524, 993)).ts_ms == 994  # the same reading again: same point
    # A gap too narrow for its late readings (3 readings in 2 ms): counted, kept at its own time.
    a3 = TimeAssigner()
    a3.assign(weight_point(10, 1_000))
    a3.assign(weight_point(13, 1_001))
    assert a3.assign(weight_point(11, 1_000)).ts_ms == 1_000
    assert a3.crowded == 1


async def test_restart_rebuilds_a_batch_with_the_same_times(tmp_path: Path) -> None:
    """Crash after the sink stored a batch but before the outbox delete: the restarted service
    must rebuild those points with the same series times (else they land twice)."""
    j = Journal(tmp_path / "j.sqlite")
    j.open()
    same = [ReadingRow("s1", 0, 1, i, 1_795_600_000.0, 1.0 * i, "sh1") for i in range(1, 8)]
    j.commit(same)
    state = tmp_path / "state.json"
    sink = MemorySink()
    svc = HistoryService(j, sink, TOPO, HistorySettings(batch_size=4), state_path=state)
    await svc.drain_once()  # seq 1-4 → t, t+1, t+2, t+3; deleted
    # Second batch: stored, then "crash" before the delete.
    original_delete = j.delete_confirmed

    def crash(*_: object) -> int:
        raise SystemExit("kill -9")

    j.delete_confirmed = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        await svc.drain_once()
    j.delete_confirmed = original_delete  # type: ignore[method-assign]
    first_times = sorted(k[2] for k in sink.points)
    svc2 = HistoryService(j, sink, TOPO, HistorySettings(batch_size=4), state_path=state)
    await svc2.drain_once()
    assert sorted(k[2] for k in sink.points) == first_times
    assert len(sink.points) == 7
    # Nothing overwritten: every reading is there once (without the saved state, seq 5-7 would
    # be rebuilt at t..t+2 and replace seq 1-3).
    assert sorted(dict(p.fields)["seq"] for p in sink.points.values()) == list(range(1, 8))
    assert j.count("readings") == 0
    j.close()


def test_point_builder_maps_every_event_kind_to_the_schema() -> None:
    b = PointBuilder(TOPO)
    bodies = [
        {"kind": "shelf_status_changed", "shelf_id": "sh1", "old": "ok", "new": "stale",
         "ts_s": 1.0, "reason": "no_reading"},
        {"kind": "alert_raised", "key": "K1", "episode_id": "e1", "severity": "low", "level": 3,
         "threshold": 10, "suggested_order_qty": 30, "ts_s": 1.0, "sku": "K1"},
        {"kind": "alert_escalated", "key": "shelf:sh1", "episode_id": "e1", "old_severity": "low",
         "new_severity": "out", "level": 0, "threshold": 0, "ts_s": 1.0, "sku": "K1",
         "suggested_order_qty": 40},
        {"kind": "alert_resolved", "key": "K1", "episode_id": "e1", "severity": "low",
         "level": 20, "raised_at_s": 0.5, "ts_s": 1.0, "sku": "K1", "suggested_order_qty": 20},
        {"kind": "seq_gap", "ts": 1.0, "device": "s2", "after_seq": 4, "seq": 9, "missing": 4},
        {"kind": "something_new", "x": 1},
    ]  # fmt: skip
    for i, body in enumerate(bodies):
        p = b.event(OutboxEvent(i, 1.5, body["kind"], orjson.dumps(body)))
        schema = SCHEMA[p.measurement]
        assert {k for k, _ in p.tags} <= set(schema["tags"]), p
        assert {k for k, _ in p.fields} <= set(schema["fields"]), p
        assert p.ts_ms == 1500
        for k, v in p.fields:
            want = {"float": float, "integer": int, "string": str}[schema["fields"][k]]
            assert type(v) is want, (p, k)
    alert = b.event(OutboxEvent(9, 1.0, "alert_escalated", orjson.dumps(bodies[2])))
    assert dict(alert.tags)["severity"] == "out"
    assert dict(alert.tags)["transition"] == "escalated"


def test_fill_buckets_carries_units_forward() -> None:
    q = HistoryQuery("sh1", None, 1_000, 7_000, 2_000)
    raw = ShelfHistoryRaw("sh1", [(2_000, 5.0, 4.0, 6.0, 3)], [(4_000, 7)], 9)
    got = fill_buckets(raw, q)
    assert [(b.t_ms, b.readings, b.units, b.weight_g_mean) for b in got] == [
        (0, 0, 9, None),
        (2_000, 3, 9, 5.0),
        (4_000, 0, 7, None),
        (6_000, 0, 7, None),
    ]


def test_influxql_statements_and_parse() -> None:
    sink = InfluxV1Sink("http://127.0.0.1:1", "fh", "autogen")
    q = HistoryQuery(None, "K'1", 1_000, 61_000, 60_000)
    text = sink.influxql_for(q)
    assert "\"sku\" = 'K\\'1'" in text
    assert 'FROM "fh"."autogen"."weight"' in text
    assert "GROUP BY time(60000ms)" in text
    results = [
        {"series": [{"tags": {"shelf": "sh1"}, "values": [[0, 5.0, 4.0, 6.0, 3]]}]},
        {"series": [{"tags": {"shelf": "sh1"}, "values": [[0, 7]]}]},
        {"series": [{"tags": {"shelf": "sh1"}, "values": [[0, 9]]}]},
    ]
    assert parse_influxql_history(results) == [
        ShelfHistoryRaw("sh1", [(0, 5.0, 4.0, 6.0, 3)], [(0, 7)], 9)
    ]


def test_flux_program_and_parse() -> None:
    """Flux cannot run against victoria-metrics: its text and the record folding are checked."""
    q = HistoryQuery("sh1", None, 1_000, 61_000, 60_000)
    flux, params = flux_for(q, "b")
    assert "r.shelf == params.value" in flux
    assert 'timeSrc: "_start"' in flux
    assert params["value"] == "sh1"
    assert params["bucket"] == "b"
    t0 = datetime.fromtimestamp(0, UTC)
    recs = [
        {"result": "mean", "shelf": "sh1", "_time": t0, "_value": 5.0},
        {"result": "min", "shelf": "sh1", "_time": t0, "_value": 4.0},
        {"result": "max", "shelf": "sh1", "_time": t0, "_value": 6.0},
        {"result": "count", "shelf": "sh1", "_time": t0, "_value": 3},
        {"result": "units", "shelf": "sh1", "_time": t0, "_value": 7},
        {"result": "before", "shelf": "sh1", "_time": t0, "_value": 9},
    ]
    assert parse_flux_history(recs) == [
        ShelfHistoryRaw("sh1", [(0, 5.0, 4.0, 6.0, 3)], [(0, 7)], 9)
    ]


async def test_run_loop_wakes_and_drains(journal: Journal) -> None:
    sink = MemorySink()
    svc = HistoryService(
        journal, sink, TOPO, HistorySettings(batch_size=100, flush_interval_s=30.0)
    )
    task = asyncio.create_task(svc.run())
    try:
        journal.commit(readings(5))
        svc.wake()
        t0 = time.monotonic()
        await asyncio.wait_for(sink.written.wait(), 5)
        assert time.monotonic() - t0 < 5
        await asyncio.wait_for(svc.wait_for(lambda: journal.count("readings") == 0), 5)
        assert len(sink.points) == 5
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- schema document and dashboards -------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana" / "dashboards").glob("*.json"))


def documented_schema() -> dict[str, dict[str, Any]]:
    """The measurement table of docs/influx-schema.md."""
    out: dict[str, dict[str, Any]] = {}
    text = (ROOT / "docs" / "influx-schema.md").read_text()
    section = text.split("## Measurements", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        measurement = cells[0].strip("`")
        tags = tuple(re.findall(r"`([^`]+)`", cells[1]))
        fields = dict(re.findall(r"`([^`]+)` \((\w+)\)", cells[2]))
        out[measurement] = {"tags": tags, "fields": fields}
    return out


def test_schema_document_matches_the_code() -> None:
    assert documented_schema() == SCHEMA


def panel_queries() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                out.append((f"{path.name}:${var['name']}", str(var["query"])))
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{path.name}:{panel['title']}", t["query"]))
    return out


_RESERVED_ALIASES = {"time"}


def check_influxql(query: str) -> list[str]:
    """Names in the query that the documented schema does not have."""
    problems = []
    schema = documented_schema()
    measurements = re.findall(r'FROM\s+"([^"]+)"', query)
    if not measurements:
        problems.append("no measurement")
    allowed: set[str] = set(_RESERVED_ALIASES)
    for m in measurements:
        if m not in schema:
            problems.append(f"unknown measurement {m!r}")
            continue
        allowed.update(schema[m]["tags"])
        allowed.update(schema[m]["fields"])
    allowed.update(re.findall(r'AS\s+"([^"]+)"', query))
    for name in re.findall(r'"([^"]+)"', re.sub(r'FROM\s+"[^"]+"', "FROM", query)):
        if name not in allowed:
            problems.append(f"{name!r} is not a tag or field of {measurements}")
    for tag, value in re.findall(r'"([^"]+)"\s*=\s*\'([^\']*)\'', query):
        if tag == "status" and value not in SCHEMA_ENUMS["status"]:
            problems.append(f"status {value!r} does not exist")
        if tag == "transition" and value not in SCHEMA_ENUMS["transition"]:
            problems.append(f"transition {value!r} does not exist")
    if not query.startswith("SHOW") and "$timeFilter" not in query:
        problems.append("no $timeFilter")
    return problems


SCHEMA_ENUMS = {"status": set(SHELF_STATUSES), "transition": set(TRANSITIONS)}


def test_dashboards_exist_and_every_query_matches_the_schema() -> None:
    names = {p.stem for p in DASHBOARDS}
    assert names == {
        "stock-overview",
        "low-stock",
        "alert-timeline",
        "device-health",
        "ingest-throughput",
    }
    queries = panel_queries()
    assert len(queries) >= 15
    problems = {where: p for where, q in queries if (p := check_influxql(q))}
    assert problems == {}
    # The checker does catch mistakes.
    assert check_influxql('SELECT mean("weight") FROM "weight" WHERE $timeFilter')
    assert check_influxql('SELECT last("units") FROM "stocks" WHERE $timeFilter')
    assert check_influxql(
        'SELECT count("status_code") FROM "shelf_status" WHERE "status" = \'gone\' AND $timeFilter'
    )


def test_dashboards_use_the_provisioned_datasource() -> None:
    ds = yaml.safe_load(
        (ROOT / "dashboards/grafana/provisioning/datasources/floorhand-influxdb.yaml").read_text()
    )
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["type"] == "influxdb"
    prov = yaml.safe_load(
        (ROOT / "dashboards/grafana/provisioning/dashboards/floorhand.yaml").read_text()
    )
    assert prov["providers"][0]["type"] == "file"
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"].startswith("floorhand-")
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == uid, (path.name, panel["title"])
            for t in panel["targets"]:
                assert t["datasource"]["uid"] == uid


def catalog_changed(version: int) -> CatalogChanged:
    return CatalogChanged(
        ts_s=1_795_600_100.0, version=version, by="eng", source="api", added=0, removed=0,
        changed=1, shelves=("sh1",),
    )  # fmt: skip


async def test_a_catalogue_change_retags_rows_journaled_after_it_only(journal: Journal) -> None:
    """sh1 moved from K1 to K2 (and zone Z to Y) by a live catalogue change: rows journaled
    before the change (still in the outbox) keep K1, rows after it get K2; once the old rows
    are drained, rows with reused ids get K2 too. A stock point's SKU is its event's (the
    recount as the change applies is journaled before the change reaches the historian)."""
    site = [TOPO]
    sink = MemorySink()
    svc = HistoryService(journal, sink, TOPO, FAST)
    listener = svc.catalogue_listener(lambda: site[0])
    recount = stock_event(1_795_600_100.0, 6, 5, sku="K2")
    journal.commit(readings(3), events=[stock_event(1_795_600_000.0, 5, None), recount])
    site[0] = Topology("t", {"sh1": ("Y", "K2"), "sh2": ("Z", "K2")}, {"s1": "Z", "s2": "Z"})
    listener([stock_event(0.0, 1, None), catalog_changed(2)])  # other events are ignored
    journal.commit(
        readings(3, start_seq=4, ts0=1_795_600_200.0),
        events=[stock_event(1_795_600_200.0, 7, 6, sku="K2")],
    )
    while await svc.drain_once():
        pass
    assert journal.count("readings") == 0

    def tagged(measurement: str) -> list[tuple[int, str, str]]:
        return sorted(
            (p.ts_ms, dict(p.tags)["zone"], dict(p.tags)["sku"])
            for p in sink.points.values()
            if p.measurement == measurement
        )

    assert [t[1:] for t in tagged("weight")] == [("Z", "K1")] * 3 + [("Y", "K2")] * 3
    assert [t[1:] for t in tagged("stock")] == [("Z", "K1"), ("Z", "K2"), ("Y", "K2")]
    journal.commit(readings(2, start_seq=7, ts0=1_795_600_300.0))
    assert journal.read_readings(0, 1)[0].id == 7  # after the old era's ids, which are gone
    await svc.drain_once()
    assert [t[1:] for t in tagged("weight")][6:] == [("Y", "K2")] * 2


def test_a_threshold_change_does_not_rebuild_the_tags(journal: Journal) -> None:
    built: list[Topology] = []

    def topology() -> Topology:
        built.append(TOPO)
        return TOPO

    svc = HistoryService(journal, MemorySink(), TOPO, FAST)
    listener = svc.catalogue_listener(topology)
    sku_only = CatalogChanged(
        ts_s=1.0, version=2, by="sup", source="api", added=0, removed=0, changed=1, skus=("K1",)
    )
    listener([sku_only])
    assert built == []
    listener([catalog_changed(3)])  # a shelf changed
    assert built == [TOPO]
