"""API security over real HTTP (fault case S4, S5): ``floorhand run`` as a child process under
uvicorn on 127.0.0.1, a real mosquitto, a simulated conveyor PLC over Modbus TCP.

* every route declares who may call it, and the role matrix generated from the served OpenAPI
  holds for no token, a wrong token and each role;
* 413 for oversized bodies (declared or streamed), 429 with Retry-After per token, STOP exempt;
* ``/metrics`` parses as Prometheus text and carries the runtime's live counters.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from controller.api.app import create_app
from controller.api.auth import declared_roles, effective_routes, is_public
from controller.config import load_site
from controller.runtime import Runtime
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from tests.controller_proc import ControllerProcess
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import TOKENS, auth_headers, grams, topic, write_small_site

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("floor", "supervisor", "engineer")
PUBLIC_PATHS = {"/api/v1/health", "/api/v1/ready"}
"""Deliberately open (probes); anything else open is a mistake."""
PROBE_ID = "matrix-probe"
"""Path parameter value for the matrix: no such SKU/order/PLC/shelf, so nothing is changed."""

EXTRA_ENGINEER = "extra-engineer-token-0123456789abcdef"


async def start(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    controllers: list[ControllerProcess],
    *,
    extra_site: str = "",
    env: dict[str, str] | None = None,
    **api: str | int | float,
) -> ControllerProcess:
    path = write_small_site(tmp_path, mqtt_port=mosquitto.port, api_settings=api or None)
    if extra_site:
        path.write_text(path.read_text() + extra_site)
    ctl = ControllerProcess(path, tmp_path, env=env)
    controllers.append(ctl)
    await ctl.start()
    return ctl


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


def operations(openapi: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield method.upper(), path, op


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", PROBE_ID, path)


def is_problem(r: httpx.Response) -> bool:
    body = r.json()
    return (
        r.headers["content-type"] == "application/problem+json"
        and body["status"] == r.status_code
        and bool(body["title"])
    )


# -- declarations (in-process: covers WebSocket routes and routes hidden from the schema) ----
def test_every_api_route_declares_its_roles(tmp_path: Path) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=1))
    app = create_app(site, runtime=Runtime(site))
    undeclared, public = [], set()
    checked = 0
    for route in effective_routes(app.routes):
        path = str(getattr(route, "path", "") or "")
        if not (path.startswith("/api/v1") or path == "/metrics"):
            continue
        checked += 1
        roles = declared_roles(route)
        if roles is None:
            undeclared.append(path)
        elif getattr(route, "methods", None) and is_public(route):
            public.add(path)
    assert checked >= 12
    assert undeclared == [], (
        f"routes without require(...) or public: {undeclared}; declare who may call them "
        "(docs/api.md, 'Declaring roles')"
    )
    assert public == PUBLIC_PATHS


def test_docs_matrix_matches_the_declarations(tmp_path: Path) -> None:
    """docs/api.md's role matrix lists every operation with exactly the roles it declares."""
    site = load_site(write_small_site(tmp_path, mqtt_port=1))
    schema = create_app(site, runtime=Runtime(site)).openapi()
    want = {}
    for method, path, op in operations(schema):
        if op.get("x-floorhand-public"):
            cells = ("public",) * 3
        else:
            roles = op.get("x-floorhand-roles", [])
            cells = tuple("✓" if r in roles else "—" for r in ROLES)
        want[f"{method} {path}"] = cells
    doc = (ROOT / "docs" / "api.md").read_text()
    cell = r"(✓|—|public)"
    rows = {
        m[0]: tuple(m[1:])
        for m in re.findall(rf"^\| `([A-Z]+ /[^`]*)` \| {cell} \| {cell} \| {cell} \|$", doc, re.M)
    }
    table = "\n".join(f"| `{k}` | {' | '.join(v)} |" for k, v in want.items())
    assert rows == want, f"update the role matrix in docs/api.md to:\n{table}"


# -- S4: the role matrix over HTTP, generated from the served OpenAPI ------------------------
async def test_role_matrix_over_http(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    client: httpx.AsyncClient,
) -> None:
    ctl = await start(tmp_path, mosquitto, controllers)
    openapi = (await client.get(ctl.base + "/openapi.json")).json()
    assert openapi["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ops = list(operations(openapi))
    assert len(ops) >= 12
    failures: list[str] = []
    tried = 0
    for n, (method, path, op) in enumerate(ops):
        url = ctl.base + concrete(path)
        kw: dict[str, Any] = {"headers": {"Idempotency-Key": f"matrix-{n}"}}
        if "requestBody" in op:
            kw["json"] = {}
        if op.get("x-floorhand-public"):
            assert path in PUBLIC_PATHS, f"{method} {path} is public"
            r = await client.request(method, url, **kw)
            if r.status_code in (401, 403):
                failures.append(f"{method} {path}: public but answered {r.status_code}")
            continue
        allowed = op.get("x-floorhand-roles")
        if not allowed:
            failures.append(f"{method} {path}: no x-floorhand-roles (no require(...))")
            continue
        for token in (None, "not-a-valid-token-0123456789"):
            headers = dict(kw["headers"])
            if token:
                headers["Authorization"] = f"Bearer {token}"
            r = await client.request(method, url, **{**kw, "headers": headers})
            tried += 1
            if r.status_code != 401:
                failures.append(f"{method} {path} token={token!r}: {r.status_code}, want 401")
            elif r.headers.get("www-authenticate") != "Bearer" or not is_problem(r):
                failures.append(f"{method} {path}: 401 without WWW-Authenticate/problem+json")
        for role in ROLES:
            headers = {**kw["headers"], **auth_headers(role)}
            r = await client.request(method, url, **{**kw, "headers": headers})
            tried += 1
            if role in allowed:
                if r.status_code in (401, 403):
                    failures.append(f"{method} {path} as {role}: {r.status_code}, want allowed")
            elif r.status_code != 403 or not is_problem(r):
                failures.append(f"{method} {path} as {role}: {r.status_code}, want 403")
    assert failures == []
    assert tried >= 5 * 12


# -- S5: body limit ----------------------------------------------------------------------------
async def test_oversized_bodies_are_refused_with_413(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    client: httpx.AsyncClient,
) -> None:
    ctl = await start(tmp_path, mosquitto, controllers, max_body_bytes=4096)
    url = ctl.base + "/api/v1/picks"
    headers = {**auth_headers("engineer"), "Idempotency-Key": "big-1"}
    ten_mb = b"x" * (10 * 1024 * 1024)

    # Declared: refused from the Content-Length, the body is never read.
    r = await client.post(url, content=ten_mb, headers=headers)
    assert r.status_code == 413
    assert is_problem(r)
    assert "4096 bytes" in r.json()["detail"]

    # The same body streamed in chunks (no length): counted as it arrives, refused past it.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10 * 256):
            yield b" " * 4096

    r = await client.post(url, content=chunks(), headers={**headers, "Idempotency-Key": "big-2"})
    assert r.status_code == 413
    assert is_problem(r)

    # The answer comes while the body is still incomplete: the server did not wait for (or
    # read) the rest. Raw socket, so nothing more is sent than written here.
    for framing in (b"Content-Length: 10485760\r\n", b"Transfer-Encoding: chunked\r\n"):
        head = await raw_post_head(ctl, "/api/v1/picks", framing, b"2000\r\n" + b" " * 8192)
        assert head.startswith(b"HTTP/1.1 413 "), head

    # Under the limit the request goes through to the route (an invalid pick: 422).
    r = await client.post(
        url, json={"order_id": "o"}, headers={**headers, "Idempotency-Key": "small"}
    )
    assert r.status_code == 422
    assert (await client.get(ctl.base + "/api/v1/ready")).status_code == 200
    metrics = await scrape(client, ctl)
    assert value(metrics, "floorhand_http_body_too_large_total") == 4


async def raw_post_head(ctl: ControllerProcess, path: str, framing: bytes, body: bytes) -> bytes:
    """POST with an unfinished body; return the response head the server sends anyway."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ctl.api_port)
    try:
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + TOKENS["engineer"].encode() + b"\r\n"
            b"Idempotency-Key: raw\r\nContent-Type: application/json\r\n" + framing + b"\r\n"
        )
        writer.write(body)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


# -- S5: rate limit per token; STOP never limited ------------------------------------------------
async def test_rate_limit_per_token_with_retry_after_and_stop_exempt(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    client: httpx.AsyncClient,
) -> None:
    model = ConveyorPlc("conveyor-1")
    async with PlcHost(model, seed=3) as host:
        plc = f'\n[[plcs]]\nid = "conveyor-1"\nkind = "conveyor"\nport = {host.port}\n'
        ctl = await start(
            tmp_path,
            mosquitto,
            controllers,
            extra_site=plc,
            env={"FLOORHAND_TOKEN_SCRAPER": f"engineer:{EXTRA_ENGINEER}"},
            rate_per_s=0.01,  # one token per 100 s: nothing refills during the test
            rate_burst=5,
        )
        # The controller's link is up once it has sent two heartbeats (the first was answered).
        await model.wait_until(
            lambda: sum(1 for _, w in model.writes if "heartbeat" in w) >= 2, timeout_s=20
        )
        stock = ctl.base + "/api/v1/stock"
        eng = auth_headers("engineer")
        codes = [(await client.get(stock, headers=eng)).status_code for _ in range(5)]
        assert codes == [200] * 5
        r = await client.get(stock, headers=eng)
        assert r.status_code == 429
        assert is_problem(r)
        retry_after = int(r.headers["retry-after"])
        assert 1 <= retry_after <= 100
        # Per token: the floor token has its own bucket.
        assert (await client.get(stock, headers=auth_headers("floor"))).status_code == 200
        # Without a valid token: one bucket per client address (401 until it is empty) ...
        anon = [(await client.get(stock)).status_code for _ in range(6)]
        assert anon == [401] * 5 + [429]
        # ... while the probes are never limited.
        assert (await client.get(ctl.base + "/api/v1/ready")).status_code == 200
        # STOP goes through while the engineer token is limited, every time.
        stop = ctl.base + "/api/v1/plcs/conveyor-1/stop"
        answers = [(await client.post(stop, headers=eng)) for _ in range(8)]
        assert [a.status_code for a in answers] == [200] * 8, answers[-1].text
        assert answers[-1].json()["command"] == "stop"
        # ... while other POSTs of the same token are still refused.
        start_url = ctl.base + "/api/v1/plcs/conveyor-1/start"
        assert (await client.post(start_url, headers=eng)).status_code == 429
        metrics = await scrape(client, ctl, token=EXTRA_ENGINEER)
        assert value(metrics, "floorhand_http_rate_limited_total") == 3
        assert value(metrics, "floorhand_http_stop_requests_total") == 8
        assert (
            value(
                metrics,
                "floorhand_http_requests_total",
                route="/api/v1/plcs/{plc_id}/stop",
                status="200",
            )
            == 8
        )


# -- /metrics ------------------------------------------------------------------------------------
async def scrape(
    client: httpx.AsyncClient, ctl: ControllerProcess, token: str | None = None
) -> dict[str, list[Sample]]:
    r = await client.get(
        ctl.base + "/metrics",
        headers={"Authorization": f"Bearer {token or TOKENS['engineer']}"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(metrics: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    found = [
        s.value
        for samples in metrics.values()
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert found, f"no sample {name}{labels} in {sorted(metrics)}"
    return sum(found)


async def test_metrics_expose_live_runtime_counters(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    client: httpx.AsyncClient,
) -> None:
    ctl = await start(tmp_path, mosquitto, controllers)
    t0 = time.time()
    good = [
        (
            topic("s0"),
            orjson.dumps({"device": "s0", "seq": i, "ts": t0 + i * 0.1, "grams": grams(7)}),
        )
        for i in range(20)
    ]
    # The bad message first: once the last good one is applied, it has been handled too.
    await asyncio.to_thread(paho_publish, mosquitto.port, [(topic("s1"), b"{not json"), *good])
    await ctl.wait_applied({"s0": 19})
    health = await ctl.get("/api/v1/health")

    for _ in range(3):
        assert (await client.get(ctl.base + "/api/v1/stock", headers=auth_headers())).status_code
    assert (await client.get(ctl.base + "/api/v1/stock")).status_code == 401
    assert (await client.get(ctl.base + "/metrics")).status_code == 401
    r = await client.get(ctl.base + "/metrics", headers=auth_headers("supervisor"))
    assert r.status_code == 403

    m = await scrape(client, ctl)
    expected = {
        "floorhand_ingest_messages",
        "floorhand_ingest_readings",
        "floorhand_ingest_rejected",
        "floorhand_ingest_commits",
        "floorhand_outbox_rows",
        "floorhand_backpressure",
        "floorhand_link_state",
        "floorhand_link_connects",
        "floorhand_alerts",
        "floorhand_alerts_active",
        "floorhand_alerts_acknowledged",
        "floorhand_alerts_snoozed",
        "floorhand_shelves",
        "floorhand_http_requests",
        "floorhand_http_request_duration_seconds",
        "floorhand_http_auth_failures",
        "floorhand_http_rate_limited",
        "floorhand_http_body_too_large",
        "floorhand_pick_latency_seconds",
        "floorhand_live_clients",
        "floorhand_live_dropped",
        "floorhand_live_refused",
    }
    assert expected <= set(m), expected - set(m)
    # The same live counters the health endpoint reports, not a second count.
    ingest = health["ingest"]
    assert value(m, "floorhand_ingest_readings_total") == ingest["readings"] >= 20
    assert value(m, "floorhand_ingest_rejected_total") == sum(ingest["rejected"].values()) >= 1
    for reason, n in ingest["rejected"].items():
        assert value(m, "floorhand_ingest_rejected_total", reason=reason) == n
    # Outbox rows move on their own (dwell timers commit, housekeeping prunes): bracket them.
    after = (await ctl.get("/api/v1/health"))["ingest"]["outbox_rows"]
    low, high = sorted((ingest["outbox_rows"], after))
    assert low <= value(m, "floorhand_outbox_rows") <= high
    assert value(m, "floorhand_link_state", link="mqtt", state="up") == 1
    assert value(m, "floorhand_link_state", link="mqtt", state="down") == 0
    assert value(m, "floorhand_alerts") == len(await ctl.get("/api/v1/alerts"))
    # HTTP accounting by route template and status; auth failures by reason.
    assert value(m, "floorhand_http_requests_total", route="/api/v1/stock", status="200") == 3
    assert value(m, "floorhand_http_requests_total", route="/api/v1/stock", status="401") == 1
    assert value(m, "floorhand_http_auth_failures_total", reason="unauthenticated") == 2
    assert value(m, "floorhand_http_auth_failures_total", reason="forbidden") == 1
    assert value(m, "floorhand_http_request_duration_seconds_count", route="/api/v1/stock") == 4
    assert value(m, "floorhand_pick_latency_seconds_count") >= 0
    assert value(m, "floorhand_live_clients") == 0  # no dashboard connected in this test


async def test_demo_style_env_tokens_and_open_metrics(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    client: httpx.AsyncClient,
) -> None:
    """Tokens from FLOORHAND_TOKEN_* (how the demo passes them) and ``metrics = "open"``."""
    ctl = await start(
        tmp_path,
        mosquitto,
        controllers,
        env={"FLOORHAND_TOKEN_PDA": "floor:pda-token-0123456789abcdef"},
        metrics="open",
    )
    h = {"Authorization": "Bearer pda-token-0123456789abcdef"}
    assert (await client.get(ctl.base + "/api/v1/stock", headers=h)).status_code == 200
    assert (await client.get(ctl.base + "/api/v1/alerts", headers=h)).status_code == 403
    r = await client.get(ctl.base + "/metrics")
    assert r.status_code == 200
    assert "floorhand_ingest_messages_total" in r.text
