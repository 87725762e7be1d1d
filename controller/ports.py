"""The interfaces services depend on; adapters and links implement them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ReadingRow:
    device: str
    channel: int
    epoch: int
    seq: int
    ts_s: float
    weight_g: float
    shelf: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_at_s: float
    topic: str
    reason: str
    detail: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Cursor:
    """Per-device replay protection: highest (epoch, seq) applied and a bitmap of the
    ``WINDOW`` sequence numbers below it that were seen (bit i ↔ seq − 1 − i)."""

    epoch: int
    seq: int
    window: int
    ts_s: float
    applied: int = 0
    """Readings of this device applied since the controller first saw it (all epochs)."""


@dataclass(frozen=True, slots=True)
class EventRow:
    ts_s: float
    kind: str
    body: dict[str, Any]


class JournalPort(Protocol):
    outbox_rows: int

    def commit(
        self,
        readings: Sequence[ReadingRow],
        dead_letters: Sequence[DeadLetter] = (),
        cursors: dict[str, Cursor] | None = None,
        shelf_states: dict[str, dict[str, Any]] | None = None,
        events: Sequence[EventRow] = (),
        alert_states: dict[str, dict[str, Any]] | None = None,
    ) -> None: ...

    def has_reading(self, device: str, epoch: int, seq: int) -> bool: ...


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
