"""Ingest: MQTT messages → validated readings → journal commit → broker ack → stock events.

``on_messages`` is called synchronously by the MQTT link with every message read in one socket
chunk. The whole group is validated, applied to the in-memory shelf states, and committed to the
journal in ONE transaction (readings, dead letters, cursors, shelf states, events); only after
the commit are the messages acknowledged and the events published. If the commit fails the
in-memory changes of the group are rolled back, nothing is acknowledged, reading from the broker
is paused, and the same group is retried with backoff: the broker's in-flight window is the
backpressure, nothing is dropped.

A group that is all the common case (valid native readings of known scales, each next in its
device's sequence) is checked and applied in columns (`IngestService._in_columns`,
`ShelfTable.apply_group`); any other group goes reading by reading (`_handle`). Both give the
same journal rows, states, cursors and events in the same order (a property test holds them
to it).

Calibration at run time (``set_tare``, ``calibrate``, ``clear_calibration``; engineers through
the API) replaces a shelf's spec with the site file's spec plus an override, recounts the shelf
and commits the override, the shelf state and the events in one transaction (the journal's
``shelf_calibrations``); ``restore`` applies saved overrides before the shelf states. A scale
factor multiplies the channel's raw grams before they reach the shelf, and the outbox stores the
corrected grams.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import logging
import operator
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import orjson

from controller.config import ScaleConfig, SiteConfig
from controller.domain.calibration import (
    ShelfCalibration,
    calibrated_spec,
    recalibrate,
    settled_gross_g,
)
from controller.domain.events import (
    BusEvent,
    CalibrationValues,
    Event,
    SeqGap,
    SeqGapFilled,
    ShelfCalibrated,
)
from controller.domain.model import ShelfSpec
from controller.domain.shelf_table import RowsSnapshot
from controller.domain.stock import ShelfSnapshot, ShelfState, ShelfStates
from controller.ports import (
    Backoff,
    CalibrationStore,
    Cursor,
    DeadLetter,
    DeviceStatusChanged,
    EventRow,
    InboundMessage,
    JournalError,
    JournalUnavailable,
    MessageLink,
    ReadingColumns,
    ReadingFields,
    ReadingRow,
    ReadingStore,
)
from devices.shelf_scale import (
    MAX_BATCH,
    RawReading,
    Rejected,
    esphome_state_topic,
    esphome_status_topic,
    native_filter,
    native_topic,
    parse_esphome_state,
    parse_esphome_status,
    parse_native,
)

log = logging.getLogger("floorhand.ingest")

MAX_HOLES: Final = 256
"""Open gaps (ranges of sequence numbers that never arrived) remembered per device. Beyond this
the oldest range is forgotten: its readings stay counted missing, and one that still arrives
is recognised through the journal's outbox instead of the cursor."""

_NATIVE, _ESP_STATE, _ESP_STATUS = 0, 1, 2

_topic = operator.attrgetter("topic")
_payload = operator.attrgetter("payload")
_retain = operator.attrgetter("retain")
_kind = operator.attrgetter("kind")
_scale = operator.attrgetter("scale")
_device_field = operator.itemgetter("device")
_seq_field = operator.itemgetter("seq")
_ts_field = operator.itemgetter("ts")
_grams_field = operator.itemgetter("grams")
_id = operator.attrgetter("id")
_channels = operator.attrgetter("channels")
_max_weight = operator.attrgetter("max_weight_g")
_first_item = operator.itemgetter(0)
_second = operator.itemgetter(1)
"""The column path's C-level field readers (`IngestService._in_columns`)."""
_NO_CURSOR: Final = (0, -1)
"""(epoch, seq) compared for a device without a cursor (its result is not used)."""

# Per-reading rows built with tuple.__new__ straight: a NamedTuple's own __new__ is a Python
# function (a frame per call); these are C calls. The argument is the fields' tuple, in order.
_cursor: Callable[[tuple[Any, ...]], Cursor] = functools.partial(tuple.__new__, Cursor)
_row: Callable[[tuple[Any, ...]], ReadingRow] = functools.partial(tuple.__new__, ReadingRow)


@dataclass(frozen=True, slots=True)
class Route:
    kind: int
    scale: ScaleConfig
    channel: int = 0


@dataclass(slots=True)
class DeviceInfo:
    """What the API shows per scale."""

    scale_id: str
    zone: str
    format: str
    last_seen_s: float | None = None
    """Receive time of the newest reading (a late one does not move it)."""
    online: bool | None = None
    gaps: int = 0
    """Sequence gaps seen (a gap filled later by late readings stays counted)."""
    missing_readings: int = 0
    """Readings those gaps left missing that have not arrived since (late arrivals subtract)."""


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """What ingest needs of the site: the scales it serves and the rules for their messages."""

    site_id: str
    topic_prefix: str
    max_payload_bytes: int
    max_clock_skew_s: float
    scales: tuple[ScaleConfig, ...]

    @classmethod
    def from_site(cls, site: SiteConfig) -> IngestSettings:
        return cls(
            site_id=site.site.id,
            topic_prefix=site.mqtt.topic_prefix,
            max_payload_bytes=site.mqtt.max_payload_bytes,
            max_clock_skew_s=site.site.max_clock_skew_s,
            scales=tuple(site.scales),
        )


_UsedChannel = tuple[int, int, str, ShelfSpec, float]
"""(channel, table row, shelf id, spec, scale factor) of a scale channel that feeds a shelf."""

COLUMNS_MIN_BYTES: Final = 4096
"""Payload bytes from which a group is tried in columns (`IngestService._in_columns`): its
fixed cost (some 150 array operations, ~1 ms a group on the 2-CPU development machine) pays
off from about 64 single-reading messages (measured in-process: 32 messages 42 against 31 µs
each reading by reading, 64 messages even); smaller groups go reading by reading."""


class IngestService:
    columns_min_bytes: int = COLUMNS_MIN_BYTES
    """`COLUMNS_MIN_BYTES` (tests set it to 0 to take the column path with small groups)."""

    def __init__(
        self,
        settings: IngestSettings,
        journal: ReadingStore,
        link: MessageLink,
        publish_events: Callable[[list[BusEvent]], None],
        *,
        clock: Callable[[], float] = time.time,
        shelf_specs: dict[str, ShelfSpec],
    ) -> None:
        self.settings = settings
        self._journal = journal
        self._link = link
        self._publish_events = publish_events
        self._clock = clock
        self._max_payload = settings.max_payload_bytes
        self._max_skew_s = settings.max_clock_skew_s
        self.specs = shelf_specs
        self.base_specs: dict[str, ShelfSpec] = dict(shelf_specs)
        """The site file's specs; ``specs`` holds them with the calibration overrides applied."""
        self.calibrations: dict[str, ShelfCalibration] = {}
        self._gains: dict[tuple[str, int], float] = {}
        """Scale factors other than 1, by (scale, channel)."""
        self.states = ShelfStates(self.specs)
        """Every shelf's state, in the columns of ``states.table`` (a row per shelf)."""
        self._table = self.states.table
        self._by_channel: dict[tuple[str, int], ShelfSpec] = {
            (s.scale_id, s.channel): s for s in shelf_specs.values()
        }
        self._channel_map: dict[str, tuple[_UsedChannel, ...]] = {}
        """Per scale, its channels that feed a shelf, as the column path looks them up
        (`_used_channels`); emptied by every change of specs, gains, shelves or scales."""
        self.cursors: dict[str, Cursor] = {}
        self.devices: dict[str, DeviceInfo] = {
            sc.id: DeviceInfo(sc.id, sc.zone, sc.format) for sc in settings.scales
        }
        self.routes: dict[str, Route] = _routes(settings, settings.scales)
        prefix, site_id = settings.topic_prefix, settings.site_id
        self._native_prefix = f"{prefix}/{site_id}/"
        self.rejected: Counter[str] = Counter()
        self.messages = 0
        self.readings = 0
        self.late_readings = 0
        """Readings accepted after a newer one of their device (journaled, not applied)."""
        self.ignored_retained = 0
        self.commits = 0
        self.commit_failures = 0
        self._retry: list[InboundMessage] = []
        self._retry_epoch = 0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_backoff = commit_retry_backoff()
        self._paused_by_failure = False
        self.last_commit_error: str | None = None
        self._logged: set[tuple[str, str]] = set()
        self.stale_checks = 0
        """Shelves the staleness tick has examined one by one: only those whose time ran out
        (the rest is one vectorised comparison over the table's columns)."""

    # -- restart -----------------------------------------------------------------------------
    def restore(self, cursors: dict[str, Cursor], shelf_states: dict[str, dict[str, Any]]) -> None:
        self._channel_map.clear()
        if isinstance(self._journal, CalibrationStore):
            self._restore_calibrations(self._journal.shelf_calibrations())
        self.cursors.update(cursors)
        for sid, body in shelf_states.items():
            spec = self.specs.get(sid)
            if spec is None:
                log.warning("journal has state for shelf %s, which the site no longer has", sid)
                continue
            try:
                self.states[sid].load(body, spec)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("discarding unreadable saved state of shelf %s: %s", sid, exc)
        for device, cur in cursors.items():
            info = self.devices.get(device)
            if info is not None:
                info.last_seen_s = cur.ts_s
                info.gaps = cur.gaps
                info.missing_readings = cur.missing

    # -- the hot path ---------------------------------------------------------------------------
    def on_messages(self, msgs: Sequence[InboundMessage]) -> None:
        epoch = self._link.epoch
        if self._retry:
            # A failed group is waiting for its retry: keep arrival order, commit together.
            if epoch != self._retry_epoch:
                # Reconnected meanwhile: the broker redelivers the old connection's unacked
                # messages itself (the cursors recognise any we commit twice).
                self._retry_epoch = epoch
            self._retry.extend(msgs)
            return
        self._process(msgs, epoch)

    def _process(self, msgs: Sequence[InboundMessage], epoch: int) -> None:
        now = self._clock()
        batch = _Batch()
        try:
            if not self._in_columns(msgs, now, batch):
                for msg in msgs:
                    self._handle(msg, now, batch)  # may ask the journal (has_reading)
            if batch.filled:
                self._fill_events(batch)
            self._journal.commit(
                batch.rows if batch.columns is None else batch.columns,
                batch.dead,
                {d: self.cursors[d] for d in batch.old_cursors},
                self.states.to_dicts(batch.shelves or batch.old_states),
                batch.events,
            )
        except JournalUnavailable as exc:
            self._rollback(batch)
            self.commit_failures += 1
            self.last_commit_error = str(exc)
            if not self._retry:
                log.error(
                    "journal commit failed, holding %d message(s) unacked: %s", len(msgs), exc
                )
            self._retry = list(msgs)
            self._retry_epoch = epoch
            self._schedule_retry()
            return
        except BaseException:
            # A bug, not an outage: memory goes back to what the journal holds and the error
            # reaches the link, which acks nothing of the group and reconnects (redelivery).
            self._rollback(batch)
            raise
        self.commits += 1
        self.messages += len(msgs)
        self.readings += len(batch.rows) + (0 if batch.columns is None else len(batch.columns))
        for reason in batch.reasons:
            self.rejected[reason] += 1
        for dead in batch.dead:
            key = (dead.reason, dead.topic)
            if key not in self._logged and len(self._logged) < 10_000:
                # Bad input is logged once per reason and topic; after that it is only counted.
                self._logged.add(key)
                log.warning("rejected %s on %s: %s", dead.reason, dead.topic, dead.detail)
        self.late_readings += batch.late
        for device, last_seq, seq in batch.gaps:
            log.warning(
                "scale %s: %d reading(s) missing upstream (seq %d → %d)",
                device,
                seq - last_seq - 1,
                last_seq,
                seq,
            )
        for (device, _epoch), (n, first, last, _ts) in batch.filled.items():
            log.info(
                "scale %s: %d late reading(s) arrived (seq %d … %d), %d still missing",
                device,
                n,
                first,
                last,
                self.cursors[device].missing,
            )
        for device in batch.old_cursors:
            info = self.devices.get(device)
            cur = self.cursors.get(device)
            if info is not None and cur is not None:
                info.gaps = cur.gaps
                info.missing_readings = cur.missing
        for device, info_delta in batch.seen.items():
            info = self.devices.get(device)
            if info is not None:
                info.last_seen_s = info_delta
        ids = [m.packet_id for m in msgs if m.packet_id]
        if ids:
            # Acks for packet ids of an earlier connection are ignored by the link (epoch).
            self._link.ack(ids, epoch)
        if batch.bus_events:
            self._publish_events(batch.bus_events)

    def _in_columns(self, msgs: Sequence[InboundMessage], now: float, batch: _Batch) -> bool:
        """The group's common case, in columns: native readings of known scales, every one
        valid and next in its device's sequence. The checks run over the group's columns (a
        few C-level passes and array comparisons instead of a Python frame per reading), the
        shelves are applied together (`ShelfTable.apply_group`) and each device's cursor moves
        once. False, with nothing changed, when anything in the group is not that (bad input,
        a gap, a late or duplicate reading, a restart, a device without a cursor, an ESPHome
        message): the group then goes reading by reading (`_handle`), whose rules these
        checks are (test_a_group_in_columns_is_journaled_and_published_as_reading_by_reading).
        """
        payloads = list(map(_payload, msgs))
        if sum(map(len, payloads)) < self.columns_min_bytes:
            return False
        routes = list(map(self.routes.get, map(_topic, msgs)))
        # Types compared, not values: ``None in routes`` would call Route.__eq__ per item.
        if set(map(type, routes)) != {Route} or True in map(_retain, msgs):
            return False
        if max(map(len, payloads)) > self._max_payload or set(map(_kind, routes)) != {_NATIVE}:
            return False
        try:
            docs = list(map(orjson.loads, payloads))
        except orjson.JSONDecodeError:
            return False
        scales: list[ScaleConfig] = list(map(_scale, routes))  # per message
        counts: list[int] | None = None  # readings per message (None: one each)
        kinds = set(map(type, docs))
        if kinds != {dict}:
            if kinds - {dict, list}:
                return False
            items: list[Any] = []
            counts = []
            for doc in docs:
                if type(doc) is dict:
                    items.append(doc)
                    counts.append(1)
                elif 0 < len(doc) <= MAX_BATCH:
                    items.extend(doc)
                    counts.append(len(doc))
                else:
                    return False
            if set(map(type, items)) != {dict}:
                return False
            docs = items
        try:
            devices = list(map(_device_field, docs))
            seqs = list(map(_seq_field, docs))
            ts_field = list(map(_ts_field, docs))
            grams_field = list(map(_grams_field, docs))
        except KeyError:
            return False
        # Each reading's device must be the scale of its message's topic (so the scale's
        # limits are the device's): one list comparison, which also makes every device a str.
        topic_ids = list(map(_id, scales))
        if devices != (
            topic_ids
            if counts is None
            else list(itertools.chain.from_iterable(map(itertools.repeat, topic_ids, counts)))
        ):
            return False
        four = set(map(len, docs)) == {4}  # the four fields only: no "ch", no "epoch"
        if four:
            channels: list[Any] = []
            epochs: list[Any] = channels
        else:
            channels = [d.get("ch", 0) for d in docs]
            epochs = [d.get("epoch", 0) for d in docs]
        if (
            set(map(type, seqs)) != {int}
            or not set(map(type, channels)) <= {int}
            or not set(map(type, epochs)) <= {int}
            or not set(map(type, ts_field)) <= {float, int}
            or not set(map(type, grams_field)) <= {float, int}
        ):
            return False
        try:
            seq_a = np.array(seqs, dtype=np.int64)
            if four:
                channel_a = np.zeros(len(docs), dtype=np.int64)
                epoch_a = np.zeros(len(docs), dtype=np.int64)
            else:
                channel_a = np.array(channels, dtype=np.int64)
                epoch_a = np.array(epochs, dtype=np.int64)
            ts_a = np.array(ts_field, dtype=np.float64)
            grams_a = np.array(grams_field, dtype=np.float64)
        except OverflowError:
            return False
        # Devices by code, in their order of first appearance.
        names = list(dict.fromkeys(topic_ids))
        code = dict(zip(names, range(len(names)), strict=True))
        codes = np.array(list(map(code.__getitem__, topic_ids)), dtype=np.intp)
        if counts is not None:
            codes = np.repeat(codes, counts)
        scale_of = dict(zip(topic_ids, scales, strict=True))
        device_scales = list(map(scale_of.__getitem__, names))
        if max(map(len, names)) > 64:  # (a device name the payload rules refuse)
            return False
        if not (
            np.isfinite(ts_a).all()
            and np.isfinite(grams_a).all()
            and seq_a.min() >= 0
            and channel_a.min() >= 0
            and epoch_a.min() >= 0
            and ts_a.min() > 0
            and ts_a.max() <= now + self._max_skew_s
            and grams_a.min() >= 0
            and (channel_a < np.array(list(map(_channels, device_scales)))[codes]).all()
            and (grams_a <= np.array(list(map(_max_weight, device_scales)))[codes]).all()
        ):
            return False
        # Every device's readings next in its sequence, in its current epoch; a device without
        # a cursor starts one at its first reading of the group (as `_accept` does).
        cursors = self.cursors
        olds = list(map(cursors.get, names))
        fresh = None in olds
        order = np.argsort(codes, kind="stable")
        seq_s, epoch_s = seq_a[order], epoch_a[order]
        n = len(order)
        starts = np.searchsorted(codes[order], np.arange(len(names)))
        following = np.ones(n, dtype=np.bool_)
        following[starts] = False
        known: list[Any] = [_NO_CURSOR if c is None else c for c in olds] if fresh else olds
        first_ok = (seq_s[starts] == np.array(list(map(_second, known))) + 1) & (
            epoch_s[starts] == np.array(list(map(_first_item, known)))
        )
        if fresh:
            first_ok |= np.array([c is None for c in olds])
        if not (
            (np.diff(seq_s) == 1)[following[1:]].all()
            and (np.diff(epoch_s) == 0)[following[1:]].all()
            and first_ok.all()
        ):
            return False

        # Valid, in sequence: apply.
        ends = np.empty_like(starts)
        ends[:-1] = starts[1:] - 1
        ends[-1] = n - 1
        newest = ts_a[order][ends].tolist()
        last_seq = seq_s[ends].tolist()
        # The group's batch is new (nothing went reading by reading before): every cursor's
        # state before the group is the one to roll back to.
        batch.old_cursors.update(zip(names, olds, strict=True))
        batch.seen.update(dict.fromkeys(names, now))
        if fresh:
            first_seq = seq_s[starts].tolist()
            first_epoch = epoch_s[starts].tolist()
            per_device = (ends - starts + 1).tolist()  # each device's readings in the group
            for i, cur in enumerate(olds):
                if cur is None:
                    cursors[names[i]] = _cursor(
                        (
                            first_epoch[i],
                            last_seq[i],
                            newest[i],
                            per_device[i],
                            first_seq[i],
                            (),
                            0,
                            0,
                        )
                    )
        for device, cur, seq, ts_s in zip(names, olds, last_seq, newest, strict=True):
            if cur is None:
                continue
            c_epoch, c_seq, _ts, applied, floor, holes, gaps, missing = cur
            cursors[device] = _cursor(
                (c_epoch, seq, ts_s, applied + seq - c_seq, floor, holes, gaps, missing)
            )
        # Each (device, channel)'s shelf row (-1: an unused channel), looked up per device.
        width = int(channel_a.max()) + 1
        channel_map = self._channel_map
        at_device: list[int] = []
        at_channel: list[int] = []
        at_row: list[int] = []
        gains: list[float] = []
        specs: dict[int, ShelfSpec] = {}
        shelf_names: list[str] = []
        for i, (name, sc) in enumerate(zip(names, device_scales, strict=True)):
            feeding = channel_map.get(name)
            if feeding is None:
                feeding = channel_map[name] = self._used_channels(name, sc)
            for ch, row, shelf_id, spec, gain in feeding:
                if ch < width:
                    at_device.append(i)
                    at_channel.append(ch)
                    at_row.append(row)
                    gains.append(gain)
                    specs[row] = spec
                    shelf_names.append(shelf_id)
        lut = np.full((len(names), width), -1, dtype=np.intp)
        shelf_lut = np.zeros((len(names), width), dtype=np.int32)  # index into shelf_names
        lut[at_device, at_channel] = at_row
        shelf_lut[at_device, at_channel] = np.arange(len(at_row), dtype=np.int32)
        gain_lut = None
        if self._gains:
            gain_lut = np.ones((len(names), width))
            gain_lut[at_device, at_channel] = gains
        rows = lut[codes, channel_a]
        shelf = shelf_lut[codes, channel_a]
        if gain_lut is not None:
            grams_a = grams_a * gain_lut[codes, channel_a]
        used = rows >= 0
        if not used.all():  # unused channels: valid, they feed no shelf
            rows, shelf, codes, channel_a, epoch_a = (
                rows[used],
                shelf[used],
                codes[used],
                channel_a[used],
                epoch_a[used],
            )
            seq_a, ts_a, grams_a = seq_a[used], ts_a[used], grams_a[used]
        if not len(rows):
            return True
        events, saved = self._table.apply_group(rows, ts_a, grams_a, specs, now)
        batch.saved_rows = saved
        touched = np.zeros(len(shelf_names), dtype=np.bool_)
        touched[shelf] = True
        batch.shelves.extend(map(shelf_names.__getitem__, np.flatnonzero(touched).tolist()))
        if events:
            batch.bus_events.extend(events)
            batch.events.extend(EventRow(ev.ts_s, ev.kind, ev.as_dict()) for ev in events)
        batch.columns = ReadingColumns(
            names,
            shelf_names,
            codes.astype(np.int32),
            shelf,
            channel_a,
            epoch_a,
            seq_a,
            ts_a,
            grams_a,
            float(ts_a.min()),
            float(ts_a.max()),
        )
        return True

    def _used_channels(self, device: str, scale: ScaleConfig) -> tuple[_UsedChannel, ...]:
        """The channels of ``device`` that feed a shelf: (channel, table row, shelf id, spec,
        scale factor) each, as `_accept` looks them up reading by reading."""
        out = []
        for ch in range(scale.channels):
            spec = self._by_channel.get((device, ch))
            if spec is not None:
                row = self._table.rows[spec.shelf_id]
                out.append((ch, row, spec.shelf_id, spec, self._gains.get((device, ch), 1.0)))
        return tuple(out)

    def _handle(self, msg: InboundMessage, now: float, batch: _Batch) -> None:
        route = self.routes.get(msg.topic)
        if msg.retain and (route is None or route.kind == _ESP_STATE):
            # Retained copies are last-known values of unknown age, not fresh readings (ESPHome
            # retains its states); and some brokers hand out retained messages of topics we
            # never subscribed to (amqtt). Neither is bad input: counted, not applied.
            self.ignored_retained += 1
            return
        if route is None:
            if msg.topic.startswith(self._native_prefix) and "/scale/" in msg.topic:
                self._reject(batch, msg, "unknown_device", "no scale with this topic in the site")
            else:
                self._reject(batch, msg, "bad_topic", "topic not handled")
            return
        if len(msg.payload) > self._max_payload:
            self._reject(batch, msg, "oversize", f"{len(msg.payload)} bytes")
            return
        scale = route.scale
        if route.kind == _NATIVE:
            parsed = parse_native(msg.payload)
            if isinstance(parsed, Rejected):
                self._reject(batch, msg, parsed.reason, parsed.detail)
                return
            single = len(parsed) == 1
            for item in parsed:
                if isinstance(item, Rejected):
                    self._reject(
                        batch, msg, item.reason, item.detail, element=None if single else item
                    )
                    continue
                problem = self._accept(scale, item, now, batch)
                if problem is not None:
                    self._reject(
                        batch, msg, problem[0], problem[1], element=None if single else item
                    )
        elif route.kind == _ESP_STATE:
            value = parse_esphome_state(msg.payload)
            if isinstance(value, Rejected):
                self._reject(batch, msg, value.reason, value.detail)
                return
            cur = self.cursors.get(scale.id)
            seq = cur.seq + 1 if cur is not None else 0
            reading = RawReading(scale.id, route.channel, 0, seq, now, value)
            problem = self._accept(scale, reading, now, batch)
            if problem is not None:
                self._reject(batch, msg, problem[0], problem[1])
        else:
            status = parse_esphome_status(msg.payload)
            if isinstance(status, Rejected):
                self._reject(batch, msg, status.reason, status.detail)
                return
            info = self.devices[scale.id]
            if info.online is not status:
                log.info("scale %s %s", scale.id, "online" if status else "offline")
                batch.event(DeviceStatusChanged(now, scale.id, status))
            info.online = status

    def _accept(
        self, scale: ScaleConfig, r: RawReading, now: float, batch: _Batch
    ) -> tuple[str, str] | None:
        """Validate one reading against the site and its device's sequence; apply it."""
        device, channel, epoch, seq, ts_s, weight_g = r
        if device != scale.id:
            return "device_mismatch", f"payload device {device!r} on the topic of {scale.id!r}"
        if channel >= scale.channels:
            return "unknown_device", f"channel {channel} of a {scale.channels}-channel scale"
        if weight_g < 0:
            return "negative", f"{weight_g} g"
        if weight_g > scale.max_weight_g:
            return "over_range", f"{weight_g} g > max_weight_g {scale.max_weight_g}"
        if ts_s > now + self._max_skew_s:
            return "ts_future", f"ts {ts_s:.3f} is {ts_s - now:.0f} s ahead of the controller"
        cursors = self.cursors
        cur = cursors.get(device)
        if cur is None:
            new = _cursor((epoch, seq, ts_s, 1, seq, (), 0, 0))
        else:
            c_epoch, c_seq, _ts, applied, floor, holes, gaps, missing = cur
            if epoch == c_epoch and seq > c_seq:
                if seq - c_seq > 1:
                    new = self._gap(batch, device, cur, seq, ts_s)
                else:
                    new = _cursor((c_epoch, seq, ts_s, applied + 1, floor, holes, gaps, missing))
            elif epoch > c_epoch:
                new = _cursor((epoch, seq, ts_s, applied + 1, seq, (), gaps, missing))
                log.info("scale %s restarted (epoch %d → %d)", device, c_epoch, epoch)
            else:
                return self._late(r, cur, batch)
        old_cursors = batch.old_cursors
        if device not in old_cursors:
            old_cursors[device] = cur
        cursors[device] = new
        batch.seen[device] = now
        spec = self._by_channel.get((device, channel))
        if spec is None:
            return None  # an unused channel: the reading is valid but feeds no shelf
        sid = spec.shelf_id
        table = self._table
        row = table.rows[sid]
        old_states = batch.old_states
        if sid not in old_states:
            old_states[sid] = table.snapshot(row)  # for rollback: apply mutates in place
        if self._gains:
            gain = self._gains.get((device, channel))
            if gain is not None:
                weight_g *= gain
        events = table.apply(row, spec, ts_s, weight_g, now)
        batch.rows.append(_row((device, channel, epoch, seq, ts_s, weight_g, sid)))
        if events:
            batch.bus_events.extend(events)
            for ev in events:
                batch.events.append(EventRow(ts_s, ev.kind, ev.as_dict()))
        return None

    def _late(self, r: RawReading, cur: Cursor, batch: _Batch) -> tuple[str, str] | None:
        """A reading older than the device's newest (a publisher's backlog sent after newer
        readings, a previous boot's straggler). A real measurement unless already seen: it is
        journaled (and so reaches history at its own time) but never applied to the shelf
        state, which stays that of the newest reading."""
        device = r.device
        key = (device, r.epoch, r.seq, r.ts_s)
        if r.epoch == cur.epoch and r.seq >= cur.floor:
            holes = cur.holes
            i = bisect.bisect_right(holes, r.seq, key=_first) - 1
            if i < 0 or holes[i][1] < r.seq:
                return "duplicate", f"seq {r.seq} already applied"
            new = Cursor(
                cur.epoch, cur.seq, cur.ts_s, cur.applied + 1, cur.floor,
                _fill(holes, i, r.seq), cur.gaps, cur.missing - 1,
            )  # fmt: skip
            fill = batch.filled.get((device, r.epoch))
            if fill is None:
                batch.filled[(device, r.epoch)] = [1, r.seq, r.seq, r.ts_s]
            else:
                fill[0] += 1
                fill[1] = min(fill[1], r.seq)
                fill[2] = max(fill[2], r.seq)
                fill[3] = max(fill[3], r.ts_s)
        else:
            # An earlier epoch, or below what the cursor accounts for: never counted missing,
            # so only the outbox (and this group) can tell whether it was seen.
            if key in batch.unknown or self._journal.has_reading(*key):
                return "duplicate", f"seq {r.seq} of epoch {r.epoch} already applied"
            batch.unknown.add(key)
            new = cur._replace(applied=cur.applied + 1)
        if device not in batch.old_cursors:
            batch.old_cursors[device] = cur
        self.cursors[device] = new
        batch.late += 1
        spec = self._by_channel.get((device, r.channel))
        if spec is None:
            return None  # an unused channel: valid, feeds no shelf
        weight_g = r.weight_g
        if self._gains:
            weight_g *= self._gains.get((device, r.channel), 1.0)
        batch.rows.append(
            ReadingRow(device, r.channel, r.epoch, r.seq, r.ts_s, weight_g, spec.shelf_id)
        )
        return None

    def _gap(self, batch: _Batch, device: str, cur: Cursor, seq: int, ts_s: float) -> Cursor:
        """Readings were lost upstream, or are late (e.g. a broker restart): report the gap,
        remember its range (a late reading fills it), keep going."""
        last_seq = cur.seq
        missing = seq - last_seq - 1
        holes = (*cur.holes, (last_seq + 1, seq - 1))
        floor = cur.floor
        if len(holes) > MAX_HOLES:
            floor = holes[0][1] + 1
            holes = holes[1:]
        batch.event(SeqGap(ts_s, device, last_seq, seq, missing))
        batch.gaps.append((device, last_seq, seq))
        return Cursor(
            cur.epoch, seq, ts_s, cur.applied + 1, floor, holes, cur.gaps + 1,
            cur.missing + missing,
        )  # fmt: skip

    def _fill_events(self, batch: _Batch) -> None:
        """One ``seq_gap_filled`` event per device and epoch of the group: history sums
        ``seq_gap.missing`` with these subtracted (docs/influx-schema.md)."""
        for (device, epoch), (n, first, last, ts_s) in batch.filled.items():
            batch.event(SeqGapFilled(ts_s, device, epoch, first, last, n))

    def _reject(
        self,
        batch: _Batch,
        msg: InboundMessage,
        reason: str,
        detail: str,
        element: RawReading | Rejected | None = None,
    ) -> None:
        batch.reasons.append(reason)
        if reason == "duplicate":
            return  # QoS 1 redelivery is normal protocol behaviour: counted, not dead-lettered
        payload = msg.payload
        if element is not None and isinstance(element, RawReading):
            payload = orjson.dumps(
                {
                    "device": element.device,
                    "ch": element.channel,
                    "epoch": element.epoch,
                    "seq": element.seq,
                    "ts": element.ts_s,
                    "grams": element.weight_g,
                }
            )
        batch.dead.append(DeadLetter(self._clock(), msg.topic, reason, detail[:300], payload))

    def _rollback(self, batch: _Batch) -> None:
        for device, cur in batch.old_cursors.items():
            if cur is None:
                self.cursors.pop(device, None)
            else:
                self.cursors[device] = cur
        for sid, saved in batch.old_states.items():
            self.states[sid].restore(saved, self.specs[sid])
        if batch.saved_rows is not None:
            self._table.restore_rows(batch.saved_rows)

    def _schedule_retry(self) -> None:
        self._link.pause_reading()
        self._paused_by_failure = True
        loop = asyncio.get_running_loop()
        self._retry_handle = loop.call_later(self._retry_backoff.next_delay(), self._do_retry)

    @property
    def retry_pending(self) -> bool:
        """A failed commit's retry is scheduled (the journal was not writable)."""
        return self._retry_handle is not None and not self._retry_handle.cancelled()

    def close(self) -> None:
        """Cancel a pending commit retry; the runtime calls this before closing the journal.
        The held messages stay unacknowledged: the broker redelivers them after a restart."""
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None

    def _do_retry(self) -> None:
        self._retry_handle = None
        msgs, self._retry = self._retry, []
        self._process(msgs, self._retry_epoch)
        if not self._retry:
            log.info("journal writable again: %d held message(s) committed", len(msgs))
            self._retry_backoff.reset()
            self.last_commit_error = None
            if self._paused_by_failure:
                self._paused_by_failure = False
                self._link.resume_reading()

    # -- calibration (engineers, via the API) ---------------------------------------------------
    def set_tare(
        self, shelf_id: str, tare_g: float | None, by: str, now_s: float
    ) -> list[dict[str, Any]]:
        """Set the shelf's tare to ``tare_g``, or (``None``) to its current settled gross
        weight; recount. Returns the events. ``KeyError``: unknown shelf; ``NotSettled``;
        ``CalibrationError``: out of bounds; ``JournalError``: not committed, nothing changed."""
        state = self.states[shelf_id]
        if tare_g is None:
            tare_g = settled_gross_g(state)
        cal = replace(self._calibration_of(shelf_id), tare_g=tare_g)
        return self._recalibrate(shelf_id, cal, "tare", by, now_s)

    def calibrate(
        self,
        shelf_id: str,
        *,
        unit_weight_g: float | None = None,
        scale_factor: float | None = None,
        by: str,
        now_s: float,
    ) -> list[dict[str, Any]]:
        """Override the unit weight and/or the scale factor of the shelf's channel; errors as
        ``set_tare`` (but no settling needed)."""
        if shelf_id not in self.states:
            raise KeyError(shelf_id)
        cal = self._calibration_of(shelf_id)
        if unit_weight_g is not None:
            cal = replace(cal, unit_weight_g=unit_weight_g)
        if scale_factor is not None:
            cal = replace(cal, scale_factor=scale_factor)
        return self._recalibrate(shelf_id, cal, "calibration", by, now_s)

    def clear_calibration(self, shelf_id: str, by: str, now_s: float) -> list[dict[str, Any]]:
        """Back to the site file's tare, unit weight and scale factor."""
        if shelf_id not in self.states:
            raise KeyError(shelf_id)
        return self._recalibrate(shelf_id, None, "reset", by, now_s)

    def _calibration_of(self, shelf_id: str) -> ShelfCalibration:
        return self.calibrations.get(shelf_id) or ShelfCalibration(shelf_id)

    def _recalibrate(
        self, shelf_id: str, cal: ShelfCalibration | None, action: str, by: str, now_s: float
    ) -> list[dict[str, Any]]:
        store = self._journal
        if not isinstance(store, CalibrationStore):
            raise TypeError("the journal cannot store calibrations")
        if cal is not None:
            cal = replace(cal, updated_at_s=now_s, updated_by=by)
        old_spec = self.specs[shelf_id]
        new_spec = calibrated_spec(self.base_specs[shelf_id], cal)
        old_cal = self.calibrations.get(shelf_id)
        old_factor = old_cal.scale_factor if old_cal is not None else 1.0
        new_factor = cal.scale_factor if cal is not None else 1.0
        state, shelf_events = recalibrate(
            self.states[shelf_id], new_spec, new_factor / old_factor, now_s
        )
        calibrated = ShelfCalibrated(
            now_s,
            shelf_id,
            new_spec.sku,
            new_spec.scale_id,
            new_spec.channel,
            action,
            by,
            old=CalibrationValues(old_spec.tare_g, old_spec.unit_weight_g, old_factor),
            new=CalibrationValues(new_spec.tare_g, new_spec.unit_weight_g, new_factor),
        )
        typed: list[BusEvent] = [calibrated, *shelf_events]
        events = [ev.as_dict() for ev in typed]
        store.commit_calibration(
            shelf_id,
            None if cal is None or cal.empty else cal.to_dict(),
            state.to_dict(),
            [EventRow(now_s, e["kind"], e) for e in events],
        )
        self._install_calibration(shelf_id, None if cal is None or cal.empty else cal, new_spec)
        self.states[shelf_id] = state
        log.info(
            "shelf %s %s by %s: tare %.1f g, unit %.2f g, scale factor %.4f",
            shelf_id,
            action,
            by,
            new_spec.tare_g,
            new_spec.unit_weight_g,
            new_factor,
        )
        self._publish_events(typed)
        return events

    def _set_spec(self, shelf_id: str, spec: ShelfSpec) -> None:
        """``spec`` is the shelf's spec from now on (its row's staleness bound follows)."""
        self.specs[shelf_id] = spec
        self._by_channel[(spec.scale_id, spec.channel)] = spec
        self._channel_map.clear()
        row = self._table.rows.get(shelf_id)
        if row is not None:
            self._table.set_spec(row, spec)

    def _install_calibration(
        self, shelf_id: str, cal: ShelfCalibration | None, spec: ShelfSpec
    ) -> None:
        self._set_spec(shelf_id, spec)
        key = (spec.scale_id, spec.channel)
        if cal is None:
            self.calibrations.pop(shelf_id, None)
        else:
            self.calibrations[shelf_id] = cal
        if cal is None or cal.scale_factor == 1.0:
            self._gains.pop(key, None)
        else:
            self._gains[key] = cal.scale_factor
        self._channel_map.clear()

    def apply_topology(
        self,
        scales: Sequence[ScaleConfig],
        new_base: dict[str, ShelfSpec],
        *,
        shelves: Sequence[str] | None = None,
        scale_changes: Sequence[tuple[ScaleConfig | None, ScaleConfig | None]] | None = None,
    ) -> None:
        """A live catalogue change of which shelves and scales there are (docs/catalogue.md):
        a new shelf starts UNKNOWN, a removed one leaves (its state, calibration and channel
        with it), a new scale's readings are routed, a removed one's are unknown; the others
        keep their state (`recount_specs` then recounts those whose spec changed). Every
        mapping is changed in place: alerts, the read model and picking hold them.

        ``shelves`` (the ids of the shelves the change added or removed) and ``scale_changes``
        (each scale it added, removed or changed: before, after; None where absent) limit
        the work to those, O(changed); None: every shelf and scale is looked at."""
        self._channel_map.clear()
        if shelves is None:
            shelves = [*self.specs, *(sid for sid in new_base if sid not in self.specs)]
        for sid in [sid for sid in shelves if sid in self.specs and sid not in new_base]:
            spec = self.specs.pop(sid)
            del self.base_specs[sid]
            del self.states[sid]
            self.calibrations.pop(sid, None)
            key = (spec.scale_id, spec.channel)
            held = self._by_channel.get(key)
            if held is not None and held.shelf_id == sid:
                del self._by_channel[key]
                self._gains.pop(key, None)
        for sid in shelves:
            base = new_base.get(sid)
            if base is not None and sid not in self.base_specs:
                self.base_specs[sid] = base
                self.specs[sid] = base
                self.states.add(base)
                self._by_channel[(base.scale_id, base.channel)] = base
        if scale_changes is None:
            wanted = {sc.id: sc for sc in scales}
            for device in [d for d in self.devices if d not in wanted]:
                del self.devices[device]
            for sc in scales:
                if sc.id not in self.devices:
                    self.devices[sc.id] = DeviceInfo(sc.id, sc.zone, sc.format)
            self.routes.clear()
            self.routes.update(_routes(self.settings, scales))
            return
        for old, new in scale_changes:
            if old is not None:
                for topic in _routes(self.settings, [old]):
                    self.routes.pop(topic, None)
                if new is None:
                    self.devices.pop(old.id, None)
            if new is not None:
                self.routes.update(_routes(self.settings, [new]))
                if new.id not in self.devices:
                    self.devices[new.id] = DeviceInfo(new.id, new.zone, new.format)

    def recount_specs(self, new_base: dict[str, ShelfSpec], now_s: float) -> list[BusEvent]:
        """A live catalogue change of shelves' counting columns (tare, unit weight, tolerance,
        capacity, their scale's range or reporting interval; same shelf, SKU, scale and
        channel): each such shelf is recounted as a calibration recounts it (a settled shelf
        at once, else at its next settled reading), a calibration override of it still
        applying on top. Its states and events are journaled in one group, then published.
        Returns the events. When they cannot be journaled the specs apply all the same and the
        counts follow at the shelves' next settled readings."""
        changed = {sid: spec for sid, spec in new_base.items() if self.base_specs[sid] != spec}
        if not changed:
            return []
        states: dict[str, ShelfState] = {}
        specs: dict[str, ShelfSpec] = {}
        typed: list[BusEvent] = []
        for sid, base in changed.items():
            spec = calibrated_spec(base, self.calibrations.get(sid))
            states[sid], shelf_events = recalibrate(self.states[sid], spec, 1.0, now_s)
            specs[sid] = spec
            typed.extend(shelf_events)
        try:
            self._journal.commit(
                (),
                shelf_states={sid: st.to_dict() for sid, st in states.items()},
                events=[EventRow(now_s, ev.kind, ev.as_dict()) for ev in typed],
            )
        except JournalError as exc:
            log.error("recount of %d shelf(s) not journaled: %s", len(changed), exc)
            typed = []
            states = {
                sid: ShelfState.from_dict(self.states[sid].to_dict(), spec)
                for sid, spec in specs.items()
            }
        for sid, spec in specs.items():
            self.base_specs[sid] = changed[sid]
            self._set_spec(sid, spec)  # a reporting interval (staleness bound) may have changed
            self.states[sid] = states[sid]
        if typed:
            self._publish_events(typed)
        return typed

    def _restore_calibrations(self, saved: dict[str, dict[str, Any]]) -> None:
        for sid, body in saved.items():
            base = self.base_specs.get(sid)
            if base is None:
                log.warning(
                    "journal has a calibration of shelf %s, which the site no longer has", sid
                )
                continue
            try:
                cal = ShelfCalibration.from_dict(body)
                spec = calibrated_spec(base, cal)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("discarding unusable saved calibration of shelf %s: %s", sid, exc)
                continue
            self._install_calibration(sid, cal, spec)
            log.info(
                "shelf %s: calibration override from %s applied (tare %.1f g, unit %.2f g, "
                "scale factor %.4f)",
                sid,
                cal.updated_by,
                spec.tare_g,
                spec.unit_weight_g,
                cal.scale_factor,
            )

    def shelf_status_counts(self) -> dict[str, int]:
        """Shelves per status value (vectorised over the state table)."""
        return self.states.status_counts()

    # -- periodic ----------------------------------------------------------------------------
    def tick(self, now: float) -> list[BusEvent]:
        """Staleness: a shelf whose scale missed its reporting intervals becomes STALE.

        One vectorised comparison over the table's newest-reading and staleness-bound columns
        finds the shelves whose time ran out (`ShelfTable.due_stale`); only those are examined
        one by one (``stale_checks``)."""
        table = self._table
        due = table.due_stale(now)
        if not len(due):
            return []
        out: list[BusEvent] = []
        changed: dict[str, dict[str, Any]] = {}
        ids, specs, states = table.ids, self.specs, self.states
        for row in due.tolist():
            self.stale_checks += 1
            sid = ids[row]
            spec = specs.get(sid) if sid is not None else None
            if sid is None or spec is None:
                continue
            events = table.check_stale(row, spec, now)
            if events:
                changed[sid] = states[sid].to_dict()
                out.extend(events)
        if out:
            # Journaled like every other event (the historian stores them); staleness is
            # recomputed from time after a restart, so a failed write only loses the record.
            try:
                self._journal.commit(
                    (),
                    shelf_states=changed,
                    events=[EventRow(now, e.kind, e.as_dict()) for e in out],
                )
            except JournalUnavailable as exc:
                log.error("could not journal %d staleness event(s): %s", len(out), exc)
            self._publish_events(out)
        return out


def _routes(settings: IngestSettings, scales: Sequence[ScaleConfig]) -> dict[str, Route]:
    """The topic of each scale (each channel of an ESPHome scale) and how to read it."""
    routes: dict[str, Route] = {}
    prefix, site_id = settings.topic_prefix, settings.site_id
    for sc in scales:
        if sc.format == "native":
            routes[native_topic(prefix, site_id, sc.zone, sc.id)] = Route(_NATIVE, sc)
        else:
            assert sc.esphome_node is not None
            for ch, sensor in enumerate(sc.esphome_sensors):
                routes[esphome_state_topic(sc.esphome_node, sensor)] = Route(_ESP_STATE, sc, ch)
            routes[esphome_status_topic(sc.esphome_node)] = Route(_ESP_STATUS, sc)
    return routes


def _first(hole: tuple[int, int]) -> int:
    return hole[0]


def _fill(holes: tuple[tuple[int, int], ...], i: int, seq: int) -> tuple[tuple[int, int], ...]:
    """``holes`` with ``seq`` (inside ``holes[i]``) taken out of its range."""
    first, last = holes[i]
    parts = ((first, seq - 1),) if first < seq else ()
    if seq < last:
        parts = (*parts, (seq + 1, last))
    return (*holes[:i], *parts, *holes[i + 1 :])


@dataclass(slots=True)
class _Batch:
    rows: list[ReadingFields]
    columns: ReadingColumns | None
    """The readings of a group taken in columns (``rows`` is then empty)."""
    dead: list[DeadLetter]
    events: list[EventRow]
    bus_events: list[BusEvent]
    old_cursors: dict[str, Cursor | None]
    old_states: dict[str, ShelfSnapshot]
    saved_rows: RowsSnapshot | None
    """Rows of the state table as they were before the group (its column path)."""
    shelves: list[str]
    """The shelves the column path applied readings to."""
    reasons: list[str]
    gaps: list[tuple[str, int, int]]
    seen: dict[str, float]
    filled: dict[tuple[str, int], list[Any]]
    """(device, epoch) → [late readings that filled a gap, lowest seq, highest seq, newest ts]."""
    unknown: set[tuple[str, int, int, float]]
    late: int

    def __init__(self) -> None:
        self.rows = []
        self.columns = None
        self.dead = []
        self.events = []
        self.bus_events = []
        self.old_cursors = {}
        self.old_states = {}
        self.saved_rows = None
        self.shelves = []
        self.reasons = []
        self.gaps = []
        self.seen = {}
        self.filled = {}
        self.unknown = set()
        self.late = 0

    def event(self, ev: Event) -> None:
        """Journal ``ev`` (at its ``ts``) and publish it after the commit."""
        body = ev.as_dict()
        self.bus_events.append(ev)
        self.events.append(EventRow(body["ts"], ev.kind, body))


def commit_retry_backoff() -> Backoff:
    """Between retries of a group whose journal commit failed: 0.05 s doubling to 2 s, no
    jitter; reset once the held group is committed."""
    return Backoff(0.05, 2.0, jitter=0.0)


def subscriptions(site: SiteConfig) -> tuple[tuple[str, int], ...]:
    """Topic filters (QoS 1) that cover every scale of the site."""
    subs: list[tuple[str, int]] = []
    if any(sc.format == "native" for sc in site.scales):
        subs.append((native_filter(site.mqtt.topic_prefix, site.site.id), 1))
    for sc in site.scales:
        if sc.format == "esphome":
            subs.append((f"{sc.esphome_node}/sensor/+/state", 1))
            subs.append((esphome_status_topic(sc.esphome_node or ""), 1))
    return tuple(subs)


def shelf_specs(site: SiteConfig) -> dict[str, ShelfSpec]:
    """Domain specs of every shelf, from the site configuration."""
    scales = {s.id: s for s in site.scales}
    stale_factor = site.site.stale_after_intervals
    out: dict[str, ShelfSpec] = {}
    for sh in site.shelves:
        scale = scales[sh.scale]
        out[sh.id] = ShelfSpec(
            shelf_id=sh.id,
            zone=sh.zone,
            sku=sh.sku,
            scale_id=sh.scale,
            channel=sh.channel,
            unit_weight_g=sh.unit_weight_g,
            tare_g=sh.tare_g,
            capacity_units=sh.capacity_units,
            tolerance_frac=sh.tolerance_frac,
            stale_after_s=scale.reporting_interval_s * stale_factor,
            max_weight_g=scale.max_weight_g,
        )
    return out
