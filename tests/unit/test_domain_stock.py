"""Stock: unit counting, shelf status, staleness, SKU level, persistence."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.events import ShelfStatusChanged, StockChanged
from controller.domain.model import Reading, ShelfSpec, ShelfStatus
from controller.domain.stock import (
    CountResult,
    ShelfState,
    apply_reading,
    check_stale,
    count_units,
    sku_level,
)

OK = ShelfStatus.OK
SETTLING = ShelfStatus.SETTLING
AMBIGUOUS = ShelfStatus.AMBIGUOUS
STALE = ShelfStatus.STALE
UNKNOWN = ShelfStatus.UNKNOWN


def make_spec(**overrides: object) -> ShelfSpec:
    fields: dict[str, object] = {
        "shelf_id": "A-01",
        "zone": "A",
        "sku": "SKU-1",
        "scale_id": "scale-1",
        "channel": 0,
        "unit_weight_g": 100.0,
        "tare_g": 500.0,
        "capacity_units": 50,
        "max_weight_g": 10_000.0,
    }
    fields.update(overrides)
    return ShelfSpec(**fields)  # type: ignore[arg-type]


SPEC = make_spec()


class Feeder:
    """Applies readings at 1 Hz (device time = controller time unless told otherwise)."""

    def __init__(self, spec: ShelfSpec = SPEC, t0_s: float = 1_000.0) -> None:
        self.spec = spec
        self.state = ShelfState(spec)
        self.ts_s = t0_s
        self.seq = 0

    def units(
        self, units: float, count: int = 1, *, lag_s: float = 0.0
    ) -> list[StockChanged | ShelfStatusChanged]:
        return self.grams(self.spec.tare_g + units * self.spec.unit_weight_g, count, lag_s=lag_s)

    def grams(
        self, weight_g: float, count: int = 1, *, step_s: float = 1.0, lag_s: float = 0.0
    ) -> list[StockChanged | ShelfStatusChanged]:
        events: list[StockChanged | ShelfStatusChanged] = []
        for _ in range(count):
            self.seq += 1
            reading = Reading("scale-1", 0, 1, self.seq, self.ts_s, weight_g)
            self.state, new = apply_reading(self.state, self.spec, reading, self.ts_s + lag_s)
            events.extend(new)
            self.ts_s += step_s
        return events


def statuses(events: Sequence[StockChanged | ShelfStatusChanged]) -> list[tuple[str, str]]:
    return [(e.old, e.new) for e in events if isinstance(e, ShelfStatusChanged)]


def changes(events: Sequence[StockChanged | ShelfStatusChanged]) -> list[tuple[int | None, int]]:
    return [(e.old_units, e.new_units) for e in events if isinstance(e, StockChanged)]


# --- count_units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight_g", "expected"),
    [
        (2500.0, CountResult(20, 20.0, False)),
        (2525.0, CountResult(20, 20.25, False)),
        (2475.0, CountResult(20, 19.75, False)),
        (2550.0, CountResult(None, 20.5, True, "between_units")),
        (500.0, CountResult(0, 0.0, False)),
        (480.0, CountResult(0, -0.2, False)),
        (400.0, CountResult(None, -1.0, True, "below_tare")),
        (5520.0, CountResult(50, 50.2, False)),
        (5600.0, CountResult(None, 51.0, True, "over_capacity")),
    ],
)
def test_count_units(weight_g: float, expected: CountResult) -> None:
    result = count_units(weight_g, SPEC)
    assert result.units == expected.units
    assert result.estimate == pytest.approx(expected.estimate)
    assert result.ambiguous == expected.ambiguous
    assert result.reason == expected.reason


@given(
    weight_g=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e7, max_value=1e7),
    unit_weight_g=st.floats(min_value=0.01, max_value=10_000.0),
    tare_g=st.floats(min_value=0.0, max_value=10_000.0),
    capacity_units=st.integers(min_value=0, max_value=10_000),
    tolerance_frac=st.floats(min_value=0.01, max_value=0.5),
)
def test_counts_are_never_negative(
    weight_g: float,
    unit_weight_g: float,
    tare_g: float,
    capacity_units: int,
    tolerance_frac: float,
) -> None:
    spec = make_spec(
        unit_weight_g=unit_weight_g,
        tare_g=tare_g,
        capacity_units=capacity_units,
        tolerance_frac=tolerance_frac,
        max_weight_g=tare_g + 1e9,
    )
    result = count_units(weight_g, spec)
    assert (result.units is None) == result.ambiguous == (result.reason is not None)
    if result.units is not None:
        assert 0 <= result.units <= capacity_units
        assert abs(result.estimate - result.units) <= tolerance_frac + 1e-9


# --- apply_reading -----------------------------------------------------------------------------


def test_first_count_after_settling() -> None:
    feeder = Feeder()
    events = feeder.units(20, 3)
    assert statuses(events) == [(UNKNOWN, SETTLING), (SETTLING, OK)]
    assert changes(events) == [(None, 20)]
    assert feeder.state.units == 20
    assert feeder.state.status is OK


def test_pick_keeps_the_count_while_settling() -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    events = feeder.units(19, 1)
    assert statuses(events) == [(OK, SETTLING)]
    assert feeder.state.units == 20
    events = feeder.units(19, 4)
    assert statuses(events) == [(SETTLING, OK)]
    assert changes(events) == [(20, 19)]
    assert events[0].ts_s == feeder.ts_s - 1.0


def test_restock_is_a_confirmed_step() -> None:
    feeder = Feeder()
    feeder.units(5, 5)
    assert feeder.units(30, 1) == []  # suspected spike: nothing moves
    events = feeder.units(30, 2)
    assert changes(events) == [(5, 30)]
    assert statuses(events) == [(OK, SETTLING), (SETTLING, OK)]


def test_a_lone_spike_changes_nothing() -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    assert feeder.grams(9_000.0) == []
    assert feeder.units(20, 3) == []
    assert feeder.state.units == 20


def test_ambiguous_keeps_the_last_count() -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    feeder.units(20.5, 5)
    assert feeder.state.status is AMBIGUOUS
    assert feeder.state.reason == "between_units"
    assert feeder.state.units == 20
    events = feeder.units(20, 5)
    assert statuses(events) == [(AMBIGUOUS, SETTLING), (SETTLING, OK)]
    assert changes(events) == []


@pytest.mark.parametrize(
    ("weight_g", "reason"), [(300.0, "below_tare"), (6_000.0, "over_capacity")]
)
def test_ambiguous_reasons(weight_g: float, reason: str) -> None:
    feeder = Feeder()
    events = feeder.grams(weight_g, 3)
    assert statuses(events)[-1] == (SETTLING, AMBIGUOUS)
    event = events[-1]
    assert isinstance(event, ShelfStatusChanged)
    assert event.reason == reason
    assert feeder.state.units is None


def test_over_range_is_ambiguous_and_restarts_settling() -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    events = feeder.grams(20_000.0)
    assert statuses(events) == [(OK, AMBIGUOUS)]
    assert feeder.state.reason == "over_range"
    assert feeder.state.units == 20
    events = feeder.units(20, 3)
    assert statuses(events) == [(AMBIGUOUS, SETTLING), (SETTLING, OK)]


def test_older_readings_never_overwrite_newer() -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    before = feeder.state.to_dict()
    old = Reading("scale-1", 0, 1, 99, feeder.ts_s - 10.0, 9_000.0)
    state, events = apply_reading(feeder.state, SPEC, old, feeder.ts_s)
    assert events == ()
    assert state.ignored_reason == "out_of_order"
    assert state.to_dict() == before
    same_ts = Reading("scale-1", 0, 1, 100, feeder.ts_s - 1.0, SPEC.tare_g + 2_000.0)
    state, _ = apply_reading(state, SPEC, same_ts, feeder.ts_s)
    assert state.ignored_reason is None


@pytest.mark.parametrize(
    ("ts_offset_s", "weight_g", "reason"),
    [(0.0, math.nan, "non_finite"), (0.0, math.inf, "non_finite"), (3_600.0, 2_500.0, "future_ts")],
)
def test_bad_readings_are_ignored(ts_offset_s: float, weight_g: float, reason: str) -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    before = feeder.state.to_dict()
    bad = Reading("scale-1", 0, 1, 99, feeder.ts_s + ts_offset_s, weight_g)
    state, events = apply_reading(feeder.state, SPEC, bad, feeder.ts_s)
    assert events == ()
    assert state.ignored_reason == reason
    assert state.to_dict() == before


def test_stale_once_then_back_after_fresh_readings() -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    last_ts_s = feeder.ts_s - 1.0
    state, events = check_stale(feeder.state, SPEC, last_ts_s + SPEC.stale_after_s)
    assert events == ()
    state, events = check_stale(state, SPEC, last_ts_s + SPEC.stale_after_s + 0.5)
    assert statuses(events) == [(OK, STALE)]
    assert state.reason == "no_reading"
    state, events = check_stale(state, SPEC, last_ts_s + 100.0)
    assert events == ()
    assert sku_level([state]) is None
    assert state.units == 20

    feeder.ts_s = last_ts_s + 120.0
    resumed = feeder.units(20, 3)  # the window restarts after the gap
    assert statuses(resumed) == [(STALE, SETTLING), (SETTLING, OK)]
    assert changes(resumed) == []
    assert sku_level([feeder.state]) == 20


def test_a_late_reading_keeps_the_shelf_stale() -> None:
    feeder = Feeder()
    feeder.units(20, 5)
    events = feeder.units(20, 2, lag_s=SPEC.stale_after_s + 5.0)
    assert statuses(events) == [(OK, STALE)]
    assert feeder.state.reason == "late_reading"


def test_never_reported_shelf_stays_unknown() -> None:
    state = ShelfState(SPEC)
    state, events = check_stale(state, SPEC, 1e9)
    assert events == ()
    assert state.status is UNKNOWN


def test_sku_level() -> None:
    a, b = Feeder(make_spec(shelf_id="A-01")), Feeder(make_spec(shelf_id="A-02"))
    assert sku_level([]) is None
    assert sku_level([a.state, b.state]) is None
    a.units(20, 5)
    assert sku_level([a.state, b.state]) is None
    b.units(7, 1)  # SETTLING without a count yet
    assert sku_level([a.state, b.state]) is None
    b.units(7, 2)
    assert sku_level([a.state, b.state]) == 27
    a.units(19, 1)  # pick in progress: last confident count
    assert a.state.status is SETTLING
    assert sku_level([a.state, b.state]) == 27
    b.units(7.5, 5)
    assert b.state.status is AMBIGUOUS
    assert sku_level([a.state, b.state]) == 27


def test_events_are_json_safe() -> None:
    feeder = Feeder()
    events = feeder.units(20, 3)
    dumped = json.loads(json.dumps([e.as_dict() for e in events]))
    assert dumped[0] == {
        "kind": "shelf_status_changed",
        "shelf_id": "A-01",
        "old": "unknown",
        "new": "settling",
        "ts_s": 1_000.0,
        "reason": "settling",
    }
    assert dumped[1] == {
        "kind": "stock_changed",
        "shelf_id": "A-01",
        "sku": "SKU-1",
        "old_units": None,
        "new_units": 20,
        "ts_s": 1_002.0,
    }


def test_snapshot_rejects_foreign_data() -> None:
    snapshot = Feeder().state.to_dict()
    with pytest.raises(ValueError, match="version"):
        ShelfState.from_dict({**snapshot, "v": 99}, SPEC)
    with pytest.raises(ValueError, match="shelf"):
        ShelfState.from_dict(snapshot, make_spec(shelf_id="B-07"))


# --- properties over reading streams -----------------------------------------------------------

reading_steps = st.lists(
    st.tuples(
        st.floats(min_value=-5.0, max_value=60.0),  # ts step, sometimes backwards
        st.one_of(
            st.floats(min_value=-1_000.0, max_value=12_000.0),
            st.sampled_from([500.0, 1_500.0, 2_500.0, math.nan]),
        ),
        st.floats(min_value=0.0, max_value=40.0),  # delivery lag
    ),
    max_size=60,
)


def run_stream(
    state: ShelfState, steps: list[tuple[float, float, float]], t0_s: float = 1_000.0
) -> list[StockChanged | ShelfStatusChanged]:
    events: list[StockChanged | ShelfStatusChanged] = []
    ts_s = t0_s
    for seq, (step_s, weight_g, lag_s) in enumerate(steps):
        ts_s += step_s
        state, new = apply_reading(
            state, SPEC, Reading("scale-1", 0, 1, seq, ts_s, weight_g), ts_s + lag_s
        )
        events.extend(new)
    return events


@given(steps=reading_steps)
def test_stream_invariants(steps: list[tuple[float, float, float]]) -> None:
    state = ShelfState(SPEC)
    newest_ts_s = -math.inf
    ts_s = 1_000.0
    status = UNKNOWN
    units: int | None = None
    for seq, (step_s, weight_g, lag_s) in enumerate(steps):
        ts_s += step_s
        state, events = apply_reading(
            state, SPEC, Reading("scale-1", 0, 1, seq, ts_s, weight_g), ts_s + lag_s
        )
        if state.ignored_reason is None:
            assert ts_s >= newest_ts_s
            newest_ts_s = ts_s
            assert state.status is not UNKNOWN
        else:
            assert events == ()
        assert state.last_ts_s is None or state.last_ts_s == newest_ts_s
        assert state.units is None or 0 <= state.units <= SPEC.capacity_units
        for event in events:
            if isinstance(event, StockChanged):
                assert event.old_units == units
                assert event.new_units != units
                units = event.new_units
            else:
                assert event.old is status
                assert event.new is not status
                status = event.new
        assert state.status is status
        assert state.units == units
        if state.status is OK:
            assert state.units is not None
            assert state.weight_g is not None
            assert count_units(state.weight_g, SPEC).units == state.units


@given(prefix=reading_steps, suffix=reading_steps)
def test_snapshot_round_trip_resumes_identically(
    prefix: list[tuple[float, float, float]], suffix: list[tuple[float, float, float]]
) -> None:
    original = ShelfState(SPEC)
    run_stream(original, prefix)
    snapshot = json.loads(json.dumps(original.to_dict()))
    restored = ShelfState.from_dict(snapshot, SPEC)
    assert restored == original
    t0_s = (original.last_ts_s or 1_000.0) + 1.0
    assert run_stream(restored, suffix, t0_s) == run_stream(original, suffix, t0_s)
    assert restored.to_dict() == original.to_dict()


@given(prefix=reading_steps, suffix=reading_steps)
def test_restoring_a_snapshot_undoes_the_readings_applied_since(
    prefix: list[tuple[float, float, float]], suffix: list[tuple[float, float, float]]
) -> None:
    """Ingest rolls a group back this way when its journal commit fails."""
    state = ShelfState(SPEC)
    run_stream(state, prefix)
    before = state.to_dict()
    snapshot = state.snapshot()
    t0_s = (state.last_ts_s or 1_000.0) + 1.0
    first = run_stream(state, suffix, t0_s)
    state.restore(snapshot, SPEC)
    assert state.to_dict() == before
    assert run_stream(state, suffix, t0_s) == first
