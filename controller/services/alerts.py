"""Reorder alerts: SKU (and configured shelf) levels → alert state machine → journal → MQTT.

Runs after the ingest commit (a bus listener) for the SKUs whose stock changed, and on a tick so
dwell timers complete and missing data turns a level UNKNOWN. Transitions are committed to the
journal before they are published; the alert topic carries the retained state of each SKU, so a
restart republishes the same episode (same ``episode`` id), never a new one.

Supervisors acknowledge and snooze episodes (``acknowledge``, ``snooze``): the change is
committed with an ``alert_ack`` / ``alert_snooze`` event, then the retained state (with
``acked_by``, ``snoozed_until``...) is republished and the event goes on the bus. Every alert
transition event carries ``notify``: false while the episode is snoozed, except a raise or an
escalation (domain.reorder). The tick lifts expired snoozes (``alert_snooze_ended``, the
re-notification).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from controller.config import SiteConfig
from controller.domain.events import (
    AlertManualNotice,
    AlertNotice,
    AlertRaised,
    AlertResolved,
    BusEvent,
    ShelfStatusChanged,
    StockChanged,
)
from controller.domain.model import DERIVE, ReorderPolicy, ShelfSpec, StockState
from controller.domain.reorder import (
    AlertManualEvent,
    AlertState,
    Episode,
    acknowledge,
    end_snooze,
    evaluate,
    notifies,
    snooze,
    suggested_order_qty,
)
from controller.domain.stock import ShelfState, sku_level
from controller.ports import AlertStore, EventRow, JournalUnavailable, MessageLink
from devices.errors import DeviceError

FULL_EVALUATION_SLICE = 10_000
"""Keys a tick evaluates of the pass over every key after a start or a restore (with the keys
that changed): a 100k-SKU site's pass takes ten ticks (5 s) instead of holding the loop ~1 s."""

REPUBLISH_AT_ONCE = 2_000
"""Retained alert states published at once at start (`AlertService.republish_all`); the
others follow from the supervision tick, paced by the link's queue."""

log = logging.getLogger("floorhand.alerts")


@dataclass(frozen=True, slots=True)
class AlertTarget:
    """What an alert watches: a SKU (sum of its shelves) or a single shelf."""

    key: str
    sku: str
    shelves: tuple[str, ...]
    policy: ReorderPolicy


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """What the alert service needs of the site: where alert states go and what it watches."""

    topic_base: str
    """``<prefix>/<site>/alerts``: a target's retained state goes to ``<base>/<key>`` (a
    ``shelf:<id>`` key as ``shelf/<id>``)."""
    targets: tuple[AlertTarget, ...]

    @classmethod
    def from_site(cls, site: SiteConfig) -> AlertSettings:
        """One target per SKU (the sum of its shelves), one per shelf with its own reorder
        point."""
        targets: list[AlertTarget] = []
        shelves_of: dict[str, list[str]] = {}
        for shelf in site.shelves:
            shelves_of.setdefault(shelf.sku, []).append(shelf.id)
        skus = {sku.id: sku for sku in site.skus}
        # Equal policies are one object: a site's SKUs share a handful of reorder rules, and a
        # policy per SKU was 100k objects (and checks) at a large site's start.
        policies: dict[tuple[int, int, int, int | None, float, int], ReorderPolicy] = {}
        for sku in site.skus:
            rule = (
                sku.reorder_point,
                sku.safety_stock,
                sku.max_stock,
                sku.hysteresis_units,
                sku.dwell_s,
                sku.pack_multiple,
            )
            policy = policies.get(rule)
            if policy is None:
                policy = policies[rule] = ReorderPolicy(
                    reorder_point=sku.reorder_point,
                    safety_stock=sku.safety_stock,
                    max_stock=sku.max_stock,
                    hysteresis_units=(
                        sku.hysteresis_units if sku.hysteresis_units is not None else DERIVE
                    ),
                    dwell_s=sku.dwell_s,
                    pack_multiple=sku.pack_multiple,
                )
            targets.append(AlertTarget(sku.id, sku.id, tuple(shelves_of.get(sku.id, ())), policy))
        for shelf in site.shelves:
            if shelf.reorder is not None:
                policy = ReorderPolicy(
                    reorder_point=shelf.reorder.reorder_point,
                    safety_stock=shelf.reorder.safety_stock,
                    max_stock=shelf.capacity_units,
                    dwell_s=skus[shelf.sku].dwell_s,
                    pack_multiple=skus[shelf.sku].pack_multiple,
                )
                targets.append(AlertTarget(f"shelf:{shelf.id}", shelf.sku, (shelf.id,), policy))
        return cls(f"{site.mqtt.topic_prefix}/{site.site.id}/alerts", tuple(targets))


class AlertStates(dict[str, AlertState]):
    """The alert state of every key, with the figures the health report needs kept as the
    states change: keys per ``StockState`` and the keys with an active episode. The report
    then costs O(active episodes), not O(keys) (a 100k-SKU site answers /health in
    microseconds). Every way of changing the mapping goes through `__setitem__` /
    `__delitem__`."""

    def __init__(self, items: Iterable[tuple[str, AlertState]] = ()) -> None:
        super().__init__()
        self.by_state: Counter[str] = Counter()
        self.active: set[str] = set()
        for key, state in items:
            self[key] = state

    @classmethod
    def unknown(cls, keys: Iterable[str]) -> AlertStates:
        """A new (UNKNOWN, no episode) state for each key, built in bulk: what
        ``AlertStates((k, AlertState(k)) for k in keys)`` builds, without a Python-level
        ``__setitem__`` per key (100k of them at a large site's start)."""
        out = cls()
        dict.update(out, ((k, AlertState(k)) for k in keys))
        if len(out):
            out.by_state[StockState.UNKNOWN.value] = len(out)
        return out

    def __setitem__(self, key: str, state: AlertState) -> None:
        old = self.get(key)
        if old is not None:
            self.by_state[old.state.value] -= 1
        super().__setitem__(key, state)
        self.by_state[state.state.value] += 1
        if state.episode is not None:
            self.active.add(key)
        else:
            self.active.discard(key)

    def __delitem__(self, key: str) -> None:
        old = self[key]
        super().__delitem__(key)
        self.by_state[old.state.value] -= 1
        self.active.discard(key)

    def update(  # type: ignore[override]
        self, other: Mapping[str, AlertState] | None = None, /, **kw: AlertState
    ) -> None:
        for key, state in {**(other or {}), **kw}.items():
            self[key] = state

    def pop(self, key: str, *default: Any) -> Any:
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        state = self[key]
        del self[key]
        return state

    def setdefault(self, *args: Any, **kw: Any) -> Any:
        raise TypeError("AlertStates: assign a key instead")

    def popitem(self) -> tuple[str, AlertState]:
        raise TypeError("AlertStates: delete a key instead")

    def clear(self) -> None:
        super().clear()
        self.by_state.clear()
        self.active.clear()


class AlertService:
    def __init__(
        self,
        settings: AlertSettings,
        journal: AlertStore,
        link: MessageLink,
        publish_events: Callable[[list[BusEvent]], None],
        shelf_states: Mapping[str, ShelfState],
        shelf_specs: dict[str, ShelfSpec],
    ) -> None:
        self._journal = journal
        self._link = link
        self._publish_events = publish_events
        self._states = shelf_states  # owned by ingest; read only here
        self._specs = shelf_specs
        self._topic_base = settings.topic_base
        self.targets: dict[str, AlertTarget] = {}
        self._by_shelf: dict[str, tuple[str, ...]] = {}
        """Shelf id → the keys whose level it feeds (a tuple: one per shelf, 100k at a large
        site)."""
        for target in settings.targets:
            self._add(target)
        self.alerts: AlertStates = AlertStates.unknown(self.targets)
        self.levels: dict[str, int | None] = dict.fromkeys(self.targets)
        self.published = 0
        self.publish_deferred = 0
        self.unpublished: set[str] = set()
        self.raised = 0
        self.commit_failures = 0
        self._dirty: set[str] = set()
        self._order = {key: i for i, key in enumerate(self.targets)}
        self._timed: set[str] = set()
        """Keys waiting on a dwell (``pending`` or ``recovering``): the tick evaluates these."""
        self._snoozed: set[str] = set()
        """Keys whose episode is snoozed: the tick lifts expired snoozes among these."""
        self._full_tick = True
        self._unevaluated: list[str] = []
        """Keys the evaluation of every key (after a start or a restore) has yet to reach,
        from ``_unevaluated_at`` on; `tick` takes ``full_slice`` of them at a time."""
        self._unevaluated_at = 0
        self.full_slice = FULL_EVALUATION_SLICE
        self.evaluated = 0
        """Keys evaluated so far (a tick evaluates the dirty and the timed ones, not all)."""

    def _add(self, target: AlertTarget) -> None:
        self.targets[target.key] = target
        by_shelf = self._by_shelf
        for sid in target.shelves:
            by_shelf[sid] = (*by_shelf.get(sid, ()), target.key)

    def apply_targets(self, settings: AlertSettings) -> list[str]:
        """A new catalogue's targets (docs/catalogue.md, "Live changes"): a key that stays
        keeps its state and episode and is evaluated again at the next tick with its new
        policy; a new key starts with no episode; a key that goes is forgotten. Returns the
        keys that went with an active episode (the caller says so in an event)."""
        old = dict(self.targets)
        new = {t.key: t for t in settings.targets}
        ended = [k for k in old if k not in new and self.alerts[k].episode is not None]
        # In place: the read model holds these mappings.
        self.targets.clear()
        self._by_shelf.clear()
        for target in settings.targets:
            self._add(target)
        for key in old.keys() - new.keys():
            del self.alerts[key]
            del self.levels[key]
        for key in new.keys() - old.keys():
            self.alerts[key] = AlertState(key)
            self.levels[key] = None
        self._order = {key: i for i, key in enumerate(self.targets)}
        self._timed &= self.targets.keys()
        self._snoozed &= self.targets.keys()
        self.unpublished &= self.targets.keys()
        self._dirty = {k for k in self._dirty if k in new} | {
            k for k, t in new.items() if old.get(k) != t
        }
        gone = old.keys() - new.keys()
        if gone:
            self._forget(sorted(gone), ended)
        return ended

    def _forget(self, keys: list[str], ended: list[str]) -> None:
        """Keys whose target left the catalogue: their journaled state is reset (a key added
        again later starts with no episode, after a restart too) and their retained topic
        cleared."""
        try:
            self._journal.commit(
                (), alert_states={k: AlertState(k).to_dict() for k in keys}, events=()
            )
        except JournalUnavailable as exc:
            log.error("could not reset the alert state of %s: %s", ", ".join(keys), exc)
        for key in keys:
            if key in ended:
                log.warning("alert %s: its target left the catalogue; its episode ended", key)
            try:
                self._link.publish(f"{self._topic_base}/{key.replace(':', '/')}", b"", 1, True)
            except DeviceError as exc:
                log.warning("could not clear the retained alert of %s: %s", key, exc)

    def restore(self, saved: dict[str, dict[str, Any]]) -> None:
        for key, body in saved.items():
            if key not in self.targets:
                continue
            try:
                self.alerts[key] = AlertState.from_dict(body)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("discarding unreadable saved alert %s: %s", key, exc)
        self._full_tick = True

    def republish_all(self, at_once: int = REPUBLISH_AT_ONCE) -> None:
        """Retained state of every target (at start: same episodes, no new notification): the
        first ``at_once`` now, the others marked ``unpublished`` for `retry_unpublished`, which
        the supervision tick calls with a budget paced by the link's queue. A 100k-SKU site
        spent ~1 s of its start (and held the loop) publishing them all at once."""
        keys = iter(self.targets)
        for key in itertools.islice(keys, max(0, at_once)):
            self._publish_state(key)
        self.unpublished.update(keys)

    # -- triggers -------------------------------------------------------------------------------
    def on_events(self, events: list[BusEvent]) -> None:
        """Bus listener: called after the ingest commit with the group's events."""
        for ev in events:
            if isinstance(ev, StockChanged | ShelfStatusChanged):
                keys = self._by_shelf.get(ev.shelf_id)
                if keys:
                    self._dirty.update(keys)

    def evaluate_dirty(self, now_s: float) -> None:
        if self._dirty:
            keys, self._dirty = self._dirty, set()
            self._evaluate(keys, now_s)

    def tick(self, now_s: float) -> None:
        """Completes dwell timers, lifts expired snoozes, and evaluates what changed since
        (levels change only with a shelf's count or status, which mark their keys dirty).
        Costs O(keys waiting on a dwell + keys changed), not O(keys); after a start or a
        restore every key is evaluated once more, ``full_slice`` keys per tick."""
        if self._full_tick:
            self._full_tick = False
            self._snoozed = {
                k
                for k, st in self.alerts.items()
                if st.episode is not None and st.episode.snoozed_until_s is not None
            }
            self._unevaluated = list(self.targets)
            self._unevaluated_at = 0
        batch: list[str] = []
        if self._unevaluated:
            # Every key once after a start or a restore, in slices: at 100k SKUs one pass held
            # the loop ~1 s. Keys that change meanwhile are dirty and evaluated as usual.
            at = self._unevaluated_at
            batch = self._unevaluated[at : at + self.full_slice]
            self._unevaluated_at = at + len(batch)
            if self._unevaluated_at >= len(self._unevaluated):
                self._unevaluated = []
        if batch or self._dirty or self._timed:
            keys = {k for k in batch if k in self.targets}
            keys |= self._dirty
            keys |= self._timed
            self._dirty = set()
            order = self._order
            self._evaluate(sorted(keys, key=order.__getitem__), now_s)
        if self._snoozed:
            self._expire_snoozes(now_s)

    @property
    def full_pass_pending(self) -> bool:
        """The evaluation of every key after a start or a restore is not finished yet."""
        return self._full_tick or bool(self._unevaluated)

    def figures(self) -> tuple[Mapping[str, int], list[Episode]]:
        """Keys per state and the active episodes (the health report): O(active episodes)."""
        alerts = self.alerts
        episodes = [ep for k in alerts.active if (ep := alerts[k].episode) is not None]
        return alerts.by_state, episodes

    def level_of(self, key: str) -> int | None:
        target = self.targets[key]
        return sku_level([self._states[s] for s in target.shelves])

    def _evaluate(self, keys: Any, now_s: float) -> None:
        changed: dict[str, AlertState] = {}
        old: dict[str, AlertState] = {}
        notices: list[AlertNotice] = []
        timed = self._timed
        for key in keys:
            self.evaluated += 1
            target = self.targets[key]
            level = self.level_of(key)
            self.levels[key] = level
            state = self.alerts[key]
            new, transitions = evaluate(state, target.policy, level, now_s)
            if new.pending is not None or new.recovering is not None:
                timed.add(key)
            elif key in timed:
                timed.discard(key)
            if new != state:
                old[key] = state
                changed[key] = new
                self.alerts[key] = new
            for tr in transitions:
                qty = suggested_order_qty(level, target.policy) if level is not None else None
                notify = notifies(tr, state.episode, now_s)
                notices.append(AlertNotice(tr, target.sku, qty, notify))
        if not changed:
            return
        try:
            self._journal.commit(
                (),
                alert_states={k: v.to_dict() for k, v in changed.items()},
                events=[EventRow(now_s, n.kind, n.as_dict()) for n in notices],
            )
        except JournalUnavailable as exc:
            self.commit_failures += 1
            self.alerts.update(old)
            self._dirty.update(old)
            log.error("alert state commit failed, will retry: %s", exc)
            return
        except BaseException:
            self.alerts.update(old)  # a bug: memory stays what the journal holds
            raise
        for n in notices:
            tr = n.transition
            if isinstance(tr, AlertRaised):
                self.raised += 1
                log.warning("reorder alert %s: %s, level %s", tr.key, tr.severity.value, tr.level)
            elif isinstance(tr, AlertResolved):
                log.info("reorder alert %s resolved, level %s", tr.key, tr.level)
        for key, new in changed.items():
            prev = old[key]
            if notices or _public(prev) != _public(new):
                self._publish_state(key)
        if notices:
            self._publish_events(list(notices))

    # -- acknowledgement and snooze (supervisors, via the API) -----------------------------------
    def acknowledge(self, key: str, by: str, note: str, now_s: float) -> dict[str, Any]:
        """Acknowledge ``key``'s active episode; returns its public state. ``KeyError`` for an
        unknown key, ``NoActiveEpisode`` without an episode, ``JournalError`` (nothing changed)
        when the commit fails."""
        new, event = acknowledge(self.alerts[key], by, note, now_s)
        self._commit_manual(key, new, event, notify=False)
        log.info("alert %s acknowledged by %s", key, by)
        return self.public(key)

    def snooze(
        self, key: str, by: str, reason: str, duration_s: float, now_s: float
    ) -> dict[str, Any]:
        """Snooze ``key``'s active episode for ``duration_s``; errors as ``acknowledge``, plus
        ``ValueError`` for a bad duration or an empty reason."""
        new, event = snooze(self.alerts[key], by, reason, duration_s, now_s)
        self._commit_manual(key, new, event, notify=False)
        log.info("alert %s snoozed by %s for %.0f s: %s", key, by, duration_s, reason)
        return self.public(key)

    def _expire_snoozes(self, now_s: float) -> None:
        for key in sorted(self._snoozed, key=self._order.__getitem__):
            state = self.alerts[key]
            ep = state.episode
            if ep is None or ep.snoozed_until_s is None:
                self._snoozed.discard(key)
                continue
            if now_s < ep.snoozed_until_s:
                continue
            new, event = end_snooze(state, now_s)
            if event is None:
                continue
            try:
                self._commit_manual(key, new, event, notify=not event.acked)
            except JournalUnavailable as exc:
                self.commit_failures += 1
                log.error("could not end the snooze of %s, will retry: %s", key, exc)

    def _commit_manual(
        self, key: str, new: AlertState, event: AlertManualEvent, *, notify: bool
    ) -> None:
        notice = AlertManualNotice(event, self.targets[key].sku, notify)
        self._journal.commit(
            (),
            alert_states={key: new.to_dict()},
            events=[EventRow(event.ts_s, event.kind, notice.as_dict())],
        )
        self.alerts[key] = new
        if new.episode is not None and new.episode.snoozed_until_s is not None:
            self._snoozed.add(key)
        else:
            self._snoozed.discard(key)
        try:
            self._publish_state(key)
        except Exception as exc:  # the link's queue is full while the broker is away
            log.error("could not publish the alert state of %s: %s", key, exc)
        self._publish_events([notice])

    # -- output ----------------------------------------------------------------------------------
    def public(self, key: str) -> dict[str, Any]:
        target = self.targets[key]
        state = self.alerts[key]
        level = self.levels.get(key)
        ep = state.episode
        return {
            "key": key,
            "sku": target.sku,
            "shelves": list(target.shelves),
            "state": state.state.value,
            "level": level,
            "reorder_point": target.policy.reorder_point,
            "safety_stock": target.policy.safety_stock,
            "threshold": target.policy.reorder_point,
            "active": ep is not None,
            "episode": ep.episode_id if ep else None,
            "severity": ep.severity.value if ep else None,
            "since": ep.raised_at_s if ep else None,
            "suggested_order_qty": (
                suggested_order_qty(level, target.policy) if level is not None else None
            ),
            "acked_by": ep.acked_by if ep else None,
            "acked_at": ep.acked_at_s if ep else None,
            "ack_note": ep.ack_note if ep and ep.acked_by is not None else None,
            "snoozed_until": ep.snoozed_until_s if ep else None,
            "snoozed_by": ep.snoozed_by if ep else None,
            "snooze_reason": ep.snooze_reason if ep and ep.snoozed_by is not None else None,
        }

    def _publish_state(self, key: str) -> None:
        """Retained state of ``key``. When the link's outgoing queue is full (a large site at
        start-up, or a long broker outage) the key is kept in ``unpublished`` for
        `retry_unpublished`; publishing never fails the caller."""
        topic = f"{self._topic_base}/{key.replace(':', '/')}"
        try:
            self._link.publish(topic, orjson.dumps(self.public(key)), qos=1, retain=True)
        except DeviceError:
            self.unpublished.add(key)
            self.publish_deferred += 1
            return
        self.unpublished.discard(key)
        self.published += 1

    def retry_unpublished(self, budget: int) -> int:
        """Publish up to ``budget`` deferred states (the supervision tick paces this by the
        link's queue); returns how many were handed to the link."""
        sent = 0
        for key in list(itertools.islice(self.unpublished, max(0, budget))):
            self._publish_state(key)
            if key in self.unpublished:
                break  # the queue is full again
            sent += 1
        return sent


def _public(state: AlertState) -> tuple[Any, ...]:
    ep = state.episode
    return (state.state, ep.episode_id if ep else None, ep.severity if ep else None)
