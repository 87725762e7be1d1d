"""Wire schemas: what the API promises, separate from the domain types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    unit_weight_g: float | None = Field(
        default=None, description="unit weight in use (the site file's, or a calibration)"
    )
    tare_g: float | None = Field(
        default=None, description="tare in use (the site file's, or a tare/calibration)"
    )
    scale_factor: float = Field(
        default=1.0, description="gain applied to the channel's raw grams (calibration)"
    )
    calibration: ShelfCalibrationPublic | None = Field(
        default=None, description="runtime override of the site file (null: none)"
    )


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
    pack_multiple: int = Field(
        description="units per supplier pack: a suggested order is a whole number of packs"
    )
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
    acked_by: str | None = Field(default=None, description="who acknowledged the episode")
    acked_at: float | None = Field(default=None, description="Unix time of the acknowledgement")
    ack_note: str | None = None
    snoozed_until: float | None = Field(
        default=None, description="Unix time re-notification resumes (null: not snoozed)"
    )
    snoozed_by: str | None = None
    snooze_reason: str | None = None


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
    late_readings: int = Field(
        0, description="readings older than their device's newest: journaled, state unchanged"
    )
    outbox_rows: int
    backpressure: bool
    last_commit_error: str | None


class LinkPublic(_Public):
    state: Literal["connecting", "up", "down"]
    since_s: float = Field(
        description="seconds up; when not up, seconds since the link went down (since the "
        "start if it never was up): failed retries do not reset it"
    )
    session_present: bool
    connects: int
    max_qos: int = Field(description="Maximum QoS the broker accepts (MQTT 5 CONNACK; 2 if unsaid)")
    retain_available: bool = Field(description="the broker keeps retained messages")
    granted_qos: dict[str, int] = Field(description="QoS granted per subscription (SUBACK)")
    warnings: list[str] = Field(
        description="guarantees the broker weakened (QoS 0 only, no retain, a subscription "
        "granted a lower QoS): any makes the status degraded"
    )
    oversize_in: int = Field(description="messages above the link's packet limit: acked, dropped")
    invalid_in: int = Field(description="messages whose topic is not UTF-8: acked, dropped")
    qos_downgraded: int = Field(description="QoS 1 publishes sent as QoS 0 (broker max QoS 0)")
    retain_dropped: int = Field(description="retained publishes sent without retain")
    last_error: str = Field(description="why the link last went down or failed to connect")


class CommandLinkPublic(_Public):
    """The pick command session (client id ``<client_id>-picks``)."""

    state: Literal["connecting", "up", "down"] = Field(
        description="not up: the status is degraded (mqtt:picks), the controller still ready"
    )
    since_s: float = Field(description="seconds in this state (as the main link's)")
    session_present: bool
    connects: int
    last_error: str = Field(description="why the session last went down or failed to connect")


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
    command_link: CommandLinkPublic | None = Field(
        default=None, description="the MQTT session of the pick commands"
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


PROBLEM = "application/problem+json"
"""Media type of every error answer."""


def problem_responses(**codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI answers ``{e<status>: description}`` as problem+json."""
    return {
        int(code.removeprefix("e")): {
            "model": Problem,
            "description": text,
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code, text in codes.items()
    }


# -- operations (controller/api/routes/ops.py) ---------------------------------------------------

NoteText = Annotated[str, Field(max_length=500)]


class _OpsBody(BaseModel):
    """Request bodies: unknown fields are an error, not silently ignored; values must have the
    documented JSON type (strict: ``true`` is not a number, ``"5"`` not an integer)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class AlertAckCreate(_OpsBody):
    note: NoteText = Field(default="", description="optional free text (max 500 characters)")

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"examples": [{"note": "reorder placed, PO 4711"}]},
    )


class AlertSnoozeCreate(_OpsBody):
    minutes: int = Field(ge=1, le=1440, description="1 min to 24 h")
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=r"\S")]

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"examples": [{"minutes": 60, "reason": "delivery due at 14:00"}]},
    )


class PlcStatusPublic(_Public):
    """The PLC's status as read back after the command."""

    state: Literal["STOPPED", "STARTING", "RUNNING", "JAMMED", "ESTOP", "FAULT", "UNKNOWN"]
    fault: str
    running: bool
    flags: list[str]
    speed_actual_mm_s: float
    epoch: int
    command_count: int
    uptime_s: int


class PlcCommandPublic(_Public):
    plc: str
    command: Literal["start", "stop", "reset"]
    by: str
    at: float = Field(description="Unix time the command completed")
    result: Literal["ok"]
    status: PlcStatusPublic

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "plc": "conveyor-1",
                    "command": "stop",
                    "by": "eng",
                    "at": 1764067200.25,
                    "result": "ok",
                    "status": {
                        "state": "STOPPED",
                        "fault": "NONE",
                        "running": False,
                        "flags": [],
                        "speed_actual_mm_s": 0.0,
                        "epoch": 7,
                        "command_count": 3,
                        "uptime_s": 120,
                    },
                }
            ]
        },
    )


class ZonePublic(_Public):
    id: str
    name: str
    shelves: int
    scales: int
    skus: list[str] = Field(description="SKUs with a shelf in the zone")
    shelf_status: dict[str, int] = Field(description="shelves per status (ok, stale ...)")
    alerts_active: int = Field(description="active alerts watching a shelf of the zone")


class ZoneSkuPublic(_Public):
    sku: str
    name: str
    shelves: list[str] = Field(description="the SKU's shelves in this zone")
    units_in_zone: int | None = Field(description="sum over those shelves; null if any unknown")
    level: int | None = Field(description="the SKU's level over every zone")
    state: StockStateName


class ZoneStockPublic(_Public):
    zone: str
    name: str
    shelves: list[ShelfPublic]
    skus: list[ZoneSkuPublic]


class ScaleChannelPublic(_Public):
    channel: int
    shelf: str | None = Field(description="the shelf on this channel (null: unused)")
    shelf_status: str | None
    scale_factor: float


class ScalePublic(_Public):
    id: str
    zone: str
    format: str
    status: Literal["ok", "stale", "offline", "unknown"] = Field(
        description="unknown: never reported; offline: ESPHome says so; stale: silent for "
        "longer than stale_after_intervals reporting intervals"
    )
    last_seen: float | None
    reporting_interval_s: float
    max_weight_g: float
    channels: list[ScaleChannelPublic]


class ShelfCalibrationPublic(_Public):
    """A runtime override of the site file's calibration (kept in the journal)."""

    tare_g: float | None = Field(description="null: the site file's")
    unit_weight_g: float | None = Field(description="null: the site file's")
    scale_factor: float
    updated_at: float
    updated_by: str


class ShelfTareCreate(_OpsBody):
    tare_g: float | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="explicit tare; omitted: the shelf's current settled gross weight",
    )

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"examples": [{}, {"tare_g": 512.5}]},
    )


class ShelfCalibrationCreate(_OpsBody):
    unit_weight_g: float | None = Field(
        default=None, ge=0.1, le=100_000, allow_inf_nan=False, description="grams per unit"
    )
    scale_factor: float | None = Field(
        default=None,
        ge=0.5,
        le=2.0,
        allow_inf_nan=False,
        description="gain for the shelf's scale channel: grams = raw grams × factor",
    )

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "examples": [{"unit_weight_g": 101.5}, {"scale_factor": 1.013}],
        },
    )

    @model_validator(mode="after")
    def _something(self) -> ShelfCalibrationCreate:
        if self.unit_weight_g is None and self.scale_factor is None:
            raise ValueError("give unit_weight_g and/or scale_factor")
        return self


class ShelfCalibrationResult(_Public):
    shelf: ShelfPublic
    events: list[dict[str, Any]] = Field(
        description="what the change produced (shelf_calibrated, stock_changed ...)"
    )
