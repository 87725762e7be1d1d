"""What the controller's health and metrics say about its MQTT link, against real mosquitto."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from devices.link.state import LinkState
from tests.integration.test_api_ops import ops_server
from tests.mosquitto import MosquittoBroker
from tests.sites import write_small_site

pytestmark = pytest.mark.timeout(90)


async def test_health_since_s_is_how_long_the_link_has_been_down(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Failed retries flip the link between connecting and down; ``mqtt.since_s`` must keep
    counting from the moment the link went down, not from the latest retry."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, client_id="fh-since")
    async with ops_server(site) as srv:
        link = srv.rt.link
        attempts = 0
        fifth = asyncio.Event()

        def count(old: LinkState, new: LinkState) -> None:
            nonlocal attempts
            if new is LinkState.CONNECTING:
                attempts += 1
                if attempts == 5:
                    fifth.set()

        async with srv.client() as http:
            up = (await http.get("/api/v1/health")).json()["mqtt"]
            assert up["state"] == "up"
            await mosquitto.stop()
            await link.watch.wait_for(LinkState.DOWN, 5)
            down_seen = time.monotonic()
            link.watch.add_listener(count)
            await asyncio.wait_for(fifth.wait(), 20)
            before_get = time.monotonic()
            down = (await http.get("/api/v1/health")).json()["mqtt"]
            await mosquitto.start()
            await link.wait_up(10)
            back = (await http.get("/api/v1/health")).json()["mqtt"]
    assert down["state"] in ("down", "connecting")
    # The link went down before the test saw it: it has been down at least this long.
    assert down["since_s"] >= before_get - down_seen, down
    assert back["state"] == "up"
    assert back["since_s"] < down["since_s"]
