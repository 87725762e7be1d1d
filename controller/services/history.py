"""The historian: drains the journal's outbox into a history sink, losing nothing.

Loop: read a batch of outbox rows (≤ ``batch_size``: readings, with a share reserved for
events) → turn each row into one HistoryPoint (``SCHEMA``; docs/influx-schema.md) → give every
point a series timestamp no other outbox row of that series has (``TimeAssigner``) → write the
batch until the sink confirms it → only then delete those rows from the outbox.

* Retryable failures (connection refused, timeouts, 5xx, 429) are retried with capped,
  jittered exponential backoff, resending exactly the same points; the outbox grows meanwhile
  and, at ``journal.max_outbox_rows``, the runtime stops reading from the broker
  (backpressure, never dropping).
* A rejection (HTTP 400/413/422: a bad point, a field type conflict) is bisected: the halves are
  written separately until each bad point stands alone; it is dead-lettered once (journal
  ``dead_letters``, reason ``history_rejected``) and never sent again, the rest lands.
* Rows that cannot become a point (a corrupt event body, a non-finite value) are dead-lettered
  as ``history_corrupt_row`` and skipped; the rows around them are delivered.
* Idempotent: a point's identity is its series + millisecond timestamp; a retry after a lost
  reply rewrites the same identities, which InfluxDB (and the SQLite sink) overwrite in place.
* A live catalogue change (``CatalogChanged`` on the bus, `catalogue_listener`) gives the rows
  journaled after it the new zone and SKU tags of a shelf; rows already in the outbox then keep
  the tags of the catalogue they were journaled under, points already written keep theirs.

The service only awaits the sink and sleeps; each iteration's synchronous work (one outbox read,
one conversion of ≤ ``batch_size`` rows, one delete) is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from controller.config import SiteConfig
from controller.domain.events import CatalogChanged
from controller.ports import (
    Backoff,
    DeadLetter,
    FieldValue,
    HistoryPoint,
    HistoryQuery,
    HistorySink,
    JournalUnavailable,
    Outbox,
    OutboxEvent,
    OutboxReading,
    OutboxRow,
    ShelfHistoryRaw,
    SinkRejected,
    SinkUnavailable,
)

log = logging.getLogger("floorhand.history")

# -- the schema (docs/influx-schema.md mirrors this; a test keeps them equal) ------------------
SHELF_STATUSES = ("unknown", "ok", "settling", "ambiguous", "stale")
SEVERITIES = ("ok", "low", "critical", "out", "unknown")
TRANSITIONS = ("raised", "escalated", "deescalated", "resolved")

SCHEMA: dict[str, dict[str, Any]] = {
    "weight": {
        "tags": ("site", "zone", "shelf", "sku", "device", "channel"),
        "fields": {"weight_g": "float", "seq": "integer", "epoch": "integer"},
    },
    "stock": {
        "tags": ("site", "zone", "shelf", "sku"),
        "fields": {"units": "integer", "delta": "integer"},
    },
    "shelf_status": {
        "tags": ("site", "zone", "shelf", "sku", "status"),
        "fields": {"status_code": "integer", "previous": "string", "reason": "string"},
    },
    "alert": {
        "tags": ("site", "key", "sku", "transition", "severity"),
        "fields": {
            "episode": "string",
            "level": "integer",
            "threshold": "integer",
            "suggested_order_qty": "integer",
            "active": "integer",
            "severity_code": "integer",
        },
    },
    "seq_gap": {
        "tags": ("site", "zone", "device"),
        "fields": {"missing": "integer", "after_seq": "integer", "seq": "integer"},
    },
    "event": {
        "tags": ("site", "kind"),
        "fields": {"body": "string"},
    },
}
"""Measurement → tag keys and field types. Every tag value is bounded by the site file or by an
enumeration; identifiers that grow without bound (episode ids, sequence numbers) are fields."""

KNOWN_EVENT_KINDS = frozenset(
    {
        "stock_changed",
        "shelf_status_changed",
        "alert_raised",
        "alert_escalated",
        "alert_deescalated",
        "alert_resolved",
        "seq_gap",
        "seq_gap_filled",
    }
)
MAX_OTHER_KINDS = 64
"""Unknown event kinds go to ``event`` with ``kind`` as a tag; beyond this many distinct kinds
they are tagged ``other`` (a tag value must stay bounded)."""

UNKNOWN = "_unknown"
"""Tag value for a shelf or device no longer in the site file."""


class CorruptRow(ValueError):
    """An outbox row that cannot become a point."""


@dataclass(frozen=True, slots=True)
class Topology:
    """What the site file adds to outbox rows: zone and SKU per shelf, zone per device."""

    site: str
    shelves: dict[str, tuple[str, str]]
    devices: dict[str, str]

    @classmethod
    def from_site(cls, site: SiteConfig) -> Topology:
        return cls(
            site=site.site.id,
            shelves={s.id: (s.zone, s.sku) for s in site.shelves},
            devices={s.id: s.zone for s in site.scales},
        )


def _int(body: dict[str, Any], key: str, *, optional: bool = False) -> int | None:
    v = body.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise CorruptRow(f"{key}: expected an integer, got {v!r}")
    return v


def _str(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v:
        raise CorruptRow(f"{key}: expected a string, got {v!r}")
    return v


def _ts_ms(ts_s: Any) -> int:
    if type(ts_s) is float and 0 <= ts_s < 32_503_680_000:
        return math.floor(ts_s * 1000)
    if isinstance(ts_s, bool) or not isinstance(ts_s, int | float) or not math.isfinite(ts_s):
        raise CorruptRow(f"ts: expected a finite number, got {ts_s!r}")
    if not 0 <= ts_s < 32_503_680_000:  # year 3000
        raise CorruptRow(f"ts: {ts_s!r} is out of range")
    return math.floor(ts_s * 1000)


def _enum(value: Any, allowed: tuple[str, ...]) -> str:
    return value if isinstance(value, str) and value in allowed else "other"


class PointBuilder:
    """Outbox rows → HistoryPoints (pure; tag tuples are shared per shelf)."""

    def __init__(self, topo: Topology, *, other_kinds: set[str] | None = None) -> None:
        self.topo = topo
        self._reading_tags: dict[tuple[str, int, str], tuple[tuple[str, str], ...]] = {}
        self._other_kinds: set[str] = set() if other_kinds is None else other_kinds

    @property
    def other_kinds(self) -> set[str]:
        """The unknown event kinds tagged by their own name (shared by the next builder)."""
        return self._other_kinds

    def _shelf(self, shelf: str) -> tuple[str, str]:
        return self.topo.shelves.get(shelf, (UNKNOWN, UNKNOWN))

    def reading(self, row: OutboxReading) -> HistoryPoint:
        """An outbox reading → a ``weight`` point."""
        _id, device, channel, epoch, seq, ts, weight_g, shelf = row  # typed by OutboxReading
        if type(weight_g) is not float or type(ts) is not float or weight_g - weight_g != 0:
            if not isinstance(weight_g, float | int) or not math.isfinite(weight_g):
                raise CorruptRow(f"weight_g: expected a finite number, got {weight_g!r}")
            weight_g = float(weight_g)
        if type(channel) is not int or type(epoch) is not int or type(seq) is not int:
            for name, v in (("channel", channel), ("epoch", epoch), ("seq", seq)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise CorruptRow(f"{name}: expected an integer, got {v!r}")
        if type(device) is not str or type(shelf) is not str:
            raise CorruptRow("device/shelf: expected strings")
        ts_ms = _ts_ms(ts)
        key = (device, channel, shelf)
        tags = self._reading_tags.get(key)
        if tags is None:
            zone, sku = self._shelf(shelf)
            tags = tuple(
                sorted(
                    {
                        "site": self.topo.site,
                        "zone": zone,
                        "shelf": shelf,
                        "sku": sku,
                        "device": device,
                        "channel": str(channel),
                    }.items()
                )
            )
            self._reading_tags[key] = tags
        return HistoryPoint(
            "weight",
            tags,
            (("epoch", epoch), ("seq", seq), ("weight_g", weight_g)),
            ts_ms,
        )

    def event(self, row: OutboxEvent) -> HistoryPoint:
        """An outbox event → one point of the measurement its kind maps to."""
        ts_ms = _ts_ms(row.ts_s)
        kind, raw = row.kind, row.body
        if not isinstance(kind, str):
            raise CorruptRow(f"kind: expected a string, got {kind!r}")
        if not isinstance(raw, bytes | str):
            raise CorruptRow(f"body: expected JSON, got {type(raw).__name__}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise CorruptRow(f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise CorruptRow("body is not a JSON object")
        site = self.topo.site
        fields: dict[str, FieldValue | None]
        if kind == "stock_changed":
            shelf = _str(body, "shelf_id")
            zone, sku = self._shelf(shelf)
            sku_v = body.get("sku")
            if isinstance(sku_v, str) and sku_v:
                sku = sku_v  # the SKU counted for (a recount as a shelf moves: the new one)
            new = _int(body, "new_units")
            old = _int(body, "old_units", optional=True)
            assert new is not None
            tags = {"site": site, "zone": zone, "shelf": shelf, "sku": sku}
            fields = {"units": new, "delta": None if old is None else new - old}
            return _point("stock", tags, fields, ts_ms)
        if kind == "shelf_status_changed":
            shelf = _str(body, "shelf_id")
            zone, sku = self._shelf(shelf)
            status = _enum(body.get("new"), SHELF_STATUSES)
            tags = {"site": site, "zone": zone, "shelf": shelf, "sku": sku, "status": status}
            code = SHELF_STATUSES.index(status) if status in SHELF_STATUSES else -1
            fields = {
                "status_code": code,
                "previous": str(body.get("old", "")),
                "reason": str(body.get("reason", "")),
            }
            return _point("shelf_status", tags, fields, ts_ms)
        if kind.startswith("alert_") and kind in KNOWN_EVENT_KINDS:
            transition = kind.removeprefix("alert_")
            severity = body.get("new_severity", body.get("severity"))
            sev = _enum(severity, SEVERITIES)
            key = _str(body, "key")
            sku_v = body.get("sku")
            sku = sku_v if isinstance(sku_v, str) and sku_v else key
            tags = {
                "site": site,
                "key": key,
                "sku": sku,
                "transition": transition,
                "severity": sev,
            }
            fields = {
                "episode": _str(body, "episode_id"),
                "level": _int(body, "level", optional=True),
                "threshold": _int(body, "threshold", optional=True),
                "suggested_order_qty": _int(body, "suggested_order_qty", optional=True),
                "active": 0 if transition == "resolved" else 1,
                "severity_code": SEVERITIES.index(sev) if sev in SEVERITIES else -1,
            }
            return _point("alert", tags, fields, ts_ms)
        if kind == "seq_gap" or kind == "seq_gap_filled":
            device = _str(body, "device")
            tags = {"site": site, "zone": self.topo.devices.get(device, UNKNOWN), "device": device}
            if kind == "seq_gap":
                fields = {
                    "missing": _int(body, "missing"),
                    "after_seq": _int(body, "after_seq"),
                    "seq": _int(body, "seq"),
                }
            else:
                # Late readings arrived in a gap: negative, so sum(missing) is what is missing.
                filled = _int(body, "filled")
                assert filled is not None
                fields = {
                    "missing": -filled,
                    "after_seq": _int(body, "first_seq"),
                    "seq": _int(body, "last_seq"),
                }
            return _point("seq_gap", tags, fields, ts_ms)
        if kind not in self._other_kinds and len(self._other_kinds) < MAX_OTHER_KINDS:
            self._other_kinds.add(kind)
        tag_kind = kind if kind in self._other_kinds else "other"
        return _point(
            "event", {"site": site, "kind": tag_kind}, {"body": orjson.dumps(body).decode()}, ts_ms
        )


def _point(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue | None], ts_ms: int
) -> HistoryPoint:
    return HistoryPoint(
        measurement,
        tuple(sorted((k, v) for k, v in tags.items() if v)),
        tuple(sorted((k, v) for k, v in fields.items() if v is not None)),
        ts_ms,
    )


# -- unique series timestamps -------------------------------------------------------------------
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]

NUDGE_WINDOW_MS = 1_000
"""A point at or before its series' last time, from a source clock at most this far behind the
last source time, is moved to last + 1 ms; older ones keep their own time."""

_NO_ORDER: Final = (-1, -1)


def _reading_order(p: HistoryPoint) -> tuple[int, int]:
    """``(epoch, seq)`` of a weight point (``PointBuilder.reading`` puts them first)."""
    f = p.fields
    if p.measurement == "weight" and len(f) >= 2 and f[0][0] == "epoch" and f[1][0] == "seq":
        return int(f[0][1]), int(f[1][1])
    return _NO_ORDER


LATE_MEMORY = 256
"""Milliseconds given to late points that a series remembers (to keep the next ones apart)."""

GAP_MEMORY = 64
"""Gaps between two in-order points (a jump of seq) that a series remembers, so the late
readings that fill them land between those two points' milliseconds."""


class TimeAssigner:
    """Gives every point a millisecond its series has not used, deterministically.

    InfluxDB keeps one point per series and timestamp (a second write overwrites it). Two outbox
    rows of one series can carry the same millisecond (ESPHome readings stamped with one receive
    time, a burst redelivered after an outage, a coarse device clock): the later one is moved to
    ``last + 1`` ms. The state per series is ``(last assigned ms, last source ms, epoch, seq)``
    (the last two: the newest reading of a weight series); it depends only on the rows drained so
    far, in outbox order, so a batch is always rebuilt the same way.

    A late reading (its ``(epoch, seq)`` not above the series' newest: a publisher's backlog
    delivered after newer readings) keeps its own millisecond and leaves that state as it was;
    only if an earlier late point of its series (of the last ``LATE_MEMORY``) already took that
    millisecond does it move to the next free one. The same reading late again (journaled twice
    because its copy had left the outbox) gets the millisecond it got the first time.

    A late reading that falls in a remembered gap (a jump of its series' seq between two
    in-order points, the last ``GAP_MEMORY`` per series) is kept strictly between those two
    points' milliseconds: in-order times only grow, so no in-order point can have one there.
    Without that, a late reading stamped in the same millisecond as the reading before its gap
    (a burst) would overwrite it. A gap with fewer free milliseconds than late readings is
    counted in ``crowded`` and its extra readings keep their own time.
    """

    def __init__(self) -> None:
        self.last: dict[SeriesKey, tuple[int, int, int, int]] = {}
        self.late_ms: dict[SeriesKey, list[tuple[int, int, int]]] = {}
        """Per series, ``(ms, epoch, seq)`` of its most recent late points, oldest first."""
        self.gaps: dict[SeriesKey, list[tuple[int, int, int, int, int]]] = {}
        """Per series, ``(epoch, first seq, last seq, ms before, ms after)`` of its most recent
        gaps between two in-order points, oldest first."""
        self.nudged = 0
        self.late = 0
        self.crowded = 0

    def assign(self, p: HistoryPoint) -> HistoryPoint:
        key = (p.measurement, p.tags)
        ts = p.ts_ms
        prev = self.last.get(key)
        order = _reading_order(p)
        if prev is None:
            self.last[key] = (ts, ts, *order)
            return p
        last, last_src, epoch, seq = prev
        gap_from: int | None = None
        if order != _NO_ORDER:
            if order <= (epoch, seq):
                return self._late(key, p, order)
            if order[0] == epoch and order[1] > seq + 1:
                gap_from = seq + 1
            epoch, seq = order
        if ts > last:
            t = ts
        elif ts >= last_src - NUDGE_WINDOW_MS:
            t = last + 1
            self.nudged += 1
        else:  # the source clock stepped back by more than the window: trust it, start there
            t = ts
        self.last[key] = (t, ts, epoch, seq)
        if gap_from is not None:
            self._gap(key, (epoch, gap_from, seq - 1, last, t))
        return p if t == ts else HistoryPoint(p.measurement, p.tags, p.fields, t)

    def _gap(self, key: SeriesKey, gap: tuple[int, int, int, int, int]) -> None:
        """Remember a gap ``(epoch, first seq, last seq, ms before, ms after)``."""
        gaps = self.gaps.setdefault(key, [])
        gaps.append(gap)
        if len(gaps) > GAP_MEMORY:
            del gaps[0]

    def _in_gap(self, key: SeriesKey, order: tuple[int, int]) -> tuple[int, int] | None:
        """The free milliseconds ``(lo, hi)`` of the remembered gap ``order`` falls in."""
        epoch, seq = order
        for e, first, last_seq, before, after in reversed(self.gaps.get(key, ())):
            if e == epoch and first <= seq <= last_seq:
                return before + 1, after - 1
        return None

    def _late(self, key: SeriesKey, p: HistoryPoint, order: tuple[int, int]) -> HistoryPoint:
        self.late += 1
        used = self.late_ms.setdefault(key, [])
        for ms, epoch, seq in used:
            if (epoch, seq) == order:  # the same reading late again: the same point
                t = ms
                break
        else:
            taken = {ms for ms, _, _ in used}
            t = p.ts_ms
            span = self._in_gap(key, order)
            if span is not None:
                t = self._free_in(span, t, taken)
            else:
                while t in taken:
                    t += 1
            used.append((t, *order))
            if len(used) > LATE_MEMORY:
                del used[0]
        if t == p.ts_ms:
            return p
        self.nudged += 1
        return HistoryPoint(p.measurement, p.tags, p.fields, t)

    def _free_in(self, span: tuple[int, int], ts: int, taken: set[int]) -> int:
        """A millisecond in ``span`` no late point took: ``ts`` (clamped into it) or the next
        free one up, else down; ``ts`` itself (counted ``crowded``) when the span is full."""
        lo, hi = span
        start = min(max(ts, lo), hi)
        if lo <= hi:
            for t in itertools.chain(range(start, hi + 1), range(start - 1, lo - 1, -1)):
                if t not in taken:
                    return t
        self.crowded += 1
        log.warning(
            "history: a gap of %d ms holds more late readings than milliseconds; one keeps its "
            "own time %d and may overwrite a point there",
            max(0, hi - lo + 1),
            ts,
        )
        return ts

    def checkpoint(self) -> tuple[dict[SeriesKey, Any], dict[SeriesKey, list[Any]], Any]:
        """The state, for ``rollback`` when a batch fails."""
        return (
            dict(self.last),
            {k: list(v) for k, v in self.late_ms.items()},
            {k: list(v) for k, v in self.gaps.items()},
        )

    def rollback(self, saved: tuple[dict[SeriesKey, Any], dict[SeriesKey, list[Any]], Any]) -> None:
        self.last, self.late_ms, self.gaps = saved

    def snapshot(self, keep_after_ms: int | None = None) -> list[Any]:
        late, gaps = self.late_ms, self.gaps
        return [
            [
                m, [list(t) for t in tags], last, src, epoch, seq,
                *([late.get(k, []), gaps[k]] if k in gaps else [late[k]] if k in late else []),
            ]
            for k, (last, src, epoch, seq) in self.last.items()
            if keep_after_ms is None or last >= keep_after_ms
            for m, tags in (k,)
        ]  # fmt: skip

    def restore(self, data: list[Any]) -> None:
        """Load a ``snapshot`` (also the older ``[m, tags, last, src]`` form)."""
        self.last = {}
        self.late_ms = {}
        self.gaps = {}
        for m, tags, last, src, *rest in data:
            key = (str(m), tuple((str(k), str(v)) for k, v in tags))
            order = (int(rest[0]), int(rest[1])) if rest else _NO_ORDER
            self.last[key] = (int(last), int(src), *order)
            if len(rest) > 2 and rest[2]:
                self.late_ms[key] = [(int(t), int(e), int(q)) for t, e, q in rest[2]]
            if len(rest) > 3 and rest[3]:
                self.gaps[key] = [
                    (int(e), int(f), int(q), int(b), int(a)) for e, f, q, b, a in rest[3]
                ]


class AssignerStateFile:
    """The TimeAssigner state before and after the last confirmed batch, with a marker naming
    that batch's last outbox rows (``<journal>.history-state.json``, replaced atomically and
    fsynced before the rows are deleted).

    After a crash: if the marked rows are still in the outbox (the delete did not happen),
    they are rebuilt from the ``before`` state, exactly as the first time; otherwise the
    ``after`` state continues where the confirmed batches stopped. Outbox ids are not a
    marker by themselves: SQLite reuses them once a table has been emptied."""

    KEEP_MS = 3_600_000
    """Series silent for an hour (relative to the newest point) are not kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def load(self) -> None:
        try:
            data = orjson.loads(self.path.read_bytes())
            self.data = data if isinstance(data, dict) else {}
        except FileNotFoundError:
            self.data = {}
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("history state %s unreadable, starting fresh: %s", self.path, exc)
            self.data = {}

    def choose(self, outbox: Outbox) -> list[Any] | None:
        """The state the rows now at the head of the outbox were (or will be) built on."""
        if not self.data:
            return None
        marker = self.data.get("marker") or {}
        present = False
        reading = marker.get("reading")
        if reading:
            rows = outbox.read_readings(int(reading[0]) - 1, 1)
            present = bool(rows) and list(reading) == reading_marker(rows[0])
        event = marker.get("event")
        if event and not present:
            evs = outbox.read_events(int(event[0]) - 1, 1)
            present = bool(evs) and list(event) == event_marker(evs[0])
        chosen = self.data.get("before" if present else "after")
        return chosen if isinstance(chosen, list) else None

    def save_sync(self, marker: dict[str, Any], before: list[Any], after: list[Any]) -> None:
        self.data = {"marker": marker, "before": before, "after": after}
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(self.data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def reading_marker(row: OutboxReading) -> list[Any]:
    """A reading row's id and identity (device, epoch, seq)."""
    return [int(row.id), repr(row.device), repr(row.epoch), repr(row.seq)]


def event_marker(row: OutboxEvent) -> list[Any]:
    """An event row's id, time, kind and a digest of its body."""
    body = row.body if isinstance(row.body, bytes) else str(row.body).encode()
    return [
        int(row.id),
        repr(row.ts_s),
        repr(row.kind),
        hashlib.blake2b(body, digest_size=8).hexdigest(),
    ]


BUILD_CHUNK = 1_000
"""Rows converted between two yields to the event loop (~3 ms of work)."""


# -- the service --------------------------------------------------------------------------------
@dataclass(slots=True)
class HistoryStats:
    backend: str
    state: str = "starting"
    """``starting``, ``up`` (last write confirmed), ``down`` (retrying)."""
    since_s: float = field(default_factory=time.monotonic)
    last_error: str | None = None
    points_written: int = 0
    batches: int = 0
    retries: int = 0
    rejected_requests: int = 0
    dead_lettered: int = 0
    corrupt_rows: int = 0
    nudged: int = 0
    last_confirmed_s: float | None = None
    drained_through_ts_s: float | None = None


@dataclass(frozen=True, slots=True)
class HistorySettings:
    batch_size: int = 5_000
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    flush_interval_s: float = 1.0
    event_share: float = 0.2
    """Part of a batch reserved for events so a reading backlog does not starve them."""

    @classmethod
    def from_site(cls, site: SiteConfig) -> HistorySettings:
        """The site file's ``[history]`` figures (event share: the default)."""
        h = site.history
        return cls(
            batch_size=h.batch_size,
            backoff_initial_s=h.backoff_initial_s,
            backoff_max_s=h.backoff_max_s,
            flush_interval_s=h.flush_interval_s,
        )

    def sink_backoff(self) -> Backoff:
        """Between writes the sink refused as unavailable: ``backoff_initial_s`` doubling to
        ``backoff_max_s``, each delay 50–100 % of that (jitter 0.5)."""
        max_s = self.backoff_max_s
        return Backoff(min(self.backoff_initial_s, max_s), max_s, jitter=0.5)

    def drain_backoff(self) -> Backoff:
        """After a failed outbox read or delete (the journal): 1 s doubling to
        ``backoff_max_s``, no jitter."""
        max_s = self.backoff_max_s
        return Backoff(min(1.0, max_s), max_s, jitter=0.0)


@dataclass(frozen=True, slots=True)
class HistoryBucket:
    t_ms: int
    weight_g_mean: float | None
    weight_g_min: float | None
    weight_g_max: float | None
    readings: int
    units: int | None


@dataclass(frozen=True, slots=True)
class ShelfHistory:
    shelf: str
    zone: str
    sku: str
    buckets: list[HistoryBucket]


def fill_buckets(raw: ShelfHistoryRaw, q: HistoryQuery) -> list[HistoryBucket]:
    """Every bucket of ``[from, to)``: weight aggregates where readings exist, the unit count
    carried forward from the last change (or from before ``from``)."""
    every = q.every_ms
    start = (q.from_ms // every) * every
    weight = {t: (mean, lo, hi, n) for t, mean, lo, hi, n in raw.weight}
    units = dict(raw.units)
    out: list[HistoryBucket] = []
    current = raw.units_before
    t = start
    while t < q.to_ms:
        if t in units:
            current = units[t]
        w = weight.get(t)
        if w is None:
            out.append(HistoryBucket(t, None, None, None, 0, current))
        else:
            out.append(HistoryBucket(t, w[0], w[1], w[2], w[3], current))
        t += every
    return out


class HistoryService:
    """Drains the outbox into ``sink``; run ``run()`` as one named task of the runtime."""

    def __init__(
        self,
        outbox: Outbox,
        sink: HistorySink,
        topo: Topology,
        settings: HistorySettings | None = None,
        *,
        state_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.sink = sink
        self.topo = topo
        self.settings = settings or HistorySettings()
        self.builder = PointBuilder(topo)
        self._old_builders: dict[str, list[tuple[int, PointBuilder]]] = {
            "readings": [],
            "events": [],
        }
        """Per outbox table, ``(last id, builder)`` of the catalogues replaced while rows
        journaled under them (ids up to that one) were still in the outbox, oldest first."""
        self.assigner = TimeAssigner()
        self.state_file = AssignerStateFile(state_path) if state_path is not None else None
        self._clock = clock
        self.stats = HistoryStats(backend=sink.backend)
        self._restored = False
        self._saved_state: list[Any] = []
        self._wake = asyncio.Event()
        self.changed = asyncio.Condition()
        """Notified after every confirmed batch and every sink state change (tests and tools
        wait on it)."""

    # -- public -------------------------------------------------------------------------------
    def wake(self) -> None:
        """New rows were committed: drain now instead of at the next flush interval."""
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        backoff = self.settings.drain_backoff()
        try:
            while True:
                try:
                    full = await self.drain_once()
                except (JournalUnavailable, OSError) as exc:
                    # The journal (disk full, I/O error, locked) or the state file could not
                    # be used: nothing was deleted, so the same rows are tried again. Any other
                    # error is a bug and ends the task with its traceback.
                    failures += 1
                    self.stats.last_error = f"outbox: {exc}"
                    if failures == 1:
                        log.error("history drain failed, will retry: %s", exc)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                if failures:
                    log.info("history drain works again after %d failure(s)", failures)
                    failures = 0
                    backoff.reset()
                if full:
                    await asyncio.sleep(0)  # let ingest run between full batches
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.flush_interval_s):
                        await self._wake.wait()
        finally:
            await self.sink.aclose()

    def retag(self, topo: Topology) -> None:
        """The catalogue changed to ``topo``: rows journaled from now on get its tags; the rows
        now in the outbox keep the tags of the catalogue they were journaled under."""
        readings_through, events_through = self.outbox.newest_ids()
        old = self.builder
        for table, through in (("readings", readings_through), ("events", events_through)):
            eras = self._old_builders[table]
            if through > (eras[-1][0] if eras else 0):
                eras.append((through, old))
        self.topo = topo
        self.builder = PointBuilder(topo, other_kinds=old.other_kinds)

    def catalogue_listener(
        self, topology: Callable[[], Topology]
    ) -> Callable[[Iterable[object]], None]:
        """A bus listener that calls `retag` with ``topology()`` (the catalogue in force) at
        each ``CatalogChanged`` that adds, removes or changes shelves, or adds or removes
        records (scales); SKU-only changes (thresholds) leave the tags as they are (no
        O(shelves) rebuild on the event loop)."""

        def on_events(events: Iterable[object]) -> None:
            if any(
                isinstance(e, CatalogChanged) and (e.shelves or e.added or e.removed)
                for e in events
            ):
                self.retag(topology())

        return on_events

    def _builder_of(self, table: str, row_id: int) -> PointBuilder:
        """The builder of the catalogue the row was journaled under."""
        for through, builder in self._old_builders[table]:
            if row_id <= through:
                return builder
        return self.builder

    def _retire_builders(self, readings_through: int | None, events_through: int | None) -> None:
        """Forget the replaced catalogues whose rows have all left the outbox (before SQLite
        reuses their ids: it does once a table is empty)."""
        for table, deleted in (("readings", readings_through), ("events", events_through)):
            eras = self._old_builders[table]
            if deleted is not None and eras:
                eras[:] = [(t, b) for t, b in eras if t > deleted]

    async def query(self, q: HistoryQuery) -> list[ShelfHistory]:
        raws = await self.sink.query(q)
        out = []
        for raw in raws:
            zone, sku = self.topo.shelves.get(raw.shelf, (UNKNOWN, UNKNOWN))
            out.append(ShelfHistory(raw.shelf, zone, sku, fill_buckets(raw, q)))
        return out

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "backend": s.backend,
            "state": s.state,
            "since_s": time.monotonic() - s.since_s,
            "last_error": s.last_error,
            "points_written": s.points_written,
            "batches": s.batches,
            "retries": s.retries,
            "rejected_requests": s.rejected_requests,
            "dead_lettered": s.dead_lettered,
            "corrupt_rows": s.corrupt_rows,
            "nudged": self.assigner.nudged,
            "lag_s": (
                max(0.0, self._clock() - s.drained_through_ts_s)
                if s.drained_through_ts_s is not None and self.outbox.outbox_rows
                else 0.0
            ),
        }

    # -- one iteration ------------------------------------------------------------------------
    def _restore_assigner(self) -> None:
        self._restored = True
        if self.state_file is None:
            return
        self.state_file.load()
        series = self.state_file.choose(self.outbox)
        if series:
            try:
                self.assigner.restore(series)
                self._saved_state = series
            except (TypeError, ValueError) as exc:
                log.warning("history state %s unusable: %s", self.state_file.path, exc)

    async def drain_once(self) -> bool:
        """Deliver one batch; True when it was full (more is waiting). On any failure the
        timestamp state goes back to where it was, so the batch is rebuilt identically."""
        if not self._restored:
            self._restore_assigner()
        saved = self.assigner.checkpoint()
        try:
            return await self._drain_once()
        except BaseException:
            self.assigner.rollback(saved)
            raise

    async def _drain_once(self) -> bool:
        st = self.settings
        ev_limit = max(1, int(st.batch_size * st.event_share))
        # Always from the head: confirmed rows are gone, and ids are reused once a table empties.
        events = self.outbox.read_events(0, ev_limit)
        r_limit = st.batch_size - len(events)
        readings: list[OutboxReading] = []
        after_id = 0
        while len(readings) < r_limit:
            page = self.outbox.read_readings(after_id, min(BUILD_CHUNK, r_limit - len(readings)))
            readings.extend(page)
            if len(page) < BUILD_CHUNK:
                break
            after_id = page[-1].id
            await asyncio.sleep(0)  # bounded slices: let ingest run in between
        if not readings and not events:
            return False
        points: list[HistoryPoint] = []
        origins: list[tuple[str, int]] = []
        dead: list[DeadLetter] = []
        now = self._clock()
        build_r = self.builder.reading
        old_readings = self._old_builders["readings"]
        assign = self.assigner.assign
        for i, row in enumerate(readings):
            if i and not i % BUILD_CHUNK:
                await asyncio.sleep(0)  # bounded slices: let ingest run in between
            try:
                p = (
                    self._builder_of("readings", row.id).reading(row)
                    if old_readings
                    else build_r(row)
                )
            except CorruptRow as exc:
                dead.append(self._corrupt("readings", row, str(exc), now))
                continue
            points.append(assign(p))
            origins.append(("readings", row.id))
        for ev in events:
            try:
                p = self._builder_of("events", ev.id).event(ev)
            except CorruptRow as exc:
                dead.append(self._corrupt("events", ev, str(exc), now))
                continue
            points.append(assign(p))
            origins.append(("events", ev.id))
        rejected = await self._deliver(points)
        for i, reason in rejected:
            p = points[i]
            table, row_id = origins[i]
            payload = orjson.dumps(
                {
                    "outbox": table,
                    "id": row_id,
                    "measurement": p.measurement,
                    "tags": dict(p.tags),
                    "fields": dict(p.fields),
                    "ts_ms": p.ts_ms,
                }
            )
            dead.append(
                DeadLetter(now, f"history/{self.sink.backend}", "history_rejected", reason, payload)
            )
            log.error(
                "history: %s point from outbox %s #%d rejected, dead-lettered: %s",
                p.measurement,
                table,
                row_id,
                reason,
            )
        r_through = int(readings[-1].id) if readings else None
        e_through = int(events[-1].id) if events else None
        if dead:
            self.outbox.commit_dead_letters(dead)
            self.stats.dead_lettered += len(rejected)
            self.stats.corrupt_rows += len(dead) - len(rejected)
        if self.state_file is not None:
            after = self.assigner.snapshot(
                max((p.ts_ms for p in points), default=0) - AssignerStateFile.KEEP_MS
            )
            marker = {
                "reading": reading_marker(readings[-1]) if readings else None,
                "event": event_marker(events[-1]) if events else None,
            }
            await asyncio.to_thread(self.state_file.save_sync, marker, self._saved_state, after)
            self._saved_state = after
        self.outbox.delete_confirmed(r_through, e_through)
        self._retire_builders(r_through, e_through)
        if readings:
            with contextlib.suppress(TypeError, ValueError):
                self.stats.drained_through_ts_s = float(readings[-1].ts_s)
        self.stats.batches += 1
        self.stats.points_written += len(points) - len(rejected)
        self.stats.last_confirmed_s = self._clock()
        await self._notify()
        return len(events) >= ev_limit or len(readings) >= r_limit

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked after each batch or state change."""
        async with self.changed:
            await self.changed.wait_for(predicate)

    def _corrupt(self, table: str, row: OutboxRow, reason: str, now: float) -> DeadLetter:
        log.error("history: outbox %s row #%r is corrupt, skipped: %s", table, row.id, reason)
        payload = repr(tuple(row)).encode("utf-8", "replace")
        return DeadLetter(now, f"history/outbox/{table}", "history_corrupt_row", reason, payload)

    async def _deliver(self, points: list[HistoryPoint]) -> list[tuple[int, str]]:
        """Write every point; bisect rejected chunks down to single bad points. Returns the
        indexes of the points the sink refused, with the reason."""
        rejected: list[tuple[int, str]] = []
        stack = [(0, len(points))] if points else []
        while stack:
            lo, hi = stack.pop()
            try:
                await self._write_until_confirmed(points[lo:hi])
            except SinkRejected as exc:
                self.stats.rejected_requests += 1
                if hi - lo == 1:
                    rejected.append((lo, str(exc)[:300]))
                    continue
                mid = (lo + hi) // 2
                stack.append((mid, hi))
                stack.append((lo, mid))
        rejected.sort()
        return rejected

    async def _write_until_confirmed(self, chunk: Sequence[HistoryPoint]) -> None:
        st = self.settings
        backoff = st.sink_backoff()
        down_since: float | None = None
        while True:
            try:
                await self.sink.write(chunk)
            except SinkUnavailable as exc:
                self.stats.retries += 1
                self.stats.last_error = str(exc)
                if self.stats.state != "down":
                    self.stats.state = "down"
                    self.stats.since_s = time.monotonic()
                    log.error(
                        "history sink %s unavailable, holding %d outbox row(s), retrying: %s",
                        self.sink.backend,
                        self.outbox.outbox_rows,
                        exc,
                    )
                    await self._notify()
                if down_since is None:
                    down_since = time.monotonic()
                wait_s = backoff.next_delay()
                if exc.retry_after_s is not None:
                    wait_s = min(max(wait_s, exc.retry_after_s), st.backoff_max_s)
                await asyncio.sleep(wait_s)  # backoff between attempts, not a wait for state
                continue
            if self.stats.state != "up":
                if self.stats.state == "down":
                    log.info(
                        "history sink %s back after %.0f s",
                        self.sink.backend,
                        time.monotonic() - self.stats.since_s,
                    )
                self.stats.state = "up"
                self.stats.since_s = time.monotonic()
                self.stats.last_error = None
                await self._notify()
            return
