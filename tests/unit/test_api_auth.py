"""Token store, role checks, rate-limit buckets and the fail-closed route check (in-process;
the HTTP behaviour over a real server is in tests/integration/test_api_security.py)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI

from controller.api.app import create_app
from controller.api.auth import (
    ALL_ROLES,
    Principal,
    Role,
    TokenConfigError,
    TokenStore,
    declared_roles,
    hash_token,
    new_token,
    public,
    require,
)
from controller.api.limits import RateLimiter, is_stop_request
from controller.config import ApiConfig, ApiTokenConfig, load_site
from controller.domain.events import OrderException, OrderStateChanged, PickTaskChanged
from controller.domain.model import OrderState, TaskState
from controller.runtime import Runtime
from tests.sites import TOKENS, auth_headers, write_small_site


def cfg(**kw: object) -> ApiConfig:
    return ApiConfig.model_validate(kw)


def test_file_tokens_are_hashes_and_lookup_finds_the_role() -> None:
    token = new_token()
    assert len(token) >= 40
    api = cfg(tokens=[{"name": "pda-1", "role": "floor", "sha256": hash_token(token)}])
    store = TokenStore.from_config(api, {})
    assert store.lookup(token) == Principal("pda-1", Role.FLOOR)
    assert store.lookup(token + "x") is None
    assert store.lookup("") is None
    assert store.lookup(None) is None
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()


def test_env_tokens_are_hashed_on_load() -> None:
    env = {
        "FLOORHAND_TOKEN_OPS": "engineer:" + "e" * 24,
        "FLOORHAND_TOKEN_SUP_1": "supervisor:" + "s" * 24,
        "UNRELATED": "floor:" + "f" * 24,
    }
    store = TokenStore.from_config(ApiConfig(), env)
    assert {(e.name, e.role) for e in store.entries} == {
        ("ops", Role.ENGINEER),
        ("sup_1", Role.SUPERVISOR),
    }
    assert all(len(e.digest) == 32 for e in store.entries)
    assert store.lookup("e" * 24) == Principal("ops", Role.ENGINEER)
    assert store.lookup("f" * 24) is None


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("boss:" + "x" * 24, "expected <role>:<token>"),
        ("x" * 24, "expected <role>:<token>"),
        ("floor:short", "shorter than 16"),
    ],
)
def test_bad_env_tokens_are_refused_with_the_variable_name(value: str, match: str) -> None:
    with pytest.raises(TokenConfigError, match=match) as err:
        TokenStore.from_config(ApiConfig(), {"FLOORHAND_TOKEN_BAD": value})
    assert "FLOORHAND_TOKEN_BAD" in str(err.value)


def test_duplicate_names_across_file_and_env_are_refused() -> None:
    api = cfg(tokens=[{"name": "ops", "role": "floor", "sha256": "0" * 64}])
    with pytest.raises(TokenConfigError, match="duplicate"):
        TokenStore.from_config(api, {"FLOORHAND_TOKEN_OPS": "engineer:" + "e" * 24})


def test_config_validates_token_entries() -> None:
    with pytest.raises(ValueError, match="sha256"):
        ApiTokenConfig.model_validate({"name": "a", "role": "floor", "sha256": "not-hex"})
    with pytest.raises(ValueError, match="role"):
        ApiTokenConfig.model_validate({"name": "a", "role": "admin", "sha256": "0" * 64})
    with pytest.raises(ValueError, match="duplicate token name"):
        cfg(
            tokens=[
                {"name": "a", "role": "floor", "sha256": "0" * 64},
                {"name": "a", "role": "engineer", "sha256": "1" * 64},
            ]
        )
    with pytest.raises(ValueError, match="max_body_bytes"):
        cfg(max_body_bytes=10)


def test_open_mode_only_when_auth_is_off() -> None:
    assert TokenStore.from_config(ApiConfig(), {}).lookup("anything") is None
    store = TokenStore.from_config(cfg(auth="off"), {})
    assert store.open_mode
    assert store.lookup(None) == Principal("anonymous", Role.ENGINEER)


def test_require_needs_a_role_and_declares_it() -> None:
    with pytest.raises(ValueError, match="at least one role"):
        require()
    app = FastAPI()

    @app.get("/api/v1/a", dependencies=[Depends(require(Role.FLOOR, Role.ENGINEER))])
    def a() -> None: ...

    @app.get("/api/v1/b")
    def b(p: Annotated[Principal, Depends(require(Role.SUPERVISOR))]) -> None: ...

    @app.get("/api/v1/c", dependencies=[Depends(public)])
    def c() -> None: ...

    @app.get("/api/v1/d")
    def d() -> None: ...

    @app.get(
        "/api/v1/e",
        dependencies=[Depends(require(Role.FLOOR, Role.ENGINEER)), Depends(require(Role.ENGINEER))],
    )
    def e() -> None: ...

    by_path = {getattr(r, "path", ""): declared_roles(r) for r in app.routes}
    assert by_path["/api/v1/a"] == {Role.FLOOR, Role.ENGINEER}
    assert by_path["/api/v1/b"] == {Role.SUPERVISOR}
    assert by_path["/api/v1/c"] == ALL_ROLES
    assert by_path["/api/v1/d"] is None
    assert by_path["/api/v1/e"] == {Role.ENGINEER}  # every require() must pass: intersection


def test_rate_limiter_bucket_refills_at_the_rate() -> None:
    rl = RateLimiter(rate_per_s=2.0, burst=3)
    assert [rl.take("k", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("k", 0.0) == pytest.approx(0.5)
    assert rl.take("other", 0.0) == 0.0  # per key
    assert rl.take("k", 0.5) == 0.0  # one token refilled after 1/rate s
    assert rl.take("k", 0.5) > 0
    assert [rl.take("k", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # capped at burst
    assert rl.take("k", 100.0) > 0


def test_rate_limiter_keeps_a_bounded_number_of_buckets() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=1, max_buckets=3)
    for i in range(10):
        rl.take(f"k{i}", 0.0)
    assert len(rl._buckets) == 3


@pytest.mark.parametrize(
    ("method", "path", "stop"),
    [
        ("POST", "/api/v1/plcs/conveyor-1/stop", True),
        ("POST", "/api/v1/plcs/conveyor-1/stop/", True),
        ("GET", "/api/v1/plcs/conveyor-1/stop", False),
        ("POST", "/api/v1/plcs/conveyor-1/start", False),
        ("POST", "/api/v1/plcs/conveyor-1/stopper", False),
    ],
)
def test_stop_requests(method: str, path: str, stop: bool) -> None:
    assert is_stop_request(method, path) is stop


async def test_undeclared_api_route_is_refused_fail_closed(tmp_path: Path) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=1))
    app = create_app(site, runtime=Runtime(site))

    @app.get("/api/v1/forgot-to-declare")
    def forgot() -> dict[str, str]:
        return {"secret": "stock"}

    @app.get("/outside-the-api")
    def outside() -> dict[str, str]:
        return {"ok": "yes"}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.get("/api/v1/forgot-to-declare", headers=auth_headers("engineer"))
        assert r.status_code == 403
        assert r.headers["content-type"] == "application/problem+json"
        assert "declares no role" in r.json()["detail"]
        assert "secret" not in r.text
        assert (await client.get("/outside-the-api")).status_code == 200
        r = await client.get("/api/v1/stock", headers=auth_headers("floor"))
        assert r.status_code == 200
        r = await client.get("/api/v1/stock", headers={"Authorization": f"Basic {TOKENS['floor']}"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        m = await client.get("/metrics", headers=auth_headers("engineer"))
        assert "floorhand_http_undeclared_route_refusals_total 1.0" in m.text


async def test_an_unexpected_error_is_a_problem_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=1))
    app = create_app(site, runtime=Runtime(site))

    @app.get("/outside-the-api/boom")
    def boom() -> dict[str, str]:
        raise RuntimeError("secret internal state 0xdeadbeef")

    # Starlette re-raises after answering (so servers log it); the answer is what we check.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        with caplog.at_level(logging.ERROR, logger="floorhand.api"):
            r = await client.get("/outside-the-api/boom")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 500
    assert "0xdeadbeef" not in r.text
    assert "Traceback" not in r.text
    assert any("0xdeadbeef" in rec.getMessage() for rec in caplog.records)


def _pick_count() -> float:
    from controller.api.metrics import PICK_LATENCY

    [family] = PICK_LATENCY.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))


def _pick_sum() -> float:
    from controller.api.metrics import PICK_LATENCY

    [family] = PICK_LATENCY.collect()
    return next(s.value for s in family.samples if s.name.endswith("_sum"))


def test_pick_latency_from_order_events() -> None:
    from controller.api.metrics import PickLatencyProbe, observe_pick_latency

    probe = PickLatencyProbe(max_open=2)
    n0, s0 = _pick_count(), _pick_sum()

    def ev(order: str, old: str, new: str, ts: float) -> OrderStateChanged:
        return OrderStateChanged(
            ts, order, "api", "x-" + order, OrderState(old), OrderState(new), None
        )

    task = PickTaskChanged(5.0, "a", 0, "K1", 1, "sh0", "s1", 1, 1, TaskState.CONFIRMED, "ok", None)
    probe.on_events([ev("a", "RECEIVED", "VALIDATED", 100.0), ev("b", "RECEIVED", "VALIDATED", 1)])
    probe.on_events([ev("a", "ALLOCATED", "PICKING", 101.0), task])
    probe.on_events([ev("a", "PICKING", "SORTED", 104.5)])
    assert (_pick_count() - n0, _pick_sum() - s0) == (1, pytest.approx(4.5))
    exc = ev("b", "PICKING", "EXCEPTION", 9.0)
    probe.on_events([exc, OrderException.of(exc)])  # not a latency; the echo is no transition
    probe.on_events([ev("a", "SORTED", "PACKED", 200.0)])  # already observed
    assert _pick_count() - n0 == 1
    for o in ("c", "d", "e"):  # bounded: the oldest open order is forgotten
        probe.on_events([ev(o, "RECEIVED", "VALIDATED", 1.0)])
    probe.on_events([ev("c", "PICKING", "SORTED", 2.0)])
    assert _pick_count() - n0 == 1
    observe_pick_latency(-1.0)
    observe_pick_latency(float("nan"))
    assert _pick_count() - n0 == 1
    observe_pick_latency(0.25)
    assert _pick_count() - n0 == 2
