"""Pages of the list reads (controller/services/list_index.py, and the read model over it):
slices after a cursor key, facets moved by updates, text matches, bad cursors, and pages that
cost O(the page) on a large site."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest

from controller.api.app import create_app
from controller.config import load_site
from controller.domain.events import ShelfStatusChanged, StockChanged
from controller.domain.model import ShelfStatus, StockState
from controller.domain.reorder import AlertState, Episode
from controller.domain.stock import ShelfState
from controller.runtime import Runtime
from controller.services import list_index
from controller.services.list_index import BadCursor, ListIndex, decode_cursor, encode_cursor
from controller.services.queries import PageQuery, StockQueries
from tests.sites import auth_headers
from tests.unit.test_read_models import _CountingStates
from tests.zoned_sites import write_site_in_zones


def _index(states: dict[str, str], calls: Counter[str] | None = None) -> ListIndex:
    """Keys k0..k9; even ones in zone A, odd ones in B, k9 also in A; text "Item <i>"."""
    keys = list(states)

    def state(key: str) -> str:
        if calls is not None:
            calls[key] += 1
        return states[key]

    zones: list[tuple[str, ...]] = [("A",) if i % 2 == 0 else ("B",) for i in range(len(keys))]
    zones[-1] = ("A", "B")
    text = [f"{k}\nItem {i}" for i, k in enumerate(keys)]
    return ListIndex(keys, lambda: zones, lambda: text, facets={"s": state})


def _states() -> dict[str, str]:
    return {f"k{i}": "x" if i < 5 else "y" for i in range(10)}


def test_a_page_is_a_slice_after_the_cursor_key_with_the_filtered_total() -> None:
    idx = _index(_states())
    sel = idx.select(limit=4)
    assert (sel.keys, sel.total, sel.next_after) == (["k0", "k1", "k2", "k3"], 10, "k3")
    sel = idx.select(limit=4, after="k7")
    assert (sel.keys, sel.total, sel.next_after) == (["k8", "k9"], 10, None)
    sel = idx.select(limit=2, zone="A", after="k2")
    assert (sel.keys, sel.total, sel.next_after) == (["k4", "k6"], 6, "k6")
    sel = idx.select(limit=2, zone="A", after="k8")  # the cursor need not be in the filter
    assert (sel.keys, sel.total, sel.next_after) == (["k9"], 6, None)
    sel = idx.select(limit=3, zone="B", filters={"s": "y"})
    assert (sel.keys, sel.total, sel.next_after) == (["k5", "k7", "k9"], 3, None)
    assert idx.select(limit=5, zone="nowhere").keys == []
    assert idx.select(limit=5, filters={"s": "never"}).total == 0
    assert idx.zone_keys("B") == ["k1", "k3", "k5", "k7", "k9"]


def test_facets_are_built_once_on_first_use_then_moved_by_updates() -> None:
    states = _states()
    calls: Counter[str] = Counter()
    idx = _index(states, calls)
    idx.update(["k0"])  # nothing built yet: nothing read
    assert idx.select(limit=10, zone="A").keys == ["k0", "k2", "k4", "k6", "k8", "k9"]
    assert not calls
    assert not idx.built
    assert idx.select(limit=10, filters={"s": "x"}).keys == ["k0", "k1", "k2", "k3", "k4"]
    assert idx.built
    assert calls == Counter(states.keys())  # each key read once
    calls.clear()
    idx.select(limit=10, filters={"s": "y"}, zone="A")
    assert not calls  # answered from the buckets
    states["k9"] = "x"
    states["k1"] = "y"
    idx.update(["k9", "k1", "unknown-key"])
    assert calls == Counter({"k9": 1, "k1": 1})
    assert idx.select(limit=10, filters={"s": "x"}).keys == ["k0", "k2", "k3", "k4", "k9"]
    assert idx.select(limit=10, filters={"s": "x"}, zone="B").keys == ["k3", "k9"]
    assert idx.select(limit=10, filters={"s": "y"}, zone="A").keys == ["k6", "k8"]
    assert idx.select(limit=10, filters={"s": "y"}, zone="B").keys == ["k1", "k5", "k7"]
    # A change without an event is seen after rebuild().
    states["k0"] = "y"
    assert "k0" in idx.select(limit=10, filters={"s": "x"}).keys
    idx.rebuild()
    assert "k0" not in idx.select(limit=10, filters={"s": "x"}).keys


def test_an_update_during_the_first_build_waits_for_it_and_is_applied() -> None:
    """A bus event arriving while a worker thread builds the index (here: from inside the build,
    after it read the key) neither blocks the caller nor is lost."""
    states = _states()
    idx: ListIndex | None = None

    def state(key: str) -> str:
        if key == "k9" and idx is not None and not idx.built:
            states["k2"] = "y"  # k2 was read already: its event must not be lost
            idx.update(["k2"])  # returns at once (a lock would deadlock here)
        return states[key]

    keys = list(states)
    idx = ListIndex(keys, lambda: [("A",)] * 10, lambda: keys, facets={"s": state})
    assert idx.select(limit=10, filters={"s": "y"}).keys == ["k2", "k5", "k6", "k7", "k8", "k9"]
    assert idx.select(limit=10, filters={"s": "x"}, zone="A").total == 4


def test_thousands_of_keys_moving_between_states_page_as_a_scan_of_them_would() -> None:
    """Positions past the small-int range, kept in arrays (4 bytes a position), keys sharing one
    zone set: every page and count equals a scan of the live states."""
    n = 5_000
    keys = [f"k{i}" for i in range(n)]
    zones = [("A",) if i % 3 else ("A", "B") for i in range(n)]
    states = {k: "xyz"[i % 3] for i, k in enumerate(keys)}
    idx = ListIndex(keys, lambda: zones, lambda: keys, facets={"s": states.__getitem__})
    assert idx.select(limit=1, filters={"s": "x"}).total == 1667
    moved = keys[::7]
    for i, k in enumerate(moved):
        states[k] = "xyz"[(i + 1) % 3]
    idx.update(moved)

    def scan(zone: str | None, value: str) -> list[str]:
        return [
            k
            for k, zs in zip(keys, zones, strict=True)
            if states[k] == value and (zone is None or zone in zs)
        ]

    for zone in (None, "A", "B"):
        for value in "xyz":
            pages: list[str] = []
            after = None
            while True:
                sel = idx.select(limit=400, zone=zone, filters={"s": value}, after=after)
                pages += sel.keys
                assert sel.total == len(scan(zone, value))
                if sel.next_after is None:
                    break
                after = sel.next_after
            assert pages == scan(zone, value), (zone, value)
        assert idx.counts("s", zone) == dict(
            Counter(states[k] for k in scan(zone, "x") + scan(zone, "y") + scan(zone, "z"))
        )
    assert idx.zone_keys("B") == [k for k, zs in zip(keys, zones, strict=True) if "B" in zs]


def test_a_cursor_neither_repeats_nor_skips_a_key_when_states_change_between_pages() -> None:
    states = _states()
    idx = _index(states)
    first = idx.select(limit=2, filters={"s": "x"})
    assert first.keys == ["k0", "k1"]
    # Before the next page: k0 (already seen) and k3 leave "x", k6 joins.
    states.update(k0="y", k3="y", k6="x")
    idx.update(["k0", "k3", "k6"])
    rest = idx.select(limit=10, filters={"s": "x"}, after=first.next_after)
    assert rest.keys == ["k2", "k4", "k6"]  # k2 and k4 kept their state: not skipped
    assert rest.total == 4  # k1, k2, k4, k6


def test_text_is_a_case_insensitive_substring_cached_per_query_and_bounded() -> None:
    idx = _index(_states())
    assert idx.select(limit=10, q="ITEM 1").keys == ["k1"]
    assert idx.select(limit=10, q="k").total == 10
    sel = idx.select(limit=1, q="item", zone="B", filters={"s": "y"})
    assert (sel.keys, sel.total, sel.next_after) == (["k5"], 3, "k5")
    assert idx.select(limit=1, q="item", zone="B", filters={"s": "y"}, after="k5").keys == ["k7"]
    for i in range(list_index.TEXT_CACHE_SIZE + 5):
        idx.select(limit=1, q=f"nothing {i}")
    assert len(idx._matches) <= list_index.TEXT_CACHE_SIZE


def test_zones_and_text_are_indexed_on_first_use_not_at_start() -> None:
    """Building the read model is on the start-up path: an index reads its keys' zones and
    text only when a read first needs them."""
    calls: Counter[str] = Counter()
    keys = ["a", "b", "c"]

    def zones() -> list[tuple[str, ...]]:
        calls["zones"] += 1
        return [("Z",), ("Y",), ("Z",)]

    def text() -> list[str]:
        calls["text"] += 1
        return ["Apple", "Banana", "Cherry"]

    idx = ListIndex(keys, zones, text)
    assert not calls
    assert idx.select(limit=5, zone="Z").keys == ["a", "c"]
    assert idx.select(limit=5, after="a").keys == ["b", "c"]
    assert calls == Counter({"zones": 1})
    assert idx.select(limit=5, q="an").keys == ["b"]
    assert idx.select(limit=5, q="e", zone="Z").keys == ["a", "c"]
    assert calls == Counter({"zones": 1, "text": 1})


def test_live_facets_are_read_per_candidate_when_asked() -> None:
    live = {"k0": "ok", "k1": "stale", "k2": "ok"}
    keys = list(live)
    idx = ListIndex(keys, lambda: [("A",)] * 3, lambda: keys, live={"state": live.__getitem__})
    assert idx.select(limit=1, filters={"state": "ok"}).keys == ["k0"]
    live["k0"] = "stale"
    sel = idx.select(limit=5, filters={"state": "stale"})
    assert (sel.keys, sel.total) == (["k0", "k1"], 2)
    with pytest.raises(KeyError):
        idx.select(limit=1, filters={"colour": "red"})


@pytest.mark.parametrize(
    "cursor", ["", "garbage", "c1", "c2.azA", "c1.!!!", "c1.a", "c1._-8", "c1." + "A" * 3]
)
def test_a_cursor_that_is_none_of_ours_is_refused(cursor: str) -> None:
    idx = _index(_states())
    with pytest.raises(BadCursor):
        idx.select(limit=1, after=decode_cursor(cursor))


def test_cursors_round_trip_any_key() -> None:
    for key in ("k0", "shelf:sh-A1", "ü/ß?&=", "a" * 300):
        assert decode_cursor(encode_cursor(key)) == key
        assert "=" not in encode_cursor(key)


# -- the read model on a large site ---------------------------------------------------------


def test_a_page_of_a_large_site_reads_only_its_own_shelves(tmp_path: Path) -> None:
    """O(the page): a zone page, and a state page once the index is built, read the states of
    the page's shelves only, not the site's."""
    site = load_site(write_site_in_zones(tmp_path, zones=4, mqtt_port=1, scales=4000))
    rt = Runtime(site)
    states = _CountingStates(rt.ingest.states)
    queries = StockQueries(site, rt.specs, states, rt.ingest.calibrations, rt.alerts)
    page = queries.stock_page(PageQuery(limit=50, zone="Z2"))
    assert [v.sku.id for v in page.items][:3] == ["K2", "K6", "K10"]
    assert (len(page.items), page.total, page.next_after) == (50, 1000, "K198")
    assert len(states.reads) == 50
    states.reads.clear()
    shelves = queries.shelves_page(PageQuery(limit=20, zone="Z1", after="sh997", q="99"))
    hits = [f"sh{i}" for i in range(998, 4000) if i % 4 == 1 and "99" in str(i)]
    assert [v.spec.shelf_id for v in shelves.items] == hits[:20]
    assert shelves.total == len([i for i in range(4000) if i % 4 == 1 and "99" in str(i)])
    assert set(states.reads) == {v.spec.shelf_id for v in shelves.items}
    queries.stock_page(PageQuery(limit=1, state="unknown"))  # builds the state index
    states.reads.clear()
    page = queries.stock_page(PageQuery(limit=30, state="unknown", zone="Z3", after="K3"))
    assert (page.items[0].sku.id, page.total) == ("K7", 1000)
    assert len(states.reads) == 30


def test_the_read_model_follows_the_bus(tmp_path: Path) -> None:
    """The app's read model listens on the runtime's bus: a counted shelf moves its shelf and
    its SKU out of "unknown"."""
    site = load_site(write_site_in_zones(tmp_path, zones=2, mqtt_port=1, scales=4))
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    queries: StockQueries = app.state.queries
    assert queries.stock_page(PageQuery(limit=10, state="ok")).items == []
    spec = rt.specs["sh1"]
    rt.ingest.states["sh1"] = ShelfState(
        spec, status=ShelfStatus.OK, units=20, weight_g=2500.0, last_ts_s=1.0
    )
    rt.bus.publish(
        [
            StockChanged("sh1", "K1", None, 20, 1.0),
            ShelfStatusChanged("sh1", ShelfStatus.UNKNOWN, ShelfStatus.OK, 1.0, "settled"),
        ]
    )
    assert [v.sku.id for v in queries.stock_page(PageQuery(limit=10, state="ok")).items] == ["K1"]
    shelves = queries.shelves_page(PageQuery(limit=10, state="unknown", zone="Z1"))
    assert [v.spec.shelf_id for v in shelves.items] == ["sh3"]


def test_zone_counts_come_from_the_index_and_follow_events(tmp_path: Path) -> None:
    """/zones' shelf counts per status: read from the status buckets (no shelf state read per
    request once built), and moved by the read model's listener."""
    site = load_site(write_site_in_zones(tmp_path, zones=4, mqtt_port=1, scales=4000))
    rt = Runtime(site)
    states = _CountingStates(rt.ingest.states)
    queries = StockQueries(site, rt.specs, states, rt.ingest.calibrations, rt.alerts)
    first = queries.zones()
    assert [(z.zone.id, z.shelves, z.shelf_status) for z in first][:2] == [
        ("Z0", 1000, {"unknown": 1000}),
        ("Z1", 1000, {"unknown": 1000}),
    ]
    assert first[1].skus[:3] == ["K1", "K1001", "K1005"]  # sorted by id
    states.reads.clear()
    spec = rt.specs["sh5"]
    states["sh5"] = ShelfState(spec, status=ShelfStatus.OK, units=3, weight_g=800.0, last_ts_s=1.0)
    queries.on_events([ShelfStatusChanged("sh5", ShelfStatus.UNKNOWN, ShelfStatus.OK, 1.0, "x")])
    assert queries.zones()[1].shelf_status == {"ok": 1, "unknown": 999}
    assert set(states.reads) == {"sh5"}  # the event's shelf only, not the zone's 1000


class _CatalogChanged:
    """Stands in for the catalogue's change event: the read model keys on its ``kind``."""

    kind = "catalog_changed"


async def test_a_catalogue_change_gives_the_app_a_new_read_model_that_follows_the_bus(
    tmp_path: Path,
) -> None:
    site = load_site(write_site_in_zones(tmp_path, zones=2, mqtt_port=1, scales=4))
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    before = app.state.queries
    assert before.stock_page(PageQuery(limit=10, state="ok")).items == []  # built
    rt.bus.publish([_CatalogChanged()])  # type: ignore[list-item]
    after: StockQueries = app.state.queries
    assert after is not before
    assert app.state.reads.stock is after
    assert after.stock_page(PageQuery(limit=10, state="ok")).items == []
    spec = rt.specs["sh2"]
    rt.ingest.states["sh2"] = ShelfState(
        spec, status=ShelfStatus.OK, units=20, weight_g=2500.0, last_ts_s=1.0
    )
    rt.bus.publish([StockChanged("sh2", "K2", None, 20, 1.0)])
    assert [v.sku.id for v in after.stock_page(PageQuery(limit=10, state="ok")).items] == ["K2"]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.get("/api/v1/stock?state=ok", headers=auth_headers("floor"))
    assert [s["sku"] for s in r.json()] == ["K2"]


def test_the_live_feeds_active_alerts_never_build_the_index_themselves(tmp_path: Path) -> None:
    """``AlertQueries.alerts(active=True)`` (the live snapshot, on the event loop) scans the
    episodes until a filtered read built the index in a worker thread, then reads the index:
    the same answer either way."""
    site = load_site(write_site_in_zones(tmp_path, zones=2, mqtt_port=1, scales=6))
    rt = Runtime(site)
    app = create_app(site, runtime=rt)
    alerts = app.state.reads.alerts
    episode = Episode("ep-1", StockState.CRITICAL, 1_700_000_000.0, 2, 1)
    rt.alerts.alerts["K3"] = AlertState("K3", StockState.CRITICAL, 2, episode)
    scanned = alerts.alerts(active=True)
    assert [a["key"] for a in scanned] == ["K3"]
    assert not alerts._index.built
    assert alerts.alerts_page(PageQuery(limit=1, state="critical")).total == 1  # builds
    assert alerts._index.built
    assert alerts.alerts(active=True) == scanned
    assert [a["key"] for a in alerts.alerts(active=False)] == ["K0", "K1", "K2", "K4", "K5"]
