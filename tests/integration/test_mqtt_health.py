"""What the controller's health and metrics say about its MQTT link, against real mosquitto."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from devices.link.state import LinkState
from tests.integration.test_api_ops import ops_server
from tests.integration.test_mqtt_link import entered
from tests.mosquitto import MosquittoBroker, paho_publish, running_mosquitto
from tests.sites import topic, write_small_site

pytestmark = pytest.mark.timeout(90)


async def test_health_since_s_is_how_long_the_link_has_been_down(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Failed retries flip the link between connecting and down; ``mqtt.since_s`` must keep
    counting from the moment the link went down, not from the latest retry."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, client_id="fh-since")
    async with ops_server(site) as srv:
        link = srv.rt.link
        async with srv.client() as http:
            up = (await http.get("/api/v1/health")).json()["mqtt"]
            assert up["state"] == "up"
            await mosquitto.stop()
            await link.watch.wait_for(LinkState.DOWN, 5)
            down_seen = time.monotonic()
            fifth = entered(link, LinkState.CONNECTING, 5)
            await asyncio.wait_for(fifth.wait(), 20)
            before_get = time.monotonic()
            down = (await http.get("/api/v1/health")).json()["mqtt"]
            await mosquitto.start()
            await link.wait_up(10)
            back = (await http.get("/api/v1/health")).json()["mqtt"]
    assert down["state"] in ("down", "connecting")
    assert "Connect" in down["last_error"], down  # refused: the broker is stopped
    # The link went down before the test saw it: it has been down at least this long.
    assert down["since_s"] >= before_get - down_seen, down
    assert back["state"] == "up"
    assert back["since_s"] < down["since_s"]


async def test_health_and_metrics_show_what_the_broker_weakened(tmp_path: Path) -> None:
    """mosquitto ``max_qos 0``: the readings subscription is granted QoS 0 and the controller's
    retained QoS 1 alerts cannot be QoS 1. Health says so (status degraded, the warnings, the
    granted QoS) and /metrics counts the warnings."""
    async with running_mosquitto(tmp_path / "mosquitto", extra_config="max_qos 0") as broker:
        site = write_small_site(tmp_path, mqtt_port=broker.port, client_id="fh-qos0")
        async with ops_server(site) as srv, srv.client() as http:
            health = (await http.get("/api/v1/health")).json()
            metrics = (await http.get("/metrics")).text
    mqtt = health["mqtt"]
    assert health["status"] == "degraded", health
    assert mqtt["state"] == "up"
    assert mqtt["max_qos"] == 0
    assert set(mqtt["granted_qos"].values()) == {0}, mqtt
    assert any("at most once" in w for w in mqtt["warnings"]), mqtt
    assert metric(metrics, "floorhand_mqtt_warnings") == len(mqtt["warnings"]) > 0


async def test_health_and_metrics_count_the_links_oversize_and_invalid_messages(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Over MQTT 3.1.1 the broker does not know our packet limit and sends a message above
    it: the link skips it, acks it, and health and /metrics count it."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, client_id="fh-big", protocol=4)
    async with ops_server(site) as srv, srv.client() as http:
        limit = srv.rt.link.config.max_packet_bytes
        big = [(topic("s0"), b"x" * (limit + 1))]
        await asyncio.to_thread(paho_publish, mosquitto.port, big, protocol=4)
        await srv.publish("s0", 1000.0, n=1)  # applied once the big one before it was handled
        health = (await http.get("/api/v1/health")).json()
        metrics = (await http.get("/metrics")).text
    assert health["mqtt"]["oversize_in"] == 1
    assert health["mqtt"]["invalid_in"] == 0
    assert metric(metrics, "floorhand_mqtt_oversize_in_total") == 1
    assert metric(metrics, "floorhand_mqtt_invalid_in_total") == 0


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
