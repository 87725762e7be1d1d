"""Reorder alerts: classification, dwell, hysteresis, escalation, missing data, persistence."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.events import (
    AlertDeescalated,
    AlertEscalated,
    AlertRaised,
    AlertResolved,
    AlertTransition,
)
from controller.domain.model import (
    SEVERITY_RANK,
    Reading,
    ReorderPolicy,
    ShelfSpec,
    SkuSpec,
    StockState,
)
from controller.domain.reorder import (
    AlertState,
    Episode,
    Pending,
    classify,
    evaluate,
    suggested_order_qty,
    tick,
)
from controller.domain.stock import ShelfState, apply_reading, sku_level

OK, LOW, CRITICAL, OUT, UNKNOWN = (
    StockState.OK,
    StockState.LOW,
    StockState.CRITICAL,
    StockState.OUT,
    StockState.UNKNOWN,
)
POLICY = ReorderPolicy(reorder_point=20, safety_stock=5, max_stock=100)  # hysteresis 2, dwell 5


def run(
    samples: Sequence[tuple[float, int | None]],
    policy: ReorderPolicy = POLICY,
    state: AlertState | None = None,
) -> tuple[AlertState, list[AlertTransition]]:
    state = state if state is not None else AlertState("SKU-1")
    out: list[AlertTransition] = []
    for now_s, level in samples:
        state, transitions = evaluate(state, policy, level, now_s)
        out.extend(transitions)
    return state, out


def kinds(transitions: Sequence[AlertTransition]) -> list[str]:
    return [t.kind for t in transitions]


# --- plain cases -------------------------------------------------------------------------------


def test_policy_defaults_and_validation() -> None:
    assert POLICY.hysteresis_units == 2
    assert POLICY.dwell_s == 5.0
    assert ReorderPolicy(reorder_point=3, safety_stock=0, max_stock=10).hysteresis_units == 1
    assert ReorderPolicy(reorder_point=3, safety_stock=0, max_stock=10, hysteresis_units=0)
    with pytest.raises(ValueError, match="safety_stock"):
        ReorderPolicy(reorder_point=3, safety_stock=4, max_stock=10)
    with pytest.raises(ValueError, match="reorder_point"):
        ReorderPolicy(reorder_point=30, safety_stock=4, max_stock=10)
    sku = SkuSpec(sku="SKU-1", name="Widget", lead_time_d=3.0, policy=POLICY)
    assert (sku.reorder_point, sku.safety_stock, sku.max_stock) == (20, 5, 100)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (None, UNKNOWN),
        (-3, OUT),
        (0, OUT),
        (1, CRITICAL),
        (5, CRITICAL),
        (6, LOW),
        (20, LOW),
        (21, OK),
    ],
)
def test_classify(level: int | None, expected: StockState) -> None:
    assert classify(level, POLICY) is expected


def test_suggested_order_qty() -> None:
    assert suggested_order_qty(15, POLICY) == 85
    assert suggested_order_qty(150, POLICY) == 0


def test_suggested_order_qty_is_a_whole_number_of_packs() -> None:
    packs_of_12 = ReorderPolicy(reorder_point=20, safety_stock=5, max_stock=100, pack_multiple=12)
    # 85 units short of max_stock 100 (not a multiple of 12): 8 packs, 96 units, 111 after.
    assert suggested_order_qty(15, packs_of_12) == 96
    assert suggested_order_qty(16, packs_of_12) == 84  # exactly 7 packs short
    assert suggested_order_qty(99, packs_of_12) == 12  # one unit short: one pack
    assert suggested_order_qty(100, packs_of_12) == 0
    assert suggested_order_qty(0, packs_of_12) == 108  # OUT: 100 short, 9 packs
    with pytest.raises(ValueError, match="pack_multiple"):
        ReorderPolicy(reorder_point=20, safety_stock=5, max_stock=100, pack_multiple=0)


@given(
    level=st.integers(-1_000, 2_000),
    max_stock=st.integers(1, 1_000),
    pack=st.integers(1, 500),
)
def test_suggested_order_qty_rounds_the_shortfall_up_to_the_next_pack(
    level: int, max_stock: int, pack: int
) -> None:
    policy = ReorderPolicy(reorder_point=0, safety_stock=0, max_stock=max_stock, pack_multiple=pack)
    short = max(max_stock - level, 0)
    qty = suggested_order_qty(level, policy)
    assert qty % pack == 0
    assert short <= qty < short + pack  # the fewest whole packs that cover the shortfall
    if pack == 1:
        assert qty == short


def test_raise_after_dwell_with_deterministic_episode() -> None:
    state, out = run([(100.0, 30), (101.0, 18), (105.9, 18)])
    assert out == []
    assert state.pending == Pending(LOW, 101.0)
    state, ticked = tick(state, POLICY, 107.0)
    assert ticked == (AlertRaised("SKU-1", "SKU-1@106000", LOW, 18, 20, 82, 106.0),)
    assert state.episode == Episode("SKU-1@106000", LOW, 106.0, 18, 20)
    assert state.pending is None
    assert tick(state, POLICY, 200.0) == (state, ())


def test_the_transition_time_does_not_depend_on_tick_rate() -> None:
    sparse = run([(100.0, 18), (130.0, 18)])[1]
    dense = run([(100.0 + i * 0.25, 18) for i in range(121)])[1]
    assert sparse == dense
    assert sparse[0].ts_s == 105.0


def test_short_dip_then_steady_ok_never_raises() -> None:
    state, out = run([(100.0, 30), (101.0, 19), (103.0, 21), (200.0, 21), (300.0, 25)])
    assert out == []
    assert state.pending is None


def test_a_steady_ok_level_cancels_the_pending_raise() -> None:
    state, out = run([(100.0, 19), (101.0, 21), (106.0, 21), (107.0, 19), (111.0, 19)])
    assert out == []
    assert state.pending == Pending(LOW, 107.0)


def test_raise_is_sticky_while_the_level_flaps() -> None:
    # Each OK stretch is shorter than the dwell: the raise fires 5 s after the first dip, at
    # 105 (level 19 held from 104 to 106), though the level was never low for 5 s on end.
    _, out = run([(100.0, 19), (102.0, 21), (104.0, 19), (106.0, 21), (108.0, 19)])
    assert kinds(out) == ["alert_raised"]
    assert out[0].ts_s == 105.0
    # Resumed after the due time: fires at the resume.
    _, out = run([(100.0, 19), (102.0, 21), (106.0, 19)])
    assert [t.ts_s for t in out] == [106.0]


def test_raise_uses_the_current_severity() -> None:
    _, out = run([(100.0, 18), (103.0, 4), (106.0, 4)])
    assert kinds(out) == ["alert_raised"]
    raised = out[0]
    assert isinstance(raised, AlertRaised)
    assert (raised.severity, raised.level, raised.threshold, raised.ts_s) == (CRITICAL, 4, 5, 105.0)


def test_resolve_needs_the_clear_level_for_the_dwell() -> None:
    state, out = run([(100.0, 18), (110.0, 22)])  # 22 is in the band (20, 22]
    assert kinds(out) == ["alert_raised"]
    state, out = run([(200.0, 23), (204.0, 22), (206.0, 23), (210.9, 23)], state=state)
    assert out == []
    state, ticked = tick(state, POLICY, 211.0)
    assert ticked == (AlertResolved("SKU-1", "SKU-1@105000", LOW, 23, 105.0, 211.0),)
    assert state.episode is None


def test_escalation_and_deescalation() -> None:
    state, out = run(
        [(0.0, 15), (10.0, 4), (20.0, 0), (30.0, 6), (40.0, 7), (50.0, 15), (60.0, 30), (70.0, 30)]
    )
    assert [(type(t), getattr(t, "new_severity", None), t.ts_s) for t in out] == [
        (AlertRaised, None, 5.0),
        (AlertEscalated, CRITICAL, 15.0),
        (AlertEscalated, OUT, 25.0),
        (AlertDeescalated, CRITICAL, 35.0),  # 6 > 0 + 2
        (AlertDeescalated, LOW, 55.0),  # 7 is not > 5 + 2; 15 is
        (AlertResolved, None, 65.0),
    ]
    assert state.episode is None
    assert {t.episode_id for t in out} == {"SKU-1@5000"}


def test_no_deescalation_in_the_clear_band() -> None:
    state, out = run([(0.0, 0), (10.0, 22), (100.0, 22)])
    assert kinds(out) == ["alert_raised"]
    assert state.episode is not None
    assert state.episode.severity is OUT


def test_unknown_level_changes_no_alert() -> None:
    state, out = run([(0.0, 18), (4.0, None), (100.0, None)])
    assert out == []
    assert state.state is UNKNOWN
    assert state.pending is None
    state, out = run(
        [(100.0, 18), (106.0, 18), (107.0, None), (108.0, 50), (200.0, None)], state=state
    )
    assert kinds(out) == ["alert_raised"]
    assert state.episode is not None  # kept through the gap
    assert state.recovering is None
    state, ticked = tick(state, POLICY, 1_000.0)
    assert ticked == ()


def test_zero_dwell_acts_at_once() -> None:
    policy = ReorderPolicy(reorder_point=20, safety_stock=5, max_stock=100, dwell_s=0.0)
    _, out = run([(0.0, 19), (1.0, 23), (2.0, 0)], policy)
    assert kinds(out) == ["alert_raised", "alert_resolved", "alert_raised"]
    assert [t.ts_s for t in out] == [0.0, 1.0, 2.0]


def test_transitions_are_json_safe() -> None:
    _, out = run([(0.0, 15), (10.0, 4), (20.0, 30), (30.0, 30)])
    dumped = json.loads(json.dumps([t.as_dict() for t in out]))
    assert dumped[0] == {
        "kind": "alert_raised",
        "key": "SKU-1",
        "episode_id": "SKU-1@5000",
        "severity": "low",
        "level": 15,
        "threshold": 20,
        "suggested_order_qty": 85,
        "ts_s": 5.0,
    }
    assert [d["kind"] for d in dumped] == ["alert_raised", "alert_escalated", "alert_resolved"]


def test_restart_restores_the_episode_without_a_new_raise() -> None:
    state, out = run([(0.0, 15), (10.0, 15)])
    assert kinds(out) == ["alert_raised"]
    restored = AlertState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    _, more = run([(20.0, 15), (30.0, 12)], state=restored)
    assert more == []
    with pytest.raises(ValueError, match="version"):
        AlertState.from_dict({**state.to_dict(), "v": 0})


def spec_for(shelf_id: str) -> ShelfSpec:
    return ShelfSpec(
        shelf_id=shelf_id,
        zone="A",
        sku="SKU-1",
        scale_id="scale-1",
        channel=0,
        unit_weight_g=10.0,
        tare_g=0.0,
        capacity_units=300,
        max_weight_g=5_000.0,
    )


def test_weight_oscillating_one_percent_around_the_reorder_point_raises_once() -> None:
    """fault case A1, from raw weights to alerts."""
    policy = ReorderPolicy(reorder_point=100, safety_stock=20, max_stock=250)
    spec = spec_for("A-01")
    shelf = ShelfState(spec)
    alert = AlertState("SKU-1")
    out: list[AlertTransition] = []
    levels: set[int | None] = set()
    ts_s = 0.0
    for cycle in range(60):
        weight_g = 1_000.0 * (1.01 if cycle % 2 else 0.99)
        for i in range(8):
            noise_g = (-0.4, 0.3, 0.0, 0.5)[i % 4]
            reading = Reading("scale-1", 0, 1, cycle * 8 + i, ts_s, weight_g + noise_g)
            shelf, _ = apply_reading(shelf, spec, reading, ts_s)
            level = sku_level([shelf])
            levels.add(level)
            alert, transitions = evaluate(alert, policy, level, ts_s)
            out.extend(transitions)
            ts_s += 0.25
    assert {99, 101} <= levels
    assert kinds(out) == ["alert_raised"]


# --- properties --------------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn) -> ReorderPolicy:
    reorder_point = draw(st.integers(min_value=0, max_value=300))
    safety_stock = draw(st.integers(min_value=0, max_value=reorder_point))
    max_stock = draw(st.integers(min_value=reorder_point, max_value=reorder_point + 500))
    hysteresis_units = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=30)))
    dwell_s = draw(st.sampled_from([0.0, 1.0, 5.0, 30.0]))
    if hysteresis_units is None:
        return ReorderPolicy(
            reorder_point=reorder_point,
            safety_stock=safety_stock,
            max_stock=max_stock,
            dwell_s=dwell_s,
        )
    return ReorderPolicy(
        reorder_point=reorder_point,
        safety_stock=safety_stock,
        max_stock=max_stock,
        hysteresis_units=hysteresis_units,
        dwell_s=dwell_s,
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[ReorderPolicy, list[tuple[float, int | None]]]:
    policy = draw(policies())
    top = policy.max_stock + 10
    steps = draw(
        st.lists(
            st.tuples(
                st.floats(min_value=0.0, max_value=3 * policy.dwell_s + 1.0),
                st.one_of(
                    st.none(),
                    st.integers(min_value=-2, max_value=top),
                    st.sampled_from(
                        [0, policy.safety_stock, policy.reorder_point, policy.reorder_point + 1]
                    ),
                ),
            ),
            max_size=80,
        )
    )
    samples: list[tuple[float, int | None]] = []
    now_s = 1_000.0
    for step_s, level in steps:
        now_s += step_s
        samples.append((now_s, level))
    return policy, samples


def check_grammar(transitions: Sequence[AlertTransition]) -> None:
    """Raised → (Escalated | Deescalated)* → Resolved → Raised …, one episode at a time."""
    episode: str | None = None
    severity: StockState | None = None
    last_ts_s = float("-inf")
    for t in transitions:
        assert t.ts_s >= last_ts_s
        last_ts_s = t.ts_s
        if isinstance(t, AlertRaised):
            assert episode is None
            episode, severity = t.episode_id, t.severity
        else:
            assert episode is not None
            assert t.episode_id == episode
            assert severity is not None
            if isinstance(t, AlertResolved):
                assert t.severity is severity
                episode = severity = None
            elif isinstance(t, AlertEscalated):
                assert t.old_severity is severity
                assert SEVERITY_RANK[t.new_severity] > SEVERITY_RANK[severity]
                severity = t.new_severity
            else:
                assert isinstance(t, AlertDeescalated)
                assert t.old_severity is severity
                assert SEVERITY_RANK[t.new_severity] < SEVERITY_RANK[severity]
                severity = t.new_severity


@given(history=histories())
def test_transitions_follow_the_episode_grammar(
    history: tuple[ReorderPolicy, list[tuple[float, int | None]]],
) -> None:
    policy, samples = history
    state = AlertState("SKU-1")
    out: list[AlertTransition] = []
    for now_s, level in samples:
        before = state
        state, transitions = evaluate(state, policy, level, now_s)
        if level is None:
            assert transitions == ()
            assert state.state is UNKNOWN
            assert state.episode == before.episode
            assert state.pending is None
            assert state.recovering is None
        for t in transitions:
            assert t.ts_s <= now_s
            if isinstance(t, AlertRaised | AlertEscalated):
                assert SEVERITY_RANK[classify(t.level, policy)] >= SEVERITY_RANK[OK] + 1
            if isinstance(t, AlertResolved):
                assert t.level > policy.reorder_point + policy.hysteresis_units
        out.extend(transitions)
        assert (state.episode is None) == (not out or isinstance(out[-1], AlertResolved))
    check_grammar(out)


@given(history=histories(), extra=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=20))
def test_extra_ticks_change_nothing(
    history: tuple[ReorderPolicy, list[tuple[float, int | None]]], extra: list[float]
) -> None:
    """Held-level semantics: ticking between samples yields the same transitions. (Not before
    a None: a tick may complete a dwell the unknown level would otherwise discard.)"""
    policy, samples = history
    _, plain = run(samples, policy)
    state = AlertState("SKU-1")
    ticked: list[AlertTransition] = []
    for i, (now_s, level) in enumerate(samples):
        state, transitions = evaluate(state, policy, level, now_s)
        ticked.extend(transitions)
        if i + 1 < len(samples) and samples[i + 1][1] is not None:
            next_s = samples[i + 1][0]
            for frac in sorted(extra):
                state, transitions = tick(state, policy, now_s + frac * (next_s - now_s))
                ticked.extend(transitions)
    assert ticked == plain


@st.composite
def oscillations(draw: st.DrawFn) -> tuple[ReorderPolicy, list[tuple[float, int | None]]]:
    """Levels flapping across the reorder point within ±1 % and ±hysteresis, each level held
    for less than the dwell, over a window of many dwells."""
    reorder_point = draw(st.integers(min_value=100, max_value=20_000))
    hysteresis_units = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=50)))
    dwell_s = draw(st.sampled_from([0.0, 1.0, 5.0, 30.0]))
    h = max(1, round(0.1 * reorder_point)) if hysteresis_units is None else hysteresis_units
    policy = ReorderPolicy(
        reorder_point=reorder_point,
        safety_stock=draw(st.integers(min_value=0, max_value=reorder_point - 1)),
        max_stock=2 * reorder_point,
        hysteresis_units=h,
        dwell_s=dwell_s,
    )
    spread = min(reorder_point // 100, h)
    pairs = draw(
        st.lists(
            st.tuples(
                st.integers(min_value=-spread, max_value=0),
                st.integers(min_value=1, max_value=spread),
                st.floats(min_value=0.05, max_value=0.95),
                st.floats(min_value=0.05, max_value=0.95),
            ),
            min_size=40,
            max_size=100,
        )
    )
    samples: list[tuple[float, int | None]] = []
    now_s = 10_000.0
    for below, above, hold_below, hold_above in pairs:
        samples.append((now_s, reorder_point + below))
        now_s += hold_below * dwell_s if dwell_s else hold_below
        samples.append((now_s, reorder_point + above))
        now_s += hold_above * dwell_s if dwell_s else hold_above
    return policy, samples


@given(history=oscillations())
def test_oscillating_around_the_reorder_point_raises_exactly_once(
    history: tuple[ReorderPolicy, list[tuple[float, int | None]]],
) -> None:
    policy, samples = history
    _, out = run(samples, policy)
    assert [type(t) for t in out if not isinstance(t, AlertEscalated | AlertDeescalated)] == [
        AlertRaised
    ]


@given(history=histories(), split=st.integers(min_value=0, max_value=80))
def test_alert_state_round_trips_and_resumes(
    history: tuple[ReorderPolicy, list[tuple[float, int | None]]], split: int
) -> None:
    policy, samples = history
    state, _ = run(samples[:split], policy)
    restored = AlertState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    assert run(samples[split:], policy, restored) == run(samples[split:], policy, state)
