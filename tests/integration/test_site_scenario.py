"""Issue 12's large-site scenario at the size CI affords (tests/site_scenario.py; the same code
runs at 100k SKUs as benchmarks/site_scenario.py): a generated site whose catalogue is imported
into the journal starts, counts every shelf from MQTT readings, raises the alerts of exactly the
shelves driven low, completes a pick through the sorter and conveyor simulators over Modbus TCP
and serves the site overview to headless chromium. Real mosquitto, pymodbus simulators, the
controller process under uvicorn, Debian chromium."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.site_scenario import LOW_UNITS, PACK_LANE, run_site_scenario

SKUS = 3_000
ZONES = 4
LOW = 30


@pytest.mark.slow
async def test_a_generated_site_starts_ingests_alerts_picks_and_shows_its_overview(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    result = await run_site_scenario(tmp_path, skus=SKUS, zones=ZONES, low=LOW, say=lines.append)
    report = "\n".join(lines)
    assert result.error is None, f"{result.error}\n{report}"
    assert [s.name for s in result.steps] == [
        "site",
        "start",
        "ingest",
        "alerts",
        "pick",
        "dashboard",
    ]
    assert all(s.ok for s in result.steps), report
    # The controller's RSS is taken after every step from "start" on.
    assert all(s.rss_mb is not None and s.rss_mb > 0 for s in result.steps[1:]), report
    # Every shelf counted from its readings.
    assert result.counted == SKUS
    # Alerts for exactly the shelves driven low, at their level.
    assert len(result.driven_low) == LOW
    assert result.alerted == dict.fromkeys(result.driven_low, ("low", LOW_UNITS))
    # The order: both tasks diverted into the pack station's lane and confirmed by the scales;
    # one SUBMIT per task reached the sorter, each executed once; the belt was started.
    assert result.order is not None
    assert result.order["state"] == "SORTED"
    cmd_ids = [t["cmd_id"] for t in result.order["tasks"]]
    assert sorted(result.sorter_submits) == sorted((c, PACK_LANE) for c in cmd_ids)
    assert result.sorter_executions == dict.fromkeys(cmd_ids, 1)
    assert "START" in result.conveyor_commands
    # The dashboard's overview: every shelf, a tile per zone with its LOW shelves.
    assert result.overview["head"].startswith(f"Site overview · {SKUS:,} shelves in {ZONES} zones")
    assert result.overview["tiles"] == result.expected_tiles()
    assert set(result.overview["tiles"].values()) == {f"{LOW // ZONES + d:,} LOW" for d in (0, 1)}
    assert result.overview["alert_count"] == LOW
    assert result.overview["page_errors"] == []
