"""Historian throughput: points/s drained from the outbox to each backend, and the catch-up
rate after a database outage while ingest keeps committing.

Backends: ``sqlite`` (embedded file), ``influxdb1`` (Debian influxd 1.6.7, /write, httpx) and
``influxdb2`` (influxdb-client's v2 write API against victoria-metrics). Each server is a
private instance on a free 127.0.0.1 port in a temporary folder (tests/influx_servers.py).

* drain: N readings pre-committed to a fresh journal, then ``HistoryService.drain_once`` until
  the outbox is empty: points/s and CPU µs/point of this process.
* catch-up: a paced committer (the ingest stand-in, on the same event loop) adds ``--rate``
  readings/s; the database is stopped for ``--outage-s``, restarted, and the time until the
  outbox is back under one batch gives the catch-up rate (backlog + what arrived meanwhile,
  divided by the time) as a multiple of the ingest rate (target ≥ 3×). The committer's worst
  lateness shows whether the drain ever held the event loop.

    python benchmarks/history_drain.py [--backends sqlite,influxdb1,influxdb2] [-n 200000]
        [--rate 5000] [--outage-s 300] [--stages drain,catchup]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.adapters.influx import InfluxV1Sink, InfluxV2Sink
from controller.adapters.journal import Journal
from controller.adapters.sqlite_history import SqliteHistorySink
from controller.ports import (
    HistoryPoint,
    HistoryQuery,
    HistorySink,
    ReadingRow,
    ShelfHistoryRaw,
    SinkUnavailable,
)
from controller.services.history import HistoryService, HistorySettings, Topology
from tests.influx_servers import InfluxD, VictoriaMetrics

SHELVES = 200
TOPO = Topology(
    "bench",
    {f"sh{i}": (f"Z{i % 4}", f"K{i}") for i in range(SHELVES)},
    {f"s{i}": f"Z{i % 4}" for i in range(SHELVES)},
)


def rows(n: int, seq0: int, ts0: float, dt: float) -> list[ReadingRow]:
    return [
        ReadingRow(
            f"s{(seq0 + k) % SHELVES}", 0, 1, seq0 + k, ts0 + k * dt, 1000.0 + k % 977,
            f"sh{(seq0 + k) % SHELVES}",
        )
        for k in range(n)
    ]  # fmt: skip


class Switchable:
    """Wraps the embedded sink so it can be "down" (it has no server to stop)."""

    def __init__(self, inner: HistorySink) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.down = False

    async def write(self, points: Sequence[HistoryPoint]) -> None:
        if self.down:
            raise SinkUnavailable("outage (simulated)")
        await self.inner.write(points)

    async def query(self, query: HistoryQuery) -> list[ShelfHistoryRaw]:
        return await self.inner.query(query)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Backend:
    name: str
    server: InfluxD | VictoriaMetrics | None
    folder: Path

    switch: Switchable | None = None

    def sink(self) -> HistorySink:
        if self.name == "sqlite":
            self.switch = Switchable(
                SqliteHistorySink(self.folder / f"history-{time.monotonic_ns()}.sqlite")
            )
            return self.switch
        assert self.server is not None
        if self.name == "influxdb1":
            return InfluxV1Sink(self.server.url, "bench", timeout_s=10.0)
        return InfluxV2Sink(self.server.url, "org", "bench", "token", timeout_s=10.0)

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        elif self.switch is not None:
            self.switch.down = True

    async def start(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.start)
        elif self.switch is not None:
            self.switch.down = False


@contextlib.asynccontextmanager
async def backend(name: str, folder: Path) -> AsyncIterator[Backend]:
    server: InfluxD | VictoriaMetrics | None = None
    if name == "influxdb1":
        server = InfluxD(folder / "influxd")
    elif name == "influxdb2":
        server = VictoriaMetrics(folder / "victoria")
    if server is not None:
        await asyncio.to_thread(server.start)
        if isinstance(server, InfluxD):
            server.create_database("bench")
    try:
        yield Backend(name, server, folder)
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


async def drain(b: Backend, n: int, batch: int) -> dict[str, Any]:
    j = Journal(b.folder / f"drain-{b.name}.sqlite")
    j.open()
    now = time.time()
    for k in range(0, n, 5_000):
        j.commit(rows(min(5_000, n - k), k, now - 600 + k * 0.001, 0.001))
    sink = b.sink()
    svc = HistoryService(j, sink, TOPO, HistorySettings(batch_size=batch))
    t0, c0 = time.perf_counter(), time.process_time()
    while j.outbox_rows:
        await svc.drain_once()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await sink.aclose()
    j.close()
    return {
        "backend": b.name,
        "points": n,
        "seconds": round(wall, 3),
        "points_per_s": round(n / wall),
        "cpu_us_per_point": round(cpu / n * 1e6, 2),
    }


def time_calls(obj: Any, names: list[str], worst: dict[str, float]) -> None:
    """Record the slowest call of each method (these run on the event loop)."""
    for name in names:
        fn = getattr(obj, name)

        def timed(*a: Any, _fn: Any = fn, _name: str = name, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                worst[_name] = max(worst.get(_name, 0.0), time.perf_counter() - t0)

        setattr(obj, name, timed)


async def catchup(b: Backend, rate: int, outage_s: float, batch: int) -> dict[str, Any]:
    j = Journal(b.folder / f"catchup-{b.name}.sqlite")
    j.open()
    worst_calls: dict[str, float] = {}
    time_calls(j, ["commit", "read_readings", "read_events", "delete_confirmed"], worst_calls)
    sink = b.sink()
    settings = HistorySettings(batch_size=batch, backoff_initial_s=0.05, backoff_max_s=1.0)
    svc = HistoryService(j, sink, TOPO, settings)
    task = asyncio.create_task(svc.run(), name="history")
    period_s = 0.02
    per_tick = max(1, round(rate * period_s))
    committed = 0
    worst_lag_s = 0.0
    stop = asyncio.Event()

    async def ingest() -> None:
        nonlocal committed, worst_lag_s
        t_next = time.monotonic()
        while not stop.is_set():
            worst_lag_s = max(worst_lag_s, time.monotonic() - t_next)
            j.commit(rows(per_tick, committed, time.time(), period_s / per_tick))
            committed += per_tick
            t_next += period_s
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    producer = asyncio.create_task(ingest())
    await asyncio.sleep(2.0)  # steady state before the outage
    lag_before = worst_lag_s
    await b.stop()
    await asyncio.sleep(outage_s)  # the outage: ingest keeps going
    backlog = j.outbox_rows
    worst_lag_s = 0.0
    worst_calls.clear()
    t0 = time.monotonic()
    committed_at_restart = committed
    await b.start()
    await svc.wait_for(lambda: j.outbox_rows < batch)
    t = time.monotonic() - t0
    arrived = committed - committed_at_restart
    stop.set()
    await producer
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with contextlib.suppress(Exception):
        await sink.aclose()
    j.close()
    drained = backlog + arrived - j.outbox_rows
    return {
        "backend": b.name,
        "ingest_per_s": rate,
        "outage_s": outage_s,
        "backlog_rows": backlog,
        "catchup_s": round(t, 2),
        "drain_per_s": round(drained / t),
        "drain_x_ingest": round(drained / t / rate, 2),
        "ingest_worst_lag_ms_steady": round(lag_before * 1000, 1),
        "ingest_worst_lag_ms_catchup": round(worst_lag_s * 1000, 1),
        "journal_worst_ms_catchup": {k: round(v * 1000, 1) for k, v in worst_calls.items()},
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="sqlite,influxdb1,influxdb2")
    ap.add_argument("-n", type=int, default=200_000, help="readings for the drain stage")
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--rate", type=int, default=5_000, help="ingest readings/s (catch-up)")
    ap.add_argument("--outage-s", type=float, default=300.0)
    ap.add_argument("--stages", default="drain,catchup")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    results: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="history-bench-"))
    try:
        for name in args.backends.split(","):
            async with backend(name, folder) as b:
                if "drain" in stages:
                    r = await drain(b, args.n, args.batch)
                    print(r, flush=True)
                    results.append(r)
                if "catchup" in stages:
                    r = await catchup(b, args.rate, args.outage_s, args.batch)
                    print(r, flush=True)
                    results.append(r)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\n| backend | stage | result |\n|---|---|---|")
    for r in results:
        if "points_per_s" in r:
            print(
                f"| {r['backend']} | drain {r['points']} | {r['points_per_s']} points/s, "
                f"{r['cpu_us_per_point']} µs CPU/point |"
            )
        else:
            print(
                f"| {r['backend']} | catch-up after {r['outage_s']} s at {r['ingest_per_s']}/s |"
                f" backlog {r['backlog_rows']} in {r['catchup_s']} s: {r['drain_per_s']}/s = "
                f"{r['drain_x_ingest']}× ingest; ingest lag max {r['ingest_worst_lag_ms_catchup']}"
                f" ms; slowest journal calls (ms) {r['journal_worst_ms_catchup']} |"
            )


if __name__ == "__main__":
    asyncio.run(main())
