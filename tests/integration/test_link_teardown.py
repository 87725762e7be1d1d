"""A stopped link leaves nothing behind in the event loop: no task, no pending timer.

The links' timers (the MQTT keepalive, the linger after a polite DISCONNECT, the Modbus
heartbeat) are tasks owned by the link's session and ended with it. Checked against a real
mosquitto (its own process) and a real pymodbus PLC simulator (in its own thread and event
loop), so every task and timer of the test's loop belongs to the link under test.

Timers are seen through the loop's public ``call_at`` (``call_later`` goes through it): the
ledger wraps it for the test and records, for every timer, whether it fired or was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devices.conveyor import ConveyorDriver
from devices.link.modbus import ModbusLink, ModbusLinkConfig
from devices.link.mqtt import MqttLink, MqttLinkConfig
from devices.link.state import LinkState
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from tests.mosquitto import MosquittoBroker, running_mosquitto

pytestmark = pytest.mark.timeout(60)


@dataclass
class Timer:
    what: str
    handle: asyncio.TimerHandle | None = None
    fired: bool = False

    def pending(self) -> bool:
        return not self.fired and self.handle is not None and not self.handle.cancelled()


class TimerLedger:
    """Every timer scheduled on the running loop while installed, and its fate.
    ``fired`` is set whenever one fires (for waits on state that nothing signals)."""

    def __init__(self) -> None:
        self.timers: list[Timer] = []
        self.fired = asyncio.Event()

    @contextlib.contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        call_at = loop.call_at

        def tracked(
            when: float, callback: Callable[..., object], *args: Any, context: Any = None
        ) -> asyncio.TimerHandle:
            timer = Timer(getattr(callback, "__qualname__", repr(callback)))

            def fire(*fire_args: Any) -> None:
                timer.fired = True
                self.fired.set()
                callback(*fire_args)

            timer.handle = call_at(when, fire, *args, context=context)
            self.timers.append(timer)
            return timer.handle

        with monkeypatch.context() as patch:
            patch.setattr(loop, "call_at", tracked)
            yield

    def pending(self) -> list[str]:
        return [t.what for t in self.timers if t.pending()]

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, checking it after every timer that fires (the
        links' keepalive and heartbeat counters are driven by their timers)."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.fired.clear()
                await self.fired.wait()


def new_tasks(before: set[asyncio.Task[Any]]) -> list[str]:
    me = asyncio.current_task()
    return sorted(
        t.get_name() for t in asyncio.all_tasks() - before if t is not me and not t.done()
    )


async def stop_run(link: MqttLink | ModbusLink, task: asyncio.Task[None], how: str) -> None:
    """End the link's ``run()`` by cancellation (the runtime's shutdown) or `disconnect`."""
    if how == "cancel":
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
    else:
        await link.disconnect()
        await task


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[MosquittoBroker]:
    async with running_mosquitto(tmp_path / "mosquitto") as running:
        yield running


def mqtt_link(port: int, **overrides: Any) -> MqttLink:
    settings: dict[str, Any] = {
        "port": port,
        "client_id": "teardown",
        "subscriptions": (("shelf/#", 1),),
        "keepalive_s": 1.0,  # a keepalive tick every 0.25 s, a PINGREQ every 0.5 s
        "connect_timeout_s": 2.0,
    }
    settings.update(overrides)
    return MqttLink(MqttLinkConfig(**settings), lambda batch: None, name="teardown")


@pytest.mark.parametrize("stop", ["cancel", "disconnect", "cancel while retrying"])
async def test_a_stopped_mqtt_link_leaves_no_task_and_no_timer(
    broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """Stopped while UP with its keepalive running, by cancellation (the runtime's shutdown)
    and by `disconnect`, or cancelled while reconnecting after the broker died. Before the
    timers were tasks, a link cancelled while up returned with its linger timer (abort the
    socket if the broker does not close after our DISCONNECT) still scheduled on the loop."""
    ledger = TimerLedger()
    before = asyncio.all_tasks()
    with ledger.installed(monkeypatch):
        link = mqtt_link(broker.port)
        task = asyncio.create_task(link.run(), name="teardown.run")
        await link.wait_up(10)
        await ledger.until(lambda: link.stats.pings >= 1)  # the keepalive ticked
        assert any(name.startswith("teardown.keepalive") for name in new_tasks(before))
        assert link.connection_number == link.epoch == 1
        if stop == "cancel while retrying":
            retried = asyncio.Event()
            link.watch.add_listener(
                lambda old, new: retried.set() if new is LinkState.CONNECTING else None
            )
            await broker.kill()
            await asyncio.wait_for(retried.wait(), 10)  # connect, fail, back off, again
            stop = "cancel"
        await stop_run(link, task, stop)
        # Right when run() has returned: nothing of the link may be left.
        assert new_tasks(before) == []
        assert ledger.pending() == []
    assert link.state is LinkState.DOWN
    assert len(ledger.timers) > 2  # the ledger saw the keepalive's timers


class PlcInThread:
    """A simulated conveyor PLC (pymodbus server + model clock) on its own event loop in a
    thread, so that the test's loop holds only the link under test."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._error: BaseException | None = None

    async def _serve(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with PlcHost(ConveyorPlc("conveyor-1"), proxy=False) as host:
                self.port = host.port
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def __enter__(self) -> PlcInThread:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"PLC simulator did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.mark.parametrize("stop", ["cancel", "disconnect"])
async def test_a_stopped_modbus_link_leaves_no_task_and_no_timer(
    monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """Stopped while UP with its heartbeat running (a conveyor driver registers it)."""
    with PlcInThread() as plc:
        ledger = TimerLedger()
        before = asyncio.all_tasks()
        with ledger.installed(monkeypatch):
            link = ModbusLink(ModbusLinkConfig(port=plc.port), name="teardown")
            ConveyorDriver(link, unit=1, name="conveyor-1")
            task = asyncio.create_task(link.run(), name="teardown.run")
            await link.wait_up(10)
            await ledger.until(lambda: link.stats.heartbeats >= 3)
            await stop_run(link, task, stop)
            assert new_tasks(before) == []
            assert ledger.pending() == []
        assert link.state is LinkState.DOWN
