"""The dashboard with a 2,000-shelf site in headless chromium: first render, cost of updates.

Real mosquitto and the real controller (``python -m controller run``, child process); readings
are published over MQTT so every shelf has a count (a mix of OK, LOW, CRITICAL and OUT). The page
(Debian's /usr/bin/chromium driven by Playwright, never a downloaded browser) measures itself
with ``performance.now()`` (``window.__floorhand.perf``):

* first render: from navigation start to the grid built from the snapshot (``firstRenderMs``)
  and to the end of that frame, its style, layout and paint (``firstPaintMs``); the grid build
  alone;
* zone drill-down (a site above 5,000 shelves opens on the overview, or any size with
  ``--scope overview``): after each load, once the page is idle (no request for 500 ms, the side
  panels drawn), a zone tile is clicked; from the click (the ``subscribe`` sent) to the zone's
  snapshot received (``drillSnapshotMs``: the controller and the network), to its virtual grid
  built from it (``drillMs``), to the end of that frame (``drillPaintMs``:
  what a supervisor sees first), and to the end of the next frame, with the side panels redrawn
  for the zone (``drillSettledMs``); how many cells the first frame drew;
  ``--trace FILE`` records a Chromium trace of a drill-down per viewport and prints where the
  page's main thread spent the time from the click to the paint;
* updates: ``--changes`` shelves change count per round (6 readings each over MQTT; in the
  overview scope, shelves of the zone opened, Z0); the page's time handling the live messages
  plus its render frames, per 100 shelf/alert events, the longest frame, and main-thread long
  tasks (> 50 ms) seen during the updates.

    python benchmarks/dashboard_render.py                 # 2,000 shelves, 3 loads, 3 rounds
    python benchmarks/dashboard_render.py --shelves 10000 --changes 200   # overview + drill-down
    python benchmarks/dashboard_render.py --shelves 500 --changes 100 --scope overview
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
import orjson  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402

from benchmarks.ws_fanout import TOKEN, write_big_site  # noqa: E402
from tests.controller_proc import ControllerProcess  # noqa: E402
from tests.mosquitto import paho_publish, running_mosquitto  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
READINGS = 6


def shelf_readings(
    shelves: int, zones: int, units_of: dict[int, int], seqs: dict[int, int]
) -> list[tuple[str, bytes]]:
    """``READINGS`` steady readings (stamped now) per shelf in ``units_of``."""
    now = time.time()
    out = []
    for i, units in units_of.items():
        zone = f"Z{i * zones // shelves}"
        for k in range(READINGS):
            seq = seqs.get(i, 0)
            seqs[i] = seq + 1
            body = {"device": f"s{i}", "seq": seq, "ts": now + k * 0.01, "grams": 500 + units * 100}
            out.append((f"fh/bench/{zone}/scale/s{i}", orjson.dumps(body)))
    return out


def initial_units(i: int) -> int:
    """A site that needs attention here and there: 5 % out, 5 % critical, 10 % low."""
    r = (i * 7919) % 100
    return 0 if r < 5 else 2 if r < 10 else 8 if r < 20 else 25


async def wait_applied(base: str, seqs: dict[int, int], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
        while True:
            have: dict[str, int | None] = {}
            params: dict[str, str | int] = {"limit": 5000}
            while True:  # every page (docs/api.md, "Pages")
                r = await client.get("/api/v1/devices", params=params)
                r.raise_for_status()
                have.update((d["id"], d["last_seq"]) for d in r.json())
                if "x-next-cursor" not in r.headers:
                    break
                params["cursor"] = r.headers["x-next-cursor"]
            if all(have.get(f"s{i}") == s - 1 for i, s in seqs.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("readings not applied in time")
            await asyncio.sleep(0.2)  # polling another process, bounded


async def page_perf(page: Any) -> dict[str, Any]:
    perf: dict[str, Any] = await page.evaluate("() => ({...window.__floorhand.perf})")
    return perf


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"shelves": args.shelves, "loads": [], "rounds": []}
    with tempfile.TemporaryDirectory(prefix="dash-render-") as tmp:
        folder = Path(tmp)
        async with running_mosquitto(folder / "mosquitto") as broker:
            site = write_big_site(
                folder, shelves=args.shelves, zones=args.zones, mqtt_port=broker.port, token=TOKEN
            )
            ctl = ControllerProcess(site, folder)
            await ctl.start(ready_timeout_s=120)
            try:
                seqs: dict[int, int] = {}
                units = {i: initial_units(i) for i in range(args.shelves)}
                msgs = shelf_readings(args.shelves, args.zones, units, seqs)
                await asyncio.to_thread(paho_publish, broker.port, msgs, timeout_s=120)
                await wait_applied(ctl.base, seqs)
                await browse(args, ctl, broker.port, seqs, units, results)
            finally:
                await ctl.stop()
    return results


async def browse(
    args: argparse.Namespace,
    ctl: ControllerProcess,
    mqtt_port: int,
    seqs: dict[int, int],
    units: dict[int, int],
    results: dict[str, Any],
) -> None:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, chromium_sandbox=False
        )
        try:
            query = "" if args.scope == "default" else f"?scope={args.scope}"
            url = f"{ctl.base}/dashboard/{query}#token={TOKEN}"
            for viewport in ({"width": 1366, "height": 768}, {"width": 820, "height": 1180}):
                for n in range(args.loads):
                    page = await browser.new_page(viewport=viewport)
                    await page.goto(url)
                    await page.wait_for_function(
                        "() => window.__floorhand.perf.firstPaintMs !== null", timeout=60_000
                    )
                    perf = await page_perf(page)
                    kind = await page.evaluate("() => window.__floorhand.store.scope.kind")
                    cells = await page.locator(".cell").count()
                    tiles = await page.locator("#overview .zone-tile").count()
                    assert (cells, tiles) == (
                        (args.shelves, 0) if kind == "site" else (0, args.zones)
                    )
                    load = {
                        "viewport": f"{viewport['width']}x{viewport['height']}",
                        "scope": kind,
                        "first_render_ms": perf["firstRenderMs"],
                        "first_paint_ms": perf["firstPaintMs"],
                        "grid_build_ms": perf["buildMs"],
                    }
                    if kind == "overview":
                        trace = (
                            f"{args.trace.removesuffix('.json')}-{load['viewport']}.json"
                            if args.trace and n == 0
                            else None
                        )
                        load.update(await drill_down(page, f"Z{n % args.zones}", trace))
                    results["loads"].append(load)
                    print(json.dumps(load), flush=True)
                    await page.close()
            page = await browser.new_page(viewport={"width": 1366, "height": 768})
            await page.goto(url)
            await page.wait_for_function(
                "() => window.__floorhand.perf.firstPaintMs !== null", timeout=60_000
            )
            if await page.evaluate("() => window.__floorhand.store.scope.kind") == "overview":
                await drill_down(page, "Z0")  # the rounds change shelves of Z0
            for r in range(args.rounds):
                await one_round(args, page, mqtt_port, seqs, units, r, results)
        finally:
            await browser.close()


async def drill_down(page: Any, zone: str, trace: str | None = None) -> dict[str, Any]:
    """Click the tile of ``zone``; the page's drill-down times and the cells it drew.

    ``trace``: record a Chromium performance trace of the drill-down into this file and print
    where the page's main thread spent the time between the click and the paint."""
    # A supervisor clicks a page that has settled: its alert and low-stock pages read and drawn.
    await page.wait_for_load_state("networkidle")
    await page.evaluate("() => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)))")
    if trace:
        await page.context.browser.start_tracing(page=page, path=trace, categories=TRACE_CATEGORIES)
    await page.click(f'#overview .zone-tile[data-zone="{zone}"]')
    await page.wait_for_function(
        "() => window.__floorhand.perf.drillPaintMs !== null", timeout=60_000
    )
    if trace:
        await page.context.browser.stop_tracing()
        print_breakdown(trace_breakdown(Path(trace)))
    await page.wait_for_function(  # (a page of before drillSettledMs has no such key)
        "() => { const p = window.__floorhand.perf;"
        " return !('drillSettledMs' in p) || p.drillSettledMs !== null; }",
        timeout=60_000,
    )
    perf = await page_perf(page)
    return {
        "drill_zone": zone,
        "drill_snapshot_ms": perf.get("drillSnapshotMs"),
        "drill_ms": perf["drillMs"],
        "drill_paint_ms": perf["drillPaintMs"],
        "drill_settled_ms": perf.get("drillSettledMs"),
        "drill_paint_cells": perf.get("drillPaintCells"),
        "drill_cells_in_dom": await page.locator(".cell").count(),
    }


TRACE_CATEGORIES = [
    "devtools.timeline",
    "disabled-by-default-devtools.timeline",
    "disabled-by-default-devtools.timeline.frame",
    "blink.user_timing",
    "toplevel",
    "v8",
    "v8.execute",
    "blink",
    "cc",
    "gpu",
]
# Main-thread events worth naming in the breakdown (inclusive times; JS nests styles/layouts
# it forces, so a Layout inside a FunctionCall is counted as "forced" too).
TRACE_NAMES = (
    "RunTask",
    "FunctionCall",
    "EvaluateScript",
    "v8.compile",
    "FireAnimationFrame",
    "TimerFire",
    "EventDispatch",
    "XHRReadyStateChange",
    "ParseHTML",
    "UpdateLayoutTree",
    "Layout",
    "PrePaint",
    "Paint",
    "Layerize",
    "Commit",
    "MinorGC",
    "MajorGC",
    "V8.GC_SCAVENGER",
    "V8.GC_MARK_COMPACTOR",
    "HitTest",
    "ScheduleStyleRecalculation",
    "BeginMainThreadFrame",
    "v8.callFunction",
)


def trace_breakdown(path: Path) -> dict[str, Any]:
    """The page's main thread between the ``drill:click`` and ``drill:painted`` marks."""
    raw = json.loads(path.read_text())
    events = raw["traceEvents"] if isinstance(raw, dict) else raw
    marks = {
        e["name"]: (e["ts"], e["pid"], e["tid"])
        for e in events
        if e.get("name", "").startswith("drill:") and e.get("ph") in ("R", "I", "i", "n", "X")
    }
    if "drill:click" not in marks or "drill:painted" not in marks:
        return {"error": f"marks missing: {sorted(marks)}"}
    t0, pid, tid = marks["drill:click"]
    t1 = marks["drill:painted"][0]
    spans: list[tuple[str, float, float, dict[str, Any]]] = []
    open_: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("pid") != pid or e.get("tid") != tid:
            continue
        ph = e.get("ph")
        if ph == "X" and "dur" in e:
            spans.append((e["name"], e["ts"], e["ts"] + e["dur"], e.get("args", {})))
        elif ph == "B":
            open_.setdefault(e["name"], []).append(e)
        elif ph == "E" and open_.get(e["name"]):
            begin = open_[e["name"]].pop()
            args = {**begin.get("args", {}), **e.get("args", {})}
            spans.append((e["name"], begin["ts"], e["ts"], args))
    spans = [x for x in spans if x[2] > t0 and x[1] < t1]
    spans.sort(key=lambda x: (x[1], -x[2]))
    totals: dict[str, float] = {}
    for name, a, b, _ in spans:
        if name in TRACE_NAMES:
            totals[name] = totals.get(name, 0.0) + (min(b, t1) - max(a, t0)) / 1000
    js = [
        (a, b)
        for name, a, b, _ in spans
        if name in ("FunctionCall", "EvaluateScript", "v8.callFunction")
    ]
    forced = 0.0
    for name, a, b, _ in spans:
        if name in ("UpdateLayoutTree", "Layout") and any(ja <= a and b <= jb for ja, jb in js):
            forced += (b - a) / 1000
    tasks = []
    for name, a, b, _ in spans:
        if name != "RunTask" or (b - a) < 5000:
            continue
        inner = [
            x
            for x in spans
            if x[0] in TRACE_NAMES and x[0] != "RunTask" and a <= x[1] and x[2] <= b
        ]
        top: dict[str, float] = {}
        for n, ia, ib, _args in inner:
            top[n] = top.get(n, 0.0) + (ib - ia) / 1000
        detail = sorted(top.items(), key=lambda kv: -kv[1])[:6]
        tasks.append({"at_ms": (a - t0) / 1000, "ms": (b - a) / 1000, "inside": detail})
    styles = [
        (args.get("elementCount") or (args.get("data") or {}).get("elementCount"), (b - a) / 1000)
        for name, a, b, args in spans
        if name == "UpdateLayoutTree"
    ]
    layouts = [
        ((args.get("beginData") or {}).get("totalObjects"), (b - a) / 1000)
        for name, a, b, args in spans
        if name == "Layout"
    ]
    built = marks.get("drill:built", (None,))[0]
    return {
        "window_ms": (t1 - t0) / 1000,
        "built_at_ms": (built - t0) / 1000 if built else None,
        "totals_ms": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
        "forced_style_layout_ms": forced,
        "tasks_over_5ms": tasks,
        "style_recalcs": styles,
        "layouts": layouts,
    }


def print_breakdown(b: dict[str, Any]) -> None:
    print("trace of the drill-down (page main thread, click → paint):", flush=True)
    for k, v in b.items():
        if k == "tasks_over_5ms":
            for t in v:
                inside = ", ".join(f"{n} {ms:.1f}" for n, ms in t["inside"])
                print(f"  task at {t['at_ms']:.1f} ms: {t['ms']:.1f} ms [{inside}]", flush=True)
        else:
            print(f"  {k}: {v}", flush=True)


async def one_round(
    args: argparse.Namespace,
    page: Any,
    mqtt_port: int,
    seqs: dict[int, int],
    units: dict[int, int],
    r: int,
    results: dict[str, Any],
) -> None:
    await page.evaluate(
        """() => { const p = window.__floorhand.perf;
        Object.assign(p, {events: 0, handleMs: 0, renderMs: 0, renders: 0, frames: 0,
                          messages: 0, maxRenderMs: 0, longTasks: 0, longTaskMs: 0}); }"""
    )
    zone = await page.evaluate("() => window.__floorhand.store.scope")
    # In a zone, only its shelves reach the page: change those (Z0 is the first run of them).
    pool = args.shelves if zone["kind"] == "site" else args.shelves // args.zones
    step = max(1, pool // args.changes)
    changed = {i: (units[i] + 13 + r) % 40 for i in range(r % step, pool, step)}
    changed = dict(list(changed.items())[: args.changes])
    units.update(changed)
    msgs = shelf_readings(args.shelves, args.zones, changed, seqs)
    t0 = time.perf_counter()
    await asyncio.to_thread(paho_publish, mqtt_port, msgs, timeout_s=120)
    want = {f"sh{i}": u for i, u in changed.items()}
    await page.wait_for_function(
        """(want) => { const s = window.__floorhand.store.shelves;
        return Object.entries(want).every(([id, u]) => s.get(id).units === u); }""",
        arg=want,
        timeout=120_000,
    )
    # The last render of the round happens in the frame after the last message.
    await page.evaluate("() => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)))")
    seen_s = time.perf_counter() - t0
    perf = await page_perf(page)
    events = perf["events"]
    total_ms = perf["handleMs"] + perf["renderMs"]
    row = {
        "round": r,
        "shelves_changed": len(changed),
        "events": events,
        "frames": perf["frames"],
        "renders": perf["renders"],
        "handle_ms": perf["handleMs"],
        "render_ms": perf["renderMs"],
        "ms_per_100_events": 100 * total_ms / events if events else None,
        "max_render_ms": perf["maxRenderMs"],
        "long_tasks": perf["longTasks"],
        "publish_to_page_s": seen_s,
    }
    results["rounds"].append(row)
    print(json.dumps(row), flush=True)


def summary(results: dict[str, Any]) -> None:
    print()
    print(f"Dashboard, {results['shelves']} shelves (medians)")
    print(
        "| viewport | scope | first render | first paint | grid build "
        "| zone snapshot in | drill-down | its paint | panels too |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for vp in sorted({x["viewport"] for x in results["loads"]}, reverse=True):
        rows = [x for x in results["loads"] if x["viewport"] == vp]
        keys = (
            "first_render_ms",
            "first_paint_ms",
            "grid_build_ms",
            "drill_snapshot_ms",
            "drill_ms",
            "drill_paint_ms",
            "drill_settled_ms",
        )
        med = {
            k: statistics.median(x[k] for x in rows)
            if all(x.get(k) is not None for x in rows)
            else None
            for k in keys
        }
        drill = " | ".join(
            f"{med[k]:.0f} ms" if med[k] is not None else "—"
            for k in ("drill_snapshot_ms", "drill_ms", "drill_paint_ms", "drill_settled_ms")
        )
        print(
            f"| {vp} | {rows[0]['scope']} | {med['first_render_ms']:.0f} ms "
            f"| {med['first_paint_ms']:.0f} ms | {med['grid_build_ms']:.1f} ms | {drill} |"
        )
    rounds = results["rounds"]
    print("| shelves changed | events | ms per 100 events | longest frame | long tasks |")
    print("|---|---|---|---|---|")
    for r in rounds:
        per = r["ms_per_100_events"]
        print(
            f"| {r['shelves_changed']} | {r['events']} | "
            f"{per:.1f} ms | {r['max_render_ms']:.1f} ms | {r['long_tasks']} |"
            if per is not None
            else f"| {r['shelves_changed']} | 0 | — | — | — |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shelves", type=int, default=2000)
    p.add_argument("--zones", type=int, default=8)
    p.add_argument("--loads", type=int, default=3, help="page loads per viewport")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--changes", type=int, default=500, help="shelves changed per round")
    p.add_argument(
        "--scope",
        choices=("default", "overview", "site"),
        default="default",
        help="the page's scope (?scope=): default is the site up to 5,000 shelves, else overview",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--trace",
        default=None,
        help="record a Chromium trace of the first drill-down of each viewport into FILE-WxH.json "
        "(open it in the DevTools Performance panel) and print the main thread's time by kind",
    )
    args = p.parse_args()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    results = asyncio.run(main_async(args))
    summary(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
