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
from tests.controller_proc import SHARED_SSL, ControllerProcess
from tests.integration.test_picking import ORDER, picking_site
from tests.integration.test_sensing_e2e import readings
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import auth_headers
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


class InstalledController(ControllerProcess):
    """``floorhand run`` from the virtualenv's script, in a working directory of its own, with
    no PYTHONPATH: nothing of the checkout is importable."""

    def __init__(self, site: Path, folder: Path, bin_dir: Path, workdir: Path) -> None:
        super().__init__(site, folder)
        self.bin_dir = bin_dir
        self.workdir = workdir

    def child_env(self) -> dict[str, str]:
        env = super().child_env()
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env

    async def spawn(self) -> None:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            str(self.bin_dir / "floorhand"),
            "run",
            str(self.site),
            stdout=log,
            stderr=log,
            env=self.child_env(),
            cwd=str(self.workdir),
        )
        log.close()
        self.starts += 1


async def test_installed_wheel_serves_the_dashboard_and_executes_a_pick(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    dist = tmp_path / "dist"
    dist.mkdir()
    wheel = await asyncio.to_thread(build_wheel, dist)
    built_s = time.monotonic() - t0
    bin_dir = await asyncio.to_thread(install_fresh, wheel, tmp_path / "venv")
    installed_s = time.monotonic() - t0 - built_s
    print(f"wheel built in {built_s:.1f} s, installed in {installed_s:.1f} s")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    where = await asyncio.to_thread(imported_from, bin_dir, workdir)
    assert Path(where).is_relative_to(tmp_path / "venv"), where  # not the checkout

    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
        site = picking_site(tmp_path, mosquitto.port, ch.port, sh.port)
        ctl = InstalledController(site, tmp_path, bin_dir, workdir)
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
