"""``/docs`` (Swagger UI) and ``/redoc`` work on a site network without internet: every script,
style sheet and icon they load is served by the controller itself (issue 13; they loaded from a
CDN and stayed blank offline)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from controller.api.app import create_app
from controller.config import load_site
from controller.runtime import Runtime
from tests.unit.test_read_models import write_zoned_site

_ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.mark.parametrize(
    ("page", "needs"),
    [("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc",))],
)
async def test_api_docs_load_nothing_from_outside(
    tmp_path: Path, page: str, needs: tuple[str, ...]
) -> None:
    site = load_site(write_zoned_site(tmp_path, zones=1, shelves_per_zone=1))
    app = create_app(site, runtime=Runtime(site))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.get(page)
        assert r.status_code == 200, r.text
        assert "//" not in re.sub(r"<!--.*?-->", "", r.text).replace("http://api", ""), (
            "an absolute or protocol-relative URL in the page (a CDN?)"
        )
        urls = [a or b for a, b in _ASSET.findall(r.text)]
        for need in needs:
            assert any(need in u for u in urls), (need, urls)
        for url in urls:
            asset = await client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1_000 or url.endswith("openapi.json"), url
