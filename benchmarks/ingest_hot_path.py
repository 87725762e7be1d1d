"""The durable pipeline after the wire, in process: CPU µs per message, A/B between two trees.

What one socket read costs the controller once the MQTT link has parsed its PUBLISH packets:
IngestService (payload decode, validation, cursors, shelf conditioner and counting) → SQLite
group commit (the real journal) → ack → bus → AlertService (the listener the runtime adds).
The link's own parse is timed separately and reported apart (it belongs to the link's figure);
no broker, no sockets, no event-loop scheduling. The shelves follow ``loadgen.steady_grams``
(mostly settled readings, a pick now and then), 100 native scales, one reading per message.

Absolute figures on a shared machine move by 2× between minutes, so the useful figure is an
A/B: ``--base REV`` checks REV out into a temporary ``git worktree`` and runs the two trees in
alternating child processes (same messages, same group sizes, ``--repeat`` rounds); each child
reports its best-of-``--inner`` figure, the table shows the median per tree and group size.

    python benchmarks/ingest_hot_path.py                       # this tree only
    python benchmarks/ingest_hot_path.py --base HEAD~1         # A/B against the previous commit
    python benchmarks/ingest_hot_path.py --base HEAD --groups 440 --repeat 5
    python benchmarks/ingest_hot_path.py --base HEAD --this ../wt   # another checkout as B
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _child(root: Path, messages: int, groups: list[int], inner: int) -> dict[str, float]:
    """Runs in a child process with ``root`` first on sys.path: µs CPU/msg by group size."""
    sys.path.insert(0, str(root))
    import asyncio

    from benchmarks.ingest_e2e import DEVICES, _NullLink, make_site
    from benchmarks.loadgen import device_names, encode_readings
    from controller.adapters.journal import Journal
    from controller.bus import Bus
    from controller.services.alerts import AlertService
    from controller.services.ingest import IngestService, shelf_specs
    from devices.link.mqtt_codec import PacketParser

    def ingest_settings(site: Any) -> Any:
        """The constructor's first argument: settings since a1008e7, the site before (--base)."""
        from controller.services import ingest

        cls = getattr(ingest, "IngestSettings", None)
        return cls.from_site(site) if cls is not None else site

    def alert_settings(site: Any) -> Any:
        from controller.services import alerts

        cls = getattr(alerts, "AlertSettings", None)
        return cls.from_site(site) if cls is not None else site

    # The drain's messages: MQTT 3.1.1 QoS 1 PUBLISH packets, one native reading each.
    encoded = encode_readings(device_names(DEVICES), messages, ts0=time.time() - messages / 4e4)
    buf, offsets = encoded.buf, encoded.offsets

    async def once(size: int) -> tuple[float, float]:
        folder = Path(tempfile.mkdtemp(prefix="hotpath-"))
        try:
            site = make_site(folder, 1883, "bench-hot-path")
            journal = Journal(site.journal.path, synchronous=site.journal.synchronous)
            journal.open()
            bus = Bus()
            link = _NullLink()
            ingest = IngestService(
                ingest_settings(site), journal, link, bus.publish, shelf_specs=shelf_specs(site)
            )
            alerts = AlertService(
                alert_settings(site), journal, link, bus.publish, ingest.states, shelf_specs(site)
            )

            def after_commit(events: list[dict[str, Any]]) -> None:
                alerts.on_events(events)
                alerts.evaluate_dirty(time.time())

            bus.add_listener(after_commit)
            parser = PacketParser(4)
            chunks = [
                buf[offsets[i] : offsets[min(i + size, messages)]] for i in range(0, messages, size)
            ]
            p0 = time.process_time()
            groups = [parser.feed(chunk) for chunk in chunks]
            parse_s = time.process_time() - p0
            t0 = time.process_time()
            for msgs in groups:
                ingest.on_messages(msgs)
            took = time.process_time() - t0
            journal.close()
            if ingest.readings != messages:
                raise RuntimeError(f"{ingest.readings} of {messages} readings applied")
            return took / messages * 1e6, parse_s / messages * 1e6
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    out: dict[str, float] = {}
    for size in groups:
        best = min(asyncio.run(once(size)) for _ in range(inner))
        out[f"pipeline_{size}"] = best[0]
        out[f"parse_{size}"] = best[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", help="a git revision to compare against (A/B)")
    ap.add_argument("-n", "--messages", type=int, default=40_000)
    ap.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[440, 2800])
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds per tree")
    ap.add_argument("--inner", type=int, default=2, help="runs per child (best kept)")
    ap.add_argument(
        "--this", type=Path, default=ROOT, help="the tree measured as 'this tree' (a worktree)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(Path(args.child), args.messages, args.groups, args.inner)))
        return
    trees: dict[str, Path] = {"this tree": args.this}
    worktree: Path | None = None
    if args.base:
        worktree = Path(tempfile.mkdtemp(prefix="hotpath-base-"))
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.base],
            check=True,
            capture_output=True,
        )
        trees = {f"base {args.base}": worktree, "this tree": args.this}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for _ in range(args.repeat):
            for name, root in trees.items():
                line = (
                    subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--child",
                            str(root),
                            "-n",
                            str(args.messages),
                            "--groups",
                            ",".join(map(str, args.groups)),
                            "--inner",
                            str(args.inner),
                        ],
                        check=True,
                        capture_output=True,
                        text=True,
                        cwd=root,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                results[name].append(json.loads(line))
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                check=False,
                capture_output=True,
            )
    print(f"µs CPU per message after the link's parse (median of {args.repeat} rounds, each the")
    print(f"best of {args.inner}; {args.messages:,} messages; link parse shown apart)")
    print(f"{'tree':<24}" + "".join(f"{'group ' + str(g):>14}{'parse':>8}" for g in args.groups))
    for name, runs in results.items():
        cells = ""
        for g in args.groups:
            cells += f"{statistics.median(r[f'pipeline_{g}'] for r in runs):>14.2f}"
            cells += f"{statistics.median(r[f'parse_{g}'] for r in runs):>8.2f}"
        print(f"{name:<24}{cells}")
        print(
            f"{'':<24}"
            + "  ".join("/".join(f"{r[f'pipeline_{g}']:.1f}" for r in runs) for g in args.groups)
        )


if __name__ == "__main__":
    main()
