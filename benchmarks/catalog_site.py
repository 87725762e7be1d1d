"""Catalogue site: ``floorhand catalog import`` and start-to-ready of a site whose catalogue is
in the journal (docs/catalogue.md), for 1k, 10k and 100k SKUs + scales + shelves.

For each size a topology-only site file (one zone, no historian) and its catalogue CSV are
generated (tests/sites.write_small_site with ``catalogue_csv``: N SKUs, N one-channel native
scales, N shelves, 3N rows). Measured, each as a child process of the real CLI:

* ``import_s`` / ``import_rss_mb``: ``python -m controller catalog import CSV --site SITE`` into
  a new journal (wall time, the child's peak RSS from ``wait4``);
* ``reimport_s``: the same file again (read, validate, compare: no new version);
* ``ready_s``: ``python -m controller run SITE`` start → ``GET /api/v1/ready`` answers 200
  (catalogue read from the journal, MQTT session up with a private mosquitto), polled every
  50 ms (tests/controller_proc.py), so ±50 ms; ``catalogue_ms`` its "catalogue version N from
  the journal ... in N ms" log line, ``runtime_start_ms`` its "runtime started in N ms";
* ``rss_mb``: the controller's resident memory once ready.

Processes are stopped by PID (SIGTERM). Figures go to docs/performance.md by whoever runs it
alone on the machine.

    python benchmarks/catalog_site.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

from tests.controller_proc import ControllerProcess  # noqa: E402
from tests.mosquitto import MosquittoBroker  # noqa: E402
from tests.sites import write_small_site  # noqa: E402

STARTED_RE = re.compile(r"runtime started in (\d+) ms")
CATALOGUE_RE = re.compile(r"catalogue version \d+ from the journal: .* in (\d+) ms")


def cli(*args: str | Path) -> tuple[float, float, str]:
    """Run ``python -m controller ARGS``: wall seconds, peak RSS (MB), stderr tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {err[-2000:]}")
    return wall_s, usage.ru_maxrss / 1e3, err.strip().splitlines()[-1] if err.strip() else ""


async def measure_size(base: Path, size: int, broker: MosquittoBroker) -> dict[str, Any]:
    folder = base / f"site-{size}"
    folder.mkdir(parents=True)
    site = write_small_site(
        folder,
        mqtt_port=broker.port,
        scales=size,
        client_id=f"bench-catalog-{size}-{time.monotonic_ns()}",
        dwell_s=5.0,
        reporting_interval_s=5.0,
        keepalive_s=30.0,
        catalogue_csv=True,
    )
    csv = folder / "catalogue.csv"
    import_s, import_rss_mb, _ = await asyncio.to_thread(
        cli, "catalog", "import", csv, "--site", site
    )
    reimport_s, _, _ = await asyncio.to_thread(cli, "catalog", "import", csv, "--site", site)
    ctl = ControllerProcess(site, folder)
    try:
        ready_s = await ctl.start(ready_timeout_s=180.0)
        assert ctl.proc is not None
        rss_mb = psutil.Process(ctl.proc.pid).memory_info().rss / 1e6
    finally:
        await ctl.stop()
    log = ctl.log_path.read_text(errors="replace")
    started = STARTED_RE.findall(log)
    catalogue = CATALOGUE_RE.findall(log)
    result = {
        "size": size,
        "rows": 3 * size,
        "csv_mb": csv.stat().st_size / 1e6,
        "import_s": import_s,
        "import_rss_mb": import_rss_mb,
        "reimport_s": reimport_s,
        "ready_s": ready_s,
        "catalogue_ms": float(catalogue[-1]) if catalogue else None,
        "runtime_start_ms": float(started[-1]) if started else None,
        "rss_mb": rss_mb,
        "journal_mb": (folder / "journal.sqlite").stat().st_size / 1e6,
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


async def measure(sizes: list[int], say: Any = print) -> list[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="catalog-bench-"))
    broker = MosquittoBroker(base / "mosquitto")
    await broker.start()
    results: list[dict[str, Any]] = []
    try:
        for size in sizes:
            r = await measure_size(base, size, broker)
            say(
                f"  {size:>7,} SKUs/scales/shelves ({r['rows']:,} rows, {r['csv_mb']:.1f} MB CSV): "
                f"import {r['import_s']:.2f} s (RSS {r['import_rss_mb']:.0f} MB), again "
                f"{r['reimport_s']:.2f} s; ready after {r['ready_s']:.2f} s (catalogue "
                f"{r['catalogue_ms'] or 0:.0f} ms, runtime {r['runtime_start_ms'] or 0:.0f} ms), "
                f"RSS {r['rss_mb']:.0f} MB; journal {r['journal_mb']:.1f} MB"
            )
            results.append(r)
    finally:
        await broker.close()
        shutil.rmtree(base, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000, 100000]
    )
    args = parser.parse_args()
    results = asyncio.run(measure(args.sizes))
    print(
        "\n| SKUs = scales = shelves | import | import RSS | import again | ready | "
        "catalogue load | RSS ready | journal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size']:,} | {r['import_s']:.2f} s | {r['import_rss_mb']:.0f} MB | "
            f"{r['reimport_s']:.2f} s | {r['ready_s']:.2f} s | {r['catalogue_ms'] or 0:.0f} ms | "
            f"{r['rss_mb']:.0f} MB | {r['journal_mb']:.1f} MB |"
        )


if __name__ == "__main__":
    main()
