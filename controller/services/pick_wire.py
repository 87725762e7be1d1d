"""The pick request on the wire, one schema for both channels, and the answers' statuses.

`PickIn` is the body of ``POST /api/v1/picks`` (controller/api/routes/orders.py) and, as
`PickCommand` (the same fields plus ``idempotency_key``; ``channel`` defaults to ``mqtt``;
unknown fields ignored, as they always were there), of a command on the MQTT topic
``<prefix>/<site>/cmd/picks`` (`answer_command`). `status_of` maps the desk's refusals to the
statuses both channels answer with (HTTP status; the MQTT reply's ``status``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.services.order_desk import (
    InvalidPick,
    OrderNotFound,
    PickConflict,
    PickRefused,
    PickRequest,
    PickUnavailable,
    Submitted,
)

__all__ = [
    "Ident",
    "PickCommand",
    "PickIn",
    "PickLineIn",
    "answer_command",
    "status_of",
]

Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "qty": "2" is refused


class PickLineIn(_Wire):
    sku: Ident
    qty: Annotated[int, Field(gt=0, le=100_000)]


class PickIn(_Wire):
    """A pick request: the lines of one order for one pack station."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "order_id": "WMS-1001",
                    "lines": [{"sku": "SKU-A01", "qty": 2}],
                    "pack_station": "PS-1",
                    "channel": "wms",
                }
            ]
        },
    )
    order_id: Annotated[str, Field(min_length=1, max_length=128)]
    """The floor system's own order id, unique per channel."""
    lines: Annotated[list[PickLineIn], Field(min_length=1, max_length=10_000)]
    pack_station: Ident
    channel: Ident = "api"

    def request(self) -> PickRequest:
        """The desk's request for this body."""
        return PickRequest(
            external_id=self.order_id,
            lines=tuple((line.sku, line.qty) for line in self.lines),
            pack_station=self.pack_station,
            channel=self.channel,
        )


class PickCommand(PickIn):
    """A pick request on the MQTT command topic: `PickIn` plus an optional idempotency key."""

    model_config = ConfigDict(extra="ignore", strict=True)
    channel: Ident = "mqtt"
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None


_STATUS: dict[type[PickRefused], int] = {
    InvalidPick: 422,
    PickConflict: 409,
    OrderNotFound: 404,
    PickUnavailable: 503,
}


def status_of(refusal: PickRefused) -> int:
    """The status a refusal is answered with on either channel (500: the journal lost
    something it should have)."""
    for kind, status in _STATUS.items():
        if isinstance(refusal, kind):
            return status
    return 500


# A value the schema refuses for its size or form (qty 0, an empty order id, an SKU that is
# not an identifier) is answered 422 invalid_pick on MQTT, as the checks that came after the
# hand-written parser did; a body that is not the schema's shape (not JSON, a string qty, a
# missing field) is 400 bad_command. The key and the channel were always 400.
_VALUE_ERRORS = frozenset(
    {
        "greater_than",
        "less_than_equal",
        "string_too_short",
        "string_too_long",
        "string_pattern_mismatch",
        "too_short",
        "too_long",
    }
)


def answer_command(
    payload: bytes,
    submit: Callable[[PickRequest, str | None, str], Submitted],
    stats: dict[str, int],
) -> tuple[int, dict[str, Any]]:
    """Parse an MQTT pick command against the shared schema and submit it; (status, reply
    body), never raises. The caller is ``mqtt:<channel>``; access control is the broker's
    ACL on the command topic."""
    try:
        cmd = PickCommand.model_validate_json(payload)
    except ValidationError as exc:
        stats["invalid"] += 1
        errors = exc.errors(include_url=False)
        shape = [e for e in errors if e["type"] not in _VALUE_ERRORS or e["loc"][:1] in _ALWAYS_400]
        detail = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors)
        if shape or not errors:
            return 400, {"code": "bad_command", "detail": detail or "not a pick command"}
        body: dict[str, Any] = {"code": "invalid_pick", "detail": detail}
        order_id = _order_id(payload)
        return 422, {"order_id": order_id, **body} if order_id is not None else body
    try:
        done = submit(cmd.request(), cmd.idempotency_key, f"mqtt:{cmd.channel}")
    except PickRefused as exc:
        return status_of(exc), {
            "order_id": cmd.order_id,
            "code": exc.code,
            "detail": exc.detail,
            **exc.extra,
        }
    return done.status, {"order_id": cmd.order_id, "order": done.order, "replayed": done.replayed}


_ALWAYS_400 = {("channel",), ("idempotency_key",)}


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def _order_id(payload: bytes) -> str | None:
    """The command's order id, when it is a string (for the reply of a refused command)."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    order_id = body.get("order_id") if isinstance(body, dict) else None
    return order_id if isinstance(order_id, str) else None
