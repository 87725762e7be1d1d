"""Hostile and edge-case requests against a live controller (uvicorn on 127.0.0.1), beside the
schemathesis run (fault case S3): inputs a generator rarely produces but people and scanners
send — NUL bytes and traversal in asset paths, infinite, NaN and huge numbers in queries, a
history server that cannot answer the query. Each answer is the documented 4xx (or 502 for the
history server) as ``application/problem+json``, never a 5xx from the controller itself, and
the controller keeps serving. A new case is one line in ``POISON``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.controller_proc import ControllerProcess
from tests.influx_servers import VictoriaMetrics, have_victoria
from tests.mosquitto import MosquittoBroker
from tests.sites import auth_headers, write_small_site

pytestmark = pytest.mark.timeout(120)

PROBLEM = "application/problem+json"
HISTORY = "/api/v1/history?shelf=sh0"
NAN_BODY = b'{"order_id": "P-1", "lines": [{"sku": "K0", "qty": NaN}], "pack_station": "PS1"}'
HUGE_BODY = b'{"order_id": "P-1", "lines": [{"sku": "K0", "qty": 1e400}], "pack_station": "PS1"}'

# (method, path, role or None for no token, extra headers, body, the statuses allowed)
POISON: list[tuple[str, str, str | None, dict[str, str], bytes | None, set[int]]] = [
    ("GET", "/dashboard/index.html%00.js", None, {}, None, {404}),
    ("GET", "/dashboard/%00", None, {}, None, {404}),
    ("GET", "/dashboard/app.js%0a", None, {}, None, {404}),
    ("GET", "/dashboard/" + "a" * 4000 + ".js", None, {}, None, {404}),
    ("GET", "/dashboard/" + "/".join(["b" * 250] * 12) + ".js", None, {}, None, {404}),
    ("GET", "/dashboard/..%2f..%2fpyproject.toml", None, {}, None, {404}),
    ("GET", "/dashboard/%2e%2e/%2e%2e/pyproject.toml", None, {}, None, {404}),
    ("GET", "/dashboard/a%5c..%5c..%5cpyproject.toml", None, {}, None, {404}),
    ("GET", f"{HISTORY}&every=inf", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&every=-inf", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&every=nan", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&every=1e18", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&every=1e400", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&every=1e9", "engineer", {}, None, {200}),  # the widest bucket
    ("GET", f"{HISTORY}&from=0&to=1e11&every=1e9", "engineer", {}, None, {200}),
    ("GET", f"{HISTORY}&from=0&to=1e11&every=0.001", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&from=nan", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&to=inf", "engineer", {}, None, {422}),
    ("GET", f"{HISTORY}&from=-1e400", "engineer", {}, None, {422}),
    ("GET", "/api/v1/history?shelf=%00", "engineer", {}, None, {404}),
    ("GET", "/api/v1/history?sku=" + "k" * 5000, "engineer", {}, None, {404}),
    ("GET", "/api/v1/orders/%00", "floor", {}, None, {404}),
    ("GET", "/api/v1/orders/" + "x" * 4000, "supervisor", {}, None, {404}),
    ("POST", "/api/v1/orders/%00/ship", "supervisor", {}, b'{"carrier":"c","tracking":"t"}', {404}),
    ("POST", "/api/v1/picks", "floor", {"Idempotency-Key": "p1"}, NAN_BODY, {422}),
    ("POST", "/api/v1/picks", "floor", {"Idempotency-Key": "p2"}, HUGE_BODY, {422}),
    ("POST", "/api/v1/picks", "floor", {"Idempotency-Key": "k" * 300}, b"{}", {400, 422}),
]


async def send(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    role: str | None,
    headers: dict[str, str],
    body: bytes | None,
) -> httpx.Response:
    all_headers = {**(auth_headers(role) if role else {}), **headers}
    if body is not None:
        all_headers["Content-Type"] = "application/json"
    return await client.request(method, path, headers=all_headers, content=body)


def check_problem(r: httpx.Response, allowed: set[int], what: str) -> dict[str, Any]:
    assert r.status_code in allowed, f"{what}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith(PROBLEM), (what, r.headers, r.text[:300])
        body: dict[str, Any] = r.json()
        assert body["status"] == r.status_code
        assert "Traceback" not in r.text
        return body
    return {}


async def live_controller(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> ControllerProcess:
    """``floorhand run`` on the small test site with the embedded history, ready."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, history_backend="sqlite")
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    return ctl


async def test_poison_requests_get_clear_4xx_problems(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> None:
    ctl = await live_controller(mosquitto, tmp_path, controllers)
    async with httpx.AsyncClient(base_url=ctl.base, timeout=10.0) as client:
        for method, path, role, headers, body, allowed in POISON:
            r = await send(client, method, path, role, headers, body)
            check_problem(r, allowed, f"{method} {path[:80]}")
    assert (await ctl.get("/api/v1/ready"))["ready"] is True
    assert "Traceback" not in ctl.log_path.read_text(errors="replace"), ctl.tail()


@pytest.mark.skipif(not have_victoria(), reason="victoria-metrics is not installed")
@pytest.mark.parametrize("backend", ["influxdb2", "influxdb1"])
async def test_history_server_without_the_query_language_is_a_502_problem(
    backend: str,
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
) -> None:
    """victoria-metrics stores the writes of both Influx backends but answers neither Flux
    (``/api/v2/query``) nor InfluxQL (``/query``): 400. The history endpoint says so with a
    502 problem naming the cause, not a 500; the controller keeps serving."""
    server = VictoriaMetrics(tmp_path / "vm")
    await asyncio.to_thread(server.start)
    try:
        site = write_small_site(tmp_path, mqtt_port=mosquitto.port, history_backend=None)
        settings = 'org = "o"\nbucket = "b"\n' if backend == "influxdb2" else 'db = "d"\n'
        with site.open("a") as f:
            f.write(f'\n[history]\nbackend = "{backend}"\nurl = "{server.url}"\n{settings}')
        ctl = ControllerProcess(site, tmp_path, env={"FLOORHAND_INFLUX_TOKEN": "t"})
        controllers.append(ctl)
        await ctl.start()
        async with httpx.AsyncClient(base_url=ctl.base, timeout=10.0) as client:
            r = await send(client, "GET", HISTORY, "supervisor", {}, None)
            problem = check_problem(r, {502}, backend)
            assert "refused the query" in problem["detail"], problem
            if backend == "influxdb2":
                assert "Flux" in problem["detail"], problem
        assert (await ctl.get("/api/v1/ready"))["ready"] is True
        assert "Traceback" not in ctl.log_path.read_text(errors="replace"), ctl.tail()
    finally:
        await asyncio.to_thread(server.stop)
