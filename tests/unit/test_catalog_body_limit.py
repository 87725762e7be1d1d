"""The catalogue write routes' own body limit (``[api] catalog_max_body_bytes``, docs/api.md
"Limits"): its default admits a 100k-SKU catalogue, its bounds, and which requests it covers
(the HTTP side is tests/integration/test_api_catalog.py)."""

from __future__ import annotations

import pytest

from controller.api.limits import SecurityMiddleware
from controller.config import ApiConfig


def test_the_catalogue_limit_defaults_to_64_mib_and_is_bounded() -> None:
    api = ApiConfig()
    assert api.catalog_max_body_bytes == 64 * 1024 * 1024
    assert api.max_body_bytes == 65_536  # the other routes' limit is unchanged
    assert ApiConfig.model_validate({"catalog_max_body_bytes": 1_024}).catalog_max_body_bytes == (
        1_024
    )
    top = 1024 * 1024 * 1024
    assert ApiConfig.model_validate({"catalog_max_body_bytes": top}).catalog_max_body_bytes == top
    for bad in (1_023, top + 1, 0, -1):
        with pytest.raises(ValueError, match="catalog_max_body_bytes"):
            ApiConfig.model_validate({"catalog_max_body_bytes": bad})


def _limits() -> SecurityMiddleware:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    return SecurityMiddleware(
        app, max_body_bytes=1_000, catalog_max_body_bytes=9_000, rate_per_s=1.0, rate_burst=1
    )


@pytest.mark.parametrize(
    ("method", "path", "limit"),
    [
        ("PUT", "/api/v1/catalog", 9_000),
        ("PATCH", "/api/v1/catalog", 9_000),
        ("PUT", "/api/v1/catalog/", 9_000),
        ("GET", "/api/v1/catalog", 1_000),
        ("POST", "/api/v1/catalog", 1_000),
        ("PUT", "/api/v1/catalog/versions", 1_000),
        ("PUT", "/api/v1/catalogue", 1_000),
        ("POST", "/api/v1/picks", 1_000),
        ("POST", "/api/v1/alerts/K1/ack", 1_000),
    ],
)
def test_only_put_and_patch_of_the_catalogue_take_the_larger_limit(
    method: str, path: str, limit: int
) -> None:
    assert _limits().body_limit(method, path) == limit
