"""The catalogue: export it, list its versions, change it on the running controller
(docs/catalogue.md, "Changing a running controller"; docs/api.md, "Catalogue").

Engineers change anything, supervisors thresholds only. A change is all or nothing: every bad
row and column is in the 422 problem body (``errors``). ``?dry_run=true`` answers the diff and
changes nothing. Handlers are ``async def``: they run on the event loop (the state owner); the
O(records) steps of a change (reading, validating, comparing, the journal's staging, the answer)
run in worker threads, and the change is swapped into the journal and applied in one step on the
loop, so no ingest commit counts a reading against half a change (controller/catalog/live.py).
"""

from __future__ import annotations

import asyncio
import io
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from controller.api.auth import Principal, Role, require
from controller.api.deps import READ_ALL, RuntimeDep
from controller.api.schemas import PROBLEM, problem_responses
from controller.catalog import formats
from controller.catalog.diff import CatalogueDiff
from controller.catalog.live import (
    Applied,
    CatalogueEditor,
    ChangeRefused,
    VersionRow,
    change_dict,
    check_live,
    check_role,
    error_dicts,
    old_objects_frozen,
    patched,
    put_catalogue,
)
from controller.catalog.records import Catalogue
from controller.ports import JournalError
from controller.runtime import Runtime

router = APIRouter()

VERSION_HEADER = "X-Catalog-Version"
"""The catalogue version an export or a change answers with."""

_CSV_TYPES = frozenset({"text/csv"})
_JSONL_TYPES = frozenset(
    {"application/x-ndjson", "application/jsonl", "application/json-lines", "application/x-jsonl"}
)
_BODY_SOURCE = "request body"

Changer = Annotated[Principal, Depends(require(Role.SUPERVISOR, Role.ENGINEER))]


def _problem(status: int, detail: str, **extra: Any) -> JSONResponse:
    from http import HTTPStatus

    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def editor_of(request: Request, rt: Runtime) -> CatalogueEditor:
    """The app's catalogue editor (made on first use; it applies a change to the read model
    and the live hub too)."""
    editor: CatalogueEditor | None = getattr(request.app.state, "catalog_editor", None)
    if editor is None:
        state = request.app.state

        def applied(after: Catalogue, changes: CatalogueDiff) -> None:
            skus = {c.id for c in changes.changes if c.kind == "sku"}
            state.reads.stock.apply_skus(s for s in after.skus if s.id in skus)
            state.reads.alerts.rebuild()
            hub = getattr(state, "live", None)
            if hub is not None:
                hub.reads = state.reads  # the read model the bus listener just rebuilt
                hub.apply_catalogue()

        editor = CatalogueEditor(rt, on_applied=applied)
        state.catalog_editor = editor
    return editor


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _diff_body(
    changes: CatalogueDiff, *, dry_run: bool, from_version: int, version: int
) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "version": version,
        "from_version": from_version,
        "counts": changes.counts(),
        "changes": [change_dict(c) for c in changes.changes],
        "lines": changes.render(),
    }


def _diff_json(changes: CatalogueDiff, ended: list[str] | None = None, **versions: Any) -> bytes:
    body = _diff_body(changes, **versions)
    if ended is not None:
        body["ended_episodes"] = ended
    return orjson.dumps(body)


async def _diff_response(
    changes: CatalogueDiff, version: int, ended: list[str] | None = None, **versions: Any
) -> Response:
    """The diff's answer, built and encoded in a worker thread (a line per changed record:
    tens of MB at 100k, which the event loop must not spend its time on)."""
    content = await asyncio.to_thread(_diff_json, changes, ended, version=version, **versions)
    return Response(content, media_type="application/json", headers={VERSION_HEADER: str(version)})


async def _change(
    request: Request, rt: Runtime, principal: Principal, dry_run: bool, *, whole: bool
) -> Response:
    editor = editor_of(request, rt)
    data = await request.body()
    async with editor.lock:  # one change at a time, from its plan to its end
        with old_objects_frozen():
            return await _change_locked(editor, request, data, principal, dry_run, whole=whole)


async def _change_locked(
    editor: CatalogueEditor,
    request: Request,
    data: bytes,
    principal: Principal,
    dry_run: bool,
    *,
    whole: bool,
) -> Response:
    try:
        editor.refuse_inline()
        media = _media_type(request)
        if whole:
            if media in _CSV_TYPES:
                fmt: formats.Format = "csv"
            elif media in _JSONL_TYPES:
                fmt = "jsonl"
            else:
                return _problem(
                    415,
                    f"Content-Type {media or '(none)'}: a catalogue is text/csv or "
                    "application/x-ndjson (JSON Lines)",
                )
            # Reading and validating (seconds at 100k rows) off the event loop: ingest runs on.
            after = await asyncio.to_thread(put_catalogue, data, fmt, editor.zones, _BODY_SOURCE)
        else:
            if media in _CSV_TYPES:
                patch_fmt: formats.Format | None = "csv"
            elif media in _JSONL_TYPES or media == "application/json":
                patch_fmt = None
            else:
                return _problem(
                    415,
                    f"Content-Type {media or '(none)'}: a patch is application/json (an array "
                    "of records), application/x-ndjson (JSON Lines) or text/csv",
                )
            after = await asyncio.to_thread(
                patched, editor.current, data, patch_fmt, editor.zones, _BODY_SOURCE
            )
        changes = await asyncio.to_thread(editor.plan, after)
        check_role(changes, principal.role is Role.ENGINEER)
        before = editor.version()
        if dry_run:
            return await _diff_response(changes, before, dry_run=True, from_version=before)
        check_live(changes)
        how = "PUT" if whole else "PATCH"
        applied: Applied = await editor.apply(
            after, changes, actor=principal.name, detail=f"{how} /api/v1/catalog"
        )
    except ChangeRefused as exc:
        return _problem(exc.status, exc.detail, refused=exc.items)
    except formats.CatalogueInvalid as exc:
        return _problem(
            422,
            f"{len(exc.errors)} error(s); nothing changed",
            errors=error_dicts(exc),
        )
    except JournalError as exc:
        return _problem(503, f"the journal could not store the change, nothing changed: {exc}")
    return await _diff_response(
        applied.changes, applied.version, list(applied.ended), dry_run=False, from_version=before
    )


_CHANGE_ERRORS = problem_responses(
    e403="a supervisor changing more than thresholds (each column named in refused), or floor",
    e409="the site file declares the catalogue inline, or the change does not apply to a "
    "running controller (each record named in refused)",
    e413="body larger than [api] catalog_max_body_bytes",
    e415="a Content-Type that is no catalogue format",
    e422="invalid rows: every bad row and column in errors; nothing changed",
    e503="the journal could not store the change; nothing changed",
)
_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }
}
DryRun = Annotated[bool, Query(description="answer the changes; change nothing")]


@router.get(
    "/api/v1/catalog",
    tags=["catalogue"],
    dependencies=READ_ALL,
    response_class=Response,
    responses={
        200: {
            "content": {"text/csv": {}, "application/x-ndjson": {}},
            "headers": {VERSION_HEADER: {"schema": {"type": "integer"}}},
        }
    },
)
async def export_catalogue(
    request: Request,
    rt: RuntimeDep,
    format: Annotated[formats.Format, Query(description="csv or jsonl")] = "csv",
) -> Response:
    """The catalogue in force, as CSV (docs/catalogue.md's header) or JSON Lines."""
    editor = editor_of(request, rt)
    out = io.StringIO(newline="")
    formats.write(editor.current, format, out)
    media = "text/csv" if format == "csv" else "application/x-ndjson"
    return Response(
        out.getvalue().encode(),
        media_type=f"{media}; charset=utf-8",
        headers={VERSION_HEADER: str(editor.version())},
    )


@router.put(
    "/api/v1/catalog",
    tags=["catalogue"],
    openapi_extra=_BODY_DOC,
    responses=_CHANGE_ERRORS,
)
async def put_whole_catalogue(
    request: Request, rt: RuntimeDep, principal: Changer, dry_run: DryRun = False
) -> Response:
    """Replace the catalogue (CSV or JSON Lines body): records it leaves out are removed."""
    return await _change(request, rt, principal, dry_run, whole=True)


@router.patch(
    "/api/v1/catalog",
    tags=["catalogue"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        }
    },
    responses=_CHANGE_ERRORS,
)
async def patch_catalogue(
    request: Request, rt: RuntimeDep, principal: Changer, dry_run: DryRun = False
) -> Response:
    """Change the records the body names (``kind``, ``id``, the changed columns; ``"remove":
    true`` removes one); the others stay as they are."""
    return await _change(request, rt, principal, dry_run, whole=False)


def _version_dict(v: VersionRow) -> dict[str, Any]:
    return {
        "version": v.version,
        "ts": v.ts_s,
        "actor": v.actor,
        "source": v.source,
        "detail": v.detail,
        "added": v.added,
        "removed": v.removed,
        "changed": v.changed,
    }


@router.get("/api/v1/catalog/versions", tags=["catalogue"], dependencies=READ_ALL)
async def list_versions(request: Request, rt: RuntimeDep) -> JSONResponse:
    """Every catalogue version, oldest first: who, from where, how many records changed."""
    editor = editor_of(request, rt)
    rows = [_version_dict(v) for v in editor.versions()]
    return JSONResponse(
        {"version": editor.version(), "versions": rows},
        headers={VERSION_HEADER: str(editor.version())},
    )


@router.get(
    "/api/v1/catalog/versions/{version}",
    tags=["catalogue"],
    dependencies=READ_ALL,
    responses=problem_responses(e404="no such catalogue version"),
)
async def version_detail(request: Request, rt: RuntimeDep, version: int) -> Response:
    """One version and its audit rows (each record added, removed or changed, before and
    after)."""
    editor = editor_of(request, rt)
    found = [v for v in editor.versions() if v.version == version]
    if not found:
        return _problem(404, f"no catalogue version {version}")
    v = found[0]
    return JSONResponse({**_version_dict(v), "audit": editor.version_audit(version)})
