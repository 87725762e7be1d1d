"""Composition root: builds the journal, links and services; one TaskGroup owns every task.

Shutdown is cancellation. Nothing safety-relevant lives in ``finally``: a controller killed with
SIGKILL loses nothing that was acknowledged, because acknowledgement follows the journal commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import gc
import logging
import os
import ssl
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from controller.adapters.influx import InfluxV1Sink, InfluxV2Sink
from controller.adapters.journal import Journal
from controller.adapters.sqlite_history import SqliteHistorySink
from controller.bus import Bus
from controller.catalog.start import is_inline, settle_catalogue, with_catalogue
from controller.config import PlcConfig, SiteConfig
from controller.control import PRECEDENCE, ControlLoop, ControlTask
from controller.domain.events import BusEvent
from controller.owner import OwnerProbe, SiteOwnership
from controller.ports import HistorySink
from controller.services.alerts import AlertService, AlertSettings
from controller.services.history import HistoryService, HistorySettings, Topology
from controller.services.ingest import IngestService, IngestSettings, shelf_specs, subscriptions
from controller.services.picking import PickingService
from controller.services.supervision import (
    RETAIN_OUTBOX_ROWS,
    PlcView,
    ReadGate,
    SupervisionService,
    SupervisionSettings,
    link_state_name,
)
from devices.conveyor import ConveyorDriver
from devices.errors import DeviceError
from devices.link.modbus import DeviceHealth, ModbusLink, ModbusLinkConfig
from devices.link.mqtt import MqttLink, MqttLinkConfig
from devices.link.state import LinkState
from devices.sorter import SorterDriver

log = logging.getLogger("floorhand.runtime")

SAFE_STOP_S = 1.0
"""Bound of the STOP sent to every PLC on shutdown."""

STOP_TASKS_S = 1.5
"""Bound on the tasks' exit after the safe stop. A task still running is cancelled again
(libraries can lose a cancellation: ``asyncio.wait_for`` on Python 3.11), and one still
running at the bound is abandoned and named in the log with its stack."""

RECANCEL_EVERY_S = 0.1

RELEASE_CLAIM_S = 0.3
"""Bound on clearing the owner claim at a clean stop."""

OWNER_GATE_S = 2.0
"""PLC links (and the command session) start once the owner check is over, or after this
long."""

COMMAND_RECEIVE_MAXIMUM = 100
"""Unacknowledged pick commands the broker may send the command session at once."""

_PACKAGES = ("controller", "devices")


def command_topic(site: SiteConfig) -> str:
    """Where floor systems publish pick requests (replies on ``…/result``)."""
    return f"{site.mqtt.topic_prefix}/{site.site.id}/cmd/picks"


COMMAND_CLIENT_SUFFIX = "-picks"
"""The command session's client id is the site's ``[mqtt] client_id`` plus this."""


def command_client_id(site: SiteConfig) -> str:
    """The client id of the pick command session (docs/architecture.md, "Sessions")."""
    return site.mqtt.client_id + COMMAND_CLIENT_SUFFIX


def build_ssl_context(site: SiteConfig) -> ssl.SSLContext | None:
    mqtt = site.mqtt
    if not mqtt.uses_tls:
        return None
    ctx = ssl.create_default_context(cafile=str(mqtt.tls.ca_file) if mqtt.tls.ca_file else None)
    if mqtt.tls.cert_file:
        ctx.load_cert_chain(
            str(mqtt.tls.cert_file), str(mqtt.tls.key_file) if mqtt.tls.key_file else None
        )
    if mqtt.tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def build_history_sink(site: SiteConfig, clock: Callable[[], float] = time.time) -> HistorySink:
    """The sink ``[history] backend`` names (not ``none``)."""
    h = site.history
    if h.backend == "sqlite":
        path = h.sqlite_path or site.journal.path.with_name("history.sqlite")
        return SqliteHistorySink(path, retention_days=h.retention_days, clock=clock)
    assert h.url is not None
    if h.backend == "influxdb2":
        assert h.org is not None
        assert h.bucket is not None
        return InfluxV2Sink(
            h.url,
            h.org,
            h.bucket,
            h.secret(h.token_env),
            timeout_s=h.timeout_s,
            use_gzip=h.gzip,
        )
    if h.backend == "influxdb1":
        assert h.db is not None
        return InfluxV1Sink(
            h.url,
            h.db,
            h.rp,
            username=h.secret(h.username_env),
            password=h.secret(h.password_env),
            token=h.secret(h.token_env),
            timeout_s=h.timeout_s,
            use_gzip=h.gzip,
        )
    raise ValueError(f"no history sink for backend {h.backend!r}")


def build_history(
    site: SiteConfig, journal: Journal, clock: Callable[[], float] = time.time
) -> HistoryService | None:
    h = site.history
    if h.backend == "none":
        return None
    state_path = h.state_path or site.journal.path.with_name(
        site.journal.path.name + ".history-state.json"
    )
    return HistoryService(
        journal,
        build_history_sink(site, clock),
        Topology.from_site(site),
        HistorySettings.from_site(site),
        state_path=state_path,
        clock=clock,
    )


@dataclass(frozen=True, slots=True)
class PlcHandle:
    """One ``[[plcs]]`` entry at run time: its Modbus link and its typed driver."""

    config: PlcConfig
    link: ModbusLink
    driver: ConveyorDriver | SorterDriver

    @property
    def id(self) -> str:
        return self.config.id

    def view(self) -> PlcView:
        """Link state, health and epoch, without I/O."""
        fault = self.link.fault
        return PlcView(
            id=self.config.id,
            kind=self.config.kind,
            endpoint=self.config.endpoint,
            unit=self.config.unit,
            link=link_state_name(self.link.state),
            since_s=time.monotonic() - self.link.watch.since,
            health="faulty" if self.link.health is DeviceHealth.FAULTY else "ok",
            fault=fault.reason if fault is not None else None,
            last_down_reason=self.link.last_down_reason,
            epoch=self.driver.epoch,
            restarts=self.driver.restarts,
            connects=self.link.stats.connects,
            heartbeat=self.config.heartbeat,
        )

    def snapshot(self) -> dict[str, Any]:
        """``view()`` as a dict."""
        return self.view().as_dict()


def build_plc(cfg: PlcConfig) -> PlcHandle:
    """The link and driver of one PLC; nothing is sent until the link's ``run()`` starts, and
    then only the heartbeat and the read-only resync (no belt is started by the runtime)."""
    link = ModbusLink(
        ModbusLinkConfig(
            host=cfg.host,
            port=cfg.port,
            request_timeout_s=cfg.timeout_s,
            liveness_timeout_s=max(1.0, cfg.timeout_s),
        ),
        name=f"modbus:{cfg.id}",
        logger=logging.getLogger(f"floorhand.plc.{cfg.id}"),
    )
    driver_cls = ConveyorDriver if cfg.kind == "conveyor" else SorterDriver
    driver = driver_cls(link, unit=cfg.unit, name=cfg.id)
    if not cfg.heartbeat:
        link.remove_heartbeat(cfg.unit, driver.map["heartbeat"].address)
    return PlcHandle(cfg, link, driver)


class _IngestLink:
    """The MessageLink ingest sees: the MQTT link, with pauses going through the gate."""

    def __init__(self, link: MqttLink, gate: ReadGate) -> None:
        self._link = link
        self._gate = gate

    @property
    def epoch(self) -> int:
        return self._link.connection_number

    def ack(self, packet_ids: Sequence[int], epoch: int | None = None) -> None:
        self._link.ack(packet_ids, epoch)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._link.publish(topic, payload, qos, retain)

    def pause_reading(self) -> None:
        self._gate.hold("journal")

    def resume_reading(self) -> None:
        self._gate.release("journal")


class _InterpreterSetting:
    """A process-wide interpreter setting while runtimes run in this process: of the values
    the running runtimes ask for, the one ``pick`` chooses; the value from before the first is
    restored after the last (a test process runs several runtimes, sometimes at once)."""

    def __init__(
        self,
        get: Callable[[], float],
        put: Callable[[float], None],
        pick: Callable[[list[float]], float],
    ) -> None:
        self._get, self._put, self._pick = get, put, pick
        self._lock = threading.Lock()
        self._asked: list[float] = []
        self._before = 0.0

    def enter(self, value: float) -> None:
        with self._lock:
            if not self._asked:
                self._before = self._get()
            self._asked.append(value)
            self._put(self._pick(self._asked))

    def leave(self, value: float) -> None:
        with self._lock:
            if value in self._asked:
                self._asked.remove(value)
            self._put(self._pick(self._asked) if self._asked else self._before)


def _set_gc_young(objects: float) -> None:
    gc.set_threshold(int(objects), *gc.get_threshold()[1:])


_SWITCH_INTERVAL = _InterpreterSetting(sys.getswitchinterval, sys.setswitchinterval, min)
"""The shortest switch interval any running runtime asks for (``[process] switch_interval_ms``)."""
_PRECEDENCE_PAUSE = _InterpreterSetting(
    lambda: PRECEDENCE.max_pause_s, PRECEDENCE.set_max_pause, min
)
"""The shortest pause for the control loops any running runtime allows (``[process]
control_precedence_ms``; `controller.control.Precedence`)."""
_GC_YOUNG = _InterpreterSetting(lambda: gc.get_threshold()[0], _set_gc_young, max)
"""The largest generation-0 threshold any running runtime asks for (``[process]
gc_young_objects``)."""


_RUNTIME_TASKS: contextvars.ContextVar[weakref.WeakSet[asyncio.Task[Any]] | None] = (
    contextvars.ContextVar("floorhand_runtime_tasks", default=None)
)
"""The tasks of the runtime whose `Runtime.run` this context is in (tasks copy their creator's
context: everything ``run`` starts, and what those start, is in it)."""


class _TaskRecorder:
    """While runtimes run on an event loop, its task factory: a new task created in a runtime's
    context is added to that runtime's set (`_RUNTIME_TASKS`). So a runtime that stops cancels
    again only tasks it started, never those of another runtime on the same loop (a test
    process runs several at once). Python 3.11 cannot tell a task's context afterwards
    (``Task.get_context`` is 3.12), hence the factory. It wraps the loop's previous factory,
    given back when the last runtime on the loop stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[asyncio.AbstractEventLoop, tuple[int, Any]] = {}

    def enter(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            users, previous = self._users.get(loop, (0, None))
            if not users:
                previous = loop.get_task_factory()
                loop.set_task_factory(functools.partial(_record_task, previous))
            self._users[loop] = (users + 1, previous)

    def leave(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            users, previous = self._users.pop(loop, (0, None))
            if users > 1:
                self._users[loop] = (users - 1, previous)
            elif users == 1:
                loop.set_task_factory(previous)


def _record_task(
    previous: Any,
    loop: asyncio.AbstractEventLoop,
    coro: Any,
    *,
    context: contextvars.Context | None = None,
) -> asyncio.Task[Any]:
    if previous is not None:
        task: asyncio.Task[Any] = (
            previous(loop, coro) if context is None else previous(loop, coro, context=context)
        )
    else:
        task = asyncio.Task(coro, loop=loop, context=context)
    tasks = context.get(_RUNTIME_TASKS) if context is not None else _RUNTIME_TASKS.get()
    if tasks is not None:
        tasks.add(task)
    return task


_TASK_RECORDER = _TaskRecorder()


class Runtime:
    def __init__(
        self,
        site: SiteConfig,
        *,
        clock: Callable[[], float] = time.time,
        freeze_heap: bool = False,
    ) -> None:
        self.freeze_heap = freeze_heap
        """Once started, leave every object alive out of Python's cyclic garbage collections
        (`gc.freeze`; `floorhand run` does): at 100k SKUs a full collection walked ~1M objects,
        ~250 ms of a stopped loop each time one ran. They are still freed by reference counting
        when dropped. Off by default: a test process runs many runtimes."""
        # The catalogue: the site file's inline tables, or the journal's (docs/catalogue.md).
        self.catalogue_inline = is_inline(site)
        """The site file declares the catalogue: the API refuses changes (docs/catalogue.md)."""
        site, self.catalogue_version = with_catalogue(site)
        self.site = site
        self.clock = clock
        self.bus = Bus()
        self.journal = Journal(site.journal.path, synchronous=site.journal.synchronous)
        self.specs = shelf_specs(site)
        user, password = site.mqtt.credentials()
        self.owner = SiteOwnership(
            prefix=site.mqtt.topic_prefix,
            site_id=site.site.id,
            client_id=site.mqtt.client_id,
            journal=str(site.journal.path),
            api=site.api.bind,
            keepalive_s=site.mqtt.keepalive_s,
        )
        session = MqttLinkConfig(
            host=site.mqtt.host,
            port=site.mqtt.port,
            client_id=site.mqtt.client_id,
            username=user,
            password=password,
            ssl_context=build_ssl_context(site),
            protocol=site.mqtt.protocol,
            keepalive_s=site.mqtt.keepalive_s,
            session_expiry_s=site.mqtt.session_expiry_s,
            clean_start=False,
            receive_maximum=site.mqtt.receive_maximum,
            subscriptions=subscriptions(site),
            max_packet_bytes=site.mqtt.max_payload_bytes + 1024,
            coalesce_s=site.mqtt.coalesce_ms / 1000,
            coalesce_bytes=site.mqtt.coalesce_bytes,
            coalesce_from_msg_s=site.mqtt.coalesce_from_msg_s,
        )
        self.link = MqttLink(
            self.owner.link_config(session),
            self._on_messages,
            name="mqtt",
            on_oversize=lambda topic, size: self.supervision.on_oversize(topic, size),
            logger=logging.getLogger("floorhand.mqtt"),
        )
        self.owner.attach(self.link)
        self._command_topic = command_topic(site)
        # Pick commands have a session of their own, run by the control loop: reading,
        # answering and acking a command waits behind no ingest group. Persistent like the
        # main one (commands published while the controller is down are queued for it).
        self.command_link = MqttLink(
            dataclasses.replace(
                session,
                client_id=command_client_id(site),
                subscriptions=((self._command_topic, 1),),
                receive_maximum=min(site.mqtt.receive_maximum, COMMAND_RECEIVE_MAXIMUM),
                coalesce_s=0.0,  # a command is answered at once
            ),
            self._on_command_messages,
            name="mqtt:picks",
            logger=logging.getLogger("floorhand.mqtt.picks"),
        )
        self.owner_probe = OwnerProbe(
            session,
            site_id=site.site.id,
            claim_topic=self.owner.claim_topic,
            probe_topic=self.owner.probe_topic,
        )
        self.gate = ReadGate(self.link)
        self.ingest = IngestService(
            IngestSettings.from_site(site),
            self.journal,
            _IngestLink(self.link, self.gate),
            self.bus.publish,
            clock=clock,
            shelf_specs=self.specs,
        )
        self.alerts = AlertService(
            AlertSettings.from_site(site),
            self.journal,
            self.link,
            self.bus.publish,
            self.ingest.states,
            self.specs,
        )
        self.bus.add_listener(self._after_commit)
        self.history = build_history(site, self.journal, clock)
        if self.history is not None:
            # A shelf moved by a live catalogue change: its new rows get the new zone/SKU tags.
            self.bus.add_listener(
                self.history.catalogue_listener(lambda: Topology.from_site(self.site)),
                name="history",
            )
        self.plcs: dict[str, PlcHandle] = {plc.id: build_plc(plc) for plc in site.plcs}
        self.control = ControlLoop(
            "control", realtime_priority=site.process.control_realtime_priority
        )
        self.supervision = SupervisionService(
            SupervisionSettings(
                site_id=site.site.id,
                topic_prefix=site.mqtt.topic_prefix,
                max_outbox_rows=site.journal.max_outbox_rows,
                dead_letter_keep=site.journal.dead_letter_keep,
                keep_outbox_rows=(
                    min(RETAIN_OUTBOX_ROWS, site.journal.max_outbox_rows // 2)
                    if site.history.backend == "none"
                    else None
                ),
            ),
            link=self.link,
            gate=self.gate,
            journal=self.journal,
            ingest=self.ingest,
            alerts=self.alerts,
            history=self.history,
            plcs=self.plcs,
            bus=self.bus,
            publish_events=self.bus.publish,
            clock=clock,
            monotonic=time.monotonic,
            command_link=self.command_link,
            main_loop=PRECEDENCE,
            control_loop=self.control,
        )
        self.link.watch.add_listener(self.supervision.on_link_state)
        self.bus.add_listener(self.supervision.on_events)
        self.supervision.track_shelf_statuses()
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._plcs_go = asyncio.Event()  # of the control loop (bound at its first wait)
        for plc_id, handle in self.plcs.items():
            # The PLC links run on the control loop: their state changes cross to this one.
            handle.link.watch.add_listener(
                self._to_main(self.supervision.plc_state_listener(plc_id))
            )
        self.order_journal = self.journal.second_connection(priority=True)
        self.picking = PickingService(
            site,
            self.order_journal,
            self.ingest.states,
            self.specs,
            conveyors={
                i: h.driver for i, h in self.plcs.items() if isinstance(h.driver, ConveyorDriver)
            },
            sorters={
                i: h.driver for i, h in self.plcs.items() if isinstance(h.driver, SorterDriver)
            },
            publish_bus=self._to_main(self.bus.publish),
            publish_mqtt=self._to_main(self._publish_order_side),
            clock=clock,
            control=self.control,
        )
        self.bus.add_listener(self.picking.on_events)
        self.command_link.watch.add_listener(self._on_command_link_state)
        self._command_link_was_up = False  # of the main loop (`_command_link_up`)
        self._command_early: list[tuple[int, list[Any]]] | None = None  # of the control loop
        self.picking.add_settled_listener(self._release_command_early)
        self.link.watch.add_listener(self._on_main_link_state)
        # Start-up: (link epoch, batch) held from the first pick command on, until the PLC
        # links had their first chance to connect (PickingService.devices_settled).
        self._early: list[tuple[int, list[Any]]] | None = None
        self.commands_on_main_session = 0
        """Pick commands the main session delivered (its broker session of a previous release
        held the command topic's subscription): answered as the command session's are."""
        self.picking.add_settled_listener(self._to_main(self._release_early))

    # -- wiring -----------------------------------------------------------------------------------
    def _to_main(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn`` called from the control loop (or this one): queued on the main loop, in
        order (at once before the runtime runs or on the main loop itself)."""

        def queued(*args: Any) -> None:
            ControlLoop.post_to(self._main_loop, fn, *args)

        return queued

    def _publish_order_side(self, topic: str, body: bytes) -> None:
        """An order state or pick instruction of the desk, published on the main loop."""
        try:
            self.link.publish(topic, body, qos=1)
        except DeviceError as exc:
            log.warning("could not publish on %s: %s", topic, exc)

    def _on_messages(self, msgs: list[Any]) -> None:
        # Pick commands reach the main session only from its broker session of a release
        # before the command session (it held the subscription, and may hold queued
        # commands): answered as before; the subscription is dropped (`_drop_legacy_sub`).
        probe, command = self.owner.probe_topic, self._command_topic
        special = (probe, command)
        if self._early is None and not any(m.topic in special for m in msgs):
            self.ingest.on_messages(msgs)  # the common case: readings only, one scan
            self.supervision.check_outbox_bound()
            return
        probes = [m for m in msgs if m.topic == probe]
        if probes:  # QoS 0: nothing to ack
            self.owner.on_probes(probes)
            msgs = [m for m in msgs if m.topic != probe]
            if not msgs:
                return
        commands = [m for m in msgs if m.topic == command]
        if self._early is not None or (commands and not self.picking.devices_settled.is_set()):
            self._hold_early(msgs)
            return
        if commands:
            self.commands_on_main_session += len(commands)
            if self.commands_on_main_session == len(commands):
                log.info(
                    "pick command(s) on the main session (subscribed by a previous release): "
                    "answered here; the command session takes over"
                )
            self._on_commands(commands)
            msgs = [m for m in msgs if m.topic != command]
        if msgs:
            self.ingest.on_messages(msgs)
        self.supervision.check_outbox_bound()

    def _hold_early(self, msgs: list[Any]) -> None:
        """A pick command queued in the broker session arrived before the PLC links had their
        first chance to connect: it, and everything after it (acks stay in arrival order),
        waits with reading paused, at most picking.DEVICES_FIRST_CHANCE_S."""
        if self._early is None:
            self._early = []
            self.gate.hold("plcs")
            log.info("pick command(s) before the PLC links are up: held until they are")
        self._early.append((self.link.connection_number, msgs))

    def _release_early(self) -> None:
        early, self._early = self._early, None
        for epoch, msgs in early or ():
            if epoch == self.link.connection_number:  # else the broker redelivers them
                self._on_messages(msgs)
        self.gate.release("plcs")

    def _on_commands(self, msgs: list[Any]) -> None:
        """Pick requests on the MQTT command topic: answered on the control loop (never
        behind an ingest group), then each gets a reply on ``…/result`` and is acknowledged
        here (a duplicate delivery is recognised by its channel + order id). The acks wait
        for the answers: a command is acknowledged only once its order is journaled."""
        epoch = self.link.connection_number
        fresh = [m for m in msgs if not m.retain]  # a retained command is stale: never executed

        def answered(replies: list[tuple[int, dict[str, Any]]]) -> None:
            ControlLoop.post_to(self._main_loop, self._commands_answered, epoch, msgs, replies)

        self.picking.answer_commands([m.payload for m in fresh], answered)

    def _commands_answered(
        self, epoch: int, msgs: list[Any], replies: list[tuple[int, dict[str, Any]]]
    ) -> None:
        for status, reply in replies:
            try:
                self.link.publish(
                    f"{self._command_topic}/result",
                    orjson.dumps({"status": status, **reply}),
                    qos=1,
                )
            except DeviceError as exc:
                log.error("could not publish a pick command result: %s", exc)
        self.link.ack([m.packet_id for m in msgs if m.packet_id], epoch)

    # -- the command session (its callbacks run on the control loop) ----------------------------
    def _on_command_messages(self, msgs: list[Any]) -> None:
        """Pick commands on the command session, on the control loop: answered there, each
        reply published and the command acknowledged by that session (after its order is
        journaled: the desk commits before it answers). A command that arrives before the
        PLC links had their first chance to connect waits for them, reading paused."""
        if self._command_early is not None or not self.picking.devices_settled.is_set():
            if self._command_early is None:
                self._command_early = []
                self.command_link.pause_reading()
                log.info("pick command(s) before the PLC links are up: held until they are")
            self._command_early.append((self.command_link.connection_number, msgs))
            return
        self._answer_commands(msgs, self.command_link.connection_number)

    def _release_command_early(self) -> None:
        early, self._command_early = self._command_early, None
        if early is None:
            return
        for epoch, msgs in early:
            if epoch == self.command_link.connection_number:  # else the broker redelivers
                self._answer_commands(msgs, epoch)
        self.command_link.resume_reading()

    def _answer_commands(self, msgs: list[Any], epoch: int) -> None:
        link = self.command_link
        commands = [m for m in msgs if m.topic == self._command_topic and not m.retain]
        for status, reply in (self.picking.on_command(m.payload) for m in commands):
            try:
                link.publish(
                    f"{self._command_topic}/result",
                    orjson.dumps({"status": status, **reply}),
                    qos=1,
                )
            except DeviceError as exc:
                log.error("could not publish a pick command result: %s", exc)
        link.ack([m.packet_id for m in msgs if m.packet_id], epoch)

    def _on_command_link_state(self, old: LinkState, new: LinkState) -> None:
        if new is LinkState.UP:
            ControlLoop.post_to(self._main_loop, self._command_link_up)

    def _command_link_up(self) -> None:
        """On the main loop: the command session holds the subscription now (from its first
        connect on: its broker session keeps it)."""
        if not self._command_link_was_up:
            self._command_link_was_up = True
            self._drop_legacy_sub()

    def _on_main_link_state(self, old: LinkState, new: LinkState) -> None:
        if new is LinkState.UP:
            self._drop_legacy_sub()

    def _drop_legacy_sub(self) -> None:
        """Unsubscribe the main session from the command topic (a session of a previous
        release holds that subscription) once the command session holds it, so that no
        command published meanwhile is lost; at every connect of the main session after
        that (one packet; answered alike when there is nothing to drop)."""
        if self._command_link_was_up and self.link.state is LinkState.UP:
            self.link.unsubscribe([self._command_topic])

    def _after_commit(self, events: list[BusEvent]) -> None:
        self.alerts.on_events(events)
        self.alerts.evaluate_dirty(self.clock())

    # -- supervision's state, for the callers that read it off the runtime -----------------------
    @property
    def started(self) -> asyncio.Event:
        """Set once the journal is open and the state restored."""
        return self.supervision.started

    @property
    def ready(self) -> bool:
        return self.supervision.ready

    @property
    def backpressure(self) -> bool:
        return self.supervision.backpressure

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        started: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        recording = _RUNTIME_TASKS.set(started)
        _TASK_RECORDER.enter(loop)
        try:
            await self._run(t0, started, on_started)
        finally:
            _TASK_RECORDER.leave(loop)
            _RUNTIME_TASKS.reset(recording)

    def _log_control_scheduling(self) -> None:
        """Say once how the control loop's thread is scheduled ([process]
        control_realtime_priority)."""
        c = self.control
        if c.realtime_granted:
            log.info("control loop: SCHED_FIFO priority %d", c.realtime_granted)
        elif c.realtime_refused is not None:
            log.warning(
                "control loop: real-time priority %d refused (%s); it runs with normal "
                "scheduling, so ingest and other processes can delay PLC commands and "
                "heartbeats by a time slice. Allow it (LimitRTPRIO=%d in the systemd unit, "
                "ulimit -r %d) or set [process] control_realtime_priority = 0 to silence this",
                c.realtime_priority, c.realtime_refused, c.realtime_priority, c.realtime_priority,
            )  # fmt: skip

    async def _run(
        self,
        t0: float,
        started: weakref.WeakSet[asyncio.Task[Any]],
        on_started: Callable[[], None] | None,
    ) -> None:
        restored = self.journal.open()
        control: ControlTask | None = None
        try:
            # Shorter waits for the interpreter lock for the control and HTTP threads while
            # ingest holds it ([process] switch_interval_ms); the previous value is restored.
            _SWITCH_INTERVAL.enter(self.site.process.switch_interval_ms / 1000)
            _GC_YOUNG.enter(self.site.process.gc_young_objects)
            _PRECEDENCE_PAUSE.enter(self.site.process.control_precedence_ms / 1000)
            self.catalogue_version = settle_catalogue(
                self.site, self.journal.db, self.catalogue_version, self.clock
            )
            self.order_journal.open_second()
            self.ingest.restore(restored.cursors, restored.shelf_states)
            self.alerts.restore(restored.alert_states)
            log.info(
                "journal %s open: %d device cursor(s), %d shelf state(s), %d alert state(s), "
                "%d outbox row(s)",
                self.site.journal.path,
                len(restored.cursors),
                len(restored.shelf_states),
                len(restored.alert_states),
                restored.outbox_rows,
            )
            self.alerts.tick(self.clock())
            self.alerts.republish_all()
            reconcile = self.picking.restore()
            if reconcile:
                log.info("%d open order(s) to reconcile with their PLCs", len(reconcile))
            self.supervision.mark_started()
            log.info("runtime started in %.0f ms", (time.monotonic() - t0) * 1000)
            if self.freeze_heap:
                gc.freeze()
                log.info(
                    "%d object(s) alive after start left out of cyclic garbage collections",
                    gc.get_freeze_count(),
                )
            # From here on the desk, the executor and the PLC links belong to the control
            # loop (docs/architecture.md, "Two event loops").
            self._main_loop = asyncio.get_running_loop()
            self.control.start()
            self._log_control_scheduling()
            control = self.control.spawn(self._run_control(reconcile), name="control-main")
            if on_started is not None:
                on_started()
            tasks = asyncio.create_task(self._run_tasks(control), name="runtime-tasks")
            try:
                await asyncio.shield(tasks)
            except asyncio.CancelledError:
                # Shutdown: stop the belts while the links still run, then stop everything.
                await self.safe_stop()
                await self.owner.release(RELEASE_CLAIM_S)
                # The control loop stops its tasks (the same bound) while this one does.
                control.cancel()
                stop_by = time.monotonic() + STOP_TASKS_S + 0.1
                await self._stop_tasks(tasks, lambda: list(started))
                if not await control.wait(stop_by - time.monotonic()):
                    log.error("the control loop's tasks did not end within %.1f s", STOP_TASKS_S)
                raise
            except BaseException:
                control.cancel()
                await control.wait(STOP_TASKS_S + 0.1)
                raise
        finally:
            _SWITCH_INTERVAL.leave(self.site.process.switch_interval_ms / 1000)
            _GC_YOUNG.leave(self.site.process.gc_young_objects)
            _PRECEDENCE_PAUSE.leave(self.site.process.control_precedence_ms / 1000)
            stopped = self.control.close(timeout_s=0.5)
            self._main_loop = None
            self.ingest.close()
            if stopped:
                self.order_journal.close()  # else its thread may still use it: left open
            self.journal.close()

    async def _stop_tasks(
        self, tasks: asyncio.Task[None], started: Callable[[], Iterable[asyncio.Task[Any]]]
    ) -> None:
        """Cancel the runtime's tasks and wait for them, at most STOP_TASKS_S. The runtime's
        tasks and their helpers (``started``: the tasks this runtime started, not another
        runtime's on the same loop; those whose coroutine is Floorhand code) still running
        are cancelled again every RECANCEL_EVERY_S: a cancellation lost inside a library must
        not hold up the stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TASKS_S
        me = asyncio.current_task()

        def running() -> list[asyncio.Task[Any]]:
            return [t for t in started() if t is not me and not t.done() and _is_ours(t)]

        tasks.cancel()
        while not tasks.done():
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait({tasks}, timeout=min(RECANCEL_EVERY_S, left))
            for task in running():
                task.cancel()
        if not tasks.done():
            stuck = running()
            log.error(
                "%d task(s) still running %.1f s after the stop, abandoned: %s",
                len(stuck),
                STOP_TASKS_S,
                "; ".join(f"{t.get_name()} at {_where(t)}" for t in stuck),
            )
            return
        if not tasks.cancelled() and tasks.exception() is not None:
            log.error("a runtime task failed while stopping: %s", tasks.exception())

    async def safe_stop(self) -> None:
        """STOP every belt through the priority lane, bounded by SAFE_STOP_S (the PLCs'
        watchdog stops them anyway once the heartbeat ends). On the control loop, where the
        drivers live; bounded here too, in case that loop does not answer."""
        try:
            async with asyncio.timeout(SAFE_STOP_S + 0.1):
                await self.control.call_async(self._safe_stop)
        except TimeoutError:
            log.error("safe stop: the control loop did not answer within %.1f s", SAFE_STOP_S)

    async def _safe_stop(self) -> None:
        drivers = [h.driver for h in self.plcs.values() if h.link.state is LinkState.UP]
        if not drivers:
            return

        async def stop(driver: ConveyorDriver | SorterDriver) -> None:
            try:
                await driver.stop()
            except DeviceError as exc:
                log.warning("safe stop of %s failed: %s", driver.name, exc)

        try:
            async with asyncio.timeout(SAFE_STOP_S):
                await asyncio.gather(*(stop(d) for d in drivers))
            log.info("safe stop: %d PLC(s) stopped", len(drivers))
        except TimeoutError:
            log.error("safe stop did not finish within %.1f s", SAFE_STOP_S)

    async def _run_tasks(self, control: ControlTask) -> None:
        """Every long-lived task of the main loop, in one group, plus the watch of the
        control loop's group: one failing stops the runtime."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._run_session(), name="mqtt-link")
            tg.create_task(self.supervision.run(), name="supervision")
            if self.history is not None:
                tg.create_task(self.history.run(), name="history")
            tg.create_task(self._open_plc_gate(), name="plc-gate")
            tg.create_task(self._watch_control(control), name="control")

    async def _watch_control(self, control: ControlTask) -> None:
        """Ends (or raises) when the control loop's group does: its failure is the runtime's."""
        await control.result()

    async def _run_control(self, reconcile: Sequence[Any]) -> None:
        """On the control loop: the PLC links and picking, in one group; cancelled, its
        tasks are stopped as the main loop's are (`_stop_tasks`, bounded)."""
        # The control loop is this runtime's alone: every task started on it since is its.
        older = asyncio.all_tasks()
        tasks = asyncio.create_task(self._run_control_tasks(reconcile), name="control-tasks")
        try:
            await asyncio.shield(tasks)
        except asyncio.CancelledError:
            await self._stop_tasks(tasks, lambda: asyncio.all_tasks() - older)
            raise

    async def _run_control_tasks(self, reconcile: Sequence[Any]) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.picking.run(reconcile), name="picking")
            tg.create_task(self._run_command_session(), name="mqtt:picks")
            for plc_id, plc in self.plcs.items():
                tg.create_task(self._run_plc(plc), name=f"modbus:{plc_id}")

    async def _open_plc_gate(self) -> None:
        """Let the PLC links start once the owner check is over (a refused instance never
        touches the owner's PLCs), or after OWNER_GATE_S if the broker is slow to answer."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OWNER_GATE_S):
                await self.owner.checked.wait()
        self.control.post(self._plcs_go.set)

    async def _run_session(self) -> None:
        """The site's MQTT session, connected only once no live controller owns the site
        (docs/architecture.md, "One owner per site")."""
        await self.owner.check_before_connecting(self.owner_probe, self.link.config.backoff_max_s)
        await self.link.run()

    async def _run_command_session(self) -> None:
        """The pick command session (on the control loop), started with the PLC links: a
        controller refused by the owner check never takes the owner's commands."""
        await self._plcs_go.wait()
        await self.command_link.run()

    async def _run_plc(self, plc: PlcHandle) -> None:
        """A PLC link (on the control loop), started once `_open_plc_gate` says so."""
        await self._plcs_go.wait()
        await plc.link.run()

    def snapshot(self) -> dict[str, Any]:
        """Health figures for logs (the API renders ``supervision.report()``)."""
        report = self.supervision.report()
        return {
            "ready": report.ready,
            "link": report.mqtt.state,
            "outbox_rows": report.ingest.outbox_rows,
            "backpressure": report.ingest.backpressure,
            "history": report.history.as_dict() if report.history is not None else None,
            "plcs": {pid: plc.link for pid, plc in report.plcs.items()},
        }


_OUR_CODE = tuple(str(Path(__file__).resolve().parents[1] / pkg) + os.sep for pkg in _PACKAGES)


def _is_ours(task: asyncio.Task[Any]) -> bool:
    """Whether the task runs Floorhand code (not a simulator, test or server task)."""
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.startswith(_OUR_CODE)


def _where(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended: its innermost frame."""
    frames = task.get_stack()
    if not frames:
        return "?"
    code = frames[-1].f_code
    return f"{code.co_filename}:{frames[-1].f_lineno} {code.co_name}"
