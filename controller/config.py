"""Site configuration: one TOML file parsed once into frozen, cross-checked models.

Bad configuration stops startup with the offending path (``shelves[3].sku: unknown SKU ...``).
Secrets never live in the file: credentials are read from the environment variables the file
names (``username_env`` / ``password_env``).
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Identifier = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
]
"""Ids appear in MQTT topics and metric labels: no '/', '+', '#', spaces."""

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ConfigError(Exception):
    """The site file is unreadable or inconsistent. ``errors`` holds ``(path, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{source}: {len(errors)} configuration error(s)\n{lines}")


class SecretError(ValueError):
    """A secret's file (``<VAR>_FILE``) cannot be read."""


def env_secret(name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret named by the site file's ``*_env`` key ``name``, from, in order: the
    variable ``name`` itself; the file named by ``<name>_FILE``; the file ``name`` in systemd's
    ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=<name>:...``). One trailing newline of a file
    is dropped. ``None`` when none is set; `SecretError` when a named file cannot be read."""
    if not name:
        return None
    env = os.environ if environ is None else environ
    if value := env.get(name):
        return value
    path: str | None = env.get(f"{name}_FILE") or None
    if path is None and (creds := env.get("CREDENTIALS_DIRECTORY")):
        candidate = Path(creds) / name
        path = str(candidate) if candidate.is_file() else None
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SecretError(f"{name}: cannot read the secret file {path}: {reason}") from None
    return text.removesuffix("\n").removesuffix("\r") or None


class TlsConfig(_Frozen):
    enabled: bool = False
    """Connect to the broker over TLS (also implied by an ``mqtts://`` URL)."""
    ca_file: Path | None = None
    """CA certificate (PEM) that signs the broker's certificate; the system CAs when unset."""
    cert_file: Path | None = None
    """Client certificate (PEM) for brokers that require one."""
    key_file: Path | None = None
    """The client certificate's private key (PEM)."""
    insecure_skip_verify: bool = False
    """Accept any broker certificate and host name; for a bench, never a site."""


class MqttConfig(_Frozen):
    url: str = "mqtt://127.0.0.1:1883"
    """The broker, ``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883, TLS)."""
    client_id: Identifier = "floorhand"
    """The controller's MQTT client id; the broker keeps its persistent session under it. The
    pick commands have a session of their own under `<client_id>-picks` (a broker that accepts
    only the 23 characters MQTT 3.1.1 guarantees needs a `client_id` of at most 17)."""
    protocol: Literal[4, 5] = 5
    """MQTT protocol version: 5 (MQTT 5) or 4 (3.1.1, for brokers without MQTT 5)."""
    username_env: str | None = "FLOORHAND_MQTT_USERNAME"
    """Environment variable holding the broker user name (or ``<VAR>_FILE``, or a systemd
    credential of that name)."""
    password_env: str | None = "FLOORHAND_MQTT_PASSWORD"
    """Environment variable holding the broker password (same lookup as ``username_env``)."""
    topic_prefix: Identifier = "floorhand"
    """First level of every Floorhand topic: ``<prefix>/<site>/<zone>/scale/<id>``."""
    keepalive_s: Annotated[float, Field(ge=1, le=600)] = 10.0
    """MQTT keep-alive: the broker drops the connection after 1.5 times this without a packet."""
    session_expiry_s: Annotated[int, Field(ge=0)] = 86_400
    """How long the broker keeps the controller's session (subscriptions and queued QoS 1
    readings) while it is offline; 0 ends it at disconnect."""
    receive_maximum: Annotated[int, Field(ge=1, le=65_535)] = 4_000
    """MQTT 5 Receive Maximum: QoS 1/2 messages the broker may send before the controller
    acknowledges (each is acknowledged only once journaled)."""
    max_payload_bytes: Annotated[int, Field(ge=64, le=16_777_216)] = 262_144
    """Larger messages are rejected and counted (``rejected[\"oversize\"]``), never parsed."""
    coalesce_ms: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 2.0
    """Under load (readings arriving faster than ``coalesce_from_msg_s``), a small socket read
    is held up to this long so that the next reads join it and are journaled in one group: a
    group costs much less per reading when it is larger. It adds at most this much latency, and
    only under load; 0 hands every read over at once."""
    coalesce_bytes: Annotated[int, Field(ge=1, le=16_777_216)] = 16_384
    """Held reads are handed over as soon as they reach this many bytes together."""
    coalesce_from_msg_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 8_000.0
    """The arrival rate (messages/s over the last ~0.1 s) from which small reads are held."""
    tls: TlsConfig = TlsConfig()
    """TLS settings (``[mqtt.tls]``)."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("missing host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return v

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        if parts.port:
            return parts.port
        return 8883 if parts.scheme in ("mqtts", "ssl") else 1883

    @property
    def uses_tls(self) -> bool:
        return self.tls.enabled or urlsplit(self.url).scheme in ("mqtts", "ssl")

    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password from the environment or their files (`env_secret`;
        ``None`` when unset)."""
        return env_secret(self.username_env), env_secret(self.password_env)


class JournalConfig(_Frozen):
    path: Path = Path("var/floorhand/journal.sqlite")
    """The SQLite journal (stock, alerts, orders, the history outbox); relative paths resolve
    against the working directory, or ``$STATE_DIRECTORY`` under systemd."""
    max_outbox_rows: Annotated[int, Field(ge=1_000)] = 5_000_000
    """Bound of the history outbox: at it, the controller stops reading from the broker
    (backpressure: readings wait, unacknowledged, in the broker) until the historian drains it."""
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    """SQLite ``PRAGMA synchronous``: NORMAL (WAL; a power cut may lose the last commits, never
    corrupts) or FULL (every commit on disk, slower)."""
    dead_letter_keep: Annotated[int, Field(ge=0)] = 10_000
    """Dead letters (messages that could not be handled) kept in the journal; older ones are
    deleted."""
    catalog_audit_keep_days: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 90.0
    """Catalogue audit rows (one per record a version changed) kept this long; older ones are
    deleted at each start and each new catalogue version (the versions' own rows, who changed
    what when and how many records, are kept)."""


class ApiTokenConfig(_Frozen):
    """One ``[[api.tokens]]`` entry: a bearer token's SHA-256 (hex), never the token itself
    (``floorhand token`` prints a new token and its entry; docs/api.md)."""

    name: Identifier
    """Who holds the token (appears in logs and the audit trail)."""
    role: Literal["floor", "supervisor", "engineer"]
    """What the token may do: floor < supervisor < engineer (docs/api.md)."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """SHA-256 of the token, 64 lower-case hex digits."""


class ApiConfig(_Frozen):
    """``[api]``: bind address, bearer-token auth, body and rate limits (docs/api.md)."""

    bind: str = "127.0.0.1:8080"
    """HOST:PORT the API, dashboard and ``/metrics`` listen on."""
    auth: Literal["on", "off"] = "on"
    """``off`` serves every route without a token (logged loudly); for a bench, never a site."""
    tokens: tuple[ApiTokenConfig, ...] = ()
    """Bearer tokens (``[[api.tokens]]``)."""
    token_env_prefix: str = "FLOORHAND_TOKEN_"
    """Environment variables ``<prefix><NAME>=<role>:<token>`` add tokens (plaintext in the
    process environment only; hashed on load)."""
    max_body_bytes: Annotated[int, Field(ge=1_024, le=16_777_216)] = 65_536
    """Larger request bodies are refused with 413 (never read whole)."""
    catalog_max_body_bytes: Annotated[int, Field(ge=1_024, le=1_073_741_824)] = 67_108_864
    """The body limit of ``PUT``/``PATCH /api/v1/catalog`` instead of ``max_body_bytes``: a
    100k-SKU catalogue (300k rows) is about 25 MB of CSV."""
    rate_per_s: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] = 20.0
    """Token-bucket refill rate per token (per client address without a valid token)."""
    rate_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 40
    """Token-bucket size: requests a client may send at once before ``rate_per_s`` applies."""
    metrics: Literal["engineer", "open"] = "engineer"
    """Who may scrape ``/metrics``: an engineer token, or anyone who can reach the port."""
    allowed_origins: tuple[Annotated[str, Field(pattern=r"^(\*|https?://[^/\s]+)$")], ...] = ()
    """Browser origins (``https://host:port``) besides the controller's own that may open the
    live WebSocket; ``"*"`` allows any (docs/dashboard.md)."""
    live_queue: Annotated[int, Field(ge=16, le=1_000_000)] = 2_000
    """Messages queued per live WebSocket client before the oldest are dropped."""

    @field_validator("tokens")
    @classmethod
    def _unique_token_names(cls, v: tuple[ApiTokenConfig, ...]) -> tuple[ApiTokenConfig, ...]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate token name(s): {', '.join(dup)}")
        return v

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, v: str) -> str:
        split_bind(v)
        return v


class HistoryConfig(_Frozen):
    """``[history]``: where the historian drains the outbox (docs/influx-schema.md).

    ``sqlite`` (the default, so a site with no database server still has history) is the
    embedded store; ``influxdb2`` is the v2 write API (InfluxDB 2.x/3.x/1.8+); ``influxdb1`` the
    1.x ``/write`` + InfluxQL API; ``none`` disables the historian and keeps a bounded window of
    recent outbox rows. Secrets come from the environment variables named here."""

    backend: Literal["none", "sqlite", "influxdb2", "influxdb1"] = "sqlite"
    """Where history goes: ``sqlite`` (embedded), ``influxdb2``, ``influxdb1`` or ``none``."""
    url: str | None = None
    """InfluxDB base URL, ``http(s)://host:port`` (influxdb2, influxdb1)."""
    org: str | None = None
    """InfluxDB organization (influxdb2)."""
    bucket: str | None = None
    """InfluxDB bucket (influxdb2)."""
    token_env: str | None = "FLOORHAND_INFLUX_TOKEN"
    """Environment variable holding the InfluxDB API token (influxdb2)."""
    db: str | None = None
    """InfluxDB database (influxdb1)."""
    rp: str | None = None
    """InfluxDB retention policy (influxdb1); the database's default when unset."""
    username_env: str | None = "FLOORHAND_INFLUX_USERNAME"
    """Environment variable holding the InfluxDB user name (influxdb1)."""
    password_env: str | None = "FLOORHAND_INFLUX_PASSWORD"
    """Environment variable holding the InfluxDB password (influxdb1)."""
    batch_size: Annotated[int, Field(ge=1, le=5_000)] = 5_000
    """Outbox rows (points) per write to the history store."""
    gzip: bool = True
    """Compress writes to InfluxDB."""
    timeout_s: Annotated[float, Field(gt=0, le=300, allow_inf_nan=False)] = 10.0
    """Time limit of one write or query to InfluxDB."""
    backoff_initial_s: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 0.2
    """First retry delay after a failed write; it doubles (with jitter) up to ``backoff_max_s``
    and resets on success."""
    backoff_max_s: Annotated[float, Field(gt=0, le=3_600, allow_inf_nan=False)] = 30.0
    """Longest retry delay after failed writes."""
    flush_interval_s: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 1.0
    """Longest wait between drains of the outbox when it is not full (a new row wakes the
    historian sooner)."""
    sqlite_path: Path | None = None
    """The embedded store's file; default ``history.sqlite`` next to the journal."""
    retention_days: Annotated[float, Field(gt=0, le=36_500, allow_inf_nan=False)] = 30.0
    """History kept by the embedded ``sqlite`` store; older points are deleted (InfluxDB keeps
    its own retention)."""
    state_path: Path | None = None
    """The historian's timestamp state; default ``<journal>.history-state.json``."""

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        errors: list[tuple[str, str]] = []
        b = self.backend
        if b in ("influxdb2", "influxdb1"):
            if not self.url:
                errors.append(("history.url", f"required for backend {b!r}"))
            else:
                parts = urlsplit(self.url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    errors.append(("history.url", "must be http(s)://host[:port]"))
        if b == "influxdb2":
            for key in ("org", "bucket"):
                if not getattr(self, key):
                    errors.append((f"history.{key}", "required for backend 'influxdb2'"))
            for key in ("db", "rp"):
                if getattr(self, key):
                    errors.append(
                        (f"history.{key}", "used by backend 'influxdb1'; influxdb2 uses bucket")
                    )
        if b == "influxdb1":
            if not self.db:
                errors.append(("history.db", "required for backend 'influxdb1'"))
            for key in ("org", "bucket"):
                if getattr(self, key):
                    errors.append(
                        (f"history.{key}", "used by backend 'influxdb2'; influxdb1 uses db/rp")
                    )
        if self.backoff_initial_s > self.backoff_max_s:
            errors.append(
                (
                    "history.backoff_initial_s",
                    f"{self.backoff_initial_s} > backoff_max_s {self.backoff_max_s}",
                )
            )
        if errors:
            raise _CrossCheckError(errors)
        return self

    def secret(self, env_name: str | None) -> str | None:
        """The secret named by the file (`env_secret`; ``None`` when unset)."""
        return env_secret(env_name)


class ZoneConfig(_Frozen):
    id: Identifier
    """Zone id (appears in MQTT topics)."""
    name: str = ""
    """Display name."""
    conveyors: tuple[Identifier, ...] = ()
    """Conveyor PLCs (``[[plcs]]`` ids, kind conveyor) that carry this zone's totes to its
    sorter, in order. They are started (if stopped) before a pick from this zone."""
    sorter: Identifier | None = None
    """The sorter PLC this zone's conveyors end at; a zone without one cannot be picked from."""


class PackStationConfig(_Frozen):
    """``[[pack_stations]]``: a pack station is one lane of a sorter."""

    id: Identifier
    """Pack station id."""
    name: str = ""
    """Display name."""
    sorter: Identifier
    """The sorter PLC (``[[plcs]]`` id, kind sorter) whose lane this is."""
    lane: Annotated[int, Field(ge=1, le=16)]
    """The sorter lane (1-based) that ends at this station."""


class PickingConfig(_Frozen):
    """``[picking]``: pick commands and orders (docs/picking.md)."""

    result_timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 60.0
    """How long a sorter command may take from acceptance to its result (DIVERTED...)."""
    scale_timeout_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 120.0
    """How long after dispatch the shelf's scale has to show the picked units gone."""
    keep_closed_orders: Annotated[int, Field(ge=0)] = 1_000
    """Closed orders kept in memory for GET /api/v1/orders (all stay in the journal)."""
    max_lines: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Lines one pick request may carry."""
    idempotency_ttl_h: Annotated[float, Field(gt=0, le=24 * 365, allow_inf_nan=False)] = 48.0
    """How long an ``Idempotency-Key`` (and a channel's order id, in memory) is remembered."""
    keep_closed_days: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 90.0
    """Closed orders (SHIPPED, EXCEPTION, CANCELLED) are deleted from the journal this long
    after their last change; their transition events stay in the history. SORTED and PACKED
    orders are kept until shipped."""


class ProcessConfig(_Frozen):
    """``[process]``: how the controller's threads share the Python interpreter
    (docs/architecture.md, "Three event loops")."""

    switch_interval_ms: Annotated[float, Field(ge=0.05, le=100, allow_inf_nan=False)] = 0.2
    """The interpreter's thread switch interval (`sys.setswitchinterval`) while the runtime
    runs: how long the control loop's thread (PLC heartbeats, pick commands) or the HTTP
    loop's may wait for the interpreter lock while ingest holds it. Python's default is 5 ms,
    paid at every wake-up and every system call of those threads; a pick's first Modbus write
    under 16k msg/s of ingest took 335 ms at p99 with it and 30 ms with 0.2 ms
    (docs/performance.md)."""
    control_precedence_ms: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 2.0
    """How long the main loop (ingest, alerts, the historian) may pause for one burst of the
    control loop's work (a pick from its submission to its first Modbus write, a heartbeat),
    so that the control thread has the interpreter to itself meanwhile; 0: no pause. Only on
    the main loop ``floorhand run`` makes (`controller.control.new_main_loop`). Nothing is
    lost by a pause: the broker and the socket buffers hold what arrives meanwhile."""
    control_realtime_priority: Annotated[int, Field(ge=0, le=49)] = 10
    """``SCHED_FIFO`` priority of the control loop's thread (PLC heartbeats, pick commands):
    the kernel runs it the moment it has work instead of after a time slice of ingest, the
    broker or anything else on the machine; 0: normal scheduling. Needs the right to it
    (``LimitRTPRIO=`` in the systemd unit, ``ulimit -r``, or root); without it the controller
    runs with normal scheduling and says so at start (log, ``/metrics``). At most 49: the
    kernel's interrupt threads (priority 50) go first."""
    gc_young_objects: Annotated[int, Field(ge=700, le=10_000_000)] = 50_000
    """Python's generation-0 garbage-collection threshold (`gc.set_threshold`) while the
    runtime runs: new container objects between two young collections. Every 100 young
    collections a full one stops every thread; with Python's default of 700 that was every
    0.5–2 s at 20k msg/s, 6–15 ms each (the slowest picks and alerts under load). Objects are
    still freed by reference counting as soon as they are dropped; only reference cycles wait
    for a collection."""


class SkuConfig(_Frozen):
    """One SKU of the catalogue: a ``[[skus]]`` table, or a ``sku`` row of a catalogue file
    (docs/catalogue.md)."""

    id: Identifier
    """SKU id."""
    name: str = ""
    """Display name."""
    reorder_point: Annotated[int, Field(ge=0)]
    """Total units (all shelves) at or below which a LOW reorder alert is raised."""
    safety_stock: Annotated[int, Field(ge=0)]
    """Total units at or below which the alert is CRITICAL (0 units: OUT); at most
    ``reorder_point``."""
    max_stock: Annotated[int, Field(gt=0)]
    """Units to order up to; at least ``reorder_point``."""
    lead_time_d: NonNegFloat = 7.0
    """Supplier lead time, shown with the alert (informational)."""
    hysteresis_units: Annotated[int, Field(ge=0)] | None = None
    """An alert resolves only once stock stays above ``reorder_point`` + this for ``dwell_s``;
    unset: ``max(1, round(0.1 * reorder_point))``."""
    dwell_s: NonNegFloat = 5.0
    """How long a level must hold before an alert is raised, escalated, de-escalated or resolved
    (a level flapping around the reorder point raises once)."""
    pack_multiple: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    """Suppliers sell in packs of this many units: a suggested order quantity is rounded up to a
    whole number of packs (it may then go above ``max_stock`` by less than one pack)."""
    unit_weight_g: PositiveFloat | None = None
    """Weight of one unit, for this SKU's shelves that give none of their own (a shelf's
    ``unit_weight_g`` wins). Filled into those shelves when the catalogue is read (a file, the
    site file, an API change); changing it later changes no shelf."""
    tolerance_frac: Annotated[float, Field(gt=0, le=0.5)] | None = None
    """Counting tolerance for this SKU's shelves that give none of their own (unset: 0.3);
    filled in as ``unit_weight_g`` is."""

    @model_validator(mode="after")
    def _thresholds(self) -> Self:
        if self.safety_stock > self.reorder_point:
            raise ValueError(
                f"safety_stock ({self.safety_stock}) > reorder_point ({self.reorder_point})"
            )
        if self.reorder_point > self.max_stock:
            raise ValueError(f"reorder_point ({self.reorder_point}) > max_stock ({self.max_stock})")
        return self


class ScaleConfig(_Frozen):
    """A weighing device. ``format='native'`` publishes Floorhand JSON readings on
    ``<prefix>/<site>/<zone>/scale/<id>``; ``format='esphome'`` is off-the-shelf ESPHome
    firmware publishing ``<node>/sensor/<sensor>/state`` with a plain number in grams. Part
    of the catalogue: a ``[[scales]]`` table, or a ``scale`` row of a catalogue file
    (docs/catalogue.md; ``esphome_sensors`` space-separated in a CSV cell).
    """

    id: Identifier
    """Scale id (appears in MQTT topics)."""
    zone: Identifier
    """The zone (``[[zones]]`` id) the scale is in."""
    format: Literal["native", "esphome"] = "native"
    """``native`` (Floorhand JSON readings) or ``esphome`` (stock ESPHome firmware, one number
    in grams per sensor)."""
    channels: Annotated[int, Field(ge=1, le=64)] = 1
    """Load cells (shelves) the scale reports."""
    esphome_node: Identifier | None = None
    """ESPHome node name (the first topic level); required for ``esphome``."""
    esphome_sensors: tuple[Identifier, ...] = ()
    """ESPHome sensor object ids, one per channel, in channel order."""
    reporting_interval_s: PositiveFloat = 5.0
    """How often the scale reports; a shelf is STALE after ``[site] stale_after_intervals`` of
    these without a reading."""
    max_weight_g: PositiveFloat = 100_000.0
    """The scale's range; a heavier reading makes the shelf AMBIGUOUS (``over_range``)."""

    @model_validator(mode="after")
    def _esphome(self) -> Self:
        if self.format == "esphome":
            if not self.esphome_node:
                raise ValueError("esphome scales need esphome_node")
            if len(self.esphome_sensors) != self.channels:
                raise ValueError(
                    f"esphome_sensors lists {len(self.esphome_sensors)} sensor(s) "
                    f"for {self.channels} channel(s)"
                )
        return self


class ShelfReorderConfig(_Frozen):
    reorder_point: Annotated[int, Field(ge=0)]
    """Units on this shelf at or below which a shelf-level LOW alert is raised."""
    safety_stock: Annotated[int, Field(ge=0)] = 0
    """Units on this shelf at or below which the shelf alert is CRITICAL."""


class ShelfConfig(_Frozen):
    """One shelf position of the catalogue: a ``[[shelves]]`` table, or a ``shelf`` row of a
    catalogue file (docs/catalogue.md; its ``reorder`` table is the columns
    ``shelf_reorder_point`` and ``shelf_safety_stock`` there)."""

    id: Identifier
    """Shelf id."""
    zone: Identifier
    """The zone (``[[zones]]`` id); the same as its scale's."""
    location: str = ""
    """Where the shelf is (free text, e.g. aisle/bay/level)."""
    scale: Identifier
    """The scale (``[[scales]]`` id) under the shelf."""
    channel: Annotated[int, Field(ge=0)] = 0
    """The scale channel (0-based) this shelf sits on."""
    sku: Identifier
    """The SKU (``[[skus]]`` id) stocked here."""
    unit_weight_g: PositiveFloat
    """Weight of one unit: required here, or on the shelf's SKU (a shelf that gives none takes
    its SKU's ``unit_weight_g``)."""
    tare_g: NonNegFloat = 0.0
    """Weight of the empty shelf (bin, tray) on the scale."""
    capacity_units: Annotated[int, Field(gt=0)]
    """Units that fit; a full shelf must be within the scale's ``max_weight_g``."""
    tolerance_frac: Annotated[float, Field(gt=0, le=0.5)] = 0.3
    """Counting tolerance: ``(weight - tare) / unit_weight`` counts when within this fraction of
    a unit of a whole number, else the shelf is AMBIGUOUS (``between_units``). A shelf that
    gives none takes its SKU's ``tolerance_frac`` when set."""
    reorder: ShelfReorderConfig | None = None
    """Optional per-shelf reorder policy (``[shelves.reorder]``): alerts keyed by shelf instead
    of SKU."""


class PlcConfig(_Frozen):
    """One ``[[plcs]]`` entry: a conveyor or sorter PLC reached over Modbus TCP
    (docs/plc-integration.md).

    The simulator (``python -m simulators plcs SITE``) reads the same table; the keys it alone
    uses (belt length, speeds, lanes ...) are accepted here and otherwise ignored."""

    id: Identifier
    """PLC id."""
    kind: Literal["conveyor", "sorter"]
    """``conveyor`` or ``sorter`` (selects the register map, docs/plc-integration.md)."""
    host: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    """The PLC's Modbus TCP host."""
    port: Annotated[int, Field(ge=1, le=65_535)]
    """The PLC's Modbus TCP port."""
    unit: Annotated[int, Field(ge=1, le=247)] = 1
    """Modbus unit (slave) id."""
    timeout_s: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.5
    """Reply time limit of one request; an unanswered request counts toward liveness."""
    heartbeat: bool = True
    """Write the heartbeat register every 250 ms (the PLC's watchdog needs it)."""
    # Simulator-only keys (simulators/plc.py PlcSpec), accepted so one site file serves both.
    length_mm: NonNegFloat | None = None
    """Simulator only (conveyor): belt length."""
    max_speed_mm_s: NonNegFloat | None = None
    """Simulator only (conveyor): top belt speed."""
    speed_mm_s: NonNegFloat | None = None
    """Simulator only: a conveyor's initial speed setpoint; a sorter's belt speed."""
    ramp_s: NonNegFloat | None = None
    """Simulator only: time to ramp the belt up to speed."""
    jam_rate_per_h: NonNegFloat | None = None
    """Simulator only: random jams per hour."""
    induct_mm: NonNegFloat | None = None
    """Simulator only (sorter): distance from the induction to the first lane."""
    lane_pitch_mm: NonNegFloat | None = None
    """Simulator only (sorter): distance between lanes."""
    loop_mm: NonNegFloat | None = None
    """Simulator only (sorter): length of the loop."""
    lane_drain_s: NonNegFloat | None = None
    """Simulator only (sorter): time a pack station takes to clear one tote from its lane."""
    lanes: Annotated[int, Field(ge=0)] | None = None
    """Sorter lanes; pack stations are checked against it (the simulator builds this many)."""
    lane_capacity: Annotated[int, Field(ge=0)] | None = None
    """Simulator only (sorter): totes a lane holds before it is full."""
    queue_capacity: Annotated[int, Field(ge=0)] | None = None
    """Simulator only (sorter): divert commands it queues."""
    max_recirculations: Annotated[int, Field(ge=0)] | None = None
    """Simulator only (sorter): times a tote may go round the loop."""

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class SiteInfo(_Frozen):
    id: Identifier
    """Site id (the second MQTT topic level)."""
    name: str = ""
    """Display name."""
    stale_after_intervals: Annotated[float, Field(ge=1.5)] = 3.0
    """A scale is STALE after this many missed reporting intervals."""
    max_clock_skew_s: PositiveFloat = 300.0
    """Readings stamped further in the future than this are rejected."""


def _check_routes(site: SiteConfig, errors: list[tuple[str, str]]) -> None:
    """Zones and pack stations name PLCs of the right kind; lanes exist on their sorter."""
    plcs = {p.id: p for p in site.plcs}

    def check_plc(where: str, plc_id: str, kind: str) -> PlcConfig | None:
        plc = plcs.get(plc_id)
        if plc is None:
            errors.append((where, f"unknown PLC {plc_id!r} (not in [[plcs]])"))
        elif plc.kind != kind:
            errors.append((where, f"PLC {plc_id!r} is a {plc.kind}, not a {kind}"))
            return None
        return plc

    for i, zone in enumerate(site.zones):
        for j, conv in enumerate(zone.conveyors):
            check_plc(f"zones[{i}].conveyors[{j}]", conv, "conveyor")
        if zone.sorter is not None:
            check_plc(f"zones[{i}].sorter", zone.sorter, "sorter")
        elif zone.conveyors:
            errors.append((f"zones[{i}].sorter", "a zone with conveyors needs the sorter"))
    _unique(errors, "pack_stations", [p.id for p in site.pack_stations])
    lanes_used: dict[tuple[str, int], int] = {}
    for i, st in enumerate(site.pack_stations):
        sorter = check_plc(f"pack_stations[{i}].sorter", st.sorter, "sorter")
        if sorter is not None and sorter.lanes is not None and st.lane > sorter.lanes:
            errors.append(
                (f"pack_stations[{i}].lane", f"sorter {st.sorter!r} has {sorter.lanes} lane(s)")
            )
        key = (st.sorter, st.lane)
        if key in lanes_used:
            errors.append(
                (
                    f"pack_stations[{i}].lane",
                    f"lane {st.lane} of {st.sorter!r} is already pack_stations[{lanes_used[key]}]",
                )
            )
        lanes_used[key] = i


SKU_DEFAULTS: Final = ("unit_weight_g", "tolerance_frac")
"""A shelf's columns that its SKU may give for it (``[[skus]]``, a ``sku`` row)."""


def with_sku_defaults(shelf: Mapping[str, Any], sku: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``shelf`` (the raw values of a ``[[shelves]]`` table or ``shelf`` row) with each of
    `SKU_DEFAULTS` it leaves out (or empty) taken from its SKU's raw values, when the SKU gives
    it; ``shelf`` itself when nothing is taken."""
    if sku is None:
        return shelf
    taken = {
        name: sku[name]
        for name in SKU_DEFAULTS
        if shelf.get(name) in (None, "") and sku.get(name) not in (None, "")
    }
    return {**shelf, **taken} if taken else shelf


class SiteConfig(_Frozen):
    site: SiteInfo
    """The site itself (``[site]``)."""
    mqtt: MqttConfig = MqttConfig()
    """The broker connection (``[mqtt]``)."""
    journal: JournalConfig = JournalConfig()
    """The SQLite journal (``[journal]``)."""
    api: ApiConfig = ApiConfig()
    """The HTTP API and dashboard (``[api]``)."""
    history: HistoryConfig = HistoryConfig()
    """The historian (``[history]``)."""
    zones: tuple[ZoneConfig, ...]
    """Zones (``[[zones]]``)."""
    skus: tuple[SkuConfig, ...] = ()
    """SKUs and their reorder policy (``[[skus]]``). With ``[[scales]]`` and ``[[shelves]]``
    the catalogue: written here inline, or left out and imported into the journal
    (``floorhand catalog import``, docs/catalogue.md)."""
    scales: tuple[ScaleConfig, ...] = ()
    """Scales (``[[scales]]``); part of the catalogue."""
    shelves: tuple[ShelfConfig, ...] = ()
    """Shelves (``[[shelves]]``): one per scale channel; part of the catalogue."""
    plcs: tuple[PlcConfig, ...] = ()
    """Conveyor and sorter PLCs (``[[plcs]]``)."""
    pack_stations: tuple[PackStationConfig, ...] = ()
    """Pack stations (``[[pack_stations]]``)."""
    picking: PickingConfig = PickingConfig()
    """Picking (``[picking]``)."""
    process: ProcessConfig = ProcessConfig()
    """The controller process (``[process]``)."""

    @model_validator(mode="before")
    @classmethod
    def _shelves_take_their_skus_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("shelves"), list | tuple):
            skus = data.get("skus")
            by_id = {
                s["id"]: s
                for s in (skus if isinstance(skus, list | tuple) else ())
                if isinstance(s, dict) and "id" in s
            }
            data = {
                **data,
                "shelves": [
                    with_sku_defaults(sh, by_id.get(sh.get("sku"))) if isinstance(sh, dict) else sh
                    for sh in data["shelves"]
                ],
            }
        return data

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        errors: list[tuple[str, str]] = []
        _check_routes(self, errors)
        _unique(errors, "zones", [z.id for z in self.zones])
        _unique(errors, "plcs", [p.id for p in self.plcs])
        endpoints: dict[tuple[str, int, int], int] = {}
        for i, plc in enumerate(self.plcs):
            ep = (plc.host.lower(), plc.port, plc.unit)
            if ep in endpoints:
                first = endpoints[ep]
                errors.append(
                    (
                        f"plcs[{i}].port",
                        f"{plc.endpoint} unit {plc.unit} is already used by plcs[{first}] "
                        f"({self.plcs[first].id})",
                    )
                )
            else:
                endpoints[ep] = i
        problems = catalogue_problems(
            {z.id for z in self.zones},
            self.skus,
            self.scales,
            self.shelves,
            lambda section, i: f"{section}[{i}]",
        )
        errors += [(f"{section}[{i}].{key}", msg) for section, i, key, msg in problems]
        if errors:
            raise _CrossCheckError(errors)
        return self

    # Lookups built once; the models are frozen so caching on first use is safe.
    def sku(self, sku_id: str) -> SkuConfig:
        """The SKU ``sku_id`` (KeyError if the site has none); a dict lookup."""
        return self._skus_by_id[sku_id]

    @functools.cached_property
    def _skus_by_id(self) -> dict[str, SkuConfig]:
        return {s.id: s for s in self.skus}


Problem = tuple[str, int, str, str]
"""``(section, index, key, message)``: ``section`` is ``skus``, ``scales`` or ``shelves``."""


def catalogue_problems(
    zones: Collection[str],
    skus: Sequence[SkuConfig],
    scales: Sequence[ScaleConfig],
    shelves: Sequence[ShelfConfig],
    ref: Callable[[str, int], str],
) -> list[Problem]:
    """The catalogue's cross-checks against the site's zones: duplicate ids, unknown zone,
    SKU or scale, a channel the scale lacks or already used, a full shelf over the scale's
    range, shelf thresholds out of order. ``ref(section, index)`` names another record in a
    message (``shelves[3]`` in a site file, ``line 12`` in an import)."""
    out: list[Problem] = []
    groups: tuple[tuple[str, Sequence[SkuConfig | ScaleConfig | ShelfConfig]], ...] = (
        ("skus", skus),
        ("scales", scales),
        ("shelves", shelves),
    )
    for section, records in groups:
        first: dict[str, int] = {}
        for i, rec in enumerate(records):
            if rec.id in first:
                out.append(
                    (
                        section,
                        i,
                        "id",
                        f"duplicate id {rec.id!r} (first at {ref(section, first[rec.id])})",
                    )
                )
            else:
                first[rec.id] = i
    sku_ids = {s.id for s in skus}
    scales_by_id = {s.id: s for s in scales}
    nodes: dict[str, int] = {}
    for i, scale in enumerate(scales):
        if scale.zone not in zones:
            out.append(("scales", i, "zone", f"unknown zone {scale.zone!r}"))
        if scale.esphome_node:
            if scale.esphome_node in nodes:
                out.append(
                    (
                        "scales",
                        i,
                        "esphome_node",
                        f"node {scale.esphome_node!r} already used by "
                        f"{ref('scales', nodes[scale.esphome_node])}",
                    )
                )
            nodes[scale.esphome_node] = i
    channels: dict[tuple[str, int], int] = {}
    for i, shelf in enumerate(shelves):
        if shelf.zone not in zones:
            out.append(("shelves", i, "zone", f"unknown zone {shelf.zone!r}"))
        if shelf.sku not in sku_ids:
            out.append(("shelves", i, "sku", f"unknown SKU {shelf.sku!r}"))
        sc = scales_by_id.get(shelf.scale)
        if sc is None:
            out.append(("shelves", i, "scale", f"unknown scale {shelf.scale!r}"))
            continue
        if shelf.channel >= sc.channels:
            out.append(
                (
                    "shelves",
                    i,
                    "channel",
                    f"scale {sc.id!r} has {sc.channels} channel(s); "
                    f"channel {shelf.channel} does not exist",
                )
            )
        if sc.zone != shelf.zone:
            out.append(
                ("shelves", i, "zone", f"shelf in zone {shelf.zone!r} but scale in {sc.zone!r}")
            )
        key = (shelf.scale, shelf.channel)
        if key in channels:
            j = channels[key]
            out.append(
                (
                    "shelves",
                    i,
                    "channel",
                    f"scale {shelf.scale!r} channel {shelf.channel} is already used by "
                    f"{ref('shelves', j)} ({shelves[j].id})",
                )
            )
        channels[key] = i
        full_g = shelf.tare_g + shelf.capacity_units * shelf.unit_weight_g
        if full_g > sc.max_weight_g:
            out.append(
                (
                    "shelves",
                    i,
                    "capacity_units",
                    f"a full shelf weighs {full_g:.0f} g, over the scale's "
                    f"max_weight_g {sc.max_weight_g:.0f}",
                )
            )
        if shelf.reorder and shelf.reorder.safety_stock > shelf.reorder.reorder_point:
            out.append(("shelves", i, "reorder", "safety_stock > reorder_point"))
    return out


class _CrossCheckError(ValueError):
    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))


def _unique(errors: list[tuple[str, str]], section: str, ids: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, ident in enumerate(ids):
        if ident in seen:
            errors.append(
                (f"{section}[{i}].id", f"duplicate id {ident!r} (first at [{seen[ident]}])")
            )
        seen[ident] = i


def split_bind(bind: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``; raises ValueError with a clear message."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bind address {bind!r} must be HOST:PORT")
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"bind address {bind!r}: port {port!r} is not a number") from None
    if not 0 <= port_n <= 65_535:
        raise ValueError(f"bind address {bind!r}: port out of range")
    return host.strip("[]"), port_n


def parse_site(data: dict[str, object], source: str = "<site>") -> SiteConfig:
    """Validate an already-decoded TOML document."""
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        errors: list[tuple[str, str]] = []
        for err in exc.errors():
            ctx = err.get("ctx") or {}
            inner = ctx.get("error")
            if isinstance(inner, _CrossCheckError):
                errors.extend(inner.errors)
                continue
            path = _format_loc(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            errors.append((path, msg))
        raise ConfigError(source, errors) from None


def load_site(path: str | Path, overrides: dict[str, str] | None = None) -> SiteConfig:
    """Read and validate a site TOML file.

    ``overrides`` may set ``mqtt_url``, ``mqtt_protocol``, ``api_bind`` and ``journal_path``;
    otherwise the environment variables ``FLOORHAND_MQTT_URL``, ``FLOORHAND_MQTT_PROTOCOL``,
    ``FLOORHAND_API_BIND`` and ``FLOORHAND_JOURNAL`` apply, so one site file runs anywhere.
    With ``$STATE_DIRECTORY`` set (systemd's ``StateDirectory=``), a relative journal path
    resolves against it (no path in the file: ``$STATE_DIRECTORY/journal.sqlite``). A secret
    file (`env_secret`) that cannot be read is a configuration error."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [("<file>", exc.strerror or str(exc))]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [("<toml>", str(exc))]) from None
    ov = dict(overrides or {})
    url = ov.get("mqtt_url") or os.environ.get("FLOORHAND_MQTT_URL")
    bind = ov.get("api_bind") or os.environ.get("FLOORHAND_API_BIND")
    protocol = ov.get("mqtt_protocol") or os.environ.get("FLOORHAND_MQTT_PROTOCOL")
    journal_path = ov.get("journal_path") or os.environ.get("FLOORHAND_JOURNAL")
    if url:
        mqtt = data.setdefault("mqtt", {})
        if isinstance(mqtt, dict):
            mqtt["url"] = url
    if bind:
        api = data.setdefault("api", {})
        if isinstance(api, dict):
            api["bind"] = bind
    if protocol:
        mqtt = data.setdefault("mqtt", {})
        if isinstance(mqtt, dict):
            mqtt["protocol"] = int(protocol) if protocol.isdigit() else protocol
    if journal_path:
        journal = data.setdefault("journal", {})
        if isinstance(journal, dict):
            journal["path"] = journal_path
    site = parse_site(data, str(p))
    state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir and not site.journal.path.is_absolute():
        # Under systemd (StateDirectory=): the journal lives in the service's state directory.
        named = isinstance(data.get("journal"), dict) and "path" in data["journal"]
        path = Path(state_dir) / (site.journal.path if named else "journal.sqlite")
        site = site.model_copy(update={"journal": site.journal.model_copy(update={"path": path})})
    errors: list[tuple[str, str]] = []
    secrets = [("mqtt.username_env", site.mqtt.username_env)]
    secrets.append(("mqtt.password_env", site.mqtt.password_env))
    h = site.history
    secrets += [
        (f"history.{k}", getattr(h, k)) for k in ("token_env", "username_env", "password_env")
    ]
    for key, name in secrets:
        try:
            env_secret(name)
        except SecretError as exc:
            errors.append((key, str(exc)))
    if errors:
        raise ConfigError(str(p), errors)
    return site


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"
