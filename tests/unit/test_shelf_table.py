"""The columnar shelf state (controller/domain/shelf_table.py): the same rules as the object
per shelf it replaced (tests/unit/reference_shelf.py), rows that grow, free and restore, and
the vectorised staleness check."""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.domain import shelf_table
from controller.domain.events import ShelfEvent
from controller.domain.model import ShelfSpec, ShelfStatus
from controller.domain.shelf_table import ShelfTable
from controller.domain.stock import ShelfState, ShelfStates, apply_weight, check_stale
from tests.unit.reference_shelf import RefShelfState
from tests.unit.reference_shelf import apply_weight as ref_apply_weight
from tests.unit.reference_shelf import check_stale as ref_check_stale
from tests.unit.test_domain_scale import make_spec


def spec_of(shelf_id: str = "A-01", **overrides: object) -> ShelfSpec:
    return make_spec(shelf_id=shelf_id, **overrides)


# A step of a stream: (seconds after the previous reading, weight, controller lag, check
# staleness at this many seconds after the reading instead of applying a reading).
weights = st.one_of(
    st.sampled_from([500.0, 600.0, 1000.0, 1003.0, 1500.0, 4550.0, 5000.0, 5600.0, 12_000.0]),
    st.floats(min_value=-50.0, max_value=11_000.0, allow_nan=False),
    st.sampled_from([math.nan, math.inf]),
)
steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.5, 1.0, 5.0, 31.0, -2.0]),
        weights,
        st.sampled_from([0.0, 0.2, 40.0, -70.0]),
        st.sampled_from([None, None, None, 10.0, 45.0]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    stream=steps,
    window=st.integers(min_value=1, max_value=7),
    band=st.sampled_from([2.0, 20.0]),
    spike=st.sampled_from([50.0, 500.0]),
)
def test_a_row_follows_the_rules_of_the_object_it_replaced(
    stream: list[tuple[float, float, float, float | None]], window: int, band: float, spike: float
) -> None:
    spec = spec_of(settle_window=window, settle_band_g=band, spike_g=spike)
    # Two rows in one table (the second is the one under test) so row offsets are exercised.
    states = ShelfStates({"X": spec_of("X"), spec.shelf_id: spec})
    ours = states[spec.shelf_id]
    ref = RefShelfState(spec)
    ts = 1_000.0
    for dt, weight_g, lag_s, stale_check in stream:
        ts += dt
        if stale_check is not None:
            _, got = check_stale(ours, spec, ts + stale_check)
            _, want = ref_check_stale(ref, spec, ts + stale_check)
        else:
            got = apply_weight(ours, spec, ts, weight_g, ts + lag_s)
            want = ref_apply_weight(ref, spec, ts, weight_g, ts + lag_s)
            assert ours.ignored_reason == ref.ignored_reason
        assert got == want
        assert ours.to_dict() == ref.to_dict()
        assert ours.conditioner.settled == ref.conditioner.settled
        assert ours.conditioner.weight_g == ref.conditioner.weight_g
    assert states["X"].to_dict() == ShelfState(spec_of("X")).to_dict()  # untouched neighbour


def test_rows_are_freed_reused_and_grow_keeping_their_state() -> None:
    specs = {f"S{i}": spec_of(f"S{i}") for i in range(3)}
    states = ShelfStates(specs)
    apply_weight(states["S1"], specs["S1"], 1_000.0, 1_500.0, 1_000.0)
    saved = states["S1"].to_dict()
    del states["S0"]
    assert "S0" not in states
    assert len(states) == 2
    for i in range(3, 40):  # beyond the first allocation: the columns are reallocated
        specs[f"S{i}"] = spec_of(f"S{i}")
        states.add(specs[f"S{i}"])
    assert states.table.rows["S3"] == 0  # S0's row, reused
    assert states["S1"].to_dict() == saved
    assert states["S3"].to_dict() == ShelfState(specs["S3"]).to_dict()
    assert states.table.capacity >= 39


def test_setting_a_state_copies_it_into_the_row_and_views_stay_live() -> None:
    spec = spec_of()
    states = ShelfStates({spec.shelf_id: spec})
    held = states[spec.shelf_id]
    apart = ShelfState(spec)
    for i in range(3):
        apply_weight(apart, spec, 1_000.0 + i, 1_500.0, 1_000.0 + i)
    assert apart.units == 10
    states[spec.shelf_id] = apart
    assert held.units == 10
    assert held.status is ShelfStatus.OK
    assert held.to_dict() == apart.to_dict()


def test_a_rolled_back_row_is_the_row_before() -> None:
    spec = spec_of()
    state = ShelfState(spec)
    for i in range(4):
        apply_weight(state, spec, 1_000.0 + i, 1_500.0, 1_000.0 + i)
    before = state.to_dict()
    snap = state.snapshot()
    for i in range(3):  # a step: two agreeing suspects, then a third reading settles it
        apply_weight(state, spec, 1_010.0 + i, 3_000.0, 1_010.0 + i)
    assert state.units == 25
    state.restore(snap, spec)
    assert state.to_dict() == before


def test_due_stale_is_the_rows_the_per_shelf_rule_would_turn_stale() -> None:
    rng = np.random.default_rng(7)
    specs = {
        f"S{i}": spec_of(f"S{i}", stale_after_s=float(rng.choice([5.0, 15.0, 30.0])))
        for i in range(500)
    }
    states = ShelfStates(specs)
    table = states.table
    for i, sid in enumerate(specs):
        if i % 7 == 0:
            continue  # never reported: stays UNKNOWN, never due
        ts = 1_000.0 + float(rng.uniform(0, 40))
        apply_weight(states[sid], specs[sid], ts, 1_500.0, ts)
        if i % 11 == 0:
            states[sid].status = ShelfStatus.STALE
    del states["S3"]
    now = 1_045.0
    due = {table.ids[r] for r in table.due_stale(now)}
    expected = set()
    for sid in states:
        probe = ShelfState.from_dict(states[sid].to_dict(), specs[sid])
        if check_stale(probe, specs[sid], now)[1]:
            expected.add(sid)
    assert due == expected
    assert expected  # the rule does turn some stale at this time


def test_a_wider_settle_window_widens_the_table() -> None:
    narrow, wide = spec_of("N"), spec_of("W", settle_window=9)
    states = ShelfStates({"N": narrow})
    for i in range(5):
        apply_weight(states["N"], narrow, 1_000.0 + i, 1_000.0 + i, 1_000.0 + i)
    states.add(wide)
    for i in range(9):
        apply_weight(states["W"], wide, 1_000.0 + i, 2_000.0, 1_000.0 + i)
    assert states["W"].conditioner.window == [2_000.0] * 9
    assert states["N"].conditioner.window == [1_000.0, 1_001.0, 1_002.0, 1_003.0, 1_004.0]


def test_the_columns_cost_bytes_not_objects_per_shelf() -> None:
    table = ShelfTable.of(spec_of(f"S{i}") for i in range(10_000))
    assert table.nbytes() / 10_000 < 180  # ~170: the state, and the spec values of a group


@pytest.mark.parametrize("bad", [-1, -5])
def test_negative_units_are_refused(bad: int) -> None:
    state = ShelfState(spec_of())
    with pytest.raises(ValueError, match="units"):
        state.units = bad


def test_many_states_at_once_are_each_states_own_dict() -> None:
    specs = {f"S{i}": spec_of(f"S{i}", settle_window=3 + i % 3) for i in range(12)}
    states = ShelfStates(specs)
    for i, sid in enumerate(specs):
        for k in range(i):  # from never reported to a full (turned) ring, a step, a spike
            grams = 1_500.0 if k < 6 else (3_000.0 if k % 4 else 9_000.0)
            apply_weight(states[sid], specs[sid], 1_000.0 + k, grams, 1_000.0 + k)
    order = list(reversed(specs))
    assert states.to_dicts(order) == {sid: states[sid].to_dict() for sid in order}
    assert list(states.to_dicts(order)) == order


def test_status_counts_are_the_shelves_per_status() -> None:
    specs = {f"S{i}": spec_of(f"S{i}") for i in range(30)}
    states = ShelfStates(specs)
    for i, sid in enumerate(specs):
        for k in range(i % 4):  # 0: unknown, 1-2: settling, 3: ok
            apply_weight(states[sid], specs[sid], 1_000.0 + k, 1_500.0, 1_000.0 + k)
    states["S5"].status = ShelfStatus.STALE
    del states["S0"]
    del states["S4"]  # freed rows are not counted (they read UNKNOWN)
    expected = dict.fromkeys((s.value for s in ShelfStatus), 0)
    for sid in states:
        expected[states[sid].status.value] += 1
    assert states.status_counts() == expected
    assert sum(expected.values()) == 28


def test_a_table_of_specs_is_the_table_their_adds_build() -> None:
    specs = [spec_of(f"S{i}", stale_after_s=5.0 + i) for i in range(20)]
    bulk = ShelfTable.of(specs)
    one_by_one = ShelfTable(1)
    for spec in specs:
        one_by_one.add(spec)
    assert bulk.rows == one_by_one.rows
    assert bulk.ids == one_by_one.ids
    for name in ("status", "units", "last_ts_s", "stale_after_s", "window_len"):
        np.testing.assert_array_equal(getattr(bulk, name)[:20], getattr(one_by_one, name)[:20])
    twice = ShelfTable.of([spec_of("A"), spec_of("B"), spec_of("A", stale_after_s=9.0)])
    assert twice.rows == {"A": 0, "B": 1}
    assert twice.stale_after_s[0] == 9.0


def test_the_states_are_a_dict_of_views_that_refuses_changes_the_table_would_miss() -> None:
    specs = {f"S{i}": spec_of(f"S{i}") for i in range(3)}
    states = ShelfStates(specs)
    assert states["S1"] is states["S1"]  # one view per shelf: a lookup allocates nothing
    assert states.get("S9") is None
    for change in (
        lambda: states.update({}),
        lambda: states.pop("S1"),
        lambda: states.setdefault("S1", states["S1"]),
        lambda: states.popitem(),
        lambda: states.clear(),
    ):
        with pytest.raises(TypeError, match="ShelfStates"):
            change()
    del states["S0"]
    assert list(states) == ["S1", "S2"]
    assert list(states.table.rows) == ["S1", "S2"]


# A group: readings of three shelves in arrival order, (shelf, seconds after the previous
# reading, weight); mostly a shelf's common case (steady or stepping weights) so both the
# column path and the one-by-one path of `apply_group` are taken.
group_readings = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2]),
        st.sampled_from([0.0, 0.3, 0.5, 0.5, 1.0, 31.0, -1.0]),
        st.one_of(
            st.sampled_from([1500.0, 1500.0, 1502.0, 1498.0, 1550.0, 2500.0, 2503.0, 480.0]),
            st.sampled_from([1549.0, 6000.0, 12_000.0, math.nan]),
            st.floats(min_value=-50.0, max_value=11_000.0, allow_nan=False),
        ),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    groups=st.lists(st.tuples(group_readings, st.sampled_from([0.0, 0.2, 40.0])), max_size=8),
    windows=st.tuples(*[st.integers(min_value=1, max_value=7)] * 3),
    band=st.sampled_from([5.0, 20.0]),
    spike=st.sampled_from([50.0, 500.0]),
)
def test_a_group_applied_at_once_is_the_same_as_one_by_one(
    groups: list[tuple[list[tuple[int, float, float]], float]],
    windows: tuple[int, int, int],
    band: float,
    spike: float,
) -> None:
    specs = [
        spec_of(f"S{i}", scale_id=f"scale-{i}", settle_window=w, settle_band_g=band, spike_g=spike)
        for i, w in enumerate(windows)
    ]
    by_id = {s.shelf_id: s for s in specs}
    ours, ref = ShelfStates(dict(by_id)), ShelfStates(dict(by_id))
    with mock.patch.object(shelf_table, "GROUP_COLUMNS_FROM", 0):  # small groups in columns too
        _groups_at_once_and_one_by_one(groups, specs, by_id, ours, ref)


def _groups_at_once_and_one_by_one(
    groups: list[tuple[list[tuple[int, float, float]], float]],
    specs: list[ShelfSpec],
    by_id: dict[str, ShelfSpec],
    ours: ShelfStates,
    ref: ShelfStates,
) -> None:
    table, ref_table = ours.table, ref.table
    rows = [table.rows[s.shelf_id] for s in specs]
    ts = 1_000.0
    for readings, lag in groups:
        group_ts = []
        for _, dt, _ in readings:
            ts += dt
            group_ts.append(ts)
        now = ts + lag
        before = {sid: ours[sid].to_dict() for sid in by_id}
        got, saved = table.apply_group(
            np.array([rows[i] for i, _, _ in readings], dtype=np.intp),
            np.array(group_ts),
            np.array([w for _, _, w in readings]),
            {rows[i]: specs[i] for i in range(3)},
            now,
        )
        want = [
            ev
            for (i, _, w), t in zip(readings, group_ts, strict=True)
            for ev in ref_table.apply(ref_table.rows[specs[i].shelf_id], specs[i], t, w, now)
        ]
        assert got == want
        for sid in by_id:
            assert ours[sid].to_dict() == ref[sid].to_dict()
            assert ours[sid].ignored_reason == ref[sid].ignored_reason
            assert ours[sid].conditioner.settled == ref[sid].conditioner.settled
            assert ours[sid].conditioner.weight_g == ref[sid].conditioner.weight_g
        after = {sid: ours[sid].to_dict() for sid in by_id}
        table.restore_rows(saved)  # the rollback of a group whose commit failed
        assert {sid: ours[sid].to_dict() for sid in by_id} == before
        table.apply_group(
            np.array([rows[i] for i, _, _ in readings], dtype=np.intp),
            np.array(group_ts),
            np.array([w for _, _, w in readings]),
            {rows[i]: specs[i] for i in range(3)},
            now,
        )
        assert {sid: ours[sid].to_dict() for sid in by_id} == after


def _twins(
    spec: ShelfSpec, readings: int, grams: float = 1_500.0
) -> tuple[ShelfStates, ShelfStates, int]:
    """Two tables with the same shelf, fed the same readings one by one (one reading a second
    from t = 1,000 s; ``grams``, + 1 g every other reading): ours, the reference, the row."""
    ours, ref = ShelfStates({"S": spec}), ShelfStates({"S": spec})
    row = ours.table.rows["S"]
    for i in range(readings):
        for states in (ours, ref):
            states.table.apply(row, spec, 1_000.0 + i, grams + i % 2, 1_000.0 + i)
    return ours, ref, row


def _count_applies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an item per `ShelfTable.apply` call from now on."""
    calls: list[int] = []
    apply = ShelfTable.apply

    def counting(self: ShelfTable, *args: Any, **kw: Any) -> Any:
        calls.append(1)
        return apply(self, *args, **kw)

    monkeypatch.setattr(ShelfTable, "apply", counting)
    return calls


def _one_shelf_at_once_and_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
    ours: ShelfStates,
    ref: ShelfStates,
    row: int,
    spec: ShelfSpec,
    ts: list[float],
    grams: list[float],
) -> tuple[list[int], list[ShelfEvent], list[ShelfEvent]]:
    """One shelf's readings: ``ref`` one by one, then ``ours`` as one group (counting its
    `apply` calls); the calls, our events and the reference's."""
    want = [
        ev
        for t, w in zip(ts, grams, strict=True)
        for ev in ref.table.apply(row, spec, t, w, ts[-1])
    ]
    calls = _count_applies(monkeypatch)
    got, _ = ours.table.apply_group(
        np.array([row] * len(ts), dtype=np.intp), np.array(ts), np.array(grams), {row: spec}, ts[-1]
    )
    return calls, got, want


def test_a_new_shelf_fills_its_window_one_by_one_and_the_rest_goes_in_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shelf that never reported (a first start, a new shelf): its first readings, up to a
    full window, go through `apply`; its other readings of the group in columns. Same states
    and events as one by one."""
    monkeypatch.setattr(shelf_table, "GROUP_COLUMNS_FROM", 0)
    spec = spec_of("S", settle_window=5)
    ours, ref, row = _twins(spec, 0)
    ts = [1_000.0 + i for i in range(40)]
    grams = [1_500.0 + (i % 2) for i in range(20)] + [1_912.0 + (i % 2) for i in range(20)]
    calls, got, want = _one_shelf_at_once_and_one_by_one(
        monkeypatch, ours, ref, row, spec, ts, grams
    )
    assert len(calls) == 5  # the window's size
    assert got == want
    assert ours["S"].to_dict() == ref["S"].to_dict()
    assert ours["S"].units == ref["S"].units is not None


def test_a_steady_group_is_computed_in_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shelf with a full window and readings in order goes through no `apply` call (the
    common case is the column path), and gives the state and events `apply` gives."""
    monkeypatch.setattr(shelf_table, "GROUP_COLUMNS_FROM", 0)
    spec = spec_of("S", settle_window=5)
    ours, ref, row = _twins(spec, 5)
    ts = [1_005.0 + i for i in range(8)]
    grams = [1_501.0, 1_600.0, 1_600.0, 1_600.0, 1_601.0, 1_600.0, 1_600.0, 1_600.0]
    calls, got, want = _one_shelf_at_once_and_one_by_one(
        monkeypatch, ours, ref, row, spec, ts, grams
    )
    assert calls == []
    assert got == want
    assert [type(e).__name__ for e in got] == [
        "ShelfStatusChanged",  # OK → SETTLING: the window spans 1,500 and 1,600 g
        "StockChanged",  # 10 → 11 units once it settles on 1,600 g
        "ShelfStatusChanged",  # SETTLING → OK
    ]
    assert ours["S"].to_dict() == ref["S"].to_dict()
    assert ours["S"].units == 11


def test_a_small_group_goes_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below GROUP_COLUMNS_FROM readings `apply_group` is `apply` reading by reading."""
    spec = spec_of("S", settle_window=3)
    states = ShelfStates({"S": spec})
    row = states.table.rows["S"]
    calls = _count_applies(monkeypatch)
    n = shelf_table.GROUP_COLUMNS_FROM - 1
    _events, saved = states.table.apply_group(
        np.full(n, row, dtype=np.intp),
        1_000.0 + np.arange(n, dtype=np.float64),
        np.full(n, 1_500.0),
        {row: spec},
        1_000.0 + n,
    )
    assert len(calls) == n
    assert states["S"].units == 10
    states.table.restore_rows(saved)
    assert states["S"].units is None


def test_a_group_counts_with_the_spec_set_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """`apply_group` computes with the spec values kept per row (`spec_params`): a spec set
    with `set_spec` (a calibration, a catalogue change) applies to the next group, as it does
    to `apply`."""
    monkeypatch.setattr(shelf_table, "GROUP_COLUMNS_FROM", 0)
    spec = spec_of("S", settle_window=3)
    ours, ref, row = _twins(spec, 3, grams=1_499.5)  # 1,499.5 and 1,500.5 g
    assert ours["S"].units == 10
    recalibrated = spec_of("S", settle_window=3, tare_g=700.0, unit_weight_g=80.0)
    ours.table.set_spec(row, recalibrated)
    ts = [1_003.0, 1_004.0]
    got, _ = ours.table.apply_group(
        np.array([row, row], dtype=np.intp),
        np.array(ts),
        np.array([1_500.0, 1_500.0]),
        {row: recalibrated},
        ts[-1],
    )
    want = [ev for t in ts for ev in ref.table.apply(row, recalibrated, t, 1_500.0, ts[-1])]
    assert got == want
    assert ours["S"].units == ref["S"].units == 10  # (1500 - 700) / 80
    assert [type(e).__name__ for e in got] == []  # 10 units either way: no event
    ours.table.set_spec(row, spec_of("S", settle_window=3, tare_g=700.0, unit_weight_g=40.0))
    got, _ = ours.table.apply_group(
        np.array([row], dtype=np.intp),
        np.array([1_005.0]),
        np.array([1_500.0]),
        {row: spec},
        1_005.0,
    )
    assert ours["S"].units == 20
