"""`Backoff`, the one retry schedule, and the schedule each of its users builds (the
figures are the ones each loop had before they shared it)."""

from __future__ import annotations

import random

import pytest

from controller.owner import probe_backoff
from controller.services.history import HistorySettings
from controller.services.ingest import commit_retry_backoff
from devices.link.backoff import Backoff
from devices.link.modbus import ModbusLinkConfig
from devices.link.mqtt import MqttLinkConfig


class Script:
    """A random source that returns the given values in turn and fails when they run out."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def delays(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_exponential_capped_and_reset() -> None:
    backoff = Backoff(0.1, 2.0, 2.0, jitter=0.0, rng=Script())  # no jitter: nothing drawn
    assert delays(backoff, 7) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert backoff.attempt == 7
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() == pytest.approx(0.1)


def test_jitter_only_shortens_by_the_drawn_fraction() -> None:
    backoff = Backoff(0.1, 2.0, jitter=0.2, rng=Script(0.0, 0.5, 0.25, 0.999, 1.0 - 2**-53))
    assert delays(backoff, 5) == pytest.approx(
        [0.1, 0.2 * 0.9, 0.4 * 0.95, 0.8 * (1 - 0.2 * 0.999), 1.6 * 0.8]
    )


def test_a_seeded_source_gives_the_same_sequence_within_bounds() -> None:
    first = delays(Backoff(rng=random.Random(1)), 200)
    assert first == delays(Backoff(rng=random.Random(1)), 200)
    assert 0.08 < first[0] <= 0.1
    assert all(d <= 2.0 for d in first)
    assert min(first[10:]) > 1.6
    assert len(set(first[10:])) > 100  # spread out, not piled up at the cap


def test_a_session_resets_only_after_staying_up_reset_after_s() -> None:
    backoff = Backoff(0.1, 2.0, jitter=0.0, reset_after_s=10.0)
    assert delays(backoff, 3) == pytest.approx([0.1, 0.2, 0.4])
    assert not backoff.session_ended(9.99)  # dropped right after it came up: keep growing
    assert backoff.next_delay() == pytest.approx(0.8)
    assert backoff.session_ended(10.0)
    assert backoff.next_delay() == pytest.approx(0.1)
    always = Backoff(0.1, 2.0, jitter=0.0)  # reset_after_s 0: any session resets
    delays(always, 4)
    assert always.session_ended(0.0)
    assert always.next_delay() == pytest.approx(0.1)


def test_very_long_outages_stay_at_the_cap() -> None:
    backoff = Backoff(0.1, 2.0, factor=10.0, jitter=0.0)
    assert delays(backoff, 2_000)[-1] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial_s": 0.0}, "initial_s"),
        ({"initial_s": 3.0, "max_s": 2.0}, "initial_s"),
        ({"factor": 0.5}, "factor"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"reset_after_s": -1.0}, "reset_after_s"),
        ({"initial_s": float("nan")}, "initial_s"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(**kwargs)  # type: ignore[arg-type]


# -- each user's schedule --------------------------------------------------------------------


def params(b: Backoff) -> tuple[float, float, float, float, float]:
    return (b.initial_s, b.max_s, b.factor, b.jitter, b.reset_after_s)


def test_mqtt_link_reconnects_after_0_1_to_2_s_reset_by_a_session_of_10_s() -> None:
    assert params(MqttLinkConfig().reconnect_backoff()) == (0.1, 2.0, 2.0, 0.2, 10.0)
    cfg = MqttLinkConfig(backoff_initial_s=0.5, backoff_max_s=4.0, backoff_reset_after_s=1.0)
    assert params(cfg.reconnect_backoff()) == (0.5, 4.0, 2.0, 0.2, 1.0)


def test_modbus_link_reconnects_after_50_ms_to_1_s_reset_by_a_session_of_1_s() -> None:
    """Reset only by a connection that stayed up a liveness timeout (four heartbeats): a PLC
    that accepts and drops us at once is not reconnected to 20 times a second (it was reset
    by every connection that came up)."""
    assert params(ModbusLinkConfig().reconnect_backoff()) == (0.05, 1.0, 2.0, 0.2, 1.0)
    cfg = ModbusLinkConfig(backoff_reset_after_s=0.0)
    assert params(cfg.reconnect_backoff()) == (0.05, 1.0, 2.0, 0.2, 0.0)


def test_modbus_busy_retries_double_from_10_ms_to_100_ms() -> None:
    busy = ModbusLinkConfig().busy_backoff()
    assert delays(busy, 6) == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.1])


def test_historian_sink_retries_jitter_50_to_100_percent_up_to_backoff_max_s() -> None:
    settings = HistorySettings(backoff_initial_s=0.2, backoff_max_s=30.0)
    assert params(settings.sink_backoff()) == (0.2, 30.0, 2.0, 0.5, 0.0)


def test_historian_journal_failures_wait_1_s_doubling_to_backoff_max_s() -> None:
    assert delays(HistorySettings().drain_backoff(), 7) == pytest.approx(
        [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    )
    fast = HistorySettings(backoff_initial_s=0.001, backoff_max_s=0.01).drain_backoff()
    assert delays(fast, 2) == pytest.approx([0.01, 0.01])


def test_owner_probe_retries_0_1_s_doubling_to_the_link_cap() -> None:
    assert delays(probe_backoff(2.0), 6) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0])


def test_journal_commit_retries_0_05_s_doubling_to_2_s() -> None:
    assert delays(commit_retry_backoff(), 7) == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
