"""Latency of the list reads (``/api/v1/stock``, ``/api/v1/shelves`` pages) by site size.

For each size N a site is generated (tests/zoned_sites.write_site_in_zones over
tests/sites.write_small_site: N SKUs, N one-channel scales, N shelves, spread over ``--zones``
zones) and the real app (``create_app`` over a real, not started ``Runtime``) is called in
process through httpx's ASGI transport: routing, auth, the handler, the response model and JSON
encoding, without sockets or the broker. Every shelf is given a counted state first (a mix of
stock states), so each answer carries full views. The reads (docs/api.md, "Pages"):

* ``/api/v1/stock?zone=Z1&limit=500``: the issue-12 target (p99 < 20 ms at 100k);
* ``/api/v1/shelves?zone=Z1&limit=500``;
* ``/api/v1/stock?limit=500&cursor=…``: a page from the middle of the site;
* ``/api/v1/stock?zone=Z1&state=low&limit=500``: a state page (the state index is built by the
  warm-up request);
* ``/api/v1/stock?q=K12&limit=500``: a text page (its matches computed by the warm-up request).

The site's objects are frozen out of Python's cyclic collections before measuring, as
``floorhand run`` freezes its start-up heap. Measured per request (wall clock), after one
warm-up request: median, p90, p99 (nearest rank)
and maximum in ms, the median CPU time of this process per request (less sensitive to other load
than the wall clock), and the answer's size. Also the site's load and app build time.

The handler is synchronous work; nothing else should run on the machine (the load average at
the start and at the end is printed). Run it on two checkouts to compare code versions.

    python benchmarks/read_api.py [--sizes 10000,100000] [--zones 20] [--requests 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
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
from controller.services.list_index import encode_cursor  # noqa: E402
from tests.sites import auth_headers  # noqa: E402
from tests.zoned_sites import write_site_in_zones  # noqa: E402


def paths(size: int) -> list[str]:
    """The reads measured on a site of ``size`` SKUs (module docstring)."""
    middle = encode_cursor(f"K{size // 2}")
    return [
        "/api/v1/stock?zone=Z1&limit=500",
        "/api/v1/shelves?zone=Z1&limit=500",
        f"/api/v1/stock?limit=500&cursor={middle}",
        "/api/v1/stock?zone=Z1&state=low&limit=500",
        "/api/v1/stock?q=K12&limit=500",
    ]


def _rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def measure(size: int, zones: int, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fh-read-api-") as tmp:
        t0 = time.perf_counter()
        site_path = write_site_in_zones(Path(tmp), zones=zones, mqtt_port=1, scales=size)
        site = load_site(site_path)
        t_load = time.perf_counter() - t0
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
        t0 = time.perf_counter()
        app = create_app(site, runtime=rt)
        t_app = time.perf_counter() - t0
        # As `floorhand run` does once started (Runtime's freeze_heap): the site's objects are
        # left out of cyclic collections, whose full passes would otherwise land in the
        # figures (~250 ms at 100k).
        gc.collect()
        gc.freeze()
        out: dict[str, Any] = {
            "shelves": size,
            "zones": zones,
            "site_load_s": round(t_load, 2),
            "app_build_s": round(t_app, 2),
            "paths": paths(size),
        }
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            for path in out["paths"]:
                times_ms: list[float] = []
                cpu_ms: list[float] = []
                body_bytes = 0
                items = 0
                for n in range(requests + 1):
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = await client.get(path, headers=auth_headers("floor"))
                    dt_ms = (time.perf_counter() - t0) * 1000
                    dc_ms = (time.process_time() - c0) * 1000
                    if r.status_code != 200:
                        raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
                    body_bytes = len(r.content)
                    items = len(r.json()) if n == 0 else items
                    if n > 0:  # the first request warms caches and imports
                        times_ms.append(dt_ms)
                        cpu_ms.append(dc_ms)
                out[path] = {
                    "median_ms": round(statistics.median(times_ms), 2),
                    "p90_ms": round(_rank(times_ms, 0.9), 2),
                    "p99_ms": round(_rank(times_ms, 0.99), 2),
                    "max_ms": round(max(times_ms), 2),
                    "total": int(r.headers["x-total-count"]),
                    "items": items,
                    "cpu_median_ms": round(statistics.median(cpu_ms), 2),
                    "requests": len(times_ms),
                    "bytes": body_bytes,
                }
        gc.unfreeze()
        return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "sizes": [],
    }
    for size in args.sizes:
        result = await measure(size, args.zones, args.requests)
        report["sizes"].append(result)
        if not args.json:
            print(
                f"{size} shelves in {args.zones} zones: site loaded in {result['site_load_s']} s, "
                f"app built in {result['app_build_s']} s",
                flush=True,
            )
            for path in result["paths"]:
                m = result[path]
                print(
                    f"  {path.split('&cursor=')[0]:<44} median {m['median_ms']:>7.2f} ms  "
                    f"p90 {m['p90_ms']:>7.2f}  p99 {m['p99_ms']:>7.2f}  "
                    f"max {m['max_ms']:>7.2f} ms  "
                    f"CPU {m['cpu_median_ms']:>7.2f} ms  {m['items']} of {m['total']} items, "
                    f"{m['bytes'] / 1e3:.0f} kB ({m['requests']} requests)",
                    flush=True,
                )
    report["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10000, 100000],
        help="site sizes (shelves = SKUs = scales), comma separated",
    )
    ap.add_argument("--zones", type=int, default=20, help="zones the site is spread over")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per path")
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
