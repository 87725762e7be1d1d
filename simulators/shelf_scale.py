"""Shelf-scale simulator: every scale of a site publishing over real MQTT.

Each shelf (one scale channel) holds a true unit count; the scale reports ``tare + count ×
unit weight`` with load-cell noise (σ ≈ 0.3 g + 0.0002 × weight), optional slow drift, and a
decaying oscillation for 0.5–1 s after a pick or restock, reported at a faster rate while it
settles. Pickers remove 1–3 units at random (a Poisson process per shelf); once an SKU's stock
is at or below its reorder point a restock brings its shelves back near full after a random
delay, so reorder alerts fire and resolve during a demo.

Wire formats come from :mod:`devices.shelf_scale` (the controller parses with the same module):

* native scales publish JSON readings on ``<prefix>/<site>/<zone>/scale/<device>`` at QoS 1,
  one message per channel (or one array per device with ``batch=True``), ``seq`` per device
  from 0 and ``epoch`` = boot counter (a simulated reboot bumps it and restarts ``seq``);
* ESPHome scales publish ``<node>/sensor/<sensor>/state`` as text with one decimal at QoS 0,
  retained (ESPHome's defaults), with birth ``online`` / will ``offline`` retained on
  ``<node>/status``.

Faults: dropouts (a scale goes silent for N s), poison payloads replacing a fraction of
messages, duplicate and reordered re-sends, reboots.

Time: all simulated durations are divided by ``speed``; reading timestamps are wall-clock.
One scheduler thread owns the model; one paho client (and network thread) per device, since
each real device has its own connection, client id and will.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from devices.shelf_scale import (
    encode_native,
    encode_reading,
    esphome_state_topic,
    esphome_status_topic,
    native_topic,
)
from simulators.site import Scale, Shelf, Site

log = logging.getLogger(__name__)

NATIVE_QOS: Final = 1
ESPHOME_QOS: Final = 0
"""ESPHome publishes state (and birth/will) at QoS 0 and retained unless configured otherwise."""
ESPHOME_RETAIN: Final = True

POISON_KINDS: Final = (
    "bad_json",
    "nan",
    "negative",
    "unknown_device",
    "device_mismatch",
    "wrong_type",
    "missing_field",
    "huge",
    "ts_future",
    "empty_batch",
    "binary",
)
"""Poison payloads the malformed mode picks from (native scales)."""

ESPHOME_POISON_KINDS: Final = ("nan", "not_a_number", "negative", "huge", "binary")


DEFAULT_PICK_RATE_PER_MIN: Final = 24.0


class ScaleSimError(RuntimeError):
    """The simulator could not start (broker unreachable, login refused) or was misused."""


@dataclass(frozen=True, slots=True)
class ScaleSimOptions:
    """Behaviour knobs. Durations and rates are in simulated time (divided by ``speed``)."""

    pick_rate_per_min: float = DEFAULT_PICK_RATE_PER_MIN
    """Mean picks per shelf per minute (Poisson), 1–3 units each. The default takes most demo
    SKUs from their ~80 % start to their ~30 % reorder point within a minute (those with the
    most stock in ~45 s); smaller ones reach zero before their restock arrives."""
    pick_units: tuple[int, int] = (1, 3)
    auto_restock: bool = True
    restock_delay_s: tuple[float, float] = (10.0, 25.0)
    start_fill: tuple[float, float] = (0.7, 0.9)
    restock_fill: tuple[float, float] = (0.9, 1.0)
    noise: bool = True
    drift_g_per_h: float = 0.0
    """Each channel drifts linearly at a random rate in ±this many grams per hour."""
    settle_s: tuple[float, float] = (0.5, 1.0)
    settle_report_interval_s: float = 0.15
    batch: bool = False
    malformed_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    dropout_rate_per_h: float = 0.0
    """Random dropouts per scale per hour (each lasts ``dropout_s``)."""
    dropout_s: tuple[float, float] = (5.0, 15.0)
    keepalive_s: int = 10
    client_id_prefix: str = ""
    first_epoch: int = 0
    """Boot counter the native devices start with. A real scale keeps it in flash and bumps it
    on every boot; the CLI passes the wall-clock second, so a restarted simulator looks like
    rebooted devices instead of replaying sequence numbers the controller has already seen."""


@dataclass(slots=True)
class SimStats:
    """Counters since start (a snapshot is returned by :meth:`WarehouseScales.stats`)."""

    messages: int = 0
    readings: int = 0
    picks: int = 0
    picked_units: int = 0
    restocks: int = 0
    duplicates: int = 0
    reordered: int = 0
    dropouts: int = 0
    reboots: int = 0
    publish_errors: int = 0
    poison: Counter[str] = field(default_factory=Counter)

    def copy(self) -> SimStats:
        c = SimStats(
            self.messages,
            self.readings,
            self.picks,
            self.picked_units,
            self.restocks,
            self.duplicates,
            self.reordered,
            self.dropouts,
            self.reboots,
            self.publish_errors,
        )
        c.poison = Counter(self.poison)
        return c

    def summary(self) -> str:
        poison = sum(self.poison.values())
        return (
            f"picks {self.picks} ({self.picked_units} units), restocks {self.restocks}, "
            f"messages {self.messages} ({self.readings} readings, {poison} poison, "
            f"{self.duplicates} dup, {self.reordered} reordered), dropouts {self.dropouts}"
        )


@dataclass(frozen=True, slots=True)
class SimEvent:
    """Something that happened in the simulated warehouse (for tests and scenario runners).

    ``kind``: ``pick`` / ``restock`` / ``set_count`` (``shelf``, ``count`` = new count),
    ``reorder_point_reached`` (``sku``, ``count`` = SKU level), ``dropout`` / ``reboot``
    (``scale``). ``t_sim`` is simulated seconds since the simulator was created."""

    kind: str
    t_sim: float
    shelf: str | None = None
    sku: str | None = None
    scale: str | None = None
    count: int | None = None


@dataclass(slots=True)
class _Settle:
    t0: float
    from_g: float
    duration_s: float
    freq_hz: float


@dataclass(slots=True)
class _Channel:
    shelf: Shelf
    fill_units: int
    count: int
    drift_g_per_s: float
    settle: _Settle | None = None

    def target_g(self, now: float) -> float:
        return self.shelf.tare_g + self.count * self.shelf.unit_weight_g + self.drift_g_per_s * now

    def weight_g(self, now: float) -> float:
        """Noise-free load at simulated time ``now``, including any settling oscillation."""
        target = self.target_g(now)
        s = self.settle
        if s is None:
            return target
        dt = now - s.t0
        if dt >= s.duration_s:
            self.settle = None
            return target
        tau = s.duration_s / 6.0
        return target + (s.from_g - target) * math.exp(-dt / tau) * math.cos(
            2 * math.pi * s.freq_hz * dt
        )


@dataclass(slots=True)
class _Device:
    scale: Scale
    topic: str
    client_id: str
    channels: list[_Channel]
    client: Any = None  # paho Client; Any keeps paho's partially typed surface out of our types
    connected: threading.Event = field(default_factory=threading.Event)
    last_refusal: str = ""
    seq: int = 0
    epoch: int = 0
    gen: int = 0
    fast_until: float = -1.0
    down_until: float = -1.0
    held: tuple[str, bytes, int, bool] | None = None
    last_info: Any = None

    @property
    def esphome(self) -> bool:
        return self.scale.format == "esphome"


class WarehouseScales:
    """Every scale of ``site`` publishing to the broker at ``url``.

    ``start()`` connects all devices (raises :class:`ScaleSimError` if they are not connected
    within ``connect_timeout_s``) and starts the clock; ``stop()`` disconnects cleanly. The
    scenario methods (:meth:`pick`, :meth:`restock`, :meth:`set_count`, :meth:`dropout`,
    :meth:`reboot`, :meth:`report_now`) are thread-safe and take effect at once.
    """

    def __init__(
        self,
        site: Site,
        url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        speed: float = 1.0,
        seed: int | None = None,
        options: ScaleSimOptions | None = None,
        on_event: Callable[[SimEvent], None] | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(f"bad MQTT URL {url!r} (want mqtt://host:port)")
        self.site = site
        self.url = url
        self._host = parts.hostname
        self._tls = parts.scheme in ("mqtts", "ssl")
        self._port = parts.port or (8883 if self._tls else 1883)
        self._username = username
        self._password = password
        self.speed = speed
        self.options = options or ScaleSimOptions()
        self._on_event = on_event
        self._below_reorder: set[str] = set()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._tie = itertools.count()
        self._stats = SimStats()
        self._t0 = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._restock_pending: set[str] = set()
        self._devices: dict[str, _Device] = {}
        self._shelves: dict[str, tuple[_Device, _Channel]] = {}
        self._build()

    # ----------------------------------------------------------------- model
    def _build(self) -> None:
        o = self.options
        shelves_per_sku = Counter(s.sku for s in self.site.shelves)
        for scale in self.site.scales:
            channels: list[_Channel] = []
            for shelf in self.site.shelves_on(scale.id):
                sku = self.site.sku(shelf.sku)
                # "Full" is capped by the SKU's max stock shared over its shelves, so a demo SKU
                # starts within its max and its reorder point (~30 % of max) is reachable.
                share = math.ceil(sku.max_stock / shelves_per_sku[shelf.sku])
                fill = max(1, min(shelf.capacity_units, share))
                start = min(fill, round(fill * self._rng.uniform(*o.start_fill)))
                drift = self._rng.uniform(-1.0, 1.0) * o.drift_g_per_h / 3600.0
                channels.append(_Channel(shelf, fill, start, drift))
            if not channels:
                continue  # a scale without shelves has nothing meaningful to weigh
            if scale.format == "esphome":
                assert scale.esphome_node is not None
                topic = esphome_status_topic(scale.esphome_node)
                client_id = scale.esphome_node
            else:
                topic = native_topic(self.site.topic_prefix, self.site.id, scale.zone, scale.id)
                client_id = scale.id
            dev = _Device(scale, topic, o.client_id_prefix + client_id, channels)
            dev.epoch = o.first_epoch
            self._devices[scale.id] = dev
            for ch in channels:
                self._shelves[ch.shelf.id] = (dev, ch)

    def _sim_now(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    # ------------------------------------------------------------ public API
    @property
    def shelf_ids(self) -> tuple[str, ...]:
        return tuple(self._shelves)

    @property
    def scale_ids(self) -> tuple[str, ...]:
        return tuple(self._devices)

    def true_count(self, shelf_id: str) -> int:
        with self._lock:
            return self._shelf(shelf_id)[1].count

    def expected_weight_g(self, shelf_id: str) -> float:
        """The settled, noise-free weight the shelf's scale should converge to."""
        with self._lock:
            return self._shelf(shelf_id)[1].target_g(self._sim_now())

    def pick(self, shelf_id: str, units: int) -> int:
        """Remove up to ``units`` (never below zero); returns how many were removed."""
        if units < 0:
            raise ValueError("units must be >= 0")
        with self._lock:
            _, ch = self._shelf(shelf_id)
            removed = min(units, ch.count)
            if removed:
                self._stats.picks += 1
                self._stats.picked_units += removed
                self._set(shelf_id, ch.count - removed, "pick")
            return removed

    def restock(self, shelf_id: str, units: int | None = None) -> int:
        """Fill the shelf to ``units`` (default: its full level). Returns the new count."""
        with self._lock:
            _, ch = self._shelf(shelf_id)
            n = ch.fill_units if units is None else units
            self._stats.restocks += 1
            self._set(shelf_id, n, "restock")
            return n

    def set_count(self, shelf_id: str, n: int) -> None:
        with self._lock:
            self._set(shelf_id, n, "set_count")

    def report_now(self, scale_id: str | None = None) -> None:
        """Publish a reading from one scale (or all) immediately, then keep the usual rhythm."""
        with self._lock:
            devices = [self._device(scale_id)] if scale_id else list(self._devices.values())
            now = self._sim_now()
            for dev in devices:
                self._schedule_report(dev, now)

    def dropout(self, scale_id: str, duration_s: float) -> None:
        """The scale publishes nothing for ``duration_s`` (simulated); stock keeps changing."""
        with self._lock:
            dev = self._device(scale_id)
            dev.down_until = self._sim_now() + duration_s
            self._stats.dropouts += 1
            log.info("%s drops out for %.1f s", scale_id, duration_s)
            self._emit_event(SimEvent("dropout", self._sim_now(), scale=scale_id))

    def reboot(self, scale_id: str) -> None:
        """Native: ``epoch`` + 1 and ``seq`` restarts at 0. ESPHome: offline, then online."""
        with self._lock:
            dev = self._device(scale_id)
            self._stats.reboots += 1
            if dev.esphome:
                assert dev.scale.esphome_node is not None
                status = esphome_status_topic(dev.scale.esphome_node)
                self._raw_publish(dev, status, b"offline", ESPHOME_QOS, True)
                self._raw_publish(dev, status, b"online", ESPHOME_QOS, True)
            else:
                dev.epoch += 1
                dev.seq = 0
            self._schedule_report(dev, self._sim_now())
            self._emit_event(SimEvent("reboot", self._sim_now(), scale=scale_id))

    def sim_time(self) -> float:
        """Simulated seconds since the simulator was created (the clock of ``SimEvent.t_sim``)."""
        return self._sim_now()

    def stats(self) -> SimStats:
        with self._lock:
            return self._stats.copy()

    def device_epoch_seq(self, scale_id: str) -> tuple[int, int]:
        """(epoch, next seq) of a native device."""
        with self._lock:
            dev = self._device(scale_id)
            return dev.epoch, dev.seq

    # ------------------------------------------------------------- lifecycle
    def start(self, connect_timeout_s: float = 10.0) -> None:
        """Connect every device, wait for their CONNACKs, start the clock."""
        if self._thread is not None:
            raise ScaleSimError("already started")
        for dev in self._devices.values():
            dev.client = self._make_client(dev)
            dev.client.connect_async(self._host, self._port, keepalive=self.options.keepalive_s)
            dev.client.loop_start()
        deadline = time.monotonic() + connect_timeout_s
        missing = []
        for dev in self._devices.values():
            if not dev.connected.wait(max(0.0, deadline - time.monotonic())):
                missing.append(
                    f"{dev.client_id}{': ' + dev.last_refusal if dev.last_refusal else ''}"
                )
        if missing:
            self._shutdown_clients(flush_timeout_s=0.5)
            raise ScaleSimError(
                f"{len(missing)} device(s) not connected to {self.url} within "
                f"{connect_timeout_s:.0f} s: {', '.join(missing[:5])}"
            )
        with self._lock:
            self._stopping = False
            now = self._sim_now()
            for dev in self._devices.values():
                # Stagger first reports over one interval, like devices powered up at random.
                self._push(
                    now + self._rng.uniform(0, dev.scale.reporting_interval_s),
                    self._report_cb(dev, dev.gen),
                )
                if self.options.dropout_rate_per_h > 0:
                    self._push(
                        now + self._exp(self.options.dropout_rate_per_h / 3600.0),
                        self._random_dropout_cb(dev),
                    )
            if self.options.pick_rate_per_min > 0:
                for shelf_id in self._shelves:
                    self._push(
                        now + self._exp(self.options.pick_rate_per_min / 60.0),
                        self._pick_cb(shelf_id),
                    )
        self._thread = threading.Thread(target=self._run, name="scale-sim", daemon=True)
        self._thread.start()
        log.info(
            "%d scale(s), %d shelves publishing to %s",
            len(self._devices),
            len(self._shelves),
            self.url,
        )

    def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Stop the clock, flush held messages, publish ESPHome ``offline``, disconnect."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._lock:
            for dev in self._devices.values():
                if dev.held is not None:
                    topic, payload, qos, retain = dev.held
                    dev.held = None
                    self._raw_publish(dev, topic, payload, qos, retain)
        self._shutdown_clients(flush_timeout_s)

    def __enter__(self) -> WarehouseScales:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _shutdown_clients(self, flush_timeout_s: float) -> None:
        for dev in self._devices.values():
            client = dev.client
            if client is None:
                continue
            if dev.esphome and dev.connected.is_set():
                # ESPHome's shutdown message defaults to its will: announce a clean "offline".
                assert dev.scale.esphome_node is not None
                info = client.publish(
                    esphome_status_topic(dev.scale.esphome_node), b"offline", ESPHOME_QOS, True
                )
                dev.last_info = info
            info = dev.last_info
            if info is not None and dev.connected.is_set():
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(flush_timeout_s)
            # disconnect() before loop_stop(): the other order leaves QoS 1 state half-done.
            client.disconnect()
            client.loop_stop()
            dev.client = None
            dev.connected.clear()

    # ----------------------------------------------------------- mqtt client
    def _make_client(self, dev: _Device) -> Any:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=dev.client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        if self._username:
            client.username_pw_set(self._username, self._password)
        if self._tls:
            client.tls_set()
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(0)
        if dev.esphome:
            assert dev.scale.esphome_node is not None
            client.will_set(
                esphome_status_topic(dev.scale.esphome_node), b"offline", ESPHOME_QOS, True
            )

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                dev.last_refusal = str(reason)
                log.warning("%s: connection refused: %s", dev.client_id, reason)
                return
            if dev.esphome:
                assert dev.scale.esphome_node is not None
                c.publish(
                    esphome_status_topic(dev.scale.esphome_node), b"online", ESPHOME_QOS, True
                )
            dev.connected.set()

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            dev.connected.clear()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        return client

    def _raw_publish(
        self, dev: _Device, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        if dev.client is None:
            return
        info = dev.client.publish(topic, payload, qos, retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._stats.publish_errors += 1
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            self._stats.publish_errors += 1  # QoS 0 while offline is simply lost
            return
        dev.last_info = info
        self._stats.messages += 1

    def _emit(self, dev: _Device, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish one message through the duplicate/reorder fault filters."""
        o = self.options
        if dev.held is None and o.reorder_rate > 0 and self._rng.random() < o.reorder_rate:
            dev.held = (topic, payload, qos, retain)  # goes out after the next message
            self._stats.reordered += 1
            return
        self._raw_publish(dev, topic, payload, qos, retain)
        if o.duplicate_rate > 0 and self._rng.random() < o.duplicate_rate:
            self._raw_publish(dev, topic, payload, qos, retain)
            self._stats.duplicates += 1
        if dev.held is not None:
            held, dev.held = dev.held, None
            self._raw_publish(dev, *held)

    # ------------------------------------------------------------- scheduler
    def _push(self, due: float, cb: Callable[[float], None]) -> None:
        heapq.heappush(self._heap, (due, next(self._tie), cb))
        self._wake.notify()

    def _exp(self, rate_per_s: float) -> float:
        return self._rng.expovariate(rate_per_s)

    def _run(self) -> None:
        with self._lock:
            while not self._stopping:
                now = self._sim_now()
                if self._heap and self._heap[0][0] <= now:
                    _, _, cb = heapq.heappop(self._heap)
                    try:
                        cb(now)
                    except Exception:  # a bug in one event must not stop the whole warehouse
                        log.exception("scale simulator event failed")
                    continue
                wait_s = (self._heap[0][0] - now) / self.speed if self._heap else None
                self._wake.wait(wait_s)

    def _schedule_report(self, dev: _Device, at: float) -> None:
        dev.gen += 1  # supersedes the pending regular report
        self._push(at, self._report_cb(dev, dev.gen))

    def _report_cb(self, dev: _Device, gen: int) -> Callable[[float], None]:
        def cb(now: float) -> None:
            if gen != dev.gen:
                return
            if now < dev.down_until:
                self._push(dev.down_until, self._report_cb(dev, gen))
                return
            self._report(dev, now)
            interval = dev.scale.reporting_interval_s
            if now < dev.fast_until:
                interval = min(interval, self.options.settle_report_interval_s)
            self._push(now + interval, self._report_cb(dev, gen))

        return cb

    def _pick_cb(self, shelf_id: str) -> Callable[[float], None]:
        def cb(now: float) -> None:
            lo, hi = self.options.pick_units
            self.pick(shelf_id, self._rng.randint(lo, hi))
            self._push(now + self._exp(self.options.pick_rate_per_min / 60.0), cb)

        return cb

    def _restock_cb(self, sku_id: str) -> Callable[[float], None]:
        def cb(now: float) -> None:
            self._restock_pending.discard(sku_id)
            for shelf in self.site.shelves_of_sku(sku_id):
                if shelf.id not in self._shelves:
                    continue
                ch = self._shelves[shelf.id][1]
                n = min(
                    ch.fill_units,
                    round(ch.fill_units * self._rng.uniform(*self.options.restock_fill)),
                )
                self.restock(shelf.id, max(n, ch.count))
            log.info("restocked %s", sku_id)

        return cb

    def _random_dropout_cb(self, dev: _Device) -> Callable[[float], None]:
        def cb(now: float) -> None:
            self.dropout(dev.scale.id, self._rng.uniform(*self.options.dropout_s))
            self._push(now + self._exp(self.options.dropout_rate_per_h / 3600.0), cb)

        return cb

    # ----------------------------------------------------------------- state
    def _shelf(self, shelf_id: str) -> tuple[_Device, _Channel]:
        try:
            return self._shelves[shelf_id]
        except KeyError:
            raise KeyError(f"unknown shelf {shelf_id!r}") from None

    def _device(self, scale_id: str) -> _Device:
        try:
            return self._devices[scale_id]
        except KeyError:
            raise KeyError(f"unknown scale {scale_id!r}") from None

    def _emit_event(self, event: SimEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # an observer's bug must not stop the warehouse
                log.exception("on_event callback failed")

    def _set(self, shelf_id: str, n: int, kind: str) -> None:
        dev, ch = self._shelf(shelf_id)
        if not 0 <= n <= ch.shelf.capacity_units:
            raise ValueError(f"{shelf_id}: count {n} outside 0..{ch.shelf.capacity_units}")
        if n == ch.count:
            return
        now = self._sim_now()
        from_g = ch.weight_g(now)
        ch.count = n
        duration = self._rng.uniform(*self.options.settle_s)
        ch.settle = _Settle(now, from_g, duration, self._rng.uniform(2.0, 4.0))
        dev.fast_until = max(dev.fast_until, now + duration + self.options.settle_report_interval_s)
        self._schedule_report(dev, now + self.options.settle_report_interval_s)
        self._emit_event(SimEvent(kind, now, shelf=shelf_id, sku=ch.shelf.sku, count=n))
        self._check_reorder(ch.shelf)

    def _check_reorder(self, shelf: Shelf) -> None:
        sku = self.site.sku(shelf.sku)
        level = sum(
            self._shelves[s.id][1].count
            for s in self.site.shelves_of_sku(sku.id)
            if s.id in self._shelves
        )
        shelf_low = (
            shelf.reorder_point is not None
            and self._shelves[shelf.id][1].count <= shelf.reorder_point
        )
        if not (level <= sku.reorder_point or shelf_low):
            self._below_reorder.discard(sku.id)
            return
        if sku.id not in self._below_reorder:
            self._below_reorder.add(sku.id)
            self._emit_event(
                SimEvent("reorder_point_reached", self._sim_now(), sku=sku.id, count=level)
            )
        if not self.options.auto_restock or sku.id in self._restock_pending:
            return
        self._restock_pending.add(sku.id)
        delay = self._rng.uniform(*self.options.restock_delay_s)
        self._push(self._sim_now() + delay, self._restock_cb(sku.id))
        log.info(
            "%s at %d units (reorder point %d): restock in %.0f s",
            sku.id,
            level,
            sku.reorder_point,
            delay,
        )

    def _measure(self, ch: _Channel, now: float) -> float:
        w = ch.weight_g(now)
        if self.options.noise:
            w += self._rng.gauss(0.0, 0.3 + 0.0002 * abs(w))
        return round(max(0.0, w), 1)

    def _report(self, dev: _Device, now: float) -> None:
        ts = time.time()
        if dev.esphome:
            assert dev.scale.esphome_node is not None
            for ch in dev.channels:
                sensor = dev.scale.esphome_sensors[ch.shelf.channel]
                topic = esphome_state_topic(dev.scale.esphome_node, sensor)
                payload = f"{self._measure(ch, now):.1f}".encode()
                payload = self._maybe_poison_esphome(payload)
                self._emit(dev, topic, payload, ESPHOME_QOS, ESPHOME_RETAIN)
                self._stats.readings += 1
            return
        readings: list[dict[str, object]] = []
        for ch in dev.channels:
            readings.append(
                encode_reading(
                    dev.scale.id,
                    dev.seq,
                    ts,
                    self._measure(ch, now),
                    channel=ch.shelf.channel,
                    epoch=dev.epoch,
                )
            )
            dev.seq += 1
        groups = [readings] if self.options.batch else [[r] for r in readings]
        for group in groups:
            payload = self._maybe_poison_native(dev, group, ts)
            self._emit(dev, dev.topic, payload, NATIVE_QOS, False)
        self._stats.readings += len(readings)

    # ---------------------------------------------------------------- poison
    def _maybe_poison_native(
        self, dev: _Device, group: list[dict[str, object]], ts: float
    ) -> bytes:
        if not (
            self.options.malformed_rate > 0 and self._rng.random() < self.options.malformed_rate
        ):
            return encode_native(group)
        kind = self._rng.choice(POISON_KINDS)
        self._stats.poison[kind] += 1
        return poison_native(kind, dict(group[0]), ts, self._rng, other_devices=self.scale_ids)

    def _maybe_poison_esphome(self, payload: bytes) -> bytes:
        if not (
            self.options.malformed_rate > 0 and self._rng.random() < self.options.malformed_rate
        ):
            return payload
        kind = self._rng.choice(ESPHOME_POISON_KINDS)
        self._stats.poison[kind] += 1
        return poison_esphome(kind, payload, self._rng)


def poison_native(
    kind: str,
    reading: dict[str, object],
    ts: float,
    rng: random.Random,
    other_devices: tuple[str, ...] = (),
) -> bytes:
    """A bad native message built from a good ``reading`` (it consumes that reading's seq)."""
    r = dict(reading)
    if kind == "bad_json":
        text = orjson.dumps(r)
        return text[: rng.randint(1, max(1, len(text) - 2))]
    if kind == "nan":
        return orjson.dumps(r).replace(b'"grams":' + orjson.dumps(r["grams"]), b'"grams":NaN')
    if kind == "negative":
        r["grams"] = -abs(float(str(r["grams"]))) - 1.0  # never -0.0
    elif kind == "unknown_device":
        r["device"] = f"ghost-{rng.randrange(16**6):06x}"
    elif kind == "device_mismatch":
        others = [d for d in other_devices if d != r["device"]]
        r["device"] = rng.choice(others) if others else "ghost-mismatch"
    elif kind == "wrong_type":
        field_name = rng.choice(("grams", "seq", "ts"))
        r[field_name] = str(r[field_name])
    elif kind == "missing_field":
        del r[rng.choice(("grams", "seq", "ts", "device"))]
    elif kind == "huge":
        r["grams"] = 1e15
    elif kind == "ts_future":
        r["ts"] = round(ts + 30 * 86_400.0, 3)
    elif kind == "empty_batch":
        return b"[]"
    elif kind == "binary":
        return bytes(rng.randrange(128, 256) for _ in range(24))
    else:
        raise ValueError(f"unknown poison kind {kind!r}")
    return encode_native([r])


def poison_esphome(kind: str, payload: bytes, rng: random.Random) -> bytes:
    if kind == "nan":
        return b"nan"
    if kind == "not_a_number":
        return b"unavailable"
    if kind == "negative":
        value = payload.lstrip(b"-")
        return b"-" + (value if value.strip(b"0.") else b"12.5")
    if kind == "huge":
        return b"1e300"
    if kind == "binary":
        return bytes(rng.randrange(128, 256) for _ in range(8))
    raise ValueError(f"unknown ESPHome poison kind {kind!r}")
