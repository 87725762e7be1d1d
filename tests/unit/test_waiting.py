"""The tests' one waiting helper: returns the first satisfying value, wakes on an event, and
times out naming what it waited for and the last value it saw."""

from __future__ import annotations

import asyncio

import pytest

from tests.waiting import wait_for_condition, wait_for_condition_sync


async def test_returns_the_first_value_that_satisfies_the_condition() -> None:
    values = iter(range(100))
    got = await wait_for_condition(
        lambda: next(values), 5.0, what="3", until=lambda n: n >= 3, interval_s=0.001
    )
    assert got == 3


async def test_awaits_an_async_probe_and_retries_the_named_errors() -> None:
    calls = 0

    async def probe() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("not yet")
        return "up"

    assert await wait_for_condition(probe, 5.0, what="up", retry_on=(OSError,)) == "up"
    assert calls == 3


async def test_an_error_not_named_propagates() -> None:
    def probe() -> bool:
        raise ValueError("a bug in the probe")

    with pytest.raises(ValueError, match="a bug in the probe"):
        await wait_for_condition(probe, 5.0, what="never", retry_on=(OSError,))


async def test_time_out_names_what_and_the_last_observed_value() -> None:
    with pytest.raises(TimeoutError) as err:
        await wait_for_condition(
            lambda: 41, 0.05, what="the answer", until=lambda n: n == 42, context=lambda: "log"
        )
    assert "waiting for the answer" in str(err.value)
    assert "last observed: 41" in str(err.value)
    assert str(err.value).endswith("\nlog")


async def test_wake_checks_after_each_set_and_not_in_between() -> None:
    """With an event, the probe runs once at first and once per wake-up (no polling)."""
    changed = asyncio.Event()
    state = {"n": 0}
    probes = 0

    def probe() -> int:
        nonlocal probes
        probes += 1
        return state["n"]

    async def producer() -> None:
        for _ in range(3):
            await asyncio.sleep(0.01)  # a point in the scenario, not a wait for state
            state["n"] += 1
            changed.set()

    task = asyncio.create_task(producer())
    await wait_for_condition(probe, 5.0, what="n = 3", until=lambda n: n == 3, wake=changed)
    await task
    assert probes == 4


async def test_wake_still_times_out() -> None:
    with pytest.raises(TimeoutError, match="waiting for a set"):
        await wait_for_condition(lambda: False, 0.05, what="a set", wake=asyncio.Event())


def test_sync_variant_times_out_with_the_same_message() -> None:
    assert wait_for_condition_sync(lambda: "x", 1.0, what="x") == "x"
    with pytest.raises(TimeoutError, match=r"waiting for y; last observed: ''"):
        wait_for_condition_sync(lambda: "", 0.05, what="y", interval_s=0.01)
