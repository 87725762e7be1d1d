"""PLC timing: heartbeat gaps at the PLC, and STOP latency with picks queued, idle and while
the controller ingests 20k msg/s.

Processes (all on 127.0.0.1):

* this process: the controller — `Runtime` + the FastAPI app under uvicorn, as ``floorhand run``
  builds them — and an HTTP client for the picks and the STOP;
* a child (this file with ``--plcs``): the site's conveyor and sorter simulators (real pymodbus
  servers, `simulators.modbus_host.PlcHost`); it records, in ``time.monotonic()`` (the same
  CLOCK_MONOTONIC in every process), every heartbeat change and every commanded STOP its PLC
  models execute, and reports them on request;
* with load: ``benchmarks/loadgen.py`` publishing ``--load-rate`` msg/s QoS 1 to mosquitto.

**Heartbeat gap**: the time between two consecutive heartbeat changes seen by a PLC (the link
writes an incrementing counter every 250 ms; the PLC's watchdog stops the belt after 1 s
without a change), over a window of ``--heartbeat-s`` seconds, idle and under load. Target
(issue 11): p99 ≤ 300 ms while ingesting 20k msg/s.

**STOP latency** (the figure test B7 no longer asserts): a burst of ``--burst`` picks is
submitted through the API while the sorter answers every request ``--plc-latency-ms`` late (its
fault proxy, as in B7), so the picks queue in the controller; once two mailbox writes went out,
``POST /api/v1/plcs/sorter-1/stop`` (engineer). Latency = the sorter model executing that STOP
− the stamp taken just before the request was sent. The injected PLC latency is part of it (the
write on the wire ahead of the STOP, then the STOP's own request): read the figure against it.
B7 used to assert 200 ms.

    python benchmarks/plc_timing.py [--samples 30] [--heartbeat-s 20] [--load-rate 20000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.ingest_e2e import (  # noqa: E402
    DEVICES,
    Child,
    LoopLag,
    broker_in,
    machine,
    start_loadgen,
)
from benchmarks.pick_latency import (  # noqa: E402
    controller_with_api,
    say,
    stats_ms,
    write_site,
)
from controller.config import load_site  # noqa: E402
from controller.control import new_main_loop  # noqa: E402
from controller.runtime import Runtime  # noqa: E402
from tests.mosquitto import free_port  # noqa: E402
from tests.sites import auth_headers  # noqa: E402

SELF = Path(__file__).resolve()
HEARTBEAT_GAP_P99_MS = 300.0
"""Issue 11: heartbeat gap p99 while ingesting 20k msg/s (watchdog 1 s)."""
B7_STOP_BOUND_MS = 200.0
"""The bound test B7 asserted on the STOP latency until it moved here."""


# ---------------------------------------------------------------------------------------------
# The PLC child


async def serve_plcs(conveyor_port: int, sorter_port: int) -> None:
    """Conveyor and sorter on fixed ports (the sorter behind its fault proxy, for the injected
    latency); line protocol on stdin: ``LATENCY <ms>``, ``REPORT``, end of input to stop."""
    from simulators.conveyor import ConveyorPlc
    from simulators.modbus_host import PlcHost
    from simulators.sorter import SorterPlc

    conveyor = ConveyorPlc("conveyor-1", speed=20.0)
    sorter = SorterPlc(
        "sorter-1", speed=20.0, lanes=8, lane_capacity=60_000, lane_drain_s=0.0, queue_capacity=8
    )
    models = {"conveyor-1": conveyor, "sorter-1": sorter}
    async with (
        PlcHost(conveyor, port=conveyor_port, proxy=False) as _,
        PlcHost(sorter, port=sorter_port, seed=1) as sorter_host,
    ):
        print("READY", flush=True)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().split():
            if line[0] == "LATENCY":
                sorter_host.faults.latency_s = float(line[1]) / 1000
            elif line[0] == "REPORT":
                report = {
                    "heartbeats": {
                        k: [t for t, w in m.writes if "heartbeat" in w] for k, m in models.items()
                    },
                    "stops": {
                        k: [e.t for e in m.events_of("stop") if e.detail == "command"]
                        for k, m in models.items()
                    },
                    "watchdog_trips": {k: len(m.events_of("watchdog")) for k, m in models.items()},
                }
                print("REPORT " + json.dumps(report), flush=True)


async def plc_report(child: Child) -> dict[str, Any]:
    child.lines.pop("REPORT", None)
    child.tell("REPORT")
    return await child.expect("REPORT", 30)


def gaps_in(times: list[float], t0: float, t1: float) -> list[float]:
    inside = [t for t in times if t0 <= t <= t1]
    return [b - a for a, b in itertools.pairwise(inside)]


# ---------------------------------------------------------------------------------------------
# The controller side


class WriteCount:
    """Mailbox writes the sorter driver handed to its link (its ``on_write`` probe; called from
    whichever thread runs the driver)."""

    def __init__(self, rt: Runtime) -> None:
        self.n = 0
        self.changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        driver: Any = rt.plcs["sorter-1"].driver
        driver.on_write = self._on_write

    def _on_write(self, cmd_id: int) -> None:
        self.n += 1
        self._loop.call_soon_threadsafe(self.changed.set)

    async def until(self, n: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while self.n < n:
                self.changed.clear()
                await self.changed.wait()


async def post(client: httpx.AsyncClient, url: str, **kwargs: Any) -> int:
    """The status code; 0 when the request failed (time-out, connection lost): under load the
    controller may not answer in time, which the report counts instead of ending the run."""
    try:
        return (await client.post(url, **kwargs)).status_code
    except httpx.HTTPError:
        return 0


async def heartbeat_window(child: Child, seconds: float) -> dict[str, Any]:
    t0 = time.monotonic()
    await asyncio.sleep(seconds)  # a measurement window, not a wait for a state
    t1 = time.monotonic()
    rep = await plc_report(child)
    out: dict[str, Any] = {"window_s": seconds}
    every: list[float] = []
    for plc, times in rep["heartbeats"].items():
        gaps = gaps_in(times, t0, t1)
        every += gaps
        out[plc] = stats_ms(gaps)
    out["all"] = stats_ms(every)
    out["watchdog_trips"] = rep["watchdog_trips"]
    return out


async def stop_samples(
    client: httpx.AsyncClient,
    child: Child,
    writes: WriteCount,
    *,
    samples: int,
    burst: int,
    latency_ms: float,
    tag: str,
) -> dict[str, Any]:
    """``samples`` STOPs, each while a burst of picks queues; STOP write times from the PLC."""
    child.tell(f"LATENCY {latency_ms:g}")
    engineer = auth_headers("engineer")
    floor = auth_headers("floor")
    sent: list[float] = []
    statuses: list[int] = []
    responses: list[float] = []
    errors = 0
    for s in range(samples):
        await post(client, "/api/v1/plcs/sorter-1/start", headers=engineer)
        before = writes.n

        async def pick(j: int, s: int = s) -> int:
            oid = f"{tag}-{s}-{j}"
            return await post(
                client,
                "/api/v1/picks",
                json={
                    "order_id": oid,
                    "lines": [{"sku": f"K{(s * burst + j) % DEVICES}", "qty": 1}],
                    "pack_station": "PS1",
                },
                headers={**floor, "Idempotency-Key": oid},
            )

        codes = await asyncio.gather(*(pick(j) for j in range(burst)))
        errors += sum(1 for c in codes if c != 201)
        try:
            await writes.until(before + 2, 10.0)
        except TimeoutError:
            errors += 1
            continue
        t0 = time.monotonic()
        status = await post(client, "/api/v1/plcs/sorter-1/stop", headers=engineer)
        responses.append(time.monotonic() - t0)
        sent.append(t0)
        statuses.append(status)
    child.tell("LATENCY 0")
    rep = await plc_report(child)
    stops = sorted(rep["stops"]["sorter-1"])
    lat = []
    for k, t0 in enumerate(sent):  # the first STOP executed before the next sample's request
        until = sent[k + 1] if k + 1 < len(sent) else float("inf")
        at = next((t for t in stops if t0 <= t < until), None)
        if at is not None:
            lat.append(at - t0)
    return {
        "samples": len(sent),
        "burst": burst,
        "plc_latency_ms": latency_ms,
        "stop_to_plc": stats_ms(lat),
        "http_response": stats_ms(responses),
        "statuses": {str(c): statuses.count(c) for c in sorted(set(statuses))},  # 0: no answer
        "pick_or_wait_errors": errors,
        "missing_stop_writes": len(sent) - len(lat),
    }


@contextlib.asynccontextmanager
async def plc_child(conveyor_port: int, sorter_port: int) -> AsyncIterator[Child]:
    """This file with ``--plcs`` as a child process, serving until the block ends."""
    child = await Child.start(str(SELF), "--plcs", str(conveyor_port), str(sorter_port))
    try:
        await child.expect("READY", 20)
        yield child
    finally:
        await child.close()


async def stage(
    rt: Runtime, client: httpx.AsyncClient, child: Child, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """A heartbeat window, then the STOP samples; the ingest rate over each."""
    out: dict[str, Any] = {}
    before, t0 = rt.ingest.readings, time.monotonic()
    out["heartbeat_gap"] = await heartbeat_window(child, args.heartbeat_s)
    out["ingest_msg_s"] = round((rt.ingest.readings - before) / (time.monotonic() - t0))
    say(f"  heartbeat gaps: {json.dumps(out['heartbeat_gap']['all'])}")
    before, t0 = rt.ingest.readings, time.monotonic()
    out["stop"] = await stop_samples(
        client,
        child,
        WriteCount(rt),
        samples=args.samples,
        burst=args.burst,
        latency_ms=args.plc_latency_ms,
        tag=tag,
    )
    out["stop"]["ingest_msg_s"] = round((rt.ingest.readings - before) / (time.monotonic() - t0))
    say(f"  STOP: {json.dumps(out['stop'])}")
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": machine(),
        "targets": {"heartbeat_gap_p99_ms": HEARTBEAT_GAP_P99_MS, "b7_stop_ms": B7_STOP_BOUND_MS},
        "stages": {},
    }
    with tempfile.TemporaryDirectory(prefix="plc-timing-") as tmp:
        base_dir = Path(tmp)
        async with broker_in(base_dir) as broker:
            api_port, conv_port, sorter_port = free_port(), free_port(), free_port()
            site_path = write_site(base_dir, broker.port, api_port, conv_port, sorter_port)
            async with (
                plc_child(conv_port, sorter_port) as child,
                controller_with_api(load_site(site_path), api_port, broker.port) as rt,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10.0) as client,
            ):
                say(f"idle: heartbeats for {args.heartbeat_s:g} s, {args.samples} STOPs")
                report["stages"]["idle"] = await stage(rt, client, child, args, "idle")
                if args.load_rate > 0:
                    say(f"under load: {args.load_rate:g} msg/s")
                    duration = args.heartbeat_s + args.samples * 1.5 + 10
                    gen = await start_loadgen(
                        broker.port, args.load_rate, duration, devices=DEVICES, first_device=0
                    )
                    gen.tell("GO")
                    await asyncio.sleep(1.0)  # let the load reach its rate first
                    lag = LoopLag()
                    lag.start()
                    load = await stage(rt, client, child, args, "load")
                    load["loop_lag"] = await lag.stop()
                    gen.tell("STOP")
                    with contextlib.suppress(TimeoutError, RuntimeError):
                        load["loadgen"] = await gen.expect("DONE", timeout_s=60)
                    await gen.close()
                    report["stages"]["under_load"] = load
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=30, help="STOPs per stage")
    p.add_argument("--burst", type=int, default=20, help="picks queued before each STOP")
    p.add_argument("--heartbeat-s", type=float, default=20.0, help="heartbeat window per stage")
    p.add_argument("--plc-latency-ms", type=float, default=20.0, help="sorter reply delay (B7)")
    p.add_argument("--load-rate", type=float, default=20_000.0, help="ingest msg/s (0: skip)")
    p.add_argument("--quick", action="store_true", help="5 STOPs and 3 s of heartbeats per stage")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--plcs", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plcs:
        asyncio.run(serve_plcs(*args.plcs))
        return
    if args.quick:
        args.samples, args.heartbeat_s = min(args.samples, 5), min(args.heartbeat_s, 3.0)
    # The main loop `floorhand run` makes: the control loop's work goes first.
    with asyncio.Runner(loop_factory=new_main_loop) as runner:
        report = runner.run(bench(args))
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
