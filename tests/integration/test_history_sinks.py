"""The historian against real servers on 127.0.0.1: Debian's influxd 1.6.7 (1.x API), and
victoria-metrics for influxdb-client's v2 write path (read back with /api/v1/export, since it
answers 204 even for rows it drops); the embedded SQLite sink; and the history API.

Faults: database stopped under load and restarted (exact count), replies cut after the server
stored the batch (no duplicate), a 400 partial write (dead-lettered once, the rest lands), a
torn outbox after kill -9 (committed rows delivered), precision (stored time = reading time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from controller.adapters.influx import InfluxV1Sink, InfluxV2Sink
from controller.adapters.journal import Journal
from controller.adapters.sqlite_history import SqliteHistorySink
from controller.api.app import create_app
from controller.config import load_site
from controller.ports import EventRow, HistoryQuery, HistorySink, OutboxReading, ReadingRow
from controller.runtime import Runtime
from controller.services.history import HistoryService, HistorySettings, Topology
from tests.influx_servers import InfluxD, VictoriaMetrics
from tests.integration.test_sensing_e2e import readings, running
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import auth_headers, write_small_site
from tests.waiting import wait_for_condition

ROOT = Path(__file__).resolve().parents[2]
SHELVES = {f"sh{i}": ("Z", f"K{i}") for i in range(1, 5)}
DEVICES = {f"s{i}": "Z" for i in range(1, 5)}


def topo(site: str) -> Topology:
    return Topology(site, dict(SHELVES), dict(DEVICES))


def reading_rows(n: int, *, ts0: float, dt: float = 0.001, seq0: int = 1) -> list[ReadingRow]:
    """n readings spread over the 4 shelves (device s<i> feeds shelf sh<i>)."""
    out = []
    for k in range(n):
        i = k % 4 + 1
        out.append(ReadingRow(f"s{i}", 0, 1, seq0 + k, ts0 + k * dt, 500.0 + k % 997, f"sh{i}"))
    return out


def stock_row(ts: float, shelf: str, units: int) -> EventRow:
    body = {
        "kind": "stock_changed",
        "shelf_id": shelf,
        "sku": SHELVES[shelf][1],
        "old_units": None,
        "new_units": units,
        "ts_s": ts,
    }
    return EventRow(ts, "stock_changed", body)


@pytest.fixture(scope="module")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    server = InfluxD(tmp_path_factory.mktemp("influxd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path_factory.mktemp("victoria"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    j.open()
    yield j
    j.close()


async def drain_all(svc: HistoryService, journal: Journal, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while journal.count("readings") or journal.count("events"):
            await svc.drain_once()


class _Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port``: requests are forwarded at once,
    each chunk of the server's reply goes through ``_reply`` (False: drop it and close the
    client's connection). Its connection tasks are tracked and cancelled on exit."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reply(self, data: bytes) -> bool:
        return True

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # The server runs this in a task of its own, which ``Server.close`` leaves running:
        # tracked with the pumps so that the exit cancels it too.
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)
        me.add_done_callback(self._tasks.discard)
        # The exit's cancel ends it normally: a cancelled handler task makes asyncio's stream
        # callback log an error on Python 3.11.
        with contextlib.suppress(asyncio.CancelledError):
            await self._proxy(c_reader, c_writer)

    async def _proxy(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump_up() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await c_reader.read(65536):
                    u_writer.write(data)
                    await u_writer.drain()

        up = asyncio.create_task(pump_up())
        self._tasks.add(up)
        up.add_done_callback(self._tasks.discard)
        try:
            while data := await u_reader.read(65536):
                if not await self._reply(data):
                    break
                c_writer.write(data)
                await c_writer.drain()
        except OSError:
            pass
        finally:
            up.cancel()
            for w in (c_writer, u_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()


class ReplyCutter(_Proxy):
    """While ``cut`` > 0, drops the server's reply and closes the client connection (the server
    did store the batch)."""

    def __init__(self, upstream_port: int, cut: int) -> None:
        super().__init__(upstream_port)
        self.cut = cut
        self.cuts_done = 0

    async def _reply(self, data: bytes) -> bool:
        if self.cut > 0:
            self.cut -= 1
            self.cuts_done += 1
            return False  # the reply is lost
        return True


# -- InfluxDB 1.x ------------------------------------------------------------------------------
async def test_influxdb1_drain_precision_and_query(influxd: InfluxD, journal: Journal) -> None:
    db = "precision"
    influxd.create_database(db)
    now = time.time()
    rows = reading_rows(2_000, ts0=now - 10.0, dt=0.003)
    journal.commit(rows, events=[stock_row(now - 9.5, "sh1", 7), stock_row(now - 5.0, "sh1", 6)])
    sink = InfluxV1Sink(influxd.url, db)
    svc = HistoryService(journal, sink, topo("t"), HistorySettings(batch_size=700))
    await drain_all(svc, journal)
    assert influxd.count(db, "weight", "weight_g") == 2_000
    assert influxd.count(db, "stock", "units") == 2
    stored = sorted(influxd.times(db, "weight", "weight_g"))
    wanted = sorted(int(r.ts_s * 1000) for r in rows)
    assert stored == wanted  # exact ms; nothing in 1970
    assert all(abs(t / 1000 - r.ts_s) < 1.0 for t, r in zip(stored, rows, strict=True))
    # Downsampled server-side (InfluxQL): 10 s buckets for shelf sh1.
    q = HistoryQuery("sh1", None, int((now - 20) * 1000), int(now * 1000), 10_000)
    result = await svc.query(q)
    assert [s.shelf for s in result] == ["sh1"]
    buckets = result[0].buckets
    assert sum(b.readings for b in buckets) == 500
    assert buckets[-1].units == 6
    by_sku = await svc.query(HistoryQuery(None, "K2", q.from_ms, q.to_ms, q.every_ms))
    assert [s.shelf for s in by_sku] == ["sh2"]
    await sink.aclose()


async def test_influxdb1_partial_write_dead_lettered_once_rest_lands(
    influxd: InfluxD, journal: Journal
) -> None:
    db = "conflict"
    influxd.create_database(db)
    now = time.time()
    # The server already has seq_gap.missing as a string: our integer is a type conflict (400).
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.post(
            f"{influxd.url}/write",
            params={"db": db, "precision": "ms"},
            content=f'seq_gap,site=t missing="x" {int((now - 100) * 1000)}',
        )
        assert r.status_code == 204
    gap = {"kind": "seq_gap", "ts": now, "device": "s1", "after_seq": 3, "seq": 9, "missing": 5}
    journal.commit(reading_rows(1_000, ts0=now - 5.0), events=[EventRow(now - 1.0, "seq_gap", gap)])
    sink = InfluxV1Sink(influxd.url, db)
    svc = HistoryService(journal, sink, topo("t"), HistorySettings(batch_size=5_000))
    await drain_all(svc, journal)
    assert influxd.count(db, "weight", "weight_g") == 1_000
    letters = journal.dead_letters(10)
    assert [d["reason"] for d in letters] == ["history_rejected"]
    assert "field type conflict" in letters[0]["detail"]
    assert svc.stats.dead_lettered == 1
    rejected = svc.stats.rejected_requests
    journal.commit(reading_rows(10, ts0=now - 1.0, seq0=5_000))
    await drain_all(svc, journal)
    assert svc.stats.rejected_requests == rejected  # never sent again
    assert influxd.count(db, "weight", "weight_g") == 1_010
    await sink.aclose()


# -- v2 write API (influxdb-client) against victoria-metrics ------------------------------------
async def test_influxdb2_client_writes_to_victoria(
    victoria: VictoriaMetrics, journal: Journal
) -> None:
    now = time.time()
    rows = reading_rows(3_000, ts0=now - 30.0, dt=0.005)
    journal.commit(rows, events=[stock_row(now - 1.0, "sh3", 11)])
    sink = InfluxV2Sink(victoria.url, "org", "bucket", "token", use_gzip=True)
    svc = HistoryService(journal, sink, topo("v2basic"), HistorySettings(batch_size=1_000))
    await drain_all(svc, journal)
    await sink.aclose()
    match = '{__name__="weight_weight_g",site="v2basic"}'
    n = await asyncio.to_thread(victoria.wait_samples, match, 3_000)
    assert n == 3_000
    stored = sorted(
        t for s in await asyncio.to_thread(victoria.export, match) for t in s["timestamps"]
    )
    assert stored == sorted(int(r.ts_s * 1000) for r in rows)  # ms precision, exact
    units = await asyncio.to_thread(victoria.export, '{__name__="stock_units",site="v2basic"}')
    assert [s["values"] for s in units] == [[11]]


# -- lost replies -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["influxdb1", "influxdb2"])
async def test_reply_cut_after_store_adds_no_point(
    backend: str, influxd: InfluxD, victoria: VictoriaMetrics, journal: Journal
) -> None:
    now = time.time()
    site = f"cut{backend[-1]}"
    rows = reading_rows(3_000, ts0=now - 20.0, dt=0.004)
    # A burst with one receive time on one shelf (ESPHome style): series times must be unique.
    burst = [ReadingRow("s1", 0, 2, 10_000 + k, now - 2.0, 900.0 + k, "sh1") for k in range(50)]
    journal.commit(rows + burst)
    upstream = influxd if backend == "influxdb1" else victoria
    async with ReplyCutter(upstream.port, cut=3) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        sink: HistorySink
        if backend == "influxdb1":
            db = "replycut"
            influxd.create_database(db)
            sink = InfluxV1Sink(url, db, timeout_s=5.0)
        else:
            sink = InfluxV2Sink(url, "org", "bucket", "token", timeout_s=5.0)
        settings = HistorySettings(batch_size=1_000, backoff_initial_s=0.01, backoff_max_s=0.1)
        svc = HistoryService(journal, sink, topo(site), settings)
        await drain_all(svc, journal)
        await sink.aclose()
    assert proxy.cuts_done == 3
    assert svc.stats.retries >= 3
    if backend == "influxdb1":
        assert influxd.count("replycut", "weight", "weight_g") == 3_050
    else:
        match = f'{{__name__="weight_weight_g",site="{site}"}}'
        assert await asyncio.to_thread(victoria.wait_samples, match, 3_050) == 3_050


# -- outage under load --------------------------------------------------------------------------
@pytest.mark.slow
async def test_database_outage_under_load_loses_nothing(tmp_path: Path, journal: Journal) -> None:
    """influxd stopped for ~2 s while readings keep being committed at 4k/s; restarted on the
    same port: the final count equals the committed count exactly, and the producer (the
    ingest stand-in on the same event loop) never stalled."""
    server = InfluxD(tmp_path / "influxd")
    await asyncio.to_thread(server.start)
    try:
        server.create_database("outage")
        sink = InfluxV1Sink(server.url, "outage", timeout_s=2.0)
        settings = HistorySettings(
            batch_size=2_000, backoff_initial_s=0.05, backoff_max_s=0.5, flush_interval_s=0.1
        )
        svc = HistoryService(journal, sink, topo("t"), settings)
        task = asyncio.create_task(svc.run(), name="history")
        committed = 0
        worst_lag_s = 0.0
        period_s = 0.025

        async def produce(batches: int) -> None:
            # A fixed number of batches, paced: a loaded machine makes it slower, never shorter.
            nonlocal committed, worst_lag_s
            t_next = time.monotonic()
            for _ in range(batches):
                lag = time.monotonic() - t_next
                worst_lag_s = max(worst_lag_s, lag)
                rows = reading_rows(100, ts0=time.time(), dt=0.0002, seq0=committed + 1)
                journal.commit(rows)
                committed += 100
                t_next += period_s
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))

        producer = asyncio.create_task(produce(160))  # 4 s at 4k readings/s
        await asyncio.wait_for(svc.wait_for(lambda: svc.stats.points_written >= 2_000), 10)
        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(svc.wait_for(lambda: svc.stats.state == "down"), 10)
        held = journal.outbox_rows
        await asyncio.wait({producer}, timeout=2.0)  # the outage: ~2 s of production
        assert journal.outbox_rows > held  # the outbox grew meanwhile
        await asyncio.to_thread(server.start)
        await producer
        await asyncio.wait_for(svc.wait_for(lambda: journal.count("readings") == 0), 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert committed == 16_000
        assert server.count("outage", "weight", "weight_g") == committed
        # Not a speed check (benchmarks/history_drain.py measures that): a sink blocking the
        # event loop during the outage would stall the producer for its 2 s time-out or more.
        assert worst_lag_s < 1.0, f"producer stalled {worst_lag_s:.3f} s"
        assert svc.stats.state == "up"
    finally:
        await asyncio.to_thread(server.stop)


# -- slow database ------------------------------------------------------------------------------
class SlowReplies(_Proxy):
    """Holds the database's replies: while ``gate`` is clear each reply waits for it (the
    database is stuck), then every reply is delayed by ``delay_s`` (slow but moving);
    ``delay_s = 0`` with the gate set is a fast database again. ``held`` is set when a reply
    starts waiting."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.gate = asyncio.Event()
        self.delay_s = 0.0
        self.held = asyncio.Event()
        self.waiting = 0
        self.released = 0

    async def _reply(self, data: bytes) -> bool:
        self.waiting += 1
        self.held.set()
        try:
            await self.gate.wait()
            if self.delay_s > 0:
                await asyncio.sleep(self.delay_s)  # the slow database, not a wait
        finally:
            self.waiting -= 1
            self.held.clear()
        self.released += 1
        return True


class CommitWatch:
    """Wakes waiters after every journal commit (ingest commits on the event loop)."""

    def __init__(self, journal: Journal) -> None:
        self.changed = asyncio.Event()
        inner = journal.commit

        def commit(*args: Any, **kwargs: Any) -> Any:
            try:
                return inner(*args, **kwargs)
            finally:
                self.changed.set()

        setattr(journal, "commit", commit)  # noqa: B010 - instance attribute over the method

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
        await wait_for_condition(
            predicate, timeout_s, what="the journal state after a commit", wake=self.changed
        )


async def test_slow_database_stalls_only_the_writer(
    mosquitto: MosquittoBroker, influxd: InfluxD, tmp_path: Path
) -> None:
    """fault case I2: while the database holds the historian's write, ingest keeps committing
    and the API answers (both before the write returns); once it is slow-but-moving and then
    fast again, every point lands exactly once."""
    db = "slow"
    influxd.create_database(db)
    async with SlowReplies(influxd.port) as proxy:
        site_path = write_small_site(tmp_path, mqtt_port=mosquitto.port, history_backend=None)
        with site_path.open("a") as f:
            f.write(
                f'\n[history]\nbackend = "influxdb1"\nurl = "http://127.0.0.1:{proxy.port}"\n'
                f'db = "{db}"\nbatch_size = 20\nflush_interval_s = 0.05\ntimeout_s = 120\n'
            )
        site = load_site(site_path)
        rt = Runtime(site)
        history = rt.history
        assert history is not None
        commits = CommitWatch(rt.journal)
        transport = httpx.ASGITransport(app=create_app(site, runtime=rt))
        async with (
            running(rt),
            httpx.AsyncClient(
                transport=transport, base_url="http://api", headers=auth_headers()
            ) as client,
        ):
            t0 = rt.clock()
            # 1. The database holds the reply of the first write: the writer is stuck in it.
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 30, t0))
            await asyncio.wait_for(proxy.held.wait(), 15)
            assert history.stats.points_written == 0
            # Ingest keeps committing meanwhile ...
            base = rt.ingest.readings
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s1", 0, 30, 30, t0))
            await commits.until(lambda: rt.ingest.readings >= base + 30)
            # ... and the API answers, all before the stuck write returned.
            r = await asyncio.wait_for(client.get("/api/v1/health"), 10)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["ingest"]["readings"] == rt.ingest.readings
            assert body["ingest"]["backpressure"] is False
            assert body["history"]["points_written"] == 0
            assert proxy.waiting == 1
            assert proxy.released == 0
            assert history.stats.points_written == 0
            # 2. Slow but moving: each reply ~1 s late; ingest goes on.
            proxy.delay_s = 1.0
            proxy.gate.set()
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s2", 0, 20, 30, t0))
            await asyncio.wait_for(history.wait_for(lambda: history.stats.points_written > 0), 30)
            await commits.until(lambda: rt.ingest.readings >= base + 60)
            assert rt.journal.count("readings") > 0  # the backlog waits in the outbox
            # 3. Fast again: the backlog drains.
            proxy.delay_s = 0.0
            await asyncio.wait_for(
                history.wait_for(
                    lambda: rt.journal.count("readings") == 0 and rt.journal.count("events") == 0
                ),
                60,
            )
            assert proxy.released >= 2
            assert history.stats.dead_lettered == 0
    assert rt.ingest.readings == 90
    assert influxd.count(db, "weight", "weight_g") == 90
    assert influxd.count(db, "stock", "units") == 3


# -- torn outbox after kill -9 ------------------------------------------------------------------
WRITER = """
import sys, time
from controller.adapters.journal import Journal
from controller.ports import ReadingRow
j = Journal(sys.argv[1]); j.open()
seq = 0
while True:
    rows = [ReadingRow("s1", 0, 1, seq + k, time.time(), 1000.0 + k, "sh1") for k in range(200)]
    j.commit(rows)
    seq += 200
    print(seq, flush=True)
"""


def write_then_kill9_and_tear(path: Path, rows: int = 20_000) -> int:
    """A child commits readings and prints the total after each commit; SIGKILL it, then
    leave half a WAL frame of garbage after the last commit (a torn last record). Returns the
    last total the child reported as committed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    reported = 0
    deadline = time.monotonic() + 20
    while reported < rows and time.monotonic() < deadline:
        reported = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0
    with wal.open("ab") as f:
        f.write(os.urandom(2_048))
    return reported


@pytest.mark.slow
async def test_torn_outbox_tail_after_kill9_committed_rows_delivered(
    tmp_path: Path, influxd: InfluxD
) -> None:
    path = tmp_path / "journal.sqlite"
    reported = await asyncio.to_thread(write_then_kill9_and_tear, path)
    j = Journal(path)
    restored = j.open()
    try:
        rows = j.count("readings")
        assert rows >= reported  # every acknowledged commit survived
        assert restored.torn_tail_bytes >= 2_048, "the torn tail is detected (and logged)"
        assert restored.outbox_rows == rows
        influxd.create_database("torn")
        sink = InfluxV1Sink(influxd.url, "torn")
        svc = HistoryService(j, sink, topo("t"), HistorySettings(batch_size=5_000))
        await drain_all(svc, j)
        await sink.aclose()
        assert influxd.count("torn", "weight", "weight_g") == rows
    finally:
        j.close()


# -- embedded SQLite ----------------------------------------------------------------------------
async def test_sqlite_sink_idempotent_downsampled_retention(
    tmp_path: Path, journal: Journal
) -> None:
    clock_s = [time.time()]
    sink = SqliteHistorySink(
        tmp_path / "history.sqlite", retention_days=1, clock=lambda: clock_s[0]
    )
    now = clock_s[0]
    rows = reading_rows(4_000, ts0=now - 100.0, dt=0.02)
    journal.commit(rows, events=[stock_row(now - 200.0, "sh2", 9), stock_row(now - 50.0, "sh2", 8)])
    svc = HistoryService(journal, sink, topo("t"), HistorySettings(batch_size=1_500))
    await drain_all(svc, journal)
    assert await sink.count("weight") == 4_000
    assert await sink.count("stock") == 2
    # Idempotent: the same points again add nothing.
    pts = [svc.builder.reading(OutboxReading(i, *r)) for i, r in enumerate(rows[:10])]
    await sink.write(pts)
    assert await sink.count("weight") == 4_000
    q = HistoryQuery(None, "K2", int((now - 120) * 1000), int(now * 1000), 30_000)
    [sh2] = await svc.query(q)
    assert sh2.shelf == "sh2"
    assert sum(b.readings for b in sh2.buckets) == 1_000
    assert sh2.buckets[0].units == 9  # carried from before `from`
    assert sh2.buckets[-1].units == 8
    means = [b.weight_g_mean for b in sh2.buckets if b.readings]
    assert all(m is not None and 500 <= m <= 1_497 for m in means)
    clock_s[0] = now + 2 * 86_400
    assert await sink.prune() == 4_002
    assert await sink.count("weight") == 0
    await sink.aclose()


# -- the API ------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def api_client(site_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    site = load_site(site_path)
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    transport = httpx.ASGITransport(app=app)  # no lifespan: the runtime is not started
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers=auth_headers()
    ) as client:
        yield client, rt


async def test_history_api_sqlite(tmp_path: Path) -> None:
    site_path = write_small_site(tmp_path, mqtt_port=1, history_backend=None)
    with site_path.open("a") as f:
        f.write(f'\n[history]\nbackend = "sqlite"\nsqlite_path = "{tmp_path / "h.sqlite"}"\n')
    async with api_client(site_path) as (client, rt):
        assert rt.history is not None
        now = time.time()
        j = Journal(tmp_path / "feed.sqlite")
        j.open()
        j.commit([ReadingRow("s1", 0, 1, k, now - 60 + k, 1000.0, "sh1") for k in range(60)])
        feeder = HistoryService(j, rt.history.sink, rt.history.topo)
        await drain_all(feeder, j)
        j.close()
        r = await client.get(
            "/api/v1/history", params={"shelf": "sh1", "from": now - 120, "to": now, "every": 60}
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["backend"] == "sqlite"
        assert body["from"] == pytest.approx(now - 120, abs=0.01)
        [series] = body["series"]
        assert series["zone"] == "Z"
        assert sum(b["readings"] for b in series["buckets"]) == 60
        r = await client.get("/api/v1/history", params={"sku": "K1"})
        assert r.status_code == 200
        r = await client.get("/api/v1/health")
        assert r.status_code == 200
        assert r.json()["history"]["backend"] == "sqlite"
        for params, status in [
            ({"shelf": "nope"}, 404),
            ({"sku": "nope"}, 404),
            ({}, 422),
            ({"shelf": "sh1", "sku": "K1"}, 422),
            ({"shelf": "sh1", "from": 10, "to": 5}, 422),
            ({"shelf": "sh1", "from": 0, "to": 1e9, "every": 1}, 422),
        ]:
            r = await client.get("/api/v1/history", params=params)
            assert r.status_code == status, (params, r.text)
            assert r.headers["content-type"] == "application/problem+json"
        await rt.history.sink.aclose()


async def test_history_api_disabled_is_404(tmp_path: Path) -> None:
    site_path = write_small_site(tmp_path, mqtt_port=1)
    async with api_client(site_path) as (client, rt):
        assert rt.history is None
        r = await client.get("/api/v1/history", params={"shelf": "sh1"})
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"


# -- the Grafana panels run on a real influxd ---------------------------------------------------
def all_event_rows(now: float) -> list[EventRow]:
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("stock_changed", {"shelf_id": "sh1", "sku": "K1", "old_units": 9, "new_units": 8}),
        ("shelf_status_changed", {"shelf_id": "sh2", "old": "ok", "new": "stale",
                                  "reason": "no_reading"}),
        ("alert_raised", {"key": "K1", "episode_id": "e1", "severity": "low", "level": 8,
                          "threshold": 10, "suggested_order_qty": 32, "sku": "K1"}),
        ("alert_resolved", {"key": "K1", "episode_id": "e1", "severity": "low", "level": 20,
                            "raised_at_s": now - 30, "sku": "K1", "suggested_order_qty": 20}),
        ("seq_gap", {"device": "s3", "after_seq": 4, "seq": 9, "missing": 4}),
        ("seq_gap_filled", {"device": "s3", "epoch": 0, "first_seq": 6, "last_seq": 7,
                            "filled": 2}),
        ("something_new", {"x": 1}),
    ]  # fmt: skip
    return [
        EventRow(now - 20 + i, kind, {"kind": kind, "ts_s": now - 20 + i, **body})
        for i, (kind, body) in enumerate(bodies)
    ]


async def test_every_dashboard_query_runs_on_influxd(influxd: InfluxD, journal: Journal) -> None:
    db = "dashboards"
    influxd.create_database(db)
    now = time.time()
    journal.commit(reading_rows(400, ts0=now - 60, dt=0.1), events=all_event_rows(now))
    sink = InfluxV1Sink(influxd.url, db)
    svc = HistoryService(journal, sink, topo("t"), HistorySettings())
    await drain_all(svc, journal)
    await sink.aclose()
    boards = sorted((ROOT / "dashboards" / "grafana" / "dashboards").glob("*.json"))
    ran = 0
    for path in boards:
        board = json.loads(path.read_text())
        queries = [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
        queries += [t["query"] for p in board["panels"] for t in p["targets"]]
        for q in queries:
            sql = (
                q.replace("$timeFilter", "time > now() - 1h")
                .replace("$__interval", "1m")
                .replace("$zone", ".*")
            )
            results = await asyncio.to_thread(influxd.query, sql, db)
            assert results[0].get("series"), (path.name, q)  # ran, and found data
            ran += 1
    assert ran >= 15


# -- the whole controller: MQTT → journal → historian → influxd ---------------------------------
async def test_controller_runtime_writes_history_to_influxd(
    mosquitto: MosquittoBroker, influxd: InfluxD, tmp_path: Path
) -> None:
    """The runtime builds the sink from [history], runs the ``history`` task, and readings,
    stock changes and the alert reach influxd with their reading times."""
    influxd.create_database("e2e")
    site_path = write_small_site(tmp_path, mqtt_port=mosquitto.port, history_backend=None)
    with site_path.open("a") as f:
        f.write(
            f'\n[history]\nbackend = "influxdb1"\nurl = "{influxd.url}"\ndb = "e2e"\n'
            "flush_interval_s = 0.1\n"
        )
    rt = Runtime(load_site(site_path))
    assert rt.history is not None
    async with running(rt):
        t0 = rt.clock()
        await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 6, t0))
        await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 6, 5, 8, t0 + 1))
        history = rt.history
        await asyncio.wait_for(history.wait_for(lambda: history.stats.points_written >= 14), 15)
        await asyncio.wait_for(
            history.wait_for(lambda: rt.journal.count("readings") == 0 and rt.alerts.raised == 1),
            15,
        )
        await asyncio.wait_for(history.wait_for(lambda: rt.journal.count("events") == 0), 15)
        assert rt.snapshot()["history"]["state"] == "up"
    assert influxd.count("e2e", "weight", "weight_g") == 14
    times = sorted(influxd.times("e2e", "weight", "weight_g"))
    assert times[0] == int(t0 * 1000)
    assert influxd.count("e2e", "stock", "units") >= 2
    assert influxd.count("e2e", "alert", "level") == 1
