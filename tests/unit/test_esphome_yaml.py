"""The shipped ESPHome firmware publishes exactly the topics and payloads the controller reads."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from devices.shelf_scale import (
    Rejected,
    esphome_state_topic,
    esphome_status_topic,
    parse_esphome_state,
    parse_esphome_status,
)

ROOT = Path(__file__).resolve().parents[2]
YAML_PATH = ROOT / "firmware-configs" / "esphome" / "shelf-scale.yaml"
DEMO_SITE = ROOT / "firmware-configs" / "sites" / "demo.toml"


class _Secret(str):
    """Placeholder for ``!secret name`` (the value lives in secrets.yaml, never in the repo)."""


class _Loader(yaml.SafeLoader):
    pass


def _secret(loader: yaml.SafeLoader, node: yaml.Node) -> _Secret:
    assert isinstance(node, yaml.ScalarNode)
    return _Secret(loader.construct_scalar(node))


_Loader.add_constructor("!secret", _secret)


def _substitute(value: Any, subs: dict[str, str]) -> Any:
    """ESPHome's ``${name}`` / ``$name`` substitutions, enough for this file."""
    if isinstance(value, _Secret):
        return value
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: subs[m.group(1) or m.group(2)], value)
    if isinstance(value, list):
        return [_substitute(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, subs) for k, v in value.items()}
    return value


def object_id(name: str) -> str:
    """ESPHome's object id: snake case (lower case, spaces → "_"), then any character outside
    ``a-z0-9_-`` replaced by "_"."""
    snake = name.lower().replace(" ", "_")
    return re.sub(r"[^a-z0-9_-]", "_", snake)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    raw = yaml.load(YAML_PATH.read_text(), Loader=_Loader)
    subs = {k: str(v) for k, v in raw.get("substitutions", {}).items()}
    doc: dict[str, Any] = _substitute(raw, subs)
    return doc


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
        assert parse_esphome_status(payload.encode()) is (payload == "online")


def test_sensor_reports_grams_with_one_decimal(config: dict[str, Any]) -> None:
    sensor = _weight_sensor(config)
    assert sensor["unit_of_measurement"] == "g"
    assert sensor["accuracy_decimals"] == 1
    assert sensor["qos"] == 0
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
        assert isinstance(mqtt[key], _Secret), f"mqtt.{key} must come from !secret"
    assert isinstance(config["wifi"]["password"], _Secret)


def test_esphome_payloads_parse() -> None:
    assert parse_esphome_state(b"1834.5") == 1834.5
    nan = parse_esphome_state(b"nan")  # what ESPHome sends when the sensor has no value
    assert isinstance(nan, Rejected)
    assert nan.reason == "not_finite"
    value = parse_esphome_state(b"0.0")
    assert isinstance(value, float)
    assert math.isfinite(value)
