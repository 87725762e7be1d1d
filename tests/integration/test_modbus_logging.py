"""A Modbus link logs its state changes once, like the MQTT link; pymodbus's own per-attempt
lines ("Failed to connect …", with frame dumps on errors) do not reach the log.

Before: with two PLCs unreachable pymodbus logged a warning for every connect attempt of each
(its repeat suppression only catches identical consecutive lines), about 4 lines a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devices.conveyor import ConveyorDriver
from devices.link.modbus import ModbusLink, ModbusLinkConfig
from devices.link.state import LinkState
from simulators.modbus_host import free_port

pytestmark = pytest.mark.timeout(60)

ATTEMPTS = 8
ROOT = Path(__file__).resolve().parents[2]


async def attempts(link: ModbusLink, n: int, timeout_s: float = 20.0) -> None:
    """Wait until ``link`` has made ``n`` more connect attempts."""
    seen = asyncio.Event()
    count = 0

    def on_change(old: LinkState, new: LinkState) -> None:
        nonlocal count
        if new is LinkState.CONNECTING:
            count += 1
            if count >= n:
                seen.set()

    link.watch.add_listener(on_change)
    try:
        async with asyncio.timeout(timeout_s):
            await seen.wait()
    finally:
        link.watch.remove_listener(on_change)


@contextlib.asynccontextmanager
async def running(*links: ModbusLink) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(link.run(), name=link.name) for link in links]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def plc_process(folder: Path, port: int) -> AsyncIterator[None]:
    """``python -m simulators plcs`` serving one conveyor on ``port``; SIGTERM at the end."""
    site = folder / "plcs.toml"
    site.write_text(f'[[plcs]]\nid = "conveyor-1"\nkind = "conveyor"\nport = {port}\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        "plcs",
        str(site),
        "--no-faults",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=str(ROOT),
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"listening" not in await proc.stdout.readline():
                pass
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(logger)]


async def test_link_state_changes_are_logged_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO)
    ports = free_port(), free_port()  # nobody listens yet: every connect is refused
    links = [
        ModbusLink(
            ModbusLinkConfig(port=port, backoff_initial_s=0.02, backoff_max_s=0.05),
            name=f"plc-{i}",
            logger=logging.getLogger(f"floorhand.plc.plc-{i}"),
        )
        for i, port in enumerate(ports)
    ]
    for link in links:
        ConveyorDriver(link, unit=1, name=link.name)  # heartbeats: the link must answer them
    async with running(*links):
        await asyncio.gather(*(attempts(link, ATTEMPTS) for link in links))
        # Unreachable: one line per link, whatever the number of attempts.
        assert lines(caplog, "pymodbus") == []
        for link in links:
            got = lines(caplog, f"floorhand.plc.{link.name}")
            assert len(got) == 1, got
            assert "cannot connect to" in got[0]

        caplog.clear()
        # The PLC simulator in its own process: the server's own pymodbus lines (it logs too
        # when it shuts down mid-request) stay in that process's log.
        async with plc_process(tmp_path, ports[0]):
            await links[0].wait_up(10)
            got = lines(caplog, "floorhand.plc.plc-0")
            assert len(got) == 1, got
            assert "up" in got[0]

            caplog.clear()
        # The PLC went away: down once, then its reconnects fail quietly.
        await attempts(links[0], ATTEMPTS)
        got = lines(caplog, "floorhand.plc.plc-0")
        assert len(got) == 2, got
        assert "down after" in got[0]
        assert "cannot connect to" in got[1]
        assert lines(caplog, "floorhand.plc.plc-1") == []
        assert lines(caplog, "pymodbus") == []
