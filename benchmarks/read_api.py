"""Latency of the stock reads ``GET /api/v1/shelves`` and ``GET /api/v1/stock`` by site size.

For each size N a site is generated (tests/sites.write_small_site: N SKUs, N one-channel scales,
N shelves, one zone) and the real app (``create_app`` over a real, not started ``Runtime``) is
called in process through httpx's ASGI transport: routing, auth, the handler, the response
model and JSON encoding, without sockets or the broker. Every shelf is given a counted state
first, so each answer carries N full shelf views. Measured per request (wall clock), after one
warm-up request: median, p90 (nearest rank) and minimum in ms, the median CPU time of this
process per request (less sensitive to other load than the wall clock), and the answer's size.

The handler is synchronous work; nothing else should run on the machine (the load average at
the start and at the end is printed). Run it on two checkouts to compare code versions.

    python benchmarks/read_api.py [--sizes 1000,10000] [--requests 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from controller.api.app import create_app  # noqa: E402
from controller.config import load_site  # noqa: E402
from controller.domain.model import ShelfStatus  # noqa: E402
from controller.domain.stock import ShelfState  # noqa: E402
from controller.runtime import Runtime  # noqa: E402
from tests.sites import auth_headers, write_small_site  # noqa: E402

PATHS = ("/api/v1/shelves", "/api/v1/stock")


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


async def measure(size: int, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fh-read-api-") as tmp:
        site = load_site(write_small_site(Path(tmp), mqtt_port=1, scales=size))
        rt = Runtime(site)
        for i, (sid, spec) in enumerate(rt.specs.items()):
            units = 5 + i % 30
            rt.ingest.states[sid] = ShelfState(
                spec,
                status=ShelfStatus.OK,
                units=units,
                weight_g=spec.tare_g + units * spec.unit_weight_g,
                last_ts_s=1_700_000_000.0 + i,
            )
        app = create_app(site, runtime=rt)
        out: dict[str, Any] = {"shelves": size}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            for path in PATHS:
                times_ms: list[float] = []
                cpu_ms: list[float] = []
                body_bytes = 0
                for n in range(requests + 1):
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = await client.get(path, headers=auth_headers("floor"))
                    dt_ms = (time.perf_counter() - t0) * 1000
                    dc_ms = (time.process_time() - c0) * 1000
                    if r.status_code != 200:
                        raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
                    body_bytes = len(r.content)
                    if n > 0:  # the first request warms caches and imports
                        times_ms.append(dt_ms)
                        cpu_ms.append(dc_ms)
                out[path] = {
                    "median_ms": round(statistics.median(times_ms), 2),
                    "p90_ms": round(_p90(times_ms), 2),
                    "min_ms": round(min(times_ms), 2),
                    "cpu_median_ms": round(statistics.median(cpu_ms), 2),
                    "requests": len(times_ms),
                    "bytes": body_bytes,
                }
        return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "sizes": [],
    }
    for size in args.sizes:
        requests = args.requests if size <= 1000 else max(3, args.requests // 4)
        result = await measure(size, requests)
        report["sizes"].append(result)
        if not args.json:
            for path in PATHS:
                m = result[path]
                print(
                    f"{size:>6} shelves  {path:<16} median {m['median_ms']:>9.2f} ms  "
                    f"p90 {m['p90_ms']:>9.2f} ms  min {m['min_ms']:>9.2f} ms  "
                    f"CPU {m['cpu_median_ms']:>9.2f} ms  "
                    f"({m['requests']} requests, {m['bytes'] / 1e6:.2f} MB)",
                    flush=True,
                )
    report["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 10000],
        help="site sizes (shelves = SKUs = scales), comma separated",
    )
    ap.add_argument(
        "--requests",
        type=int,
        default=20,
        help="timed requests per path at ≤1k shelves (a quarter, at least 3, above)",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON only")
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"load average (1 min): {report['load_avg_1m_at_start']} at start, "
            f"{report['load_avg_1m_at_end']} at end"
        )


if __name__ == "__main__":
    main()
