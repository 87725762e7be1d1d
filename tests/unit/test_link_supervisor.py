"""`LinkSupervisor`, the one connect → serve → back off loop of the MQTT and Modbus links,
driven through a scripted fake link (our own interface; the real links are tested against
mosquitto and the PLC simulators in tests/integration)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import pytest

from devices.errors import AuthError, DeviceUnavailable
from devices.link.backoff import Backoff
from devices.link.state import LinkState
from devices.link.supervisor import LinkSupervisor, SessionTasks

pytestmark = pytest.mark.timeout(60)

LOGGER = "test.link.fake"


@dataclass
class Attempt:
    """What one connect attempt of `FakeLink` does."""

    fail: Exception | None = None  # `_open_session` raises it
    up_s: float = 0.0  # else it comes up, the clock moves on by this much...
    reason: str = "peer closed"  # ...and the connection ends for this reason
    stay: bool = False  # or it stays up until stopped
    serve_error: Exception | None = None  # or serving ends with this error


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeLink(LinkSupervisor):
    _fatal_errors = (AuthError,)

    def __init__(
        self,
        script: list[Attempt],
        *,
        backoff: Backoff | None = None,
        open_steps: int = 0,
        close_steps: int = 0,
        swallow_cancel: bool = False,
    ) -> None:
        self.clock = Clock()
        super().__init__(
            name="fake", endpoint="plc:502", logger=logging.getLogger(LOGGER), clock=self.clock
        )
        self.script = list(script)
        self.backoff = backoff or Backoff(0.001, 1.0, jitter=0.0, reset_after_s=10.0)
        self.open_steps = open_steps
        self.close_steps = close_steps
        self.swallow_cancel = swallow_cancel
        self.swallowed = 0
        self.opens = 0
        self.closes: list[str] = []
        self.serving = asyncio.Event()
        self.closed = asyncio.Event()
        self.timers: list[asyncio.Task[None]] = []
        self._lost = asyncio.Event()
        self._current = Attempt(stay=True)

    def _reconnect_backoff(self) -> Backoff:
        return self.backoff

    async def _open_session(self, tasks: SessionTasks) -> None:
        self.opens += 1
        self._current = self.script.pop(0) if self.script else Attempt(stay=True)
        self._lost.clear()
        for _ in range(self.open_steps):
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                if not self.swallow_cancel:
                    raise
                # What asyncio.wait_for on Python 3.11 can do: the cancellation is lost and
                # the call returns its result (a failed connect) instead.
                self.swallowed += 1
                raise DeviceUnavailable("connect failed") from None
        if self._current.fail is not None:
            raise self._current.fail

    async def _serve_session(self, tasks: SessionTasks) -> str:
        self.timers.append(tasks.spawn("fake.timer", asyncio.Event().wait))
        attempt = self._current
        if attempt.stay:
            self.serving.set()
            await self._lost.wait()
            return "disconnect requested"
        if attempt.serve_error is not None:
            raise attempt.serve_error
        self.clock.now += attempt.up_s
        return attempt.reason

    async def _close_session(self, reason: str) -> None:
        self.closes.append(reason)
        for _ in range(self.close_steps):
            await asyncio.sleep(0)
        self.closed.set()

    async def _stop_session(self) -> None:
        self._lost.set()


def states(link: LinkSupervisor) -> list[LinkState]:
    seen: list[LinkState] = []
    link.watch.add_listener(lambda old, new: seen.append(new))
    return seen


def log_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.INFO
    ]


async def test_the_states_follow_connect_serve_back_off() -> None:
    link = FakeLink(
        [
            Attempt(fail=DeviceUnavailable("refused")),
            Attempt(fail=OSError("unreachable")),
            Attempt(up_s=1.0, reason="peer closed"),
        ]
    )
    seen = states(link)
    async with link:
        await asyncio.wait_for(link.serving.wait(), 5)
        assert link.state is LinkState.UP
        assert link.connection_number == 4  # one per attempt
        assert link.last_error == "peer closed"
    C, U, D = LinkState.CONNECTING, LinkState.UP, LinkState.DOWN
    assert seen == [C, D, C, D, C, U, D, C, U, D]
    assert link.opens == 4
    assert len(link.closes) == 4  # every attempt closed, failed ones too
    assert link.closes[2] == "peer closed"
    assert link.closes[3] == "link stopped"  # cancelled while serving
    assert link.last_down_reason == "link stopped"
    assert link.last_error == "peer closed"  # our own stop is not an error


async def test_disconnect_ends_run_without_a_reconnect() -> None:
    link = FakeLink([])
    seen = states(link)
    task = asyncio.create_task(link.run())
    await asyncio.wait_for(link.serving.wait(), 5)
    await link.disconnect()
    await asyncio.wait_for(task, 5)
    assert seen[-2:] == [LinkState.UP, LinkState.DOWN]
    assert link.opens == 1
    assert link.closes == ["disconnect requested"]
    assert all(t.done() for t in link.timers)


async def test_logged_once_per_change_and_per_reason_never_per_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    refused = [Attempt(fail=DeviceUnavailable("refused")) for _ in range(5)]
    link = FakeLink(
        [
            *refused,
            Attempt(fail=TimeoutError()),
            *refused,
            Attempt(up_s=2.0),
            *refused,
        ],
        backoff=Backoff(0.001, 0.002, jitter=0.0),
    )
    async with link:
        await asyncio.wait_for(link.serving.wait(), 5)
    warn, info = logging.WARNING, logging.INFO
    assert log_lines(caplog) == [
        (warn, "fake cannot connect to plc:502: refused (retrying)"),
        (warn, "fake cannot connect to plc:502: TimeoutError (retrying)"),
        (info, "fake up (plc:502)"),
        (warn, "fake down after 2.0 s: peer closed"),
        (warn, "fake cannot connect to plc:502: refused (retrying)"),  # a new outage
        (info, "fake back after 0.0 s"),
        (info, "fake down after 0.0 s: link stopped"),
    ]
    assert link.opens == 5 + 1 + 5 + 1 + 5 + 1


async def test_backoff_grows_and_resets_only_after_a_session_of_reset_after_s() -> None:
    fail = Attempt(fail=DeviceUnavailable("refused"))
    link = FakeLink(
        [
            fail,
            fail,
            fail,
            Attempt(up_s=1.0),  # up, but shorter than reset_after_s (10 s): no reset
            fail,
            Attempt(up_s=10.0),  # up long enough: the next delay starts again
            fail,
        ]
    )
    delays: list[float] = []
    link.watch.add_listener(
        lambda old, new: delays.append(link.retry_delay_s) if new is LinkState.CONNECTING else None
    )
    async with link:
        await asyncio.wait_for(link.serving.wait(), 5)
    assert delays == pytest.approx([0.0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.001, 0.002])


async def test_a_fatal_error_ends_run_and_is_raised(caplog: pytest.LogCaptureFixture) -> None:
    link = FakeLink([Attempt(fail=AuthError("bad password"))])
    with pytest.raises(AuthError):
        await asyncio.wait_for(link.run(), 5)
    assert link.opens == 1
    assert link.closes == ["link stopped"]
    assert link.state is LinkState.DOWN
    assert link.last_error == "bad password"
    assert (logging.ERROR, "fake stopped: bad password") in log_lines(caplog)


async def test_a_fatal_error_while_up_is_raised_by_the_context_manager() -> None:
    link = FakeLink([Attempt(serve_error=AuthError("taken over"))])

    async def use() -> None:
        async with link:
            run = link._run_task  # the task the context manager started
            assert run is not None
            await asyncio.wait({run}, timeout=5)

    with pytest.raises(AuthError, match="taken over"):
        await use()
    assert link.state is LinkState.DOWN
    assert link.opens == 1
    assert link.last_down_reason == "taken over"


async def test_a_session_task_that_fails_is_logged_and_the_rest_end_with_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Boom(FakeLink):
        async def _serve_session(self, tasks: SessionTasks) -> str:
            tasks.spawn("fake.boom", self._boom)
            return await super()._serve_session(tasks)

        async def _boom(self) -> None:
            raise RuntimeError("timer bug")

    link = Boom([])
    async with link:
        await asyncio.wait_for(link.serving.wait(), 5)
        await asyncio.sleep(0)  # one loop step: the failing task runs
        assert link.state is LinkState.UP
    assert any("fake.boom failed" in r.getMessage() for r in caplog.records)
    assert link.timers
    assert all(t.cancelled() for t in link.timers)


LOOP_STEPS = 30
"""Cancel points swept, in event loop steps after the trigger: wider than a whole fake
attempt (open, serve or fail, close, back off) several times over."""


def cancel_after_steps(task: asyncio.Task[Any], steps: int) -> None:
    loop = asyncio.get_running_loop()

    def step(left: int) -> None:
        if left == 0:
            task.cancel()
        else:
            loop.call_soon(step, left - 1)

    step(steps)


async def cancelled_run(case: str, steps: int) -> FakeLink | None:
    """Run a fresh link and cancel it ``steps`` loop steps after the trigger of ``case``;
    the link once `run` ended, or None if it did not within 2 s."""
    failing = case in ("failing connects", "lost cancellation")
    script = [Attempt(fail=DeviceUnavailable("refused"))] * 100 if failing else []
    link = FakeLink(
        script,
        backoff=Backoff(0.001, 0.001, jitter=0.0),
        open_steps=3,
        close_steps=2,
        swallow_cancel=case == "lost cancellation",
    )
    task = asyncio.create_task(link.run())
    trigger = LinkState.UP if case == "while up" else LinkState.CONNECTING

    def on_change(old: LinkState, new: LinkState) -> None:
        if new is trigger:
            link.watch.remove_listener(on_change)
            cancel_after_steps(task, steps)

    link.watch.add_listener(on_change)
    done, _ = await asyncio.wait({task}, timeout=2.0)
    if not done:
        await link.disconnect()
        task.cancel()
        await asyncio.wait({task})
        return None
    assert task.cancelled(), task
    return link


@pytest.mark.parametrize(
    "case", ["failing connects", "connect that comes up", "while up", "lost cancellation"]
)
async def test_a_cancel_at_any_step_ends_run_promptly(case: str) -> None:
    """Cancelled at each loop step of connecting, serving, closing and backing off, `run`
    ends cancelled, with every attempt closed and no session task left; also when the
    connect swallows the cancellation (as asyncio.wait_for on Python 3.11 can)."""
    stuck: list[int] = []
    swallowed = 0
    for steps in range(LOOP_STEPS):
        link = await cancelled_run(case, steps)
        if link is None:
            stuck.append(steps)
            continue
        assert link.opens == len(link.closes)
        assert all(t.done() for t in link.timers)
        assert link.state is LinkState.DOWN
        swallowed += link.swallowed
    assert stuck == [], f"run() ignored a cancel issued {stuck} loop steps in"
    if case == "lost cancellation":
        assert swallowed > 0  # the sweep did hit the connect's swallowing steps
