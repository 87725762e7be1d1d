"""The site's ``[[plcs]]`` table: defaults, simulator keys, cross-checks with clear paths."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from controller.config import ConfigError, PlcConfig, load_site, parse_site
from controller.runtime import build_plc
from devices.conveyor import ConveyorDriver
from devices.sorter import SorterDriver
from simulators.plc import parse_plcs
from tests.sites import write_small_site

PLCS = """
[[plcs]]
id = "conveyor-1"
kind = "conveyor"
port = 15020
length_mm = 12000
speed_mm_s = 500

[[plcs]]
id = "sorter-1"
kind = "sorter"
host = "10.0.0.7"
port = 15021
unit = 3
timeout_s = 0.3
heartbeat = false
lanes = 6
lane_capacity = 4
queue_capacity = 8
speed_mm_s = 800.5
lane_drain_s = 0
"""


def site_doc(tmp_path: Path, plcs: str = PLCS) -> dict[str, Any]:
    path = write_small_site(tmp_path, mqtt_port=1883, scales=1)
    return tomllib.loads(path.read_text() + plcs)


def errors_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_site(doc, "test.toml")
    return info.value.errors


def test_a_site_without_plcs_has_none(tmp_path: Path) -> None:
    assert load_site(write_small_site(tmp_path, mqtt_port=1883)).plcs == ()


def test_plcs_load_with_defaults_and_simulator_keys(tmp_path: Path) -> None:
    path = write_small_site(tmp_path, mqtt_port=1883, scales=1)
    path.write_text(path.read_text() + PLCS)
    site = load_site(path)
    conveyor, sorter = site.plcs
    assert conveyor == PlcConfig(
        id="conveyor-1", kind="conveyor", port=15020, length_mm=12000.0, speed_mm_s=500.0
    )
    assert (conveyor.host, conveyor.unit, conveyor.timeout_s, conveyor.heartbeat) == (
        "127.0.0.1",
        1,
        0.5,
        True,
    )
    assert conveyor.endpoint == "127.0.0.1:15020"
    assert (sorter.host, sorter.unit, sorter.timeout_s, sorter.heartbeat) == (
        "10.0.0.7",
        3,
        0.3,
        False,
    )
    assert (sorter.lanes, sorter.lane_capacity, sorter.speed_mm_s) == (6, 4, 800.5)
    # The simulator reads the same file (and ignores the controller's own keys).
    specs = parse_plcs(tomllib.loads(path.read_text()))
    assert [(s.id, s.kind, s.port, s.unit) for s in specs] == [
        ("conveyor-1", "conveyor", 15020, 1),
        ("sorter-1", "sorter", 15021, 3),
    ]


def test_missing_and_bad_fields_name_the_entry(tmp_path: Path) -> None:
    doc = site_doc(tmp_path)
    del doc["plcs"][0]["port"]
    doc["plcs"][1]["kind"] = "robot"
    doc["plcs"][1]["unit"] = 300
    doc["plcs"][1]["timeout_s"] = 0
    errs = dict(errors_of(doc))
    assert set(errs) >= {"plcs[0].port", "plcs[1].kind", "plcs[1].unit", "plcs[1].timeout_s"}


def test_bad_id_and_unknown_key(tmp_path: Path) -> None:
    doc = site_doc(tmp_path)
    doc["plcs"][0]["id"] = "belt/1"
    doc["plcs"][1]["colour"] = "red"
    paths = [p for p, _ in errors_of(doc)]
    assert "plcs[0].id" in paths
    assert "plcs[1].colour" in paths


def test_negative_simulator_values_are_refused(tmp_path: Path) -> None:
    doc = site_doc(tmp_path)
    doc["plcs"][0]["length_mm"] = -1
    doc["plcs"][1]["lanes"] = -2
    paths = [p for p, _ in errors_of(doc)]
    assert {"plcs[0].length_mm", "plcs[1].lanes"} <= set(paths)


def test_duplicate_ids(tmp_path: Path) -> None:
    doc = site_doc(tmp_path)
    doc["plcs"][1]["id"] = "conveyor-1"
    errs = errors_of(doc)
    assert ("plcs[1].id", "duplicate id 'conveyor-1' (first at [0])") in errs


def test_same_endpoint_and_unit_twice(tmp_path: Path) -> None:
    doc = site_doc(tmp_path)
    doc["plcs"][1].update(host="127.0.0.1", port=15020, unit=1)
    errs = errors_of(doc)
    assert any(
        p == "plcs[1].port" and "127.0.0.1:15020 unit 1" in m and "plcs[0] (conveyor-1)" in m
        for p, m in errs
    )


def test_same_endpoint_other_unit_is_fine(tmp_path: Path) -> None:
    doc = site_doc(tmp_path)
    doc["plcs"][1].update(host="127.0.0.1", port=15020, unit=2)
    assert len(parse_site(doc).plcs) == 2


def test_every_site_the_simulator_accepts_loads(tmp_path: Path) -> None:
    """Each key the simulator's PlcSpec reads is accepted by the controller."""
    entry = {
        "id": "c.1_x-y",
        "kind": "conveyor",
        "port": 1502,
        "unit": 247,
        "length_mm": 1,
        "max_speed_mm_s": 2000,
        "speed_mm_s": 0,
        "ramp_s": 0.0,
        "jam_rate_per_h": 0,
        "lanes": 0,
        "lane_capacity": 0,
        "queue_capacity": 0,
        "induct_mm": 0,
        "lane_pitch_mm": 0,
        "loop_mm": 0,
        "max_recirculations": 0,
        "lane_drain_s": 0,
    }
    doc = site_doc(tmp_path, plcs="")
    doc["plcs"] = [entry]
    assert parse_plcs(doc)[0].id == "c.1_x-y"
    assert parse_site(doc).plcs[0].id == "c.1_x-y"


def test_build_plc_picks_the_driver_and_heartbeat(tmp_path: Path) -> None:
    doc = site_doc(tmp_path)
    conveyor, sorter = parse_site(doc).plcs
    c = build_plc(conveyor)
    s = build_plc(sorter)
    assert isinstance(c.driver, ConveyorDriver)
    assert isinstance(s.driver, SorterDriver)
    assert c.link.name == "modbus:conveyor-1"
    assert (s.link.config.host, s.link.config.port, s.driver.unit) == ("10.0.0.7", 15021, 3)
    assert s.link.config.request_timeout_s == 0.3
    assert c.link._heartbeats == [(1, c.driver.map["heartbeat"].address)]
    assert s.link._heartbeats == []  # heartbeat = false
    snap = c.snapshot()
    assert (snap["link"], snap["health"], snap["epoch"]) == ("down", "ok", None)
