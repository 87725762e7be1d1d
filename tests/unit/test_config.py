"""Site configuration: the demo loads; bad files fail with the offending path."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from controller.__main__ import main
from controller.config import ConfigError, load_site, parse_site

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "firmware-configs" / "sites" / "demo.toml"


def demo_doc() -> dict[str, Any]:
    return tomllib.loads(DEMO.read_text())


def errors_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_site(doc, "test.toml")
    return info.value.errors


def test_demo_site_loads_with_about_fifty_shelves() -> None:
    site = load_site(DEMO)
    assert site.site.id == "demo"
    assert 40 <= len(site.shelves) <= 60
    assert len(site.zones) >= 3
    assert {s.format for s in site.scales} == {"native", "esphome"}
    assert site.mqtt.host == "127.0.0.1"


def test_unknown_sku_names_the_shelf() -> None:
    doc = demo_doc()
    doc["shelves"][3]["sku"] = "SKU-NOPE"
    assert ("shelves[3].sku", "unknown SKU 'SKU-NOPE'") in errors_of(doc)


def test_two_shelves_on_one_scale_channel() -> None:
    doc = demo_doc()
    doc["shelves"][1]["channel"] = doc["shelves"][0]["channel"]
    doc["shelves"][1]["scale"] = doc["shelves"][0]["scale"]
    errs = errors_of(doc)
    assert any(p == "shelves[1].channel" and "already used by shelves[0]" in m for p, m in errs)


def test_negative_weights_and_reorder_point_over_max() -> None:
    doc = demo_doc()
    doc["shelves"][2]["tare_g"] = -10.0
    errs = errors_of(doc)
    assert any(p == "shelves[2].tare_g" for p, _ in errs)
    doc = demo_doc()
    doc["skus"][0]["reorder_point"] = doc["skus"][0]["max_stock"] + 1
    errs = errors_of(doc)
    assert any(p == "skus[0]" and "reorder_point" in m and "max_stock" in m for p, m in errs)


def test_unknown_keys_are_refused() -> None:
    doc = demo_doc()
    doc["site"]["colour"] = "blue"
    assert any(p == "site.colour" for p, _ in errors_of(doc))


def test_bad_mqtt_url_and_bind() -> None:
    doc = demo_doc()
    doc["mqtt"]["url"] = "http://127.0.0.1:1883"
    doc["api"]["bind"] = "8080"
    paths = {p for p, _ in errors_of(doc)}
    assert {"mqtt.url", "api.bind"} <= paths


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOORHAND_MQTT_URL", "mqtt://127.0.0.1:11883")
    monkeypatch.setenv("FLOORHAND_API_BIND", "127.0.0.1:18080")
    site = load_site(DEMO)
    assert site.mqtt.port == 11883
    assert site.api.bind == "127.0.0.1:18080"
    site = load_site(DEMO, {"mqtt_url": "mqtt://127.0.0.1:2883"})
    assert site.mqtt.port == 2883


def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOORHAND_MQTT_USERNAME", "ctl")
    monkeypatch.setenv("FLOORHAND_MQTT_PASSWORD", "s3cret")
    assert load_site(DEMO).mqtt.credentials() == ("ctl", "s3cret")


def test_check_config_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check-config", str(DEMO)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO.read_text().replace('sku = "SKU-0001"', 'sku = "SKU-9999"', 1))
    with pytest.raises(SystemExit) as info:
        main(["check-config", str(bad)])
    assert info.value.code == 2
    assert "unknown SKU 'SKU-9999'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-config", str(tmp_path / "missing.toml")])
    broken = tmp_path / "broken.toml"
    broken.write_text("[site\n")
    with pytest.raises(SystemExit):
        main(["check-config", str(broken)])


def test_history_defaults_to_sqlite_next_to_the_journal(tmp_path: Path) -> None:
    from controller.adapters.sqlite_history import SqliteHistorySink
    from controller.runtime import build_history_sink

    doc = demo_doc()
    del doc["history"]
    doc["journal"]["path"] = str(tmp_path / "j" / "journal.sqlite")
    site = parse_site(doc, "test.toml")
    assert site.history.backend == "sqlite"
    assert site.history.sqlite_path is None
    sink = build_history_sink(site)
    assert isinstance(sink, SqliteHistorySink)
    assert sink.path == tmp_path / "j" / "history.sqlite"
    doc["history"] = {"sqlite_path": str(tmp_path / "elsewhere.sqlite")}  # explicit wins
    sink = build_history_sink(parse_site(doc, "test.toml"))
    assert isinstance(sink, SqliteHistorySink)
    assert sink.path == tmp_path / "elsewhere.sqlite"
    doc["history"] = {"backend": "none"}
    assert parse_site(doc, "test.toml").history.backend == "none"
