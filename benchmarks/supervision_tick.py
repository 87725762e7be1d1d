"""Supervision tick cost at site size: loop time the staleness and alert ticks take per second.

Issue 12's target: < 5 ms of loop time per second at 100k shelves. The tick runs every 0.5 s
(``SupervisionService``): ``IngestService.tick`` (staleness) then ``AlertService.tick`` (dwell
timers, snoozes). A site of N one-channel scales, N shelves and N SKUs (tests/sites.py) is built
in process with a real SQLite journal; every shelf reports once through ingest, then time runs
on in 0.5 s ticks for ``--seconds`` simulated seconds while each shelf keeps reporting every
``reporting_interval_s`` (5 s, staggered; the benchmark moves the shelf's newest-reading time
instead of parsing readings, which is not what is measured here). One shelf in 100 goes silent
and turns STALE on the way. Reported: CPU ms of the two ticks per simulated second (mean and
worst second), and the shelves/keys they examined.

``--tree PATH`` runs the same measurement against another checkout (e.g. a ``git worktree`` of
the commit before the O(due) tick), for a before/after in one run:

    python benchmarks/supervision_tick.py --sizes 1000,10000,100000
    git worktree add /tmp/before f4c989f
    python benchmarks/supervision_tick.py --sizes 100000 --tree /tmp/before
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 0.5
REPORTING_S = 5.0


def child(tree: Path, n: int, seconds: float) -> dict[str, Any]:
    sys.path.insert(0, str(tree))
    sys.path.insert(1, str(ROOT))  # tests/sites.py of this tree writes the site file
    import orjson

    from controller.adapters.journal import Journal
    from controller.bus import Bus
    from controller.config import load_site
    from controller.services.alerts import AlertService, AlertSettings
    from controller.services.ingest import IngestService, IngestSettings, shelf_specs
    from devices.link.mqtt import MqttMessage
    from tests.sites import TARE_G, UNIT_G, topic, write_small_site

    class Link:
        epoch = 1

        def ack(self, ids: Any, epoch: Any = None) -> None:
            pass

        def publish(self, *a: Any, **k: Any) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    folder = Path(tempfile.mkdtemp(prefix="tick-"))
    site = load_site(
        write_small_site(folder, mqtt_port=1, scales=n, reporting_interval_s=REPORTING_S)
    )
    journal = Journal(folder / "journal.sqlite")
    journal.open()
    bus = Bus()
    t0 = time.time() - 1.0
    now = [t0]
    specs = shelf_specs(site)
    link = Link()
    ingest = IngestService(
        IngestSettings.from_site(site),
        journal,
        link,
        bus.publish,
        clock=lambda: now[0],
        shelf_specs=specs,
    )
    alerts = AlertService(
        AlertSettings.from_site(site), journal, link, bus.publish, ingest.states, specs
    )

    def after_commit(events: list[Any]) -> None:
        alerts.on_events(events)
        alerts.evaluate_dirty(now[0])

    bus.add_listener(after_commit)
    for start in range(0, n, 2_000):
        msgs = []
        for i in range(start, min(n, start + 2_000)):
            ts = t0 - REPORTING_S * i / n  # reports spread over one interval, as on a site
            body = {"device": f"s{i}", "seq": 0, "ts": ts, "grams": TARE_G + 30 * UNIT_G}
            msgs.append(MqttMessage(topic(f"s{i}"), orjson.dumps(body), 1, False, 1, False))
        ingest.on_messages(msgs)
    states = [ingest.states[f"sh{i}"] for i in range(n)]
    ingest.tick(now[0])
    alerts.tick(now[0])  # every key is evaluated after a start (not measured) ...
    while getattr(alerts, "full_pass_pending", False):  # ... in slices since 27ac548
        alerts.tick(now[0])
    per_second: list[float] = []
    acc = 0.0
    ticks = int(seconds / TICK_S)
    per_tick = max(1, int(n * TICK_S / REPORTING_S))
    cursor = 0  # shelf 0 reported longest ago: it reports first
    for k in range(1, ticks + 1):
        now[0] = t0 + k * TICK_S
        for _ in range(per_tick):  # the shelves whose report is due in this tick
            i = cursor % n
            cursor += 1
            if i % 100 != 99:  # one shelf in 100 is silent
                states[i].last_ts_s = now[0]
        c0 = time.process_time()
        ingest.tick(now[0])
        alerts.tick(now[0])
        acc += time.process_time() - c0
        if k % int(1 / TICK_S) == 0:
            per_second.append(acc * 1e3)
            acc = 0.0
    stale = sum(1 for st in states if st.status.value == "stale")
    journal.close()
    return {
        "shelves": n,
        "ms_per_s_mean": sum(per_second) / len(per_second),
        "ms_per_s_max": max(per_second),
        "stale_shelves": stale,
        "stale_checks": getattr(ingest, "stale_checks", None),
        "alert_evaluations": getattr(alerts, "evaluated", None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated shelf counts")
    ap.add_argument("--seconds", type=float, default=30.0, help="simulated seconds measured")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout measured")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), int(args.child[1]), args.seconds)))
        return
    print(f"tree {args.tree}: tick every {TICK_S} s, shelves report every {REPORTING_S} s")
    print(f"{'shelves':>8} {'ms/s mean':>10} {'ms/s max':>9} {'stale':>7} {'examined':>12}")
    for n in (int(x) for x in args.sizes.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(args.tree),
                str(n),
                "--seconds",
                f"{args.seconds}",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        examined = r["stale_checks"] if r["stale_checks"] is not None else "all"
        print(
            f"{r['shelves']:>8} {r['ms_per_s_mean']:>10.2f} {r['ms_per_s_max']:>9.2f} "
            f"{r['stale_shelves']:>7} {examined!s:>12}",
            flush=True,
        )


if __name__ == "__main__":
    main()
