"""Schemathesis against the served OpenAPI (fault case S3): a live controller under uvicorn on
127.0.0.1 with an engineer token; no 5xx, no response that violates the schema (status codes,
content types, bodies, headers).

Bounded: ``--max-examples`` per operation and a fixed seed, so a run takes well under a minute
and a failure reproduces. ``positive_data_acceptance`` is off: schema-valid requests are refused
by design when they name things that do not exist (unknown SKU or pack station: 422/404) or
lack the ``Idempotency-Key`` the picks endpoint requires (400, fault case A4). 413 counts as a
correct refusal of an invalid body (a body above ``[api] max_body_bytes`` never reaches
validation).

Inputs a generator rarely produces but that once answered 500 (a NUL byte in a dashboard
path, ``every=inf`` or ``1e18``, a history server without the query language) are replayed
on every run by ``test_api_poison.py``; the schema's bounds (``every`` ≤ 10⁹ s) make
schemathesis probe their edges here too.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.controller_proc import ControllerProcess
from tests.integration.test_api_poison import live_controller
from tests.mosquitto import MosquittoBroker
from tests.sites import TOKENS

pytestmark = pytest.mark.timeout(150)

MAX_EXAMPLES = 15
SEED = 20_260_101

CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""


async def test_schemathesis_finds_no_server_errors_or_schema_violations(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> None:
    ctl = await live_controller(mosquitto, tmp_path, controllers)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{ctl.base}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKENS['engineer']}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    (tmp_path / "schemathesis.log").write_text(text)
    assert proc.returncode == 0, text[-6000:] + "\n" + ctl.tail()
    tested = re.search(r"Tested: (\d+)", text)
    assert tested is not None, text[-3000:]
    assert int(tested.group(1)) >= 12  # every operation of the schema, not a subset
    # The controller survived the run and still serves.
    assert (await ctl.get("/api/v1/ready"))["ready"] is True
