"""The large-site scenario of issue 12 at full size: a generated site of N SKUs + N shelves + N
scales (catalogue imported into the journal) starts, ingests, alerts, picks and serves the
dashboard, with per step the wall time, the controller's RSS after it and pass/fail.

The steps are tests/site_scenario.py's (the suite runs the same code at 3,000 SKUs in
tests/integration/test_site_scenario.py): ``site`` (generate + ``floorhand catalog import``),
``start`` (``floorhand run`` to ``/api/v1/ready`` and both PLC links up), ``ingest`` (8 settled
readings per scale over MQTT until every shelf is counted), ``alerts`` (``--low`` shelves
driven below their reorder point until exactly their alerts are active), ``pick`` (a two-line
order over ``POST /api/v1/picks`` to SORTED through the sorter and conveyor simulators over
Modbus TCP) and ``dashboard`` (headless Debian chromium renders the site overview). Everything
runs on 127.0.0.1: a private mosquitto, the simulators in this process, the controller as a
child process; each is stopped by PID at the end. Exit status 1 if a step failed.

    python benchmarks/site_scenario.py --skus 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.site_scenario import ScenarioResult, run_site_scenario  # noqa: E402


def table(result: ScenarioResult) -> str:
    lines = [
        f"\n{result.skus:,} SKUs = shelves = scales, {result.zones} zones",
        "",
        "| step | result | wall | controller RSS after | detail |",
        "|---|---|---|---|---|",
    ]
    for s in result.steps:
        rss = f"{s.rss_mb:.0f} MB" if s.rss_mb is not None else "—"
        verdict = "pass" if s.ok else "**FAIL**"
        lines.append(f"| {s.name} | {verdict} | {s.wall_s:.2f} s | {rss} | {s.detail} |")
    if result.error is not None:
        lines.append(f"\nstopped at {result.error}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--skus", type=int, default=100_000, help="SKUs = shelves = scales")
    parser.add_argument("--zones", type=int, default=8)
    parser.add_argument(
        "--low", type=int, default=None, help="shelves driven low (default N/100, 8…1000)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, journal)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="site-scenario-"))
    print(f"site scenario: {args.skus:,} SKUs in {folder}", flush=True)
    try:
        result = asyncio.run(
            run_site_scenario(
                folder,
                skus=args.skus,
                zones=args.zones,
                low=args.low,
                say=lambda line: print(line, flush=True),
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(table(result))
    if args.json is not None:
        body = asdict(result)
        body["driven_low"] = sorted(result.driven_low)
        args.json.write_text(json.dumps(body, indent=2, default=str))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
