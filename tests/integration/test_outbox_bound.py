"""fault case I5: the database is down and the outbox reaches its bound. The controller stops
reading from the broker (the broker keeps the messages), raises a retained system alert, does not
crash, and recovers without a restart once the database is back: every reading lands."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.config import load_site
from controller.runtime import Runtime
from tests.influx_servers import InfluxD, have_influxd
from tests.integration.test_sensing_e2e import PahoWatcher, readings, running
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import write_small_site

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_influxd(), reason="Debian influxd not installed"),
]

BOUND = 1_000
TOTAL = 1_600


async def test_full_outbox_stops_reading_raises_an_alert_and_recovers(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    influxd = InfluxD(tmp_path / "influxd")  # its port is chosen now; it starts later
    site_path = write_small_site(tmp_path, mqtt_port=mosquitto.port, history_backend=None)
    with site_path.open("a") as f:
        f.write(
            f'\n[history]\nbackend = "influxdb1"\nurl = "{influxd.url}"\ndb = "bound"\n'
            "flush_interval_s = 0.05\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.3\n"
        )
    text = site_path.read_text().replace("[journal]\n", f"[journal]\nmax_outbox_rows = {BOUND}\n")
    site_path.write_text(text)
    site = load_site(site_path)
    watcher = PahoWatcher(mosquitto.port, "fh/t/alerts/system/#")
    await watcher.subscribed()
    rt = Runtime(site)
    try:
        async with running(rt):
            t0 = rt.clock()
            # The database is down: the outbox only grows.
            for i in range(TOTAL // 200):
                batch = readings("s0", i * 200, 25, 200, t0 + i * 20)
                await asyncio.to_thread(paho_publish, mosquitto.port, batch)
            _, alert = await watcher.wait_for(lambda t, b: b["active"] is True, timeout_s=20)
            assert alert["key"] == "system:outbox_full"
            assert rt.backpressure
            assert "outbox" in rt.gate.holds
            # The outbox (readings + events) reached the bound; the broker holds the rest.
            assert rt.journal.outbox_rows >= BOUND
            assert rt.ingest.readings < TOTAL
            # The database comes back: the outbox drains, reading resumes, the alert clears.
            await asyncio.to_thread(influxd.start)
            await asyncio.to_thread(influxd.create_database, "bound")
            history = rt.history
            assert history is not None
            await asyncio.wait_for(
                history.wait_for(
                    lambda: rt.ingest.readings == TOTAL and rt.journal.count("readings") == 0
                ),
                30,
            )
            # Reading may have paused again while the backlog drained; it ends released.
            await watcher.wait_last(lambda t, b: b["active"] is False, timeout_s=30)
            assert not rt.backpressure
            assert rt.link.state.value == "up"
        count = await asyncio.to_thread(influxd.count, "bound", "weight", "weight_g")
        assert count == TOTAL
    finally:
        watcher.close()
        await asyncio.to_thread(influxd.stop)
