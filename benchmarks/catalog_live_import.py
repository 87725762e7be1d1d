"""Live catalogue import: ``PUT /api/v1/catalog`` of an N-SKU catalogue into a running
controller under a reading load (docs/catalogue.md, "A big import on a running controller").

For each size N a topology-only site (one zone, no historian) and its catalogue CSV are
generated (tests/sites.write_small_site with ``catalogue_csv``: N SKUs, N one-channel native
scales, N shelves, 3N rows), imported with ``floorhand catalog import --site`` while stopped,
and the real controller is started (``floorhand run``, tests/controller_proc.py) with a private
mosquitto. A paced reading load (benchmarks/loadgen.py as a child process, ``--rate`` readings/s
over the first ``--devices`` scales) runs throughout. After ``--settle-s`` of load, a changed
catalogue of N SKUs (every SKU's reorder point changed, plus 1% new SKUs, scales and shelves) is
sent with ``PUT /api/v1/catalog`` (CSV, engineer token). Measured:

* ``import_s``: the PUT's wall time (upload, validation, diff, journal, apply, answer);
* ``applied_before`` / ``applied_during``: readings/s the controller applied (its
  ``floorhand_ingest_readings_total``, scraped every 0.25 s) over the ``--settle-s`` before
  the PUT and while it was in flight;
* ``probe_p99_before_ms`` / ``probe_p99_during_ms`` (and ``probe_max_during_ms``): round trip of
  ``GET /api/v1/ready``, polled every 20 ms. That route is answered on the main (ingest) loop, so
  the round trip is the loop's lag plus ~1 ms of HTTP: the main-loop lag figure, seen from
  outside the process;
* ``rss_before_mb`` / ``rss_peak_mb``: the controller's resident memory before the PUT and the
  highest seen (sampled every 0.25 s) until it answered.

Processes are stopped by PID. Figures go to docs/performance.md by whoever runs it alone on the
machine (full size):

    python benchmarks/catalog_live_import.py --sizes 100000

A quick check that it works: ``--sizes 2000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

from tests.catalog_files import catalogue_site, changed_catalogue  # noqa: E402
from tests.controller_proc import ControllerProcess  # noqa: E402
from tests.mosquitto import MosquittoBroker  # noqa: E402
from tests.sites import auth_headers  # noqa: E402

READINGS_RE = re.compile(r"^floorhand_ingest_readings_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)
SCRAPE_EVERY_S = 0.25
PROBE_EVERY_S = 0.02


def cli(*args: str | Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "controller", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {proc.stderr[-2000:]}")


class Sampler:
    """Scrapes the applied-readings counter and RSS, and probes the main loop, until stopped;
    each sample is (monotonic time, value)."""

    def __init__(self, base: str, pid: int) -> None:
        self.base = base
        self.proc = psutil.Process(pid)
        self.readings: list[tuple[float, float]] = []
        self.probes: list[tuple[float, float]] = []
        self.rss: list[tuple[float, float]] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Sampler:
        self._tasks = [
            asyncio.create_task(self._scrape(), name="bench-scrape"),
            asyncio.create_task(self._probe(), name="bench-probe"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _scrape(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base, headers=auth_headers("engineer"), timeout=60.0
        ) as c:
            while True:
                r = await c.get("/metrics")
                now = time.monotonic()
                m = READINGS_RE.search(r.text)
                if m:
                    self.readings.append((now, float(m.group(1))))
                self.rss.append((now, self.proc.memory_info().rss / 1e6))
                await asyncio.sleep(SCRAPE_EVERY_S)

    async def _probe(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=120.0) as c:
            while True:
                t0 = time.monotonic()
                await c.get("/api/v1/ready")
                self.probes.append((t0, time.monotonic() - t0))
                await asyncio.sleep(PROBE_EVERY_S)


def _rate(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    inside = [(t, v) for t, v in samples if t0 <= t <= t1]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return float("nan")
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _p99_ms(samples: list[tuple[float, float]], t0: float, t1: float) -> tuple[float, float]:
    values = sorted(v for t, v in samples if t0 <= t <= t1)
    if not values:
        return float("nan"), float("nan")
    return values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3, values[-1] * 1e3


async def start_load(
    port: int, rate: float, devices: int, duration_s: float
) -> asyncio.subprocess.Process:
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "benchmarks" / "loadgen.py"),
        "--port", str(port), "--rate", str(rate), "--duration", str(duration_s),
        "--devices", str(devices), "--client-id", f"bench-live-import-{time.monotonic_ns()}",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert load.stdout is not None
    assert load.stdin is not None
    line = await asyncio.wait_for(load.stdout.readline(), 300)
    if not line.startswith(b"READY"):
        raise RuntimeError(f"loadgen: {line!r}")
    load.stdin.write(b"GO\n")
    await load.stdin.drain()
    return load


async def stop_load(load: asyncio.subprocess.Process) -> None:
    if load.returncode is None and load.stdin is not None:
        with contextlib.suppress(ConnectionError):
            load.stdin.write(b"STOP\n")
            await load.stdin.drain()
            load.stdin.close()
    try:
        await asyncio.wait_for(load.wait(), 90)
    except TimeoutError:
        load.kill()  # our own child, by its handle
        await load.wait()


async def measure_size(base: Path, size: int, broker: MosquittoBroker, args: Any) -> dict[str, Any]:
    folder = base / f"site-{size}"
    folder.mkdir(parents=True)
    site = catalogue_site(folder, broker.port, size, f"bench-live-import-{time.monotonic_ns()}")
    csv = folder / "catalogue.csv"
    await asyncio.to_thread(cli, "catalog", "import", csv, "--site", site)
    body = changed_catalogue(csv, size)
    ctl = ControllerProcess(site, folder)
    try:
        await ctl.start(ready_timeout_s=300.0)
        assert ctl.proc is not None
        load = await start_load(broker.port, args.rate, min(size, args.devices), args.load_s)
        try:
            async with Sampler(ctl.base, ctl.proc.pid) as s:
                t_settle = time.monotonic()
                await asyncio.sleep(args.settle_s)  # the load's steady state, before the PUT
                t_put = time.monotonic()
                async with httpx.AsyncClient(
                    base_url=ctl.base, headers=auth_headers("engineer"), timeout=600.0
                ) as c:
                    r = await c.put(
                        "/api/v1/catalog", content=body, headers={"Content-Type": "text/csv"}
                    )
                t_done = time.monotonic()
                await asyncio.sleep(2 * SCRAPE_EVERY_S)  # one scrape after the answer
        finally:
            await stop_load(load)
        if r.status_code != 200:
            raise RuntimeError(f"PUT /api/v1/catalog answered {r.status_code}: {r.text[:2000]}")
        counts = r.json()["counts"]
    finally:
        await ctl.stop(timeout_s=60.0)
    p99_before, _ = _p99_ms(s.probes, t_settle, t_put)
    p99_during, max_during = _p99_ms(s.probes, t_put, t_done)
    rss_before = [v for t, v in s.rss if t <= t_put]
    rss_during = [v for t, v in s.rss if t_put <= t <= t_done + SCRAPE_EVERY_S]
    result = {
        "size": size,
        "rows": 3 * size,
        "body_mb": len(body) / 1e6,
        "counts": counts,
        "import_s": t_done - t_put,
        "applied_before": _rate(s.readings, t_settle, t_put),
        "applied_during": _rate(s.readings, t_put, t_done + SCRAPE_EVERY_S),
        "probe_p99_before_ms": p99_before,
        "probe_p99_during_ms": p99_during,
        "probe_max_during_ms": max_during,
        "probe_median_during_ms": statistics.median(
            [v * 1e3 for t, v in s.probes if t_put <= t <= t_done] or [float("nan")]
        ),
        "rss_before_mb": rss_before[-1] if rss_before else float("nan"),
        "rss_peak_mb": max(rss_during) if rss_during else float("nan"),
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


async def measure(args: Any, say: Any = print) -> list[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="catalog-live-bench-"))
    broker = MosquittoBroker(base / "mosquitto")
    await broker.start()
    results: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            r = await measure_size(base, size, broker, args)
            c = r["counts"]
            say(
                f"  {size:>7,} SKUs ({r['body_mb']:.1f} MB CSV; +{c['add']} ~{c['change']} "
                f"-{c['remove']}): import {r['import_s']:.2f} s; applied {r['applied_before']:.0f} "
                f"-> {r['applied_during']:.0f} readings/s; main-loop probe p99 "
                f"{r['probe_p99_before_ms']:.1f} -> {r['probe_p99_during_ms']:.1f} ms (max "
                f"{r['probe_max_during_ms']:.0f} ms); RSS {r['rss_before_mb']:.0f} -> peak "
                f"{r['rss_peak_mb']:.0f} MB"
            )
            results.append(r)
    finally:
        await broker.close()
        shutil.rmtree(base, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000]
    )
    parser.add_argument("--rate", type=float, default=2_000.0, help="readings/s of the load")
    parser.add_argument("--devices", type=int, default=1_000, help="scales the load reports for")
    parser.add_argument("--settle-s", type=float, default=3.0, help="load before the PUT")
    parser.add_argument("--load-s", type=float, default=240.0, help="bound on the load's length")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    print(
        "\n| SKUs | CSV | import (PUT) | readings/s applied before → during | main-loop probe "
        "p99 before → during (max) | RSS before → peak |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size']:,} | {r['body_mb']:.1f} MB | {r['import_s']:.2f} s | "
            f"{r['applied_before']:.0f} → {r['applied_during']:.0f} | "
            f"{r['probe_p99_before_ms']:.1f} → {r['probe_p99_during_ms']:.1f} ms "
            f"({r['probe_max_during_ms']:.0f} ms) | {r['rss_before_mb']:.0f} → "
            f"{r['rss_peak_mb']:.0f} MB |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
