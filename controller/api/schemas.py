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


class HistoryHealth(_Public):
    backend: str
    state: Literal["starting", "up", "down"]
    since_s: float = Field(description="seconds in this state")
    last_error: str | None
    points_written: int
    batches: int
    retries: int = Field(description="write attempts that failed retryably (sink down, 5xx)")
    rejected_requests: int = Field(description="writes the sink refused (400/413/422)")
    dead_lettered: int = Field(description="points the sink refused, kept as dead letters")
    corrupt_rows: int = Field(description="outbox rows that could not become a point")
    nudged: int = Field(description="points moved by 1 ms to keep their series time unique")
    lag_s: float = Field(description="age of the newest reading delivered while rows wait")


class PlcPublic(_Public):
    id: str
    kind: Literal["conveyor", "sorter"]
    endpoint: str = Field(description="host:port of the Modbus TCP server")
    unit: int
    link: Literal["connecting", "up", "down"]
    since_s: float = Field(description="seconds in this link state")
    health: Literal["ok", "faulty"] = Field(
        description="faulty for a while after a malformed reply or a device-failure answer"
    )
    fault: str | None = Field(description="the last fault seen (kept after health is ok again)")
    last_down_reason: str | None = Field(description="why the link last went down")
    epoch: int | None = Field(description="the PLC's boot epoch; null until first read")
    restarts: int = Field(description="epoch changes seen (PLC restarts)")
    connects: int
    heartbeat: bool


class PlcLinkSummary(_Public):
    link: Literal["connecting", "up", "down"]
    health: Literal["ok", "faulty"]
    epoch: int | None


class HealthPublic(_Public):
    status: Literal["ok", "degraded", "starting"]
    ready: bool
    site: str
    uptime_s: float
    mqtt: LinkPublic
    ingest: IngestStats
    alerts_active: int
    stale_shelves: int
    history: HistoryHealth | None = Field(
        default=None, description="the historian; null with [history] backend = none"
    )
    plcs: dict[str, PlcLinkSummary] = Field(
        default_factory=dict, description="per [[plcs]] entry: Modbus link state"
    )


class HistoryBucketPublic(_Public):
    t: float = Field(description="bucket start, Unix seconds (buckets align to the epoch)")
    weight_g_mean: float | None
    weight_g_min: float | None
    weight_g_max: float | None
    readings: int = Field(description="readings stored in the bucket")
    units: int | None = Field(description="unit count at the end of the bucket (carried forward)")


class HistorySeriesPublic(_Public):
    shelf: str
    zone: str
    sku: str
    buckets: list[HistoryBucketPublic]


class HistoryPublic(_Public):
    backend: str
    shelf: str | None
    sku: str | None
    from_: float = Field(alias="from", serialization_alias="from")
    to: float
    every_s: float
    series: list[HistorySeriesPublic]


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
