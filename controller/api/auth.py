"""Bearer-token authentication and role checks for the API.

Tokens are random strings mapped to a name and a role. At rest only their SHA-256 is kept:
``[[api.tokens]]`` entries in the site file hold ``sha256 = "<hex>"``; environment variables
``FLOORHAND_TOKEN_<NAME>=<role>:<token>`` (prefix configurable) add tokens without writing them
to disk and are hashed on load. Tokens are long random secrets (``floorhand token`` makes 256-bit
ones), so a plain SHA-256 is enough: there is no password to brute-force.

Routes declare who may call them with the ``require`` dependency::

    @router.post("/api/v1/picks", dependencies=[Depends(require(Role.FLOOR, Role.ENGINEER))])

or, to use the caller, ``principal: Annotated[Principal, Depends(require(Role.SUPERVISOR))]``.
Routes that are deliberately open (health, readiness) declare ``Depends(public)``. Every route
under ``/api/v1`` must declare one or the other: undeclared routes are refused with 403 by the
security middleware (fail closed) and flagged by the role-matrix test.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.dependencies.models import Dependant
from starlette.applications import Starlette
from starlette.exceptions import HTTPException, WebSocketException
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute

from controller.config import ApiConfig, SecretError, env_secret

log = logging.getLogger("floorhand.api.auth")

BEARER = "Bearer"
PROBLEM = "application/problem+json"
ROLES_ATTR = "__floorhand_roles__"
PUBLIC_ATTR = "__floorhand_public__"


class Role(enum.StrEnum):
    FLOOR = "floor"
    SUPERVISOR = "supervisor"
    ENGINEER = "engineer"


ALL_ROLES: frozenset[Role] = frozenset(Role)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's configured name and its role."""

    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    role: Role
    digest: bytes
    """SHA-256 of the token."""


def hash_token(token: str) -> str:
    """The hex SHA-256 a ``[[api.tokens]]`` entry stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh 256-bit URL-safe token."""
    return secrets.token_urlsafe(32)


class TokenConfigError(ValueError):
    """A token variable in the environment is malformed."""


class TokenStore:
    """The app's tokens (``app.state.auth``). ``open_mode`` (``[api] auth = "off"``) lets every
    request through as an anonymous engineer."""

    def __init__(self, entries: Iterable[TokenEntry], *, open_mode: bool = False) -> None:
        self.entries: tuple[TokenEntry, ...] = tuple(entries)
        self.open_mode = open_mode
        names = [e.name for e in self.entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TokenConfigError(f"duplicate API token name(s): {', '.join(dup)}")

    @classmethod
    def from_config(cls, api: ApiConfig, environ: Mapping[str, str]) -> TokenStore:
        """Tokens of ``[[api.tokens]]`` plus ``<token_env_prefix><NAME>=<role>:<token>``; the
        value may also come from the file named by ``<token_env_prefix><NAME>_FILE`` or from
        ``$CREDENTIALS_DIRECTORY/<token_env_prefix><NAME>`` (`env_secret`)."""
        entries = [TokenEntry(t.name, Role(t.role), bytes.fromhex(t.sha256)) for t in api.tokens]
        prefix = api.token_env_prefix
        for var in _token_variables(prefix, environ):
            name = var[len(prefix) :].lower()
            try:
                value = env_secret(var, environ) or ""
            except SecretError as exc:
                raise TokenConfigError(str(exc)) from None
            role, sep, token = value.partition(":")
            if not sep or role not in Role.__members__.values():
                raise TokenConfigError(
                    f"{var}: expected <role>:<token> with role one of "
                    f"{', '.join(r.value for r in Role)}"
                )
            if len(token) < 16:
                raise TokenConfigError(f"{var}: token shorter than 16 characters")
            entries.append(TokenEntry(name, Role(role), hashlib.sha256(token.encode()).digest()))
        return cls(entries, open_mode=api.auth == "off")

    def lookup(self, token: str | None) -> Principal | None:
        """The principal of ``token``; ``None`` when absent or unknown. Compares the digest with
        every entry in constant time (no early exit on the first match)."""
        if self.open_mode:
            return Principal("anonymous", Role.ENGINEER)
        if not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: TokenEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return Principal(found.name, found.role) if found is not None else None


def _token_variables(prefix: str, environ: Mapping[str, str]) -> list[str]:
    """The token variables named in the environment, by ``<VAR>_FILE`` or by a file of
    systemd's credentials directory, sorted."""
    if not prefix:
        return []
    names = {v.removesuffix("_FILE") for v in environ if v.startswith(prefix)}
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.isdir(creds):
        names.update(f for f in os.listdir(creds) if f.startswith(prefix))
    return sorted(n for n in names if n != prefix)


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token of an ``Authorization: Bearer`` header; for WebSockets also ``?token=`` (browsers
    cannot set headers on a WebSocket handshake)."""
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    if conn.scope.get("type") == "websocket":
        return conn.query_params.get("token") or None
    return None


def authenticate(app: Starlette, token: str | None) -> Principal | None:
    """The principal for ``token`` in ``app``'s token store, or ``None``."""
    store: TokenStore | None = getattr(app.state, "auth", None)
    if store is None:
        return None
    return store.lookup(token)


def _count_auth_failure(conn: HTTPConnection, reason: str) -> None:
    hook: Callable[[str], None] | None = getattr(conn.app.state, "on_auth_failure", None)
    if hook is not None:
        hook(reason)


def require(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency admitting callers whose token has one of ``roles``.

    No or unknown token: 401 with ``WWW-Authenticate: Bearer``; a valid token of another role:
    403. On a WebSocket route the same failures close the handshake with code 1008."""
    if not roles:
        raise ValueError("require() needs at least one role")
    allowed = frozenset(Role(r) for r in roles)

    async def dependency(conn: HTTPConnection) -> Principal:
        principal = authenticate(conn.app, bearer_token(conn))
        ws = conn.scope.get("type") == "websocket"
        if principal is None:
            _count_auth_failure(conn, "unauthenticated")
            if ws:
                raise WebSocketException(1008, "missing or invalid bearer token")
            raise HTTPException(
                401, "missing or invalid bearer token", headers={"WWW-Authenticate": BEARER}
            )
        if principal.role not in allowed:
            _count_auth_failure(conn, "forbidden")
            need = ", ".join(sorted(r.value for r in allowed))
            msg = f"role {principal.role.value!r} may not do this (needs: {need})"
            if ws:
                raise WebSocketException(1008, msg)
            raise HTTPException(403, msg)
        conn.state.principal = principal
        return principal

    setattr(dependency, ROLES_ATTR, allowed)
    dependency.__name__ = "require_" + "_".join(sorted(r.value for r in allowed))
    return dependency


def checked_in_handler(*roles: Role) -> Callable[[], Awaitable[None]]:
    """Declares the roles of a route whose handler authenticates the caller itself with
    ``authenticate`` (a WebSocket that must answer the subprotocol before refusing with a close
    code). The dependency checks nothing: the handler must refuse every other role."""
    if not roles:
        raise ValueError("checked_in_handler() needs at least one role")
    allowed = frozenset(Role(r) for r in roles)

    async def declared() -> None:
        return None

    setattr(declared, ROLES_ATTR, allowed)
    declared.__name__ = "checked_in_handler_" + "_".join(sorted(r.value for r in allowed))
    return declared


async def public() -> None:
    """Marks a route as deliberately open to callers without a token."""


setattr(public, PUBLIC_ATTR, True)

PublicDep = Depends(public)


def _walk(dependant: Dependant) -> Iterable[Any]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _walk(sub)


def effective_routes(routes: Sequence[BaseRoute]) -> list[Any]:
    """Every route as served, with routers included through ``include_router`` flattened and
    their prefix and dependencies applied (FastAPI ≥ 0.16x keeps included routers nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: include_router copies routes into the app
        return list(routes)
    return list(iter_route_contexts(routes))


def _dependant(route: Any) -> Dependant | None:
    try:
        dep = getattr(route, "dependant", None)
    except AttributeError:
        return None
    return dep if isinstance(dep, Dependant) else None


def declared_roles(route: Any) -> frozenset[Role] | None:
    """The roles a route admits: the intersection of its ``require`` dependencies; every role
    for a ``public`` route; ``None`` when it declares neither (or is not a FastAPI route).
    ``route`` is an app route or an ``effective_routes`` entry."""
    dependant = _dependant(route)
    if dependant is None:
        return None
    sets: list[frozenset[Role]] = []
    is_public = False
    for call in _walk(dependant):
        roles = getattr(call, ROLES_ATTR, None)
        if roles is not None:
            sets.append(roles)
        elif getattr(call, PUBLIC_ATTR, False):
            is_public = True
    if sets:
        out = sets[0]
        for s in sets[1:]:
            out &= s
        return out
    return ALL_ROLES if is_public else None


def is_public(route: Any) -> bool:
    """True when the route declares ``public`` and no ``require``."""
    dependant = _dependant(route)
    if dependant is None:
        return False
    calls = list(_walk(dependant))
    return any(getattr(c, PUBLIC_ATTR, False) for c in calls) and not any(
        getattr(c, ROLES_ATTR, None) is not None for c in calls
    )


def _problem_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM: {"schema": schema}}}


def annotate_openapi(schema: dict[str, Any], routes: Iterable[BaseRoute]) -> None:
    """Add the bearer security scheme and, per operation, ``security``, the admitted roles
    (``x-floorhand-roles``, or ``x-floorhand-public: true``) and the 401/403/429 answers.
    Operations of routes declaring nothing are left bare (the role-matrix test fails on them)."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "API token (docs/api.md): floor, supervisor or engineer role",
    }
    schemas = components.get("schemas", {})
    problem: dict[str, Any] = (
        {"$ref": "#/components/schemas/Problem"} if "Problem" in schemas else {"type": "object"}
    )
    paths: dict[str, Any] = schema.get("paths", {})
    for route in effective_routes(list(routes)):
        path_format = getattr(route, "path_format", None)
        if path_format not in paths or not getattr(route, "methods", None):
            continue
        roles = declared_roles(route)
        if roles is None:
            continue
        for method in route.methods or ():
            op = paths[path_format].get(method.lower())
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            responses.setdefault(
                "429", _problem_response("Rate limit exceeded (see Retry-After)", problem)
            )
            if "requestBody" in op:
                responses.setdefault("400", _problem_response("Malformed body", problem))
                responses.setdefault("413", _problem_response("Body too large", problem))
            if is_public(route):
                op["security"] = []
                op["x-floorhand-public"] = True
                continue
            op["security"] = [{"bearer": []}]
            op["x-floorhand-roles"] = sorted(r.value for r in roles)
            responses.setdefault("401", _problem_response("Missing or invalid token", problem))
            responses.setdefault("403", _problem_response("Role not allowed", problem))
    _errors_are_problems(paths, problem)


def _errors_are_problems(paths: dict[str, Any], problem: dict[str, Any]) -> None:
    """Every error the API sends is ``application/problem+json`` (the exception handlers):
    say so for error responses documented with the Problem model under ``application/json``
    or with no schema."""
    for ops in paths.values():
        for op in ops.values():
            if not isinstance(op, dict):
                continue
            for code, resp in op.get("responses", {}).items():
                if not str(code).startswith(("4", "5")) or not isinstance(resp, dict):
                    continue
                content = resp.get("content")
                if not isinstance(content, dict):
                    continue
                plain = content.get("application/json")
                if isinstance(plain, dict) and plain.get("schema") == problem:
                    del content["application/json"]
                    content.setdefault(PROBLEM, {})
                entry = content.get(PROBLEM)
                if isinstance(entry, dict) and not entry.get("schema"):
                    entry["schema"] = problem


def install_openapi_security(app: FastAPI) -> None:
    """Make ``app.openapi()`` annotate the generated schema (see ``annotate_openapi``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        annotate_openapi(schema, app.routes)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
