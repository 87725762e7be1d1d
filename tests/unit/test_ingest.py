"""Ingest against a real SQLite journal; the broker side is a fake of our own MessageLink port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.adapters.journal import Journal, saved_state
from controller.config import SiteConfig, load_site
from controller.domain import shelf_table
from controller.domain.events import BusEvent, SeqGap, SeqGapFilled, StockChanged
from controller.ports import JournalUnavailable, ReadingRow
from controller.services.history import HistoryService, Topology
from controller.services.ingest import (
    COLUMNS_MIN_BYTES,
    MAX_HOLES,
    IngestService,
    IngestSettings,
    shelf_specs,
)
from devices.link.mqtt import MqttMessage
from devices.shelf_scale import REASONS
from tests.unit.test_history_service import FAST, MemorySink

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "firmware-configs" / "sites" / "demo.toml"
T_A01 = "floorhand/demo/A/scale/scale-a01"
NOW = 1_764_067_200.0


class FakeLink:
    """Records what ingest asks of the broker link (our own port, not a third-party surface)."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.paused = 0
        self.resumed = 0
        self.resumed_event: asyncio.Event | None = None

    epoch = 1

    def ack(self, packet_ids: Sequence[int], epoch: int | None = None) -> None:
        assert epoch in (None, self.epoch)
        self.acked.extend(packet_ids)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload, qos, retain))

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1
        if self.resumed_event is not None:
            self.resumed_event.set()


class Harness:
    def __init__(self, tmp: Path, site: SiteConfig) -> None:
        self.journal = Journal(tmp / "j.sqlite")
        restored = self.journal.open()
        self.link = FakeLink()
        self.published: list[BusEvent] = []
        """The typed events ingest published (the bus carries them)."""
        self.now = NOW
        self.ingest = IngestService(
            IngestSettings.from_site(site),
            self.journal,
            self.link,
            self.published.extend,
            clock=lambda: self.now,
            shelf_specs=shelf_specs(site),
        )
        self.ingest.restore(restored.cursors, restored.shelf_states)
        self._pid = 0

    def msg(self, topic: str, payload: bytes | str, qos: int = 1) -> MqttMessage:
        self._pid = self._pid % 65535 + 1
        data = payload.encode() if isinstance(payload, str) else payload
        return MqttMessage(topic, data, qos, False, self._pid if qos else 0, False)

    def send(self, *msgs: MqttMessage) -> None:
        self.ingest.on_messages(list(msgs))


@pytest.fixture
def site() -> SiteConfig:
    return load_site(DEMO)


@pytest.fixture
def h(tmp_path: Path, site: SiteConfig) -> Harness:
    harness = Harness(tmp_path, site)
    yield harness
    harness.journal.close()


def reading(seq: int, grams: float, ts: float = NOW, device: str = "scale-a01", **kw: Any) -> bytes:
    return orjson.dumps({"device": device, "seq": seq, "ts": ts, "grams": grams, **kw})


def load_corpus() -> list[dict[str, Any]]:
    lines = (ROOT / "tests" / "data" / "poison_corpus.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def corpus_payload(case: dict[str, Any]) -> bytes:
    if "payload_repeat" in case:
        ch, n = case["payload_repeat"]
        return str(ch).encode() * int(n)
    if "payload_batch" in case:
        return orjson.dumps(
            [
                {"device": "scale-a01", "seq": i, "ts": NOW, "grams": 1000.0}
                for i in range(case["payload_batch"])
            ]
        )
    return str(case["payload"]).encode("utf-8")


@pytest.mark.parametrize("case", load_corpus(), ids=lambda c: c["name"])
def test_poison_is_rejected_counted_dead_lettered_and_acked(
    h: Harness, case: dict[str, Any]
) -> None:
    good_before = h.msg(T_A01, reading(1, 1500.0))
    h.send(good_before)
    poison = h.msg(case["topic"], corpus_payload(case))
    h.send(poison)
    # One rejection per message, or per element of a batch; all for the expected reason.
    assert set(h.ingest.rejected) == {case["reason"]}, dict(h.ingest.rejected)
    assert case["reason"] in REASONS
    assert poison.packet_id in h.link.acked, "poison must be acked, or the broker redelivers it"
    letters = h.journal.dead_letters(5)
    assert letters[0]["reason"] == case["reason"]
    assert letters[0]["size"] == len(poison.payload)
    # The next good message is processed normally.
    h.send(h.msg(T_A01, reading(2, 1500.0)))
    assert h.ingest.readings == 2
    assert h.journal.count("readings") == 2


def test_retained_copies_are_not_fresh_readings(h: Harness) -> None:
    h.send(MqttMessage("shelf-c01/sensor/shelf_weight/state", b"1834.5", 0, True, 0, False))
    h.send(MqttMessage("floorhand/demo/alerts/SKU-0001", b"{}", 1, True, 9, False))
    assert h.ingest.ignored_retained == 2
    assert h.ingest.readings == 0
    assert dict(h.ingest.rejected) == {}
    assert 9 in h.link.acked
    h.send(MqttMessage("shelf-c01/sensor/shelf_weight/state", b"1834.5", 0, False, 0, False))
    assert h.ingest.readings == 1


def test_batch_with_one_bad_element_keeps_the_good_ones(h: Harness) -> None:
    batch = orjson.dumps(
        [
            {"device": "scale-a01", "seq": 1, "ts": NOW, "grams": 1500.0},
            {"device": "scale-a01", "seq": 2, "ts": NOW, "grams": -3.0},
            {"device": "scale-a01", "seq": 3, "ts": NOW, "ch": 1, "grams": 1600.0},
        ]
    )
    h.send(h.msg(T_A01, batch))
    assert h.ingest.readings == 2
    assert h.ingest.rejected["negative"] == 1
    assert h.journal.dead_letters(1)[0]["payload"].startswith('{"device":"scale-a01"')


def test_duplicates_are_dropped(h: Harness) -> None:
    h.send(*(h.msg(T_A01, reading(s, 1500.0, NOW + s)) for s in (1, 2, 3, 5)))
    assert h.ingest.readings == 4
    h.send(h.msg(T_A01, reading(3, 1500.0, NOW + 3)))  # redelivered
    h.send(h.msg(T_A01, reading(5, 1500.0, NOW + 5)))  # redelivered newest
    assert h.ingest.rejected["duplicate"] == 2
    assert h.ingest.readings == 4
    assert h.ingest.devices["scale-a01"].gaps == 1
    assert any(isinstance(e, SeqGap) and e.missing == 1 for e in h.published)


def shelf_of_a01(site: SiteConfig) -> str:
    return next(s.id for s in site.shelves if s.scale == "scale-a01" and s.channel == 0)


async def test_late_reading_is_journaled_and_historied_once_without_moving_state(
    h: Harness, site: SiteConfig
) -> None:
    """fault case M7: a publisher may send seq 5 before its unacknowledged seq 3 (paho after a
    broker restart). Seq 3 is a real measurement: journaled, in history at its own time, once;
    the shelf keeps the state of seq 5; the gap seq 5 opened is filled."""
    sid = shelf_of_a01(site)
    h.send(*(h.msg(T_A01, reading(s, 1500.0, NOW + s)) for s in (1, 2, 5)))
    info = h.ingest.devices["scale-a01"]
    assert (info.gaps, info.missing_readings) == (1, 2)  # seq 3 and 4 missing
    state_before = h.ingest.states[sid].to_dict()
    seen_before = info.last_seen_s
    cursor_before = h.ingest.cursors["scale-a01"]
    h.now += 10.0
    late = h.msg(T_A01, reading(3, 1900.0, NOW + 3))
    h.send(late)
    assert late.packet_id in h.link.acked
    assert dict(h.ingest.rejected) == {}
    assert h.journal.dead_letters(5) == []
    assert h.journal.has_reading("scale-a01", 0, 3, NOW + 3), "the late reading is in the outbox"
    assert h.ingest.readings == 4
    assert h.ingest.late_readings == 1
    assert h.ingest.states[sid].to_dict() == state_before, "older never moves current state"
    assert info.last_seen_s == seen_before
    cursor = h.ingest.cursors["scale-a01"]
    assert (cursor.epoch, cursor.seq, cursor.ts_s) == (0, 5, cursor_before.ts_s)
    assert cursor.applied == cursor_before.applied + 1
    assert (info.gaps, info.missing_readings) == (1, 1), "seq 3 filled its gap; seq 4 missing"
    assert [e for e in h.published if isinstance(e, SeqGapFilled)] == [
        SeqGapFilled(NOW + 3, "scale-a01", 0, 3, 3, 1)
    ]
    # A second copy of seq 3 is a true duplicate.
    h.send(h.msg(T_A01, reading(3, 1900.0, NOW + 3)))
    assert dict(h.ingest.rejected) == {"duplicate": 1}
    assert h.ingest.readings == 4
    assert info.missing_readings == 1
    # History: every reading once, each at its own millisecond.
    sink = MemorySink()
    svc = HistoryService(h.journal, sink, Topology.from_site(site), FAST)
    while await svc.drain_once():
        pass
    weights = sorted(
        (dict(p.fields)["seq"], p.ts_ms) for p in sink.points.values() if p.measurement == "weight"
    )
    assert weights == [(s, round((NOW + s) * 1000)) for s in (1, 2, 3, 5)]
    gap_points = [p for p in sink.points.values() if p.measurement == "seq_gap"]
    assert sum(int(dict(p.fields)["missing"]) for p in gap_points) == 1  # 2 missing, 1 filled


def test_late_readings_survive_a_restart_and_stay_exactly_once(
    tmp_path: Path, site: SiteConfig
) -> None:
    a = Harness(tmp_path, site)
    a.send(*(a.msg(T_A01, reading(s, 1500.0, NOW + s)) for s in (1, 2, 6)))
    a.journal.close()
    b = Harness(tmp_path, site)
    info = b.ingest.devices["scale-a01"]
    assert (info.gaps, info.missing_readings) == (1, 3), "gap accounting is journaled"
    b.send(*(b.msg(T_A01, reading(s, 1500.0, NOW + s)) for s in (4, 3, 4, 5, 2)))
    assert b.ingest.readings == 3
    assert dict(b.ingest.rejected) == {"duplicate": 2}
    assert (info.gaps, info.missing_readings) == (1, 0)
    assert b.journal.count("readings") == 6
    b.journal.close()


def test_late_reading_below_the_window_is_journaled_not_dropped(h: Harness) -> None:
    far = 1000
    h.send(h.msg(T_A01, reading(1, 1500.0, NOW + 1)))
    h.send(h.msg(T_A01, reading(far, 1500.0, NOW + 100)))
    h.send(h.msg(T_A01, reading(2, 1500.0, NOW + 2)))  # 998 seqs behind the newest
    assert h.ingest.readings == 3
    assert dict(h.ingest.rejected) == {}
    assert h.ingest.devices["scale-a01"].missing_readings == far - 3
    h.send(h.msg(T_A01, reading(2, 1500.0, NOW + 2)))
    assert dict(h.ingest.rejected) == {"duplicate": 1}


def test_gap_ranges_are_bounded_and_a_forgotten_ones_reading_still_counts_once(h: Harness) -> None:
    n = MAX_HOLES + 4  # every other seq lost: one range per gap
    h.send(*(h.msg(T_A01, reading(2 * i, 1500.0, NOW + i * 0.01)) for i in range(n + 1)))
    cur = h.ingest.cursors["scale-a01"]
    assert len(cur.holes) == MAX_HOLES
    assert cur.floor == 8  # ranges 1, 3, 5 and 7 forgotten
    info = h.ingest.devices["scale-a01"]
    assert (info.gaps, info.missing_readings) == (n, n)
    h.send(h.msg(T_A01, reading(3, 1500.0, NOW)))  # in a forgotten range: the outbox decides
    h.send(h.msg(T_A01, reading(9, 1500.0, NOW)))  # in a remembered one: fills it
    assert h.ingest.late_readings == 2
    assert info.missing_readings == n - 1  # the forgotten one stays counted missing
    h.send(h.msg(T_A01, reading(3, 1500.0, NOW)), h.msg(T_A01, reading(9, 1500.0, NOW)))
    assert dict(h.ingest.rejected) == {"duplicate": 2}
    assert h.journal.count("readings") == n + 3


def test_new_epoch_is_a_new_session_and_old_epoch_is_still_a_measurement(
    h: Harness, site: SiteConfig
) -> None:
    sid = shelf_of_a01(site)
    h.send(h.msg(T_A01, reading(100, 1500.0)))
    h.send(h.msg(T_A01, reading(0, 1500.0, NOW + 1, epoch=1)))  # rebooted: seq restarts
    assert h.ingest.readings == 2
    state = h.ingest.states[sid].to_dict()
    h.send(h.msg(T_A01, reading(101, 1900.0, NOW + 0.5)))  # the old boot's straggler
    assert h.ingest.readings == 3
    assert dict(h.ingest.rejected) == {}
    assert h.journal.has_reading("scale-a01", 0, 101, NOW + 0.5)
    assert h.ingest.states[sid].to_dict() == state
    assert h.ingest.cursors["scale-a01"].epoch == 1
    h.send(h.msg(T_A01, reading(101, 1900.0, NOW + 0.5)))  # its redelivery
    assert dict(h.ingest.rejected) == {"duplicate": 1}


def test_restart_restores_cursors_so_redelivery_is_not_applied_twice(
    tmp_path: Path, site: SiteConfig
) -> None:
    a = Harness(tmp_path, site)
    msgs = [a.msg(T_A01, reading(s, 1500.0 + 0.1 * s, NOW + s)) for s in range(1, 300)]
    a.send(*msgs)
    states_before = {k: v.to_dict() for k, v in a.ingest.states.items()}
    a.journal.close()
    b = Harness(tmp_path, site)
    b.send(*msgs)  # the broker redelivers everything (acks lost with the crash)
    assert b.ingest.readings == 0
    assert b.ingest.rejected["duplicate"] == len(msgs)
    assert {k: v.to_dict() for k, v in b.ingest.states.items()} == states_before
    assert b.journal.count("readings") == len(msgs)
    b.journal.close()


def test_stock_counts_from_weight(h: Harness, site: SiteConfig) -> None:
    shelf = next(s for s in site.shelves if s.scale == "scale-a01" and s.channel == 0)
    grams = shelf.tare_g + 12 * shelf.unit_weight_g
    h.send(*(h.msg(T_A01, reading(s, grams + 0.2, NOW + s)) for s in range(1, 8)))
    assert h.ingest.states[shelf.id].units == 12
    assert any(isinstance(e, StockChanged) and e.new_units == 12 for e in h.published)
    # The journal row of each published event is its wire dict.
    rows = [
        orjson.loads(r[0])
        for r in h.journal.db.execute("SELECT body FROM events WHERE kind = 'stock_changed'")
    ]
    assert rows == [e.as_dict() for e in h.published if isinstance(e, StockChanged)]


def test_integer_ts_and_grams_are_numbers(h: Harness) -> None:
    h.send(
        h.msg(
            T_A01,
            orjson.dumps({"device": "scale-a01", "seq": 1, "ts": 1_764_067_200, "grams": 1500}),
        )
    )
    assert h.ingest.readings == 1
    assert not h.ingest.rejected
    (journaled,) = h.journal.read_readings(0, 10)
    row = (journaled.ts_s, journaled.weight_g)
    assert row == (1_764_067_200.0, 1500.0)
    assert all(type(v) is float for v in row)


class FailingJournal(Journal):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail = 0

    def commit(self, readings: Sequence[ReadingRow], *args: Any, **kwargs: Any) -> None:
        if self.fail:
            self.fail -= 1
            raise JournalUnavailable("journal commit failed: database or disk is full")
        super().commit(readings, *args, **kwargs)


async def test_commit_failure_holds_acks_rolls_back_and_retries(
    tmp_path: Path, site: SiteConfig
) -> None:
    h = Harness(tmp_path, site)
    h.journal.close()
    h.journal = FailingJournal(tmp_path / "j.sqlite")
    h.journal.open()
    h.ingest._journal = h.journal
    h.send(h.msg(T_A01, reading(1, 1500.0)))
    shelf = next(sid for sid, spec in h.ingest.specs.items() if spec.scale_id == "scale-a01")
    before = h.ingest.states[shelf].to_dict()
    h.journal.fail = 2
    m2 = h.msg(T_A01, reading(2, 1501.0, NOW + 1))
    h.send(m2)
    assert m2.packet_id not in h.link.acked
    assert h.link.paused == 1
    assert h.ingest.cursors["scale-a01"].seq == 1, "in-memory state must roll back"
    assert h.ingest.states[shelf].to_dict() == before, "the shelf state too"
    m3 = h.msg(T_A01, reading(3, 1502.0, NOW + 2))
    h.send(m3)  # arrives while the retry is pending: held, order kept
    h.link.resumed_event = asyncio.Event()
    async with asyncio.timeout(5):
        await h.link.resumed_event.wait()
    assert {m2.packet_id, m3.packet_id} <= set(h.link.acked)
    assert h.journal.count("readings") == 3
    assert h.ingest.cursors["scale-a01"].seq == 3
    h.journal.close()


async def test_close_cancels_a_pending_commit_retry(tmp_path: Path, site: SiteConfig) -> None:
    """A stop during a journal outage: the retry timer must not fire after the journal is
    closed (it would commit into a closed journal)."""
    h = Harness(tmp_path, site)
    h.journal.close()
    h.journal = FailingJournal(tmp_path / "j.sqlite")
    h.journal.open()
    h.ingest._journal = h.journal
    h.journal.fail = 1_000
    h.send(h.msg(T_A01, reading(1, 1500.0)))
    assert h.ingest.retry_pending
    h.ingest.close()
    assert not h.ingest.retry_pending
    h.journal.close()


def test_ingest_serves_the_scales_its_settings_name(tmp_path: Path, site: SiteConfig) -> None:
    """Ingest is built from IngestSettings, not the site file: settings naming only zone A's
    scales give an ingest that applies zone A and rejects a zone B scale as unknown."""
    whole = IngestSettings.from_site(site)
    zone_a = replace(whole, scales=tuple(sc for sc in whole.scales if sc.zone == "A"))
    specs = {k: v for k, v in shelf_specs(site).items() if v.zone == "A"}
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    link = FakeLink()
    ingest = IngestService(zone_a, journal, link, lambda events: None, clock=lambda: NOW,
                           shelf_specs=specs)  # fmt: skip
    b01 = "floorhand/demo/B/scale/scale-b01"
    ingest.on_messages(
        [
            MqttMessage(T_A01, reading(1, 1500.0), 1, False, 1, False),
            MqttMessage(b01, reading(1, 1500.0, device="scale-b01"), 1, False, 2, False),
        ]
    )
    assert set(ingest.devices) == {sc.id for sc in zone_a.scales}
    assert ingest.readings == 1
    assert dict(ingest.rejected) == {"unknown_device": 1}
    assert link.acked == [1, 2]
    journal.close()


class BuggyJournal(Journal):
    """A commit that fails with a programming error (here: a signature mismatch), not with an
    unavailable journal."""

    def commit(self, readings: Sequence[ReadingRow], *args: Any, **kwargs: Any) -> None:
        raise TypeError("commit() got an unexpected keyword argument 'shelf_state'")


def test_a_programming_error_in_the_commit_is_not_taken_for_an_unavailable_journal(
    tmp_path: Path, site: SiteConfig
) -> None:
    """Only JournalUnavailable means "pause and retry": a bug surfaces (the MQTT link logs it
    and reconnects, so the broker redelivers the group) instead of being retried forever as
    "journal commit failed" while reading stays paused."""
    h = Harness(tmp_path, site)
    h.send(h.msg(T_A01, reading(1, 1500.0)))
    h.journal.close()
    h.journal = BuggyJournal(tmp_path / "j.sqlite")
    h.journal.open()
    h.ingest._journal = h.journal
    m2 = h.msg(T_A01, reading(2, 1501.0, NOW + 1))
    with pytest.raises(TypeError, match="unexpected keyword"):
        h.send(m2)
    assert not h.ingest.retry_pending
    assert h.link.paused == 0
    assert h.ingest.commit_failures == 0
    assert h.ingest.last_commit_error is None
    assert m2.packet_id not in h.link.acked
    assert h.ingest.cursors["scale-a01"].seq == 1, "in-memory state must roll back"
    h.journal.close()


async def test_a_full_journal_holds_the_group_and_retries_until_writable(
    tmp_path: Path, site: SiteConfig
) -> None:
    """A real SQLITE_FULL (the file capped at its size): reading pauses, nothing is acked,
    and once there is room again the held group commits, is acked and reading resumes."""
    h = Harness(tmp_path, site)
    h.send(h.msg(T_A01, reading(1, 1500.0)))
    pages = int(h.journal.db.execute("PRAGMA page_count").fetchone()[0])
    h.journal.db.execute(f"PRAGMA max_page_count={pages}")
    msgs = [h.msg(T_A01, reading(s, 1500.0 + s, NOW + s / 100)) for s in range(2, 400)]
    h.send(*msgs)
    assert h.ingest.retry_pending
    assert h.link.paused == 1
    assert h.ingest.commit_failures >= 1
    assert "full" in (h.ingest.last_commit_error or "")
    assert not {m.packet_id for m in msgs} & set(h.link.acked)
    assert h.ingest.cursors["scale-a01"].seq == 1
    h.link.resumed_event = asyncio.Event()
    h.journal.db.execute("PRAGMA max_page_count=1073741823")
    async with asyncio.timeout(5):
        await h.link.resumed_event.wait()
    assert {m.packet_id for m in msgs} <= set(h.link.acked)
    assert h.journal.count("readings") == 399
    assert h.ingest.cursors["scale-a01"].seq == 399
    h.journal.close()


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=20,
)
_reading_like = st.fixed_dictionaries(
    {},
    optional={
        "device": st.sampled_from(["scale-a01", "scale-a02", "", "x"]) | st.integers(-5, 5),
        "seq": st.integers(-5, 2**64 - 1) | st.floats() | st.text(max_size=3),
        "ts": st.floats() | st.integers(-5, 2**63) | st.just(NOW),
        "grams": st.floats() | st.integers(-(2**63), 2**63) | st.text(max_size=3),
        "ch": st.integers(-2, 3),
        "epoch": st.integers(-2, 3),
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payloads=st.lists(
        st.binary(max_size=200)
        | _json_values.map(orjson.dumps)
        | _reading_like.map(orjson.dumps)
        | st.lists(_reading_like, max_size=4).map(orjson.dumps),
        min_size=1,
        max_size=8,
    ),
    topic=st.sampled_from(
        [T_A01, "floorhand/demo/A/scale/nope", "shelf-c01/sensor/shelf_weight/state", "x/y"]
    ),
)
def test_fuzz_never_crashes_and_everything_is_acked_and_accounted(
    h: Harness, payloads: list[bytes], topic: str
) -> None:
    before_acked = len(h.link.acked)
    before = h.ingest.readings + sum(h.ingest.rejected.values())
    msgs = [h.msg(topic, p) for p in payloads]
    h.send(*msgs)
    assert len(h.link.acked) - before_acked == len(msgs)
    after = h.ingest.readings + sum(h.ingest.rejected.values())
    assert after - before >= len(msgs), "every message is applied or rejected with a reason"
    assert set(h.ingest.rejected) <= set(REASONS)
    for state in h.ingest.states.values():
        assert state.units is None or state.units >= 0


# -- the column path (IngestService._in_columns) gives what the reading-by-reading path gives --

_DEVICES = ("scale-a01", "scale-a02", "scale-a03")
_UNIT = {("scale-a01", 0): (1500.0, 412.0), ("scale-a01", 1): (1200.0, 230.0)}
_element = st.tuples(
    st.integers(0, 2),  # device
    st.integers(0, 1),  # channel
    st.sampled_from([*[1] * 30, 0, 2, -2]),  # next seq; a duplicate, a gap, a late one
    st.sampled_from([10, 10, 10, 11, 30]),  # units on the shelf
    st.sampled_from([0.0, 0.0, 1.0, -1.0, 5.0, 900.0]),  # noise, a spike
    st.sampled_from([0.5, 0.5, 1.0, 0.0, 40.0]),  # seconds after the previous reading
    st.sampled_from([False] * 40 + [True]),  # the reading names another device than its topic
)
_message = st.sampled_from([1] * 12 + [3] * 3 + [0]).flatmap(
    lambda n: st.lists(_element, min_size=n, max_size=n)  # 0: a poison message; 3: a batch
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    groups=st.lists(
        st.tuples(st.lists(_message, min_size=1, max_size=12), st.sampled_from([0.1, 0.1, 100.0])),
        min_size=1,
        max_size=6,
    )
)
def test_a_group_in_columns_is_journaled_and_published_as_reading_by_reading(
    tmp_path_factory: pytest.TempPathFactory,
    site: SiteConfig,
    groups: list[tuple[list[list[tuple[int, int, int, int, float, float, bool]]], float]],
) -> None:
    base = tmp_path_factory.mktemp("columns")
    ours, ref = Harness(base / "ours", site), Harness(base / "ref", site)
    ref.ingest._in_columns = lambda *args: False  # type: ignore[method-assign]
    ours.ingest.columns_min_bytes = 0  # small groups in columns too
    with mock.patch.object(shelf_table, "GROUP_COLUMNS_FROM", 0):
        _columns_against_one_by_one(ours, ref, groups)


def _columns_against_one_by_one(
    ours: Harness,
    ref: Harness,
    groups: list[tuple[list[list[tuple[int, int, int, int, float, float, bool]]], float]],
) -> None:
    for h in (ours, ref):
        # A scale factor on one channel (its grams are multiplied) and an unused channel
        # (valid readings that feed no shelf: the cursor moves, nothing is journaled).
        h.ingest.calibrate("A-02-1", scale_factor=1.05, by="test", now_s=NOW)
        del h.ingest._by_channel[("scale-a03", 1)]
    seqs = dict.fromkeys(_DEVICES, 0)
    ts = NOW
    for device in _DEVICES[:2]:  # the third starts its cursor in a group, in columns or not
        for h in (ours, ref):
            h.now = ts
            h.send(h.msg(f"floorhand/demo/A/scale/{device}", reading(0, 1000.0, ts, device)))
    try:
        for index, (messages, lag) in enumerate(groups):
            # Mid-stream, what the column path looks up per scale changes: a scale factor,
            # then a shelf leaves (its channel feeds nothing from then on).
            for h in (ours, ref):
                if index == 1:
                    h.ingest.calibrate("A-02-1", scale_factor=0.95, by="test", now_s=h.now)
                elif index == 2:
                    gone = next(
                        sid
                        for sid, spec in h.ingest.base_specs.items()
                        if (spec.scale_id, spec.channel) == ("scale-a01", 1)
                    )
                    kept = {k: v for k, v in h.ingest.base_specs.items() if k != gone}
                    h.ingest.apply_topology(h.ingest.settings.scales, kept, shelves=[gone])
            payloads: list[tuple[str, bytes]] = []
            for elements in messages:
                if not elements:
                    payloads.append(("floorhand/demo/A/scale/scale-a01", b'{"device":'))
                    continue
                device = _DEVICES[elements[0][0]]  # a message's readings are one device's
                objs = []
                for _, ch, step, units, noise, dt, other in elements:
                    seqs[device] = max(0, seqs[device] + step)
                    ts += dt
                    tare, unit = _UNIT.get((device, ch), (1000.0, 100.0))
                    claimed = _DEVICES[(_DEVICES.index(device) + 1) % 3] if other else device
                    objs.append(
                        {"device": claimed, "ch": ch, "seq": seqs[device], "ts": ts,
                         "grams": tare + units * unit + noise}
                    )  # fmt: skip
                body = orjson.dumps(objs[0] if len(objs) == 1 else objs)
                payloads.append((f"floorhand/demo/A/scale/{device}", body))
            for h in (ours, ref):
                h.now = ts + lag
                h.send(*[h.msg(topic, body) for topic, body in payloads])
            assert [e.as_dict() for e in ours.published] == [e.as_dict() for e in ref.published]
            assert ours.ingest.cursors == ref.ingest.cursors
            assert ours.ingest.states.to_dicts(ours.ingest.states) == ref.ingest.states.to_dicts(
                ref.ingest.states
            )
            for name in ("readings", "messages", "late_readings", "commits"):
                assert getattr(ours.ingest, name) == getattr(ref.ingest, name), name
            assert ours.ingest.rejected == ref.ingest.rejected
            assert ours.link.acked == ref.link.acked
            assert {
                d: (i.last_seen_s, i.gaps, i.missing_readings)
                for d, i in ours.ingest.devices.items()
            } == {
                d: (i.last_seen_s, i.gaps, i.missing_readings)
                for d, i in ref.ingest.devices.items()
            }
            for query in ("SELECT ts, kind, body FROM events ORDER BY id",):
                assert (
                    ours.journal.db.execute(query).fetchall()
                    == ref.journal.db.execute(query).fetchall()
                ), query
            assert saved_state(ours.journal.db) == saved_state(ref.journal.db)
            assert ours.journal.read_readings(0, 1 << 30) == ref.journal.read_readings(0, 1 << 30)
    finally:
        ours.journal.close()
        ref.journal.close()


def _count_handled(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A list that gets each message `IngestService._handle` is called with from now on (the
    reading-by-reading path)."""
    handled: list[object] = []
    handle = IngestService._handle

    def counting(self: IngestService, *args: Any) -> None:
        handled.append(args[0])
        handle(self, *args)

    monkeypatch.setattr(IngestService, "_handle", counting)
    return handled


def test_a_steady_stream_goes_in_columns(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readings next in their devices' sequences never reach the reading-by-reading path once
    each device has a cursor; a gap sends its group there."""
    ts = NOW
    h.ingest.columns_min_bytes = 0
    for device in _DEVICES:
        h.send(h.msg(f"floorhand/demo/A/scale/{device}", reading(0, 1000.0, ts, device)))
    handled = _count_handled(monkeypatch)
    for seq in range(1, 30):
        ts += 0.5
        h.now = ts
        h.send(
            *[
                h.msg(f"floorhand/demo/A/scale/{d}", reading(seq, 1500.0 + 10 * 412.0, ts, d))
                for d in _DEVICES
            ]
        )
    assert handled == []
    assert h.ingest.states["A-01-1"].units == 10
    assert h.ingest.readings == 3 + 29 * 3
    h.send(h.msg(T_A01, reading(31, 1500.0 + 10 * 412.0, ts, "scale-a01")))  # seq 30 missing
    assert len(handled) == 1
    assert h.ingest.cursors["scale-a01"].gaps == 1


def test_a_first_group_of_new_devices_goes_in_columns(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Devices without a cursor (a first start, new scales) start it in the column path, as
    reading by reading would: their first reading's seq is the floor, every reading counts."""
    h.ingest.columns_min_bytes = 0
    handled = _count_handled(monkeypatch)
    ts = NOW
    msgs = []
    for seq in range(7, 37):
        ts += 0.5
        msgs += [
            h.msg(f"floorhand/demo/A/scale/{d}", reading(seq, 1000.0, ts, d)) for d in _DEVICES
        ]
    h.now = ts
    h.send(*msgs)
    assert handled == []
    for d in _DEVICES:
        cur = h.ingest.cursors[d]
        assert (cur.seq, cur.applied, cur.floor, cur.gaps, cur.missing) == (36, 30, 7, 0, 0)
    assert h.ingest.readings == 90


def test_a_small_group_goes_reading_by_reading(h: Harness) -> None:
    """Below COLUMNS_MIN_BYTES of payload a group is not tried in columns (their fixed cost
    would be most of its time); from there it is."""
    tried: list[int] = []
    in_columns = h.ingest._in_columns

    def counting(msgs: Any, *args: Any) -> bool:
        result = in_columns(msgs, *args)
        tried.append(result)
        return result

    h.ingest._in_columns = counting  # type: ignore[method-assign]
    h.send(h.msg(T_A01, reading(0, 1000.0)))
    small = [h.msg(T_A01, reading(seq, 1000.0, NOW + seq)) for seq in range(1, 4)]
    assert sum(len(m.payload) for m in small) < COLUMNS_MIN_BYTES
    h.send(*small)
    assert tried == [False, False]
    big = [h.msg(T_A01, reading(seq, 1000.0, NOW + seq)) for seq in range(4, 200)]
    assert sum(len(m.payload) for m in big) >= COLUMNS_MIN_BYTES
    h.send(*big)
    assert tried == [False, False, True]
    assert h.ingest.readings == 200
