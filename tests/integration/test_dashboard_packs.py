"""The dashboard's alert card suggests an order in whole supplier packs (a SKU's
``pack_multiple``): headless chromium (the system's package) on the real controller process,
real mosquitto, readings published by paho."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.controller_proc import ControllerProcess
from tests.integration.test_dashboard_browser import (  # noqa: F401 (the browser fixture)
    TIMEOUT_MS,
    browser,
    publish,
)
from tests.mosquitto import MosquittoBroker
from tests.sites import TOKENS, write_small_site

pytestmark = pytest.mark.timeout(120)


async def test_the_alert_card_orders_whole_packs(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    browser: Browser,  # noqa: F811
) -> None:
    site = write_small_site(
        tmp_path, mqtt_port=mosquitto.port, scales=2, reporting_interval_s=60.0, dwell_s=0.2
    )
    text = site.read_text()
    site.write_text(text.replace('id = "K0"\n', 'id = "K0"\npack_multiple = 12\n', 1))
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    seqs = {"s0": await publish(mosquitto, "s0", 0, 0), "s1": await publish(mosquitto, "s1", 0, 7)}
    await ctl.wait_applied({d: s - 1 for d, s in seqs.items()})

    page = await browser.new_page(viewport={"width": 1366, "height": 768})
    await page.goto(ctl.base + "/")
    await page.fill("#token-input", TOKENS["supervisor"])
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#conn")).to_have_text("Live", timeout=TIMEOUT_MS)
    # K0 is OUT: 40 short of max_stock 40, packs of 12 -> 4 packs, 48 units.
    k0 = page.locator('.alert[data-key="K0"]')
    await expect(k0).to_contain_text("order 48 (4 × 12)", timeout=TIMEOUT_MS)
    # K1 (packs of 1, the default) at 7: 33 short, no pack count shown.
    k1 = page.locator('.alert[data-key="K1"]')
    await expect(k1).to_contain_text("order 33", timeout=TIMEOUT_MS)
    await expect(k1).not_to_contain_text("×")
