"""Applying a live catalogue change to ingest in O(changed) (controller/catalog/live.py
`_apply_plan`, `IngestService.apply_topology` with the shelves and scales a change touches):
the same routes, devices, channels and states as the rebuild of every mapping, with only the
changed scales' topics made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import controller.services.ingest as ingest_module
from controller.adapters.journal import Journal
from controller.catalog.diff import diff
from controller.catalog.live import _apply_plan, _site_with
from controller.catalog.records import Catalogue
from controller.config import ScaleConfig, SiteConfig, load_site
from controller.services.ingest import IngestService, IngestSettings, shelf_specs
from tests.unit.test_ingest import DEMO, NOW, FakeLink


def _ingest(tmp_path: Path, site: SiteConfig, name: str) -> IngestService:
    journal = Journal(tmp_path / f"{name}.sqlite")
    journal.open()
    return IngestService(
        IngestSettings.from_site(site),
        journal,
        FakeLink(),
        lambda events: None,
        clock=lambda: NOW,
        shelf_specs=shelf_specs(site),
    )


def _changed(site: SiteConfig) -> Catalogue:
    """Scale c12 (ESPHome) and its shelves removed, shelf A-01-2 removed and another shelf put
    on its channel, a native scale with a shelf added, two scales' live columns changed."""
    a01_2 = next(sh for sh in site.shelves if sh.id == "A-01-2")
    shelves = [sh for sh in site.shelves if sh.scale != "scale-c12" and sh.id != "A-01-2"]
    shelves.append(a01_2.model_copy(update={"id": "A-01-2b"}))
    a02 = next(sc for sc in site.scales if sc.id == "scale-a02")
    scales: list[ScaleConfig] = []
    for sc in site.scales:
        if sc.id == "scale-c12":
            continue
        if sc.id == "scale-a02":
            sc = sc.model_copy(update={"max_weight_g": sc.max_weight_g + 1000})
        elif sc.id == "scale-c01":
            sc = sc.model_copy(update={"reporting_interval_s": sc.reporting_interval_s + 1})
        scales.append(sc)
    scales.append(a02.model_copy(update={"id": "scale-z01"}))
    shelves.append(a01_2.model_copy(update={"id": "Z-01-1", "scale": "scale-z01", "channel": 0}))
    return Catalogue(site.skus, tuple(scales), tuple(shelves))


def _mappings(ingest: IngestService) -> dict[str, Any]:
    return {
        "routes": {t: (r.kind, r.scale, r.channel) for t, r in ingest.routes.items()},
        "devices": dict(ingest.devices),
        "by_channel": {k: s.shelf_id for k, s in ingest._by_channel.items()},
        "specs": dict(ingest.specs),
        "base": dict(ingest.base_specs),
        "states": sorted(ingest.states.keys()),
    }


def test_a_change_applied_to_ingest_in_o_changed_is_the_rebuild_of_every_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = load_site(DEMO)
    before = Catalogue(site.skus, site.scales, site.shelves)
    after = _changed(site)
    changes = diff(before, after)
    new_site, specs = _site_with(site, after)
    plan = _apply_plan(before, after, changes, new_site)
    assert sorted(plan.shelves) == sorted(
        ["A-01-2", "A-01-2b", "Z-01-1"] + [sh.id for sh in site.shelves if sh.scale == "scale-c12"]
    )
    assert [(o and o.id, n and n.id) for o, n in plan.scales] == [
        ("scale-a02", "scale-a02"),
        ("scale-c01", "scale-c01"),
        ("scale-c12", None),
        (None, "scale-z01"),
    ]

    whole = _ingest(tmp_path, site, "whole")
    whole.apply_topology(new_site.scales, specs)

    routed: list[str] = []
    routes = ingest_module._routes

    def counted(settings: Any, scales: Any) -> Any:
        routed.extend(sc.id for sc in scales)
        return routes(settings, scales)

    some = _ingest(tmp_path, site, "some")
    monkeypatch.setattr(ingest_module, "_routes", counted)
    some.apply_topology(new_site.scales, specs, shelves=plan.shelves, scale_changes=plan.scales)

    assert _mappings(some) == _mappings(whole)
    assert "Z-01-1" in some.states
    assert "A-01-2" not in some.states
    assert some._by_channel[("scale-a01", 1)].shelf_id == "A-01-2b"
    assert some.routes["floorhand/demo/A/scale/scale-z01"].scale.id == "scale-z01"
    # Only the changed scales' topics were made (each changed one: its old and new topics).
    assert sorted(routed) == sorted(
        ["scale-a02", "scale-a02", "scale-c01", "scale-c01", "scale-c12", "scale-z01"]
    )


def test_the_shelves_recounted_are_those_whose_spec_can_have_changed() -> None:
    """A shelf's spec is made of its own and its scale's columns: every SKU's threshold
    changed recounts no shelf (at 100k SKUs: no comparison of 100k specs on the event loop);
    a changed shelf and the shelves of a changed scale are compared."""
    site = load_site(DEMO)
    before = Catalogue(site.skus, site.scales, site.shelves)
    skus = tuple(s.model_copy(update={"reorder_point": s.reorder_point + 1}) for s in site.skus)
    after = Catalogue(skus, site.scales, site.shelves)
    new_site, specs = _site_with(site, after)
    assert _apply_plan(before, after, diff(before, after), new_site).recount == []
    assert specs == shelf_specs(site)  # what the recount would have compared: all equal
    scales = tuple(
        sc.model_copy(update={"max_weight_g": sc.max_weight_g + 1}) if sc.id == "scale-a02" else sc
        for sc in site.scales
    )
    shelves = tuple(
        sh.model_copy(update={"tare_g": sh.tare_g + 1}) if sh.id == "B-01-1" else sh
        for sh in site.shelves
    )
    after = Catalogue(skus, scales, shelves)
    new_site, specs = _site_with(site, after)
    plan = _apply_plan(before, after, diff(before, after), new_site)
    assert sorted(plan.recount) == ["A-02-1", "A-02-2", "B-01-1"]
    old = shelf_specs(site)
    assert sorted(sid for sid, spec in specs.items() if old[sid] != spec) == plan.recount
