"""The dashboard of a 10,000-shelf site in the system's headless chromium (Playwright).

Real mosquitto, the real controller process and scale readings over MQTT, as in
``test_dashboard_browser.py``. Above 5,000 shelves the page opens on the site overview (zone
tiles with shelves per state, no shelf grid); a tile opens its zone as a virtual grid (only the
rows in view are in the DOM); search finds a shelf of another zone through the paginated API
and opens it; a live reading of a shelf in the open zone re-colours its cell; the alert feed
and the low-stock table load a page at a time ("More").
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import orjson
import pytest
from playwright.async_api import Browser, Page, expect

from tests.controller_proc import ControllerProcess
from tests.integration.test_dashboard_browser import (  # noqa: F401 (the fixture)
    TIMEOUT_MS,
    browser,
    screenshot_path,
)
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import TOKENS, grams, topic, write_small_site, zone_of
from tests.waiting import wait_for_condition

SHELVES = 10_000
ZONES = 8
OUT = 60  # sh0…sh59 (zone Z0) empty: more alerts and low-stock rows than one page of each


def zone_readings(i: int, seq: int, units: int, n: int = 8) -> list[tuple[str, bytes]]:
    zone = zone_of(i, SHELVES, ZONES)
    now = time.time()
    return [
        (
            topic(f"s{i}", zone),
            orjson.dumps({"device": f"s{i}", "seq": seq + k, "ts": now + k * 0.05,
                          "grams": grams(units)}),
        )
        for k in range(n)
    ]  # fmt: skip


@pytest.mark.slow
async def test_large_site_overview_zone_search_and_live_cell(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    browser: Browser,  # noqa: F811
) -> None:
    site = write_small_site(
        tmp_path,
        mqtt_port=mosquitto.port,
        scales=SHELVES,
        zones=ZONES,
        reporting_interval_s=3600.0,  # nothing goes stale during the test
    )
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start(ready_timeout_s=120)
    msgs = [m for i in range(OUT) for m in zone_readings(i, 0, 0)]
    await asyncio.to_thread(paho_publish, mosquitto.port, msgs)
    await ctl.wait_applied({f"s{i}": 7 for i in range(OUT)}, timeout_s=60)

    async def active() -> int:
        return len(await ctl.get(f"/api/v1/alerts?active=true&limit={2 * OUT}"))

    # Every alert raised (after its dwell) before the page opens: the feed's pages are stable.
    await wait_for_condition(active, 30, what=f"{OUT} active alerts", until=lambda n: n == OUT)

    page = await browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    # History is off on this site: its 404s are expected (the page says "live values only").
    page.on(
        "response",
        lambda r: (
            errors.append(f"HTTP {r.status} {r.url}")
            if r.status >= 400 and "/api/v1/history" not in r.url
            else None
        ),
    )
    tablet = await browser.new_page(viewport={"width": 820, "height": 1180})
    tablet.on("pageerror", lambda exc: errors.append(f"tablet page error: {exc}"))
    try:
        await _tablet_zone(tablet, ctl)
    except BaseException:
        await tablet.screenshot(path=str(screenshot_path("large-tablet-failure")), full_page=True)
        raise
    await tablet.close()
    try:
        await _scenario(page, ctl, mosquitto)
    except BaseException:
        await page.screenshot(path=str(screenshot_path("large-failure")), full_page=True)
        raise
    assert errors == []


async def _tablet_zone(page: Page, ctl: ControllerProcess) -> None:
    """A tablet drills down into Z0 (its 60 alerts come in the zone's snapshot, the feed has
    read one page of 40): the grid stays virtual in the one-column layout, and the feed still
    draws one page of cards, worst first, the others wait for "More alerts"."""
    await page.goto(f"{ctl.base}/dashboard/#token={TOKENS['supervisor']}")
    await expect(page.locator("#alerts .alert")).to_have_count(40, timeout=TIMEOUT_MS)
    await page.click('#overview .zone-tile[data-zone="Z0"]')
    await expect(page.locator('.cell[data-id="sh0"]')).to_be_visible(timeout=TIMEOUT_MS)
    ids = await page.locator(".cell").evaluate_all("cells => cells.map(c => c.dataset.id)")
    assert 0 < len(ids) < 1250 // 2, len(ids)
    perf = await page.evaluate("() => window.__floorhand.perf")
    assert perf["drillPaintCells"] == len(ids), perf  # the grid is in the drill's first frame
    # The panels are redrawn for the zone in the task after that frame: let a frame pass.
    await page.evaluate("() => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)))")
    assert await page.locator("#alerts .alert").count() == 40
    await expect(page.locator("#alert-count")).to_have_text(str(OUT))
    # A shelf whose alert came with the zone's snapshot only (not in the page read): its detail
    # shows the alert, and still does once the pages are read again.
    first = [a["key"] for a in await ctl.get("/api/v1/alerts?active=true&limit=40")]
    shelf = await page.evaluate(
        """(keys) => { const s = window.__floorhand.store;
        for (let i = 0; i < 60; i++) { const sh = s.shelves.get(`sh${i}`);
          if (!keys.includes(sh.sku) && s.alerts.has(sh.sku)) return sh.id; }
        return null; }""",
        first,
    )
    assert shelf is not None
    await page.click(f'.cell[data-id="{shelf}"]')
    alert = page.locator('#detail [data-field="alert"]')
    await expect(alert).to_contain_text("alert K")
    reads = await page.evaluate("() => window.__floorhand.perf.alertReads")
    await page.wait_for_function(
        "(n) => window.__floorhand.perf.alertReads > n", arg=reads, timeout=30_000
    )
    await page.evaluate("() => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)))")
    assert "alert K" in (await alert.text_content() or ""), await alert.text_content()
    await page.click("#alerts-more")
    await expect(page.locator("#alerts .alert")).to_have_count(OUT, timeout=TIMEOUT_MS)
    await expect(page.locator("#alerts-more")).to_be_hidden()


async def _scenario(page: Page, ctl: ControllerProcess, broker: MosquittoBroker) -> None:
    await page.goto(f"{ctl.base}/dashboard/#token={TOKENS['supervisor']}")
    await expect(page.locator("#conn")).to_have_text("Live", timeout=TIMEOUT_MS)
    # The overview: a tile per zone with its counts; no shelf grid.
    tiles = page.locator("#overview .zone-tile")
    await expect(tiles).to_have_count(ZONES, timeout=TIMEOUT_MS)
    z0 = page.locator('#overview .zone-tile[data-zone="Z0"]')
    await expect(z0.locator('[data-state="out"]')).to_have_text(f"{OUT} OUT")
    await expect(z0).to_contain_text("1,250 shelves")
    await expect(page.locator(".cell")).to_have_count(0)
    assert await page.evaluate("() => window.__floorhand.perf.firstRenderMs") is not None
    # The alert feed and the low-stock table: a page, then the next.
    await expect(page.locator("#alert-count")).to_have_text(str(OUT), timeout=TIMEOUT_MS)
    await expect(page.locator("#alerts .alert")).to_have_count(40)
    await page.click("#alerts-more")
    await expect(page.locator("#alerts .alert")).to_have_count(OUT, timeout=TIMEOUT_MS)
    await expect(page.locator("#alerts-more")).to_be_hidden()
    await expect(page.locator("#low-count")).to_have_text(str(OUT))
    await expect(page.locator("#lowstock tbody tr")).to_have_count(50)
    await page.click("#low-more")
    await expect(page.locator("#lowstock tbody tr")).to_have_count(OUT, timeout=TIMEOUT_MS)
    await page.screenshot(path=str(screenshot_path("large-overview")), full_page=True)

    # Drill down into Z3 (sh3750…sh4999): its first shelves are drawn, not all 1,250.
    await page.click('#overview .zone-tile[data-zone="Z3"]')
    await expect(page.locator('#grid .zone[data-zone="Z3"]')).to_be_visible(timeout=TIMEOUT_MS)
    await expect(page.locator('.cell[data-id="sh3750"]')).to_be_visible()
    ids = await page.locator(".cell").evaluate_all("cells => cells.map(c => c.dataset.id)")
    assert 0 < len(ids) < 1250 // 2, len(ids)
    assert all(3750 <= int(i[2:]) < 5000 for i in ids), ids[:5]
    assert await page.evaluate("() => window.__floorhand.perf.drillMs") is not None
    # Scrolled to the end: the zone's last shelves are drawn, its first ones leave the DOM.
    await page.locator("#grid").evaluate("g => { g.scrollTop = g.scrollHeight; }")
    await expect(page.locator('.cell[data-id="sh4999"]')).to_be_visible(timeout=TIMEOUT_MS)
    await expect(page.locator('.cell[data-id="sh3750"]')).to_have_count(0)

    # Search: a shelf of another zone, found through the API, opens its zone and is selected.
    await page.fill("#search", "sh9999")
    await page.press("#search", "Enter")
    result = page.locator('#search-results .result[data-shelf="sh9999"]')
    await expect(result).to_contain_text("zone Z7", timeout=TIMEOUT_MS)
    await result.click()
    cell = page.locator('.cell[data-id="sh9999"]')
    await expect(cell).to_be_visible(timeout=TIMEOUT_MS)
    await expect(cell).to_have_class(re.compile(r"\bselected\b"))
    await expect(page.locator("#detail")).to_contain_text("sh9999")
    await expect(page.locator('.cell[data-id="sh3750"]')).to_have_count(0)

    # A live reading of a shelf in the open zone re-colours its cell (and the detail follows).
    await asyncio.to_thread(paho_publish, broker.port, zone_readings(9999, 0, 0))
    await expect(cell).to_have_attribute("data-state", "out", timeout=TIMEOUT_MS)
    await expect(cell).to_have_text("0")
    await expect(page.locator('#detail [data-field="state"]')).to_have_text("OUT")
    await expect(
        page.locator('#overview .zone-tile[data-zone="Z7"] [data-state="out"]')
    ).to_have_text("1 OUT", timeout=TIMEOUT_MS)
    await page.screenshot(path=str(screenshot_path("large-zone")), full_page=True)
    # Back to the overview: the grid is gone again.
    await page.click("#overview-back")
    await expect(page.locator(".cell")).to_have_count(0, timeout=TIMEOUT_MS)
