"""Sorter commands over Modbus TCP: submit → first write, submit → confirmed, commands/s.

Runs one simulated sorter (``python -m simulators plcs`` in a child process by default, no
fault proxy, physical time 10^6 × faster so a tote reaches its lane at the next 1 ms model
tick) and drives it with `SorterDriver` over one `ModbusLink`, as the controller will:

* ``raw read``: one FC3 read of the whole sorter map (112 registers), for reference;
* ``submit → first write``: from calling `SorterDriver.submit` until its mailbox FC16 is handed
  to the link (the number the controller's pick path adds before the PLC sees anything);
* ``submit → accepted`` / ``submit → confirmed``: until the PLC's acceptance / the completion
  were read back (``confirmed`` includes the model tick and the driver's status polling);
* commands/s with 1 and with N concurrent submitters (the mailbox serialises writes; waiting
  for results overlaps).

    python benchmarks/modbus_roundtrip.py [--commands 2000] [--concurrency 1,8] [--in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.link.modbus import ModbusLink, ModbusLinkConfig
from devices.sorter import SorterDriver, SortOutcome
from simulators.modbus_host import PlcHost, free_port
from simulators.sorter import SorterPlc

ROOT = Path(__file__).resolve().parents[1]
SPEED = 1_000_000.0
TICK_S = 0.001


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.asynccontextmanager
async def plcs_process(site: Path) -> AsyncIterator[None]:
    """The site's ``[[plcs]]`` served by ``python -m simulators plcs`` in a child process (no
    fault proxy, physical time ``SPEED`` × faster, ``TICK_S`` model tick) until the block ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        "plcs",
        str(site),
        "--no-faults",
        "--speed",
        str(SPEED),
        "--tick",
        str(TICK_S),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"running" not in (await proc.stdout.readline()):
                pass
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


@contextlib.asynccontextmanager
async def sorter_process(port: int) -> AsyncIterator[None]:
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site.toml"
        site.write_text(
            f"""[site]
id = "bench"

[[plcs]]
id = "sorter-bench"
kind = "sorter"
port = {port}
lanes = 16
lane_capacity = 60000
queue_capacity = 8
"""
        )
        async with plcs_process(site):
            yield


@contextlib.asynccontextmanager
async def sorter_in_process(port: int) -> AsyncIterator[None]:
    model = SorterPlc("sorter-bench", lanes=16, lane_capacity=60_000, lane_drain_s=0.0, speed=SPEED)
    async with PlcHost(model, port=port, proxy=False, tick_s=TICK_S):
        yield


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": pct(ms, 0.99),
        "max_ms": max(ms),
        "n": len(ms),
    }


async def measure(
    *, commands: int, concurrency: list[int], poll: float, in_process: bool
) -> dict[str, Any]:
    """Run the measurements; ``rows`` are ``(name, samples in s)``, summarised in ``table``."""
    port = free_port()
    plc = sorter_in_process(port) if in_process else sorter_process(port)
    rows: list[tuple[str, list[float]]] = []
    rates: dict[str, float] = {}
    async with plc:
        link = ModbusLink(ModbusLinkConfig(port=port), name="bench")
        sorter = SorterDriver(link, poll_interval_s=poll)
        first_write: dict[int, float] = {}
        sorter.on_write = lambda cmd_id: first_write.setdefault(cmd_id, time.monotonic())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run(), name="bench.link")
            await link.wait_up(5)
            await sorter.start()
            raw: list[float] = []
            for _ in range(commands):
                t0 = time.perf_counter()
                await link.read(1, 0, 112)
                raw.append(time.perf_counter() - t0)
            rows.append(("raw read, 112 registers", raw))
            ids = itertools.count(1)
            for n in concurrency:
                outcomes: list[SortOutcome] = []

                async def worker(count: int, into: list[SortOutcome]) -> None:
                    for _ in range(count):
                        cmd_id = next(ids)
                        into.append(await sorter.submit(cmd_id, cmd_id, 1 + cmd_id % 16))

                per_worker = commands // n
                started = time.perf_counter()
                async with asyncio.TaskGroup() as workers:
                    for i in range(n):
                        workers.create_task(worker(per_worker, outcomes), name=f"bench.worker{i}")
                elapsed = time.perf_counter() - started
                label = f"{n} submitter{'s' if n > 1 else ''}"
                rows.append(
                    (
                        f"submit → first write ({label})",
                        [first_write[o.cmd_id] - o.submitted_at for o in outcomes],
                    )
                )
                rows.append(
                    (
                        f"submit → accepted ({label})",
                        [o.accepted_at - o.submitted_at for o in outcomes],
                    )
                )
                rows.append(
                    (
                        f"submit → confirmed ({label})",
                        [o.done_at - o.submitted_at for o in outcomes],
                    )
                )
                rates[label] = len(outcomes) / elapsed
                if any(o.resends for o in outcomes):
                    raise RuntimeError("a command was resent: the link or the PLC misbehaved")
            stats = {
                "requests": link.stats.requests,
                "busy_retries": link.stats.busy_retries,
                "timeouts": link.stats.timeouts,
            }
            await link.disconnect()
    return {
        "table": {name: summary(samples) for name, samples in rows},
        "commands_per_s": rates,
        "link": stats,
        "poll_interval_ms": poll * 1000,
        "simulator": "in this process" if in_process else "child process",
        "commands": commands,
    }


async def run(args: argparse.Namespace) -> None:
    result = await measure(
        commands=args.commands,
        concurrency=args.concurrency,
        poll=args.poll,
        in_process=args.in_process,
    )
    print("| measure (ms) | p50 | p99 | max | n |")
    print("|---|---|---|---|---|")
    for name, row in result["table"].items():
        print(
            f"| {name} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['max_ms']:.3f} "
            f"| {row['n']} |"
        )
    print()
    print("; ".join(f"{k}: {v:.0f} commands/s" for k, v in result["commands_per_s"].items()))
    link = result["link"]
    print(
        f"link: {link['requests']} requests, {link['busy_retries']} busy retries, "
        f"{link['timeouts']} timeouts; status poll every {args.poll * 1000:g} ms; "
        f"simulator {result['simulator']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--commands", type=int, default=2000)
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8],
        help="comma-separated submitter counts (default 1,8)",
    )
    p.add_argument("--poll", type=float, default=0.002, help="status poll interval, s")
    p.add_argument("--in-process", action="store_true", help="simulator in the same event loop")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
