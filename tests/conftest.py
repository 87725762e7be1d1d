from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.controller_proc import ControllerProcess
from tests.mosquitto import MosquittoBroker, running_mosquitto


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[MosquittoBroker]:
    """A real mosquitto on a free 127.0.0.1 port, persistence in tmp_path."""
    async with running_mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
async def controllers() -> AsyncIterator[list[ControllerProcess]]:
    """Register every ControllerProcess a test starts here: all are stopped at teardown,
    whatever the test's outcome."""
    started: list[ControllerProcess] = []
    yield started
    for ctl in started:
        await ctl.stop(timeout_s=5.0)
