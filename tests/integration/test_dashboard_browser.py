"""The dashboard in the system's headless chromium (Debian package), driven by Playwright.

Real mosquitto, the real controller (``floorhand run`` under uvicorn on 127.0.0.1) and scale
readings published over MQTT. The page is loaded with a token, a shelf is emptied and its cell
turns OUT, the alert appears and is acknowledged, the controller is restarted and the page shows
it is disconnected, then reconnects by itself. Screenshots go to ``artifacts/dashboard/``.
Playwright never downloads a browser here: ``executable_path`` is the system chromium.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.controller_proc import ROOT, ControllerProcess
from tests.integration.test_sensing_e2e import readings
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import TOKENS, write_small_site

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
# Nothing here downloads a browser; should anything ask Playwright to, it must not.
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
ARTIFACTS = ROOT / "artifacts" / "dashboard"
TIMEOUT_MS = 20_000
DWELL_S = 3.0


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.fail(f"{CHROMIUM} missing: run scripts/system-deps (Debian package chromium)")
    async with async_playwright() as pw:
        # Root in a container has no user namespaces for chromium's sandbox.
        b = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, chromium_sandbox=False
        )
        try:
            yield b
        finally:
            await b.close()


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


async def publish(broker: MosquittoBroker, device: str, seq: int, units: int) -> int:
    """Enough steady readings (stamped now) for the shelf to settle at ``units``; returns the
    next seq."""
    msgs = readings(device, seq, units, 8, time.time())
    await asyncio.to_thread(paho_publish, broker.port, msgs)
    return seq + 8


async def test_grid_alert_ack_and_reconnect(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    browser: Browser,
) -> None:
    site = write_small_site(
        tmp_path,
        mqtt_port=mosquitto.port,
        scales=4,
        history_backend="sqlite",
        reporting_interval_s=60.0,  # no shelf goes STALE while the controller restarts
        # Long enough to see an alert during its resolve dwell (recovering), short enough to
        # keep the raise quick.
        dwell_s=DWELL_S,
    )
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    seqs: dict[str, int] = {}
    for i in range(4):
        seqs[f"s{i}"] = await publish(mosquitto, f"s{i}", 0, 25)
    await ctl.wait_applied({d: s - 1 for d, s in seqs.items()})

    page = await browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on(
        "response",
        lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
    )
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
        ),
    )
    try:
        await _scenario(page, ctl, mosquitto, seqs)
    except BaseException:
        path = screenshot_path("failure")
        await page.screenshot(path=str(path), full_page=True)
        print(f"dashboard screenshot (failure): {path}")
        raise
    # The only console errors allowed are the failed loads while the controller was down.
    unexpected = [e for e in errors if "ERR_CONNECTION_REFUSED" not in e and "WebSocket" not in e]
    assert unexpected == []


async def _scenario(
    page: Page, ctl: ControllerProcess, broker: MosquittoBroker, seqs: dict[str, int]
) -> None:
    await page.goto(ctl.base + "/")  # redirects to /dashboard/
    assert page.url.endswith("/dashboard/")
    # No token yet: the sign-in form; a wrong token is refused with a clear message.
    await page.fill("#token-input", "this-is-not-a-valid-token")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login-error")).to_contain_text("rejected", timeout=TIMEOUT_MS)
    await page.fill("#token-input", TOKENS["supervisor"])
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#conn")).to_have_text("Live", timeout=TIMEOUT_MS)
    await expect(page.locator("#who")).to_have_text("test-supervisor (supervisor)")

    cell = page.locator('.cell[data-id="sh0"]')
    await expect(cell).to_have_attribute("data-state", "ok", timeout=TIMEOUT_MS)
    await expect(cell).to_have_text("25")
    await expect(page.locator(".cell")).to_have_count(4)
    await expect(page.locator("#broker")).to_have_text("Scales: broker up")
    # The whole site is in the page (no zone overview); search selects a shelf in place.
    await expect(page.locator("#overview")).to_be_hidden()
    await page.fill("#search", "sh3")
    await page.press("#search", "Enter")
    await page.locator('#search-results .result[data-shelf="sh3"]').click()
    await expect(page.locator('.cell[data-id="sh3"]')).to_have_class(re.compile(r"\bselected\b"))
    await expect(page.locator("#detail")).to_contain_text("sh3")
    await expect(page.locator("#search-results")).to_be_hidden()

    # The shelf empties: its cell turns OUT and the OUT alert appears in the feed.
    seqs["s0"] = await publish(broker, "s0", seqs["s0"], 0)
    await expect(cell).to_have_attribute("data-state", "out", timeout=TIMEOUT_MS)
    await expect(cell).to_have_class(re.compile(r"\bs-out\b"))
    alert = page.locator('.alert[data-key="K0"]')
    await expect(alert).to_be_visible(timeout=TIMEOUT_MS)
    await expect(alert.locator(".badge")).to_have_text("OUT")
    await expect(page.locator("#alert-count")).to_have_text("1")
    await expect(page.locator('#lowstock tr[data-sku="K0"]')).to_be_visible()
    await expect(page.locator("#events")).to_contain_text("K0: OUT")

    # Acknowledge it (POST /api/v1/alerts/K0/ack with the supervisor token).
    await alert.locator('button[data-action="ack"]').click()
    await expect(alert).to_contain_text("acked by test-supervisor", timeout=TIMEOUT_MS)
    await expect(alert.locator('button[data-action="ack"]')).to_have_count(0)
    await expect(page.locator("#events")).to_contain_text("K0: acknowledged by test-supervisor")
    # Snooze it with a reason (POST /api/v1/alerts/K0/snooze).
    await alert.locator('button[data-action="snooze"]').click()
    await alert.locator("select[name=minutes]").select_option("15")
    await alert.locator("input[name=reason]").fill("delivery at 14:00")
    await alert.locator("form button[type=submit]").click()
    await expect(alert).to_contain_text("snoozed by test-supervisor", timeout=TIMEOUT_MS)
    await expect(alert).to_contain_text("delivery at 14:00")
    await cell.click()
    await expect(page.locator("#trend-sku")).to_have_text("K0")
    detail = page.locator("#detail")
    await expect(detail).to_contain_text("sh0")
    await expect(detail.locator('[data-field="units"]')).to_have_text("0/40 units")
    await expect(detail.locator('[data-field="state"]')).to_have_text("OUT")
    await expect(detail.locator('[data-field="alert"]')).to_contain_text("OUT")
    await _alert_list_fills_the_column(page)
    path = screenshot_path("dashboard")
    await page.screenshot(path=str(path), full_page=True)
    print(f"dashboard screenshot: {path}")

    # Controller restart: the page says it is disconnected and the data stale, then comes
    # back by itself and shows the same state.
    await ctl.stop()
    await expect(page.locator("#conn")).to_have_text("Disconnected", timeout=TIMEOUT_MS)
    await expect(page.locator("#banner")).to_contain_text("stale")
    await expect(page.locator("body")).to_have_attribute("data-conn", "disconnected")
    await page.screenshot(path=str(screenshot_path("disconnected")), full_page=True)
    await ctl.start()
    await expect(page.locator("#conn")).to_have_text("Live", timeout=30_000)
    await expect(page.locator("#banner")).to_be_hidden()
    await expect(cell).to_have_attribute("data-state", "out")
    await expect(alert).to_contain_text("acked by test-supervisor")

    # Restocked: the cell is OK again, and the open detail panel follows it live.
    weight_before = await detail.locator('[data-field="weight"]').inner_text()
    seqs["s0"] = await publish(broker, "s0", seqs["s0"], 30)
    await expect(cell).to_have_attribute("data-state", "ok", timeout=TIMEOUT_MS)
    await expect(cell).to_have_text("30")
    await expect(detail.locator('[data-field="units"]')).to_have_text("30/40 units")
    await expect(detail.locator('[data-field="state"]')).to_have_text("OK")
    await expect(detail.locator('[data-field="weight"]')).not_to_have_text(weight_before)
    # During the resolve dwell the card no longer says OUT beside a level of 30: it is
    # recovering, with the current level, until the episode resolves and the card goes.
    await expect(alert.locator(".badge")).to_have_text("RECOVERING", timeout=TIMEOUT_MS)
    await expect(alert).to_have_class(re.compile(r"\brecovering\b"))
    await expect(alert).to_contain_text("level 30")
    await expect(alert).not_to_contain_text("order 40")  # nothing to order while recovering
    await expect(detail.locator('[data-field="alert"]')).to_contain_text("recovering")
    await page.screenshot(path=str(screenshot_path("recovering")), full_page=True)
    await expect(alert).to_have_count(0, timeout=TIMEOUT_MS)
    await expect(page.locator("#alert-count")).to_have_text("0")
    await expect(detail.locator('[data-field="alert"]')).to_have_text("no active alert")
    # Closed, the panel stops following the shelf.
    await detail.locator('button[data-action="close-detail"]').click()
    await expect(detail).not_to_contain_text("sh0")
    await expect(cell).not_to_have_class(re.compile(r"\bselected\b"))


async def _alert_list_fills_the_column(page: Page) -> None:
    """At 1366×768 the alert list takes the height of the page's columns (no empty space under
    the charts, no small scroll box above an empty area), and scrolls within itself."""
    box = await page.evaluate(
        """() => {
          const r = (sel) => document.querySelector(sel).getBoundingClientRect();
          const left = [...document.querySelectorAll("#main > :not(.side)")]
            .reduce((b, n) => Math.max(b, n.getBoundingClientRect().bottom), 0);
          const list = document.querySelector("#alerts");
          return { left, side: r(".side").bottom, list: r("#alerts").height,
                   overflow: getComputedStyle(list).overflowY, vh: innerHeight };
        }"""
    )
    # The left column's panels reach as far down as the alert column (within one gap).
    assert abs(box["left"] - box["side"]) <= 16, box
    assert box["list"] >= 0.4 * box["vh"], box
    assert box["overflow"] == "auto", box
