"""Live WebSocket fan-out: N clients of /api/v1/live while the runtime bus carries R events/s.

The server is the real controller app (``create_app`` + ``Runtime``) under uvicorn on 127.0.0.1
(served as ``floorhand run`` serves it: uvicorn on its own loop and thread, the runtime here),
in this process, with a real mosquitto for its MQTT link. A paced injector puts events on the
runtime bus (``rt.bus.publish``, as ingest does after a commit) in 10 ms groups: by default 70 %
``stock_changed`` of random shelves (→ ``shelf`` messages, coalesced per shelf while queued) and
30 % ``pick_task`` (→ ``pick`` messages, never coalesced). The clients run in a child process
(``websockets``, permessage-deflate offered as browsers do) and time every delta message from its
creation on the server (``t``) to its arrival (same machine clock).

Reported per run: events/s published, messages delivered per client per second, lag p50/p99/max,
drops (the server's counter and messages never seen), server and client CPU.

``--scope zone`` connects client i to zone ``Z{i % 8}`` (``?zone=``; it then gets that zone's
shelf messages only), ``--scope overview`` / ``site`` ask for that scope; the default is the
controller's (the whole site up to 5,000 shelves, the overview above).

Reconnect storm (after each run, while events keep coming at the same rate): every client
closes and all reconnect at once; reported: seconds until each has its snapshot, snapshots the
server built for them (shared snapshots: one per scope per second), the longest stall of the
server's event loop (a 5 ms ticker's worst lateness) and the first frame's size.

    python benchmarks/ws_fanout.py                       # 50 clients, 1,000 events/s, 20 s
    python benchmarks/ws_fanout.py --rates 1000,3000 --duration 10 --no-deflate
    python benchmarks/ws_fanout.py --shelves 100000 --scope zone --rates 1000   # alone, full size
    python benchmarks/ws_fanout.py --shelves 200 --clients 5 --duration 2 --warmup 1  # a check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

from controller.domain.events import BusEvent, PickTaskChanged, StockChanged  # noqa: E402
from controller.domain.model import TaskState  # noqa: E402

TOKEN = "bench-live-token-0123456789abcdef"
GROUP_S = 0.01


def write_big_site(
    folder: Path, *, shelves: int, zones: int, mqtt_port: int, token: str, extra_api: str = ""
) -> Path:
    """``shelves`` shelves over ``zones`` zones (``Z0``…), one 1-channel scale ``s<i>`` and one
    SKU ``K<i>`` per shelf (unit 100 g, tare 500 g, capacity 40, reorder point 10, safety 3);
    scales report hourly so nothing goes stale during a benchmark. ``token`` is a supervisor."""
    import hashlib

    digest = hashlib.sha256(token.encode()).hexdigest()
    lines = [
        "[site]",
        'id = "bench"',
        "",
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        'client_id = "floorhand-bench"',
        'topic_prefix = "fh"',
        "",
        "[journal]",
        f'path = "{folder / "journal.sqlite"}"',
        "",
        "[history]",
        'backend = "none"',
        "",
        "[api]",
        'bind = "127.0.0.1:0"',
        "rate_per_s = 1000",
        "rate_burst = 2000",
        extra_api,
        "",
        "[[api.tokens]]",
        'name = "bench"',
        'role = "supervisor"',
        f'sha256 = "{digest}"',
        "",
    ]
    for z in range(zones):
        lines += ["[[zones]]", f'id = "Z{z}"', ""]
    for i in range(shelves):
        zone = f"Z{i * zones // shelves}"
        lines += [
            "[[skus]]",
            f'id = "K{i}"',
            "reorder_point = 10",
            "safety_stock = 3",
            "max_stock = 40",
            "dwell_s = 0.2",
            "",
            "[[scales]]",
            f'id = "s{i}"',
            f'zone = "{zone}"',
            "reporting_interval_s = 3600.0",
            "max_weight_g = 10000.0",
            "",
            "[[shelves]]",
            f'id = "sh{i}"',
            f'zone = "{zone}"',
            f'scale = "s{i}"',
            f'sku = "K{i}"',
            "unit_weight_g = 100.0",
            "tare_g = 500.0",
            "capacity_units = 40",
            "",
        ]
    path = folder / "site.toml"
    path.write_text("\n".join(lines))
    return path


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _busy_s(t: Any) -> float:
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- server side ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def live_server(site_path: Path, *, deflate: bool) -> AsyncIterator[tuple[Any, Any, int]]:
    import uvicorn

    from controller.api.app import create_app
    from controller.api.loops import serve_apart
    from controller.config import load_site
    from controller.runtime import Runtime

    site = load_site(site_path)
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        access_log=False,
        ws_per_message_deflate=deflate,
    )
    server = uvicorn.Server(config)
    # As `floorhand run` serves: uvicorn on a loop of its own, every frame sent through it.
    task = asyncio.create_task(serve_apart(server, [sock], app), name="uvicorn")
    try:
        async with asyncio.timeout(20):
            await rt.started.wait()
        yield rt, app, sock.getsockname()[1]
    finally:
        server.should_exit = True
        async with asyncio.timeout(20):
            await task
        sock.close()


async def inject(
    rt: Any, rate: float, until: float, shelves: list[str], pick_share: float
) -> tuple[int, float]:
    """Put ``rate`` events/s on the bus in GROUP_S groups until ``until`` (monotonic); returns
    the events published and the seconds it took."""
    rng = random.Random(7)
    sent = 0
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= until:
            return sent, now - t0
        due = int((now - t0) * rate)
        if due > sent:
            group: list[BusEvent] = []
            ts = time.time()
            for i in range(sent, due):
                if rng.random() < pick_share:
                    # cmd_id numbers the pick events: the clients find the ones never seen
                    group.append(
                        PickTaskChanged(
                            ts,
                            f"B{i // 4}",
                            i % 4,
                            "K1",
                            1,
                            "sh1",
                            "sorter-1",
                            i,
                            i,
                            TaskState.CONFIRMED,
                            "ok",
                            None,
                        )
                    )
                else:
                    sid = rng.choice(shelves)
                    group.append(StockChanged(sid, "K" + sid[2:], 20, 19, ts))
            rt.bus.publish(group)
            sent = due
        await asyncio.sleep(GROUP_S)


async def loop_stall(stop: asyncio.Event, tick_s: float = 0.005) -> float:
    """The worst lateness (s) of a ``tick_s`` sleep on this loop until ``stop``."""
    worst = 0.0
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(tick_s)
        worst = max(worst, time.monotonic() - t - tick_s)
    return worst


async def storm(
    args: argparse.Namespace, rt: Any, hub: Any, child: Any, rate: float
) -> dict[str, Any]:
    """Every client closes and reconnects at once while events keep coming."""
    builds0 = hub.snapshot_builds
    stop = asyncio.Event()
    stall = asyncio.create_task(loop_stall(stop))
    injector = asyncio.create_task(
        inject(rt, rate, time.monotonic() + 60, list(rt.specs), args.pick_share)
    )
    try:
        child.stdin.write(b"STORM\n")
        await child.stdin.drain()
        line = await asyncio.wait_for(child.stdout.readline(), 60)
    finally:
        injector.cancel()
        stop.set()
    report: dict[str, Any] = json.loads(line.removeprefix(b"STORM "))
    report.update(
        storm_snapshot_builds=hub.snapshot_builds - builds0,
        storm_loop_stall_ms=1000 * await stall,
    )
    with contextlib.suppress(asyncio.CancelledError):
        await injector
    return report


async def run_rate(args: argparse.Namespace, site_path: Path, rate: float) -> dict[str, Any]:
    async with live_server(site_path, deflate=not args.no_deflate) as (rt, app, port):
        hub = app.state.live
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--role",
            "clients",
            "--port",
            str(port),
            "--clients",
            str(args.clients),
            "--scope",
            args.scope,
            *(["--no-deflate"] if args.no_deflate else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
            limit=1 << 26,  # the report line carries the lag sample
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            if not line.startswith(b"READY"):
                raise RuntimeError(f"clients did not start: {line!r}")
            progress(f"{args.clients} clients connected; warm-up {args.warmup:.0f} s")
            shelves = list(rt.specs)
            warm_until = time.monotonic() + args.warmup
            await inject(rt, rate, warm_until, shelves, args.pick_share)
            t_start = time.time()
            dropped0 = hub.dropped_total
            coalesced0 = sum(c.coalesced for c in hub.clients.values())
            cpu0 = time.process_time()
            machine0 = psutil.cpu_times()
            child.stdin.write(f"GO {t_start}\n".encode())
            await child.stdin.drain()
            progress(f"measuring {args.duration:.0f} s")
            sent, inject_s = await inject(
                rt, rate, time.monotonic() + args.duration, shelves, args.pick_share
            )
            t_end = time.time()
            cpu = time.process_time() - cpu0
            machine = _busy_s(psutil.cpu_times()) - _busy_s(machine0)
            dropped = hub.dropped_total - dropped0
            coalesced = sum(c.coalesced for c in hub.clients.values()) - coalesced0
            child.stdin.write(f"END {t_end}\n".encode())
            await child.stdin.drain()
            progress(f"published {sent}; waiting for the clients' report")
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            report = json.loads(line.removeprefix(b"DONE "))
            progress("reconnect storm")
            report.update(await storm(args, rt, hub, child, rate))
        finally:
            if child.returncode is None:
                child.stdin.close()
                await child.wait()
    wall = t_end - t_start
    lags = report.pop("lags_ms_sample")
    return {
        "clients": args.clients,
        "target_rate": rate,
        "published_per_s": sent / inject_s,
        "delivered_per_client_per_s": report["delivered"] / args.clients / wall,
        "delivered_total_per_s": report["delivered"] / wall,
        "lag_p50_ms": pct(lags, 0.5),
        "lag_p99_ms": pct(lags, 0.99),
        "lag_max_ms": report["lag_max_ms"],
        "dropped_server": dropped,
        "coalesced_server": coalesced,
        "pick_msgs_missing": report["pick_expected_missing"],
        "dropped_notices": report["dropped_notices"],
        "server_cpu_pct": 100 * cpu / wall,
        "client_cpu_pct": report["cpu_pct"],
        "other_cpu_pct": max(0.0, 100 * machine / wall - 100 * cpu / wall - report["cpu_pct"]),
        "deflate": not args.no_deflate,
        "scope": args.scope,
        "storm_s": report["storm_s"],
        "storm_snapshot_builds": report["storm_snapshot_builds"],
        "storm_loop_stall_ms": report["storm_loop_stall_ms"],
        "first_frame_bytes": report["first_frame_bytes"],
    }


# -- client side (child process) -----------------------------------------------------------------


async def clients_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    base = f"ws://127.0.0.1:{args.port}/api/v1/live"

    def url(i: int) -> str:
        if args.scope == "zone":
            return f"{base}?zone=Z{i % 8}"
        return base if args.scope == "default" else f"{base}?scope={args.scope}"

    def dial(i: int) -> Any:
        return connect(
            url(i),
            subprotocols=[Subprotocol("bearer"), Subprotocol(TOKEN)],
            compression=None if args.no_deflate else "deflate",
            max_size=None,
            proxy=None,
        )

    window = {"start": float("inf"), "end": float("inf")}
    lags: list[float] = []
    state = {"delivered": 0, "lag_max": 0.0, "notices": 0}
    picks_seen: list[set[int]] = [set() for _ in range(args.clients)]
    picks_in_window: set[int] = set()
    conns = []
    for i in range(args.clients):
        conns.append(await dial(i))
    for ws in conns:
        await ws.recv()  # hello + snapshot
    print("READY", flush=True)
    rng = random.Random(1)

    async def read(i: int, ws: Any) -> None:
        seen = picks_seen[i]
        with contextlib.suppress(Exception):
            async for frame in ws:
                now = time.time()
                for m in orjson.loads(frame):
                    t = m.get("t")
                    typ = m["type"]
                    if typ == "dropped":
                        state["notices"] += 1
                    if typ not in ("shelf", "pick") or t is None:
                        continue
                    if window["start"] <= t < window["end"]:
                        state["delivered"] += 1
                        lag = (now - t) * 1000
                        state["lag_max"] = max(state["lag_max"], lag)
                        if len(lags) < 400_000 and rng.random() < 0.2:
                            lags.append(lag)
                        if typ == "pick":
                            seq = m["event"]["cmd_id"]
                            seen.add(seq)
                            if i == 0:
                                picks_in_window.add(seq)

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(conns)]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    go = (await reader.readline()).split()
    window["start"] = float(go[1])
    t_cpu = time.process_time()
    t_wall = time.monotonic()
    end = (await reader.readline()).split()
    window["end"] = float(end[1])
    cpu = time.process_time() - t_cpu
    wall = time.monotonic() - t_wall
    progress("clients: window closed, draining 3 s")
    await asyncio.sleep(3.0)  # messages of the window still in flight
    progress("clients: closing")
    # Picks are never coalesced: any pick the first client saw that another did not was lost.
    missing = sum(len(picks_in_window - s) for s in picks_seen[1:])
    for ws in conns:
        await ws.close()
    for r in readers:
        r.cancel()
    progress("clients: closed")
    report = {
        "delivered": state["delivered"],
        "lag_max_ms": state["lag_max"],
        "lags_ms_sample": lags,
        "pick_expected_missing": missing,
        "dropped_notices": state["notices"],
        "cpu_pct": 100 * cpu / wall,
    }
    print("DONE " + json.dumps(report), flush=True)
    if (await reader.readline()).strip() != b"STORM":
        return
    t0 = time.monotonic()

    async def rejoin(i: int) -> int:
        ws = await dial(i)
        first = await ws.recv()  # hello + snapshot
        await ws.close()
        return len(first)

    sizes = await asyncio.gather(*(rejoin(i) for i in range(args.clients)))
    storm_report = {"storm_s": time.monotonic() - t0, "first_frame_bytes": max(sizes)}
    print("STORM " + json.dumps(storm_report), flush=True)


# -- main ----------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> None:
    from tests.mosquitto import running_mosquitto

    results = []
    with tempfile.TemporaryDirectory(prefix="ws-fanout-") as tmp:
        folder = Path(tmp)
        async with running_mosquitto(folder / "mosquitto") as broker:
            for rate in args.rates:
                run_dir = folder / f"r{int(rate)}"
                run_dir.mkdir()
                site = write_big_site(
                    run_dir,
                    shelves=args.shelves,
                    zones=8,
                    mqtt_port=broker.port,
                    token=TOKEN,
                    extra_api=f"live_queue = {args.queue}",
                )
                print(f"-- {args.clients} clients, {rate:.0f} events/s, {args.duration:.0f} s")
                r = await run_rate(args, site, rate)
                results.append(r)
                print(json.dumps(r, indent=1))
    print()
    print(
        "| clients | scope | events/s | delivered/client/s | lag p50 | lag p99 | lag max "
        "| dropped | server CPU | client CPU | rest of machine |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['scope']} | {r['published_per_s']:.0f} | "
            f"{r['delivered_per_client_per_s']:.0f} | {r['lag_p50_ms']:.1f} ms | "
            f"{r['lag_p99_ms']:.1f} ms | {r['lag_max_ms']:.0f} ms | {r['dropped_server']} | "
            f"{r['server_cpu_pct']:.0f} % | {r['client_cpu_pct']:.0f} % | "
            f"{r['other_cpu_pct']:.0f} % |"
        )
    print()
    print("| clients | scope | reconnect storm | snapshots built | loop stall | first frame |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['scope']} | {r['storm_s']:.2f} s | "
            f"{r['storm_snapshot_builds']} | {r['storm_loop_stall_ms']:.0f} ms | "
            f"{r['first_frame_bytes'] / 1000:.0f} kB |"
        )
    if args.out:
        with open(args.out, "w") as f:  # noqa: ASYNC230  (once, at the end)
            json.dump(results, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["main", "clients"], default="main")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1000.0])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--shelves", type=int, default=2000)
    p.add_argument("--queue", type=int, default=2000, help="[api] live_queue")
    p.add_argument("--pick-share", type=float, default=0.3)
    p.add_argument("--no-deflate", action="store_true", help="no permessage-deflate")
    p.add_argument(
        "--scope",
        choices=["default", "site", "overview", "zone"],
        default="default",
        help="the clients' scope (zone: client i in zone Z{i %% 8})",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("FLOORHAND_MQTT_USERNAME", "")
    if args.role == "clients":
        asyncio.run(clients_main(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
