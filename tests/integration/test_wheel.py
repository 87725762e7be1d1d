"""The built wheel, installed as a site would install it: built from this checkout, installed
with its dependencies into a fresh virtualenv outside the checkout, and run as ``floorhand`` from
another working directory against a real mosquitto and the simulated PLCs. The register maps
and the dashboard must come from the wheel (package data), not from the checkout."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.sorter import SorterPlc
from tests.command_proc import CommandController
from tests.controller_proc import SHARED_SSL
from tests.integration.test_picking import ORDER, picking_site
from tests.integration.test_sensing_e2e import readings
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import auth_headers, write_small_site
from tests.waiting import wait_for_condition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 240.0


def run_tool(command: list[str], cwd: Path) -> None:
    """Run a build/install step; its output in the failure message."""
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of this checkout (the build backend of pyproject.toml, isolated)."""
    run_tool(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        cwd=out,
    )
    (wheel,) = out.glob("floorhand-*.whl")
    return wheel


def install_fresh(wheel: Path, venv: Path, extras: str = "") -> Path:
    """A new virtualenv (no system site-packages, no pip of its own) with ``wheel[extras]``
    and its dependencies installed by our pip (the pip cache is reused); its bin folder."""
    run_tool([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    run_tool(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-compile",  # bytecode is written on first import instead: half the time
            f"{wheel}{extras}",
        ],
        cwd=venv.parent,
    )
    return venv / "bin"


def imported_from(bin_dir: Path, workdir: Path) -> str:
    """The file ``controller`` is imported from by the virtualenv's Python in ``workdir``."""
    return subprocess.run(
        [str(bin_dir / "python"), "-c", "import controller; print(controller.__file__)"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def core_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout installed without extras into a fresh virtualenv; its bin
    folder. Built and installed once for this module's tests."""
    folder = tmp_path_factory.mktemp("wheel")
    t0 = time.monotonic()
    dist = folder / "dist"
    dist.mkdir()
    wheel = build_wheel(dist)
    built_s = time.monotonic() - t0
    bin_dir = install_fresh(wheel, folder / "venv")
    print(f"wheel built in {built_s:.1f} s, installed in {time.monotonic() - t0 - built_s:.1f} s")
    workdir = folder / "elsewhere"
    workdir.mkdir()
    where = imported_from(bin_dir, workdir)
    assert Path(where).is_relative_to(folder / "venv"), where  # not the checkout
    return bin_dir


def run_installed(bin_dir: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A command of the virtualenv's bin folder, in ``cwd``, without PYTHONPATH."""
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        timeout=60,
    )


def test_core_install_leaves_out_the_optional_packages_and_names_their_extra(
    core_install: Path, tmp_path: Path
) -> None:
    """paho-mqtt (the simulators), influxdb-client (the influxdb2 history backend) and amqtt
    (the demo's broker) are not in the core install; a feature that needs one says which extra
    to install. numpy is (the per-shelf state's columns)."""
    optional = ("paho", "influxdb_client", "amqtt")
    probe = f"import importlib.util as u; print(*[m for m in {optional!r} if u.find_spec(m)])"
    found = run_installed(core_install, ["python", "-c", probe], tmp_path)
    assert (found.returncode, found.stdout.strip()) == (0, ""), found
    core = run_installed(core_install, ["python", "-c", "import numpy"], tmp_path)
    assert core.returncode == 0, core

    site = write_small_site(tmp_path, mqtt_port=1883, history_backend=None)
    site.write_text(
        site.read_text()
        + '[history]\nbackend = "influxdb2"\nurl = "http://127.0.0.1:8086"\n'
        + 'org = "o"\nbucket = "b"\n'
    )
    for command in ("check-config", "run"):
        done = run_installed(core_install, ["floorhand", command, str(site)], tmp_path)
        assert done.returncode == 2, done
        assert "influxdb-client" in done.stderr, done.stderr
        assert "pip install 'floorhand[influxdb2]'" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr

    done = run_installed(core_install, ["python", "-m", "simulators", "plcs", str(site)], tmp_path)
    assert done.returncode == 2, done
    assert "pip install 'floorhand[sim]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


async def test_installed_wheel_serves_the_dashboard_and_executes_a_pick(
    core_install: Path, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    bin_dir = core_install
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
        site = picking_site(tmp_path, mosquitto.port, ch.port, sh.port)
        # Nothing of the checkout is importable: another directory, no PYTHONPATH.
        ctl = CommandController(
            site,
            tmp_path,
            [str(bin_dir / "floorhand")],
            cwd=workdir,
            drop_env=("PYTHONPATH", "VIRTUAL_ENV"),
        )
        await ctl.start(ready_timeout_s=30.0)
        try:
            async with httpx.AsyncClient(base_url=ctl.base, timeout=5.0, verify=SHARED_SSL) as c:
                page = await c.get("/dashboard/")
                assert page.status_code == 200, page.text
                assert page.headers["content-type"].startswith("text/html")
                assert "<script" in page.text
                script = await c.get("/dashboard/js/main.js")
                assert script.status_code == 200, script.text

                # The scale shows 30 units of K0; the pick of 2 goes to the sorter's lane.
                t_read = time.time() - 0.6
                await asyncio.to_thread(
                    paho_publish, mosquitto.port, readings("s0", 0, 30, 6, t_read)
                )
                body = {**ORDER, "lines": [{"sku": "K0", "qty": 2}]}
                headers = {**auth_headers("floor"), "Idempotency-Key": "wheel-1"}
                r = await wait_for_condition(  # until the controller counted the shelf
                    lambda: c.post("/api/v1/picks", json=body, headers=headers),
                    15.0,
                    what="the pick accepted (201)",
                    until=lambda r: r.status_code == 201,
                    interval_s=0.1,
                    context=ctl.tail,
                )
                oid, cmd_id = r.json()["order_id"], r.json()["tasks"][0]["cmd_id"]
                await sorter.wait_until(lambda: sorter.last_done_id == cmd_id, 20.0)
                assert sorter.last_result == "DIVERTED"
                assert sorter.executions[cmd_id] == 1

                # The picker took 2: the scale confirms, the order is SORTED.
                t_read = max(time.time() - 0.6, t_read + 0.6)
                await asyncio.to_thread(
                    paho_publish, mosquitto.port, readings("s0", 6, 28, 6, t_read)
                )
                order = await wait_for_condition(
                    lambda: ctl.get(f"/api/v1/orders/{oid}", role="supervisor"),
                    15.0,
                    what="the order SORTED",
                    until=lambda order: order["state"] == "SORTED",
                    interval_s=0.1,
                    context=ctl.tail,
                )
                assert order["tasks"][0]["scale_confirmed"] is True
        finally:
            assert await ctl.stop() == 0, ctl.tail()
    log = ctl.log_text()
    assert "RegisterMapError" not in log
    assert "dashboard assets not found" not in log
