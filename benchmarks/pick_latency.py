"""Picks: pick API → first Modbus write, pick API → sorted, and picks/s with one sorter,
idle and while the controller ingests 20k msg/s.

Processes (all on 127.0.0.1):

* this process: the controller — `Runtime` + the FastAPI app under uvicorn, as ``floorhand
  run`` builds them — with a probe on the sorter driver (``on_write``: the moment the mailbox
  FC16 is handed to the Modbus link) and a bus listener for the task results;
* a child: the site's conveyor and sorter PLCs (``python -m simulators plcs``, no fault proxy,
  physical time 10^6 × faster so a tote reaches its lane at the next 1 ms model tick);
* a child: the HTTP client (this file with ``--client``), one keep-alive connection per
  worker, stamping ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process)
  before each request;
* with load: ``benchmarks/loadgen.py`` publishing 20k msg/s QoS 1 to mosquitto.

Latency "API → first write" is first-write − send stamp of the order's first task; "API →
sorted" is the DIVERTED result seen by the controller − send stamp (the PLC's model tick and
the driver's status polling included). The scale confirmation is not part of it (a picker's
walk is minutes, not milliseconds). "submit → first write" also comes split: the wait in the
sorter's one mailbox for the PLC to accept the command before (``mailbox_wait``: from
``SorterDriver.send`` to its write's turn, a write and read-backs of the previous command,
PLC round trips) and the rest (``submit_to_first_write_less_mailbox_wait``).

Before the stages, three picks at 10/s (``cold_start`` in the report): the first finds the
belts stopped and starts them (a status read and a START per belt) before its sorter command;
the stages then run with the belts running, as a working floor's do (they are kept fresh
between picks).

    python benchmarks/pick_latency.py [--picks 400] [--rate 50] [--load-rate 20000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from benchmarks.ingest_e2e import (  # noqa: E402
    DEVICES,
    LoopLag,
    broker_in,
    machine,
    start_loadgen,
)
from benchmarks.loadgen import device_names, encode_readings, publish_all  # noqa: E402
from benchmarks.modbus_roundtrip import plcs_process  # noqa: E402
from controller.api.app import create_app  # noqa: E402
from controller.api.loops import serve_apart  # noqa: E402
from controller.config import SiteConfig, load_site  # noqa: E402
from controller.control import new_main_loop  # noqa: E402
from controller.domain.events import BusEvent, PickTaskChanged  # noqa: E402
from controller.domain.model import TaskState  # noqa: E402
from controller.runtime import Runtime  # noqa: E402
from devices.sorter import SorterDriver  # noqa: E402
from tests.mosquitto import free_port  # noqa: E402
from tests.sites import TOKENS, write_small_site  # noqa: E402

SELF = Path(__file__).resolve()
TARGET_P99_MS = 2.0


def say(text: str) -> None:
    print(text, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stats_ms(samples_s: list[float]) -> dict[str, float]:
    if not samples_s:
        return {"n": 0}
    ms = [s * 1000 for s in samples_s]
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(pct(ms, 0.99), 3),
        "max_ms": round(max(ms), 3),
        "n": len(ms),
    }


def write_site(folder: Path, mqtt_port: int, api_port: int, conv: int, sorter: int) -> Path:
    path = write_small_site(
        folder,
        mqtt_port=mqtt_port,
        scales=DEVICES,
        client_id="pick-bench",
        dwell_s=0.0,
        reporting_interval_s=3600.0,  # shelves stay counted between the preload and the picks
        keepalive_s=30.0,
        api_port=api_port,
    )
    text = path.read_text().replace(
        '[[zones]]\nid = "Z"\n',
        '[[zones]]\nid = "Z"\nconveyors = ["conveyor-1"]\nsorter = "sorter-1"\n',
    )
    text += f"""
[picking]
scale_timeout_s = 1
result_timeout_s = 10

[[plcs]]
id = "conveyor-1"
kind = "conveyor"
port = {conv}

[[plcs]]
id = "sorter-1"
kind = "sorter"
port = {sorter}
lanes = 8
lane_capacity = 60000
lane_drain_s = 0

[[pack_stations]]
id = "PS1"
sorter = "sorter-1"
lane = 2
"""
    path.write_text(text)
    return path


class Probe:
    """First mailbox write and DIVERTED result per cmd_id, in time.monotonic()."""

    def __init__(self, rt: Runtime) -> None:
        self.first_write: dict[int, float] = {}
        self.sorted_at: dict[str, float] = {}
        self.submitted_at: dict[int, float] = {}  # cmd_id -> entry into PickingService.submit
        submit = rt.picking.submit

        def timed_submit(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            done = submit(*args, **kwargs)
            if done.status == 201:
                self.submitted_at[done.order["tasks"][0]["cmd_id"]] = t0
            return done

        rt.picking.submit = timed_submit  # type: ignore[method-assign]
        sorter = rt.plcs["sorter-1"].driver
        assert isinstance(sorter, SorterDriver)
        sorter.on_write = self._on_write
        # The sorter has one mailbox: a command waits there until the PLC accepted the one
        # before it (a write and a read-back, PLC round trips). Stamped to tell that wait
        # apart: ``send`` entered, then its write's turn came (``_deliver``).
        self.send_at: dict[int, float] = {}
        self.deliver_at: dict[int, float] = {}
        send, deliver = sorter.send, sorter._deliver

        async def timed_send(cmd_id: int, tote: int, lane: int) -> None:
            self.send_at.setdefault(cmd_id, time.monotonic())
            await send(cmd_id, tote, lane)

        async def timed_deliver(rec: Any, **kwargs: Any) -> None:
            self.deliver_at.setdefault(rec.cmd_id, time.monotonic())
            await deliver(rec, **kwargs)

        sorter.send = timed_send  # type: ignore[method-assign]
        sorter._deliver = timed_deliver  # type: ignore[method-assign]
        rt.bus.add_listener(self._on_events)

    def _on_write(self, cmd_id: int) -> None:
        self.first_write.setdefault(cmd_id, time.monotonic())

    def _on_events(self, events: list[BusEvent]) -> None:
        for ev in events:
            if isinstance(ev, PickTaskChanged) and ev.state is TaskState.DIVERTED:
                self.sorted_at.setdefault(ev.order_id, time.monotonic())


async def run_client(
    base: str, picks: int, rate: float, workers: int, tag: str
) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SELF),
        "--client",
        base,
        "--picks",
        str(picks),
        "--rate",
        str(rate),
        "--workers",
        str(workers),
        "--tag",
        tag,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, _ = await proc.communicate()
    rows = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    return rows


def client_main(args: argparse.Namespace) -> None:
    """The HTTP client child: ``picks`` requests at ``rate``/s (0: as fast as it can) over
    ``workers`` keep-alive connections; one JSON line per request."""
    import threading

    headers = {"Authorization": f"Bearer {TOKENS['floor']}"}
    lock = threading.Lock()
    counter = iter(range(args.picks))
    t_start = time.monotonic()

    def worker() -> None:
        with httpx.Client(base_url=args.client, headers=headers, timeout=10.0) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if args.rate > 0:
                    due = t_start + i / args.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                body = {
                    "order_id": f"{args.tag}-{i}",
                    "lines": [{"sku": f"K{i % DEVICES}", "qty": 1}],
                    "pack_station": "PS1",
                }
                t0 = time.monotonic()
                r = client.post(
                    "/api/v1/picks", json=body, headers={"Idempotency-Key": f"{args.tag}-{i}"}
                )
                t1 = time.monotonic()
                row: dict[str, Any] = {"i": i, "t0": t0, "t1": t1, "status": r.status_code}
                if r.status_code == 201:
                    j = r.json()
                    row["order_id"] = j["order_id"]
                    row["cmd_id"] = j["tasks"][0]["cmd_id"]
                with lock:
                    print(json.dumps(row), flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def stage(
    rt: Runtime, probe: Probe, base: str, *, picks: int, rate: float, workers: int, tag: str
) -> dict[str, Any]:
    t_begin = time.monotonic()
    rows = await run_client(base, picks, rate, workers, tag)
    ok = [r for r in rows if r["status"] == 201]
    # Wait (bounded) until every accepted order was written and diverted.
    deadline = time.monotonic() + 20
    # Polls the controller's own counters (same process), bounded by the deadline.
    while time.monotonic() < deadline and not all(  # noqa: ASYNC110
        r["cmd_id"] in probe.first_write and r["order_id"] in probe.sorted_at for r in ok
    ):
        await asyncio.sleep(0.05)
    first = [
        probe.first_write[r["cmd_id"]] - r["t0"] for r in ok if r["cmd_id"] in probe.first_write
    ]
    sorted_ = [
        probe.sorted_at[r["order_id"]] - r["t0"] for r in ok if r["order_id"] in probe.sorted_at
    ]
    response = [r["t1"] - r["t0"] for r in rows]
    inside = [
        probe.first_write[c] - probe.submitted_at[c]
        for c in (r["cmd_id"] for r in ok)
        if c in probe.first_write and c in probe.submitted_at
    ]
    stamped = [
        c
        for c in (r["cmd_id"] for r in ok)
        if c in probe.first_write
        and c in probe.submitted_at
        and c in probe.send_at
        and c in probe.deliver_at
    ]
    mailbox = [probe.deliver_at[c] - probe.send_at[c] for c in stamped]
    without_mailbox = [
        probe.first_write[c] - probe.submitted_at[c] - (probe.deliver_at[c] - probe.send_at[c])
        for c in stamped
    ]
    done_times = [probe.sorted_at[r["order_id"]] for r in ok if r["order_id"] in probe.sorted_at]
    if rows:  # from the client's first request (not counting its process start-up)
        t_begin = min(r["t0"] for r in rows)
    span = (max(done_times) - t_begin) if done_times else float("nan")
    return {
        "picks": picks,
        "rate": rate,
        "workers": workers,
        "statuses": {
            str(s): sum(1 for r in rows if r["status"] == s) for s in {r["status"] for r in rows}
        },
        "api_to_first_write": stats_ms(first),
        "submit_to_first_write": stats_ms(inside),
        "mailbox_wait": stats_ms(mailbox),
        "submit_to_first_write_less_mailbox_wait": stats_ms(without_mailbox),
        "api_to_sorted": stats_ms(sorted_),
        "http_response": stats_ms(response),
        "sorted_per_s": round(len(done_times) / span, 1) if done_times else 0.0,
    }


@contextlib.asynccontextmanager
async def controller_with_api(
    site: SiteConfig, api_port: int, broker_port: int
) -> AsyncIterator[Runtime]:
    """The controller as ``floorhand run`` builds it (`Runtime` + the app under uvicorn on
    ``api_port``), in this process; yields once every link is up and every shelf is counted
    (a preload of readings: 30 units each), and stops it when the block ends."""
    enc = encode_readings(device_names(DEVICES), 6 * DEVICES, ts0=time.time() - 10, step_every=0)
    rt = Runtime(site, freeze_heap=True)
    app = create_app(site, runtime=rt)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=api_port, log_level="warning")
    )
    serve = asyncio.create_task(serve_apart(server, None, app))  # as `floorhand run` serves
    try:
        async with asyncio.timeout(20):
            await rt.started.wait()
            await rt.link.wait_up(10)
            for plc in rt.plcs.values():
                await plc.link.wait_up(10)
            while not server.started:  # noqa: ASYNC110 (uvicorn has no event)
                await asyncio.sleep(0.01)
        await asyncio.to_thread(publish_all, broker_port, enc, qos=1)
        async with asyncio.timeout(20):
            while rt.ingest.readings < enc.readings:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        yield rt
    finally:
        server.should_exit = True
        await serve
        gc.unfreeze()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "target_p99_ms": TARGET_P99_MS, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="pick-bench-") as tmp:
        base_dir = Path(tmp)
        async with broker_in(base_dir) as broker:
            api_port, conv_port, sorter_port = free_port(), free_port(), free_port()
            site_path = write_site(base_dir, broker.port, api_port, conv_port, sorter_port)
            site = load_site(site_path)
            async with (
                plcs_process(site_path),
                controller_with_api(site, api_port, broker.port) as rt,
            ):
                probe = Probe(rt)
                url = f"http://127.0.0.1:{api_port}"
                lag = LoopLag()
                lag.start()
                # The first pick starts the stopped belts (a status read and a START per
                # belt, each a PLC round trip) before its sorter command: the belts', not the
                # dispatch's. It is measured on its own; the stages start with them running.
                say("cold start: 3 picks, the first starts the belts")
                report["stages"]["cold_start"] = await stage(
                    rt, probe, url, picks=3, rate=10, workers=1, tag="cold"
                )
                say(json.dumps(report["stages"]["cold_start"]))
                say("stage idle: paced picks, one connection")
                report["stages"]["idle"] = await stage(
                    rt, probe, url, picks=args.picks, rate=args.rate, workers=1, tag="idle"
                )
                report["stages"]["idle"]["loop_lag"] = await lag.stop()
                say(json.dumps(report["stages"]["idle"]))
                say("stage throughput: picks as fast as 8 connections send them")
                report["stages"]["throughput"] = await stage(
                    rt, probe, url, picks=args.picks, rate=0, workers=8, tag="max"
                )
                say(json.dumps(report["stages"]["throughput"]))
                if args.load_rate > 0:
                    say(f"stage load: paced picks while ingesting {args.load_rate:g} msg/s")
                    duration = max(5.0, args.picks / args.rate + 3)
                    gen = await start_loadgen(
                        broker.port, args.load_rate, duration, devices=DEVICES, first_device=0
                    )
                    gen.tell("GO")
                    await asyncio.sleep(1.0)  # let the load reach its rate first
                    lag = LoopLag()
                    lag.start()
                    before = rt.ingest.readings
                    t0 = time.monotonic()
                    report["stages"]["under_load"] = await stage(
                        rt, probe, url, picks=args.picks, rate=args.rate, workers=1, tag="load"
                    )
                    report["stages"]["under_load"]["loop_lag"] = await lag.stop()
                    report["stages"]["under_load"]["ingest_msg_s"] = round(
                        (rt.ingest.readings - before) / (time.monotonic() - t0)
                    )
                    done = await gen.expect("DONE", timeout_s=120)
                    report["stages"]["under_load"]["loadgen"] = done
                    await gen.close()
                    say(json.dumps(report["stages"]["under_load"]))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--picks", type=int, default=400)
    p.add_argument("--rate", type=float, default=50.0, help="paced picks per second")
    p.add_argument("--load-rate", type=float, default=20_000.0, help="ingest msg/s (0: skip)")
    p.add_argument("--quick", action="store_true", help="100 picks, 5k msg/s load")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="p", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        client_main(args)
        return
    if args.quick:
        args.picks, args.load_rate = 100, min(args.load_rate, 5_000.0)
    # The main loop `floorhand run` makes: the control loop's work goes first.
    with asyncio.Runner(loop_factory=new_main_loop) as runner:
        report = runner.run(bench(args))
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
