"""The runtime shortens the interpreter's thread switch interval while it runs (``[process]
switch_interval_ms``, default 0.2 ms) and gives the previous one back when it stops: the
control loop's and the HTTP loop's threads wait that long, not Python's 5 ms, for the
interpreter lock while ingest holds it. The same for the garbage collector's young-generation
threshold (``[process] gc_young_objects``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
from pathlib import Path

import httpx
import pytest

from controller import control as control_module
from controller import runtime as runtime_module
from controller.config import ConfigError, ProcessConfig, load_site
from controller.control import PRECEDENCE
from devices.link.state import LinkState
from tests.integration.test_api_ops import ops_server
from tests.mosquitto import MosquittoBroker
from tests.realtime import needs_fifo
from tests.sites import auth_headers, write_small_site


async def test_the_runtime_runs_with_the_sites_switch_interval_and_restores_it(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=1)
    site.write_text(site.read_text() + "\n[process]\nswitch_interval_ms = 0.5\n")
    before = sys.getswitchinterval()
    assert before != pytest.approx(0.0005)
    async with ops_server(site):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == before


def test_the_switch_interval_defaults_to_a_fifth_of_a_millisecond(tmp_path: Path) -> None:
    assert ProcessConfig().switch_interval_ms == 0.2
    site = write_small_site(tmp_path, mqtt_port=1883, scales=1)
    site.write_text(site.read_text() + "\n[process]\nswitch_interval_ms = 0.05\n")
    assert load_site(site).process.switch_interval_ms == 0.05


def test_the_realtime_priority_defaults_to_10_and_takes_0_to_49(tmp_path: Path) -> None:
    assert ProcessConfig().control_realtime_priority == 10
    site = write_small_site(tmp_path, mqtt_port=1883, scales=1)
    text = site.read_text()
    for ok in (0, 1, 49):
        site.write_text(text + f"\n[process]\ncontrol_realtime_priority = {ok}\n")
        assert load_site(site).process.control_realtime_priority == ok


@pytest.mark.parametrize(
    ("key", "bad_values"),
    [
        ("switch_interval_ms", ("0", "0.01", "101", "nan")),
        ("gc_young_objects", ("0", "699", "10000001", "1.5")),
        ("control_precedence_ms", ("-1", "101", "nan", "inf")),
        ("control_realtime_priority", ("-1", "50", "99", "1.5")),
    ],
)
def test_the_process_settings_are_bounded(
    tmp_path: Path, key: str, bad_values: tuple[str, ...]
) -> None:
    site = write_small_site(tmp_path, mqtt_port=1883, scales=1)
    text = site.read_text()
    for bad in bad_values:
        site.write_text(text + f"\n[process]\n{key} = {bad}\n")
        with pytest.raises(ConfigError, match=key):
            load_site(site)


@pytest.mark.parametrize("recancel_s", [0.0, runtime_module.RECANCEL_EVERY_S])
async def test_two_runtimes_at_once_leave_the_interval_as_it_was(
    tmp_path: Path, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch, recancel_s: float
) -> None:
    """The shortest interval any running runtime asks for; the one from before the first is
    back after the last, whichever stops first. And stopping one leaves the other running:
    its stop cancels again the tasks it started whose cancellation was lost, never another
    runtime's (with ``RECANCEL_EVERY_S`` 0 it does so at once; before, it cancelled every
    Floorhand task started since it began, the other runtime's included: this failed in 1 of
    ~10–30 runs, and always with 0)."""
    monkeypatch.setattr(runtime_module, "RECANCEL_EVERY_S", recancel_s)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_small_site(tmp_path / "a", mqtt_port=mosquitto.port, scales=1, client_id="fh-a")
    b = write_small_site(tmp_path / "b", mqtt_port=mosquitto.port, scales=1, client_id="fh-b")
    a.write_text(a.read_text() + "\n[process]\nswitch_interval_ms = 0.5\n")
    b.write_text(  # another site: not the same controller identity
        b.read_text().replace('id = "t"', 'id = "u"', 1) + "\n[process]\nswitch_interval_ms = 0.3\n"
    )
    before = sys.getswitchinterval()
    factory = asyncio.get_running_loop().get_task_factory()  # the runtimes record their tasks
    first, second = ops_server(a), ops_server(b)
    await first.__aenter__()
    try:
        second_srv = await second.__aenter__()
    except BaseException:
        await first.__aexit__(None, None, None)
        raise
    try:
        try:
            assert sys.getswitchinterval() == pytest.approx(0.0003)
        finally:
            await first.__aexit__(None, None, None)  # the first to start stops first
        assert sys.getswitchinterval() == pytest.approx(0.0003)  # b still runs
        assert second_srv.rt.link.state is LinkState.UP, "stopping the first stopped the second"
    finally:
        await second.__aexit__(None, None, None)
    assert sys.getswitchinterval() == before
    assert asyncio.get_running_loop().get_task_factory() is factory


async def test_the_runtime_runs_with_the_sites_gc_threshold_and_restores_it(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """``[process] gc_young_objects`` is Python's generation-0 threshold while the runtime
    runs (default 50,000: a full collection, which stops every thread, every few million
    allocations instead of every ~70,000); the previous thresholds are back after it."""
    assert ProcessConfig().gc_young_objects == 50_000
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=1)
    site.write_text(site.read_text() + "\n[process]\ngc_young_objects = 20000\n")
    before = gc.get_threshold()
    assert before[0] != 20_000
    async with ops_server(site):
        assert gc.get_threshold() == (20_000, *before[1:])
    assert gc.get_threshold() == before


async def test_the_runtime_lets_the_control_loop_go_first_for_as_long_as_the_site_says(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """``[process] control_precedence_ms`` (default 2 ms) is how long a main loop made by
    `new_main_loop` pauses for one burst of the control loop's work while the runtime runs
    (`controller.control.Precedence`); no pause before and after it; 0 turns it off."""
    assert ProcessConfig().control_precedence_ms == 2.0
    assert PRECEDENCE.max_pause_s == 0.0
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=1)
    async with ops_server(site) as srv:
        assert PRECEDENCE.max_pause_s == pytest.approx(0.002)
        async with httpx.AsyncClient(base_url=srv.base) as client:
            r = await client.get("/metrics", headers=auth_headers("engineer"))
        assert r.status_code == 200
        assert f"floorhand_main_loop_pauses_total {float(PRECEDENCE.pauses)}" in r.text
        assert "floorhand_main_loop_paused_seconds_total " in r.text
    assert PRECEDENCE.max_pause_s == 0.0
    site.write_text(site.read_text() + "\n[process]\ncontrol_precedence_ms = 0\n")
    assert load_site(site).process.control_precedence_ms == 0.0
    async with ops_server(site):
        assert PRECEDENCE.max_pause_s == 0.0


@needs_fifo
async def test_the_control_loop_runs_at_the_sites_realtime_priority_and_says_so(
    tmp_path: Path, mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """``[process] control_realtime_priority`` (default 10) is the control loop thread's
    SCHED_FIFO priority: logged at start and in /metrics; 0 is normal scheduling."""
    assert ProcessConfig().control_realtime_priority == 10
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=1)
    caplog.set_level(logging.INFO, logger="floorhand")
    async with ops_server(site) as srv:
        tid = srv.rt.control.call_blocking(threading.get_native_id)
        assert os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
        assert os.sched_getparam(tid).sched_priority == 10
        async with httpx.AsyncClient(base_url=srv.base) as client:
            r = await client.get("/metrics", headers=auth_headers("engineer"))
        assert r.status_code == 200
        assert "floorhand_control_loop_realtime_priority 10.0" in r.text
    assert "control loop: SCHED_FIFO priority 10" in caplog.text
    site.write_text(site.read_text() + "\n[process]\ncontrol_realtime_priority = 0\n")
    async with ops_server(site) as srv:
        tid = srv.rt.control.call_blocking(threading.get_native_id)
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER
        async with httpx.AsyncClient(base_url=srv.base) as client:
            r = await client.get("/metrics", headers=auth_headers("engineer"))
        assert "floorhand_control_loop_realtime_priority 0.0" in r.text


async def test_a_refused_realtime_priority_is_a_warning_and_the_controller_runs_on(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the right to SCHED_FIFO (no ``LimitRTPRIO``, not root) the controller starts
    with normal scheduling and a warning that says how to allow it."""

    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(control_module.os, "sched_setscheduler", refuse)
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, scales=1)
    async with ops_server(site) as srv:
        assert srv.rt.control.realtime_refused == "Operation not permitted"
        async with httpx.AsyncClient(base_url=srv.base) as client:
            r = await client.get("/metrics", headers=auth_headers("engineer"))
            assert (await client.get("/api/v1/ready")).status_code == 200
        assert "floorhand_control_loop_realtime_priority 0.0" in r.text
    warned = [r for r in caplog.records if "real-time priority 10 refused" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].levelno == logging.WARNING
    assert "LimitRTPRIO=10" in warned[0].getMessage()
