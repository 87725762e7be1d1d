"""``floorhand_build_info``: which release and Python a scraped controller runs (issue 13)."""

from __future__ import annotations

import platform
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from controller.api.app import create_app
from controller.build import version
from controller.config import load_site
from controller.runtime import Runtime
from tests.sites import auth_headers
from tests.unit.test_read_models import write_zoned_site


async def test_metrics_name_the_release_and_python_the_controller_runs(tmp_path: Path) -> None:
    site = load_site(write_zoned_site(tmp_path, zones=1, shelves_per_zone=1))
    app = create_app(site, runtime=Runtime(site))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.get("/metrics", headers=auth_headers("engineer"))
    assert r.status_code == 200
    samples = [
        s
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
        if s.name == "floorhand_build_info"
    ]
    assert len(samples) == 1, r.text
    assert samples[0].value == 1
    assert samples[0].labels == {
        "version": version(),
        "python": platform.python_version(),
        "site": site.site.id,
    }
