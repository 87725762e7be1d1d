"""The interfaces services depend on; adapters and links implement them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from controller.domain.events import Event

# The link's state and the retry policy are shared with the device links (devices/ never imports
# controller/): services take them from here, never from devices.link (an import contract).
from devices.link.backoff import Backoff as Backoff
from devices.link.state import LinkState as LinkState


class ReadingRow(NamedTuple):
    """One journaled reading. A tuple, in the journal's column order: built once per reading on
    the hot path and handed to ``executemany`` as is (a frozen dataclass costs 3× more)."""

    device: str
    channel: int
    epoch: int
    seq: int
    ts_s: float
    weight_g: float
    shelf: str


ReadingFields = tuple[str, int, int, int, float, float, str]
"""A `ReadingRow`'s fields as a plain tuple, what the journal writes: ingest's column path
builds them with one ``zip`` over its columns (a NamedTuple per reading cost ~1 µs more,
mostly the garbage collector walking them while the group is alive)."""


@dataclass(frozen=True, slots=True)
class ReadingColumns:
    """A group's readings in columns, as ingest's column path has them: the journal writes
    them as one block without a tuple per reading. Names once, then per reading an index
    into them; every column is a native array (numpy or ``array.array``) of the type named."""

    device_names: list[str]
    shelf_names: list[str]
    device: Any
    """int32: index into ``device_names``."""
    shelf: Any
    """int32: index into ``shelf_names``."""
    channel: Any
    """int64"""
    epoch: Any
    """int64"""
    seq: Any
    """int64"""
    ts_s: Any
    """float64"""
    weight_g: Any
    """float64 (the scale factor applied)"""
    min_ts_s: float
    max_ts_s: float

    def __len__(self) -> int:
        return len(self.seq)

    def rows(self) -> list[ReadingFields]:
        """The readings as tuples (tests, tools; the journal never needs them)."""
        devices = [self.device_names[i] for i in self.device.tolist()]
        shelves = [self.shelf_names[i] for i in self.shelf.tolist()]
        return list(
            zip(
                devices, self.channel.tolist(), self.epoch.tolist(), self.seq.tolist(),
                self.ts_s.tolist(), self.weight_g.tolist(), shelves, strict=True,
            )
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_at_s: float
    topic: str
    reason: str
    detail: str
    payload: bytes


class Cursor(NamedTuple):
    """Per-device sequence accounting: the newest ``(epoch, seq)`` accepted and, below it, the
    sequence numbers that never arrived. A NamedTuple: one is built per reading on the hot path.

    A seq below ``seq`` (same epoch, at or above ``floor``) is a duplicate unless it lies in one
    of ``holes``: then it is a late reading that fills its gap."""

    epoch: int
    seq: int
    ts_s: float
    """Time of the newest reading (``seq``)."""
    applied: int = 0
    """Readings of this device accepted since the controller first saw it (all epochs, late
    ones included)."""
    floor: int = 0
    """Lowest seq of ``epoch`` this cursor accounts for; whether a seq below it was seen is not
    known here (the journal's outbox is asked)."""
    holes: tuple[tuple[int, int], ...] = ()
    """Ranges ``(first, last)`` (inclusive, ascending, between ``floor`` and ``seq``) of seqs
    that never arrived; each counted in ``missing``."""
    gaps: int = 0
    """Sequence gaps seen (all epochs)."""
    missing: int = 0
    """Readings counted missing by those gaps and not arrived since (all epochs)."""


@dataclass(frozen=True, slots=True)
class EventRow:
    ts_s: float
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LinkStateChanged(Event):
    """A link (``mqtt``, ``plc:<id>``) changed state. Wire: ``{"kind": "link_state", "ts",
    "link", "old", "new"}`` with the states' values."""

    kind: ClassVar[str] = "link_state"
    WIRE_NAMES: ClassVar[dict[str, str]] = {"ts_s": "ts"}
    ts_s: float
    link: str
    old: LinkState
    new: LinkState


@dataclass(frozen=True, slots=True)
class DeviceStatusChanged(Event):
    """A device reported itself online or offline (ESPHome's status topic). Wire:
    ``{"kind": "device_status", "ts", "device", "online"}``."""

    kind: ClassVar[str] = "device_status"
    WIRE_NAMES: ClassVar[dict[str, str]] = {"ts_s": "ts"}
    ts_s: float
    device: str
    online: bool


class JournalError(Exception):
    """A journal call failed and wrote nothing: the journal is not open or cannot be opened,
    a value cannot be stored, or (`JournalUnavailable`) the file cannot be used just now."""


class JournalUnavailable(JournalError):
    """The journal cannot be written or read just now (disk full, I/O error, database locked
    or busy): nothing of the call was written. Retryable: the caller keeps what it holds
    (unacknowledged messages, unsent alert changes, outbox rows) and tries again later. Any
    other JournalError (a value it cannot store) or exception (a bug) is not an outage."""


# -- the journal, one narrow port per use case (controller/adapters/journal.py implements all) --
# Each names only what its service calls. The write method keeps the journal's name `commit`
# (test fakes and benchmark stand-ins implement it); each port narrows its parameters.


class ReadingStore(Protocol):
    """The journal as ingest sees it: one group (readings, dead letters, cursors, shelf states,
    events) per transaction, and the outbox lookup for readings no cursor accounts for."""

    def commit(
        self,
        readings: Sequence[ReadingFields] | ReadingColumns,
        dead_letters: Sequence[DeadLetter] = (),
        cursors: dict[str, Cursor] | None = None,
        shelf_states: dict[str, dict[str, Any]] | None = None,
        events: Sequence[EventRow] = (),
    ) -> None:
        """Write the group atomically; JournalUnavailable when it cannot just now (nothing
        written)."""
        ...

    def has_reading(self, device: str, epoch: int, seq: int, ts_s: float) -> bool:
        """Whether this reading (its device, epoch, seq and timestamp: a re-send is the same
        reading, timestamp included) is in the outbox."""
        ...


@runtime_checkable
class CalibrationStore(Protocol):
    """Where ingest keeps calibration overrides (the journal's ``shelf_calibrations``)."""

    def shelf_calibrations(self) -> dict[str, dict[str, Any]]: ...

    def commit_calibration(
        self,
        shelf: str,
        calibration: dict[str, Any] | None,
        shelf_state: dict[str, Any],
        events: Sequence[EventRow] = (),
    ) -> None: ...


class AlertStore(Protocol):
    """The journal as the alert service sees it: alert states with their events, atomically."""

    def commit(
        self,
        readings: Sequence[ReadingRow],
        *,
        alert_states: dict[str, dict[str, Any]],
        events: Sequence[EventRow],
    ) -> None:
        """``readings`` is always empty here; JournalUnavailable as `ReadingStore.commit`."""
        ...


class JournalPort(Protocol):
    """The whole write side at once. Only for callers not yet given a narrow port
    (controller/services/plc_commands.py); services type against the ports above."""

    outbox_rows: int

    def commit(
        self,
        readings: Sequence[ReadingFields] | ReadingColumns,
        dead_letters: Sequence[DeadLetter] = (),
        cursors: dict[str, Cursor] | None = None,
        shelf_states: dict[str, dict[str, Any]] | None = None,
        events: Sequence[EventRow] = (),
        alert_states: dict[str, dict[str, Any]] | None = None,
    ) -> None: ...

    def has_reading(self, device: str, epoch: int, seq: int, ts_s: float) -> bool: ...


class IdempotencyRow(NamedTuple):
    """A remembered ``Idempotency-Key``: who used it, for which body, and what it created."""

    key: str
    principal: str
    digest: str
    status: int
    order_id: str
    created_ts: float


class DuplicateOrder(Exception):
    """`OrderJournalPort.commit_orders`: an order with the same (channel, external id) is
    already stored (nothing was written)."""


class OrderJournalPort(Protocol):
    """The journal's order side (controller/services/picking.py)."""

    def commit_orders(
        self,
        orders: Sequence[dict[str, Any]],
        *,
        counters: dict[str, int] | None = None,
        idempotency: Sequence[IdempotencyRow] = (),
        events: Sequence[EventRow] = (),
    ) -> None: ...

    def open_orders(self) -> list[dict[str, Any]]: ...

    def recent_orders(self, limit: int) -> list[dict[str, Any]]: ...

    def order(self, order_id: str) -> dict[str, Any] | None: ...

    def order_by_external(self, channel: str, external_id: str) -> dict[str, Any] | None: ...

    def idempotency_key(self, key: str) -> IdempotencyRow | None: ...

    def idempotency_since(self, ts: float) -> list[IdempotencyRow]: ...

    def externals_since(self, ts: float) -> list[tuple[str, str, str]]: ...

    def trim_idempotency(self, older_than_ts: float) -> int: ...

    def trim_orders(self, closed_before_ts: float) -> int: ...

    def counters(self) -> dict[str, int]: ...


class InboundMessage(Protocol):
    """One message received from the broker, as ingest reads it (the MQTT link's
    ``MqttMessage`` is one)."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def retain(self) -> bool: ...

    @property
    def packet_id(self) -> int:
        """0 for QoS 0 (nothing to acknowledge)."""
        ...


class MessageLink(Protocol):
    """The broker side of ingest: acknowledge, publish, apply backpressure."""

    @property
    def epoch(self) -> int:
        """Connection counter: packet ids are only meaningful on the connection they came on."""
        ...

    def ack(self, packet_ids: Sequence[int], epoch: int | None = None) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Clock(Protocol):
    def __call__(self) -> float:
        """Unix time in seconds."""
        ...


# -- history (the historian drains the outbox into a HistorySink) -------------------------------

FieldValue = float | int | bool | str


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One point for a history sink: the series is ``(measurement, tags)``; ``ts_ms`` is Unix
    time in milliseconds (always written with explicit ms precision). ``tags`` and ``fields``
    are sorted by key with unique keys."""

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, FieldValue], ...]
    ts_ms: int


class HistoryError(Exception):
    """Base of the errors a history sink raises (no client library exception escapes it)."""


class SinkUnavailable(HistoryError):
    """Retryable: connection refused/reset, timeout, 5xx, 429, auth or missing database.
    Nothing is known to be stored; the caller retries the same points with capped backoff."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SinkRejected(HistoryError):
    """Not retryable as is: the server refused (part of) the batch, e.g. HTTP 400 bad line or
    field type conflict, 413 too large. Some points of the batch may have been stored."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """Downsampled history of one shelf or of every shelf of one SKU, ``[from_ms, to_ms)`` in
    buckets of ``every_ms`` aligned to the Unix epoch."""

    shelf: str | None
    sku: str | None
    from_ms: int
    to_ms: int
    every_ms: int


@dataclass(frozen=True, slots=True)
class ShelfHistoryRaw:
    """What a sink answers per shelf: weight aggregates per bucket start (mean, min, max,
    count), the last unit count per bucket, and the last unit count before ``from_ms``."""

    shelf: str
    weight: list[tuple[int, float, float, float, int]]
    units: list[tuple[int, int]]
    units_before: int | None


class HistorySink(Protocol):
    """Where history goes (InfluxDB v2/v1, embedded SQLite). Writes are idempotent by series
    and timestamp: writing the same point twice stores it once."""

    backend: str

    async def write(self, points: Sequence[HistoryPoint]) -> None:
        """Return once the sink confirmed every point; raise SinkUnavailable or SinkRejected."""
        ...

    async def query(self, query: HistoryQuery) -> list[ShelfHistoryRaw]:
        """Downsampled server-side; raises SinkUnavailable when the sink cannot answer."""
        ...

    async def aclose(self) -> None: ...


class OutboxReading(NamedTuple):
    """A reading as the outbox holds it (``readings`` table), read back in id order. A
    NamedTuple: the historian gets one per reading it drains. The values are what the file
    holds: a damaged row may carry another type, so ``PointBuilder`` checks them."""

    id: int
    device: str
    channel: int
    epoch: int
    seq: int
    ts_s: float
    weight_g: float
    shelf: str


class OutboxEvent(NamedTuple):
    """An event as the outbox holds it (``events`` table): ``body`` is its JSON (unchecked)."""

    id: int
    ts_s: float
    kind: str
    body: bytes


OutboxRow = OutboxReading | OutboxEvent


class Outbox(Protocol):
    """The journal as the historian sees it: read in id order, delete once confirmed, record
    what the sink refused."""

    outbox_rows: int

    def read_readings(self, after_id: int, limit: int) -> list[OutboxReading]:
        """Up to ``limit`` readings with an id above ``after_id``, oldest first."""
        ...

    def read_events(self, after_id: int, limit: int) -> list[OutboxEvent]:
        """Up to ``limit`` events with an id above ``after_id``, oldest first."""
        ...

    def delete_confirmed(self, readings_through: int | None, events_through: int | None) -> int:
        """Delete the rows up to these ids (inclusive); returns how many."""
        ...

    def newest_ids(self) -> tuple[int, int]:
        """The ids of the newest reading and the newest event in the outbox (0: none)."""
        ...

    def commit_dead_letters(self, dead_letters: Sequence[DeadLetter]) -> None:
        """Record rows the historian could not deliver, in one transaction."""
        ...
