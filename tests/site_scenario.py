"""The large-site scenario of issue 12 ("Done means"), one code path at any size.

A site of N SKUs + N shelves + N scales is generated (``tests.sites.write_small_site`` with
``catalogue_csv``: the site file holds only the topology, the catalogue goes into the journal
through ``floorhand catalog import``), with a conveyor and a sorter PLC (the project's Modbus
simulators, `simulators.modbus_host.PlcHost`, on 127.0.0.1) that every zone feeds and a pack
station on sorter lane 3. Then, each step against the real controller process
(``floorhand run``, tests/controller_proc.py) and a private mosquitto:

1. ``site``: generate the files, import the catalogue (a child process of the real CLI);
2. ``start``: start the controller, wait for ``/api/v1/ready`` and both PLC links up;
3. ``ingest``: every scale publishes 8 settled readings (30 units) over MQTT (paho, one JSON
   batch per scale); wait until ``/api/v1/zones`` counts N shelves OK, then read every SKU
   from the paged ``/api/v1/stock`` (``counted``: SKUs at 30 units, state ok);
4. ``alerts``: ``low`` shelves spread over the zones drop to 5 units (reorder point 10); wait
   until the active alerts (paged ``/api/v1/alerts?active=true``) are exactly their SKUs;
5. ``pick``: an order of two lines (SKUs in the first and the last zone, 4 units each) over
   ``POST /api/v1/picks`` with the floor token; the sorter diverts both totes, the scales show
   the 4 units gone, the order is SORTED; the Modbus writes are read from the simulators;
6. ``dashboard``: the dashboard in headless chromium (``/dashboard/?scope=overview``, the
   site overview at any size): the heading counts N shelves in the zones, a tile per zone with
   its LOW shelves, the alert count.

Each step records its wall time, the controller's RSS after it and whether it passed; a step
that fails stops the run (the later ones depend on it). Used by
tests/integration/test_site_scenario.py (CI size) and benchmarks/site_scenario.py (100k).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.sorter import SorterPlc
from tests.controller_proc import ROOT, SHARED_SSL, ControllerProcess
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import TOKENS, auth_headers, grams, topic, write_small_site, zone_of
from tests.waiting import wait_for_condition

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
READINGS_PER_SCALE = 8
"""Settled readings per scale per step (as tests/integration/test_dashboard_large.py)."""
START_UNITS = 30
LOW_UNITS = 5  # below the reorder point (10), above the safety stock (3): state "low"
PICK_QTY = 4
PACK_LANE = 3
PUBLISH_CHUNK = 20_000
"""Messages per paho connection: paho numbers queued messages with 16-bit packet ids, so more
than 65,535 queued at once would reuse ids still in flight."""
PAGE_LIMIT = 5_000


@dataclass
class Step:
    """One step of the scenario as it ran."""

    name: str
    ok: bool = False
    wall_s: float = 0.0
    rss_mb: float | None = None
    """The controller's resident memory right after the step (None before it runs)."""
    detail: str = ""


@dataclass
class ScenarioResult:
    """What the scenario saw; ``steps`` in order, the rest the observations its checks use."""

    skus: int
    zones: int
    steps: list[Step] = field(default_factory=list)
    error: str | None = None
    """The first failure (the step that raised and why); None when every step ran."""
    counted: int = 0
    """SKUs of ``/api/v1/stock`` at ``START_UNITS`` and state ok after ingest."""
    driven_low: set[str] = field(default_factory=set)
    alerted: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Active alerts after the alert step: SKU → (state, level)."""
    order: dict[str, Any] | None = None
    sorter_submits: list[tuple[int, int]] = field(default_factory=list)
    """(cmd_id, lane) of every mailbox write with strobe SUBMIT the sorter simulator applied."""
    sorter_executions: dict[int, int] = field(default_factory=dict)
    conveyor_commands: list[str] = field(default_factory=list)
    overview: dict[str, Any] = field(default_factory=dict)
    """The dashboard as rendered: ``head``, ``tiles`` (zone → its counts text), ``alert_count``,
    ``first_render_ms``, ``page_errors``."""

    @property
    def ok(self) -> bool:
        return self.error is None and all(s.ok for s in self.steps)

    def expected_tiles(self) -> dict[str, str]:
        """The overview's counts text per zone that the alert step should produce."""
        per_zone = Counter(zone_of(int(sku[1:]), self.skus, self.zones) for sku in self.driven_low)
        names = ["Z"] if self.zones == 1 else [f"Z{z}" for z in range(self.zones)]
        return {z: f"{per_zone[z]:,} LOW" if per_zone[z] else "all OK" for z in names}


class StepFailed(Exception):
    """A step's check did not hold; the message says what was seen."""


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MB (``VmRSS``), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e3
    except OSError:
        return None
    return None


def write_scenario_site(
    folder: Path,
    *,
    skus: int,
    zones: int,
    mqtt_port: int,
    conveyor_port: int,
    sorter_port: int,
    timeout_s: float,
) -> Path:
    """The site file (topology: zones feeding ``conveyor-1`` into ``sorter-1``, pack station
    ``PS1`` on lane 3, the two PLCs) and ``catalogue.csv`` beside it (N SKUs, scales, shelves
    spread over ``zones`` in consecutive runs, ``tests.sites.zone_of``)."""
    path = write_small_site(
        folder,
        mqtt_port=mqtt_port,
        scales=skus,
        zones=zones,
        catalogue_csv=True,
        client_id=f"scenario-{time.monotonic_ns()}",
        dwell_s=0.5,
        reporting_interval_s=3600.0,  # nothing goes stale while the scenario runs
        keepalive_s=30.0,
    )
    text = re.sub(
        r'^(id = "Z\d*")$',
        r'\1\nconveyors = ["conveyor-1"]\nsorter = "sorter-1"',
        path.read_text(),
        flags=re.MULTILINE,
    )
    text += f"""

[picking]
scale_timeout_s = {timeout_s}
result_timeout_s = {timeout_s}

[[plcs]]
id = "conveyor-1"
kind = "conveyor"
port = {conveyor_port}
timeout_s = 1.0

[[plcs]]
id = "sorter-1"
kind = "sorter"
port = {sorter_port}
lanes = 8
timeout_s = 1.0

[[pack_stations]]
id = "PS1"
sorter = "sorter-1"
lane = {PACK_LANE}
"""
    path.write_text(text)
    return path


def scale_batches(
    indexes: list[int], skus: int, zones: int, *, first_seq: int, units: int, t0: float
) -> list[tuple[str, bytes]]:
    """One MQTT message per scale ``s<i>``: a JSON batch of ``READINGS_PER_SCALE`` settled
    readings of ``units`` (seq from ``first_seq``, 50 ms apart from ``t0``)."""
    return [
        (
            topic(f"s{i}", zone_of(i, skus, zones)),
            orjson.dumps(
                [
                    {"device": f"s{i}", "seq": first_seq + k, "ts": t0 + k * 0.05,
                     "grams": grams(units)}
                    for k in range(READINGS_PER_SCALE)
                ]
            ),
        )
        for i in indexes
    ]  # fmt: skip


def low_indexes(skus: int, low: int) -> list[int]:
    """``low`` shelves spread evenly over the site (so over every zone)."""
    step = skus // low
    return [k * step + step // 2 for k in range(low)]


class _Api:
    """The controller's API with the test tokens (tests/sites.py)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def get(self, path: str, role: str = "supervisor", **params: Any) -> Any:
        r = await self.client.get(path, params=params, headers=auth_headers(role))
        r.raise_for_status()
        return r.json()

    async def pages(self, path: str, role: str = "supervisor", **params: Any) -> list[Any]:
        """Every item of a paged list read (docs/api.md, "Pages")."""
        items: list[Any] = []
        query: dict[str, Any] = {**params, "limit": PAGE_LIMIT}
        while True:
            r = await self.client.get(path, params=query, headers=auth_headers(role))
            r.raise_for_status()
            items += r.json()
            if "x-next-cursor" not in r.headers:
                return items
            query["cursor"] = r.headers["x-next-cursor"]


async def _publish(port: int, messages: list[tuple[str, bytes]], client_id: str) -> None:
    for start in range(0, len(messages), PUBLISH_CHUNK):
        chunk = messages[start : start + PUBLISH_CHUNK]
        await asyncio.to_thread(paho_publish, port, chunk, client_id=client_id, timeout_s=120.0)


async def _import_catalogue(site: Path, csv: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "catalog",
        "import",
        str(csv),
        "--site",
        str(site),
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise StepFailed(f"catalog import exited {proc.returncode}: {err.decode()[-2000:]}")
    lines = (out.decode() + err.decode()).strip().splitlines()
    return lines[-1] if lines else ""


class _Runner:
    def __init__(self, result: ScenarioResult, say: Callable[[str], None]) -> None:
        self.result = result
        self.say = say
        self.pid: int | None = None

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[Step]:
        step = Step(name)
        t0 = time.perf_counter()
        try:
            yield step
        except Exception as exc:
            step.ok = False
            step.detail = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            step.wall_s = time.perf_counter() - t0
            step.rss_mb = rss_mb(self.pid) if self.pid is not None else None
            self.result.steps.append(step)
            rss = f"{step.rss_mb:.0f} MB" if step.rss_mb is not None else "-"
            verdict = "pass" if step.ok else "FAIL"
            self.say(f"  {name:<9} {verdict}  {step.wall_s:7.2f} s  RSS {rss:>7}  {step.detail}")


async def run_site_scenario(
    folder: Path,
    *,
    skus: int,
    zones: int = 8,
    low: int | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> ScenarioResult:
    """Run every step in ``folder`` (site, journal, logs); stop everything it started (by PID)
    before returning. A failed step ends the run: ``result.error`` names it."""
    low = low if low is not None else max(8, min(1_000, skus // 100))
    if not 0 < low <= skus // 4 or skus < 4 * zones:
        raise ValueError("need skus >= 4 * zones and 0 < low <= skus / 4")
    result = ScenarioResult(skus=skus, zones=zones)
    run = _Runner(result, say)
    timeout_s = 60.0 + skus * 0.003
    ctl: ControllerProcess | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            broker = MosquittoBroker(folder / "mosquitto")
            await broker.start()
            stack.push_async_callback(broker.close)
            conveyor = ConveyorPlc("conveyor-1")
            sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
            conveyor_host = await stack.enter_async_context(PlcHost(conveyor, seed=1))
            sorter_host = await stack.enter_async_context(PlcHost(sorter, seed=2))

            async with run.step("site") as step:
                site = write_scenario_site(
                    folder,
                    skus=skus,
                    zones=zones,
                    mqtt_port=broker.port,
                    conveyor_port=conveyor_host.port,
                    sorter_port=sorter_host.port,
                    timeout_s=timeout_s,
                )
                import_s = time.perf_counter()
                said = await _import_catalogue(site, folder / "catalogue.csv")
                import_s = time.perf_counter() - import_s
                step.ok = True
                step.detail = (
                    f"{skus:,} SKUs/scales/shelves in {zones} zones; import {import_s:.2f} s "
                    f"({said.strip()})"
                )

            ctl = ControllerProcess(site, folder)
            stack.push_async_callback(ctl.stop)
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=ctl.base, timeout=30.0, verify=SHARED_SSL)
            )
            api = _Api(client)

            async with run.step("start") as step:
                ready_s = await ctl.start(ready_timeout_s=timeout_s)
                assert ctl.proc is not None
                run.pid = ctl.proc.pid

                async def plcs() -> dict[str, Any]:
                    return dict((await api.get("/api/v1/health"))["plcs"])

                await wait_for_condition(
                    plcs,
                    timeout_s,
                    what="both PLC links up",
                    until=lambda p: all(v["link"] == "up" for v in p.values()) and len(p) == 2,
                    interval_s=0.1,
                    context=ctl.tail,
                )
                step.ok = True
                step.detail = f"ready after {ready_s:.2f} s, PLC links up"

            async with run.step("ingest") as step:
                t0 = time.time() - 2.0
                msgs = scale_batches(
                    list(range(skus)), skus, zones, first_seq=0, units=START_UNITS, t0=t0
                )
                published_s = time.perf_counter()
                await _publish(broker.port, msgs, "scenario-ingest")
                published_s = time.perf_counter() - published_s
                del msgs

                async def shelves_ok() -> int:
                    got = await api.get("/api/v1/zones")
                    return sum(int(z["shelf_status"].get("ok", 0)) for z in got)

                await wait_for_condition(
                    shelves_ok,
                    timeout_s,
                    what=f"{skus} shelves OK in /api/v1/zones",
                    until=lambda n: n == skus,
                    interval_s=0.2,
                    context=ctl.tail,
                )
                stock = await api.pages("/api/v1/stock")
                result.counted = sum(
                    1 for s in stock if s["level"] == START_UNITS and s["state"] == "ok"
                )
                step.ok = result.counted == skus == len(stock)
                step.detail = (
                    f"{skus:,} messages ({skus * READINGS_PER_SCALE:,} readings) published in "
                    f"{published_s:.2f} s; {result.counted:,} of {len(stock):,} SKUs at "
                    f"{START_UNITS} units"
                )
                if not step.ok:
                    raise StepFailed(step.detail)

            low_at = low_indexes(skus, low)
            result.driven_low = {f"K{i}" for i in low_at}
            async with run.step("alerts") as step:
                msgs = scale_batches(
                    low_at, skus, zones, first_seq=READINGS_PER_SCALE, units=LOW_UNITS,
                    t0=time.time() - 0.5,
                )  # fmt: skip
                await _publish(broker.port, msgs, "scenario-alerts")

                async def active() -> dict[str, tuple[str, int]]:
                    got = await api.pages("/api/v1/alerts", active="true")
                    return {a["sku"]: (a["state"], a["level"]) for a in got}

                result.alerted = await wait_for_condition(
                    active,
                    timeout_s,
                    what=f"{low} active alerts",
                    until=lambda got: len(got) >= low,
                    interval_s=0.2,
                    context=ctl.tail,
                )
                want = dict.fromkeys(result.driven_low, ("low", LOW_UNITS))
                step.ok = result.alerted == want
                step.detail = f"{len(result.alerted)} active alerts for {low} shelves driven low"
                if not step.ok:
                    raise StepFailed(f"{step.detail}: {sorted(result.alerted.items())[:10]}")

            async with run.step("pick") as step:
                await _pick(result, api, ctl, broker, sorter, conveyor, low_at, timeout_s)
                step.ok = True
                step.detail = (
                    f"order {result.order and result.order['order_id']} SORTED; "
                    f"sorter submits {result.sorter_submits}, conveyor {result.conveyor_commands}"
                )

            async with run.step("dashboard") as step:
                await _dashboard(result, ctl)
                step.ok = True
                step.detail = (
                    f"{result.overview['head']!r}; first render "
                    f"{result.overview['first_render_ms']:.0f} ms"
                )
    except Exception as exc:
        failed = next((s.name for s in result.steps if not s.ok), "setup")
        result.error = f"{failed}: {type(exc).__name__}: {exc}"
    return result


async def _pick(
    result: ScenarioResult,
    api: _Api,
    ctl: ControllerProcess,
    broker: MosquittoBroker,
    sorter: SorterPlc,
    conveyor: ConveyorPlc,
    low_at: list[int],
    timeout_s: float,
) -> None:
    skus = result.skus
    picked = [i for i in (1, skus - 2) if i not in set(low_at)]
    if len(picked) != 2:
        raise StepFailed(f"the picked shelves {picked} overlap the low ones")
    body = {
        "order_id": "SCENARIO-1",
        "lines": [{"sku": f"K{i}", "qty": PICK_QTY} for i in picked],
        "pack_station": "PS1",
    }
    headers = {**auth_headers("floor"), "Idempotency-Key": "scenario-1"}
    r = await api.client.post("/api/v1/picks", json=body, headers=headers)
    if r.status_code != 201:
        raise StepFailed(f"POST /api/v1/picks answered {r.status_code}: {r.text}")
    order_id = r.json()["order_id"]

    async def order() -> dict[str, Any]:
        got: dict[str, Any] = await api.get(f"/api/v1/orders/{order_id}", role="floor")
        return got

    await wait_for_condition(
        order,
        timeout_s,
        what="both totes diverted by the sorter",
        until=lambda o: [t["result"] for t in o["tasks"]] == ["DIVERTED", "DIVERTED"],
        interval_s=0.1,
        context=ctl.tail,
    )
    # The picker takes the units: each scale shows PICK_QTY fewer (the confirmation).
    msgs = scale_batches(
        picked, skus, result.zones, first_seq=READINGS_PER_SCALE,
        units=START_UNITS - PICK_QTY, t0=time.time() - 0.5,
    )  # fmt: skip
    await _publish(broker.port, msgs, "scenario-pick")
    result.order = await wait_for_condition(
        order,
        timeout_s,
        what=f"order {order_id} SORTED",
        until=lambda o: o["state"] in ("SORTED", "EXCEPTION", "CANCELLED"),
        interval_s=0.1,
        context=ctl.tail,
    )
    strobe_submit = sorter.map["mb_strobe"].value_of("SUBMIT")
    result.sorter_submits = [
        (int(w["mb_cmd_id"]), int(w["mb_lane"]))
        for _, w in sorter.writes
        if w.get("mb_strobe") == strobe_submit
    ]
    cmd_ids = [int(t["cmd_id"]) for t in result.order["tasks"]]
    result.sorter_executions = {c: sorter.executions[c] for c in cmd_ids}
    command = conveyor.map["command"]
    result.conveyor_commands = [
        command.name_of(int(w["command"])) or str(w["command"])
        for _, w in conveyor.writes
        if "command" in w
    ]
    tasks = [(t["state"], t["result"], t["lane"]) for t in result.order["tasks"]]
    if result.order["state"] != "SORTED" or tasks != [("CONFIRMED", "DIVERTED", PACK_LANE)] * 2:
        raise StepFailed(f"order {result.order['state']}, tasks {tasks}")
    if sorted(result.sorter_submits) != sorted((c, PACK_LANE) for c in cmd_ids):
        raise StepFailed(f"sorter submits {result.sorter_submits} for tasks {cmd_ids}")
    if set(result.sorter_executions.values()) != {1}:
        raise StepFailed(f"sorter executions {result.sorter_executions}")
    if not result.conveyor_commands:
        raise StepFailed("no command written to the conveyor")


async def _dashboard(result: ScenarioResult, ctl: ControllerProcess) -> None:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # never download a browser
    from playwright.async_api import async_playwright, expect

    if not HAVE_CHROMIUM:
        raise StepFailed(f"{CHROMIUM} missing: run scripts/system-deps (Debian package chromium)")
    timeout_ms = 20_000 + result.skus // 5
    errors: list[str] = []
    async with async_playwright() as pw:
        # Root in a container has no user namespaces for chromium's sandbox.
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, chromium_sandbox=False
        )
        try:
            page = await browser.new_page(viewport={"width": 1366, "height": 768})
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            # History is off on this site: its 404s are expected ("live values only").
            page.on(
                "response",
                lambda r: (
                    errors.append(f"HTTP {r.status} {r.url}")
                    if r.status >= 400 and "/api/v1/history" not in r.url
                    else None
                ),
            )
            await page.goto(f"{ctl.base}/dashboard/?scope=overview#token={TOKENS['supervisor']}")
            await expect(page.locator("#conn")).to_have_text("Live", timeout=timeout_ms)
            head = page.locator("#overview .overview-head")
            want_head = f"{result.skus:,} shelves in {result.zones} zones"
            await expect(head).to_contain_text(want_head, timeout=timeout_ms)
            tiles = page.locator("#overview .zone-tile")
            await expect(tiles).to_have_count(result.zones, timeout=timeout_ms)
            await expect(page.locator("#alert-count")).to_have_text(
                str(len(result.driven_low)), timeout=timeout_ms
            )
            shown: dict[str, str] = {}
            for tile in await tiles.all():
                zone = await tile.get_attribute("data-zone")
                shown[str(zone)] = await tile.locator(".zone-counts").inner_text()
            result.overview = {
                "head": await head.inner_text(),
                "tiles": shown,
                "alert_count": int(await page.locator("#alert-count").inner_text()),
                "first_render_ms": await page.evaluate(
                    "() => window.__floorhand.perf.firstRenderMs"
                ),
                "page_errors": errors,
            }
            await page.screenshot(path=str(result_screenshot(ctl.folder)), full_page=True)
        finally:
            await browser.close()
    if shown != result.expected_tiles():
        raise StepFailed(f"overview tiles {shown}, expected {result.expected_tiles()}")
    if errors:
        raise StepFailed(f"the page reported errors: {errors[:5]}")


def result_screenshot(folder: Path) -> Path:
    """Where the dashboard step leaves its screenshot."""
    return folder / "dashboard-overview.png"
