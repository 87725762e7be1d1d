"""The site file's JSON Schema (`floorhand config schema`) and its key reference
(docs/site-file.md) come from the models in controller/config.py and stay true to them."""

from __future__ import annotations

import copy
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from controller import site_schema
from controller.__main__ import main
from controller.config import SiteConfig, parse_site

ROOT = Path(__file__).resolve().parents[2]
SITES = sorted((ROOT / "firmware-configs" / "sites").glob("*.toml"))
DOC = ROOT / "docs" / "site-file.md"

jsonschema_rs = pytest.importorskip("jsonschema_rs")


def _site(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _validator() -> Any:
    return jsonschema_rs.Draft202012Validator(site_schema.site_json_schema())


def test_config_schema_command_prints_the_site_files_json_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == site_schema.site_json_schema()
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    keepalive = printed["$defs"]["MqttConfig"]["properties"]["keepalive_s"]
    assert keepalive["x-unit"] == "s"
    assert keepalive["minimum"] == 1
    assert keepalive["maximum"] == 600
    assert "keep-alive" in keepalive["description"]


@pytest.mark.parametrize("path", SITES, ids=[p.name for p in SITES])
def test_every_shipped_site_file_is_valid_against_the_schema(path: Path) -> None:
    data = _site(path)
    parse_site(copy.deepcopy(data), str(path))  # the controller accepts it too
    errors = [e.message for e in _validator().iter_errors(data)]
    assert errors == []


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d["mqtt"].update(keepalive_s=0), "below its minimum"),
        (lambda d: d["site"].update(stale_after_interval=3), "unknown key (a typo)"),
        (lambda d: d["history"].update(backend="influx"), "not one of the backends"),
        (lambda d: d["skus"][0].update(dwell_s="5s"), "a string where seconds go"),
        (lambda d: d["shelves"][0].update(tolerance_frac=0.7), "above 0.5"),
        (lambda d: d["shelves"][0].pop("sku"), "a required key missing"),
        (lambda d: d["zones"][0].update(id="a/b"), "an id that breaks MQTT topics"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_the_schema_rejects_a_bad_site_file(mutate: Any, why: str) -> None:
    data = _site(ROOT / "firmware-configs" / "sites" / "demo.toml")
    mutate(data)
    assert not _validator().is_valid(data), why


def _models(model: type[BaseModel]) -> typing.Iterator[type[BaseModel]]:
    yield model
    for field in model.model_fields.values():
        sub = site_schema._sub_model(field.annotation)
        if sub is not None:
            yield from _models(sub)


def test_every_key_has_a_meaning_and_every_measure_a_unit() -> None:
    undocumented = [
        f"{m.__name__}.{k}"
        for m in _models(SiteConfig)
        for k, f in m.model_fields.items()
        if not (f.description or "").strip()
    ]
    assert undocumented == []
    for model, key, unit in [
        ("SkuConfig", "dwell_s", "s"),
        ("SkuConfig", "hysteresis_units", "units"),
        ("ShelfConfig", "tolerance_frac", "fraction of a unit"),
        ("SiteInfo", "stale_after_intervals", "reporting intervals"),
        ("MqttConfig", "receive_maximum", "messages"),
        ("HistoryConfig", "backoff_max_s", "s"),
        ("JournalConfig", "max_outbox_rows", "rows"),
    ]:
        cls = next(m for m in _models(SiteConfig) if m.__name__ == model)
        assert site_schema.unit_of(cls, key) == unit, (model, key)


def test_docs_site_file_is_generated_from_the_models() -> None:
    """Fails when a key, default, bound or docstring changed without
    `python -m controller.site_schema --write-doc`."""
    current = DOC.read_text(encoding="utf-8")
    assert site_schema.render_doc(current) == current
    for needle in (
        "| `dwell_s` | float (≥ 0) | `5.0` | s |",
        "| `hysteresis_units` | integer (≥ 0) | unset | units |",
        "| `tolerance_frac` | float (> 0, ≤ 0.5) | `0.3` | fraction of a unit |",
        "| `stale_after_intervals` | float (≥ 1.5) | `3.0` | reporting intervals |",
        "| `receive_maximum` | integer (≥ 1, ≤ 65_535) | `4_000` | messages |",
        "| `backoff_initial_s` | float (> 0, ≤ 60) | `0.2` | s |",
        "| `max_outbox_rows` | integer (≥ 1_000) | `5_000_000` | rows |",
        "### `[shelves.reorder]`",
        "### `[[api.tokens]]`",
    ):
        assert needle in current


def test_every_key_of_every_table_is_in_the_doc() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for header, model in site_schema._sections(SiteConfig, "", False):
        if model is SiteConfig:
            continue
        section = doc.split(f"### `{header}`\n", 1)[1].split("\n### ", 1)[0]
        for key in model.model_fields:
            assert f"| `{key}` |" in section, (header, key)
