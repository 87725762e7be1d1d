"""Read the shipped ESPHome YAML the way ESPHome does, as far as these files need it.

``!secret`` values stay placeholders (``Secret``), ``!include`` and ``packages:`` are merged
(the including file wins), ``${name}`` substitutions are applied. ``device_messages`` lists what
the node publishes and its will: the topics the broker's ACL must grant. ``ensure_esphome``
installs ESPHome itself (pinned) into a cached virtualenv, for ``esphome config`` in the slow
set (tests/integration/test_esphome_config.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.cached_venv import ensure_venv

ESPHOME_DIR = Path(__file__).resolve().parents[1] / "firmware-configs" / "esphome"
PLAIN_YAML = ESPHOME_DIR / "shelf-scale.yaml"
TLS_YAML = ESPHOME_DIR / "shelf-scale-tls.yaml"


ESPHOME_VERSION = "2026.6.5"
"""The ESPHome the shipped YAML is validated with (the newest release for Python 3.11)."""


class Secret(str):
    """Placeholder for ``!secret name`` (the value lives in secrets.yaml, never in the repo)."""


@dataclass(frozen=True)
class Include:
    path: Path


def esphome_loader(folder: Path) -> type[yaml.SafeLoader]:
    """A YAML loader for ESPHome files: ``!secret`` → ``Secret``, ``!include`` → ``Include``
    (relative to ``folder``)."""

    class Loader(yaml.SafeLoader):
        pass

    def secret(loader: yaml.SafeLoader, node: yaml.Node) -> Secret:
        assert isinstance(node, yaml.ScalarNode)
        return Secret(loader.construct_scalar(node))

    def include(loader: yaml.SafeLoader, node: yaml.Node) -> Include:
        assert isinstance(node, yaml.ScalarNode)
        return Include(folder / str(loader.construct_scalar(node)))

    Loader.add_constructor("!secret", secret)
    Loader.add_constructor("!include", include)
    return Loader


def _merge(base: Any, override: Any) -> Any:
    """ESPHome's package merge for mappings: keys of ``override`` win, nested maps merge."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return override


def _read(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.load(path.read_text(), Loader=esphome_loader(path.parent))
    packages = doc.pop("packages", {}) or {}
    merged: dict[str, Any] = {}
    for package in packages.values():
        assert isinstance(package, Include), "only !include packages are used here"
        merged = _merge(merged, _read(package.path))
    return _merge(merged, doc)  # type: ignore[no-any-return]


def _substitute(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: subs[m.group(1) or m.group(2)], value)
    if isinstance(value, list):
        return [_substitute(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, subs) for k, v in value.items()}
    return value


def load_config(path: Path) -> dict[str, Any]:
    """The file with its packages merged and its substitutions applied."""
    raw = _read(path)
    subs = {k: str(v) for k, v in raw.get("substitutions", {}).items()}
    doc: dict[str, Any] = _substitute(raw, subs)
    return doc


def object_id(name: str) -> str:
    """ESPHome's object id: snake case (lower case, spaces → "_"), then any character outside
    ``a-z0-9_-`` replaced by "_"."""
    snake = name.lower().replace(" ", "_")
    return re.sub(r"[^a-z0-9_-]", "_", snake)


@dataclass(frozen=True)
class DeviceMessage:
    """One message the node sends (``will``: the broker sends it for the node)."""

    kind: str
    topic: str
    payload: bytes | None
    qos: int
    retain: bool


def device_messages(config: dict[str, Any]) -> list[DeviceMessage]:
    """Every topic the node publishes to (or has published for it), as configured: each
    MQTT-visible sensor's state, birth, will and shutdown, and the log topic unless disabled."""
    mqtt = config["mqtt"]
    prefix = mqtt["topic_prefix"]
    out = []
    for sensor in config.get("sensor", []):
        if sensor.get("internal"):
            continue
        topic = sensor.get("state_topic", f"{prefix}/sensor/{object_id(sensor['name'])}/state")
        out.append(
            DeviceMessage(
                "state", topic, None, int(sensor.get("qos", 0)), bool(sensor.get("retain", True))
            )
        )
    for key, default in (
        ("birth_message", "online"),
        ("will_message", "offline"),
        ("shutdown_message", "offline"),
    ):
        msg = mqtt.get(key, {"topic": f"{prefix}/status", "payload": default})
        if msg:
            out.append(
                DeviceMessage(
                    key.removesuffix("_message"),
                    msg["topic"],
                    str(msg["payload"]).encode(),
                    int(msg.get("qos", 0)),
                    bool(msg.get("retain", True)),
                )
            )
    log_topic = mqtt.get("log_topic", {"topic": f"{prefix}/debug"})
    if log_topic:
        topic = log_topic if isinstance(log_topic, str) else log_topic["topic"]
        out.append(DeviceMessage("log", topic, None, 0, True))
    if mqtt.get("discover_ip", True):
        name = config["esphome"]["name"]
        out.append(DeviceMessage("discover_ip", f"esphome/discover/{name}", None, 0, False))
    return out


def ensure_esphome(timeout_s: float = 900.0) -> tuple[Path, float]:
    """The ``esphome`` command of a virtualenv of its own (its pins would clash with ours),
    installed from the package index on first use and cached across runs. Returns the command
    and the seconds this call spent installing (0.0 when cached). Raises RuntimeError with
    pip's output when the install fails."""
    venv, took_s = ensure_venv("esphome", ESPHOME_VERSION, timeout_s)
    return venv / "bin" / "esphome", took_s
