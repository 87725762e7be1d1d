"""The read side of the stock: shelves, SKUs and zones, as the API and the dashboard show them.

Which shelf belongs to which zone and SKU, and which alert targets cover a zone, changes only
with the catalogue (then the API builds a new read model: controller/api/deps.py): ``StockQueries``
indexes it once, from the site and the alert targets, so every query costs O(its answer), not a
scan of the site per shelf. The indexes are built on first use, not at start-up. What does
change (shelf states, calibrations, calibrated specs, alert episodes) is read live from the
mappings the ingest and alert services own and update in place.

The lists are answered a page at a time (``PageQuery`` → ``Page``) by ``ListIndex``
(controller/services/list_index.py): by zone, text and state, the states bucketed on the first
filtered read and moved by ``on_events`` (a bus listener) from then on.

The same holds for the devices (``DeviceQueries``: each scale's zone, format and staleness
bound indexed once; its figures and status read live from ingest) and the alerts
(``AlertQueries``: the targets' order, zones and text once; their state live, bucketed like the
stock states). ``ReadModel`` is the facade the API reads through: stock, devices, alerts, and
health and PLCs from the supervision service's ``HealthReport``
(controller/services/supervision.py), so no route reaches into a service.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from controller.config import SiteConfig, SkuConfig, ZoneConfig
from controller.domain.calibration import ShelfCalibration
from controller.domain.events import (
    AlertManualNotice,
    AlertNotice,
    BusEvent,
    ShelfCalibrated,
    ShelfStatusChanged,
    StockChanged,
)
from controller.domain.model import ShelfSpec, StockState
from controller.domain.reorder import AlertState, classify
from controller.domain.stock import ShelfState, sku_level
from controller.ports import Cursor
from controller.services.alerts import AlertTarget
from controller.services.list_index import ListIndex, Selection
from controller.services.supervision import HealthReport, PlcView

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PageQuery:
    """Which page of a list: the filters (None: any), the key after which it starts (None: the
    first page; a key the list does not have is ``BadCursor``) and at most how many items."""

    limit: int
    zone: str | None = None
    state: str | None = None
    q: str | None = None
    after: str | None = None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list: its items, the size of the whole filtered list, and the key after
    which the next page starts (None: this is the last page)."""

    items: list[T]
    total: int
    next_after: str | None


def _page(sel: Selection, view: Callable[[str], T]) -> Page[T]:
    return Page([view(k) for k in sel.keys], sel.total, sel.next_after)


def _shelf_ids_of(events: Iterable[BusEvent]) -> set[str]:
    return {
        ev.shelf_id
        for ev in events
        if isinstance(ev, StockChanged | ShelfStatusChanged | ShelfCalibrated)
    }


class AlertReads(Protocol):
    """What the queries read of the alert service: its (fixed) targets and live states."""

    @property
    def targets(self) -> Mapping[str, AlertTarget]: ...

    @property
    def alerts(self) -> Mapping[str, AlertState]: ...


@dataclass(frozen=True, slots=True)
class ShelfView:
    """One shelf as it stands: its (calibrated) spec, place, state and calibration override."""

    spec: ShelfSpec
    location: str
    state: ShelfState
    calibration: ShelfCalibration | None


@dataclass(frozen=True, slots=True)
class SkuView:
    """One SKU over the whole site: its level (None when unknown) and stock state."""

    sku: SkuConfig
    level: int | None
    state: StockState
    shelves: list[ShelfView]


@dataclass(frozen=True, slots=True)
class ZoneSummary:
    """Counts of one zone: shelves, scales, SKUs stored, shelf statuses, active alerts."""

    zone: ZoneConfig
    shelves: int
    scales: int
    skus: list[str]
    shelf_status: dict[str, int]
    alerts_active: int


@dataclass(frozen=True, slots=True)
class ZoneSkuView:
    """A SKU stored in one zone: its units there, and its level and state over the site."""

    sku: SkuConfig
    shelves: list[str]
    units_in_zone: int | None
    level: int | None
    state: StockState


@dataclass(frozen=True, slots=True)
class ZoneStockView:
    zone: ZoneConfig
    shelves: list[ShelfView]
    skus: list[ZoneSkuView]


class StockQueries:
    """Stock, shelves and zones, answered from indexes built once (see the module docstring).

    ``specs``, ``states`` and ``calibrations`` are the ingest service's own mappings (updated in
    place by it); ``alerts`` is the alert service."""

    def __init__(
        self,
        site: SiteConfig,
        specs: Mapping[str, ShelfSpec],
        states: Mapping[str, ShelfState],
        calibrations: Mapping[str, ShelfCalibration],
        alerts: AlertReads,
    ) -> None:
        self._specs = specs
        self._states = states
        self._calibrations = calibrations
        self._alerts = alerts
        self._skus: dict[str, SkuConfig] = {s.id: s for s in site.skus}
        self._zones: dict[str, ZoneConfig] = {z.id: z for z in site.zones}
        self._location: dict[str, str] = {}
        self._shelf_ids: tuple[str, ...] = tuple(specs)
        self._zone_shelves: dict[str, list[str]] = {z: [] for z in self._zones}
        for shelf in site.shelves:
            self._location[shelf.id] = shelf.location
            self._zone_shelves.setdefault(shelf.zone, []).append(shelf.id)
        self._zone_scales = Counter(sc.zone for sc in site.scales)
        targets = alerts.targets
        self._sku_shelves: dict[str, tuple[str, ...]] = {
            sku: targets[sku].shelves for sku in self._skus
        }
        # Zone indexes of SKUs and alert targets: built on first use (``_zone_index``), not
        # on the start-up path.
        self._zone_skus_ix: dict[str, list[str]] | None = None
        self._zone_targets_ix: dict[str, list[str]] | None = None
        self._zone_sku_ids: dict[str, tuple[str, ...]] | None = None
        self._sku_index = ListIndex(
            tuple(self._skus),
            self._sku_zones,
            lambda: [f"{s.id}\n{s.name}" for s in self._skus.values()],
            facets={"state": lambda sku: self._sku_state(sku).value},
        )
        self._shelf_index = ListIndex(
            self._shelf_ids,
            lambda: [(specs[s].zone,) for s in self._shelf_ids],
            lambda: [f"{s}\n{specs[s].sku}\n{self._location.get(s, '')}" for s in self._shelf_ids],
            facets={"status": lambda sid: self._states[sid].status.value},
        )

    def _zone_index(self, keys: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """Per zone, the ``keys`` (in their order) with a shelf there; ``keys`` maps each to
        its shelves."""
        specs = self._specs
        out: dict[str, list[str]] = {z: [] for z in self._zone_shelves}
        for key, shelves in keys.items():
            for zone in dict.fromkeys(specs[s].zone for s in shelves):
                out[zone].append(key)
        return out

    @property
    def _zone_skus(self) -> dict[str, list[str]]:
        """SKUs with a shelf in the zone, in the site's SKU order (the order /stock lists
        them)."""
        if self._zone_skus_ix is None:
            self._zone_skus_ix = self._zone_index(self._sku_shelves)
        return self._zone_skus_ix

    @property
    def _zone_targets(self) -> dict[str, list[str]]:
        """Alert targets watching a shelf of the zone."""
        if self._zone_targets_ix is None:
            targets = self._alerts.targets
            self._zone_targets_ix = self._zone_index({k: t.shelves for k, t in targets.items()})
        return self._zone_targets_ix

    def _sku_zones(self) -> list[list[str]]:
        """Each SKU's zones (those of its shelves), in site order."""
        sku_zones: dict[str, list[str]] = {sku: [] for sku in self._skus}
        for zone, skus in self._zone_skus.items():
            for sku in skus:
                sku_zones[sku].append(zone)
        return list(sku_zones.values())

    def _zone_skus_sorted(self, zone: str) -> tuple[str, ...]:
        """The SKUs of ``zone``'s shelves sorted by id, indexed on first use (a shelf's SKU
        never changes)."""
        if self._zone_sku_ids is None:
            specs = self._specs
            self._zone_sku_ids = {
                z: tuple(sorted({specs[s].sku for s in shelves}))
                for z, shelves in self._zone_shelves.items()
            }
        return self._zone_sku_ids[zone]

    def on_events(self, events: list[BusEvent]) -> None:
        """Bus listener: move the shelves an event names, and their SKUs, to their new status
        and stock state in the indexes."""
        shelves = _shelf_ids_of(events)
        if shelves:
            self._shelf_index.update(shelves)
            self._sku_index.update({self._specs[s].sku for s in shelves if s in self._specs})

    def rebuild(self) -> None:
        """Re-read every status and stock state on the next filtered read (after a change
        that published no event)."""
        self._shelf_index.rebuild()
        self._sku_index.rebuild()

    def apply_skus(self, skus: Iterable[SkuConfig]) -> None:
        """A live catalogue change of SKUs the site already has (name, thresholds: no SKU
        added, removed or moved, docs/catalogue.md): answer with the new records, and re-read
        every stock state and name on the next filtered read."""
        for sku in skus:
            if sku.id in self._skus:
                self._skus[sku.id] = sku
        self.rebuild()

    # -- shelves ------------------------------------------------------------------------------
    def has_shelf(self, shelf_id: str) -> bool:
        return shelf_id in self._location

    def state(self, shelf_id: str) -> ShelfState:
        """The live state of ``shelf_id`` alone (KeyError when the site has no such shelf)."""
        return self._states[shelf_id]

    def shelf(self, shelf_id: str) -> ShelfView:
        """The shelf ``shelf_id`` (KeyError when the site has none)."""
        return ShelfView(
            spec=self._specs[shelf_id],
            location=self._location[shelf_id],
            state=self._states[shelf_id],
            calibration=self._calibrations.get(shelf_id),
        )

    def shelves(self, zone: str | None = None, status: str | None = None) -> list[ShelfView]:
        """Every shelf in site order, or those of ``zone``; then those whose status is
        ``status``."""
        query = PageQuery(limit=max(1, len(self._shelf_index)), zone=zone, state=status)
        return self.shelves_page(query).items

    def shelves_page(self, query: PageQuery) -> Page[ShelfView]:
        """A page of the shelves in site order, by zone, status (``query.state``) and text (id,
        SKU or location)."""
        filters = {"status": query.state} if query.state is not None else None
        sel = self._shelf_index.select(
            zone=query.zone, q=query.q, filters=filters, after=query.after, limit=query.limit
        )
        return _page(sel, self.shelf)

    # -- stock ----------------------------------------------------------------------------------
    def has_sku(self, sku_id: str) -> bool:
        return sku_id in self._skus

    def level(self, sku_id: str) -> int | None:
        """Units of the SKU over all its shelves (None when any is unknown or stale)."""
        return sku_level(self._states[s] for s in self._sku_shelves[sku_id])

    def sku(self, sku_id: str) -> SkuView:
        """The SKU ``sku_id`` with its shelves (KeyError when the site has none)."""
        level = self.level(sku_id)
        return SkuView(
            sku=self._skus[sku_id],
            level=level,
            state=classify(level, self._alerts.targets[sku_id].policy),
            shelves=[self.shelf(s) for s in self._sku_shelves[sku_id]],
        )

    def _sku_state(self, sku_id: str) -> StockState:
        return classify(self.level(sku_id), self._alerts.targets[sku_id].policy)

    def stock(self, zone: str | None = None, state: str | None = None) -> list[SkuView]:
        """Every SKU in site order, or those with a shelf in ``zone``; then those whose stock
        state is ``state``."""
        query = PageQuery(limit=max(1, len(self._sku_index)), zone=zone, state=state)
        return self.stock_page(query).items

    def stock_page(self, query: PageQuery) -> Page[SkuView]:
        """A page of the SKUs in site order, by zone (a shelf there), stock state and text
        (id or name)."""
        filters = {"state": query.state} if query.state is not None else None
        sel = self._sku_index.select(
            zone=query.zone, q=query.q, filters=filters, after=query.after, limit=query.limit
        )
        return _page(sel, self.sku)

    # -- zones ----------------------------------------------------------------------------------
    def zones(self) -> list[ZoneSummary]:
        """Every zone of the site, in site order."""
        return [self._zone_summary(z) for z in self._zones.values()]

    def _zone_summary(self, zone: ZoneConfig) -> ZoneSummary:
        shelves = self._zone_shelves[zone.id]
        alerts = self._alerts.alerts
        return ZoneSummary(
            zone=zone,
            shelves=len(shelves),
            scales=self._zone_scales[zone.id],
            skus=list(self._zone_skus_sorted(zone.id)),
            shelf_status=self._shelf_index.counts("status", zone.id),
            alerts_active=sum(
                1 for k in self._zone_targets[zone.id] if alerts[k].episode is not None
            ),
        )

    def zone_stock(self, zone_id: str) -> ZoneStockView | None:
        """The zone's shelves and, per SKU stored there (sorted), its units in the zone and its
        level over the site; None for an unknown zone."""
        zone = self._zones.get(zone_id)
        if zone is None:
            return None
        shelves = self._zone_shelves[zone_id]
        by_sku: dict[str, list[str]] = {}
        for sid in shelves:
            by_sku.setdefault(self._specs[sid].sku, []).append(sid)
        skus = []
        for sku_id in sorted(by_sku):
            level = self.level(sku_id)
            skus.append(
                ZoneSkuView(
                    sku=self._skus[sku_id],
                    shelves=by_sku[sku_id],
                    units_in_zone=sku_level(self._states[s] for s in by_sku[sku_id]),
                    level=level,
                    state=classify(level, self._alerts.targets[sku_id].policy),
                )
            )
        return ZoneStockView(zone=zone, shelves=[self.shelf(s) for s in shelves], skus=skus)


# -- devices, alerts, health: the rest of the read side ----------------------------------------


class DeviceFigures(Protocol):
    """What ingest knows of one scale (``IngestService.devices``)."""

    @property
    def last_seen_s(self) -> float | None: ...

    @property
    def online(self) -> bool | None: ...

    @property
    def gaps(self) -> int: ...

    @property
    def missing_readings(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One scale as ``GET /api/v1/devices`` shows it."""

    id: str
    zone: str
    format: str
    last_seen_s: float | None
    stale: bool
    online: bool | None
    epoch: int | None
    last_seq: int | None
    applied: int
    gaps: int
    missing_readings: int


ScaleStatus = Literal["ok", "stale", "offline", "unknown"]


@dataclass(frozen=True, slots=True)
class ScaleChannelView:
    """One channel of a scale: its shelf (None: unused), that shelf's status, the gain."""

    channel: int
    shelf: str | None
    shelf_status: str | None
    scale_factor: float


@dataclass(frozen=True, slots=True)
class ScaleView:
    """One scale as ``GET /api/v1/scales`` shows it."""

    id: str
    zone: str
    format: str
    status: ScaleStatus
    last_seen_s: float | None
    reporting_interval_s: float
    max_weight_g: float
    channels: list[ScaleChannelView]


@dataclass(frozen=True, slots=True)
class _Scale:
    id: str
    zone: str
    format: str
    stale_after_s: float
    reporting_interval_s: float
    max_weight_g: float
    shelves: tuple[str | None, ...]
    """The shelf of each channel (None: unused)."""


class DeviceQueries:
    """Every scale in site order, with what ingest knows of it. ``devices``, ``cursors``,
    ``states`` and ``calibrations`` are the ingest service's own mappings (updated in place by
    it); which shelf sits on which channel is indexed once."""

    def __init__(
        self,
        site: SiteConfig,
        specs: Mapping[str, ShelfSpec],
        devices: Mapping[str, DeviceFigures],
        cursors: Mapping[str, Cursor],
        states: Mapping[str, ShelfState],
        calibrations: Mapping[str, ShelfCalibration],
        clock: Callable[[], float],
    ) -> None:
        self._stale_after_intervals = site.site.stale_after_intervals
        self._scale_configs = site.scales  # walked once, on first use (``_by_id``)
        self._specs = specs
        self._devices = devices
        self._cursors = cursors
        self._states = states
        self._calibrations = calibrations
        self._clock = clock
        self._scales_ix: dict[str, _Scale] | None = None
        scales = self._scale_configs
        self._index = ListIndex(
            tuple(sc.id for sc in scales),
            lambda: [(sc.zone,) for sc in scales],
            lambda: [sc.id for sc in scales],
            live={"state": lambda sid: self._status(self._by_id[sid], self._clock())},
        )

    @property
    def _by_id(self) -> dict[str, _Scale]:
        """Each scale with its staleness bound and channels' shelves, built on first use (not
        on the start-up path)."""
        if self._scales_ix is None:
            intervals = self._stale_after_intervals
            by_channel = {(s.scale_id, s.channel): s.shelf_id for s in self._specs.values()}
            self._scales_ix = {
                sc.id: _Scale(
                    sc.id,
                    sc.zone,
                    sc.format,
                    sc.reporting_interval_s * intervals,
                    sc.reporting_interval_s,
                    sc.max_weight_g,
                    tuple(by_channel.get((sc.id, ch)) for ch in range(sc.channels)),
                )
                for sc in self._scale_configs
            }
        return self._scales_ix

    def _status(self, sc: _Scale, now: float) -> ScaleStatus:
        info = self._devices[sc.id]
        seen = info.last_seen_s
        if seen is None:
            return "unknown"
        if info.online is False:
            return "offline"
        if now - seen > sc.stale_after_s:
            return "stale"
        return "ok"

    def _select(self, query: PageQuery) -> Selection:
        filters = {"state": query.state} if query.state is not None else None
        return self._index.select(
            zone=query.zone, q=query.q, filters=filters, after=query.after, limit=query.limit
        )

    def _all(self) -> PageQuery:
        return PageQuery(limit=max(1, len(self._index)))

    def scales(self) -> list[ScaleView]:
        """Every scale: status, last seen, and per channel its shelf and scale factor."""
        return self.scales_page(self._all()).items

    def scales_page(self, query: PageQuery) -> Page[ScaleView]:
        """A page of the scales in site order, by zone, status (``query.state``: ok, stale,
        offline, unknown, evaluated now for each scale of the narrowest list) and text (id)."""
        now = self._clock()
        return _page(self._select(query), lambda sid: self._scale(self._by_id[sid], now))

    def _scale(self, sc: _Scale, now: float) -> ScaleView:
        channels = []
        for ch, shelf in enumerate(sc.shelves):
            cal = self._calibrations.get(shelf) if shelf is not None else None
            channels.append(
                ScaleChannelView(
                    channel=ch,
                    shelf=shelf,
                    shelf_status=(self._states[shelf].status.value if shelf is not None else None),
                    scale_factor=cal.scale_factor if cal is not None else 1.0,
                )
            )
        return ScaleView(
            id=sc.id,
            zone=sc.zone,
            format=sc.format,
            status=self._status(sc, now),
            last_seen_s=self._devices[sc.id].last_seen_s,
            reporting_interval_s=sc.reporting_interval_s,
            max_weight_g=sc.max_weight_g,
            channels=channels,
        )

    def devices(self) -> list[DeviceView]:
        """Every scale's figures, in site order."""
        return self.devices_page(self._all()).items

    def devices_page(self, query: PageQuery) -> Page[DeviceView]:
        """A page of the scales' figures; the filters of ``scales_page``."""
        now = self._clock()
        return _page(self._select(query), lambda sid: self._device(self._by_id[sid], now))

    def _device(self, sc: _Scale, now: float) -> DeviceView:
        info = self._devices[sc.id]
        cur = self._cursors.get(sc.id)
        seen = info.last_seen_s
        return DeviceView(
            id=sc.id,
            zone=sc.zone,
            format=sc.format,
            last_seen_s=seen,
            stale=seen is None or now - seen > sc.stale_after_s,
            online=info.online,
            epoch=cur.epoch if cur else None,
            last_seq=cur.seq if cur else None,
            applied=cur.applied if cur else 0,
            gaps=info.gaps,
            missing_readings=info.missing_readings,
        )


class AlertPublicReads(AlertReads, Protocol):
    """The alert service's public answer per key."""

    def public(self, key: str) -> dict[str, Any]: ...


class AlertQueries:
    """Reorder alert states of every target (SKU, then shelves with their own policy), in
    the alert service's order, read live; indexed by zone (of the target's shelves), key and
    SKU text, and by state and active episode (moved by ``on_events``)."""

    def __init__(self, alerts: AlertPublicReads, specs: Mapping[str, ShelfSpec]) -> None:
        self._service = alerts
        targets = alerts.targets
        self._keys = tuple(targets)
        self._shelf_keys: dict[str, list[str]] | None = None  # built with the state index
        states = alerts.alerts
        self._index = ListIndex(
            self._keys,
            lambda: [dict.fromkeys(specs[s].zone for s in targets[k].shelves) for k in self._keys],
            lambda: [f"{k}\n{targets[k].sku}" for k in self._keys],
            facets={
                "state": lambda k: states[k].state.value,
                "active": lambda k: "true" if states[k].episode is not None else "false",
            },
        )

    def on_events(self, events: list[BusEvent]) -> None:
        """Bus listener (after the alert service's, so its states are current): move the keys
        an event names, or whose shelves it names, to their new state in the index."""
        if not self._index.listening:
            return  # nothing is indexed by state yet
        shelf_keys = self._shelf_keys
        if shelf_keys is None:
            shelf_keys = {}
            for key, target in self._service.targets.items():
                for shelf in target.shelves:
                    shelf_keys.setdefault(shelf, []).append(key)
            self._shelf_keys = shelf_keys
        keys: set[str] = set()
        for ev in events:
            if isinstance(ev, AlertNotice):
                keys.add(ev.transition.key)
            elif isinstance(ev, AlertManualNotice):
                continue  # an ack or snooze changes neither the state nor the episode
            elif isinstance(ev, StockChanged | ShelfStatusChanged | ShelfCalibrated):
                keys.update(shelf_keys.get(ev.shelf_id, ()))
        if keys:
            self._index.update(keys)

    def rebuild(self) -> None:
        """Re-read every key's state on the next filtered read (after a restore)."""
        self._index.rebuild()

    def has_key(self, key: str) -> bool:
        return key in self._service.targets

    def alert(self, key: str) -> dict[str, Any]:
        """The public state of ``key`` (KeyError for an unknown key)."""
        return self._service.public(key)

    def alerts(self, active: bool | None = None) -> list[dict[str, Any]]:
        """Every target's state; with ``active``, only those with (or without) an episode.
        From the index once a filtered read built it; until then by a scan of the episodes
        (the live feed's snapshot calls this on the event loop: it must not be the one that
        pays for the build)."""
        if self._index.built:
            return self.alerts_page(PageQuery(limit=max(1, len(self._index))), active).items
        states = self._service.alerts
        keys = self._keys
        if active is not None:
            keys = tuple(k for k in keys if (states[k].episode is not None) is active)
        return [self._service.public(k) for k in keys]

    def alerts_page(self, query: PageQuery, active: bool | None = None) -> Page[dict[str, Any]]:
        """A page of the targets' states in order, by zone, state (ok, low, critical, out,
        unknown), active episode and text (key or SKU)."""
        filters: dict[str, str] = {}
        if active is not None:
            filters["active"] = "true" if active else "false"
        if query.state is not None:
            filters["state"] = query.state
        sel = self._index.select(
            zone=query.zone, q=query.q, filters=filters, after=query.after, limit=query.limit
        )
        return _page(sel, self._service.public)


@dataclass(frozen=True, slots=True)
class ReadModel:
    """The API's read side: stock and shelves, devices, alerts, and health and PLCs (the
    supervision service's report)."""

    stock: StockQueries
    devices: DeviceQueries
    alerts: AlertQueries
    health: Callable[[], HealthReport]
    """A fresh ``HealthReport`` (``SupervisionService.report``)."""
    plcs: Callable[[], list[PlcView]]
    """Every ``[[plcs]]`` entry in site order (``SupervisionService.plc_views``)."""
