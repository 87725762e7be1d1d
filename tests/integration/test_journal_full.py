"""The journal's volume is full (issue 13, "Data care"): a real SQLITE_FULL on the controller's
own journal while readings arrive over a real mosquitto. Reading from the broker is held (the
broker keeps the messages), a retained system alert says why, nothing is acknowledged that was
not written, and once there is room again every reading lands and the alert clears, without a
restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.config import load_site
from controller.runtime import Runtime
from tests.integration.test_sensing_e2e import PahoWatcher, readings, running
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import write_small_site
from tests.waiting import wait_for_condition

TOTAL = 600


async def test_a_full_journal_volume_holds_reading_raises_an_alert_and_recovers(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=mosquitto.port))
    watcher = PahoWatcher(mosquitto.port, "fh/t/alerts/system/#")
    await watcher.subscribed()
    rt = Runtime(site)
    try:
        async with running(rt):
            t0 = rt.clock()
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 1, t0))
            await wait_for_condition(lambda: rt.ingest.readings == 1, 15, what="the first reading")
            # The volume is full: SQLite may not grow the file by a single page.
            db = rt.journal.db
            db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
            batch = readings("s0", 1, 25, TOTAL - 1, t0 + 1)
            await asyncio.to_thread(paho_publish, mosquitto.port, batch)
            _, alert = await watcher.wait_for(
                lambda t, b: t.endswith("/journal_unavailable") and b["active"] is True,
                timeout_s=20,
            )
            assert alert["key"] == "system:journal_unavailable"
            assert "full" in alert["error"]
            assert "journal" in rt.gate.holds
            held = rt.ingest.readings
            assert held < TOTAL
            assert rt.journal.count("readings") == held  # acknowledged == written
            health = rt.supervision.report()
            assert health.status == "degraded"
            # Room again: the held group commits, reading resumes, the alert clears.
            db.execute("PRAGMA max_page_count=1073741823")
            await wait_for_condition(
                lambda: rt.ingest.readings, 30, what="every reading", until=lambda n: n == TOTAL
            )
            cleared = await watcher.wait_last(
                lambda t, b: t.endswith("/journal_unavailable") and b["active"] is False,
                timeout_s=20,
            )
            assert cleared["key"] == "system:journal_unavailable"
            assert "journal" not in rt.gate.holds
            assert rt.journal.count("readings") == TOTAL
    finally:
        watcher.close()
