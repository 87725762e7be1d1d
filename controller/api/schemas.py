"""Wire schemas: what the API promises, separate from the domain types."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

StockStateName = Literal["ok", "low", "critical", "out", "unknown"]


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


class ShelfPublic(_Public):
    id: str
    zone: str
    location: str
    sku: str
    scale: str
    channel: int
    status: str = Field(description="unknown, ok, settling, ambiguous or stale")
    units: int | None = Field(description="last confident unit count; null before the first")
    weight_g: float | None
    last_reading_ts: float | None
    capacity_units: int


class SkuStockPublic(_Public):
    sku: str
    name: str
    level: int | None = Field(
        description="sum of the SKU's shelves; null when any is stale/unknown"
    )
    state: StockStateName
    reorder_point: int
    safety_stock: int
    max_stock: int
    lead_time_d: float
    shelves: list[ShelfPublic]


class AlertPublic(_Public):
    key: str
    sku: str
    shelves: list[str]
    state: StockStateName
    level: int | None
    reorder_point: int
    safety_stock: int
    threshold: int
    active: bool
    episode: str | None = Field(description="stable id of the alert episode (raise → resolve)")
    severity: StockStateName | None
    since: float | None = Field(description="Unix time the episode was raised")
    suggested_order_qty: int | None


class DevicePublic(_Public):
    id: str
    zone: str
    format: str
    last_seen: float | None
    stale: bool
    online: bool | None = Field(description="ESPHome availability; null for native scales")
    epoch: int | None = Field(description="device boot counter of the applied readings")
    last_seq: int | None = Field(description="highest sequence number applied")
    applied: int = Field(description="readings applied since the controller first saw the device")
    gaps: int
    missing_readings: int


class IngestStats(_Public):
    messages: int
    readings: int
    commits: int
    commit_failures: int
    rejected: dict[str, int]
    ignored_retained: int = Field(description="retained messages skipped (last-known, not fresh)")
    outbox_rows: int
    backpressure: bool
    last_commit_error: str | None


class LinkPublic(_Public):
    state: Literal["connecting", "up", "down"]
    since_s: float = Field(description="seconds in this state")
    session_present: bool
    connects: int


class HealthPublic(_Public):
    status: Literal["ok", "degraded", "starting"]
    ready: bool
    site: str
    uptime_s: float
    mqtt: LinkPublic
    ingest: IngestStats
    alerts_active: int
    stale_shelves: int


class DeadLetterPublic(_Public):
    id: int
    received_at: float
    topic: str
    reason: str
    detail: str
    size: int
    payload: str = Field(description="first 4 KiB, UTF-8 with replacement")


class Problem(_Public):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
