"""A live catalogue change killed with SIGKILL half way through its journal write
(controller/adapters/catalog_store.py: stage, swap, finish): the journal holds the old
catalogue whole, or the new one whole, never a mix; what was left staged is removed at the
next start (`settle_catalogue`, which every start runs) and a next change goes through."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.__main__ import main
from controller.adapters import catalog_store
from controller.adapters.journal import Journal
from controller.catalog.diff import diff
from controller.catalog.records import Catalogue
from controller.catalog.start import settle_catalogue
from controller.config import load_site
from tests.controller_proc import ROOT
from tests.sites import write_small_site

pytestmark = pytest.mark.timeout(60)


def _site(tmp_path: Path) -> Path:
    site = write_small_site(tmp_path, mqtt_port=1, scales=3, catalogue_csv=True)
    assert main(["catalog", "import", str(tmp_path / "catalogue.csv"), "--site", str(site)]) == 0
    return site


def _kill_at(path: Path, point: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.catalog_write_child", str(path), point],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == f"AT {point}", line + (child.stderr.read() if child.stderr else "")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=20) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.mark.parametrize(("point", "in_force"), [("records", 1), ("audit", 1), ("swapped", 2)])
def test_a_change_killed_mid_write_leaves_one_whole_catalogue(
    tmp_path: Path, point: str, in_force: int
) -> None:
    site = _site(tmp_path)
    path = load_site(site).journal.path
    journal = Journal(path)
    journal.open()
    try:
        before = catalog_store.load(journal.db)
        assert before is not None
        assert before.version == 1
    finally:
        journal.close()

    _kill_at(path, point)

    journal = Journal(path)
    journal.open()
    try:
        db = journal.db
        found = catalog_store.load(db)
        assert found is not None
        assert found.version == in_force
        if in_force == 1:
            assert found.same_records(before)
            assert [v.version for v in catalog_store.versions(db)] == [1]
            assert catalog_store.version_audit(db, 2) == []
            staged_audit = db.execute("SELECT count(*) FROM catalog_audit WHERE version = 2")
            assert staged_audit.fetchone()[0] == (2 if point == "audit" else 0)  # one slice
        else:
            assert [s.reorder_point for s in found.skus[:3]] == [
                s.reorder_point + 1 for s in before.skus
            ]
            assert found.skus[-1].id == "KNEW"
            assert len(catalog_store.version_audit(db, 2)) == len(before.skus) + 1
        assert _tables(db) & {"catalog_records_staged", "catalog_records_old"}  # left behind

        assert settle_catalogue(load_site(site), db, in_force, time.time) == in_force  # start
        assert not _tables(db) & {"catalog_records_staged", "catalog_records_old"}
        assert db.execute("SELECT value FROM meta WHERE key = 'catalog_staged'").fetchone() is None
        audit_versions = {r[0] for r in db.execute("SELECT DISTINCT version FROM catalog_audit")}
        assert audit_versions == set(range(1, in_force + 1))
        again = catalog_store.load(db)
        assert again is not None
        assert again.same_records(found)
        assert again.version == in_force

        # The next change goes through, from the version in force.
        skus = tuple(s.model_copy(update={"name": "renamed"}) for s in found.skus)
        after = Catalogue(skus, found.scales, found.shelves)
        changes = diff(found, after)
        staged = catalog_store.stage(
            journal.transaction,
            after,
            changes,
            from_version=in_force,
            actor="t",
            source="t",
            detail="next",
        )
        assert catalog_store.swap(journal.transaction, staged) == in_force + 1
        catalog_store.finish(journal.transaction, staged)
        now = catalog_store.load(db)
        assert now is not None
        assert now.version == in_force + 1
        assert {s.name for s in now.skus} == {"renamed"}
        assert len(catalog_store.version_audit(db, in_force + 1)) == len(found.skus)
        assert not _tables(db) & {"catalog_records_staged", "catalog_records_old"}
    finally:
        journal.close()
