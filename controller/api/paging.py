"""Pagination of the list reads (``/stock``, ``/shelves``, ``/devices``, ``/scales``,
``/alerts``): the shared query parameters and the page headers.

The bodies stay JSON arrays of the same objects; the page's metadata travels in headers:
``X-Total-Count`` (the size of the whole filtered list), and, unless this is the last page,
``X-Next-Cursor`` and ``Link: <…>; rel="next"`` (RFC 8288; the same path and query with the
next cursor). A cursor is opaque; it names the last item of its page, so it stays valid while
items change between pages. docs/api.md, "Pages", documents the contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Query, Request, Response
from fastapi.exceptions import RequestValidationError

from controller.services.list_index import BadCursor, decode_cursor, encode_cursor
from controller.services.queries import Page, PageQuery

T = TypeVar("T")

DEFAULT_LIMIT = 1000
"""Items per page when the caller names no ``limit``."""
MAX_LIMIT = 5000
"""The largest ``limit`` accepted (above it: 422)."""
MAX_TEXT = 100
"""The longest ``q`` accepted (characters)."""

Limit = Annotated[
    int,
    Query(
        ge=1,
        le=MAX_LIMIT,
        description=f"items per page, 1..{MAX_LIMIT} (default {DEFAULT_LIMIT})",
    ),
]
PageCursor = Annotated[
    str | None,
    Query(description="the X-Next-Cursor of the previous page (opaque); absent: the first page"),
]
Zone = Annotated[str | None, Query(description="only items of this zone")]
Text = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_TEXT,
        description="only items whose id, name or SKU contains this text (case-insensitive)",
    ),
]

PAGE_HEADERS: dict[str, Any] = {
    "X-Total-Count": {
        "description": "items in the whole filtered list (every page)",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-Next-Cursor": {
        "description": "the cursor of the next page; absent on the last page",
        "schema": {"type": "string"},
    },
    "Link": {
        "description": 'RFC 8288 `<…>; rel="next"` to the next page; absent on the last page',
        "schema": {"type": "string"},
    },
}
"""The page headers, as the OpenAPI ``headers`` of a list read's 200 answer."""


def bad_cursor(detail: str) -> RequestValidationError:
    """A 422 naming the ``cursor`` parameter, in the shape FastAPI gives a bad parameter."""
    return RequestValidationError(
        [{"loc": ("query", "cursor"), "msg": detail, "type": "value_error"}]
    )


def page_query(
    limit: int,
    cursor: str | None,
    *,
    zone: str | None = None,
    state: str | None = None,
    q: str | None = None,
) -> PageQuery:
    """The ``PageQuery`` of these parameters (a cursor that is none of ours: 422)."""
    try:
        after = decode_cursor(cursor) if cursor is not None else None
    except BadCursor as exc:
        raise bad_cursor(str(exc)) from None
    return PageQuery(limit=limit, zone=zone, state=state, q=q, after=after)


def _read(query: PageQuery, read: Callable[[PageQuery], Page[T]]) -> Page[T]:
    try:
        return read(query)
    except BadCursor as exc:
        raise bad_cursor(str(exc)) from None


def page_headers(request: Request, page: Page[Any]) -> dict[str, str]:
    """``X-Total-Count`` and, unless ``page`` is the last, ``X-Next-Cursor`` and ``Link``."""
    headers = {"X-Total-Count": str(page.total)}
    if page.next_after is not None:
        cursor = encode_cursor(page.next_after)
        url = request.url.include_query_params(cursor=cursor)
        headers["X-Next-Cursor"] = cursor
        headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return headers


def paged(
    request: Request, response: Response, query: PageQuery, read: Callable[[PageQuery], Page[T]]
) -> list[T]:
    """``read(query)``'s items, with the page headers set on ``response`` (a cursor naming an
    item the list does not have: 422)."""
    page = _read(query, read)
    response.headers.update(page_headers(request, page))
    return page.items


def paged_json(
    request: Request,
    query: PageQuery,
    read: Callable[[PageQuery], Page[T]],
    body: Callable[[T], dict[str, Any]],
) -> Response:
    """The JSON array of ``body(item)`` for ``read(query)``'s items, encoded at once (orjson),
    with the page headers. For the long lists (``/stock``, ``/shelves``): building and
    re-validating a response model per item cost about three times the rest of a page. The
    route keeps its ``response_model`` for the OpenAPI; ``body`` must give that model's fields
    in its order and types (tests/unit/test_read_models.py pins the answers)."""
    page = _read(query, read)
    content = orjson.dumps([body(item) for item in page.items])
    return Response(content, media_type="application/json", headers=page_headers(request, page))
