"""End-to-end ingest benchmark: the real controller Runtime against a real mosquitto.

The pipeline measured is the controller's: MqttLink → IngestService (parse, validate, dedup,
domain apply) → SQLite journal group commit → PUBACK after commit → bus → AlertService. The
controller (`controller.runtime.Runtime`) runs in THIS process, so ``time.process_time()`` is
the controller's CPU (link, ingest, journal commits, alerts, event loop); the load generators
(benchmarks/loadgen.py, pre-encoded raw PUBLISH packets) and the latency probe run in child
processes; mosquitto is started per stage on 127.0.0.1 with its persistence database saved only
at shutdown (``autosave_interval 1000000000`` with ``autosave_on_changes``), QoS 0 queueing for
offline sessions on, ``max_queued_messages 1000000`` and ``max_inflight_messages 0``.

Stages:

1. drain: pre-load N messages into the controller's persistent session (Runtime started once to
   create it, then stopped), start a new Runtime and time until every message is committed and
   acknowledged. QoS 1 single readings, QoS 1 batches of 50 readings, QoS 0 single readings.
2. live: a paced QoS 1 (and QoS 0) publisher in a child process at target rates; consumer rate,
   controller CPU, backlog at the end of the publishing, and every seq checked in the journal.
3. latency: 4k msg/s of background load; a probe process moves one shelf far above / far below
   its reorder point and times publish of the settling reading → alert message received.
4. breakdown: no broker; PUBLISH bytes → parser → IngestService → journal (real and a no-op
   one) in groups of 8…3000 messages: CPU per message of link parse, ingest and journal.
5. profile (``--profile``): py-spy (or cProfile) on a QoS 1 drain; top functions.

Every drain, live and latency run also reports the controller's event-loop lag (`LoopLag`).
`drain_once(history_url=...)` runs the drain with the historian writing to a server with the
InfluxDB v2 write API (used by benchmarks/suite.py for the peer comparison).

    python benchmarks/ingest_e2e.py --quick        # under a minute
    python benchmarks/ingest_e2e.py                # full default (about 4 minutes)

Findings and the latest figures: docs/performance.md.

Results: a table on stdout, JSON and Markdown in ``--out`` (default var/bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import linecache
import logging
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

from benchmarks.loadgen import (  # noqa: E402
    device_names,
    encode_readings,
    publish_all,
    steady_grams,
)
from controller.adapters.journal import Journal  # noqa: E402
from controller.config import SiteConfig, load_site  # noqa: E402
from controller.control import new_main_loop  # noqa: E402
from controller.runtime import Runtime  # noqa: E402
from controller.services.ingest import IngestService, IngestSettings, shelf_specs  # noqa: E402
from devices.link.mqtt import MqttLink, MqttLinkConfig, MqttMessage  # noqa: E402
from devices.link.mqtt_codec import PacketParser, encode_publish  # noqa: E402
from tests.mosquitto import MOSQUITTO_BIN, MosquittoBroker  # noqa: E402
from tests.sites import grams, write_small_site  # noqa: E402

LOADGEN = ROOT / "benchmarks" / "loadgen.py"
SELF = Path(__file__).resolve()
DEVICES = 100
BROKER_CONFIG = "queue_qos0_messages true"
"""For the QoS 0 drains (the backlog is QoS 0). Never with a QoS 1 backlog larger than the
controller's receive maximum: mosquitto 2.0.11 then strands one queued QoS 1 message per queued
QoS 0 one (the owner probe's request is one) until the next reconnect
(firmware-configs/mosquitto/README.md; tests/integration/test_mqtt_link.py pins it)."""
AUTOSAVE_INTERVAL = 1_000_000_000  # with autosave_on_changes: never during a run (--autosave)
autosave_interval = AUTOSAVE_INTERVAL  # --autosave-interval sets it for the whole run
connect_timeout_s: float | None = None  # --connect-timeout (experiment)
TARGETS = {
    "qos1_msg_s": 30_000.0,
    "qos0_msg_s": 50_000.0,
    "batched_readings_s": 100_000.0,
    "cpu_us_per_msg": 25.0,
    "alert_p99_ms": 5.0,
}


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# The controller under test


class BenchRuntime(Runtime):
    """The real Runtime; `_on_messages` (the link's callback) also signals when ``target``
    messages have been committed and acknowledged, and counts groups."""

    def __init__(self, site: SiteConfig) -> None:
        super().__init__(site, freeze_heap=True)  # as `floorhand run` builds it
        if connect_timeout_s is not None:
            # Experiment knob (--connect-timeout): the link's handshake deadline, which also
            # covers the SUBACK that mosquitto sends only after a resumed session's backlog.
            link: Any = self.link
            link._config = dataclasses.replace(link.config, connect_timeout_s=connect_timeout_s)
        self.target = 0
        self.reached = asyncio.Event()
        self.groups = 0
        self.first_group_at = 0.0
        self.last_group_at = 0.0

    def _on_messages(self, msgs: list[Any]) -> None:
        super()._on_messages(msgs)
        now = time.perf_counter()
        if not self.groups:
            self.first_group_at = now
        self.groups += 1
        self.last_group_at = now
        if self.target and self.ingest.messages >= self.target:
            self.reached.set()

    def instrument(self) -> Timings:
        """Time every journal commit, supervision tick and garbage collection (for the
        latency stage: what the slow samples overlapped)."""
        timings = Timings()
        commit = self.journal.commit

        def timed_commit(*args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            try:
                commit(*args, **kwargs)
            finally:
                timings.commits.append((t0, time.perf_counter() - t0))

        self.journal.commit = timed_commit  # type: ignore[method-assign]
        for owner in (self.ingest, self.alerts):
            tick = owner.tick

            def timed_tick(now: float, _tick: Any = tick) -> Any:
                t0 = time.perf_counter()
                try:
                    return _tick(now)
                finally:
                    timings.ticks.append((t0, time.perf_counter() - t0))

            owner.tick = timed_tick  # type: ignore[method-assign]
        gc_start = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_start[0] = time.perf_counter()
            elif info.get("generation", 0) >= 1:
                timings.gcs.append((gc_start[0], time.perf_counter() - gc_start[0]))

        gc.callbacks.append(on_gc)
        timings.gc_callback = on_gc
        return timings

    def expect(self, total: int) -> None:
        self.target = total
        if self.ingest.messages >= total:
            self.reached.set()
        else:
            self.reached.clear()

    async def wait_reached(self, stall_s: float = 10.0) -> bool:
        """Wait for ``target``; give up when no message was committed for ``stall_s``."""
        last = -1
        while not self.reached.is_set():
            if self.ingest.messages == last:
                return False
            last = self.ingest.messages
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reached.wait(), stall_s)
        return True


@dataclass
class Timings:
    """``(perf_counter at start, seconds)`` of controller activities."""

    commits: list[tuple[float, float]] = field(default_factory=list)
    ticks: list[tuple[float, float]] = field(default_factory=list)
    gcs: list[tuple[float, float]] = field(default_factory=list)
    gc_callback: Any = None

    def close(self) -> None:
        if self.gc_callback in gc.callbacks:
            gc.callbacks.remove(self.gc_callback)

    @staticmethod
    def summary(spans: list[tuple[float, float]], t0: float, t1: float) -> dict[str, float]:
        ms = sorted(d * 1000 for start, d in spans if t0 <= start <= t1)
        return {
            "count": len(ms),
            "p50_ms": _pct(ms, 50),
            "p99_ms": _pct(ms, 99),
            "max_ms": ms[-1] if ms else 0.0,
            "over_2ms": sum(1 for x in ms if x > 2.0),
        }


class LoopLag:
    """Event-loop lag probe on the controller's loop (the Runtime runs in this process): a task
    sleeps ``interval_s`` over and over and records how late it woke up. A group being ingested
    (or any other callback) holds the loop; a timer due meanwhile fires late by up to that long.
    At 5 ms it wakes 200 times a second (well under 1 % of a core).

    On a shared machine the loop is also late when the process waits for a CPU. The probe also
    reads the loop thread's CPU time over each interval: ``busy`` = min(lag, that CPU time) is
    the part of the lag spent running our own code; the rest was spent waiting for a core."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lags: list[float] = []
        self.busy: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench-loop-lag")

    async def _run(self) -> None:
        interval = self.interval_s
        clock = time.perf_counter
        cpu = time.thread_time
        while True:
            t0, c0 = clock(), cpu()
            await asyncio.sleep(interval)
            lag = clock() - t0 - interval
            self.lags.append(lag)
            self.busy.append(min(lag, cpu() - c0))

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        return self.summary()

    def summary(self) -> dict[str, float]:
        ms = sorted(max(0.0, x) * 1000 for x in self.lags)
        busy = sorted(max(0.0, x) * 1000 for x in self.busy)
        return {
            "interval_ms": self.interval_s * 1000,
            "samples": len(ms),
            "p50_ms": _pct(ms, 50),
            "p99_ms": _pct(ms, 99),
            "max_ms": ms[-1] if ms else float("nan"),
            "busy_p99_ms": _pct(busy, 99),
            "busy_max_ms": busy[-1] if busy else float("nan"),
        }


def overlaps(spans: list[tuple[float, float]], t0: float, t1: float, min_s: float) -> bool:
    return any(d >= min_s and start < t1 and start + d > t0 for start, d in spans)


@contextlib.asynccontextmanager
async def running(rt: Runtime, *, wait_up: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``rt`` for the block. ``wait_up=False`` for a resumed session with a backlog: the
    broker sends queued messages before the SUBACK, so the link is UP only after the first
    in-flight window was processed."""
    task = asyncio.create_task(rt.run(), name="bench-runtime")
    try:
        async with asyncio.timeout(15):
            await rt.started.wait()
            if wait_up:
                await rt.link.wait_up(15)
        yield task
    finally:
        # Clear the owner claim first, as a clean stop does (a clean DISCONNECT does not fire
        # the will, so the next runtime of the same site would wait for the claim to go stale);
        # then wait until the broker closed the connection (so it holds the session as offline
        # and queues what comes next: QoS 0 sent to a closing connection is lost), then stop.
        with contextlib.suppress(Exception):
            await rt.owner.release(5.0)
        with contextlib.suppress(Exception):
            await rt.link.disconnect()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()  # the next stage's runtime freezes its own start-up heap


def make_site(
    folder: Path, port: int, client_id: str, *, history_url: str | None = None
) -> SiteConfig:
    """100 one-channel scales s0..s99, shelf sh<i> of SKU K<i> each (reorder point 10, safety 3,
    capacity 40, 100 g units on a 500 g tare), dwell 0 s, reporting interval 60 s (so a backlog
    of old readings is not STALE). No historian, unless ``history_url`` names a server with the
    InfluxDB v2 write API (victoria-metrics): then ``[history] backend = "influxdb2"``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_small_site(
        folder,
        mqtt_port=port,
        scales=DEVICES,
        client_id=client_id,
        dwell_s=0.0,
        reporting_interval_s=60.0,
        keepalive_s=30.0,
        history_backend="none" if history_url is None else None,
    )
    if history_url is not None:
        with path.open("a") as f:
            f.write(
                f'\n[history]\nbackend = "influxdb2"\nurl = "{history_url}"\norg = "bench"\n'
                'bucket = "bench"\ntoken_env = ""\n'
            )
    return load_site(path)


SHIPPED_BROKER_CONFIG = "\n".join(
    (
        "max_queued_bytes 1073741824",
        "queue_qos0_messages false",
        "max_packet_size 1048576",
        "max_keepalive 60",
        "set_tcp_nodelay true",
        "persistent_client_expiration 7d",
    )
)
"""firmware-configs/mosquitto/mosquitto.conf's broker settings on top of the tests/mosquitto.py
base (which has its persistence, queue and in-flight settings); used with autosave 1000."""
SHIPPED_AUTOSAVE_INTERVAL = 1000


@contextlib.asynccontextmanager
async def broker_in(
    folder: Path, *, shipped: bool = False, queue_qos0: bool = True
) -> AsyncIterator[MosquittoBroker]:
    """mosquitto for a stage: the benchmark settings (saves only at shutdown, QoS 0 queued for
    offline sessions unless ``queue_qos0`` is false), or with ``shipped`` the shipped config's
    settings (autosave every 1000 changes)."""
    broker = MosquittoBroker(
        folder / "mosquitto",
        extra_config=(
            SHIPPED_BROKER_CONFIG
            if shipped
            else (BROKER_CONFIG if queue_qos0 else "queue_qos0_messages false")
        ),
        autosave_interval=SHIPPED_AUTOSAVE_INTERVAL if shipped else autosave_interval,
    )
    broker.folder.mkdir(parents=True, exist_ok=True)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


class MachineCpu:
    """Whole-machine CPU over an interval, to show what else ran (other sessions, the kernel):
    ``other`` = busy core-seconds not used by the processes we measured; ``steal`` = time the
    hypervisor gave to other guests."""

    def __init__(self) -> None:
        self.t0 = psutil.cpu_times()

    def delta(self, ours_s: float) -> dict[str, float]:
        t1 = psutil.cpu_times()

        def busy(t: Any) -> float:
            return float(t.user + t.nice + t.system + t.irq + t.softirq)

        other = busy(t1) - busy(self.t0) - ours_s
        return {"other_cpu_s": max(0.0, other), "steal_s": float(t1.steal - self.t0.steal)}


def verify_journal(journal: Journal, expected: dict[str, int]) -> dict[str, int]:
    """Every device's seqs 0..expected-1 are in the journal's outbox exactly once (read back
    through the journal: the readings are in blocks)."""
    seqs: dict[str, list[int]] = {}
    for r in journal.read_readings(0, 1 << 62):
        seqs.setdefault(r.device, []).append(r.seq)
    lost = 0
    extra = 0
    for device, want in expected.items():
        got = seqs.get(device, [])
        distinct = set(got)
        extra += len(got) - len(distinct)
        lost += want - len(distinct & set(range(want)))
    return {"expected": sum(expected.values()), "lost": lost, "extra": extra}


def per_device(count: int, devices: Sequence[str], batch: int = 1) -> dict[str, int]:
    n = len(devices)
    return {d: (count // n + (1 if k < count % n else 0)) * batch for k, d in enumerate(devices)}


# ---------------------------------------------------------------------------------------------
# Stage 1: drain a pre-loaded persistent session


async def drain_once(
    folder: Path,
    *,
    qos: int,
    messages: int,
    batch: int,
    tag: str,
    profile: str = "",
    history_url: str | None = None,
    db_pid: int | None = None,
) -> dict[str, Any]:
    """One drain. With ``history_url`` the historian writes to that server (InfluxDB v2 write
    API) while the controller ingests, and the run also times until the outbox is empty, i.e.
    every reading is in the database (``history_done_s``); ``db_pid`` is that server's process,
    whose CPU is then reported apart from "other CPU". QoS 0 is queued for the offline
    session only for a QoS 0 drain (``BROKER_CONFIG``)."""
    async with broker_in(folder, queue_qos0=qos == 0) as broker:
        site = make_site(folder, broker.port, f"bench-{tag}", history_url=history_url)
        rt = BenchRuntime(site)
        async with running(rt):
            pass  # the persistent session now exists at the broker
        devices = device_names(DEVICES)
        enc = encode_readings(devices, messages, qos=qos, batch=batch)
        load_s = await asyncio.to_thread(publish_all, broker.port, enc, qos=qos)
        bytes_in = len(enc.buf)
        del enc
        rt = BenchRuntime(site)
        rt.expect(messages)
        profiler = Profiler(profile, folder) if profile else None
        if profiler is not None:
            await profiler.start()
        broker_cpu0, db_cpu0 = cpu_of(broker.pid), cpu_of(db_pid)
        machine_cpu = MachineCpu()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        up_after: list[float] = []
        lag = LoopLag()
        lag.start()

        async def note_up() -> None:
            await rt.link.wait_up(600)
            up_after.append(time.perf_counter() - wall0)

        history_done_s: float | None = None
        async with running(rt, wait_up=False):
            up_task = asyncio.create_task(note_up(), name="bench-note-up")
            complete = await rt.wait_reached()
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            if rt.history is not None:
                history = rt.history
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(120):
                        await history.wait_for(lambda: rt.journal.outbox_rows == 0)
                        history_done_s = time.perf_counter() - wall0
            cpu_all = time.process_time() - cpu0
            loop_lag = await lag.stop()
            broker_cpu = cpu_of(broker.pid) - broker_cpu0
            db_cpu = cpu_of(db_pid) - db_cpu0
            measured_s = time.perf_counter() - wall0  # the drain, and the history wait if any
            rest = machine_cpu.delta(cpu_all + broker_cpu + db_cpu)
            hot = await profiler.stop() if profiler is not None else None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(up_task, 30)
            if not rt.link.session_present:
                raise RuntimeError("the controller's persistent session was not resumed")
            if history_url is None:
                check = verify_journal(rt.journal, per_device(messages, devices, batch))
            else:  # the historian deletes what the database confirmed: count there instead
                check = {"expected": messages * batch, "lost": 0, "extra": 0, "unchecked": 1}
        got = rt.ingest.messages
        if not complete:
            # Some messages never came (QoS 0 lost on a reconnect): rate up to the last one.
            wall = rt.last_group_at - wall0
        result: dict[str, Any] = {
            "stage": "drain",
            "qos": qos,
            "readings_per_msg": batch,
            "messages": messages,
            "received": got,
            "complete": complete,
            "preload_s": load_s,
            "payload_mb": bytes_in / 1e6,
            "wall_s": wall,
            "first_to_last_s": rt.last_group_at - rt.first_group_at,
            "link_up_after_s": up_after[0] if up_after else None,
            "link_connects": rt.link.stats.connects,
            "msg_s": got / wall,
            "readings_s": rt.ingest.readings / wall,
            "cpu_s": cpu,
            "cpu_us_per_msg": cpu / max(got, 1) * 1e6,
            "cpu_us_per_reading": cpu / max(rt.ingest.readings, 1) * 1e6,
            "controller_cpu_pct": cpu / wall * 100,
            "broker_cpu_pct": broker_cpu / measured_s * 100,
            "other_cpu_pct": rest["other_cpu_s"] / measured_s * 100,
            "steal_pct": rest["steal_s"] / measured_s * 100,
            "groups": rt.groups,
            "avg_group": got / max(rt.groups, 1),
            "commits": rt.ingest.commits,
            "rejected": dict(rt.ingest.rejected),
            "journal": check,
            "loop_lag": loop_lag,
        }
        if history_url is not None:
            result["history_done_s"] = history_done_s
            result["history_points"] = (
                rt.history.stats.points_written if rt.history is not None else 0
            )
            result["history_readings_s"] = (
                rt.ingest.readings / history_done_s if history_done_s else 0.0
            )
            result["cpu_us_per_msg_with_history"] = cpu_all / max(got, 1) * 1e6
            result["db_cpu_pct"] = db_cpu / measured_s * 100
        if hot is not None:
            result["profile"] = hot
        return result


async def stage_drain(
    base: Path, *, qos: int, messages: int, batch: int, runs: int
) -> dict[str, Any]:
    label = f"drain QoS {qos}, {messages:,} msgs × {batch} reading{'s' if batch > 1 else ''}"
    results = []
    for run in range(1, runs + 1):
        folder = base / f"drain-q{qos}-b{batch}-r{run}"
        r = await drain_once(folder, qos=qos, messages=messages, batch=batch, tag=f"d{qos}{batch}")
        results.append(r)
        say(
            f"  {label}, run {run}/{runs}: {r['msg_s']:,.0f} msg/s, {r['readings_s']:,.0f} "
            f"readings/s, {r['cpu_us_per_msg']:.1f} µs CPU/msg, avg group {r['avg_group']:.0f}, "
            f"mosquitto {r['broker_cpu_pct']:.0f}% CPU, other {r['other_cpu_pct']:.0f}%, "
            f"lost {r['journal']['lost']}, link UP after {r['link_up_after_s'] or 0:.1f} s, "
            f"{r['link_connects']} connect(s)" + ("" if r["complete"] else "  INCOMPLETE")
        )
        shutil.rmtree(folder, ignore_errors=True)
    best = _median_run(results, "msg_s")
    best["runs"] = runs
    best["msg_s_all"] = [r["msg_s"] for r in results]
    best["lost_all"] = [r["journal"]["lost"] for r in results]
    best["connects_all"] = [r["link_connects"] for r in results]
    best["label"] = label
    return best


def _median_run(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    ordered = sorted(results, key=lambda r: float(r[key]))
    return dict(ordered[(len(ordered) - 1) // 2])


# ---------------------------------------------------------------------------------------------
# Children: load generator and latency probe


class Child:
    """A child process speaking the READY / GO / SENT / DONE line protocol on stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: dict[str, dict[str, Any]] = {}

    @classmethod
    async def start(cls, *argv: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def expect(self, word: str, timeout_s: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while word not in self.lines:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"child {self.proc.pid} exited before {word}")
                key, _, body = line.decode().strip().partition(" ")
                self.lines[key] = json.loads(body) if body else {}
        return self.lines[word]

    def tell(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")

    async def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(30):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def start_loadgen(
    port: int,
    rate: float,
    duration_s: float,
    *,
    qos: int = 1,
    devices: int = DEVICES,
    first_device: int = 0,
    client_id: str = "loadgen",
) -> Child:
    child = await Child.start(
        str(LOADGEN),
        "--port",
        str(port),
        "--rate",
        str(rate),
        "--duration",
        str(duration_s),
        "--devices",
        str(devices),
        "--first-device",
        str(first_device),
        "--qos",
        str(qos),
        "--client-id",
        client_id,
    )
    await child.expect("READY")
    return child


# ---------------------------------------------------------------------------------------------
# Stage 2: live paced load


async def stage_live(
    base: Path, *, rate: float, duration_s: float, qos: int, shipped: bool = False
) -> dict[str, Any]:
    folder = base / f"live-q{qos}-{int(rate)}{'-shipped' if shipped else ''}"
    async with broker_in(folder, shipped=shipped) as broker:
        site = make_site(folder, broker.port, f"bench-live-{qos}-{int(rate)}")
        rt = BenchRuntime(site)
        async with running(rt):
            child = await start_loadgen(broker.port, rate, duration_s, qos=qos)
            total = int(rate * duration_s)
            rt.expect(total)
            samples: list[tuple[float, int]] = []
            cpu0, broker0 = time.process_time(), cpu_of(broker.pid)
            machine_cpu = MachineCpu()
            lag = LoopLag()
            lag.start()
            t_go = time.perf_counter()
            child.tell("GO")

            async def sample() -> None:
                while True:
                    await asyncio.sleep(0.25)  # sampling period of the backlog curve
                    samples.append((time.perf_counter() - t_go, rt.ingest.messages))

            sampler = asyncio.create_task(sample(), name="bench-backlog-sampler")
            sent = await child.expect("SENT", duration_s + 120)
            t_sent = time.perf_counter()
            applied_at_sent = rt.ingest.messages
            cpu_sent = time.process_time() - cpu0
            broker_cpu = cpu_of(broker.pid) - broker0
            gen_cpu = float(sent["cpu_s"])  # the child's own count: it may have exited by now
            rest = machine_cpu.delta(cpu_sent + broker_cpu + gen_cpu)
            complete = await rt.wait_reached()
            t_all = time.perf_counter()
            cpu_all = time.process_time() - cpu0
            loop_lag = await lag.stop()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            done = await child.expect("DONE")
            await child.close()
            devices = device_names(DEVICES)
            check = verify_journal(rt.journal, per_device(int(sent["sent"]), devices))
            gaps = sum(info.missing_readings for info in rt.ingest.devices.values())
        window = t_sent - t_go
        sent_n = int(sent["sent"])
        max_backlog = max(
            (min(sent_n, int(rate * t)) - n for t, n in samples if t <= window), default=0
        )
        backlog_end = sent_n - applied_at_sent
        consumer_rate = applied_at_sent / window
        kept_up = (
            complete and backlog_end <= rate * 0.25 and consumer_rate >= 0.95 * sent_n / window
        )
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "stage": "live",
        "qos": qos,
        "target_msg_s": rate,
        "duration_s": duration_s,
        "sent": sent_n,
        "publisher_msg_s": sent["send_rate"],
        "publisher_max_lag_s": sent["max_lag_s"],
        "consumer_msg_s": consumer_rate,
        "controller_cpu_pct": cpu_sent / window * 100,
        "cpu_us_per_msg": cpu_all / max(rt.ingest.messages, 1) * 1e6,
        "broker_cpu_pct": broker_cpu / window * 100,
        "loadgen_cpu_pct": gen_cpu / window * 100,
        "other_cpu_pct": rest["other_cpu_s"] / window * 100,
        "steal_pct": rest["steal_s"] / window * 100,
        "backlog_at_end": backlog_end,
        "max_backlog": max_backlog,
        "drain_after_s": t_all - t_sent,
        "complete": complete,
        "kept_up": kept_up,
        "received": rt.ingest.messages,
        "seq_gaps_missing": gaps,
        "link_connects": rt.link.stats.connects,
        "rejected": dict(rt.ingest.rejected),
        "avg_group": rt.ingest.messages / max(rt.groups, 1),
        "journal": check,
        "publisher_all_acked": bool(done.get("all_acked", 1.0)),
        "broker": "shipped settings, autosave_interval 1000" if shipped else "benchmark",
        "loop_lag": loop_lag,
    }


# ---------------------------------------------------------------------------------------------
# Stage 3: reading → alert latency under background load

PROBE_DEVICE = "s0"
PROBE_SKU = "K0"
HIGH_UNITS = 30  # far above the reorder point 10
LOW_UNITS = 2  # at or below safety stock 3: class "critical"


async def stage_latency(
    base: Path,
    *,
    rate: float,
    samples: int,
    gap_s: float = 0.001,
    wal_autocheckpoint: int | None = None,
) -> dict[str, Any]:
    folder = base / "latency"
    async with broker_in(folder) as broker:
        site = make_site(folder, broker.port, "bench-latency")
        rt = BenchRuntime(site)
        timings = rt.instrument()
        async with running(rt):
            if wal_autocheckpoint is not None:
                rt.journal.db.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
            # Samples take about 20 ms each. The probe stops sampling after ``sampling_s`` (a
            # controller that cannot keep up makes each sample wait up to its 5 s time-out), and
            # the generator (which encodes all its packets up front) outlasts that.
            sampling_s = samples * 0.04 + 10
            budget_s = sampling_s + 30
            gen = await start_loadgen(
                broker.port, rate, sampling_s + 5, devices=DEVICES - 1, first_device=1
            )
            probe = await Child.start(
                str(SELF),
                "_probe",
                "--port",
                str(broker.port),
                "--samples",
                str(samples),
                "--gap-s",
                str(gap_s),
                "--max-s",
                str(sampling_s),
            )
            await probe.expect("READY")
            gen.tell("GO")
            rt.expect(int(rate))  # warm-up: one second's worth of background load applied
            await rt.wait_reached()
            cpu0, t0, n0 = time.process_time(), time.perf_counter(), rt.ingest.messages
            lag = LoopLag()
            lag.start()
            probe.tell("GO")
            result = await probe.expect("RESULT", budget_s)
            cpu = time.process_time() - cpu0
            wall = time.perf_counter() - t0
            loop_lag = await lag.stop()
            applied = rt.ingest.messages - n0
            probe_msgs = 3 * (len(result["samples"]) + result["timeouts"])
            background = (rt.ingest.messages - n0 - probe_msgs) / wall
            gen.tell("STOP")
            sent = await gen.expect("DONE")
            await gen.close()
            await probe.close()
        timings.close()
    shutil.rmtree(folder, ignore_errors=True)
    pairs: list[tuple[float, float]] = result["samples"]  # (perf_counter at publish, ms)
    lat = sorted(ms for _, ms in pairs)
    t_first = pairs[0][0] if pairs else 0.0
    t_last = pairs[-1][0] + pairs[-1][1] / 1000 if pairs else 0.0
    slow_cut = _pct(lat, 99) if lat else 0.0
    slow = [(t, ms) for t, ms in pairs if ms >= slow_cut]

    def explained(spans: list[tuple[float, float]]) -> int:
        return sum(1 for t, ms in slow if overlaps(spans, t, t + ms / 1000, 0.002))

    return {
        "stage": "latency",
        "background_target_msg_s": rate,
        "background_msg_s": background,
        "background_sent": sent.get("sent", 0),
        "samples": len(lat),
        "samples_planned": samples,
        "stopped_early": bool(result.get("stopped_early")),
        "timeouts": result["timeouts"],
        "p50_ms": _pct(lat, 50),
        "p90_ms": _pct(lat, 90),
        "p99_ms": _pct(lat, 99),
        "max_ms": lat[-1] if lat else float("nan"),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
        "controller_cpu_pct": cpu / wall * 100,
        "cpu_ms_per_1k_readings": cpu / max(applied, 1) * 1e6,
        "loop_lag": loop_lag,
        "gap_between_readings_ms": gap_s * 1000,
        "wal_autocheckpoint": wal_autocheckpoint,
        "commits": Timings.summary(timings.commits, t_first, t_last),
        "ticks": Timings.summary(timings.ticks, t_first, t_last),
        "gcs": Timings.summary(timings.gcs, t_first, t_last),
        "slowest_1pct": {
            "count": len(slow),
            "from_ms": slow_cut,
            "overlap_commit_over_2ms": explained(timings.commits),
            "overlap_tick_over_2ms": explained(timings.ticks),
            "overlap_gc_over_2ms": explained(timings.gcs),
        },
    }


def _pct(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


async def probe_main(port: int, samples: int, gap_s: float, max_s: float = 3600.0) -> None:
    """Child process: drives shelf sh0 (scale s0, SKU K0) and times the alert messages.

    Each sample publishes three readings at the new level ``gap_s`` apart (the first is held
    as a suspected spike, the second confirms the step and the shelf is SETTLING, the third
    settles it); the clock starts just before the third is written to the socket and stops
    when the alert state of K0 with the expected class arrives at this process's subscriber.
    Sampling stops after ``max_s`` even if fewer than ``samples`` were taken.
    """
    loop = asyncio.get_running_loop()
    waiting: list[tuple[frozenset[str], asyncio.Future[float]]] = []
    alert_topic = f"fh/t/alerts/{PROBE_SKU}"

    def on_alert(msgs: list[MqttMessage]) -> None:
        now = time.perf_counter()
        for m in msgs:
            if m.retain:
                continue  # the retained state sent on subscribe, not a new transition
            state = orjson.loads(m.payload)["state"]
            for states, fut in waiting:
                if state in states and not fut.done():
                    fut.set_result(now)
        sub.ack([m.packet_id for m in msgs])

    sub = MqttLink(
        MqttLinkConfig(
            port=port,
            client_id="probe-sub",
            clean_start=True,
            session_expiry_s=0,
            subscriptions=((alert_topic, 1),),
        ),
        on_alert,
        name="probe-sub",
    )
    pub = MqttLink(
        MqttLinkConfig(port=port, client_id="probe-pub", clean_start=True, session_expiry_s=0),
        lambda msgs: None,
        name="probe-pub",
    )
    seq = 0
    topic = f"fh/t/Z/scale/{PROBE_DEVICE}"

    async def set_level(units: int, expect: frozenset[str]) -> tuple[float, float] | None:
        """Publish three readings at ``units``; ``(publish time of the third, ms to alert)``."""
        nonlocal seq
        fut: asyncio.Future[float] = loop.create_future()
        waiting.append((expect, fut))
        t_pub = 0.0
        for i in range(3):
            if i:
                await asyncio.sleep(gap_s)
            payload = orjson.dumps(
                {"device": PROBE_DEVICE, "seq": seq, "ts": time.time(), "grams": grams(units)}
            )
            seq += 1
            t_pub = time.perf_counter()
            pub.publish(topic, payload, qos=1)
        try:
            async with asyncio.timeout(5):
                t_recv = await fut
        except TimeoutError:
            return None
        finally:
            waiting.remove((expect, fut))
        return t_pub, (t_recv - t_pub) * 1000

    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sub.run(), name="probe-sub.run")
        tg.create_task(pub.run(), name="probe-pub.run")
        await sub.wait_up(10)
        await pub.wait_up(10)
        ok = frozenset({"ok"})
        low = frozenset({"low", "critical", "out"})
        if await set_level(HIGH_UNITS, ok) is None:
            raise RuntimeError("no initial alert state from the controller")
        print("READY", flush=True)
        while (await stdin.readline()).strip() != b"GO":
            pass
        pairs: list[tuple[float, float]] = []
        timeouts = 0
        high = True
        rng = random.Random(1)
        stop_at = time.monotonic() + max_s
        stopped_early = False
        for _ in range(samples):
            if time.monotonic() > stop_at:
                stopped_early = True
                break
            high = not high
            sample = await set_level(HIGH_UNITS if high else LOW_UNITS, ok if high else low)
            if sample is None:
                timeouts += 1
            else:
                pairs.append(sample)
            await asyncio.sleep(rng.uniform(0.005, 0.02))  # decorrelate from group commits
        result = {"samples": pairs, "timeouts": timeouts, "stopped_early": stopped_early}
        print("RESULT " + json.dumps(result), flush=True)
        await sub.disconnect()
        await pub.disconnect()


# ---------------------------------------------------------------------------------------------
# Stage 5: in-process cost breakdown by group size (no broker, no sockets)


class _NullLink:
    epoch = 1

    def ack(self, packet_ids: Sequence[int], epoch: int | None = None) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _NullJournal:
    def commit(self, *args: Any, **kwargs: Any) -> None:
        pass

    def has_reading(self, device: str, epoch: int, seq: int, ts_s: float) -> bool:
        return False


def stage_breakdown(
    base: Path, *, messages: int, groups: Sequence[int] = (8, 40, 400, 3000), repeat: int = 3
) -> dict[str, Any]:
    """IngestService fed directly with parsed MQTT 5 PUBLISH groups of a fixed size, once with
    the real SQLite journal and once with a journal that does nothing: CPU per message of the
    link's packet parser, of ingest (parse, validate, dedup, domain apply) and of the journal
    commit, by group size. This is what the controller does per socket read, minus the
    sockets and the event loop."""
    devices = device_names(DEVICES)
    seqs = dict.fromkeys(devices, 0)
    ts0 = time.time()
    packets = []
    for i in range(messages):
        device = devices[i % DEVICES]
        seq = seqs[device]
        seqs[device] = seq + 1
        payload = b'{"device":"%s","seq":%d,"ts":%.4f,"grams":%.1f}' % (
            device.encode(),
            seq,
            ts0 + i / 40_000,
            steady_grams(seq, 500),
        )
        packets.append(
            encode_publish(f"fh/t/Z/scale/{device}", payload, 1, False, i % 65_535 + 1, 5)
        )
    rows = []
    for size in groups:
        chunks = [b"".join(packets[i : i + size]) for i in range(0, messages, size)]
        cpu: dict[str, float] = {}
        for kind in ("sqlite", "null") * repeat:
            folder = base / f"breakdown-{size}-{kind}"
            site = make_site(folder, 1883, "bench-breakdown")
            journal: Any = _NullJournal()
            if kind == "sqlite":
                journal = Journal(site.journal.path, synchronous=site.journal.synchronous)
                journal.open()
            ingest = IngestService(
                IngestSettings.from_site(site),
                journal,
                _NullLink(),
                lambda events: None,
                shelf_specs=shelf_specs(site),
            )
            parser = PacketParser(5)
            parse_s = 0.0
            t0 = time.process_time()
            for chunk in chunks:
                p0 = time.process_time()
                msgs = parser.feed(chunk)
                parse_s += time.process_time() - p0
                ingest.on_messages(msgs)
            took = time.process_time() - t0
            if took < cpu.get(kind, float("inf")):  # best of ``repeat``: least disturbed
                cpu[kind] = took
                cpu[f"{kind}_parse"] = parse_s
            if kind == "sqlite":
                journal.close()
            if ingest.readings != messages:
                raise RuntimeError(f"breakdown: {ingest.readings} of {messages} applied")
            shutil.rmtree(folder, ignore_errors=True)
        parse_us = cpu["null_parse"] / messages * 1e6
        null_us = cpu["null"] / messages * 1e6
        total_us = cpu["sqlite"] / messages * 1e6
        rows.append(
            {
                "group": size,
                "total_us": total_us,
                "link_parse_us": parse_us,
                "ingest_us": null_us - parse_us,
                "journal_us": total_us - null_us,
            }
        )
    return {"stage": "breakdown", "messages": messages, "repeat": repeat, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Stage 4: hot spots


class Profiler:
    """py-spy attached to this process (sampling, low overhead) or cProfile as a fallback."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind = kind if kind != "auto" else ("py-spy" if _py_spy() else "cprofile")
        self.out = folder / "profile.txt"
        self.proc: asyncio.subprocess.Process | None = None
        self.cprofile: Any = None

    async def start(self) -> None:
        if self.kind == "py-spy":
            self.proc = await asyncio.create_subprocess_exec(
                _py_spy() or "py-spy",
                "record",
                "--pid",
                str(os.getpid()),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(self.out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)  # let py-spy attach before the drain starts
        else:
            import cProfile

            self.cprofile = cProfile.Profile()
            self.cprofile.enable()

    async def stop(self) -> dict[str, Any]:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(30):
                await self.proc.wait()
            return {"tool": "py-spy", **_collapse(self.out.read_text())}
        self.cprofile.disable()
        import pstats

        stats = pstats.Stats(self.cprofile)
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values()) or 1.0
        rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)
        top_self = [(f"{f[2]} ({_short(f[0])}:{f[1]})", v[2] / total * 100) for f, v in rows[:25]]
        rows = sorted(raw.items(), key=lambda kv: kv[1][3], reverse=True)
        top_total = [(f"{f[2]} ({_short(f[0])}:{f[1]})", v[3] / total * 100) for f, v in rows[:40]]
        return {"tool": "cProfile", "self": top_self, "total": top_total, "samples": 0}


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _short(path: str) -> str:
    for marker in ("/work/main/", "site-packages/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _collapse(text: str) -> dict[str, Any]:
    """py-spy raw output (``frame;frame;… count``) → % of samples by function, self and total."""
    self_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        if any("_bootstrap_inner (" in f for f in frames):
            continue  # only the event loop thread: the others here wait (waitpid, executor)
        samples += count
        leaf = frames[-1]
        if leaf.startswith("__create_fn__.<locals>.__init__") and len(frames) > 1:
            # A dataclass-generated __init__: name the class from its call site's source line.
            leaf = f"{_constructed_class(frames[-2])}.__init__ (dataclass) at {frames[-2]}"
            self_line[leaf] += count
            self_fn[leaf] += count
        else:
            self_line[leaf] += count
            self_fn[_function(leaf)] += count
        for fn in {_function(f) for f in frames}:
            total_fn[fn] += count
    pct = 100.0 / max(samples, 1)
    return {
        "samples": samples,
        "self": [(k, v * pct) for k, v in self_fn.most_common(25)],
        "self_lines": [(k, v * pct) for k, v in self_line.most_common(25)],
        "total": [(k, v * pct) for k, v in total_fn.most_common(40)],
    }


def _constructed_class(frame: str) -> str:
    """``_accept (controller/services/ingest.py:291)`` → the capitalised callee on that line."""
    _, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    if not line.isdigit():
        return "?"
    text = linecache.getline(str(ROOT / path), int(line))
    names = re.findall(r"\b([A-Z][A-Za-z0-9_]*)\(", text)
    return names[-1] if names else "?"


def _function(frame: str) -> str:
    """``name (path:line)`` → ``name (path)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mosq = subprocess.run([MOSQUITTO_BIN, "-h"], capture_output=True, text=True, check=False)
    mosq_version = next(
        (ln.strip() for ln in (mosq.stdout + mosq.stderr).splitlines() if "version" in ln), "?"
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "sqlite": sqlite3.sqlite_version,
        "mosquitto": mosq_version,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


@dataclass
class Report:
    mode: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    drains: list[dict[str, Any]] = field(default_factory=list)
    live: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    breakdown: dict[str, Any] | None = None
    verdicts: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def judge(self) -> None:
        def find(qos: int, batch: int) -> dict[str, Any] | None:
            return next(
                (d for d in self.drains if d["qos"] == qos and d["readings_per_msg"] == batch),
                None,
            )

        out: list[tuple[str, str, str, bool]] = []
        q1 = find(1, 1)
        if q1:
            out.append(
                (
                    "QoS 1 single-reading drain",
                    "≥ 30,000 msg/s",
                    f"{q1['msg_s']:,.0f} msg/s",
                    q1["msg_s"] >= TARGETS["qos1_msg_s"],
                )
            )
            out.append(
                (
                    "controller CPU per message (QoS 1 drain)",
                    "≤ 25 µs",
                    f"{q1['cpu_us_per_msg']:.1f} µs",
                    q1["cpu_us_per_msg"] <= TARGETS["cpu_us_per_msg"],
                )
            )
        q0 = find(0, 1)
        live0 = [r for r in self.live if r["qos"] == 0 and r["journal"]["lost"] == 0]
        q0_rates: list[tuple[float, str]] = []
        if q0 and q0["complete"]:
            q0_rates.append((q0["msg_s"], "drain"))
        if live0:
            best0 = max(live0, key=lambda r: float(r["consumer_msg_s"]))
            q0_rates.append(
                (best0["consumer_msg_s"], f"live at {best0['target_msg_s']:,.0f} msg/s offered")
            )
        if q0 and any(q0.get("lost_all", [q0["journal"]["lost"]])):
            lost = q0.get("lost_all", [q0["journal"]["lost"]])
            out.append(
                (
                    f"QoS 0 drain of a queued backlog ({len(lost)} runs)",
                    "all delivered",
                    "lost " + ", ".join(f"{n:,}" for n in lost) + f" of {q0['messages']:,}",
                    False,
                )
            )
        if q0_rates:
            rate0, source = max(q0_rates)
            out.append(
                (
                    "QoS 0 single-reading ingest",
                    "≥ 50,000 msg/s",
                    f"{rate0:,.0f} msg/s ({source})",
                    rate0 >= TARGETS["qos0_msg_s"],
                )
            )
        for d in self.drains:
            if d["readings_per_msg"] > 1:
                out.append(
                    (
                        f"batched drain ({d['readings_per_msg']} readings/msg)",
                        "≥ 100,000 readings/s",
                        f"{d['readings_s']:,.0f} readings/s",
                        d["readings_s"] >= TARGETS["batched_readings_s"],
                    )
                )
        live_ok = [r for r in self.live if r["qos"] == 1 and r["kept_up"]]
        if self.live:
            best = max((r["target_msg_s"] for r in live_ok), default=0)
            out.append(
                (
                    "live QoS 1: highest paced rate kept up with, 0 lost",
                    "≥ 30,000 msg/s",
                    f"{best:,.0f} msg/s",
                    best >= TARGETS["qos1_msg_s"]
                    and all(r["journal"]["lost"] == 0 for r in self.live if r["qos"] == 1),
                )
            )
        if self.latency:
            lat = self.latency
            out.append(
                (
                    f"reading → alert p99 at {lat['background_target_msg_s']:,.0f} msg/s",
                    "≤ 5 ms",
                    f"{lat['p99_ms']:.2f} ms",
                    lat["p99_ms"] <= TARGETS["alert_p99_ms"] and not lat["timeouts"],
                )
            )
        self.verdicts = out

    def markdown(self) -> str:
        m = self.machine
        lines = [
            f"# Ingest end-to-end benchmark ({self.mode})",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, Linux "
            f"{m['kernel']}, Python {m['python']}, SQLite {m['sqlite']}, {m['mosquitto']}; "
            f"load average {m['load_avg_1m_at_start']} at start. The controller, mosquitto "
            "and the load generator share these CPUs; 'other CPU' is what the rest of the "
            "machine used meanwhile (core-seconds per second, %).",
            "",
            "## Targets",
            "",
            "| what | target | measured | met |",
            "|---|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} | {'yes' if ok else 'NO'} |" for a, b, c, ok in self.verdicts]
        lines += [
            "",
            "## Drain of a pre-loaded persistent session (durable: PUBACK after commit)",
            "",
            "| QoS | msgs × readings | msg/s | readings/s | controller CPU µs/msg "
            "(µs/reading) | controller CPU | mosquitto CPU | other CPU | avg group | "
            "runs: msg/s | runs: lost | runs: link connects |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in self.drains:
            lines.append(
                f"| {d['qos']} | {d['messages']:,} × {d['readings_per_msg']} | "
                f"{d['msg_s']:,.0f} | {d['readings_s']:,.0f} | {d['cpu_us_per_msg']:.1f} "
                f"({d['cpu_us_per_reading']:.2f}) | {d['controller_cpu_pct']:.0f}% | "
                f"{d['broker_cpu_pct']:.0f}% | {d['other_cpu_pct']:.0f}% | {d['avg_group']:.0f} | "
                + ", ".join(f"{x:,.0f}" for x in d["msg_s_all"])
                + " | "
                + ", ".join(f"{x:,}" for x in d["lost_all"])
                + " | "
                + ", ".join(str(x) for x in d["connects_all"])
                + " |"
            )
        if self.live:
            lines += [
                "",
                "## Live paced load (publisher in a child process)",
                "",
                "| QoS | target msg/s | sent msg/s | consumed msg/s | controller CPU | "
                "µs CPU/msg | avg group | mosquitto CPU | loadgen CPU | other CPU | "
                "max backlog | backlog at end | kept up | lost |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in self.live:
                lines.append(
                    f"| {r['qos']} | {r['target_msg_s']:,.0f} | {r['publisher_msg_s']:,.0f} | "
                    f"{r['consumer_msg_s']:,.0f} | {r['controller_cpu_pct']:.0f}% | "
                    f"{r['cpu_us_per_msg']:.1f} | {r['avg_group']:.0f} | "
                    f"{r['broker_cpu_pct']:.0f}% | "
                    f"{r['loadgen_cpu_pct']:.0f}% | {r['other_cpu_pct']:.0f}% | "
                    f"{r['max_backlog']:,} | "
                    f"{r['backlog_at_end']:,} | {'yes' if r['kept_up'] else 'no'} | "
                    f"{r['journal']['lost']} |"
                )
        if self.latency:
            lat = self.latency
            lines += [
                "",
                "## Reading → alert latency",
                "",
                f"Background {lat['background_msg_s']:,.0f} msg/s (target "
                f"{lat['background_target_msg_s']:,.0f}); {lat['samples']} samples, "
                f"{lat['timeouts']} timeouts; controller CPU {lat['controller_cpu_pct']:.0f}%.",
                "",
                "| p50 | p90 | p99 | max | mean |",
                "|---|---|---|---|---|",
                f"| {lat['p50_ms']:.2f} ms | {lat['p90_ms']:.2f} ms | {lat['p99_ms']:.2f} ms | "
                f"{lat['max_ms']:.2f} ms | {lat['mean_ms']:.2f} ms |",
                "",
                "Controller activity during the samples (ms):",
                "",
                "| activity | count | p50 | p99 | max | > 2 ms |",
                "|---|---|---|---|---|---|",
            ]
            for name in ("commits", "ticks", "gcs"):
                a = lat[name]
                lines.append(
                    f"| {name} | {a['count']:,} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | "
                    f"{a['max_ms']:.2f} | {a['over_2ms']} |"
                )
            sl = lat["slowest_1pct"]
            lines += [
                "",
                f"The slowest {sl['count']} samples (≥ {sl['from_ms']:.2f} ms) overlapped a "
                f"journal commit > 2 ms {sl['overlap_commit_over_2ms']} times, a supervision "
                f"tick > 2 ms {sl['overlap_tick_over_2ms']} times, a GC > 2 ms "
                f"{sl['overlap_gc_over_2ms']} times.",
            ]
        if self.breakdown:
            lines += [
                "",
                "## In-process cost by group size (no broker; MQTT 5 PUBLISH bytes → parser → "
                f"IngestService → journal; {self.breakdown['messages']:,} single-reading "
                "messages over 100 devices)",
                "",
                "| messages per group (socket read) | total µs/msg | link parse | ingest "
                "(parse, validate, dedup, apply) | journal commit |",
                "|---|---|---|---|---|",
            ]
            for row in self.breakdown["rows"]:
                lines.append(
                    f"| {row['group']:,} | {row['total_us']:.1f} | {row['link_parse_us']:.1f} | "
                    f"{row['ingest_us']:.1f} | {row['journal_us']:.1f} |"
                )
        if self.profile:
            p = self.profile["profile"]
            lines += [
                "",
                f"## Hot spots ({p['tool']}, QoS 1 drain, {p['samples']:,} samples; the "
                f"profiled run drained at {self.profile['msg_s']:,.0f} msg/s)",
                "",
                "| self % | function |",
                "|---|---|",
            ]
            lines += [f"| {pct:.1f} | `{fn}` |" for fn, pct in p["self"][:15]]
            lines += ["", "| total % | function |", "|---|---|"]
            lines += [f"| {pct:.1f} | `{fn}` |" for fn, pct in p["total"][:25]]
        lines += ["", "Settings: `" + json.dumps(self.settings) + "`", ""]
        return "\n".join(lines)


def print_summary(report: Report) -> None:
    say("")
    say("=" * 100)
    say(report.markdown())


# ---------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> Report:
    quick = args.quick
    n1 = args.messages or (50_000 if quick else 200_000)
    nb = args.batch_messages or (4_000 if quick else 20_000)
    runs = args.runs or (1 if quick else 3)
    rates = args.rates or ([20_000, 40_000] if quick else [10_000, 20_000, 30_000, 40_000])
    rates0 = args.qos0_rates if args.qos0_rates is not None else [50_000]
    duration = args.duration or (4.0 if quick else 10.0)
    samples = args.samples or (200 if quick else 500)
    settings = {
        "messages": n1,
        "batch_messages": nb,
        "readings_per_batch": args.batch,
        "runs": runs,
        "live_rates_qos1": rates,
        "live_rates_qos0": rates0,
        "live_duration_s": duration,
        "latency_samples": samples,
        "latency_background_msg_s": args.latency_rate,
        "wal_autocheckpoint": args.wal_autocheckpoint,
        "connect_timeout_s": args.connect_timeout,
        "devices": DEVICES,
        "broker": f"tests/mosquitto.py config (persistence true, autosave_on_changes true, "
        f"max_queued_messages 1000000, max_inflight_messages 0) + {BROKER_CONFIG} (QoS 0 "
        "drains; QoS 1 drains: queue_qos0_messages false), "
        f"autosave_interval {autosave_interval}",
        "site": "tests/sites.write_small_site: 100 scales/shelves/SKUs, dwell_s 0, "
        "reporting_interval_s 60, MQTT 5, receive_maximum 4000, journal synchronous NORMAL",
    }
    report = Report("quick" if quick else "full", machine(), settings)
    base = Path(tempfile.mkdtemp(prefix="ingest-e2e-"))
    logging.basicConfig(
        level=logging.WARNING,
        filename=str(base / "controller.log"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    m = report.machine
    say(
        f"ingest e2e benchmark ({report.mode}): {m['nproc']} CPUs {m['cpu_model']}, Python "
        f"{m['python']}, {m['mosquitto']}; work folder {base}"
    )
    try:
        if "drain" in args.stages:
            say("[1/5] drain of a pre-loaded persistent session")
            for qos, count, batch in ((1, n1, 1), (1, nb, args.batch), (0, n1, 1)):
                report.drains.append(
                    await stage_drain(base, qos=qos, messages=count, batch=batch, runs=runs)
                )
        if "live" in args.stages:
            say("[2/5] live paced load")
            for qos, rate_list in ((1, rates), (0, rates0)):
                for rate in rate_list:
                    r = await stage_live(base, rate=rate, duration_s=duration, qos=qos)
                    report.live.append(r)
                    say(
                        f"  live QoS {qos} {rate:,.0f} msg/s for {duration:g} s: sent "
                        f"{r['publisher_msg_s']:,.0f} msg/s, consumed {r['consumer_msg_s']:,.0f}"
                        f" msg/s, controller {r['controller_cpu_pct']:.0f}% CPU "
                        f"({r['cpu_us_per_msg']:.1f} µs/msg), mosquitto "
                        f"{r['broker_cpu_pct']:.0f}%, loadgen {r['loadgen_cpu_pct']:.0f}%, other "
                        f"{r['other_cpu_pct']:.0f}%, max "
                        f"backlog {r['max_backlog']:,}, at end {r['backlog_at_end']:,}, kept up: "
                        f"{'yes' if r['kept_up'] else 'no'}, lost {r['journal']['lost']}"
                    )
        if "latency" in args.stages:
            say(f"[3/5] reading → alert latency at {args.latency_rate:,.0f} msg/s background")
            report.latency = await stage_latency(
                base,
                rate=args.latency_rate,
                samples=samples,
                wal_autocheckpoint=args.wal_autocheckpoint,
            )
            lat = report.latency
            c, sl = lat["commits"], lat["slowest_1pct"]
            say(
                f"  {lat['samples']} samples ({lat['timeouts']} timeouts), background "
                f"{lat['background_msg_s']:,.0f} msg/s: p50 {lat['p50_ms']:.2f} ms, p99 "
                f"{lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms; journal commits p50 "
                f"{c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, max {c['max_ms']:.1f} ms; "
                f"slowest {sl['count']} samples overlapped a >2 ms commit "
                f"{sl['overlap_commit_over_2ms']}×, tick {sl['overlap_tick_over_2ms']}×, "
                f"GC {sl['overlap_gc_over_2ms']}×"
            )
        if "breakdown" in args.stages:
            say("[4/5] in-process cost by group size (no broker)")
            report.breakdown = stage_breakdown(
                base, messages=12_000 if quick else 40_000, repeat=2 if quick else 3
            )
            for row in report.breakdown["rows"]:
                say(
                    f"  group {row['group']:>5,}: {row['total_us']:5.1f} µs/msg = link parse "
                    f"{row['link_parse_us']:.1f} + ingest {row['ingest_us']:.1f} + journal "
                    f"{row['journal_us']:.1f}"
                )
        if args.profile != "off" and "profile" in args.stages:
            say(f"[5/5] profile of a QoS 1 drain ({args.profile})")
            folder = base / "profile"
            report.profile = await drain_once(
                folder,
                qos=1,
                messages=max(n1, 200_000),
                batch=1,
                tag="prof",
                profile=args.profile,
            )
            p = report.profile["profile"]
            say(f"  {p['tool']}: {p['samples']:,} samples; top self time:")
            for fn, pct in p["self"][:10]:
                say(f"    {pct:5.1f}%  {fn}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report.judge()
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        p = argparse.ArgumentParser()
        p.add_argument("_probe")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--samples", type=int, required=True)
        p.add_argument("--gap-s", type=float, default=0.001)
        p.add_argument("--max-s", type=float, default=3600.0)
        a = p.parse_args()
        asyncio.run(probe_main(a.port, a.samples, a.gap_s, a.max_s))
        return
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="about a minute instead of several")
    parser.add_argument("--messages", type=int, help="single-reading drain size")
    parser.add_argument("--batch-messages", type=int, help="batched drain size (messages)")
    parser.add_argument("--batch", type=int, default=50, help="readings per batched message")
    parser.add_argument("--runs", type=int, help="drain runs per case (median reported)")
    parser.add_argument("--rates", type=_floats, help="live QoS 1 rates, e.g. 10000,20000")
    parser.add_argument("--qos0-rates", type=_floats, help="live QoS 0 rates ('' for none)")
    parser.add_argument("--duration", type=float, help="seconds per live rate")
    parser.add_argument("--samples", type=int, help="latency samples")
    parser.add_argument("--latency-rate", type=float, default=4_000.0)
    parser.add_argument(
        "--wal-autocheckpoint",
        type=int,
        help="experiment: set the journal's PRAGMA wal_autocheckpoint in the latency stage",
    )
    parser.add_argument(
        "--profile",
        choices=("off", "auto", "py-spy", "cprofile"),
        help="profile a QoS 1 drain (default: auto in the full run, off with --quick)",
    )
    parser.add_argument(
        "--stages",
        type=lambda s: s.split(","),
        default=["drain", "live", "latency", "breakdown", "profile"],
        help="comma-separated subset of drain,live,latency,breakdown,profile",
    )
    parser.add_argument(
        "--autosave-interval",
        type=int,
        default=AUTOSAVE_INTERVAL,
        help="mosquitto autosave_interval (changes, with autosave_on_changes); the shipped "
        "firmware-configs/mosquitto/mosquitto.conf uses 1000",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        help="experiment: the controller link's handshake timeout in s (default: as shipped)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    global autosave_interval, connect_timeout_s
    autosave_interval = args.autosave_interval
    connect_timeout_s = args.connect_timeout
    if args.profile is None:
        args.profile = "off" if args.quick else "auto"
    t0 = time.monotonic()
    # The main loop `floorhand run` makes: the control loop's work goes first.
    with asyncio.Runner(loop_factory=new_main_loop) as runner:
        report = runner.run(bench(args))
    print_summary(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ingest_e2e" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "mode": report.mode,
                "machine": report.machine,
                "settings": report.settings,
                "targets": TARGETS,
                "verdicts": report.verdicts,
                "drains": report.drains,
                "live": report.live,
                "latency": report.latency,
                "profile": report.profile,
                "breakdown": report.breakdown,
            },
            indent=1,
        )
    )
    (args.out / f"{stem}.md").write_text(report.markdown())
    say(f"\nwrote {args.out / stem}.json and .md in {time.monotonic() - t0:.0f} s")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    main()
