"""The specialised line-protocol formatter is byte-equal to influxdb-client's Point."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision

from controller.adapters.influx import LineEncoder, format_line
from controller.ports import HistoryPoint

# Text with every character line protocol treats specially, plus anything else.
SPECIAL = st.sampled_from([" ", ",", "=", '"', "\\", "\n", "\r", "\t", "#", "'", "é", "\x00"])
text = st.lists(st.one_of(SPECIAL, st.characters()), max_size=12).map("".join)
field_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    text,
    st.none(),
)
ts_ms = st.integers(min_value=0, max_value=32_503_680_000_000)


def reference(measurement: str, tags: dict[str, str], fields: dict[str, object], t: int) -> str:
    p = Point(measurement)
    for k, v in tags.items():
        p.tag(k, v)
    for k, f in fields.items():
        p.field(k, f)
    p.time(t, WritePrecision.MS)
    out: str = p.to_line_protocol(WritePrecision.MS)
    return out


@settings(max_examples=300, deadline=None)
@given(
    measurement=text.filter(lambda m: not m.startswith("#")),
    tags=st.dictionaries(text, text, max_size=5),
    fields=st.dictionaries(text, field_value, max_size=5),
    t=ts_ms,
)
def test_format_line_is_byte_equal_to_point(
    measurement: str, tags: dict[str, str], fields: dict[str, object], t: int
) -> None:
    expected = reference(measurement, tags, fields, t)
    assert format_line(measurement, tags, fields, t) == expected  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    measurement=text.filter(lambda m: not m.startswith("#")),
    tags=st.dictionaries(text, text, max_size=6),
    fields=st.dictionaries(text, field_value, max_size=5),
    t=ts_ms,
)
def test_encoder_fast_path_matches_point(
    measurement: str, tags: dict[str, str], fields: dict[str, object], t: int
) -> None:
    """The path every point takes (cached series prefix, cached field keys, exact-type
    dispatch) gives the same bytes as Point."""
    enc = LineEncoder()
    p = HistoryPoint(measurement, tuple(sorted(tags.items())), tuple(sorted(fields.items())), t)  # type: ignore[arg-type]
    expected = reference(measurement, tags, fields, t)
    assert enc.line(p) == expected
    assert enc.line(p) == expected  # second call: from the caches


@settings(max_examples=100, deadline=None)
@given(
    weight=st.floats(allow_nan=False, allow_infinity=False),
    seq=st.integers(min_value=0, max_value=2**40),
    t=ts_ms,
)
def test_reading_lines_match_point(weight: float, seq: int, t: int) -> None:
    enc = LineEncoder()
    tags = {
        "site": "t",
        "zone": "Z 1",
        "shelf": "A,1",
        "sku": "K=1",
        "device": "s1",
        "channel": "0",
    }
    fields = (("epoch", 7), ("seq", seq), ("weight_g", weight))
    p = HistoryPoint("weight", tuple(sorted(tags.items())), fields, t)
    assert enc.line(p) == reference("weight", tags, dict(fields), t)


def test_precision_is_milliseconds_and_escaping_examples() -> None:
    line = format_line(
        "weight",
        {"shelf": "A 1,x=y", "zone": "z\\"},
        {"weight_g": 1500.0, "seq": 3, "note": 'say "hi"\\'},
        1_795_605_124_235,
    )
    assert line == (
        r"weight,shelf=A\ 1\,x\=y,zone=z\  note=" + '"say \\"hi\\"\\\\"' + ",seq=3i,weight_g=1500"
        " 1795605124235"
    )
    assert format_line("m", {}, {"f": float("nan")}, 1) == ""  # no field left: no line


def test_encode_joins_lines_and_skips_empty() -> None:
    enc = LineEncoder()
    pts = [
        HistoryPoint("m", (("a", "1"),), (("f", 1.5),), 10),
        HistoryPoint("m", (("a", "1"),), (("f", float("inf")),), 11),
        HistoryPoint("m", (("a", "2"),), (("f", 2),), 12),
    ]
    assert enc.encode(pts) == b"m,a=1 f=1.5 10\nm,a=2 f=2i 12"
