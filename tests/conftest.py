from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.controller_proc import ControllerProcess
from tests.fork_server import ForkServer
from tests.mosquitto import MosquittoBroker, running_mosquitto

pytest_plugins = ["pytester"]  # tests/unit/test_task_leak_fixture.py runs an inner session


def describe_task(task: asyncio.Task[object]) -> str:
    """``name: coroutine`` plus where it is suspended, for a leak report."""
    coro = task.get_coro()
    where = ""
    frame = getattr(coro, "cr_frame", None)
    if frame is not None:
        where = f" at {frame.f_code.co_filename}:{frame.f_lineno}"
    qualname = getattr(coro, "__qualname__", repr(coro))
    return f"{task.get_name()}: {qualname}{where}"


@pytest.fixture
async def _fail_on_leaked_tasks() -> AsyncIterator[None]:
    """Fails the test if a task created during it is still pending once every other fixture
    of the test has been torn down (this one is set up first, so torn down last). The leaked
    tasks are then cancelled so they do not run into the next test."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t not in before and t is not current]
    leaked = [t for t in leaked if not t.done()]
    if not leaked:
        return
    names = "\n  ".join(sorted(describe_task(t) for t in leaked))
    for task in leaked:
        task.cancel()
    await asyncio.wait(leaked, timeout=5.0)
    pytest.fail(f"{len(leaked)} asyncio task(s) left pending by the test:\n  {names}", False)


@pytest.fixture(autouse=True)
def _no_leaked_tasks(request: pytest.FixtureRequest) -> None:
    """Every async test (pytest-asyncio marks them ``asyncio``) gets the leak check."""
    if request.node.get_closest_marker("asyncio") is not None:
        request.getfixturevalue("_fail_on_leaked_tasks")


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


@pytest.fixture(scope="session")
def controller_forks() -> Iterator[ForkServer]:
    """One fork server for the session (tests/fork_server.py): ``ForkedController`` starts
    ``floorhand run`` from it without paying the interpreter's imports each time (about 2 s
    of CPU per start). For tests whose point is not the interpreter's own start."""
    server = ForkServer().start()
    try:
        yield server
    finally:
        server.close()
