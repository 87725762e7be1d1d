"""Request limits and HTTP accounting, as one pure ASGI middleware in front of the app.

For every HTTP request, in this order:

1. **Body limit** (``[api] max_body_bytes``; ``PUT``/``PATCH /api/v1/catalog``: ``[api]
   catalog_max_body_bytes``, a whole catalogue): a ``Content-Length`` above the limit is
   answered 413 before anything is read; bodies without one (chunked) are counted as they
   stream in and the request fails with 413 once the count passes the limit, so no unbounded
   body is read.
2. **Rate limit** (``[api] rate_per_s`` / ``rate_burst``): one token bucket per API token
   (per client address for requests without a valid token); an empty bucket answers 429 with
   ``Retry-After``. **STOP is never rate-limited**: any ``POST`` whose path ends in ``/stop``
   (e.g. ``/api/v1/plcs/{id}/stop``) passes without taking from the bucket; neither are the
   public probes ``GET /api/v1/health`` and ``/api/v1/ready``.
3. **Fail closed**: a route under ``/api/v1`` that declares neither ``require(...)`` nor
   ``public`` is refused with 403 (and logged) rather than served unauthenticated.
4. **Accounting**: requests by method, route template and status, and their latency.

Refusals are problem+json like every other API error.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.api.auth import (
    TokenStore,
    authenticate,
    declared_roles,
    effective_routes,
    install_openapi_security,
)
from controller.api.metrics import ApiMetrics, install_metrics
from controller.config import ApiConfig
from controller.runtime import Runtime

log = logging.getLogger("floorhand.api.limits")

PROBLEM = "application/problem+json"
API_PREFIX = "/api/v1"
MAX_BUCKETS = 10_000
"""Buckets kept (least recently used dropped first): tokens plus client addresses."""


CATALOG_PATH = "/api/v1/catalog"
CATALOG_WRITES = frozenset({"PUT", "PATCH"})
"""The methods of ``CATALOG_PATH`` bounded by ``[api] catalog_max_body_bytes``."""

PROBE_PATHS = frozenset({"/api/v1/health", "/api/v1/ready"})
"""Public health probes: not rate-limited (cheap, no I/O, polled by supervisors)."""


def is_stop_request(method: str, path: str) -> bool:
    """STOP requests bypass the rate limit: any POST whose path ends with ``/stop``."""
    return method == "POST" and path.rstrip("/").endswith("/stop")


class BodyTooLarge(HTTPException):
    """The app stops reading here. The server discards whatever the client still sends (it is
    not buffered); closing instead would reset the connection under a client still uploading
    and lose the 413 it should see."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


@dataclass(slots=True)
class Bucket:
    tokens: float
    updated_s: float


class RateLimiter:
    """Token buckets keyed by caller: ``rate_per_s`` refill, ``burst`` capacity."""

    def __init__(self, rate_per_s: float, burst: int, *, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, key: str, now_s: float) -> float:
        """Take one token for ``key``: 0.0 when allowed, else seconds until one is available."""
        b = self._buckets.get(key)
        if b is None:
            b = Bucket(float(self.burst), now_s)
            self._buckets[key] = b
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now_s - b.updated_s)
            b.tokens = min(float(self.burst), b.tokens + elapsed * self.rate_per_s)
            b.updated_s = now_s
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate_per_s


class SecurityMiddleware:
    """See the module docstring. ``app.state`` must hold ``auth`` (TokenStore) and ``metrics``
    (ApiMetrics); the route table is read from the wrapped FastAPI app's router."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        rate_per_s: float,
        rate_burst: int,
        catalog_max_body_bytes: int | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.catalog_max_body_bytes = (
            max_body_bytes if catalog_max_body_bytes is None else catalog_max_body_bytes
        )
        self.limiter = RateLimiter(rate_per_s, rate_burst)
        self.clock = clock
        self._table: _RouteTable | None = None
        self._warned: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        app = scope["app"]
        metrics: ApiMetrics = app.state.metrics
        method: str = scope["method"]
        path: str = scope["path"]
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._check(scope, app, metrics, method, path)
            if refusal is not None:
                code, detail, headers = refusal
                await _problem(send_wrapper, code, detail, headers)
                return
            limit = self.body_limit(method, path)
            await self.app(scope, self._counting(receive, metrics, limit), send_wrapper)
        except BodyTooLarge as exc:
            # Raised by the counting receive below the exception handlers' reach (e.g. while
            # a streaming body was being drained): answer here if nothing was sent yet.
            if status[0] == 500:
                await _problem(send_wrapper, 413, str(exc.detail), {})
        finally:
            route = self._routes(app).label(scope)
            elapsed = time.perf_counter() - t0
            metrics.requests.labels(method, route, str(status[0])).inc()
            metrics.latency.labels(method, route).observe(elapsed)

    def _check(
        self, scope: Scope, app: Any, metrics: ApiMetrics, method: str, path: str
    ) -> tuple[int, str, dict[str, str]] | None:
        length = _content_length(scope)
        limit = self.body_limit(method, path)
        if length is not None and length > limit:
            metrics.body_too_large.inc()
            return 413, f"request body larger than {limit} bytes", {}
        if is_stop_request(method, path):
            metrics.stop_exempt.inc()
        elif method in ("GET", "HEAD") and path in PROBE_PATHS:
            pass  # probes: a load balancer polling readiness must not be told to back off
        else:
            principal = authenticate(app, _bearer(scope))
            if principal is not None:
                key = "token:" + principal.name
            else:
                client = scope.get("client")
                key = "addr:" + (client[0] if client else "?")
            wait_s = self.limiter.take(key, self.clock())
            if wait_s > 0:
                metrics.rate_limited.inc()
                retry = str(max(1, math.ceil(wait_s)))
                return 429, f"rate limit exceeded; retry in {retry} s", {"Retry-After": retry}
        if path.startswith(API_PREFIX):
            route = self._routes(app).undeclared_match(scope)
            if route is not None:
                metrics.undeclared.inc()
                rpath = getattr(route, "path", path)
                if rpath not in self._warned:
                    self._warned.add(rpath)
                    log.error("route %s declares no role requirement: refused (fail closed)", rpath)
                return 403, "this route declares no role requirement (refused: fail closed)", {}
        return None

    def _routes(self, app: Any) -> _RouteTable:
        routes: list[BaseRoute] = app.router.routes
        if self._table is None or self._table.size != len(routes):
            self._table = _RouteTable(routes)
        return self._table

    def body_limit(self, method: str, path: str) -> int:
        """The body limit of a request: ``catalog_max_body_bytes`` for a catalogue write,
        ``max_body_bytes`` for every other."""
        if method in CATALOG_WRITES and path.rstrip("/") == CATALOG_PATH:
            return self.catalog_max_body_bytes
        return self.max_body_bytes

    def _counting(self, receive: Receive, metrics: ApiMetrics, limit: int) -> Receive:
        seen = [0]

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    metrics.body_too_large.inc()
                    raise BodyTooLarge(limit)
            return message

        return wrapped


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _bearer(scope: Scope) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            scheme, _, value = v.decode("latin-1").partition(" ")
            return value.strip() or None if scheme.lower() == "bearer" else None
    return None


class _RouteTable:
    """The app's routes as served (``effective_routes``), built once after startup: route
    templates for metric labels and the /api/v1 routes that declare no role."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        self.size = len(routes)
        self.routes = effective_routes(routes)
        self.templates: dict[int, str] = {}
        for r in self.routes:
            template = getattr(r, "path_format", None) or getattr(r, "path", None)
            original = getattr(r, "original_route", r)
            if template:
                self.templates.setdefault(id(original), str(template))
                self.templates.setdefault(id(r), str(template))
        self.undeclared = [
            r
            for r in self.routes
            if str(getattr(r, "path", "") or "").startswith(API_PREFIX)
            and declared_roles(r) is None
        ]

    def undeclared_match(self, scope: Scope) -> Any:
        for r in self.undeclared:
            match, _ = r.matches(scope)
            if match is Match.FULL:
                return r
        return None

    def label(self, scope: Scope) -> str:
        """The matched route's template (a bounded label set); ``<unmatched>`` otherwise."""
        route = scope.get("route")
        if route is not None and id(route) in self.templates:
            return self.templates[id(route)]
        for r in self.routes:
            match, _ = r.matches(scope)
            if match is Match.FULL:
                template = getattr(r, "path_format", None) or getattr(r, "path", None)
                return str(template) if template else "<unmatched>"
        return "<unmatched>"


async def _problem(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    from http import HTTPStatus

    body = orjson.dumps(
        {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
        }
    )
    raw = [
        (b"content-type", PROBLEM.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def install_security(
    app: FastAPI,
    api: ApiConfig,
    runtime: Runtime | None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Token store, metrics, ``/metrics``, the security middleware and the OpenAPI security
    annotations. Raises ``TokenConfigError`` for a malformed token variable."""
    store = TokenStore.from_config(api, os.environ if environ is None else environ)
    metrics = ApiMetrics(runtime)
    app.state.auth = store
    app.state.metrics = metrics
    app.state.on_auth_failure = metrics.on_auth_failure
    if store.open_mode:
        log.warning('[api] auth = "off": every route is open to anyone who can reach the port')
    elif not store.entries:
        log.warning("no API tokens configured: every protected route answers 401")
    else:
        log.info(
            "API tokens: %s",
            ", ".join(f"{e.name} ({e.role.value})" for e in store.entries),
        )
    install_metrics(app, metrics, open_access=api.metrics == "open")
    app.add_middleware(
        SecurityMiddleware,
        max_body_bytes=api.max_body_bytes,
        catalog_max_body_bytes=api.catalog_max_body_bytes,
        rate_per_s=api.rate_per_s,
        rate_burst=api.rate_burst,
    )
    install_openapi_security(app)


def allowed_methods(app: Any, scope: Scope) -> str:
    """The ``Allow`` value for a 405: the methods of every route matching the path (Starlette
    reports only the first route's when one path has a route per method)."""
    methods: set[str] = set()
    for r in effective_routes(app.router.routes):
        route_methods = getattr(r, "methods", None)
        if not route_methods:
            continue
        match, _ = r.matches(scope)
        if match is not Match.NONE:
            methods |= set(route_methods)
    return ", ".join(sorted(methods))
