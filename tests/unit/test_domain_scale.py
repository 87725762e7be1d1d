"""Scale conditioning: settling, spike rejection, step confirmation."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from controller.domain.model import ShelfSpec
from controller.domain.scale import ScaleConditioner


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


def feed(
    cond: ScaleConditioner, spec: ShelfSpec, values: list[float]
) -> list[tuple[bool, float, bool]]:
    return [cond.push(v, spec) for v in values]


def test_derived_defaults() -> None:
    spec = make_spec()
    assert spec.settle_band_g == pytest.approx(20.0)
    assert spec.spike_g == pytest.approx(500.0)
    light = make_spec(unit_weight_g=1.0)
    assert light.settle_band_g == 2.0
    assert light.spike_g == 50.0
    assert make_spec(settle_band_g=7.0, spike_g=80.0).spike_g == 80.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("unit_weight_g", 0.0),
        ("unit_weight_g", float("nan")),
        ("tare_g", -1.0),
        ("capacity_units", -1),
        ("tolerance_frac", 0.0),
        ("tolerance_frac", 0.6),
        ("settle_window", 0),
        ("max_weight_g", 100.0),
        ("stale_after_s", 0.0),
        ("channel", -1),
    ],
)
def test_bad_spec_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        make_spec(**{field: value})


def test_settles_after_three_readings_within_band() -> None:
    spec = make_spec()
    cond = ScaleConditioner(spec=spec)
    out = feed(cond, spec, [1000.0, 1003.0, 998.0])
    assert [settled for settled, _, _ in out] == [False, False, True]
    assert out[-1][1] == 1000.0
    assert cond.settled


def test_not_settled_while_spread_exceeds_band() -> None:
    spec = make_spec()
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, [1000.0, 1000.0, 1000.0])
    # A one-unit pick: under spike_g, so accepted, but the window spans more than the band.
    out = feed(cond, spec, [900.0, 900.0, 900.0, 900.0])
    assert not any(settled for settled, _, _ in out)
    settled, weight_g, spike = cond.push(900.0, spec)
    assert (settled, weight_g, spike) == (True, 900.0, False)


def test_lone_spike_is_rejected() -> None:
    spec = make_spec()
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, [1000.0] * 5)
    assert cond.push(4000.0, spec) == (True, 1000.0, True)
    assert cond.push(1001.0, spec) == (True, 1000.0, False)
    assert 4000.0 not in cond.window


def test_confirmed_step_restarts_the_window() -> None:
    spec = make_spec()
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, [1000.0] * 5)
    assert cond.push(3000.0, spec) == (True, 1000.0, True)
    settled, weight_g, spike = cond.push(3005.0, spec)
    assert (settled, spike) == (False, False)
    assert weight_g == pytest.approx(3002.5)
    assert cond.window == [3000.0, 3005.0]
    assert cond.push(3002.0, spec) == (True, 3002.0, False)


def test_disagreeing_suspects_are_both_rejected() -> None:
    spec = make_spec()
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, [1000.0] * 5)
    assert cond.push(3000.0, spec)[2]
    assert cond.push(6000.0, spec)[2]
    assert cond.push(6001.0, spec)[2] is False
    assert cond.window == [6000.0, 6001.0]


def test_no_spike_check_with_fewer_than_three_values() -> None:
    spec = make_spec()
    cond = ScaleConditioner(spec=spec)
    out = feed(cond, spec, [1000.0, 9000.0])
    assert [spike for _, _, spike in out] == [False, False]
    assert cond.window == [1000.0, 9000.0]


def test_window_keeps_the_last_settle_window_values() -> None:
    spec = make_spec(settle_window=3)
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, [1000.0, 1001.0, 1002.0, 1003.0, 1004.0])
    assert cond.window == [1002.0, 1003.0, 1004.0]


def test_reset_forgets_everything() -> None:
    spec = make_spec()
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, [1000.0] * 5 + [5000.0])
    cond.reset(spec)
    assert cond.window == []
    assert cond.pending == []
    assert cond.weight_g is None
    assert not cond.settled


weights = st.floats(min_value=-1_000.0, max_value=20_000.0, allow_nan=False)


@given(
    history=st.lists(weights, max_size=40),
    settle_window=st.integers(min_value=1, max_value=9),
)
def test_output_is_the_median_of_a_bounded_window(history: list[float], settle_window: int) -> None:
    spec = make_spec(settle_window=settle_window)
    cond = ScaleConditioner(spec=spec)
    for value in history:
        settled, weight_g, _ = cond.push(value, spec)
        assert 1 <= len(cond.window) <= settle_window
        assert weight_g == pytest.approx(statistics.median(cond.window))
        spread = max(cond.window) - min(cond.window)
        assert settled == (
            len(cond.window) >= min(3, settle_window) and spread <= spec.settle_band_g
        )
        assert len(cond.pending) <= 1


@given(
    history=st.lists(weights, max_size=40),
    level=weights,
    settle_window=st.integers(min_value=1, max_value=9),
)
def test_a_steady_level_always_settles(
    history: list[float], level: float, settle_window: int
) -> None:
    spec = make_spec(settle_window=settle_window)
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, history)
    # Worst case: values short of a full window, then a far level goes the spike-confirm path.
    out = feed(cond, spec, [level] * (max(settle_window, 3) + 1))
    assert out[-1] == (True, level, False)


@given(
    level=st.floats(min_value=0.0, max_value=10_000.0),
    spike=st.floats(min_value=-20_000.0, max_value=20_000.0),
)
def test_a_single_spike_never_moves_a_settled_level(level: float, spike: float) -> None:
    spec = make_spec()
    assume(abs(spike - level) > spec.spike_g)
    cond = ScaleConditioner(spec=spec)
    feed(cond, spec, [level] * 5)
    cond.push(spike, spec)
    assert cond.push(level, spec) == (True, level, False)
