"""``tests.sites.write_small_site`` spread over several zones, for the zone filters of the list
reads (tests/integration/test_api_pages.py) and benchmarks/read_api.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.sites import write_small_site

_ID = re.compile(r'id = "(?:s|sh)(\d+)"')


def zone_of(i: int, zones: int) -> str:
    """The zone of scale ``s<i>`` and shelf ``sh<i>``: ``Z<i mod zones>``."""
    return f"Z{i % zones}"


def write_site_in_zones(folder: Path, *, zones: int, **site: Any) -> Path:
    """``write_small_site(folder, **site)`` with zones ``Z0`` … ``Z<zones-1>`` instead of ``Z``;
    scale ``s<i>`` and shelf ``sh<i>`` are in ``zone_of(i, zones)`` (their MQTT topic is
    ``fh/t/<zone>/scale/s<i>``)."""
    path = write_small_site(folder, **site)
    out: list[str] = []
    index = 0
    for line in path.read_text().splitlines():
        m = _ID.fullmatch(line)
        if m is not None:
            index = int(m.group(1))
        if line == 'zone = "Z"':
            line = f'zone = "{zone_of(index, zones)}"'
        elif line == 'id = "Z"':
            line = "\n\n[[zones]]\n".join(f'id = "Z{z}"' for z in range(zones))
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


def zone_topic(device: str, zones: int) -> str:
    """The MQTT topic of scale ``s<i>`` of ``write_site_in_zones``."""
    return f"fh/t/{zone_of(int(device[1:]), zones)}/scale/{device}"
