"""Alert acknowledgement and snooze: the pure rules (domain.reorder) and the service (commit,
retained state, bus event, expiry, restart) on an injected clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.adapters.journal import Journal, JournalError
from controller.domain.events import AlertEscalated, AlertRaised, AlertResolved
from controller.domain.model import ReorderPolicy, StockState
from controller.domain.reorder import (
    AlertState,
    Episode,
    NoActiveEpisode,
    acknowledge,
    end_snooze,
    evaluate,
    notifies,
    snooze,
)
from controller.ports import JournalUnavailable
from controller.services.alerts import AlertService, AlertSettings
from tests.sites import TARE_G, UNIT_G
from tests.unit.test_alerts_service import World

POLICY = ReorderPolicy(reorder_point=20, safety_stock=5, max_stock=100, dwell_s=1.0)
T0 = 1_000.0


def feed(state: AlertState, level: int, t: float) -> tuple[AlertState, list[Any]]:
    """The level held from ``t`` to past its dwell."""
    state, a = evaluate(state, POLICY, level, t)
    state, b = evaluate(state, POLICY, level, t + POLICY.dwell_s + 0.1)
    return state, [*a, *b]


def raised() -> AlertState:
    state, trs = feed(AlertState("K"), 15, T0)
    assert [type(t) for t in trs] == [AlertRaised]
    return state


# -- domain ---------------------------------------------------------------------------------------


def test_ack_and_snooze_need_an_active_episode() -> None:
    with pytest.raises(NoActiveEpisode):
        acknowledge(AlertState("K"), "sup", "", T0)
    with pytest.raises(NoActiveEpisode):
        snooze(AlertState("K"), "sup", "why", 60, T0)
    ok, _ = feed(AlertState("K"), 50, T0)
    assert ok.episode is None
    with pytest.raises(NoActiveEpisode):
        acknowledge(ok, "sup", "", T0)


def test_ack_records_who_when_and_the_note() -> None:
    state = raised()
    new, ev = acknowledge(state, "sup", "PO 4711", T0 + 5)
    assert new.episode is not None
    assert (new.episode.acked_by, new.episode.acked_at_s, new.episode.ack_note) == (
        "sup",
        T0 + 5,
        "PO 4711",
    )
    assert new.episode.episode_id == state.episode.episode_id  # type: ignore[union-attr]
    body = ev.as_dict()
    assert body["kind"] == "alert_ack"
    assert (body["by"], body["note"], body["severity"]) == ("sup", "PO 4711", "low")
    assert state.episode is not None
    assert state.episode.acked_by is None, "input untouched"


@pytest.mark.parametrize(("duration_s", "reason"), [(0, "x"), (-1, "x"), (86_401, "x"), (60, " ")])
def test_snooze_bounds(duration_s: float, reason: str) -> None:
    with pytest.raises(ValueError, match="snooze"):
        snooze(raised(), "sup", reason, duration_s, T0)


def test_snooze_ends_when_it_runs_out_and_renotifies() -> None:
    state, ev = snooze(raised(), "sup", "truck at 2", 600, T0 + 10)
    assert ev.until_s == T0 + 610
    assert state.episode is not None
    assert state.episode.snoozed(T0 + 609)
    same, none = end_snooze(state, T0 + 609)
    assert none is None
    assert same is state
    lifted, ended = end_snooze(state, T0 + 610)
    assert ended is not None
    assert (ended.kind, ended.snoozed_by, ended.acked) == ("alert_snooze_ended", "sup", False)
    assert lifted.episode is not None
    assert (lifted.episode.snoozed_until_s, lifted.episode.snoozed_by) == (None, None)


def test_deescalation_keeps_ack_and_snooze_escalation_clears_them() -> None:
    state, trs = feed(AlertState("K"), 0, T0)  # OUT
    assert state.episode is not None
    assert state.episode.severity is StockState.OUT
    state, _ = acknowledge(state, "sup", "", T0 + 2)
    state, _ = snooze(state, "sup", "delivery", 3_600, T0 + 2)
    # Better (OUT -> LOW), but not resolved: both stay, and the change does not notify.
    before = state.episode
    state, trs = feed(state, 15, T0 + 3)
    assert [t.kind for t in trs] == ["alert_deescalated"]
    assert not notifies(trs[0], before, T0 + 5)
    assert state.episode is not None
    assert state.episode.severity is StockState.LOW
    assert state.episode.acked_by == "sup"
    assert state.episode.snoozed_by == "sup"
    # Worse (LOW -> CRITICAL): notifies even though snoozed, and needs a new ack.
    before = state.episode
    state, trs = feed(state, 3, T0 + 6)
    assert [type(t) for t in trs] == [AlertEscalated]
    assert notifies(trs[0], before, T0 + 8)
    assert state.episode is not None
    assert state.episode.severity is StockState.CRITICAL
    assert state.episode.acked_by is None
    assert state.episode.snoozed_until_s is None


def test_resolution_ends_ack_and_snooze_with_the_episode() -> None:
    state, _ = acknowledge(raised(), "sup", "", T0 + 2)
    state, _ = snooze(state, "sup", "x", 3_600, T0 + 2)
    before = state.episode
    state, trs = feed(state, 50, T0 + 3)
    assert [type(t) for t in trs] == [AlertResolved]
    assert not notifies(trs[0], before, T0 + 5), "resolution of a snoozed episode is quiet"
    assert state.episode is None
    state, trs = feed(state, 15, T0 + 10)
    assert [type(t) for t in trs] == [AlertRaised]
    assert state.episode is not None
    assert (state.episode.acked_by, state.episode.snoozed_until_s) == (None, None)


def test_episode_round_trip_and_old_snapshots() -> None:
    state, _ = acknowledge(raised(), "sup", "n", T0 + 2)
    state, _ = snooze(state, "eng", "r", 60, T0 + 3)
    assert AlertState.from_dict(state.to_dict()) == state
    old = state.to_dict()
    for k in ("acked_by", "acked_at_s", "ack_note", "snoozed_until_s", "snoozed_by"):
        del old["episode"][k]
    del old["episode"]["snooze_reason"]
    restored = AlertState.from_dict(old)
    ep = state.episode
    assert ep is not None
    assert restored.episode == Episode(ep.episode_id, StockState.LOW, ep.raised_at_s, 15, 20)


# -- service --------------------------------------------------------------------------------------


def low_alert(tmp_path: Path) -> World:
    w = World(tmp_path, reorder_point=20, dwell_s=2.0)
    for _ in range(10):
        w.reading(TARE_G + 5 * UNIT_G)
        w.advance(0.5)
    assert len(w.kinds("alert_raised")) == 1
    return w


def test_service_ack_commits_publishes_and_survives_a_reopen(tmp_path: Path) -> None:
    w = low_alert(tmp_path)
    n_published = len(w.link.published)
    public = w.alerts.acknowledge("K0", "sup", "seen", w.now)
    assert (public["acked_by"], public["acked_at"], public["ack_note"]) == ("sup", w.now, "seen")
    # Retained state republished with the ack; event on the bus and in the journal.
    topic, body = w.link.published[-1]
    assert len(w.link.published) == n_published + 1
    assert topic == "fh/t/alerts/K0"
    assert (body["active"], body["acked_by"]) == (True, "sup")
    [ev] = w.kinds("alert_ack")
    assert (ev["key"], ev["by"], ev["sku"], ev["notify"]) == ("K0", "sup", "K0", False)
    kinds = [r[0] for r in w.journal.db.execute("SELECT kind FROM events")]
    assert "alert_ack" in kinds
    w.alerts.snooze("K0", "sup", "truck due", 120, w.now)
    w.journal.close()
    # A new service on the reopened journal restores the ack and the snooze.
    journal = Journal(tmp_path / "journal.sqlite")
    restored = journal.open()
    try:
        svc = AlertService(
            AlertSettings.from_site(w.site),
            journal,
            w.link,
            lambda e: None,
            w.ingest.states,
            w.ingest.specs,
        )
        svc.restore(restored.alert_states)
        ep = svc.alerts["K0"].episode
        assert ep is not None
        assert (ep.acked_by, ep.ack_note, ep.snoozed_by, ep.snooze_reason) == (
            "sup",
            "seen",
            "sup",
            "truck due",
        )
        assert ep.snoozed_until_s == w.now + 120
    finally:
        journal.close()


def test_service_snooze_suppresses_then_renotifies(tmp_path: Path) -> None:
    w = low_alert(tmp_path)
    w.alerts.snooze("K0", "sup", "delivery at 14:00", 60, w.now)
    [ev] = w.kinds("alert_snooze")
    assert ev["until_s"] == w.now + 60
    assert w.alerts.public("K0")["snoozed_until"] == w.now + 60
    # Stock goes to zero while snoozed: the escalation still notifies and ends the snooze.
    for _ in range(10):
        w.reading(TARE_G)
        w.advance(0.5)
    [esc] = w.kinds("alert_escalated")
    assert esc["notify"] is True
    assert w.alerts.public("K0")["snoozed_until"] is None
    # Snooze again; it runs out with the episode still active: re-notified once.
    w.alerts.snooze("K0", "sup", "still waiting", 1, w.now)
    w.advance(0.5)
    assert not w.kinds("alert_snooze_ended")
    w.advance(0.6)
    [ended] = w.kinds("alert_snooze_ended")
    assert ended["notify"] is True
    assert w.link.published[-1][1]["snoozed_until"] is None
    w.advance(5)
    assert len(w.kinds("alert_snooze_ended")) == 1


def test_service_quiet_deescalation_while_snoozed(tmp_path: Path) -> None:
    w = World(tmp_path, reorder_point=20, dwell_s=2.0)
    for _ in range(10):
        w.reading(TARE_G)  # OUT
        w.advance(0.5)
    w.alerts.snooze("K0", "sup", "delivery", 600, w.now)
    for _ in range(10):
        w.reading(TARE_G + 10 * UNIT_G)  # LOW
        w.advance(0.5)
    [de] = w.kinds("alert_deescalated")
    assert de["notify"] is False
    assert w.alerts.public("K0")["snooze_reason"] == "delivery"


def test_service_errors_leave_the_state_alone(tmp_path: Path) -> None:
    w = World(tmp_path, reorder_point=20, dwell_s=2.0)
    with pytest.raises(NoActiveEpisode):
        w.alerts.acknowledge("K0", "sup", "", w.now)
    with pytest.raises(KeyError):
        w.alerts.acknowledge("nope", "sup", "", w.now)
    (tmp_path / "b").mkdir()
    w = low_alert(tmp_path / "b")
    before = w.alerts.alerts["K0"]
    published = len(w.link.published)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise JournalError("disk full")

    w.alerts._journal.commit = broken  # type: ignore[method-assign]
    with pytest.raises(JournalError):
        w.alerts.acknowledge("K0", "sup", "", w.now)
    assert w.alerts.alerts["K0"] is before
    assert len(w.link.published) == published
    assert not w.kinds("alert_ack")


def test_an_unavailable_journal_delays_the_end_of_a_snooze_until_it_commits(
    tmp_path: Path,
) -> None:
    """JournalUnavailable (disk full, locked): counted, the snooze stays, and the next tick
    after the journal is back ends it, once."""
    w = low_alert(tmp_path)
    w.alerts.snooze("K0", "sup", "truck due", 1, w.now)
    real_commit = w.journal.commit
    failures = [2]

    def full(*args: Any, **kwargs: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise JournalUnavailable("journal commit failed: database or disk is full")
        real_commit(*args, **kwargs)

    w.alerts._journal.commit = full  # type: ignore[method-assign]
    w.alerts._expire_snoozes(w.now + 2)
    w.alerts._expire_snoozes(w.now + 2)
    assert w.alerts.commit_failures == 2
    assert not w.kinds("alert_snooze_ended")
    assert w.alerts.public("K0")["snoozed_until"] is not None
    w.alerts._expire_snoozes(w.now + 2)
    assert len(w.kinds("alert_snooze_ended")) == 1
    assert w.alerts.public("K0")["snoozed_until"] is None


def test_a_programming_error_is_not_counted_as_a_journal_failure(tmp_path: Path) -> None:
    """Only JournalUnavailable is "retry at the next tick": a bug around the commit (here the
    commit's own signature) surfaces, is not counted in ``commit_failures`` and leaves the
    in-memory state as the journal has it."""
    w = low_alert(tmp_path)
    w.alerts.snooze("K0", "sup", "truck due", 1, w.now)
    snoozed = w.alerts.alerts["K0"]

    class BuggyStore:
        def commit(self, *args: Any, **kwargs: Any) -> None:
            raise TypeError("commit() got an unexpected keyword argument 'alert_state'")

    w.alerts._journal = BuggyStore()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="unexpected keyword"):
        w.alerts._expire_snoozes(w.now + 2)  # the end of the snooze
    assert w.alerts.alerts["K0"] is snoozed
    for _ in range(10):  # stock recovers: the resolution's commit meets the same bug
        w.reading(TARE_G + 35 * UNIT_G)
        w.now += 0.5
    with pytest.raises(TypeError, match="unexpected keyword"):
        w.alerts._evaluate(["K0"], w.now)
    assert w.alerts.alerts["K0"] is snoozed
    assert w.alerts.commit_failures == 0
    assert not w.kinds("alert_resolved")
