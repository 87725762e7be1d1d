"""The catalogue as data: CSV / JSON Lines records, all-or-nothing validation with every bad
row and column named, the dry-run diff (docs/catalogue.md)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from controller import site_schema
from controller.catalog import formats
from controller.catalog.diff import diff
from controller.catalog.formats import CatalogueInvalid
from controller.catalog.records import HEADER, Catalogue
from controller.catalog.start import inline_catalogue
from controller.catalog.validate import parse, validate
from controller.config import ConfigError, load_site
from tests.sites import UNIT_G, write_small_site

DEMO = Path(__file__).resolve().parents[2] / "firmware-configs" / "sites" / "demo.toml"
ZONES = {"Z"}


def _load(text: str, fmt: formats.Format = "csv") -> Catalogue:
    return parse(text.encode(), fmt, ZONES, "f")[0]


def _errors(text: str, fmt: formats.Format = "csv") -> set[tuple[int, str]]:
    with pytest.raises(CatalogueInvalid) as err:
        _load(text, fmt)
    return {(e.line, e.column) for e in err.value.errors}


def _write(cat: Catalogue, fmt: formats.Format) -> str:
    buf = io.StringIO()
    formats.write(cat, fmt, buf)
    return buf.getvalue()


GOOD = """kind,id,reorder_point,safety_stock,max_stock,zone,max_weight_g,scale,sku,\
unit_weight_g,capacity_units
sku,K1,10,3,40,,,,,,
scale,s1,,,,Z,10000,,,,
shelf,sh1,,,,Z,,s1,K1,100,40
"""


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_then_import_is_the_identity(fmt: formats.Format) -> None:
    demo = load_site(DEMO)
    cat = inline_catalogue(demo)
    text = _write(cat, fmt)
    rows, errors = formats.read_rows(text.encode(), fmt, "x")
    assert errors == []
    back = validate(rows, {z.id for z in demo.zones}, "x")
    assert back.same_records(cat)
    assert _write(back, fmt) == text
    if fmt == "csv":
        assert text.splitlines()[0] == ",".join(HEADER)


def test_a_csv_header_names_the_columns_it_uses_in_any_order() -> None:
    cat = _load(GOOD)
    assert [s.id for s in cat.shelves] == ["sh1"]
    assert cat.shelves[0].tare_g == 0.0  # unset: the model's default
    assert cat.scales[0].max_weight_g == 10_000.0


def test_every_bad_row_is_named_by_line_and_column() -> None:
    text = (
        "kind,id,reorder_point,safety_stock,max_stock,zone,channels,max_weight_g,scale,channel,"
        "sku,unit_weight_g,capacity_units,shelf_reorder_point,shelf_safety_stock\n"
        "sku,K1,10,3,40,,,,,,,,,,\n"  # 2 fine
        "sku,K2,ten,3,40,,,,,,,,,,\n"  # 3 not a number
        "sku,K3,5,8,40,,,,,,,,,,\n"  # 4 safety_stock > reorder_point
        "sku,K1,10,3,40,,,,,,,,,,\n"  # 5 duplicate id
        "scale,s1,,,,Z,8,10000,,,,,,,\n"  # 6 fine
        "scale,s2,,,,Y,1,10000,,,,,,,\n"  # 7 unknown zone
        "shelf,a,,,,Z,,,s1,0,K9,100,40,,\n"  # 8 unknown SKU
        "shelf,b,,,,Z,,,s1,0,K1,100,40,,\n"  # 9 channel already used by line 8
        "shelf,c,,,,Z,,,s9,0,K1,100,40,,\n"  # 10 unknown scale
        "shelf,d,,,,Z,,,s1,9,K1,100,40,,\n"  # 11 channel the scale lacks
        "shelf,e,,,,Z,,,s1,1,K2,100,40,,\n"  # 12 K2 rejected (line 3): not reported again
        "shelf,f,,,,Z,2,,s1,2,K1,100,40,,\n"  # 13 channels is not a shelf column
        "shelf,g,,,,Z,,,s1,3,K1,-1,40,,\n"  # 14 unit weight not > 0
        "shelf,h,,,,Z,,,s1,4,K1,100,40,2,5\n"  # 15 shelf thresholds out of order
        "thing,x,,,,,,,,,,,,,\n"  # 16 unknown kind
        "shelf,i,,,,Z,,,s1,0,K1,100\n"  # 17 too few cells
    )
    errs = _errors(text)
    assert errs >= {
        (3, "reorder_point"),
        (4, "safety_stock"),
        (5, "id"),
        (7, "zone"),
        (8, "sku"),
        (9, "channel"),
        (10, "scale"),
        (11, "channel"),
        (13, "channels"),
        (14, "unit_weight_g"),
        (15, "shelf_safety_stock"),
        (16, "kind"),
        (17, "-"),
    }
    assert not {line for line, _ in errs} & {2, 6, 12}


def test_a_full_shelf_over_the_scales_range_is_named() -> None:
    text = GOOD.replace("shelf,sh1,,,,Z,,s1,K1,100,40", "shelf,sh1,,,,Z,,s1,K1,300,40")
    with pytest.raises(CatalogueInvalid) as err:
        _load(text)
    (e,) = err.value.errors
    assert (e.line, e.column, e.kind, e.id) == (4, "capacity_units", "shelf", "sh1")
    assert "12000 g, over the scale's max_weight_g 10000" in e.message
    assert "f:4: shelf sh1 column capacity_units:" in err.value.report()


def test_bad_files_are_reported_not_raised() -> None:
    assert _errors("kind,id,colour\nsku,K1,red\n") == {(1, "colour")}
    assert _errors("id,name\n") == {(1, "kind")}
    assert _errors("") == {(0, "-")}
    assert _errors('{"kind":"sku","id":"K1"}\nnot json\n[1]\n', "jsonl") == {
        (1, "reorder_point"),
        (1, "safety_stock"),
        (1, "max_stock"),
        (2, "-"),
        (3, "-"),
    }
    with pytest.raises(CatalogueInvalid) as err:
        parse(b"kind,id\nsku,\xff\n", "csv", ZONES, "f")
    assert (err.value.errors[0].line, err.value.errors[0].message) == (2, "not UTF-8 text")


def test_jsonl_lists_and_nulls() -> None:
    text = (
        '{"kind":"scale","id":"e1","zone":"Z","format":"esphome","channels":2,'
        '"esphome_node":"n1","esphome_sensors":["a","b"],"max_weight_g":null}\n'
    )
    (scale,) = _load(text, "jsonl").scales
    assert scale.esphome_sensors == ("a", "b")
    assert scale.max_weight_g == 100_000.0
    assert "scale,e1,," in _write(_load(text, "jsonl"), "csv")
    assert ",a b," in _write(_load(text, "jsonl"), "csv")


def test_diff_names_added_removed_and_changed_fields() -> None:
    before = _load(GOOD)
    after = _load(
        GOOD.replace("sku,K1,10,3,40", "sku,K1,12,3,40").replace(
            "shelf,sh1,,,,Z,,s1,K1,100,40", "shelf,sh2,,,,Z,,s1,K1,100,40"
        )
    )
    changes = diff(before, after)
    assert changes.render() == [
        "~ sku K1: reorder_point 10 -> 12",
        "- shelf sh1",
        "+ shelf sh2",
    ]
    assert changes.counts() == {"add": 1, "remove": 1, "change": 1}
    assert not diff(after, after)


def _big_csv(n: int) -> str:
    lines = [
        "kind,id,reorder_point,safety_stock,max_stock,zone,scale,sku,unit_weight_g,capacity_units"
    ]
    lines += [f"sku,K{i},5,1,20,,,,," for i in range(n)]
    lines += [f"scale,s{i},,,,Z,,,," for i in range(n)]
    lines += [f"shelf,sh{i},,,,Z,s{i},K{i},50,20" for i in range(n)]
    return "\n".join(lines) + "\n"


def test_ten_thousand_rows_import_and_round_trip() -> None:
    text = _big_csv(3_334)  # 10,002 rows
    seen: list[int] = []
    rows, errors = formats.read_rows(text.encode(), "csv", "big", seen.append)
    assert errors == []
    assert len(rows) == 10_002
    assert seen == [10_000]
    cat = validate(rows, ZONES, "big")
    assert len(cat) == 10_002
    assert _load(_write(cat, "csv")).same_records(cat)


def test_docs_catalogue_columns_are_generated_from_the_models() -> None:
    doc = (DEMO.parents[2] / "docs" / "catalogue.md").read_text(encoding="utf-8")
    assert site_schema.render_doc(doc, site_schema.catalogue_reference()) == doc, (
        "docs/catalogue.md is out of date: python -m controller.site_schema --write-doc"
    )
    assert ",".join(HEADER) in doc.splitlines()


def test_lines_are_counted_in_the_file_across_quoted_newlines_and_blank_lines() -> None:
    text = (
        "kind,id,name,reorder_point,safety_stock,max_stock\n"
        'sku,K1,"two\nlines",1,0,5\n'  # lines 2-3
        "sku,K2,x,bad,0,5\n"  # line 4
        "\n"
        "sku,K3,y,1,0,5,9\n"  # line 6
    )
    assert _errors(text) == {(4, "reorder_point"), (6, "-")}


def test_a_shelf_that_gives_no_unit_weight_or_tolerance_takes_its_skus() -> None:
    """The issue's SKU columns include unit weight and tolerance: a SKU may give them for its
    shelves (a shelf's own value wins), in any line order; a shelf with neither is named."""
    text = """kind,id,reorder_point,safety_stock,max_stock,zone,max_weight_g,scale,sku,\
unit_weight_g,tolerance_frac,capacity_units
shelf,sh1,,,,Z,,s1,K1,,,40
shelf,sh2,,,,Z,,s2,K1,80,0.1,40
sku,K1,10,3,40,,,,,250,0.2,
sku,K2,10,3,40,,,,,,,
scale,s1,,,,Z,20000,,,,,
scale,s2,,,,Z,20000,,,,,
scale,s3,,,,Z,20000,,,,,
shelf,sh3,,,,Z,,s3,K2,,,40
"""
    with pytest.raises(CatalogueInvalid) as err:
        _load(text)
    (problem,) = err.value.errors
    assert (problem.line, problem.column) == (9, "unit_weight_g")
    assert problem.message == "required (on the shelf, or on its SKU K2)"
    cat = _load(text.replace("shelf,sh3,,,,Z,,s3,K2,,,40", "shelf,sh3,,,,Z,,s3,K2,50,,40"))
    sh1, sh2, sh3 = cat.shelves
    assert (sh1.unit_weight_g, sh1.tolerance_frac) == (250.0, 0.2)  # the SKU's
    assert (sh2.unit_weight_g, sh2.tolerance_frac) == (80.0, 0.1)  # its own
    assert (sh3.unit_weight_g, sh3.tolerance_frac) == (50.0, 0.3)  # K2 gives none: default
    assert (cat.skus[0].unit_weight_g, cat.skus[1].unit_weight_g) == (250.0, None)
    back = _load(_write(cat, "csv"))  # exported with the values filled in: the same records
    assert back.same_records(cat)


def test_site_file_shelves_take_their_skus_unit_weight_and_tolerance(tmp_path: Path) -> None:
    """The same in the site file: a ``[[shelves]]`` table without ``unit_weight_g`` takes its
    ``[[skus]]`` table's, and one without either does not load, naming the field."""
    path = write_small_site(tmp_path, mqtt_port=1883, scales=2)
    text = path.read_text(encoding="utf-8").replace(f"unit_weight_g = {UNIT_G}\n", "")
    text = text.replace('id = "K0"\n', 'id = "K0"\nunit_weight_g = 123.0\ntolerance_frac = 0.25\n')
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:  # K1 gives none: sh1 has no unit weight
        load_site(path)
    assert any("unit_weight_g" in where for where, _ in err.value.errors)
    text = text.replace('id = "K1"\n', 'id = "K1"\nunit_weight_g = 50.0\n')
    path.write_text(text, encoding="utf-8")
    site = load_site(path)
    assert [(s.unit_weight_g, s.tolerance_frac) for s in site.shelves] == [
        (123.0, 0.25),
        (50.0, 0.3),
    ]
