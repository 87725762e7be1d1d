"""Shelf-scale payloads: the wire formats a scale publishes, parsed and encoded in one place.

Two formats (docs/payloads.md):

* **native** JSON on ``<prefix>/<site>/<zone>/scale/<device>``: one reading
  ``{"device": "scale-a01", "seq": 17, "ts": 1764067200.123, "grams": 1834.5}`` (optional
  ``"ch"`` channel, default 0, and ``"epoch"`` boot counter, default 0), or a batch: a JSON array
  of such objects. ``ts`` is Unix time in seconds (float).
* **ESPHome** state topics ``<node>/sensor/<sensor>/state`` with a plain number (grams) and the
  availability topic ``<node>/status`` (``online`` / ``offline``).

Parsing never raises on bad input: it returns a ``Rejected`` with a reason from ``REASONS``.
The simulators encode with the same module, so both sides agree by construction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from math import isfinite
from typing import Any, Final, NamedTuple

import orjson

REASONS: Final = (
    "bad_json",
    "bad_schema",
    "wrong_type",
    "not_finite",
    "negative",
    "over_range",
    "unknown_device",
    "device_mismatch",
    "oversize",
    "duplicate",
    "out_of_order",
    "stale_epoch",
    "ts_future",
    "bad_topic",
    "empty_batch",
    "bad_utf8",
)
"""Every reason a message or reading can be rejected for (metrics label values)."""

MAX_BATCH: Final = 1_000
"""Most readings accepted in one batch message."""

_MAX_SEQ: Final = 2**63 - 1


class RawReading(NamedTuple):
    """A syntactically valid reading, not yet checked against the site (device known, range).
    A NamedTuple: one is built per reading on the hot path."""

    device: str
    channel: int
    epoch: int
    seq: int
    ts_s: float
    weight_g: float


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str


def _bad(reason: str, detail: str) -> Rejected:
    return Rejected(reason, detail)


_raw: Callable[[tuple[Any, ...]], RawReading] = functools.partial(tuple.__new__, RawReading)
"""``RawReading`` from its fields' tuple, without the NamedTuple's Python-level ``__new__``."""


def _parse_one(obj: object) -> RawReading | Rejected:
    # Exact type checks (``type(x) is int``): orjson produces exactly these types, and ``bool``
    # (a subclass of int) must not pass for an integer; cheaper than isinstance on this path.
    if type(obj) is not dict:
        return _bad("bad_schema", "reading is not a JSON object")
    try:
        device = obj["device"]
        seq = obj["seq"]
        ts = obj["ts"]
        grams = obj["grams"]
    except KeyError as exc:
        return _bad("bad_schema", f"missing field {exc.args[0]!r}")
    channel = obj.get("ch", 0)
    epoch = obj.get("epoch", 0)
    if type(device) is not str or not device or len(device) > 64:
        return _bad("wrong_type", "device must be a non-empty string")
    if type(seq) is not int or type(channel) is not int or type(epoch) is not int:
        return _bad("wrong_type", "seq, ch and epoch must be integers")
    if seq < 0 or channel < 0 or epoch < 0 or seq > _MAX_SEQ or epoch > _MAX_SEQ:
        return _bad("wrong_type", "seq, ch and epoch must be non-negative 63-bit integers")
    if type(ts) is not float:
        if type(ts) is not int:
            return _bad("wrong_type", "ts must be a number (Unix seconds)")
        ts = float(ts)
    if type(grams) is not float:
        if type(grams) is not int:
            return _bad("wrong_type", "grams must be a number")
        grams = float(grams)
    if not (isfinite(ts) and isfinite(grams)):
        return _bad("not_finite", "ts and grams must be finite")
    if ts <= 0:
        return _bad("wrong_type", "ts must be a positive Unix time in seconds")
    return _raw((device, channel, epoch, seq, ts, grams))


def parse_native(payload: bytes) -> list[RawReading | Rejected] | Rejected:
    """Parse a native message: one reading object or an array of them.

    A message-level problem (bad JSON, empty or oversized batch) returns one ``Rejected``; a batch
    returns one result per element so a bad element does not drop its good neighbours.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        # orjson rejects NaN/Infinity literals as invalid JSON; report those precisely.
        low = payload[:4096].lower()
        if b"nan" in low or b"infinity" in low or "is infinity" in str(exc):
            return _bad("not_finite", "NaN/Infinity is not valid JSON")
        return _bad("bad_json", str(exc)[:200])
    if isinstance(doc, list):
        if not doc:
            return _bad("empty_batch", "batch array is empty")
        if len(doc) > MAX_BATCH:
            return _bad("oversize", f"batch of {len(doc)} readings exceeds {MAX_BATCH}")
        return [_parse_one(o) for o in doc]
    return [_parse_one(doc)]


def parse_esphome_state(payload: bytes) -> float | Rejected:
    """An ESPHome sensor state: a plain decimal number (ESPHome sends ``nan`` when the sensor
    has no value)."""
    if len(payload) > 64:
        return _bad("oversize", "ESPHome state longer than 64 bytes")
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        return _bad("bad_utf8", "ESPHome state is not ASCII")
    try:
        value = float(text)
    except ValueError:
        return _bad("wrong_type", f"ESPHome state {text[:20]!r} is not a number")
    if not math.isfinite(value):
        return _bad("not_finite", f"ESPHome state {text!r}")
    return value


def parse_esphome_status(payload: bytes) -> bool | Rejected:
    """ESPHome availability (``<node>/status``): ``online`` → True, ``offline`` → False."""
    text = payload.strip().lower()
    if text == b"online":
        return True
    if text == b"offline":
        return False
    return _bad("bad_schema", "availability must be 'online' or 'offline'")


def native_topic(prefix: str, site: str, zone: str, device: str) -> str:
    return f"{prefix}/{site}/{zone}/scale/{device}"


def native_filter(prefix: str, site: str) -> str:
    """The subscription filter that covers every native scale of a site."""
    return f"{prefix}/{site}/+/scale/+"


def esphome_state_topic(node: str, sensor: str) -> str:
    return f"{node}/sensor/{sensor}/state"


def esphome_status_topic(node: str) -> str:
    return f"{node}/status"


def encode_reading(
    device: str, seq: int, ts_s: float, weight_g: float, *, channel: int = 0, epoch: int = 0
) -> dict[str, object]:
    """The JSON object of one native reading (``ch``/``epoch`` omitted at their defaults)."""
    obj: dict[str, object] = {"device": device, "seq": seq, "ts": round(ts_s, 3), "grams": weight_g}
    if channel:
        obj["ch"] = channel
    if epoch:
        obj["epoch"] = epoch
    return obj


def encode_native(readings: list[dict[str, object]]) -> bytes:
    """One reading → an object; several → a batch array."""
    if len(readings) == 1:
        return orjson.dumps(readings[0])
    return orjson.dumps(readings)
