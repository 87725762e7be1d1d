"""Site files for tests: small, explicit, written into a temporary folder."""

from __future__ import annotations

from pathlib import Path

UNIT_G = 100.0
TARE_G = 500.0


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
) -> Path:
    """One zone ``Z``; scale ``s<i>`` (1 channel) holds shelf ``sh<i>`` of SKU ``K<i>``:
    unit 100 g, tare 500 g, capacity 40.

    ``[history] backend`` is ``"none"`` unless asked otherwise, so the journal's outbox keeps
    every reading (the fault tests count them there) and no history file is written; with
    ``history_backend=None`` the file has no ``[history]`` table at all (the site default, or a
    table the caller appends)."""
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
        "",
    ]
    if history_backend is not None:
        lines += ["[history]", f'backend = "{history_backend}"', ""]
    lines += [
        "[[zones]]",
        'id = "Z"',
        "",
    ]
    for i in range(scales):
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
            'zone = "Z"',
            f"reporting_interval_s = {reporting_interval_s}",
            "max_weight_g = 10000.0",
            "",
            "[[shelves]]",
            f'id = "sh{i}"',
            'zone = "Z"',
            f'scale = "s{i}"',
            f'sku = "K{i}"',
            f"unit_weight_g = {UNIT_G}",
            f"tare_g = {TARE_G}",
            "capacity_units = 40",
            "",
        ]
    path = folder / "site.toml"
    path.write_text("\n".join(lines))
    return path


def topic(device: str) -> str:
    return f"fh/t/Z/scale/{device}"


def grams(units: int) -> float:
    return TARE_G + units * UNIT_G
