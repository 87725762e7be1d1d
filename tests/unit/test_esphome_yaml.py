"""The shipped ESPHome firmware publishes exactly the topics and payloads the controller reads."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import topic_matches_sub

from controller.config import load_site
from controller.services.ingest import subscriptions
from devices.shelf_scale import (
    Rejected,
    esphome_state_topic,
    esphome_status_topic,
    parse_esphome_state,
    parse_esphome_status,
)
from tests.esphome_yaml import (
    PLAIN_YAML,
    TLS_YAML,
    Secret,
    device_messages,
    load_config,
    object_id,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "firmware-configs" / "sites" / "demo.toml"


@pytest.fixture(scope="module", params=[PLAIN_YAML, TLS_YAML], ids=["plain", "tls"])
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each shipped YAML, packages merged, substitutions applied."""
    return load_config(request.param)


@pytest.fixture(scope="module")
def demo_scale() -> dict[str, Any]:
    site = tomllib.loads(DEMO_SITE.read_text())
    scale: dict[str, Any] = next(s for s in site["scales"] if s["id"] == "scale-c01")
    return scale


def _weight_sensor(config: dict[str, Any]) -> dict[str, Any]:
    sensors = [s for s in config["sensor"] if s["platform"] == "hx711"]
    assert len(sensors) == 1
    return sensors[0]


def test_demo_site_maps_scale_c01_to_node_shelf_c01(demo_scale: dict[str, Any]) -> None:
    assert demo_scale["format"] == "esphome"
    assert demo_scale["esphome_node"] == "shelf-c01"
    assert demo_scale["esphome_sensors"] == ["shelf_weight"]


def test_state_topic_matches_the_site(config: dict[str, Any], demo_scale: dict[str, Any]) -> None:
    node = demo_scale["esphome_node"]
    sensor_id = demo_scale["esphome_sensors"][0]
    assert config["esphome"]["name"] == node
    prefix = config["mqtt"]["topic_prefix"]
    sensor = _weight_sensor(config)
    topic = f"{prefix}/sensor/{object_id(sensor['name'])}/state"
    assert topic == esphome_state_topic(node, sensor_id) == "shelf-c01/sensor/shelf_weight/state"
    assert "state_topic" not in sensor, "the default topic is what the site file describes"


def test_birth_and_will_on_status_topic(config: dict[str, Any], demo_scale: dict[str, Any]) -> None:
    status = esphome_status_topic(demo_scale["esphome_node"])
    mqtt = config["mqtt"]
    for key, payload in (
        ("birth_message", "online"),
        ("will_message", "offline"),
        ("shutdown_message", "offline"),
    ):
        msg = mqtt[key]
        assert msg["topic"] == status
        assert msg["payload"] == payload
        assert msg["retain"] is True
        assert msg["qos"] == 1
        assert parse_esphome_status(payload.encode()) is (payload == "online")


def test_sensor_reports_grams_with_one_decimal(config: dict[str, Any]) -> None:
    sensor = _weight_sensor(config)
    assert sensor["unit_of_measurement"] == "g"
    assert sensor["accuracy_decimals"] == 1
    assert sensor["qos"] == 1
    for key in ("dout_pin", "clk_pin", "gain", "update_interval"):
        assert key in sensor
    kinds = [next(iter(f)) for f in sensor["filters"]]
    assert kinds[0] == "calibrate_linear"
    assert {"median", "sliding_window_moving_average"} <= set(kinds)
    points = sensor["filters"][0]["calibrate_linear"]["datapoints"]
    assert len(points) >= 2
    assert all(re.fullmatch(r"-?\d+(\.\d+)? -> \d+(\.\d+)?", p) for p in points)


def test_publishing_interval_matches_the_site(
    config: dict[str, Any], demo_scale: dict[str, Any]
) -> None:
    sensor = _weight_sensor(config)
    m = re.fullmatch(r"(\d+)(ms|s)", sensor["update_interval"])
    assert m is not None
    sample_s = int(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    avg = next(f for f in sensor["filters"] if "sliding_window_moving_average" in f)
    send_every = avg["sliding_window_moving_average"]["send_every"]
    assert sample_s * send_every == pytest.approx(demo_scale["reporting_interval_s"])


def test_credentials_are_secrets(config: dict[str, Any]) -> None:
    mqtt = config["mqtt"]
    for key in ("broker", "username", "password"):
        assert isinstance(mqtt[key], Secret), f"mqtt.{key} must come from !secret"
    assert isinstance(config["wifi"]["password"], Secret)


def test_esphome_payloads_parse() -> None:
    assert parse_esphome_state(b"1834.5") == 1834.5
    nan = parse_esphome_state(b"nan")  # what ESPHome sends when the sensor has no value
    assert isinstance(nan, Rejected)
    assert nan.reason == "not_finite"
    value = parse_esphome_state(b"0.0")
    assert isinstance(value, float)
    assert math.isfinite(value)


def test_node_publishes_only_state_and_status_at_qos1(config: dict[str, Any]) -> None:
    """No log topic (ESPHome's default <node>/debug), no discovery, no IP discovery: the broker
    ACL grants a node only its states and its status topic."""
    mqtt = config["mqtt"]
    assert "log_topic" in mqtt
    assert mqtt["log_topic"] is None
    assert mqtt["discovery"] is False
    assert mqtt["discover_ip"] is False
    assert not {"on_message", "on_json_message"} & set(mqtt), "the node subscribes to nothing"
    msgs = device_messages(config)
    assert {(m.kind, m.topic) for m in msgs} == {
        ("state", "shelf-c01/sensor/shelf_weight/state"),
        ("birth", "shelf-c01/status"),
        ("will", "shelf-c01/status"),
        ("shutdown", "shelf-c01/status"),
    }
    assert all(m.qos == 1 and m.retain for m in msgs)


def test_controller_subscriptions_cover_the_node() -> None:
    """Every topic the node publishes matches a QoS 1 subscription of the controller for the
    demo site."""
    subs = subscriptions(load_site(DEMO_SITE))
    for msg in device_messages(load_config(PLAIN_YAML)):
        matching = [qos for flt, qos in subs if topic_matches_sub(flt, msg.topic)]
        assert matching == [1], (msg.topic, subs)


def test_transport_plain_1883_and_tls_8883_with_the_ca() -> None:
    plain = load_config(PLAIN_YAML)["mqtt"]
    tls = load_config(TLS_YAML)["mqtt"]
    assert plain["port"] == 1883
    assert "certificate_authority" not in plain
    assert tls["port"] == 8883
    assert isinstance(tls["certificate_authority"], Secret)
    assert tls["certificate_authority"] == "mqtt_ca_certificate"
    assert tls.get("skip_cert_cn_check", False) is False, "the node checks the broker's name"
    # Apart from the transport, the TLS file is the plain one.
    strip = ("port", "certificate_authority")
    assert {k: v for k, v in tls.items() if k not in strip} == {
        k: v for k, v in plain.items() if k not in strip
    }
