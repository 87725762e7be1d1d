"""The ``scales`` and ``demo`` commands: a simulated warehouse, alone or with broker + controller.

``demo`` starts, in order: its broker (child process: a private mosquitto where installed, the
pure-Python amqtt otherwise or when asked; simulators/broker.py), the site's PLCs (simulated
conveyors and sorters on 127.0.0.1, in this process), the controller (child process,
``python -m controller run SITE``, configured through ``FLOORHAND_*`` environment variables),
then the scale simulators and the simulated floor (a WMS sending pick requests, pickers
carrying them out; simulators/floor.py) in this process. Ctrl-C / SIGTERM stops everything it
started, by PID, in reverse order: SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from simulators.broker import (
    BROKER_CHOICES,
    DEMO_BROKER_ENV,
    TRADE_OFFS,
    BrokerKind,
    BrokerStartError,
    DemoBroker,
    find_mosquitto,
    make_demo_broker,
    resolve_broker_kind,
    stop_process,
)
from simulators.floor import FloorSystem, load_pack_stations
from simulators.modbus_host import PlcHost
from simulators.plc import PlcSiteError, build_model, load_plcs
from simulators.shelf_scale import (
    DEFAULT_PICK_RATE_PER_MIN,
    ScaleSimError,
    ScaleSimOptions,
    WarehouseScales,
)
from simulators.site import Site, SiteError, load_site

PROGRESS_EVERY_S = 10.0
DEMO_USER = "floorhand"


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speed", type=float, default=1.0, help="time factor (2 = twice as fast)")
    p.add_argument(
        "--pick-rate",
        type=float,
        default=DEFAULT_PICK_RATE_PER_MIN,
        help="mean picks per shelf per minute (default %(default)s; 0 = no picks)",
    )
    p.add_argument(
        "--malformed-rate",
        type=float,
        default=0.0,
        help="fraction of messages replaced by poison payloads (0..1)",
    )
    p.add_argument("--duplicate-rate", type=float, default=0.0, help="fraction re-sent twice")
    p.add_argument("--reorder-rate", type=float, default=0.0, help="fraction sent late")
    p.add_argument("--dropout-rate", type=float, default=0.0, help="dropouts per scale per hour")
    p.add_argument("--drift", type=float, default=0.0, help="max drift in g per hour")
    p.add_argument("--batch", action="store_true", help="one array message per native device")
    p.add_argument("--no-restock", action="store_true", help="never restock automatically")
    p.add_argument("--seed", type=int, default=None)


def options_from_args(args: argparse.Namespace) -> ScaleSimOptions:
    for name in ("malformed_rate", "duplicate_rate", "reorder_rate"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be within 0..1")
    if args.speed <= 0 or args.pick_rate < 0:
        raise SystemExit("error: --speed must be > 0 and --pick-rate >= 0")
    return ScaleSimOptions(
        pick_rate_per_min=args.pick_rate,
        malformed_rate=args.malformed_rate,
        duplicate_rate=args.duplicate_rate,
        reorder_rate=args.reorder_rate,
        dropout_rate_per_h=args.dropout_rate,
        drift_g_per_h=args.drift,
        batch=args.batch,
        auto_restock=not args.no_restock,
        first_epoch=int(time.time()),
    )


def add_scales_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("scales", help="publish simulated shelf scales to a broker")
    p.add_argument("site", type=Path, help="site TOML file")
    p.add_argument("--url", default="mqtt://127.0.0.1:1883")
    p.add_argument("--username", default=None)
    p.add_argument(
        "--password-env",
        default="FLOORHAND_MQTT_PASSWORD",
        help="environment variable holding the password (default %(default)s)",
    )
    p.add_argument("--duration", type=float, default=None, help="exit after this many seconds")
    add_scale_arguments(p)
    p.set_defaults(func=scales_main)


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="broker + controller + simulated warehouse on this machine")
    p.add_argument("site", type=Path, help="site TOML file")
    p.add_argument("--api-bind", default="127.0.0.1:8080")
    p.add_argument("--broker-port", type=int, default=18830)
    p.add_argument(
        "--broker",
        choices=BROKER_CHOICES,
        default=os.environ.get(DEMO_BROKER_ENV) or "auto",
        help=(
            "MQTT broker: mosquitto (keeps unacknowledged messages across reconnects), amqtt "
            "(pure-Python fallback that loses them), or auto: mosquitto when installed "
            f"(default from {DEMO_BROKER_ENV}, else auto)"
        ),
    )
    p.add_argument("--var-dir", type=Path, default=Path("var/demo"))
    p.add_argument("--duration", type=float, default=None, help="exit after this many seconds")
    p.add_argument(
        "--controller-cmd",
        default=None,
        help="command line that runs the controller (default: python -m controller run SITE)",
    )
    p.add_argument(
        "--api-wait",
        type=float,
        default=30.0,
        help="seconds to wait for the controller's API port before starting the scales",
    )
    p.add_argument(
        "--order-interval",
        type=float,
        default=8.0,
        help="simulated seconds between pick requests of the simulated WMS (0: none)",
    )
    add_scale_arguments(p)
    p.set_defaults(func=demo_main)


# ------------------------------------------------------------------ scales
def scales_main(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.site)
    except SiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    password = os.environ.get(args.password_env) if args.username else None
    sim = WarehouseScales(
        site,
        args.url,
        args.username,
        password,
        speed=args.speed,
        seed=args.seed,
        options=options_from_args(args),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sim.start()
    except ScaleSimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{len(sim.scale_ids)} scales / {len(sim.shelf_ids)} shelves of site {site.id!r} "
        f"publishing to {args.url} (speed {args.speed:g}); Ctrl-C to stop",
        flush=True,
    )
    started = time.monotonic()
    try:
        while True:
            wait_s = PROGRESS_EVERY_S
            if args.duration is not None:
                wait_s = min(wait_s, max(0.0, started + args.duration - time.monotonic()))
            if stop.wait(wait_s):
                break
            print(f"[{_elapsed(started)}] {sim.stats().summary()}", flush=True)
            if args.duration is not None and time.monotonic() >= started + args.duration:
                break
    finally:
        sim.stop()
    print(f"stopped: {sim.stats().summary()}", flush=True)
    return 0


def _elapsed(started: float) -> str:
    s = int(time.monotonic() - started)
    return f"{s // 60:02d}:{s % 60:02d}"


# -------------------------------------------------------------------- demo
def demo_main(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.site)
    except SiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = options_from_args(args)
    api_host, _, api_port = str(args.api_bind).rpartition(":")
    if not api_host or not api_port.isdigit():
        print(f"error: --api-bind {args.api_bind!r} must be HOST:PORT", file=sys.stderr)
        return 2
    mosquitto_bin = find_mosquitto()
    try:
        kind = resolve_broker_kind(args.broker, mosquitto_bin)
    except BrokerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    var_dir: Path = args.var_dir
    var_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    broker = make_demo_broker(
        kind, args.broker_port, DEMO_USER, password, var_dir / "broker", mosquitto_bin=mosquitto_bin
    )
    env_vars = controller_env(
        args.broker_port,
        DEMO_USER,
        password,
        args.api_bind,
        var_dir / "journal.sqlite",
        protocol=broker.protocol,
    )
    env_vars.update(demo_token_env())
    # The same settings for a controller started by hand: `set -a; . var/demo/demo.env`.
    env_file = var_dir / "demo.env"
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{k}={shlex.quote(v)}\n" for k, v in env_vars.items())
    return asyncio.run(
        _demo(args, broker, site, options, password, env_vars, env_file, (api_host, int(api_port)))
    )


def controller_command(site_path: Path, override: str | None) -> list[str]:
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "controller", "run", str(site_path)]


DEMO_TOKEN_PREFIX = "FLOORHAND_TOKEN_DEMO_"
DEMO_ROLES = ("floor", "supervisor", "engineer")


def demo_token_env() -> dict[str, str]:
    """One fresh API token per role for this demo run, as the controller reads them from the
    environment (``FLOORHAND_TOKEN_<NAME>=<role>:<token>``, docs/api.md)."""
    return {
        f"{DEMO_TOKEN_PREFIX}{role.upper()}": f"{role}:{secrets.token_urlsafe(32)}"
        for role in DEMO_ROLES
    }


def demo_tokens(env_vars: dict[str, str]) -> dict[str, str]:
    """role -> token, from ``demo_token_env`` variables."""
    out = {}
    for key, value in env_vars.items():
        if key.startswith(DEMO_TOKEN_PREFIX):
            role, _, token = value.partition(":")
            out[role] = token
    return out


def controller_env(
    port: int, user: str, password: str, api_bind: str, journal: Path, *, protocol: int = 5
) -> dict[str, str]:
    """What the controller needs to join the demo broker (``protocol`` 4 = MQTT 3.1.1, the only
    one amqtt speaks; 5 with mosquitto)."""
    return {
        "FLOORHAND_MQTT_URL": f"mqtt://127.0.0.1:{port}",
        "FLOORHAND_MQTT_PROTOCOL": str(protocol),
        "FLOORHAND_MQTT_USERNAME": user,
        "FLOORHAND_MQTT_PASSWORD": password,
        "FLOORHAND_API_BIND": api_bind,
        "FLOORHAND_JOURNAL": str(journal),
    }


def broker_summary(kind: BrokerKind, requested: str) -> str:
    """The demo's line about its broker: which one, why, and what it promises."""
    if kind == "mosquitto":
        return f"broker: mosquitto (private, 127.0.0.1): {TRADE_OFFS['mosquitto']}"
    why = "as asked" if requested == "amqtt" else "fallback: mosquitto is not installed"
    return f"broker: amqtt ({why}). WARNING: {TRADE_OFFS['amqtt']}"


async def _demo(
    args: argparse.Namespace,
    broker: DemoBroker,
    site: Site,
    options: ScaleSimOptions,
    password: str,
    env_vars: dict[str, str],
    env_file: Path,
    api_addr: tuple[str, int],
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # idempotent: a second signal changes nothing

    controller: asyncio.subprocess.Process | None = None
    sim: WarehouseScales | None = None
    floor: FloorSystem | None = None
    plcs = contextlib.AsyncExitStack()
    exit_code = 0
    try:
        print(broker_summary(broker.kind, args.broker), flush=True)
        print(f"starting {broker.kind} on 127.0.0.1:{args.broker_port} ...", flush=True)
        await broker.start()
        await _start_plcs(args, plcs)
        cmd = controller_command(args.site, args.controller_cmd)
        print(f"starting controller: {shlex.join(cmd)}", flush=True)
        controller = await asyncio.create_subprocess_exec(
            *cmd,
            env={**os.environ, **env_vars},
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order, by PID
        )
        api_ready = await _wait_api(controller, stop, *api_addr, args.api_wait)
        if stop.is_set():
            return 0
        if controller.returncode is not None:
            print(f"error: controller exited with code {controller.returncode}", file=sys.stderr)
            return 1
        if not api_ready:
            print(
                f"warning: controller API not listening on {args.api_bind} after "
                f"{args.api_wait:g} s; starting the scales anyway",
                file=sys.stderr,
            )
        sim = WarehouseScales(
            site,
            broker.url,
            DEMO_USER,
            password,
            speed=args.speed,
            seed=args.seed,
            options=options,
        )
        await asyncio.to_thread(sim.start)
        stations = load_pack_stations(args.site)
        if stations and args.order_interval > 0:
            floor = FloorSystem(
                site,
                sim,
                broker.url,
                DEMO_USER,
                password,
                pack_stations=stations,
                order_interval_s=args.order_interval,
                speed=args.speed,
                seed=args.seed,
            )
            await asyncio.to_thread(floor.start)
            print(
                f"floor simulator: a pick request every ~{args.order_interval:g} s for "
                f"{', '.join(stations)}; pickers follow the pick instructions",
                flush=True,
            )
        _print_banner(
            args, site.id, site.topic_prefix, sim, password, env_file, demo_tokens(env_vars), broker
        )
        exit_code = await _run_until_stopped(args, stop, controller, sim, floor)
    except (ScaleSimError, BrokerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        if floor is not None:
            await asyncio.to_thread(floor.stop)
            print(f"floor stopped: {floor.stats.summary()}", flush=True)
        if sim is not None:
            await asyncio.to_thread(sim.stop)
            print(f"scales stopped: {sim.stats().summary()}", flush=True)
        if controller is not None:
            code = await stop_process(controller, timeout_s=10.0, name="controller")
            print(f"controller stopped (exit code {code})", flush=True)
        await plcs.aclose()  # after the controller: its shutdown stops the belts first
        await broker.stop()
        print("broker stopped", flush=True)
    return exit_code


async def _start_plcs(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> None:
    """Serve the site's ``[[plcs]]`` on 127.0.0.1 (their ports come from the site file)."""
    try:
        specs = load_plcs(args.site)
    except PlcSiteError as exc:
        raise ScaleSimError(str(exc)) from exc
    for index, spec in enumerate(specs):
        seed = None if args.seed is None else args.seed + 1000 + index
        host = PlcHost(
            build_model(spec, speed=args.speed, seed=seed),
            port=spec.port,
            unit=spec.unit,
            seed=seed,
        )
        try:
            await stack.enter_async_context(host)
        except OSError as exc:
            raise ScaleSimError(f"PLC {spec.id}: cannot listen on port {spec.port}: {exc}") from exc
        print(f"{spec.kind} PLC {spec.id!r} on 127.0.0.1:{host.port}", flush=True)


async def _wait_api(
    controller: asyncio.subprocess.Process,
    stop: asyncio.Event,
    host: str,
    port: int,
    timeout_s: float,
) -> bool:
    """Wait until the API port accepts connections, the controller exits, a stop signal
    arrives, or ``timeout_s`` passes. Between connection attempts it waits on the controller's
    exit and the stop event, so either is seen at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    exited = asyncio.ensure_future(controller.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while loop.time() < deadline:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            except (OSError, TimeoutError):
                await asyncio.wait(
                    {exited, stopped}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED
                )
                if exited.done() or stopped.done():
                    return False
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False
    finally:
        for fut in (exited, stopped):
            fut.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fut


def _print_banner(
    args: argparse.Namespace,
    site_id: str,
    prefix: str,
    sim: WarehouseScales,
    password: str,
    env_file: Path,
    tokens: dict[str, str] | None = None,
    broker: DemoBroker | None = None,
) -> None:
    api = f"http://{args.api_bind}"
    tokens = tokens or {}
    token_lines = [f"    {role:<11} {token}" for role, token in tokens.items()]
    if tokens:
        token_lines.insert(0, "  API tokens (new each run; header 'Authorization: Bearer TOKEN'):")
        first = next(iter(tokens.values()))
        example = shlex.join(
            ["curl", "-H", f"Authorization: Bearer {first}", f"{api}/api/v1/stock"]
        )
        token_lines.append(f"  try:     {example}")
    if broker is not None and broker.kind == "mosquitto":
        broker_note = "mosquitto, MQTT 5 and 3.1.1"
    else:
        broker_note = "amqtt, MQTT 3.1.1 only; loses unacknowledged messages on reconnect"
    alerts = f"{prefix}/{site_id}/alerts/#"
    sub = shlex.join(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(args.broker_port),
            "-V",
            "mqttv311",
            "-u",
            DEMO_USER,
            "-P",
            password,
            "-t",
            alerts,
            "-v",
        ]
    )
    print(
        "\n".join(
            [
                "",
                f"Floorhand demo is running: site {site_id!r}, {len(sim.scale_ids)} scales, "
                f"{len(sim.shelf_ids)} shelves, speed {args.speed:g}",
                f"  dashboard: {api}/dashboard/  (sign in with a token below)",
                f"  stock:   {api}/api/v1/stock",
                f"  alerts:  {api}/api/v1/alerts",
                f"  orders:  {api}/api/v1/orders   (pack/ship: POST …/orders/ID/pack, /ship)",
                f"  health:  {api}/api/v1/health",
                f"  docs:    {api}/docs",
                *token_lines,
                f"  MQTT:    mqtt://127.0.0.1:{args.broker_port}  user {DEMO_USER}  "
                f"password {password}  ({broker_note})",
                f"  alerts on MQTT:  {sub}",
                f"  journal: {args.var_dir / 'journal.sqlite'}   env: {env_file}",
                "  Ctrl-C stops everything.",
                "",
            ]
        ),
        flush=True,
    )


async def _run_until_stopped(
    args: argparse.Namespace,
    stop: asyncio.Event,
    controller: asyncio.subprocess.Process,
    sim: WarehouseScales,
    floor: FloorSystem | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    started = loop.time()
    end = started + args.duration if args.duration is not None else None
    next_progress = started + PROGRESS_EVERY_S
    exited = asyncio.ensure_future(controller.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            wake_at = next_progress if end is None else min(next_progress, end)
            await asyncio.wait(
                {exited, stopped},
                timeout=max(0.0, wake_at - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if stopped.done():
                print("stopping ...", flush=True)
                return 0
            if exited.done():
                print(
                    f"error: controller exited with code {controller.returncode}", file=sys.stderr
                )
                return 1
            now = loop.time()
            if end is not None and now >= end:
                return 0
            if now >= next_progress:
                s = int(now - started)
                print(f"[demo {s // 60:02d}:{s % 60:02d}] {sim.stats().summary()}", flush=True)
                if floor is not None:
                    print(f"[demo {s // 60:02d}:{s % 60:02d}] {floor.stats.summary()}", flush=True)
                next_progress += PROGRESS_EVERY_S
    finally:
        for fut in (exited, stopped):
            fut.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fut


def main(argv: Sequence[str] | None = None) -> int:
    from simulators.broker import add_broker_arguments, broker_main

    parser = argparse.ArgumentParser(prog="python -m simulators", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bp = sub.add_parser("broker", help="run the embedded amqtt broker (127.0.0.1 only)")
    add_broker_arguments(bp)
    bp.set_defaults(func=broker_main)
    add_scales_command(sub)
    add_demo_command(sub)
    from simulators.plc import add_plcs_arguments, plcs_main

    pp = sub.add_parser("plcs", help="run the site's [[plcs]] (Modbus TCP PLCs) on 127.0.0.1")
    add_plcs_arguments(pp)
    pp.set_defaults(func=plcs_main)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code
