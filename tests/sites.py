"""Site files for tests: small, explicit, written into a temporary folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

UNIT_G = 100.0
TARE_G = 500.0

# API tokens of every test site (role -> token); only their SHA-256 goes into the file.
TOKENS = {
    "floor": "test-floor-token-0123456789abcdef",
    "supervisor": "test-supervisor-token-0123456789ab",
    "engineer": "test-engineer-token-0123456789abcd",
}


def auth_headers(role: str = "engineer") -> dict[str, str]:
    """``Authorization`` header with the test token of ``role``."""
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def api_token_lines() -> list[str]:
    """``[[api.tokens]]`` tables for ``TOKENS`` (append after the ``[api]`` keys)."""
    out: list[str] = []
    for role, token in TOKENS.items():
        digest = hashlib.sha256(token.encode()).hexdigest()
        out += ["[[api.tokens]]", f'name = "test-{role}"', f'role = "{role}"']
        out += [f'sha256 = "{digest}"', ""]
    return out


def write_small_site(
    folder: Path,
    *,
    mqtt_port: int,
    scales: int = 4,
    api_port: int = 0,
    client_id: str = "floorhand-test",
    reorder_point: int = 10,
    safety_stock: int = 3,
    max_stock: int = 40,
    dwell_s: float = 0.2,
    reporting_interval_s: float = 1.0,
    protocol: int = 5,
    keepalive_s: float = 5.0,
    history_backend: str | None = "none",
    api_settings: dict[str, str | int | float] | None = None,
    catalogue_csv: bool = False,
    zones: int = 1,
) -> Path:
    """One zone ``Z``; scale ``s<i>`` (1 channel) holds shelf ``sh<i>`` of SKU ``K<i>``:
    unit 100 g, tare 500 g, capacity 40.

    ``[history] backend`` is ``"none"`` unless asked otherwise, so the journal's outbox keeps
    every reading (the fault tests count them there) and no history file is written; with
    ``history_backend=None`` the file has no ``[history]`` table at all (the site default, or a
    table the caller appends). With ``catalogue_csv`` the SKUs, scales and shelves go to
    ``catalogue.csv`` beside the site file (docs/catalogue.md) instead of inline tables. With
    ``zones`` > 1 the zones are ``Z0``… and scale/shelf ``i`` is in ``zone_of(i, scales, zones)``
    (consecutive runs, as ``benchmarks/ws_fanout.py`` does)."""
    lines = [
        "[site]",
        'id = "t"',
        "",
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        f'client_id = "{client_id}"',
        f"protocol = {protocol}",
        'topic_prefix = "fh"',
        f"keepalive_s = {keepalive_s}",
        "",
        "[journal]",
        f'path = "{folder / "journal.sqlite"}"',
        "",
        "[api]",
        f'bind = "127.0.0.1:{api_port}"',
        # Tests poll the API in loops: the default per-token rate limit would refuse them.
        *(
            f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}"
            for k, v in {"rate_per_s": 100000, "rate_burst": 100000, **(api_settings or {})}.items()
        ),
        "",
        *api_token_lines(),
    ]
    if history_backend is not None:
        lines += ["[history]", f'backend = "{history_backend}"', ""]
    for z in range(zones):
        lines += ["[[zones]]", f'id = "{"Z" if zones == 1 else f"Z{z}"}"', ""]
    for i in range(scales):
        zone = zone_of(i, scales, zones)
        lines += [
            "[[skus]]",
            f'id = "K{i}"',
            f"reorder_point = {reorder_point}",
            f"safety_stock = {safety_stock}",
            f"max_stock = {max_stock}",
            f"dwell_s = {dwell_s}",
            "",
            "[[scales]]",
            f'id = "s{i}"',
            f'zone = "{zone}"',
            f"reporting_interval_s = {reporting_interval_s}",
            "max_weight_g = 10000.0",
            "",
            "[[shelves]]",
            f'id = "sh{i}"',
            f'zone = "{zone}"',
            f'scale = "s{i}"',
            f'sku = "K{i}"',
            f"unit_weight_g = {UNIT_G}",
            f"tare_g = {TARE_G}",
            "capacity_units = 40",
            "",
        ]
    if catalogue_csv:
        lines = lines[: lines.index("[[skus]]")] if scales else lines
        rows = ["kind,id,reorder_point,safety_stock,max_stock,dwell_s,zone,reporting_interval_s,"
                "max_weight_g,scale,sku,unit_weight_g,tare_g,capacity_units"]  # fmt: skip
        for i in range(scales):
            rows.append(f"sku,K{i},{reorder_point},{safety_stock},{max_stock},{dwell_s},,,,,,,,")
        for i in range(scales):
            zone = zone_of(i, scales, zones)
            rows.append(f"scale,s{i},,,,,{zone},{reporting_interval_s},10000.0,,,,,")
        for i in range(scales):
            zone = zone_of(i, scales, zones)
            rows.append(f"shelf,sh{i},,,,,{zone},,,s{i},K{i},{UNIT_G},{TARE_G},40")
        (folder / "catalogue.csv").write_text("\n".join(rows) + "\n")
    path = folder / "site.toml"
    path.write_text("\n".join(lines))
    return path


def zone_of(i: int, scales: int, zones: int) -> str:
    """The zone of scale/shelf ``i`` of a ``write_small_site`` site."""
    return "Z" if zones == 1 else f"Z{i * zones // scales}"


def topic(device: str, zone: str = "Z") -> str:
    return f"fh/t/{zone}/scale/{device}"


def grams(units: int) -> float:
    return TARE_G + units * UNIT_G
