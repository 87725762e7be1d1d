"""No route dependency runs in a worker thread: FastAPI runs a plain ``def`` dependency in its
thread pool, two thread hops per request, and under ingest load each hop waits for the
interpreter lock (the pick route's runtime lookup was one)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controller.api.app import create_app
from controller.api.auth import effective_routes
from controller.config import load_site
from tests.sites import write_small_site


def _dependencies(dependant: Any) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub
        yield from _dependencies(sub)


def test_every_route_dependency_is_a_coroutine_function(tmp_path: Path) -> None:
    app = create_app(load_site(write_small_site(tmp_path, mqtt_port=1883, scales=1)))
    routes = [r for r in effective_routes(app.routes) if getattr(r, "dependant", None)]
    assert any(getattr(r, "path", "") == "/api/v1/picks" for r in routes)
    sync = sorted(
        {
            f"{r.path}: {getattr(dep.call, '__qualname__', dep.call)}"
            for r in routes
            for dep in _dependencies(r.dependant)
            if dep.call is not None and not inspect.iscoroutinefunction(dep.call)
        }
    )
    assert sync == []
