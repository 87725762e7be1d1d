"""The catalogue API over HTTP (docs/catalogue.md, "Changing a running controller"): the
controller app under a real uvicorn on 127.0.0.1 with a real mosquitto; scales are published by
paho. Each documented status code and each live-change rule has its own test."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

import controller.api.routes.catalog as catalog_routes
import controller.catalog.live as catalog_live
from controller.__main__ import main
from controller.adapters import catalog_store
from controller.adapters.journal import saved_state
from controller.bus import Subscription
from controller.domain.events import CatalogChanged
from devices.link.state import LinkState
from devices.sorter import SorterDriver
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.sorter import SorterPlc
from tests.integration.test_api_ops import (
    OpsServer,
    assert_problem,
    journal_events,
    next_event,
    ops_server,
)
from tests.integration.test_live_ws import wait_message
from tests.integration.test_picking import picking_site
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import TOKENS, grams, topic, write_small_site

pytestmark = pytest.mark.timeout(90)

CSV = "text/csv"
JSONL = "application/x-ndjson"
ENG = "test-engineer"


def journal_site(tmp_path: Path, port: int, **kw: Any) -> Path:
    """A small site whose catalogue (K0..K2, s0..s2, sh0..sh2) is imported into its journal."""
    site = write_small_site(tmp_path, mqtt_port=port, scales=3, catalogue_csv=True, **kw)
    assert main(["catalog", "import", str(tmp_path / "catalogue.csv"), "--site", str(site)]) == 0
    return site


@pytest.fixture
async def server(tmp_path: Path, mosquitto: MosquittoBroker) -> AsyncIterator[OpsServer]:
    async with ops_server(journal_site(tmp_path, mosquitto.port)) as srv:
        yield srv


async def export(srv: OpsServer, fmt: str = "jsonl") -> tuple[int, list[dict[str, Any]]]:
    async with srv.client("supervisor") as c:
        r = await c.get("/api/v1/catalog", params={"format": fmt})
    assert r.status_code == 200, r.text
    version = int(r.headers["x-catalog-version"])
    if fmt == "csv":
        return version, [{"line": line} for line in r.text.splitlines()]
    return version, [orjson.loads(line) for line in r.text.splitlines()]


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(r) for r in records) + b"\n"


async def patch(
    srv: OpsServer, records: list[dict[str, Any]], role: str = "engineer", **params: str
) -> httpx.Response:
    async with srv.client(role) as c:
        return await c.patch(
            "/api/v1/catalog",
            content=orjson.dumps(records),
            headers={"Content-Type": "application/json"},
            params=params,
        )


def sku_of(records: list[dict[str, Any]], ident: str) -> dict[str, Any]:
    return next(r for r in records if r["kind"] == "sku" and r["id"] == ident)


# -- reading ----------------------------------------------------------------------------------


async def test_export_answers_the_catalogue_in_force_with_its_version(server: OpsServer) -> None:
    version, records = await export(server)
    assert version == 1
    assert [(r["kind"], r["id"]) for r in records] == [
        ("sku", "K0"), ("sku", "K1"), ("sku", "K2"),
        ("scale", "s0"), ("scale", "s1"), ("scale", "s2"),
        ("shelf", "sh0"), ("shelf", "sh1"), ("shelf", "sh2"),
    ]  # fmt: skip
    version, lines = await export(server, "csv")
    assert lines[0]["line"].startswith("kind,id,name,reorder_point")
    assert len(lines) == 10
    async with server.client("floor") as c:
        assert_problem(await c.get("/api/v1/catalog"), 403)
    async with server.client("engineer") as c:
        assert_problem(await c.get("/api/v1/catalog", params={"format": "xml"}), 422, "format")


async def test_versions_list_and_one_version_with_its_audit_rows(server: OpsServer) -> None:
    r = await patch(server, [{"kind": "sku", "id": "K1", "reorder_point": 12}])
    assert r.status_code == 200, r.text
    assert r.headers["x-catalog-version"] == "2"
    async with server.client("supervisor") as c:
        listed = (await c.get("/api/v1/catalog/versions")).json()
        one = await c.get("/api/v1/catalog/versions/2")
        missing = await c.get("/api/v1/catalog/versions/9")
    assert listed["version"] == 2
    assert [(v["version"], v["source"], v["actor"]) for v in listed["versions"]] == [
        (1, "import", listed["versions"][0]["actor"]),
        (2, "api", ENG),
    ]
    assert one.status_code == 200
    audit = one.json()["audit"]
    assert [(a["kind"], a["id"], a["op"]) for a in audit] == [("sku", "K1", "change")]
    assert audit[0]["before"]["reorder_point"] == 10
    assert audit[0]["after"]["reorder_point"] == 12
    assert_problem(missing, 404, "no catalogue version 9")


# -- changing: status codes ------------------------------------------------------------------


async def test_dry_run_answers_the_diff_and_changes_nothing(server: OpsServer) -> None:
    r = await patch(server, [{"kind": "sku", "id": "K1", "max_stock": 50}], dry_run="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dry_run"] is True
    assert body["version"] == body["from_version"] == 1
    assert body["lines"] == ["~ sku K1: max_stock 40 -> 50"]
    columns = {"max_stock": {"before": 40, "after": 50}}
    assert body["changes"] == [{"kind": "sku", "id": "K1", "op": "change", "columns": columns}]
    version, records = await export(server)
    assert version == 1
    assert sku_of(records, "K1")["max_stock"] == 40


async def test_put_of_the_export_changes_nothing(server: OpsServer) -> None:
    async with server.client("supervisor") as c:
        exported = await c.get("/api/v1/catalog", params={"format": "csv"})
    async with server.client("engineer") as c:
        r = await c.put("/api/v1/catalog", content=exported.content, headers={"Content-Type": CSV})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    assert r.json()["counts"] == {"add": 0, "remove": 0, "change": 0}


async def test_put_all_or_nothing_names_every_bad_row_and_column(server: OpsServer) -> None:
    _, records = await export(server)
    sku_of(records, "K0")["reorder_point"] = "ten"
    sku_of(records, "K2")["safety_stock"] = 30  # above its reorder point
    sku_of(records, "K1")["reorder_point"] = 11  # a good change, not applied either
    async with server.client("engineer") as c:
        r = await c.put("/api/v1/catalog", content=jsonl(records), headers={"Content-Type": JSONL})
    body = assert_problem(r, 422, "2 error(s); nothing changed")
    assert [(e["line"], e["kind"], e["id"], e["column"]) for e in body["errors"]] == [
        (1, "sku", "K0", "reorder_point"),
        (3, "sku", "K2", "safety_stock"),
    ]
    version, now = await export(server)
    assert version == 1
    assert sku_of(now, "K1")["reorder_point"] == 10


async def test_patch_errors_name_the_line_of_the_body(server: OpsServer) -> None:
    r = await patch(
        server,
        [
            {"kind": "sku", "id": "K1", "reorder_point": 12},
            {"kind": "sku", "id": "K2", "colour": "red"},
            {"kind": "shelf", "id": "nope", "remove": True},
        ],
    )
    body = assert_problem(r, 422)
    assert [(e["line"], e["column"]) for e in body["errors"]] == [(2, "colour")]
    r = await patch(server, [{"kind": "shelf", "id": "nope", "remove": True}])
    body = assert_problem(r, 422)
    assert body["errors"][0]["message"] == "no shelf 'nope' to remove"


async def test_a_supervisor_changes_thresholds_only(server: OpsServer) -> None:
    r = await patch(
        server, [{"kind": "sku", "id": "K1", "reorder_point": 12, "name": "bolts"}], "supervisor"
    )
    body = assert_problem(r, 403, "sku K1 column name")
    assert body["refused"] == ["sku K1 column name"]
    r = await patch(server, [{"kind": "shelf", "id": "sh1", "tare_g": 400}], "supervisor")
    assert_problem(r, 403, "shelf sh1 column tare_g")
    r = await patch(server, [{"kind": "sku", "id": "K1", "reorder_point": 12}], "supervisor")
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    r = await patch(server, [{"kind": "sku", "id": "K1", "reorder_point": 13}], "floor")
    assert_problem(r, 403)


async def test_a_change_the_running_controller_does_not_take_is_refused_with_409(
    server: OpsServer,
) -> None:
    r = await patch(
        server,
        [{"kind": "scale", "id": "s9", "zone": "Z"}, {"kind": "shelf", "id": "sh1", "scale": "s9"}],
    )
    body = assert_problem(r, 409, "floorhand catalog import")
    assert body["refused"] == ["~ shelf sh1: scale"]
    esphome = {"kind": "scale", "id": "e1", "zone": "Z", "format": "esphome"}
    r = await patch(server, [{**esphome, "esphome_node": "n1", "esphome_sensors": ["w"]}])
    body = assert_problem(r, 409)
    assert body["refused"] == ["+ scale e1 (an ESPHome scale: needs a restart)"]
    version, _ = await export(server)
    assert version == 1


async def test_a_body_of_another_type_is_refused_with_415(server: OpsServer) -> None:
    async with server.client("engineer") as c:
        r = await c.put("/api/v1/catalog", json=[{"kind": "sku"}])
        assert_problem(r, 415, "text/csv or application/x-ndjson")
        r = await c.patch("/api/v1/catalog", content=b"x", headers={"Content-Type": "text/plain"})
        assert_problem(r, 415)


async def test_an_inline_site_refuses_changes_with_409(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    async with ops_server(write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=2)) as srv:
        r = await patch(srv, [{"kind": "sku", "id": "K1", "reorder_point": 12}])
        assert_problem(r, 409, "the site file declares the catalogue inline")
        version, records = await export(srv)
        assert version == 1
        assert len(records) == 6


async def test_a_body_over_the_catalogue_limit_is_refused_with_413(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """PUT and PATCH of the catalogue take bodies up to ``[api] catalog_max_body_bytes``, every
    other route keeps ``[api] max_body_bytes`` (docs/api.md, "Limits")."""
    limits = {"max_body_bytes": 1024, "catalog_max_body_bytes": 8192}
    site = journal_site(tmp_path, mosquitto.port, api_settings=limits)
    async with ops_server(site) as srv, srv.client("engineer") as c:
        # Over max_body_bytes, within the catalogue's limit: read and validated (422).
        r = await c.put("/api/v1/catalog", content=b"k" * 4096, headers={"Content-Type": CSV})
        assert_problem(r, 422, "nothing changed")
        r = await c.patch("/api/v1/catalog", content=b"k" * 4096, headers={"Content-Type": CSV})
        assert_problem(r, 422, "nothing changed")
        # Over the catalogue's limit: 413, with a Content-Length or streamed without one.
        for method in ("PUT", "PATCH"):
            r = await c.request(
                method, "/api/v1/catalog", content=b"k" * 8193, headers={"Content-Type": CSV}
            )
            assert_problem(r, 413, "larger than 8192 bytes")

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(9):
                yield b"k" * 1024

        r = await c.put("/api/v1/catalog", content=chunks(), headers={"Content-Type": CSV})
        assert_problem(r, 413, "larger than 8192 bytes")
        # Another route keeps max_body_bytes.
        r = await c.post(
            "/api/v1/alerts/K1/ack",
            content=orjson.dumps({"note": "n" * 2048}),
            headers={"Content-Type": "application/json"},
        )
        assert_problem(r, 413, "larger than 1024 bytes")
        # A read of the catalogue's path is no write: max_body_bytes.
        r = await c.request("GET", "/api/v1/catalog", content=b"k" * 2048)
        assert_problem(r, 413, "larger than 1024 bytes")
        version, records = await export(srv)
        assert version == 1
        assert len(records) == 9


async def test_a_journal_that_cannot_store_the_change_answers_503(server: OpsServer) -> None:
    # Our own lock waits for the controller's writes (a commit, a checkpoint) to end.
    db = sqlite3.connect(server.rt.site.journal.path, timeout=10.0)
    db.execute("BEGIN IMMEDIATE")  # another writer holds the journal past the busy timeout
    try:
        r = await patch(server, [{"kind": "sku", "id": "K1", "reorder_point": 12}])
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert_problem(r, 503, "nothing changed")
    version, records = await export(server)
    assert version == 1
    assert sku_of(records, "K1")["reorder_point"] == 10


def _gated(fn: Callable[..., Any], gate: threading.Event) -> Callable[..., Any]:
    """``fn``, but waiting for ``gate`` first, and refusing to run on an event loop."""
    return _gated_at(fn, 1, gate, threading.Event())


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (catalog_routes, "put_catalogue"),  # reading and validating the body
        (catalog_live.CatalogueEditor, "plan"),  # comparing it with the catalogue in force
        (catalog_live, "_site_with"),  # the site and shelf specs it makes
        (catalog_routes, "_diff_json"),  # the answer, a line per changed record
    ],
)
async def test_readings_are_applied_while_a_change_is_read_checked_and_answered(
    server: OpsServer, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str
) -> None:
    """Each O(records) step of a change runs off the event loop: held at one step, the change
    is in flight while readings are still applied; then it completes."""
    _, records = await export(server)
    sku_of(records, "K1")["reorder_point"] = 11
    gate = threading.Event()
    monkeypatch.setattr(owner, name, _gated(getattr(owner, name), gate))
    async with server.client("engineer") as c:
        put = asyncio.create_task(
            c.put("/api/v1/catalog", content=jsonl(records), headers={"Content-Type": JSONL})
        )
        try:
            await server.publish("s2", grams(25))  # applied (cursor) while the PUT waits
            assert not put.done()
            assert server.rt.ingest.states["sh2"].units == 25
        finally:
            gate.set()
        r = await put
    assert r.status_code == 200, r.text
    assert r.json()["counts"] == {"add": 0, "remove": 0, "change": 1}
    assert (await export(server))[0] == 2


def _gated_at(
    fn: Callable[..., Any], call: int, gate: threading.Event, reached: threading.Event
) -> Callable[..., Any]:
    """``fn`` refusing to run on an event loop; its ``call``-th call (1-based) sets
    ``reached`` and waits for ``gate`` first."""
    calls = 0

    def gated(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise AssertionError(f"{fn.__name__} runs on an event loop")
        calls += 1
        if calls == call:
            reached.set()
            if not gate.wait(20.0):
                raise AssertionError(f"{fn.__name__}: the test never opened the gate")
        return fn(*args, **kwargs)

    return gated


def _catalogue_tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("_dumps", 1),  # encoding the audit rows, between two transactions
        ("_write_slice", 2),  # between two short transactions of the records
        ("_write_slice", 7),  # between the records' and the audit rows' transactions
    ],
)
async def test_readings_are_applied_while_a_change_is_written_to_the_journal(
    server: OpsServer, monkeypatch: pytest.MonkeyPatch, name: str, call: int
) -> None:
    """The journal write of a change runs off the event loop in short transactions: held
    between two of them, ingest's commits go on (readings applied), the journal still holds
    the old catalogue whole for its readers; then the change completes and the staging is
    gone."""
    rt = server.rt
    path = rt.site.journal.path
    _, records = await export(server)
    sku_of(records, "K1")["reorder_point"] = 11
    monkeypatch.setattr(catalog_store, "SLICE_ROWS", 2)  # 3 records per kind: 6 slices, audit
    gate, reached = threading.Event(), threading.Event()
    monkeypatch.setattr(
        catalog_store, name, _gated_at(getattr(catalog_store, name), call, gate, reached)
    )
    async with server.client("engineer") as c:
        put = asyncio.create_task(
            c.put("/api/v1/catalog", content=jsonl(records), headers={"Content-Type": JSONL})
        )
        try:
            assert await asyncio.to_thread(reached.wait, 20.0), f"{name} call {call} not reached"
            await server.publish("s2", grams(25))  # journaled and applied while the PUT waits
            assert rt.ingest.states["sh2"].units == 25
            assert not put.done()
            stored = catalog_store.read_journal(path)
            assert stored is not None
            assert stored.version == 1
            assert next(s for s in stored.skus if s.id == "K1").reorder_point == 10
            assert len(stored) == 9
            assert catalog_store.version_audit(rt.journal.db, 2) == []
        finally:
            gate.set()
        r = await put
    assert r.status_code == 200, r.text
    assert r.json()["counts"] == {"add": 0, "remove": 0, "change": 1}
    version, now = await export(server)
    assert version == 2
    assert sku_of(now, "K1")["reorder_point"] == 11
    stored = catalog_store.read_journal(path)
    assert stored is not None
    assert stored.version == 2
    assert len(stored) == 9
    assert [a["id"] for a in catalog_store.version_audit(rt.journal.db, 2)] == ["K1"]
    tables = _catalogue_tables(path)
    assert {"catalog_records", "catalog_versions", "catalog_audit"} <= tables
    assert not {t for t in tables if t.startswith("catalog_records_")}


async def test_the_objects_in_force_are_left_out_of_collections_while_a_change_runs(
    server: OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change's millions of new objects trigger full collections of Python's cyclic garbage
    collector, which stop the main loop as long as they walk every object: while a change
    runs the objects alive at its start are frozen (not walked), and put back at its end, also
    when it is refused."""
    _, records = await export(server)
    sku_of(records, "K1")["reorder_point"] = 11
    assert gc.get_freeze_count() == 0
    specs = server.rt.ingest.specs
    for body, status in ((records, 200), ([{"kind": "nope"}], 422)):
        gate = threading.Event()
        reached = threading.Event()
        name = "put_catalogue" if status == 200 else "patched"
        monkeypatch.setattr(
            catalog_routes, name, _gated_at(getattr(catalog_live, name), 1, gate, reached)
        )
        async with server.client("engineer") as c:
            if status == 200:
                call = c.put(
                    "/api/v1/catalog", content=jsonl(body), headers={"Content-Type": JSONL}
                )
            else:
                call = c.patch(
                    "/api/v1/catalog",
                    content=orjson.dumps(body),
                    headers={"Content-Type": "application/json"},
                )
            change = asyncio.create_task(call)
            try:
                assert await asyncio.to_thread(reached.wait, 20.0)
                frozen = gc.get_freeze_count()
                assert frozen > 0
                gc.collect()  # a full collection meanwhile leaves the frozen objects frozen
                assert gc.get_freeze_count() >= frozen - 1_000
                assert all(o is not specs for o in gc.get_objects(generation=2))
            finally:
                gate.set()
            r = await change
        assert r.status_code == status, r.text
        assert gc.get_freeze_count() == 0


async def test_a_change_whose_journal_version_moved_meanwhile_is_refused_409(
    server: OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def moved(*args: Any) -> Any:
        raise catalog_store.VersionMoved(1, 2)

    monkeypatch.setattr(catalog_live, "_stage", moved)
    new_sku = {"kind": "sku", "id": "K9", "reorder_point": 1, "safety_stock": 0, "max_stock": 5}
    r = await patch(server, [new_sku])
    assert_problem(r, 409, "the catalogue changed meanwhile (version 1 -> 2)")
    version, records = await export(server)
    assert version == 1
    assert "K9" not in {r["id"] for r in records}
    assert "K9" not in server.rt.picking.desk.skus


# -- live rules ------------------------------------------------------------------------------


async def test_a_threshold_changed_mid_episode_keeps_it_and_applies_the_new_policy(
    server: OpsServer,
) -> None:
    rt = server.rt
    sub = rt.bus.subscribe("test")
    try:
        await server.publish("s1", grams(8))  # K1 at 8 <= reorder point 10: raised LOW
        raised = await next_event(sub, lambda e: e["kind"] == "alert_raised" and e["key"] == "K1")
        assert raised["severity"] == "low"
        episode = rt.alerts.alerts["K1"].episode
        assert episode is not None
        units_before = rt.ingest.states["sh1"].units
        # Safety stock 3 -> 9: 8 units is now CRITICAL in the same episode.
        r = await patch(server, [{"kind": "sku", "id": "K1", "safety_stock": 9}], "supervisor")
        assert r.status_code == 200, r.text
        changed = await next_event(sub, lambda e: e["kind"] == "catalog_changed")
        assert changed["version"] == 2
        assert changed["by"] == "test-supervisor"
        assert list(changed["skus"]) == ["K1"]
        esc = await next_event(sub, lambda e: e["kind"] == "alert_escalated")
        assert esc["key"] == "K1"
        assert (esc["old_severity"], esc["new_severity"]) == ("low", "critical")
        after = rt.alerts.alerts["K1"].episode
        assert after is not None
        assert after.episode_id == episode.episode_id
        assert rt.ingest.states["sh1"].units == units_before == 8
    finally:
        sub.close()
    async with server.client("supervisor") as c:
        stock = (await c.get("/api/v1/stock/K1")).json()
    assert stock["safety_stock"] == 9
    assert stock["state"] == "critical"
    events = journal_events(rt.site.journal.path, "catalog_changed")
    assert [CatalogChanged.from_dict(e).version for e in events] == [2]


async def test_a_raised_reorder_point_raises_at_once_without_new_readings(
    server: OpsServer,
) -> None:
    rt = server.rt
    sub: Subscription = rt.bus.subscribe("test")
    try:
        await server.publish("s2", grams(15))  # above reorder point 10: no alert
        assert rt.alerts.alerts["K2"].episode is None
        r = await patch(server, [{"kind": "sku", "id": "K2", "reorder_point": 20, "max_stock": 60}])
        assert r.status_code == 200, r.text
        raised = await next_event(sub, lambda e: e["kind"] == "alert_raised")
        assert raised["key"] == "K2"
        assert raised["level"] == 15
    finally:
        sub.close()


# -- floorhand catalog import --url ---------------------------------------------------------


async def test_cli_import_sends_the_file_to_a_running_controller(
    server: OpsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, records = await export(server)
    sku_of(records, "K1")["reorder_point"] = 12
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(jsonl(records))
    token = tmp_path / "token"
    token.write_text(TOKENS["engineer"] + "\n")
    args = ["catalog", "import", str(changed), "--url", server.base, "--token-file", str(token)]

    assert await asyncio.to_thread(main, [*args, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "~ sku K1: reorder_point 10 -> 12" in out
    assert "dry run: catalogue version 1 -> 1: 0 added, 0 removed, 1 changed" in out
    assert f"catalog: sending {changed.stat().st_size} bytes to {server.base}/api/v1/catalog" in err

    assert await asyncio.to_thread(main, args) == 0
    out, _ = capsys.readouterr()
    assert "catalogue version 1 -> 2: 0 added, 0 removed, 1 changed" in out
    version, now = await export(server)
    assert version == 2
    assert sku_of(now, "K1")["reorder_point"] == 12
    async with server.client("supervisor") as c:
        versions = (await c.get("/api/v1/catalog/versions")).json()["versions"]
    assert (versions[-1]["actor"], versions[-1]["source"]) == (ENG, "api")

    sku_of(records, "K2")["safety_stock"] = 30
    changed.write_bytes(jsonl(records))
    assert await asyncio.to_thread(main, args) == 2
    _, err = capsys.readouterr()
    assert (
        f"  {changed}:3: sku K2 column safety_stock: safety_stock (30) > reorder_point (10)" in err
    )
    assert (await export(server))[0] == 2


async def test_cli_import_of_a_file_over_the_controllers_limit_names_the_limit(
    tmp_path: Path, mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    site = journal_site(tmp_path, mosquitto.port, api_settings={"catalog_max_body_bytes": 2048})
    big = tmp_path / "big.csv"
    big.write_text((tmp_path / "catalogue.csv").read_text() + "\n" * 4096)
    token = tmp_path / "token"
    token.write_text(TOKENS["engineer"] + "\n")
    async with ops_server(site) as srv:
        args = ["catalog", "import", str(big), "--url", srv.base, "--token-file", str(token)]
        assert await asyncio.to_thread(main, args) == 2
        _, err = capsys.readouterr()
        assert f"{big}: 413 Request Entity Too Large: request body larger than 2048 bytes" in err
        size = big.stat().st_size
        assert (
            f"takes catalogues up to its [api] catalog_max_body_bytes; this file is {size}" in err
        )
        assert (await export(srv))[0] == 1


def test_cli_import_needs_a_site_or_a_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.csv").write_text("kind,id\n")
    assert main(["catalog", "import", str(tmp_path / "c.csv")]) == 2
    assert "needs --site SITE (into its journal) or --url URL" in capsys.readouterr().err


async def test_a_shelf_level_alert_added_and_removed_live_ends_its_episode(
    server: OpsServer,
) -> None:
    rt = server.rt
    sub = rt.bus.subscribe("test")
    try:
        r = await patch(
            server,
            [{"kind": "shelf", "id": "sh1", "shelf_reorder_point": 5, "shelf_safety_stock": 1}],
            "supervisor",
        )
        assert r.status_code == 200, r.text
        await server.publish("s1", grams(4))  # 4 <= 5 on the shelf (and <= 10 for K1)
        raised = await next_event(
            sub, lambda e: e["kind"] == "alert_raised" and e["key"] == "shelf:sh1"
        )
        assert raised["level"] == 4
        r = await patch(
            server,
            [
                {
                    "kind": "shelf",
                    "id": "sh1",
                    "shelf_reorder_point": None,
                    "shelf_safety_stock": None,
                }
            ],
            "supervisor",
        )
        assert r.status_code == 200, r.text
        assert r.json()["ended_episodes"] == ["shelf:sh1"]
        changed = await next_event(
            sub, lambda e: e["kind"] == "catalog_changed" and e["version"] == 3
        )
        assert list(changed["ended"]) == ["shelf:sh1"]
    finally:
        sub.close()
    async with server.client("supervisor") as c:
        keys = [a["key"] for a in (await c.get("/api/v1/alerts")).json()]
    assert keys == ["K0", "K1", "K2"]
    assert rt.alerts.alerts["K1"].episode is not None  # the SKU's own episode is untouched
    db = sqlite3.connect(f"file:{rt.site.journal.path}?mode=ro", uri=True)
    try:
        body = db.execute("SELECT body FROM alert_states WHERE key = 'shelf:sh1'").fetchone()[0]
    finally:
        db.close()
    assert orjson.loads(body)["episode"] is None  # a restart or a re-add starts afresh


async def test_a_changed_tare_recounts_the_shelf_as_a_calibration_does(
    server: OpsServer,
) -> None:
    rt = server.rt
    sub = rt.bus.subscribe("test")
    try:
        await server.publish("s1", grams(8))  # 1300 g: (1300 - 500) / 100 = 8 units
        assert rt.ingest.states["sh1"].units == 8
        r = await patch(server, [{"kind": "shelf", "id": "sh1", "tare_g": 100.0}])
        assert r.status_code == 200, r.text
        stock = await next_event(
            sub, lambda e: e["kind"] == "stock_changed" and e["old_units"] is not None
        )
        assert (stock["shelf_id"], stock["old_units"], stock["new_units"]) == ("sh1", 8, 12)
        assert rt.ingest.specs["sh1"].tare_g == 100.0
        assert rt.ingest.states["sh1"].units == 12
        # The next reading counts with the new tare too (and the count is kept).
        await server.publish("s1", grams(8))
        assert rt.ingest.states["sh1"].units == 12
    finally:
        sub.close()
    db = sqlite3.connect(f"file:{rt.site.journal.path}?mode=ro", uri=True)
    try:
        _cursors, states = saved_state(db)  # the tables with the state log on top
    finally:
        db.close()
    assert states["sh1"]["units"] == 12


async def test_a_shelf_moved_to_another_sku_keeps_its_count_for_the_new_sku(
    server: OpsServer,
) -> None:
    rt = server.rt
    await server.publish("s1", grams(8))
    await server.publish("s2", grams(15))
    r = await patch(server, [{"kind": "shelf", "id": "sh1", "sku": "K2"}])
    assert r.status_code == 200, r.text
    assert rt.ingest.states["sh1"].units == 8
    assert rt.ingest.specs["sh1"].sku == "K2"
    assert rt.alerts.targets["K2"].shelves == ("sh1", "sh2")
    assert rt.alerts.targets["K1"].shelves == ()
    assert rt.alerts.level_of("K2") == 23
    desk = rt.picking.desk
    assert [s.shelf_id for s in desk._shelves_of["K2"]] == ["sh1", "sh2"]
    async with server.client("supervisor") as c:
        k2 = (await c.get("/api/v1/stock/K2")).json()
    assert (k2["level"], [s["id"] for s in k2["shelves"]]) == (23, ["sh1", "sh2"])


async def test_a_sku_added_and_removed_live(server: OpsServer) -> None:
    rt = server.rt
    new = {"kind": "sku", "id": "K9", "reorder_point": 5, "safety_stock": 1, "max_stock": 20}
    r = await patch(server, [new])
    assert r.status_code == 200, r.text
    assert r.json()["lines"] == ["+ sku K9"]
    assert "K9" in rt.picking.desk.skus
    assert "K9" in rt.alerts.targets
    async with server.client("supervisor") as c:
        assert (await c.get("/api/v1/stock/K9")).status_code == 200
    r = await patch(server, [{"kind": "sku", "id": "K9", "remove": True}])
    assert r.status_code == 200, r.text
    assert "K9" not in rt.picking.desk.skus
    assert "K9" not in rt.alerts.targets
    async with server.client("supervisor") as c:
        assert_problem(await c.get("/api/v1/stock/K9"), 404)
    r = await patch(server, [new], "supervisor")
    assert_problem(r, 403, "sku K9: adding a record")


# -- picks -----------------------------------------------------------------------------------


def picking_journal_site(tmp_path: Path, mqtt_port: int, conveyor: int, sorter: int) -> Path:
    """test_picking's site (a conveyor, a sorter, pack station PS1) with its catalogue in
    the journal instead of the site file."""
    path = picking_site(tmp_path, mqtt_port, conveyor, sorter)
    head, rest = path.read_text().split("[[skus]]", 1)
    path.write_text(head + rest[rest.index("[picking]") :])
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    write_small_site(
        csv_dir, mqtt_port=mqtt_port, scales=3, reporting_interval_s=5.0, catalogue_csv=True
    )
    assert main(["catalog", "import", str(csv_dir / "catalogue.csv"), "--site", str(path)]) == 0
    return path


async def test_open_pick_tasks_refuse_a_removed_sku_or_a_moved_shelf_until_they_end(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """A pick task waits on shelf sh0 (K0): the executor cannot start the belts (its lock is
    held), so the task stays DISPATCHED. Moving sh0 to K1, or removing K0, is 409 naming the
    task, and nothing changes; once the order is cancelled the same change applies."""
    async with (
        PlcHost(ConveyorPlc("conveyor-1"), seed=1) as ch,
        PlcHost(SorterPlc("sorter-1", speed=0.5, lane_drain_s=0.0), seed=2) as sh,
        ops_server(picking_journal_site(tmp_path, mosquitto.port, ch.port, sh.port)) as srv,
    ):
        rt = srv.rt
        for plc in rt.plcs.values():
            await plc.link.watch.wait_for(LinkState.UP, 10)
            if isinstance(plc.driver, SorterDriver):
                await rt.control.call_async(plc.driver.wait_mailbox_known, 10)
        await srv.publish("s0", grams(20))
        belts = rt.picking.executor._belt_locks["conveyor-1"]
        await rt.control.call_async(belts.acquire)  # the executor's lock, on its loop
        try:
            async with srv.client("floor") as c:
                r = await c.post(
                    "/api/v1/picks",
                    json={
                        "order_id": "W-1",
                        "lines": [{"sku": "K0", "qty": 2}],
                        "pack_station": "PS1",
                    },
                    headers={"Idempotency-Key": "w-1"},
                )
            assert r.status_code == 201, r.text
            oid = r.json()["order_id"]

            r = await patch(srv, [{"kind": "shelf", "id": "sh0", "sku": "K1"}])
            body = assert_problem(r, 409, "open pick tasks")
            assert body["refused"] == [f"order {oid} task 0: shelf sh0 moves"]
            move_and_remove = [
                {"kind": "shelf", "id": "sh0", "sku": "K1"},
                {"kind": "sku", "id": "K0", "remove": True},
            ]
            r = await patch(srv, move_and_remove)
            body = assert_problem(r, 409)
            assert body["refused"] == [f"order {oid} task 0: SKU K0 removed"]
            assert (await export(srv))[0] == 1
            assert "K0" in rt.picking.desk.skus
            assert rt.ingest.specs["sh0"].sku == "K0"

            async with srv.client("floor") as c:
                r = await c.post(f"/api/v1/orders/{oid}/cancel")
            assert r.status_code == 200, r.text
        finally:
            await rt.control.call_async(belts.release)
        r = await patch(srv, move_and_remove)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2
        assert "K0" not in rt.picking.desk.skus
        assert rt.ingest.specs["sh0"].sku == "K1"
        async with srv.client("floor") as c:
            r = await c.post(
                "/api/v1/picks",
                json={"order_id": "W-2", "lines": [{"sku": "K0", "qty": 1}], "pack_station": "PS1"},
                headers={"Idempotency-Key": "w-2"},
            )
        assert_problem(r, 422, "unknown SKU 'K0'")


async def test_a_live_change_is_the_catalogue_after_a_restart(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    site = journal_site(tmp_path, mosquitto.port)
    async with ops_server(site) as srv:
        sub = srv.rt.bus.subscribe("test")
        try:
            await srv.publish("s1", grams(8))  # raised LOW once its dwell is over
            await next_event(sub, lambda e: e["kind"] == "alert_raised" and e["key"] == "K1")
        finally:
            sub.close()
        r = await patch(srv, [{"kind": "sku", "id": "K1", "safety_stock": 9}], "supervisor")
        assert r.status_code == 200, r.text
        episode = srv.rt.alerts.alerts["K1"].episode
        assert episode is not None
    async with ops_server(site) as srv:
        version, records = await export(srv)
        assert version == 2
        assert sku_of(records, "K1")["safety_stock"] == 9
        assert srv.rt.ingest.states["sh1"].units == 8
        again = srv.rt.alerts.alerts["K1"].episode
        assert again is not None
        assert again.episode_id == episode.episode_id


async def test_shelves_and_scales_added_and_removed_live(server: OpsServer) -> None:
    """A new scale and shelf count their readings at once (the shelf starts UNKNOWN); a
    removed shelf and scale leave: the scale's readings are refused as an unknown device."""
    rt = server.rt
    await server.publish("s2", grams(15))
    r = await patch(
        server,
        [
            {"kind": "scale", "id": "s9", "zone": "Z", "max_weight_g": 10000.0},
            {"kind": "shelf", "id": "sh9", "zone": "Z", "scale": "s9", "sku": "K0",
             "unit_weight_g": 100.0, "tare_g": 500.0, "capacity_units": 40},
            {"kind": "shelf", "id": "sh2", "remove": True},
            {"kind": "scale", "id": "s2", "remove": True},
        ],
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert sorted(r.json()["lines"]) == ["+ scale s9", "+ shelf sh9", "- scale s2", "- shelf sh2"]
    assert rt.ingest.states["sh9"].status.value == "unknown"
    assert "sh2" not in rt.ingest.states
    assert rt.alerts.targets["K0"].shelves == ("sh0", "sh9")
    assert rt.alerts.targets["K2"].shelves == ()
    await server.publish("s9", grams(6))
    assert rt.ingest.states["sh9"].units == 6
    before = rt.ingest.rejected["unknown_device"]
    server.ingested.clear()
    await asyncio.to_thread(
        paho_publish,
        rt.site.mqtt.port,
        [
            (
                topic("s2"),
                orjson.dumps({"device": "s2", "seq": 99, "ts": rt.clock(), "grams": 900.0}),
            )
        ],
    )
    async with asyncio.timeout(10):
        while rt.ingest.rejected["unknown_device"] == before:
            server.ingested.clear()
            await server.ingested.wait()
    async with server.client("supervisor") as c:
        shelves = [s["id"] for s in (await c.get("/api/v1/shelves")).json()]
        scales = [s["id"] for s in (await c.get("/api/v1/scales")).json()]
    assert shelves == ["sh0", "sh1", "sh9"]
    assert scales == ["s0", "s1", "s9"]


async def test_live_clients_get_the_change_and_a_snapshot_of_the_new_catalogue(
    server: OpsServer,
) -> None:
    url = server.base.replace("http://", "ws://") + "/api/v1/live"
    subprotocols = [Subprotocol("bearer"), Subprotocol(TOKENS["supervisor"])]
    async with connect(url, subprotocols=subprotocols) as ws:
        await wait_message(ws, lambda m: m["type"] == "snapshot")
        r = await patch(server, [{"kind": "sku", "id": "K1", "reorder_point": 12}])
        assert r.status_code == 200, r.text
        msg = await wait_message(ws, lambda m: m.get("event", {}).get("kind") == "catalog_changed")
        assert msg["type"] == "event"
        assert (msg["event"]["version"], msg["event"]["skus"]) == (2, ["K1"])
        await ws.send(orjson.dumps({"type": "resync"}).decode())
        snap = await wait_message(ws, lambda m: m["type"] == "snapshot")
    k1 = next(s for s in snap["skus"] if s["sku"] == "K1")
    assert k1["reorder_point"] == 12
