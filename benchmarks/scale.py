"""Scale: start-up time and memory of the controller for 1k, 10k and 100k SKUs/shelves.

For each size a site file is generated (tests/sites.write_small_site: N SKUs, N shelves, N
one-channel native scales, one zone, no historian) and the controller is started as a child
process (``python -m controller run SITE``, the real CLI with its API on a free 127.0.0.1 port)
against a private mosquitto. Measured:

* ``ready_s``: process start → ``GET /api/v1/ready`` answers 200 (journal open, state restored,
  MQTT session up), polled every 50 ms (tests/controller_proc.py), so ±50 ms;
* ``runtime_start_ms``: the runtime's own "runtime started in N ms" log line (journal open,
  restore, alert republish);
* ``rss_mb`` / ``uss_mb``: the child's resident / unique memory once ready;
* ``cpu_s``: the child's CPU (user + system) up to ready;
* ``config_s``: ``python -m controller check-config SITE`` alone (interpreter start, imports,
  TOML parse and validation), for the share of the site file in the start-up.

The journal is new at each start (no restored state). Each size is started ``--runs`` times
(median) unless a start takes over 10 s; a start that is not ready within ``--timeout`` is
stopped and reported as not ready, with the memory it held by then (a lower bound). Processes
are stopped by PID (SIGTERM).

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import statistics
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
EXCEPTION_RE = re.compile(r"^([a-z_][\w]*\.)*[A-Z]\w*(Error|Exception|Unavailable)\w*: ")
"""The ``module.ExceptionName: message`` line of a traceback in the controller's log."""
CHEAP_START_S = 10.0
"""Sizes whose first start takes longer than this are started once, not ``runs`` times."""


def write_site(folder: Path, size: int, mqtt_port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_small_site(
        folder,
        mqtt_port=mqtt_port,
        scales=size,
        client_id=f"bench-scale-{size}-{time.monotonic_ns()}",
        dwell_s=5.0,
        reporting_interval_s=5.0,
        keepalive_s=30.0,
    )


async def check_config_s(site: Path) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "check-config",
        str(site),
        cwd=str(ROOT),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    rc = await proc.wait()
    if rc != 0:
        raise RuntimeError(f"check-config failed ({rc}) for {site}")
    return time.perf_counter() - t0


async def start_once(site: Path, folder: Path, timeout_s: float) -> dict[str, Any]:
    """One start with a fresh journal. Not ready within ``timeout_s``: stopped, reported with
    what it held by then. Exited before ready: reported with its last log line (``error``)."""
    journal = folder / "journal.sqlite"
    for path in await asyncio.to_thread(lambda: list(folder.glob("journal.sqlite*"))):
        path.unlink()  # a fresh journal at each start
    ctl = ControllerProcess(site, folder)
    peak = [0.0]

    async def sample_rss() -> None:
        while True:
            await asyncio.sleep(0.2)  # sampling period of the peak RSS
            if ctl.proc is not None:
                with contextlib.suppress(psutil.Error):
                    peak[0] = max(peak[0], psutil.Process(ctl.proc.pid).memory_info().rss / 1e6)

    sampler = asyncio.create_task(sample_rss(), name="scale-rss")
    t0 = time.monotonic()
    error = None
    try:
        try:
            ready_s = await ctl.start(ready_timeout_s=timeout_s)
            ready = True
        except TimeoutError:
            # Not ready in time: still report what it holds by then (a lower bound).
            ready_s = time.monotonic() - t0
            ready = False
        except RuntimeError as exc:  # the controller exited before it was ready
            ready_s = time.monotonic() - t0
            ready = False
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raised = [ln for ln in lines if EXCEPTION_RE.match(ln)]
            error = (raised or lines or [str(exc)])[-1]
        rss = uss = cpu_s = None
        if error is None:
            assert ctl.proc is not None
            p = psutil.Process(ctl.proc.pid)
            mem = p.memory_full_info()
            cpu = p.cpu_times()
            rss, uss, cpu_s = mem.rss / 1e6, mem.uss / 1e6, cpu.user + cpu.system
        match = STARTED_RE.findall(ctl.log_path.read_text(errors="replace"))
        return {
            "ready": ready,
            "ready_s": ready_s,
            "error": error,
            "runtime_start_ms": float(match[-1]) if match else None,
            "rss_mb": rss if rss is not None else peak[0],
            "peak_rss_mb": max(peak[0], rss or 0.0),
            "uss_mb": uss,
            "cpu_s": cpu_s,
            "journal": str(journal),
        }
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await ctl.stop()


async def measure(
    sizes: list[int], *, runs: int = 1, timeout_s: float = 180.0, say: Any = print
) -> list[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    broker = MosquittoBroker(base / "mosquitto")
    await broker.start()
    results: list[dict[str, Any]] = []
    try:
        for size in sizes:
            folder = base / f"site-{size}"
            site = write_site(folder, size, broker.port)
            config_s = await check_config_s(site)
            starts = []
            for run in range(runs):
                r = await start_once(site, folder, timeout_s)
                starts.append(r)
                if r["error"]:
                    state = f"EXITED after {r['ready_s']:.1f} s before ready: {r['error']}"
                elif r["ready"]:
                    state = f"ready after {r['ready_s']:.2f} s"
                else:
                    state = f"NOT ready after {r['ready_s']:.0f} s (stopped)"
                say(
                    f"  {size:>7,} SKUs/shelves/scales, start {run + 1}/{runs}: {state} (runtime "
                    f"{r['runtime_start_ms'] or 0:.0f} ms), RSS {r['rss_mb']:.0f} MB (peak "
                    f"{r['peak_rss_mb']:.0f} MB), CPU {r['cpu_s'] or 0:.2f} s; check-config "
                    f"alone {config_s:.2f} s"
                )
                if not r["ready"] or r["ready_s"] > CHEAP_START_S:
                    break  # a median of several is only worth it while starts are cheap
            results.append(
                {
                    "size": size,
                    "ready": all(r["ready"] for r in starts),
                    "site_file_mb": site.stat().st_size / 1e6,
                    "config_s": config_s,
                    "runs": len(starts),
                    "ready_s": statistics.median(r["ready_s"] for r in starts),
                    "ready_s_all": [r["ready_s"] for r in starts],
                    "runtime_start_ms": statistics.median(
                        r["runtime_start_ms"] or 0.0 for r in starts
                    ),
                    "rss_mb": statistics.median(r["rss_mb"] for r in starts),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in starts),
                    "uss_mb": statistics.median(r["uss_mb"] or 0.0 for r in starts),
                    "cpu_s": statistics.median(r["cpu_s"] or 0.0 for r in starts),
                    "error": next((r["error"] for r in starts if r["error"]), None),
                }
            )
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        await broker.close()
        shutil.rmtree(base, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000, 100000]
    )
    parser.add_argument("--runs", type=int, default=1, help="starts per size (median)")
    parser.add_argument("--timeout", type=float, default=180.0, help="s to ready, per start")
    args = parser.parse_args()
    results = asyncio.run(measure(args.sizes, runs=args.runs, timeout_s=args.timeout))
    print("\n| SKUs/shelves/scales | ready | runtime start | RSS | USS | CPU to ready | config |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size']:,} | {r['ready_s']:.2f} s{'' if r['ready'] else ' (NOT ready)'}"
            f"{' ' + r['error'] if r['error'] else ''} | "
            f"{r['runtime_start_ms']:.0f} ms | "
            f"{r['rss_mb']:.0f} MB | {r['uss_mb']:.0f} MB | {r['cpu_s']:.2f} s | "
            f"{r['config_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
