"""Catalogue files for the tests and benchmarks of a big import (tests/sites.py writes the
first one: ``write_small_site(..., catalogue_csv=True)``)."""

from __future__ import annotations

from pathlib import Path

from tests.sites import write_small_site


def changed_catalogue(csv: Path, size: int) -> bytes:
    """The catalogue of ``csv`` with every SKU's reorder point changed (10 -> 11) and 1% more
    SKUs, scales and shelves (ids after the last)."""
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    rp = header.index("reorder_point")
    out = [lines[0]]
    skus, scales, shelves = [], [], []
    for line in lines[1:]:
        cells = line.split(",")
        if cells[0] == "sku":
            cells[rp] = "11"
            skus.append(",".join(cells))
        elif cells[0] == "scale":
            scales.append(line)
        else:
            shelves.append(line)
    for i in range(size, size + max(1, size // 100)):
        skus.append(skus[0].replace("sku,K0,", f"sku,K{i},", 1))
        scales.append(scales[0].replace("scale,s0,", f"scale,s{i},", 1))
        shelves.append(
            shelves[0].replace("shelf,sh0,", f"shelf,sh{i},", 1).replace(",s0,K0,", f",s{i},K{i},")
        )
    return ("\n".join(out + skus + scales + shelves) + "\n").encode()


def catalogue_site(folder: Path, mqtt_port: int, size: int, client_id: str) -> Path:
    """A topology-only site of ``size`` SKUs, scales and shelves with its ``catalogue.csv``
    beside it (to import), paced for a large site: dwell and reporting interval 5 s."""
    return write_small_site(
        folder,
        mqtt_port=mqtt_port,
        scales=size,
        client_id=client_id,
        dwell_s=5.0,
        reporting_interval_s=5.0,
        keepalive_s=30.0,
        catalogue_csv=True,
    )
