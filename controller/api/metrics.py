"""``/metrics``: Prometheus text exposition (prometheus-client).

Runtime figures (ingest, outbox, links, alerts, history) are the supervision service's
``HealthReport`` (the one health /api/v1/health renders), taken at scrape time; the event bus's
counters are read from the bus. Nothing is counted twice; the HTTP layer keeps
its own counters (requests, latency, auth failures, rate limiting, oversize bodies). Each app
has its own registry; the pick latency histogram is process-wide (``observe_pick_latency``),
fed from the bus's order events by ``PickLatencyProbe``. Metric names: docs/api.md.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from controller.api.auth import Role, public, require
from controller.build import version
from controller.bus import Bus
from controller.domain.events import BusEvent, OrderStateChanged
from controller.domain.model import OrderState
from controller.runtime import Runtime
from controller.services.supervision import HealthReport
from devices.link.state import LinkState

PICK_LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

PICK_LATENCY = Histogram(
    "floorhand_pick_latency_seconds",
    "Time from a pick being created to its confirmation, seconds.",
    buckets=PICK_LATENCY_BUCKETS_S,
    registry=None,
)
"""Process-wide; registered in every app's registry."""


def observe_pick_latency(seconds: float) -> None:
    """Record one pick's latency (created → confirmed). Negative or non-finite values are
    ignored (a clock step must not poison the histogram)."""
    if seconds >= 0 and seconds != float("inf"):
        PICK_LATENCY.observe(seconds)


class PickLatencyProbe:
    """Feeds ``floorhand_pick_latency_seconds`` from the bus: an order's pick latency is the
    time from its first transition out of RECEIVED (submission) to SORTED (every pick
    confirmed). Orders that end in EXCEPTION are not observed. Bounded: at most
    ``max_open`` orders are tracked (the oldest are forgotten first)."""

    def __init__(self, max_open: int = 100_000) -> None:
        self.max_open = max_open
        self._started: dict[str, float] = {}

    def on_events(self, events: list[BusEvent]) -> None:
        for ev in events:
            if type(ev) is not OrderStateChanged:  # nor its OrderException echo
                continue
            order_id, ts_s = ev.order_id, ev.ts_s
            if ev.old is OrderState.RECEIVED:
                self._started[order_id] = ts_s
                if len(self._started) > self.max_open:
                    del self._started[next(iter(self._started))]
            elif ev.new in (OrderState.SORTED, OrderState.EXCEPTION):
                t0 = self._started.pop(order_id, None)
                if t0 is not None and ev.new is OrderState.SORTED:
                    observe_pick_latency(ts_s - t0)


LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ApiMetrics:
    """The HTTP layer's own metrics and the app's registry (``app.state.metrics``)."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "floorhand_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "floorhand_http_request_duration_seconds",
            "HTTP request duration by method and route template, seconds.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.auth_failures = Counter(
            "floorhand_http_auth_failures",
            "Requests refused by authentication (unauthenticated: 401) or role (forbidden: 403).",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "floorhand_http_rate_limited",
            "Requests refused with 429 by the per-token rate limit.",
            registry=r,
        )
        self.stop_exempt = Counter(
            "floorhand_http_stop_requests",
            "STOP requests (POST …/stop), which the rate limit never refuses.",
            registry=r,
        )
        self.body_too_large = Counter(
            "floorhand_http_body_too_large",
            "Requests refused with 413 (body over [api] max_body_bytes).",
            registry=r,
        )
        self.undeclared = Counter(
            "floorhand_http_undeclared_route_refusals",
            "Requests refused because their /api/v1 route declares no role (fail closed).",
            registry=r,
        )
        r.register(PICK_LATENCY)
        self.build_info = Gauge(
            "floorhand_build_info",
            "Always 1; the labels name the installed release, the Python and the site id.",
            ["version", "python", "site"],
            registry=r,
        )
        self.build_info.labels(
            version(), platform.python_version(), runtime.site.site.id if runtime else ""
        ).set(1)
        self.picks = PickLatencyProbe()
        if runtime is not None:
            r.register(RuntimeCollector(runtime.supervision.report))
            r.register(BusCollector(runtime.bus))
            runtime.bus.add_listener(self.picks.on_events)

    def on_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RuntimeCollector(Collector):
    """Renders the supervision service's ``HealthReport`` at scrape time. Called on the event
    loop (the ``/metrics`` handler is ``async``), so it never races the loop that mutates the
    figures."""

    def __init__(self, report: Callable[[], HealthReport]) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        h = self.report()
        ing = h.ingest
        yield _counter("floorhand_ingest_messages", "MQTT messages handled.", ing.messages)
        yield _counter("floorhand_ingest_readings", "Readings applied.", ing.readings)
        yield _counter("floorhand_ingest_commits", "Journal commits.", ing.commits)
        yield _counter(
            "floorhand_ingest_commit_failures", "Journal commits that failed.", ing.commit_failures
        )
        yield _counter(
            "floorhand_ingest_ignored_retained",
            "Retained messages skipped (last-known, not fresh).",
            ing.ignored_retained,
        )
        yield _counter(
            "floorhand_ingest_late_readings",
            "Readings older than their device's newest (journaled, not applied to the state).",
            ing.late_readings,
        )
        rejected = CounterMetricFamily(
            "floorhand_ingest_rejected", "Messages rejected, by reason.", labels=["reason"]
        )
        for reason, n in sorted(ing.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield _counter(
            "floorhand_ingest_oversize", "Messages above the payload limit.", ing.oversize
        )
        yield _counter(
            "floorhand_main_loop_pauses",
            "Main-loop iterations paused for the control loop's work ([process] "
            "control_precedence_ms; the process's).",
            h.main_loop_pauses,
        )
        yield _counter(
            "floorhand_main_loop_paused_seconds",
            "Time the main loop (ingest, alerts, history) spent paused for the control loop.",
            h.main_loop_paused_s,
        )
        yield _gauge(
            "floorhand_control_loop_realtime_priority",
            "SCHED_FIFO priority of the control loop's thread; 0: normal scheduling ([process] "
            "control_realtime_priority 0, or refused: see the start-up log).",
            h.control_realtime_priority,
        )
        mqtt = h.mqtt
        yield _counter(
            "floorhand_mqtt_oversize_in",
            "Messages above the MQTT link's packet limit (acked, dropped).",
            mqtt.oversize_in,
        )
        yield _counter(
            "floorhand_mqtt_invalid_in",
            "Messages whose topic is not UTF-8 (acked, dropped).",
            mqtt.invalid_in,
        )
        yield _counter(
            "floorhand_mqtt_qos_downgraded",
            "QoS 1 publishes sent as QoS 0 (the broker's Maximum QoS is 0).",
            mqtt.qos_downgraded,
        )
        yield _counter(
            "floorhand_mqtt_retain_dropped",
            "Retained publishes sent without retain (the broker has no retain).",
            mqtt.retain_dropped,
        )
        yield _gauge(
            "floorhand_mqtt_warnings",
            "Guarantees the broker weakened (see health mqtt.warnings).",
            len(mqtt.warnings),
        )

        yield _gauge("floorhand_outbox_rows", "Rows waiting in the outbox.", ing.outbox_rows)
        yield _gauge(
            "floorhand_outbox_max_rows",
            "Outbox bound ([journal] max_outbox_rows).",
            ing.max_outbox_rows,
        )
        yield _gauge(
            "floorhand_backpressure",
            "1 while ingest is paused because the outbox is full.",
            1 if ing.backpressure else 0,
        )
        yield _gauge("floorhand_ready", "1 when the controller is ready.", 1 if h.ready else 0)

        states = GaugeMetricFamily(
            "floorhand_link_state",
            "1 for the current state of each link (mqtt, mqtt:picks, plc:<id>).",
            labels=["link", "state"],
        )
        connects = CounterMetricFamily(
            "floorhand_link_connects", "Successful connects per link.", labels=["link"]
        )
        links = [("mqtt", mqtt.state, mqtt.connects)]
        if (cmd := h.command_link) is not None:
            links.append(("mqtt:picks", cmd.state, cmd.connects))
        links += [(f"plc:{pid}", plc.link, plc.connects) for pid, plc in sorted(h.plcs.items())]
        for name, state, n in links:
            for s in LinkState:
                states.add_metric([name, s.value], 1 if state == s.value else 0)
            connects.add_metric([name], n)
        yield states
        yield connects
        faulty = GaugeMetricFamily(
            "floorhand_plc_faulty", "1 while a PLC's health is faulty.", labels=["plc"]
        )
        for pid, plc in sorted(h.plcs.items()):
            faulty.add_metric([pid], 1 if plc.health == "faulty" else 0)
        yield faulty

        alerts = h.alerts
        alert_states = GaugeMetricFamily(
            "floorhand_alerts", "Alert targets by stock state.", labels=["state"]
        )
        for st, n in alerts.by_state.items():
            alert_states.add_metric([st], n)
        yield alert_states
        yield _gauge("floorhand_alerts_active", "Raised alert episodes.", alerts.active)
        yield _gauge(
            "floorhand_alerts_acknowledged",
            "Raised episodes a supervisor acknowledged.",
            alerts.acknowledged,
        )
        yield _gauge(
            "floorhand_alerts_snoozed", "Raised episodes snoozed right now.", alerts.snoozed
        )
        shelf_fam = GaugeMetricFamily("floorhand_shelves", "Shelves by status.", labels=["status"])
        for status, n in h.shelves.items():
            shelf_fam.add_metric([status], n)
        yield shelf_fam

        hist = h.history
        if hist is not None:
            yield _counter(
                "floorhand_history_points_written", "Points confirmed.", hist.points_written
            )
            yield _counter("floorhand_history_batches", "Batches confirmed.", hist.batches)
            yield _counter("floorhand_history_retries", "Failed write attempts.", hist.retries)
            yield _counter(
                "floorhand_history_rejected_requests",
                "Writes the sink refused.",
                hist.rejected_requests,
            )
            yield _counter(
                "floorhand_history_dead_lettered", "Points dead-lettered.", hist.dead_lettered
            )
            yield _counter(
                "floorhand_history_corrupt_rows", "Unconvertible outbox rows.", hist.corrupt_rows
            )
            yield _gauge(
                "floorhand_history_lag_seconds",
                "Age of the newest reading delivered while rows wait.",
                hist.lag_s,
            )
            up = GaugeMetricFamily(
                "floorhand_history_state",
                "1 for the historian's current state.",
                labels=["backend", "state"],
            )
            for st in ("starting", "up", "down"):
                up.add_metric([hist.backend, st], 1 if hist.state == st else 0)
            yield up


class LiveCollector(Collector):
    """The live WebSocket hub's figures (``LiveHub.summary()``) at scrape time."""

    def __init__(self, summary: Callable[[], dict[str, Any]]) -> None:
        self.summary = summary

    def collect(self) -> Iterator[Metric]:
        s = self.summary()
        yield _gauge("floorhand_live_clients", "Connected /api/v1/live clients.", s["clients"])
        yield _gauge("floorhand_live_queued", "Messages queued for live clients.", s["queued"])
        yield _counter("floorhand_live_connections", "Live connections accepted.", s["connections"])
        yield _counter(
            "floorhand_live_dropped",
            "Messages dropped from slow live clients' queues (drop-oldest).",
            s["dropped_total"],
        )
        refused = CounterMetricFamily(
            "floorhand_live_refused", "Live connections refused, by reason.", labels=["reason"]
        )
        for reason, n in sorted(s["refused"].items()):
            refused.add_metric([str(reason)], n)
        yield refused


class BusCollector(Collector):
    """The event bus's counters at scrape time: events published, listener failures."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        bus = self.bus
        yield _counter("floorhand_bus_events", "Events published on the bus.", bus.published)
        errors = CounterMetricFamily(
            "floorhand_bus_listener_errors",
            "Event groups a bus listener raised on (logged once, delivery went on).",
            labels=["listener"],
        )
        for name, n in sorted(bus.listener_errors_by_name.items()):
            errors.add_metric([name], n)
        yield errors


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def install_metrics(app: FastAPI, metrics: ApiMetrics, *, open_access: bool) -> None:
    """Add ``GET /metrics``: engineer token by default, open with ``[api] metrics = "open"``."""
    guard = Depends(public) if open_access else Depends(require(Role.ENGINEER))

    async def scrape(request: Request) -> Response:
        m: ApiMetrics = request.app.state.metrics
        return Response(m.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(
        "/metrics",
        scrape,
        methods=["GET"],
        tags=["metrics"],
        summary="Prometheus metrics",
        dependencies=[guard],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        include_in_schema=True,
    )
