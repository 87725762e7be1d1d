"""The autouse leak check of tests/conftest.py: an async test that leaves a task pending fails
(an error at teardown naming the task); one that cleans up, or a sync test, passes."""

from __future__ import annotations

import pytest

INNER_CONFTEST = """
from tests.conftest import _fail_on_leaked_tasks, _no_leaked_tasks  # noqa: F401
"""

INNER_TESTS = """
import asyncio

async def forever() -> None:
    await asyncio.Event().wait()

async def test_leaks() -> None:
    asyncio.create_task(forever(), name="left-behind")

async def test_cleans_up() -> None:
    task = asyncio.create_task(forever(), name="awaited")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

def test_sync() -> None:
    assert True
"""


def test_a_leaking_async_test_fails_naming_the_task(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "*1 asyncio task(s) left pending by the test:*",
            "*left-behind: forever at *test_inner.py:*",
        ]
    )
