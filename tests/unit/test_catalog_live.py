"""The pure parts of a live catalogue change (controller/catalog/live.py): a PATCH body read and
merged into the catalogue, the role and live checks on its diff."""

from __future__ import annotations

import orjson
import pytest

from controller.catalog.diff import diff
from controller.catalog.formats import CatalogueInvalid
from controller.catalog.live import ChangeRefused, check_live, check_role, patched, put_catalogue
from controller.catalog.records import Catalogue

ZONES = {"Z"}
CSV = b"""kind,id,reorder_point,safety_stock,max_stock,zone,scale,sku,unit_weight_g,capacity_units
sku,K1,10,3,40,,,,,
sku,K2,10,3,40,,,,,
scale,s1,,,,Z,,,,
shelf,A-01,,,,Z,s1,K1,100,40
"""


def base() -> Catalogue:
    return put_catalogue(CSV, "csv", ZONES, "base.csv")


def patch(body: object, current: Catalogue | None = None) -> Catalogue:
    return patched(current or base(), orjson.dumps(body), None, ZONES, "body")


def test_a_patch_changes_only_the_columns_it_names_and_adds_after_its_kind() -> None:
    after = patch(
        [
            {"kind": "sku", "id": "K1", "name": "bolts"},
            {"kind": "sku", "id": "K3", "reorder_point": 1, "safety_stock": 0, "max_stock": 5},
        ]
    )
    assert [s.id for s in after.skus] == ["K1", "K2", "K3"]
    k1 = after.skus[0]
    assert (k1.name, k1.reorder_point, k1.max_stock) == ("bolts", 10, 40)
    assert [(c.op, c.id) for c in diff(base(), after).changes] == [("change", "K1"), ("add", "K3")]


def test_a_csv_patch_leaves_empty_cells_as_they_are() -> None:
    body = b"kind,id,name,reorder_point\nsku,K2,,12\n"
    after = patched(base(), body, "csv", ZONES, "body")
    k2 = after.skus[1]
    assert (k2.name, k2.reorder_point) == ("", 12)


def test_null_unsets_a_column_and_remove_removes_a_record() -> None:
    named = patch([{"kind": "sku", "id": "K2", "name": "nuts"}])
    assert patch([{"kind": "sku", "id": "K2", "name": None}], named).skus[1].name == ""
    assert [s.id for s in patch([{"kind": "sku", "id": "K2", "remove": True}]).skus] == ["K1"]


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (
            [{"kind": "sku", "id": "K1", "colour": "red"}],
            (1, "colour", "not a column of a sku row"),
        ),
        ([{"kind": "bin", "id": "B"}], (1, "kind", "'bin' is not sku, scale or shelf")),
        ([{"kind": "sku"}], (1, "id", "required")),
        ([{"kind": "sku", "id": "K1"}, 7], (2, "-", "a JSON object per record, not int")),
        (
            [{"kind": "sku", "id": "K1", "remove": True, "name": "x"}],
            (1, "-", "a removed record names no other column"),
        ),
        ([{"kind": "shelf", "id": "nope", "remove": True}], (1, "id", "no shelf 'nope' to remove")),
        # The merged catalogue is checked whole: K1 still has shelf A-01.
        ([{"kind": "sku", "id": "K1", "remove": True}], (0, "sku", "unknown SKU 'K1'")),
    ],
)
def test_a_bad_patch_names_its_line_and_column(body: object, want: tuple[int, str, str]) -> None:
    with pytest.raises(CatalogueInvalid) as exc:
        patch(body)
    errors = [(e.line, e.column, e.message) for e in exc.value.errors]
    assert errors[0][:2] == want[:2]
    assert want[2] in errors[0][2]


def test_jsonl_patch_lines_are_the_body_lines() -> None:
    body = b'{"kind":"sku","id":"K1","name":"a"}\n\n{"kind":"sku","id":"K2","reorder_point":"x"}\n'
    with pytest.raises(CatalogueInvalid) as exc:
        patched(base(), body, None, ZONES, "body")
    assert [(e.line, e.column) for e in exc.value.errors] == [(3, "reorder_point")]


def test_a_supervisor_may_change_thresholds_only() -> None:
    thresholds = diff(base(), patch([{"kind": "sku", "id": "K1", "max_stock": 50}]))
    check_role(thresholds, may_change_all=False)
    other = diff(base(), patch([{"kind": "sku", "id": "K1", "max_stock": 50, "name": "n"}]))
    with pytest.raises(ChangeRefused) as exc:
        check_role(other, may_change_all=False)
    assert (exc.value.status, exc.value.items) == (403, ["sku K1 column name"])
    check_role(other, may_change_all=True)


def test_what_a_running_controller_does_not_take() -> None:
    check_live(diff(base(), patch([{"kind": "shelf", "id": "A-01", "tare_g": 50}])))
    check_live(diff(base(), patch([{"kind": "shelf", "id": "A-01", "sku": "K2"}])))
    moved = patch(
        [{"kind": "scale", "id": "s2", "zone": "Z"}, {"kind": "shelf", "id": "A-01", "scale": "s2"}]
    )
    with pytest.raises(ChangeRefused) as exc:
        check_live(diff(base(), moved))
    assert (exc.value.status, exc.value.items) == (409, ["~ shelf A-01: scale"])
