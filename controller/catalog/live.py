"""Changing the catalogue of a running controller (``PUT/PATCH /api/v1/catalog``,
docs/catalogue.md "Changing a running controller").

A change is read and validated whole (every bad row and column reported, nothing applied),
compared with the catalogue in force (`diff`), checked against the caller's role (a supervisor
changes thresholds only) and against what applies live, then journaled as one new catalogue
version with its audit rows, applied to the running services on the event loop (the state
owner), and announced with a `CatalogChanged` event (journaled, on the bus). The O(records)
steps run in worker threads (reading, validating, comparing, the new site and specs, the
journal's staging in short transactions: catalog_store.stage); the swap into the journal and
the apply run together on the event loop, in one step: no reading is counted, and no reader
sees, half a change.

What applies live in this version: SKUs, shelves and native scales added, removed or
changed, except a shelf's zone, scale or channel and a scale's zone, format, channels or
ESPHome names. A new shelf starts UNKNOWN; a changed shelf keeps its state and recounts as a
calibration recounts it; alert episodes of the keys that stay are kept and re-evaluated with
the new policy at once; a removed key's episode ends (named in the event). A removed SKU or a
removed or moved shelf is refused while an open pick task takes units of it (the order desk
checks and takes the change in one step on the control loop). Anything else is refused with
every such record named: stop the controller and use ``floorhand catalog import``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import orjson

from controller.adapters import catalog_store
from controller.catalog.diff import CatalogueDiff, Change, diff
from controller.catalog.formats import CatalogueInvalid, Format, Row, RowError, read_rows
from controller.catalog.records import COLUMNS, KINDS, Catalogue, Kind, flat
from controller.catalog.validate import validate
from controller.config import ScaleConfig, SiteConfig
from controller.domain.events import CatalogChanged
from controller.domain.model import ShelfSpec
from controller.ports import EventRow, JournalError
from controller.services.alerts import AlertSettings
from controller.services.ingest import shelf_specs

if TYPE_CHECKING:
    from controller.adapters.journal import Journal
    from controller.runtime import Runtime

VersionRow = catalog_store.VersionRow
"""A catalogue version's row (for the API, which imports no adapter)."""

log = logging.getLogger("floorhand.catalog")

API_SOURCE: Final = "api"
"""The audit source of a change made through the API."""

THRESHOLD_COLUMNS: Final[dict[Kind, frozenset[str]]] = {
    "sku": frozenset(
        {
            "reorder_point",
            "safety_stock",
            "max_stock",
            "dwell_s",
            "hysteresis_units",
            "lead_time_d",
            "pack_multiple",
        }
    ),
    "scale": frozenset(),
    "shelf": frozenset({"shelf_reorder_point", "shelf_safety_stock"}),
}
"""The columns a supervisor may change (an engineer may change any)."""

COUNTING_COLUMNS: Final[dict[Kind, frozenset[str]]] = {
    "sku": frozenset(),
    "scale": frozenset({"reporting_interval_s", "max_weight_g"}),
    "shelf": frozenset({"tare_g", "unit_weight_g", "tolerance_frac", "capacity_units"}),
}
"""Columns that change how a shelf counts: a changed one recounts the shelf."""

LIVE_COLUMNS: Final[dict[Kind, frozenset[str]]] = {
    "sku": frozenset(COLUMNS["sku"]) - {"id"},
    "scale": COUNTING_COLUMNS["scale"],
    "shelf": THRESHOLD_COLUMNS["shelf"] | COUNTING_COLUMNS["shelf"] | {"location", "sku"},
}
"""The columns a running controller takes without a restart (see the module docstring)."""

WORKER_BUSY_TIMEOUT_S: Final = 2.0
"""How long a short transaction of a change waits for its turn and for SQLite's write lock
(each): ingest's commits hold them for milliseconds; a journal held longer by another writer
fails the change (503, nothing changed) well within a client's patience."""

PATCH_REMOVE: Final = "remove"
"""A PATCH record's key that removes the record (``{"kind": "sku", "id": "K9", "remove":
true}``)."""


class ChangeRefused(Exception):
    """A change refused as a whole: ``status`` (403 role, 409 inline site or not live),
    ``detail``, and each refused record or column in ``items``."""

    def __init__(self, status: int, detail: str, items: list[str] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.items = items or []
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class Applied:
    """A change journaled and applied: the version in force and the changes."""

    version: int
    changes: CatalogueDiff
    ended: tuple[str, ...] = ()


@contextmanager
def old_objects_frozen() -> Iterator[None]:
    """For the length of a change: the objects alive at its start (the catalogue and state in
    force: most of the process) are left out of Python's cyclic garbage collections
    (`gc.freeze`), put back at its end (`gc.unfreeze`). A change creates objects by the
    million, which triggers full collections; each stops every thread (the main loop too) for
    as long as it walks every object: at 10k SKUs they took 88, 106, 160 and 563 ms during one
    PUT, 16-74 ms with the state in force frozen. A process that keeps a frozen heap of its
    own (``gc.get_freeze_count()`` non-zero: `floorhand run` freezes what is alive after its
    start) keeps it, and what the change leaves alive joins it at the end (the new catalogue
    and state are then the bulk of the process)."""
    if gc.get_freeze_count():
        try:
            yield
        finally:
            gc.freeze()
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def change_dict(c: Change) -> dict[str, Any]:
    """A change on the wire: kind, id, op, and for a change each column's before and after."""
    out: dict[str, Any] = {"kind": c.kind, "id": c.id, "op": c.op}
    if c.op == "change":
        out["columns"] = {k: {"before": b, "after": a} for k, (b, a) in c.fields.items()}
    elif c.op == "add":
        out["record"] = c.after
    return out


def error_dicts(exc: CatalogueInvalid) -> list[dict[str, Any]]:
    """Every error of an invalid change: line (0: the body as a whole or a record the request
    did not name), column, kind, id, message."""
    return [
        {"line": e.line, "column": e.column, "kind": e.kind, "id": e.id, "message": e.message}
        for e in exc.errors
    ]


def _rows_of(catalogue: Catalogue) -> dict[tuple[str, str], dict[str, Any]]:
    return {(kind, m.id): flat(kind, m) for kind in KINDS for m in catalogue.records(kind)}


def _json_records(data: bytes, source: str) -> list[tuple[int, Any]]:
    """The objects of a JSON array or of JSON Lines, with their line (array: position)."""
    text = data.decode("utf-8-sig", errors="strict")
    if text.lstrip().startswith("["):
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise CatalogueInvalid(source, [RowError(0, "-", f"not JSON: {exc}")]) from None
        return list(enumerate(items, start=1))
    out: list[tuple[int, Any]] = []
    errors: list[RowError] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                out.append((n, orjson.loads(raw)))
            except orjson.JSONDecodeError as exc:
                errors.append(RowError(n, "-", f"not JSON: {exc}"))
    if errors:
        raise CatalogueInvalid(source, errors)
    return out


def patch_rows(
    data: bytes, fmt: Format | None, source: str
) -> list[tuple[int, str, str, dict[str, Any] | None]]:
    """The records a PATCH names: (line, kind, id, columns to set; None: remove). JSON (an
    array or JSON Lines: ``null`` unsets a column, ``"remove": true`` removes the record) or
    CSV (``fmt`` csv: an empty cell leaves the column as it is)."""
    errors: list[RowError] = []
    out: list[tuple[int, str, str, dict[str, Any] | None]] = []
    if fmt == "csv":
        rows, errors = read_rows(data, "csv", source)
        items: list[tuple[int, Any]] = [(r.line, r.cells) for r in rows]
    else:
        try:
            items = _json_records(data, source)
        except UnicodeDecodeError:
            raise CatalogueInvalid(source, [RowError(0, "-", "not UTF-8 text")]) from None
    for line, obj in items:
        if not isinstance(obj, dict):
            errors.append(
                RowError(line, "-", f"a JSON object per record, not {type(obj).__name__}")
            )
            continue
        kind, ident = obj.get("kind"), obj.get("id")
        if kind not in KINDS:
            errors.append(RowError(line, "kind", f"{kind!r} is not sku, scale or shelf"))
            continue
        if not isinstance(ident, str) or not ident:
            errors.append(RowError(line, "id", "required", kind=str(kind)))
            continue
        cells = {k: v for k, v in obj.items() if k not in ("kind", "id")}
        if cells.pop(PATCH_REMOVE, False) is True:
            if cells:
                errors.append(
                    RowError(line, "-", "a removed record names no other column", kind, ident)
                )
                continue
            out.append((line, kind, ident, None))
            continue
        unknown = sorted(k for k in cells if k not in COLUMNS[cast(Kind, kind)])
        for name in unknown:
            errors.append(RowError(line, name, f"not a column of a {kind} row", kind, ident))
        if not unknown:
            out.append((line, kind, ident, cells))
    if errors:
        raise CatalogueInvalid(source, errors)
    return out


def patched(
    current: Catalogue, data: bytes, fmt: Format | None, zones: set[str], source: str
) -> Catalogue:
    """``current`` with the records of a PATCH body changed, added or removed, validated
    whole; CatalogueInvalid naming each bad row (its line in the body) and column."""
    records = _rows_of(current)
    lines: dict[tuple[str, str], int] = {}
    errors: list[RowError] = []
    for line, kind, ident, cells in patch_rows(data, fmt, source):
        key = (kind, ident)
        if cells is None:
            if records.pop(key, None) is None:
                errors.append(RowError(line, "id", f"no {kind} {ident!r} to remove", kind, ident))
            continue
        rec = records.setdefault(key, {"id": ident})
        rec.update(cells)
        lines[key] = line
    if errors:
        raise CatalogueInvalid(source, errors)
    rows = [
        Row(lines.get(key, 0), {"kind": key[0], **{k: v for k, v in rec.items() if v is not None}})
        for key, rec in records.items()
    ]
    # Kinds in file order (a record added by the patch goes after its kind's others).
    rows.sort(key=lambda r: KINDS.index(r.cells["kind"]))
    return validate(rows, zones, source)


def put_catalogue(data: bytes, fmt: Format, zones: set[str], source: str) -> Catalogue:
    """The whole catalogue of a PUT body, validated; CatalogueInvalid otherwise."""
    rows, errors = read_rows(data, fmt, source)
    return validate(rows, zones, source, errors)


def check_role(changes: CatalogueDiff, may_change_all: bool) -> None:
    """ChangeRefused (403) naming each record or column a supervisor may not change."""
    if may_change_all:
        return
    bad: list[str] = []
    for c in changes.changes:
        if c.op != "change":
            bad.append(f"{c.kind} {c.id}: {'adding' if c.op == 'add' else 'removing'} a record")
            continue
        bad += [
            f"{c.kind} {c.id} column {k}" for k in c.fields if k not in THRESHOLD_COLUMNS[c.kind]
        ]
    if bad:
        raise ChangeRefused(
            403,
            "a supervisor changes thresholds only (SKU reorder_point, safety_stock, max_stock, "
            "dwell_s, hysteresis_units, lead_time_d, pack_multiple; shelf shelf_reorder_point, "
            "shelf_safety_stock); an engineer may change: " + "; ".join(bad),
            bad,
        )


def check_live(changes: CatalogueDiff) -> None:
    """ChangeRefused (409) naming each change a running controller does not take yet."""
    bad: list[str] = []
    for c in changes.changes:
        if c.op == "add" and c.kind == "scale" and (c.after or {}).get("format") == "esphome":
            # Its topics need subscriptions the MQTT session was opened without.
            bad.append(f"+ scale {c.id} (an ESPHome scale: needs a restart)")
            continue
        if c.op != "change":
            continue  # records come and go live
        cols = [k for k in c.fields if k not in LIVE_COLUMNS[c.kind]]
        if cols:
            bad.append(f"~ {c.kind} {c.id}: {', '.join(cols)}")
    if bad:
        raise ChangeRefused(
            409,
            "a running controller does not take a shelf's zone, scale or channel, a scale's "
            "zone, format, channels or ESPHome names, or a new ESPHome scale; "
            "stop it and use `floorhand catalog import` for: " + "; ".join(bad),
            bad,
        )


def _site_with(site: SiteConfig, after: Catalogue) -> tuple[SiteConfig, dict[str, ShelfSpec]]:
    """``site`` with the records of ``after``, and its shelves' specs."""
    fields = {name: getattr(site, name) for name in SiteConfig.model_fields}
    fields.update(skus=after.skus, scales=after.scales, shelves=after.shelves)
    with_after = SiteConfig.model_construct(**fields)
    return with_after, shelf_specs(with_after)


def _worker_connection(journal: Journal) -> Journal:
    """A connection of the journal for the calling worker thread: its transactions take turns
    with ingest's commits (`Journal.transaction`) and wait for them as the main one does."""
    conn = journal.second_connection(busy_timeout_s=WORKER_BUSY_TIMEOUT_S)
    conn.open_second()
    return conn


def _stage(
    journal: Journal,
    after: Catalogue,
    changes: CatalogueDiff,
    from_version: int,
    actor: str,
    detail: str,
    clock: Callable[[], float],
) -> catalog_store.Staged:
    conn = _worker_connection(journal)
    try:
        return catalog_store.stage(
            conn.transaction,
            after,
            changes,
            from_version=from_version,
            actor=actor,
            source=API_SOURCE,
            detail=detail,
            clock=clock,
        )
    finally:
        conn.close()


def _finish(journal: Journal, staged: catalog_store.Staged) -> None:
    conn = _worker_connection(journal)
    try:
        catalog_store.finish(conn.transaction, staged)
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the apply of a change touches, made off the event loop (O(records)) so that the
    apply on it is O(changed) where the services allow."""

    alerts: AlertSettings
    shelves: list[str]
    """Shelves added or removed."""
    scales: list[tuple[ScaleConfig | None, ScaleConfig | None]]
    """Scales added, removed or changed: before, after."""
    recount: list[str]
    """Shelves whose spec may have changed: changed, or on a changed scale."""


def _apply_plan(
    before: Catalogue, after: Catalogue, changes: CatalogueDiff, site: SiteConfig
) -> _Plan:
    shelves = [c.id for c in changes.changes if c.kind == "shelf" and c.op != "change"]
    scale_ids = {c.id for c in changes.changes if c.kind == "scale"}
    scales: list[tuple[ScaleConfig | None, ScaleConfig | None]] = []
    if scale_ids:
        old = {sc.id: sc for sc in before.scales if sc.id in scale_ids}
        new = {sc.id: sc for sc in after.scales if sc.id in scale_ids}
        scales = [(old.get(i), new.get(i)) for i in sorted(scale_ids)]
    # A shelf's spec is made of its own columns and its scale's (ingest.shelf_specs), never
    # its SKU's: a SKU's change (a threshold) recounts no shelf.
    changed = {c.id for c in changes.changes if c.kind == "shelf" and c.op == "change"}
    recount = [sh.id for sh in after.shelves if sh.id in changed or sh.scale in scale_ids]
    return _Plan(AlertSettings.from_site(site), shelves, scales, recount)


class CatalogueEditor:
    """The catalogue in force on a running controller, and the one way to change it (on the
    event loop, the state owner: ingest, alerts and the read model see one catalogue)."""

    def __init__(
        self,
        rt: Runtime,
        *,
        on_applied: Callable[[Catalogue, CatalogueDiff], None] | None = None,
    ) -> None:
        """``on_applied(after, changes)`` is called once a change is applied and its event
        published (for the API's caches that are not on the bus)."""
        self._rt = rt
        site = rt.site
        self.current = Catalogue(site.skus, site.scales, site.shelves, version=rt.catalogue_version)
        self.zones = {z.id for z in site.zones}
        self._on_applied = on_applied
        self.lock = asyncio.Lock()
        """Held by a change from its plan to its end (the desk's hand-over awaits)."""

    @property
    def inline(self) -> bool:
        return self._rt.catalogue_inline

    def refuse_inline(self) -> None:
        """ChangeRefused (409) when the site file declares the catalogue."""
        if self.inline:
            raise ChangeRefused(
                409,
                "the site file declares the catalogue inline ([[skus]], [[scales]], "
                "[[shelves]]): change it there and restart, or export it, remove those tables "
                "and manage it as data (docs/catalogue.md)",
            )

    async def _hand_to_desk(
        self,
        catalogue: Catalogue,
        specs: list[ShelfSpec],
        removed_skus: frozenset[str] = frozenset(),
        moved_shelves: frozenset[str] = frozenset(),
    ) -> None:
        picking = self._rt.picking
        conflicts = await picking.on_control(
            picking.desk.apply_catalogue,
            frozenset(s.id for s in catalogue.skus),
            specs,
            removed_skus,
            moved_shelves,
        )
        if conflicts:
            raise ChangeRefused(
                409,
                "open pick tasks take units of a SKU this change removes or from a shelf it "
                "moves: let them finish, or cancel their orders, then change it: "
                + "; ".join(conflicts),
                conflicts,
            )

    def version(self) -> int:
        return self._rt.catalogue_version

    def versions(self) -> list[catalog_store.VersionRow]:
        return catalog_store.versions(self._rt.journal.db)

    def version_audit(self, version: int) -> list[dict[str, Any]]:
        return catalog_store.version_audit(self._rt.journal.db, version)

    def plan(self, after: Catalogue) -> CatalogueDiff:
        return diff(self.current, after)

    async def apply(
        self, after: Catalogue, changes: CatalogueDiff, *, actor: str, detail: str
    ) -> Applied:
        """Journal ``after`` as a new version with its audit rows (written in short
        transactions from a worker thread, then swapped in by one short transaction:
        catalog_store.stage, swap), apply it to the running services and announce it. The
        caller holds ``lock``. ChangeRefused (409) naming each open pick task a removed SKU or
        a moved shelf would strand;
        JournalError when the journal cannot store it, ChangeRefused (409) when its catalogue
        version moved meanwhile (nothing changed either way)."""
        rt = self._rt
        if not changes and self.current.same_records(after):
            return Applied(rt.catalogue_version, changes)
        # O(records) and pure: off the event loop, which ingest needs meanwhile.
        site, specs = await asyncio.to_thread(_site_with, rt.site, after)
        plan = await asyncio.to_thread(_apply_plan, self.current, after, changes, site)
        desk_changes = [
            c
            for c in changes.changes
            if (c.kind != "scale" and c.op != "change") or (c.kind == "shelf" and "sku" in c.fields)
        ]
        if desk_changes:
            # The order desk (control loop) takes the new SKUs and shelves first, or names the
            # open pick tasks that refuse them.
            await self._hand_to_desk(
                after,
                list(specs.values()),
                frozenset(c.id for c in desk_changes if c.kind == "sku" and c.op == "remove"),
                frozenset(c.id for c in desk_changes if c.kind == "shelf" and c.op != "add"),
            )
        journal = rt.journal
        try:
            # The records and audit rows written in short transactions from a worker thread
            # (ingest commits between them); then one short transaction swaps them in, on the
            # loop, so that no reading is counted between the journal's change and the apply.
            staged = await asyncio.to_thread(
                _stage, journal, after, changes, rt.catalogue_version, actor, detail, rt.clock
            )
            version = catalog_store.swap(journal.transaction, staged)
        except JournalError as exc:
            if desk_changes:
                await self._hand_to_desk(self.current, list(rt.specs.values()))
            if isinstance(exc, catalog_store.VersionMoved):
                raise ChangeRefused(409, str(exc)) from exc
            raise
        # From here on synchronous: no reading is counted against half a change.
        self.current = Catalogue(after.skus, after.scales, after.shelves, version=version)
        rt.catalogue_version = version
        rt.site = site
        if plan.shelves or plan.scales:
            rt.ingest.apply_topology(
                site.scales, specs, shelves=plan.shelves, scale_changes=plan.scales
            )
        ended = rt.alerts.apply_targets(plan.alerts)
        # Shelves whose counting columns or SKU changed recount (journaled and published as a
        # calibration's recount is: the alerts see the new counts). Only those are compared.
        rt.ingest.recount_specs({sid: specs[sid] for sid in plan.recount}, rt.clock())
        counts = changes.counts()
        now = rt.clock()
        event = CatalogChanged(
            ts_s=now,
            version=version,
            by=actor,
            source=API_SOURCE,
            added=counts["add"],
            removed=counts["remove"],
            changed=counts["change"],
            skus=tuple(c.id for c in changes.changes if c.kind == "sku"),
            shelves=tuple(c.id for c in changes.changes if c.kind == "shelf"),
            ended=tuple(ended),
        )
        try:
            rt.journal.commit((), events=[EventRow(now, event.kind, event.as_dict())])
        except JournalError as exc:  # the version is stored; only its event is missing
            log.error("catalogue version %d: its event could not be journaled: %s", version, exc)
        log.info(
            "catalogue version %d by %s (api): %d added, %d removed, %d changed",
            version,
            actor,
            counts["add"],
            counts["remove"],
            counts["change"],
        )
        rt.bus.publish([event])  # its listeners (alerts, the read model) run now
        if self._on_applied is not None:
            self._on_applied(after, changes)
        try:
            await asyncio.to_thread(_finish, journal, staged)
        except JournalError as exc:  # the version is in force; the next change or start cleans
            log.warning("catalogue version %d: the replaced records stay for now: %s", version, exc)
        return Applied(version, changes, tuple(ended))
