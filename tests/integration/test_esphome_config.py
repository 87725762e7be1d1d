"""ESPHome's own validator on the shipped firmware: ``esphome config`` on shelf-scale.yaml and
shelf-scale-tls.yaml, with a secrets.yaml made here (and a CA made with ``openssl``).

ESPHome (pinned, ``ESPHOME_VERSION``) lives in a cached virtualenv of its own
(``ensure_esphome``): the first run installs it from the package index (about a minute), later
runs reuse it. ``esphome config`` validates offline: it needs no platform or toolchain
download. The configuration it prints (secrets shown as ``!secret`` tags) is read back to check
that ESPHome resolves the MQTT settings the way tests/esphome_yaml.py reads them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.esphome_yaml import (
    ESPHOME_DIR,
    ESPHOME_VERSION,
    PLAIN_YAML,
    TLS_YAML,
    ensure_esphome,
    esphome_loader,
)
from tests.tls import make_test_pki

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="session")
def esphome() -> Path:
    exe, install_s = ensure_esphome()
    if install_s:
        print(f"\ninstalled esphome=={ESPHOME_VERSION} in {install_s:.1f} s", file=sys.stderr)
    return exe


@pytest.fixture
def firmware_dir(tmp_path: Path) -> Path:
    """Both YAML files beside a secrets.yaml, as a user keeps them."""
    for path in ESPHOME_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    pki = make_test_pki(tmp_path / "tls")
    secrets = {
        "wifi_ssid": "warehouse-iot",
        "wifi_password": "test-wifi-password",
        "fallback_ap_password": "test-ap-password",
        "ota_password": "test-ota-password",
        "mqtt_broker": "mqtt.warehouse.lan",
        "mqtt_username": "shelf-c01",
        "mqtt_password": "test-mqtt-password",
        "mqtt_ca_certificate": pki.ca_cert.read_text(),
    }
    (tmp_path / "secrets.yaml").write_text(yaml.safe_dump(secrets))
    return tmp_path


def esphome_config(esphome: Path, yaml_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(esphome), "config", str(yaml_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=yaml_file.parent,
    )


def resolved(output: str) -> dict[str, Any]:
    """The configuration ``esphome config`` prints between its INFO lines."""
    body = "\n".join(ln for ln in output.splitlines() if not ln.startswith(("INFO ", "WARNING ")))
    doc: dict[str, Any] = yaml.load(body, Loader=esphome_loader(Path(".")))
    return doc


@pytest.mark.parametrize(
    ("yaml_file", "port"), [(PLAIN_YAML, 1883), (TLS_YAML, 8883)], ids=["plain", "tls"]
)
def test_esphome_config_validates(
    esphome: Path, firmware_dir: Path, yaml_file: Path, port: int
) -> None:
    done = esphome_config(esphome, firmware_dir / yaml_file.name)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Configuration is valid!" in output
    config = resolved(done.stdout)
    mqtt = config["mqtt"]
    assert mqtt["port"] == port
    assert mqtt["log_topic"] is None
    assert mqtt["discovery"] is False
    assert mqtt["discover_ip"] is False
    for key in ("birth_message", "will_message", "shutdown_message"):
        assert mqtt[key]["topic"] == "shelf-c01/status"
        assert (mqtt[key]["qos"], mqtt[key]["retain"]) == (1, True)
    assert ("certificate_authority" in mqtt) == (port == 8883)
    assert mqtt.get("skip_cert_cn_check", False) is False
    (sensor,) = config["sensor"]
    assert (sensor["name"], sensor["qos"], sensor["retain"]) == ("Shelf Weight", 1, True)


def test_esphome_config_rejects_an_invalid_qos(esphome: Path, firmware_dir: Path) -> None:
    """The validator is live: a QoS MQTT does not have fails it."""
    path = firmware_dir / PLAIN_YAML.name
    text = path.read_text()
    assert text.count("    qos: 1\n    retain: true\n    filters:") == 1
    path.write_text(
        text.replace(
            "    qos: 1\n    retain: true\n    filters:",
            "    qos: 3\n    retain: true\n    filters:",
        )
    )
    done = esphome_config(esphome, path)
    assert done.returncode != 0
    assert "qos" in (done.stdout + done.stderr).lower()
