"""Reorder alerts: one state machine per key (a SKU, or a shelf with its own policy).

Rules (levels in units, times in seconds, ``h`` = ``policy.hysteresis_units``):

* A level of ``None`` (unknown) makes the state UNKNOWN, clears both dwell timers and keeps the
  episode: nothing is ever raised, escalated, de-escalated or resolved on missing data.
* Getting worse is sticky. With no episode, a LOW/CRITICAL/OUT level starts a pending raise; it
  fires once ``dwell_s`` has passed since that first alerting level, at a moment the level is
  alerting. Returning to OK lapses it, but only OK held for ``dwell_s`` cancels it, so a level
  flapping around the reorder point raises exactly once instead of never. Escalation
  (LOW → CRITICAL → OUT, a class worse than the episode's severity) works the same way.
* Getting better must hold. An episode resolves only after the level stays above
  ``reorder_point + h`` for ``dwell_s`` without interruption; it de-escalates (e.g. OUT → LOW)
  only after the level stays above the severity's threshold + ``h``, and at or below the
  reorder point, for ``dwell_s``. Levels in ``(reorder_point, reorder_point + h]`` never
  change an active episode.
* Time passed under the previous level counts (the level is held between calls): a dwell that
  completed before ``now_s`` fires with the timestamp at which it completed, so transitions and
  episode ids do not depend on how often ``evaluate``/``tick`` is called.

Acknowledgement and snooze (supervisors, through the API) live on the episode:

* ``acknowledge`` records who acknowledged it, when, and a note; ``snooze`` silences
  re-notification until a time, with who and why. Both need an active episode
  (``NoActiveEpisode`` otherwise) and both end with it: a resolved episode takes its ack and
  snooze along, a new episode starts without them.
* De-escalation keeps them. Escalation to a worse severity clears them: a worse situation needs
  a new acknowledgement, and it always notifies (``notifies``), snoozed or not.
* While snoozed, the episode's other transitions (de-escalation, resolution) carry
  ``notify = False``; ``end_snooze`` lifts an expired snooze and reports it with
  ``AlertSnoozeEnded``, the re-notification (``notify`` unless the episode is acknowledged).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from controller.domain.events import (
    AlertDeescalated,
    AlertEscalated,
    AlertRaised,
    AlertResolved,
    AlertTransition,
    _Event,
)
from controller.domain.model import SEVERITY_RANK, ReorderPolicy, StockState

_STATE_VERSION: Final = 1
_NO_TRANSITIONS: Final[tuple[AlertTransition, ...]] = ()
_OK: Final = StockState.OK
_LOW: Final = StockState.LOW
_CRITICAL: Final = StockState.CRITICAL
_OUT: Final = StockState.OUT
_UNKNOWN: Final = StockState.UNKNOWN


def classify(level: int | None, policy: ReorderPolicy) -> StockState:
    """None → UNKNOWN; ≤ 0 → OUT; ≤ safety stock → CRITICAL; ≤ reorder point → LOW; else OK."""
    if level is None:
        return _UNKNOWN
    if level <= 0:
        return _OUT
    if level <= policy.safety_stock:
        return _CRITICAL
    if level <= policy.reorder_point:
        return _LOW
    return _OK


def threshold(severity: StockState, policy: ReorderPolicy) -> int:
    """The limit a level is at or below in ``severity``: reorder point, safety stock or 0."""
    if severity is _LOW:
        return policy.reorder_point
    if severity is _CRITICAL:
        return policy.safety_stock
    if severity is _OUT:
        return 0
    raise ValueError(f"no threshold for {severity}")


def suggested_order_qty(level: int, policy: ReorderPolicy) -> int:
    """Units to order to get back to ``max_stock``, in whole packs of ``pack_multiple``: the
    shortfall rounded up to the next multiple of the pack (0 when there is none). With a
    ``max_stock`` that is not a multiple of the pack the order overshoots it by less than one
    pack (max 100, packs of 12, level 15: 85 short, 8 packs, 96 units)."""
    short = max(policy.max_stock - level, 0)
    pack = policy.pack_multiple
    return -(-short // pack) * pack


def _classify_recovered(level: int, policy: ReorderPolicy) -> StockState:
    """Classification with the hysteresis applied upwards (for getting better)."""
    h = policy.hysteresis_units
    if level > policy.reorder_point + h:
        return _OK
    if level > policy.safety_stock + h:
        return _LOW
    if level > h:
        return _CRITICAL
    return _OUT


@dataclass(frozen=True, slots=True)
class Episode:
    """An alert from raise to resolve. ``level`` is the level when raised; ``threshold`` the
    limit of the current ``severity``. ``acked_*`` and ``snooze*`` are set by ``acknowledge`` and
    ``snooze`` (module docstring)."""

    episode_id: str
    severity: StockState
    raised_at_s: float
    level: int
    threshold: int
    acked_by: str | None = None
    acked_at_s: float | None = None
    ack_note: str = ""
    snoozed_until_s: float | None = None
    snoozed_by: str | None = None
    snooze_reason: str = ""

    def snoozed(self, now_s: float) -> bool:
        return self.snoozed_until_s is not None and now_s < self.snoozed_until_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "episode_id": self.episode_id,
            "severity": self.severity.value,
            "raised_at_s": self.raised_at_s,
            "level": self.level,
            "threshold": self.threshold,
            "acked_by": self.acked_by,
            "acked_at_s": self.acked_at_s,
            "ack_note": self.ack_note,
            "snoozed_until_s": self.snoozed_until_s,
            "snoozed_by": self.snoozed_by,
            "snooze_reason": self.snooze_reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Episode:
        # Ack and snooze keys are absent in states saved before they existed.
        acked_at_s = data.get("acked_at_s")
        until_s = data.get("snoozed_until_s")
        acked_by = data.get("acked_by")
        snoozed_by = data.get("snoozed_by")
        return cls(
            str(data["episode_id"]),
            StockState(data["severity"]),
            float(data["raised_at_s"]),
            int(data["level"]),
            int(data["threshold"]),
            None if acked_by is None else str(acked_by),
            None if acked_at_s is None else float(acked_at_s),
            str(data.get("ack_note") or ""),
            None if until_s is None else float(until_s),
            None if snoozed_by is None else str(snoozed_by),
            str(data.get("snooze_reason") or ""),
        )


@dataclass(frozen=True, slots=True)
class Pending:
    """A candidate transition waiting for its dwell: target ``state`` since ``since_s``.

    ``lapsed_s`` (worsening candidates only) is when the condition stopped holding; the
    candidate is dropped once it has not held for ``dwell_s``.
    """

    state: StockState
    since_s: float
    lapsed_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "since_s": self.since_s, "lapsed_s": self.lapsed_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pending:
        lapsed_s = data["lapsed_s"]
        return cls(
            StockState(data["state"]),
            float(data["since_s"]),
            None if lapsed_s is None else float(lapsed_s),
        )


@dataclass(frozen=True, slots=True)
class AlertState:
    """Alert state of one key.

    ``state`` classifies the latest ``level``; ``episode`` is the active alert, if any;
    ``pending`` a raise or escalation waiting for its dwell; ``recovering`` a de-escalation or
    resolution waiting for its dwell.
    """

    key: str
    state: StockState = _UNKNOWN
    level: int | None = None
    episode: Episode | None = None
    pending: Pending | None = None
    recovering: Pending | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe snapshot."""
        return {
            "v": _STATE_VERSION,
            "key": self.key,
            "state": self.state.value,
            "level": self.level,
            "episode": None if self.episode is None else self.episode.to_dict(),
            "pending": None if self.pending is None else self.pending.to_dict(),
            "recovering": None if self.recovering is None else self.recovering.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertState:
        """Restore a ``to_dict`` snapshot; raises ``ValueError`` on a foreign version."""
        if data.get("v") != _STATE_VERSION:
            raise ValueError(f"unsupported AlertState version: {data.get('v')!r}")
        level = data["level"]
        episode = data["episode"]
        pending = data["pending"]
        recovering = data["recovering"]
        return cls(
            str(data["key"]),
            StockState(data["state"]),
            None if level is None else int(level),
            None if episode is None else Episode.from_dict(episode),
            None if pending is None else Pending.from_dict(pending),
            None if recovering is None else Pending.from_dict(recovering),
        )


def _fire(
    key: str,
    policy: ReorderPolicy,
    episode: Episode | None,
    pending: Pending | None,
    recovering: Pending | None,
    level: int,
    now_s: float,
    held_since_s: float,
    out: list[AlertTransition],
) -> tuple[Episode | None, Pending | None, Pending | None]:
    """Settle the dwell timers at ``now_s``, ``level`` having held since ``held_since_s``."""
    dwell_s = policy.dwell_s
    if pending is not None:
        if pending.lapsed_s is not None:
            if now_s - pending.lapsed_s >= dwell_s:
                pending = None
        elif now_s - pending.since_s >= dwell_s:
            ts_s = max(pending.since_s + dwell_s, held_since_s)
            target = pending.state
            pending = None
            if episode is None:
                limit = threshold(target, policy)
                episode = Episode(f"{key}@{round(ts_s * 1000)}", target, ts_s, level, limit)
                qty = suggested_order_qty(level, policy)
                out.append(AlertRaised(key, episode.episode_id, target, level, limit, qty, ts_s))
            elif SEVERITY_RANK[target] > SEVERITY_RANK[episode.severity]:
                old = episode.severity
                limit = threshold(target, policy)
                # A new Episode value: escalation clears the ack and the snooze (module doc).
                episode = Episode(
                    episode.episode_id, target, episode.raised_at_s, episode.level, limit
                )
                out.append(AlertEscalated(key, episode.episode_id, old, target, level, limit, ts_s))
    if recovering is not None and episode is not None and now_s - recovering.since_s >= dwell_s:
        ts_s = max(recovering.since_s + dwell_s, held_since_s)
        target = recovering.state
        recovering = None
        if target is _OK:
            out.append(
                AlertResolved(
                    key, episode.episode_id, episode.severity, level, episode.raised_at_s, ts_s
                )
            )
            episode = None
            pending = None
        elif SEVERITY_RANK[target] < SEVERITY_RANK[episode.severity]:
            old = episode.severity
            limit = threshold(target, policy)
            episode = dataclasses.replace(episode, severity=target, threshold=limit)
            out.append(AlertDeescalated(key, episode.episode_id, old, target, level, limit, ts_s))
    return episode, pending, recovering


def evaluate(
    state: AlertState, policy: ReorderPolicy, level: int | None, now_s: float
) -> tuple[AlertState, tuple[AlertTransition, ...]]:
    """Feed the current ``level`` (None when unknown) at ``now_s``; return the new state and the
    transitions, oldest first. Call it again with the same level and a later time (or ``tick``)
    to let a dwell complete without a new level. ``now_s`` must not go backwards."""
    prev_level = state.level
    if level is None:
        if prev_level is None and state.pending is None and state.recovering is None:
            return state, _NO_TRANSITIONS
        return AlertState(state.key, _UNKNOWN, None, state.episode), _NO_TRANSITIONS
    if (
        level == prev_level
        and state.pending is None
        and state.recovering is None
        and classify(level, policy) is state.state
    ):
        # Nothing waits on a dwell, and the same level cannot start one.
        return state, _NO_TRANSITIONS

    key = state.key
    episode, pending, recovering = state.episode, state.pending, state.recovering
    out: list[AlertTransition] = []
    if prev_level is not None and (pending is not None or recovering is not None):
        episode, pending, recovering = _fire(
            key, policy, episode, pending, recovering, prev_level, now_s, -math.inf, out
        )

    cls = classify(level, policy)
    worse: StockState | None = None
    better: StockState | None = None
    if episode is None:
        if cls is not _OK:
            worse = cls
    else:
        rank = SEVERITY_RANK[episode.severity]
        if SEVERITY_RANK[cls] > rank:
            worse = cls
        else:
            recovered = _classify_recovered(level, policy)
            if SEVERITY_RANK[recovered] < rank and (recovered is _OK or cls is not _OK):
                better = recovered
    if worse is not None:
        if pending is None:
            pending = Pending(worse, now_s)
        elif pending.state is not worse or pending.lapsed_s is not None:
            pending = Pending(worse, pending.since_s)
    elif pending is not None and pending.lapsed_s is None:
        pending = Pending(pending.state, pending.since_s, now_s)
    if better is None:
        recovering = None
    elif recovering is None or recovering.state is not better:
        recovering = Pending(better, now_s)

    if (pending is not None and pending.lapsed_s is None) or recovering is not None:
        episode, pending, recovering = _fire(
            key, policy, episode, pending, recovering, level, now_s, now_s, out
        )
    new_state = AlertState(key, cls, level, episode, pending, recovering)
    return new_state, (tuple(out) if out else _NO_TRANSITIONS)


def tick(
    state: AlertState, policy: ReorderPolicy, now_s: float
) -> tuple[AlertState, tuple[AlertTransition, ...]]:
    """Let time pass at the last level (completes or cancels dwells); no-op while unknown."""
    return evaluate(state, policy, state.level, now_s)


# -- acknowledgement and snooze -------------------------------------------------------------------

MAX_SNOOZE_S: Final = 86_400.0
"""Longest snooze (24 h)."""


class NoActiveEpisode(ValueError):
    """Ack or snooze of a key that has no active episode."""


@dataclass(frozen=True, slots=True)
class AlertAcknowledged(_Event):
    """Someone acknowledged the active episode."""

    kind: ClassVar[str] = "alert_ack"
    key: str
    episode_id: str
    severity: StockState
    by: str
    note: str
    ts_s: float


@dataclass(frozen=True, slots=True)
class AlertSnoozed(_Event):
    """Re-notification of the active episode is silenced until ``until_s``."""

    kind: ClassVar[str] = "alert_snooze"
    key: str
    episode_id: str
    severity: StockState
    by: str
    reason: str
    until_s: float
    ts_s: float


@dataclass(frozen=True, slots=True)
class AlertSnoozeEnded(_Event):
    """A snooze ran out with the episode still active: the re-notification."""

    kind: ClassVar[str] = "alert_snooze_ended"
    key: str
    episode_id: str
    severity: StockState
    snoozed_by: str | None
    acked: bool
    ts_s: float


AlertManualEvent = AlertAcknowledged | AlertSnoozed | AlertSnoozeEnded


def _active(state: AlertState) -> Episode:
    if state.episode is None:
        raise NoActiveEpisode(f"{state.key} has no active alert episode")
    return state.episode


def acknowledge(
    state: AlertState, by: str, note: str, now_s: float
) -> tuple[AlertState, AlertAcknowledged]:
    """Record ``by``'s acknowledgement of the active episode (a later ack replaces it)."""
    ep = _active(state)
    new_ep = dataclasses.replace(ep, acked_by=by, acked_at_s=now_s, ack_note=note)
    event = AlertAcknowledged(state.key, ep.episode_id, ep.severity, by, note, now_s)
    return dataclasses.replace(state, episode=new_ep), event


def snooze(
    state: AlertState, by: str, reason: str, duration_s: float, now_s: float
) -> tuple[AlertState, AlertSnoozed]:
    """Silence re-notification of the active episode for ``duration_s`` (0 < d ≤ 24 h); a new
    snooze replaces the previous one."""
    if not (math.isfinite(duration_s) and 0 < duration_s <= MAX_SNOOZE_S):
        raise ValueError(f"snooze duration must be in (0, {MAX_SNOOZE_S:g}] s, got {duration_s}")
    if not reason.strip():
        raise ValueError("a snooze needs a reason")
    ep = _active(state)
    until_s = now_s + duration_s
    new_ep = dataclasses.replace(ep, snoozed_until_s=until_s, snoozed_by=by, snooze_reason=reason)
    event = AlertSnoozed(state.key, ep.episode_id, ep.severity, by, reason, until_s, now_s)
    return dataclasses.replace(state, episode=new_ep), event


def end_snooze(state: AlertState, now_s: float) -> tuple[AlertState, AlertSnoozeEnded | None]:
    """Lift a snooze that has run out by ``now_s`` (no-op otherwise)."""
    ep = state.episode
    if ep is None or ep.snoozed_until_s is None or now_s < ep.snoozed_until_s:
        return state, None
    new_ep = dataclasses.replace(ep, snoozed_until_s=None, snoozed_by=None, snooze_reason="")
    event = AlertSnoozeEnded(
        state.key, ep.episode_id, ep.severity, ep.snoozed_by, ep.acked_by is not None, now_s
    )
    return dataclasses.replace(state, episode=new_ep), event


def notifies(transition: AlertTransition, before: Episode | None, now_s: float) -> bool:
    """Whether ``transition`` should notify people: a raise or an escalation always does; other
    transitions not while the episode (as it was ``before``) is snoozed."""
    if isinstance(transition, AlertRaised | AlertEscalated):
        return True
    return before is None or not before.snoozed(now_s)
