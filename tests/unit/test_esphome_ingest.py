"""The topic and payload the shipped ESPHome config publishes reach a demo shelf through the
controller's own routing and parser (IngestService), not only through the codec helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controller.config import load_site
from controller.services.ingest import IngestService, IngestSettings, shelf_specs, subscriptions
from devices.link.mqtt import MqttMessage
from tests.unit.test_esphome_yaml import _weight_sensor, config, object_id
from tests.unit.test_ingest import DEMO, FakeLink, Journal

__all__ = ["config"]


def test_esphome_config_output_is_applied_to_its_demo_shelf(
    config: dict[str, Any],
    tmp_path: Path,
) -> None:
    site = load_site(DEMO)
    node = config["mqtt"]["topic_prefix"]
    state_topic = f"{node}/sensor/{object_id(_weight_sensor(config)['name'])}/state"
    status_topic = config["mqtt"]["birth_message"]["topic"]
    # The controller subscribes to filters covering both topics.
    filters = [f for f, _ in subscriptions(site)]
    assert f"{node}/sensor/+/state" in filters
    assert status_topic in filters
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    now = [1_764_067_200.0]
    ingest = IngestService(
        IngestSettings.from_site(site),
        journal,
        FakeLink(),
        lambda ev: None,
        clock=lambda: now[0],
        shelf_specs=shelf_specs(site),
    )
    shelf = next(s for s in site.shelves if s.scale == "scale-c01")
    weight = shelf.tare_g + 17 * shelf.unit_weight_g
    ingest.on_messages([MqttMessage(status_topic, b"online", 0, True, 0, False)])
    for _i in range(6):
        now[0] += 2.0
        # ESPHome prints the state with accuracy_decimals = 1.
        payload = f"{weight:.{config['sensor'][0]['accuracy_decimals']}f}".encode()
        ingest.on_messages([MqttMessage(state_topic, payload, 0, False, 0, False)])
    assert dict(ingest.rejected) == {}
    assert ingest.devices["scale-c01"].online is True
    kinds = [k for (k,) in journal.db.execute("SELECT kind FROM events")]
    assert kinds.count("device_status") == 1, "availability changes are journaled for history"
    assert ingest.states[shelf.id].units == 17
    journal.close()
