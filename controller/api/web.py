"""The supervisor dashboard: static assets from ``dashboards/web`` and the live WebSocket.

The page is plain ES modules and CSS shipped in the repository (no build step, no CDN). It is
served without a token (it holds no data); the page asks for a token and sends it with every API
call and on the live WebSocket. Responses carry a strict Content-Security-Policy: scripts,
styles and connections to this origin only.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

from controller.api.live import LiveHub, install_live
from controller.runtime import Runtime

log = logging.getLogger("floorhand.api.web")

PACKAGED_DASHBOARD = "dashboard"
"""Where a wheel holds ``dashboards/web``: package data of ``controller.api`` (pyproject.toml
maps the folder there; the repository keeps it at the top level, beside the Grafana
dashboards)."""


def dashboard_dir() -> Path:
    """The folder of the dashboard's assets: ``controller/api/dashboard`` of an installed
    wheel, else ``dashboards/web`` of the checkout this package runs from (a git checkout or an
    editable install)."""
    packaged = resources.files("controller.api").joinpath(PACKAGED_DASHBOARD)
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "dashboards" / "web"


DASHBOARD_DIR = dashboard_dir()
"""The assets served (`dashboard_dir`)."""

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def resolve_asset(root: Path, rel: str) -> Path | None:
    """The file ``rel`` names under ``root`` (``index.html`` for the folder); ``None`` for
    anything outside ``root``, hidden, missing or of a type not served."""
    rel = rel.strip("/") or "index.html"
    if any(part.startswith(".") for part in rel.split("/")):
        return None
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in rel):
        return None  # NUL (os calls refuse it), other controls, backslashes: never a file name
    try:
        path = (root / rel).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            return None
    except (OSError, ValueError):  # a name too long, or one the OS refuses
        return None
    if path.suffix not in MEDIA_TYPES:
        return None
    return path


def install_web(app: FastAPI, rt: Runtime, *, root: Path = DASHBOARD_DIR) -> LiveHub:
    """``GET /`` (redirect), ``GET /dashboard/…`` (assets) and ``/api/v1/live``."""
    hub = install_live(app, rt)
    if not (root / "index.html").is_file():
        log.warning("dashboard assets not found in %s: /dashboard answers 404", root)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/dashboard/", status_code=307)

    @app.get("/dashboard", include_in_schema=False)
    def dashboard_root() -> RedirectResponse:
        return RedirectResponse("/dashboard/", status_code=307)

    @app.get("/dashboard/{rel:path}", include_in_schema=False)
    def dashboard_asset(rel: str) -> FileResponse:
        path = resolve_asset(root, rel)
        if path is None:
            raise HTTPException(404, f"no dashboard asset {rel!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)

    return hub
