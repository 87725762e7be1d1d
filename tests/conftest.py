from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.mosquitto import MosquittoBroker, running_mosquitto


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[MosquittoBroker]:
    """A real mosquitto on a free 127.0.0.1 port, persistence in tmp_path."""
    async with running_mosquitto(tmp_path / "mosquitto") as broker:
        yield broker
