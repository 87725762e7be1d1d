"""``floorhand --log-format``: our log lines and uvicorn's in one format, from a real
``floorhand run`` against mosquitto, started, ready, then stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.command_proc import CommandController
from tests.mosquitto import MosquittoBroker
from tests.sites import write_small_site

pytestmark = pytest.mark.timeout(60)


async def run_once(tmp_path: Path, port: int, flags: list[str], env: dict[str, str]) -> str:
    """Start, wait until ready, stop; the process's stderr."""
    os.makedirs(tmp_path, exist_ok=True)
    site = write_small_site(tmp_path, mqtt_port=port)
    ctl = CommandController(site, tmp_path, [sys.executable, "-m", "controller", *flags], env=env)
    await ctl.start()
    assert await ctl.stop() == 0, ctl.tail()
    return ctl.log_text()


async def test_json_log_lines_are_one_format_for_ours_and_uvicorns(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    out = await run_once(tmp_path, mosquitto.port, ["--log-format", "json"], {})
    records = [json.loads(line) for line in out.splitlines()]  # every line is one object
    assert records
    for record in records:
        assert set(record) >= {"ts", "level", "logger", "msg"}, record
        assert record["ts"].endswith("+00:00"), record
    loggers = {r["logger"] for r in records}
    assert "floorhand" in loggers
    assert "uvicorn.error" in loggers  # uvicorn's startup and shutdown lines
    assert any(r["msg"].startswith("floorhand ") and "site t" in r["msg"] for r in records)


TEXT_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "


async def test_text_log_lines_drop_the_time_under_journald(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """journald stamps every line itself: with stderr on the journal (JOURNAL_STREAM names
    it) the lines start with the level; otherwise with the local time."""
    stamped = await run_once(tmp_path / "a", mosquitto.port, [], {})
    (tmp_path / "b").mkdir()
    log = tmp_path / "b" / "controller.log"
    log.touch()  # the child's stderr: JOURNAL_STREAM=<device>:<inode> of it
    st = os.stat(log)
    journal = await run_once(
        tmp_path / "b", mosquitto.port, [], {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    )
    for out, prefix in ((journal, ""), (stamped, STAMP)):
        lines = out.splitlines()
        assert lines
        for line in lines:
            assert re.match(prefix + TEXT_LINE.pattern[1:], line), line
        loggers = {line.split(": ")[0].split(" ")[-1] for line in lines}
        assert {"floorhand", "uvicorn.error"} <= loggers, loggers
