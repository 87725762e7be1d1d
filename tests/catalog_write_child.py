"""A live catalogue change written to a journal by a process that the test kills with SIGKILL
at a chosen point (tests/integration/test_catalog_write_kill.py).

``python -m tests.catalog_write_child JOURNAL POINT``: opens the journal, changes every SKU's
reorder point and adds a SKU, and writes that as the controller does (catalog_store.stage,
swap, finish through `Journal.transaction`, slices of 2 rows). At ``POINT`` it prints
``AT <point>`` and waits on stdin for the kill: ``records`` (between two slices of the
records), ``audit`` (between two slices of the audit rows), ``swapped`` (after the swap, before
the replaced records are deleted).
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from controller.adapters import catalog_store
from controller.adapters.journal import Journal
from controller.catalog.diff import diff
from controller.catalog.live import patched
from controller.catalog.records import KINDS, flat


def main(path: str, point: str) -> None:
    journal = Journal(path)
    journal.open()
    current = catalog_store.load(journal.db)
    assert current is not None
    body = [{"kind": "sku", "id": s.id, "reorder_point": s.reorder_point + 1} for s in current.skus]
    body.append({**flat("sku", current.skus[0]), "kind": "sku", "id": "KNEW"})
    zones = {sc.zone for sc in current.scales}
    after = patched(current, orjson.dumps(body), None, zones, "child")
    changes = diff(current, after)
    record_slices = sum(-(-len(after.records(kind)) // 2) for kind in KINDS)
    at = {"records": 2, "audit": record_slices + 2}.get(point)
    calls = 0
    write_slice = catalog_store._write_slice

    def slice_then_maybe_wait(
        tx: catalog_store.Transaction, head: str, width: int, rows: list[tuple[Any, ...]]
    ) -> None:
        nonlocal calls
        calls += 1
        if calls == at:
            _wait(point)
        write_slice(tx, head, width, rows)

    catalog_store.SLICE_ROWS = 2
    catalog_store._write_slice = slice_then_maybe_wait
    staged = catalog_store.stage(
        journal.transaction,
        after,
        changes,
        from_version=current.version,
        actor="child",
        source="test",
        detail="killed",
    )
    catalog_store.swap(journal.transaction, staged)
    if point == "swapped":
        _wait(point)
    catalog_store.finish(journal.transaction, staged)
    print("DONE", flush=True)


def _wait(point: str) -> None:
    print(f"AT {point}", flush=True)
    sys.stdin.readline()  # the test kills this process meanwhile


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
