"""A real mosquitto broker for tests and benchmarks, and a paho-mqtt peer to talk to it.

`MosquittoBroker` writes a config into a temporary folder, runs ``mosquitto -c`` on a free
127.0.0.1 port and can stop (SIGTERM), kill (SIGKILL), freeze (SIGSTOP/SIGCONT) and start it
again on the same port with the same persistence folder. It only ever signals the process it
started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from tests.waiting import wait_for_condition

MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MosquittoBroker:
    """One mosquitto process on 127.0.0.1:``port`` with persistence under ``folder``."""

    def __init__(
        self,
        folder: Path,
        *,
        port: int | None = None,
        extra_config: str = "",
        autosave_interval: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.port = port if port is not None else free_port()
        self.extra_config = extra_config
        self.autosave_interval = autosave_interval
        self.config_path = self.folder / "mosquitto.conf"
        self.log_path = self.folder / "mosquitto.log"
        self.data_dir = self.folder / "data"
        self._proc: asyncio.subprocess.Process | None = None
        self._log_file: Any = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            # We run as root; without this mosquitto drops to user "mosquitto", which cannot
            # write the persistence folder.
            "user root",
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "autosave_on_changes true",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self.autosave_interval is not None:
            lines.append(f"autosave_interval {self.autosave_interval}")
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")

    async def start(self, timeout_s: float = 10.0) -> float:
        """Start mosquitto and return ``time.monotonic()`` when its port first accepted."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        self.write_config()
        if self._log_file is None:
            self._log_file = self.log_path.open("ab")
        self._proc = await asyncio.create_subprocess_exec(
            MOSQUITTO_BIN,
            "-c",
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
        )
        self.starts += 1
        proc = self._proc

        async def listening() -> float:
            if proc.returncode is not None:
                raise RuntimeError(f"mosquitto exited with {proc.returncode}:\n{self.log_tail()}")
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            listening_at = time.monotonic()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return listening_at

        try:
            return await wait_for_condition(
                listening,
                timeout_s,
                what=f"mosquitto listening on {self.port}",
                until=lambda _: True,  # connected: the value is the time it first listened
                retry_on=(OSError,),
                context=self.log_tail,
            )
        except TimeoutError:
            await self.kill()
            raise

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file) and wait for the exit."""
        await self._signal_and_wait(signal.SIGTERM, timeout_s)

    async def kill(self) -> None:
        """SIGKILL and wait for the exit."""
        await self._signal_and_wait(signal.SIGKILL, 10.0)

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing (half-open link)."""
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self._proc.pid, signal.SIGCONT)

    async def _signal_and_wait(self, sig: signal.Signals, timeout_s: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if sig != signal.SIGKILL:
            # A frozen process cannot act on SIGTERM. (SIGKILL needs no SIGCONT, and must not
            # get one: the process would run on for a moment and read its sockets.)
            os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, sig)
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
        except TimeoutError:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def close(self) -> None:
        """Stop the broker if running and release the log file."""
        await self.stop()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.asynccontextmanager
async def running_mosquitto(
    folder: Path, *, port: int | None = None, extra_config: str = "", **kwargs: Any
) -> AsyncIterator[MosquittoBroker]:
    """Start a `MosquittoBroker` for the duration of the block; always stop it afterwards."""
    broker = MosquittoBroker(folder, port=port, extra_config=extra_config, **kwargs)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


# ---------------------------------------------------------------------------------------------
# paho-mqtt as the independent peer (blocking; call through asyncio.to_thread)


def paho_publish(
    port: int,
    messages: Sequence[tuple[str, bytes]],
    *,
    qos: int = 1,
    retain: bool = False,
    client_id: str = "test-publisher",
    protocol: int = 5,
    timeout_s: float = 20.0,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """Publish ``(topic, payload)`` pairs with paho and return once all are acknowledged.

    The publisher keeps a persistent session (clean start off / session expiry 1 h), so
    messages are not lost if the broker restarts mid-way. ``username``/``password`` log in
    (brokers that require it, e.g. the demo's amqtt).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    version = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": version}
    if version == mqtt.MQTTv311:
        kwargs["clean_session"] = False
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    connect_kwargs: dict[str, Any] = {}
    if version == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        connect_kwargs = {"clean_start": False, "properties": props}
    if username is not None:
        client.username_pw_set(username, password)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect("127.0.0.1", port, keepalive=30, **connect_kwargs)
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise TimeoutError("paho publisher did not connect")
        infos = [
            client.publish(topic, payload, qos=qos, retain=retain) for topic, payload in messages
        ]
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("paho publisher: message not acknowledged in time")
    finally:
        client.disconnect()
        client.loop_stop()


def paho_collect(
    port: int,
    topic_filter: str,
    count: int,
    *,
    client_id: str = "test-collector",
    timeout_s: float = 10.0,
) -> list[tuple[str, bytes, bool]]:
    """Subscribe with a clean paho session and return the first ``count`` messages
    as ``(topic, payload, retain)``."""
    import paho.mqtt.client as mqtt

    got: list[tuple[str, bytes, bool]] = []
    done = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(topic_filter, qos=1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        got.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
        if len(got) >= count:
            done.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=30, clean_start=True)
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise TimeoutError(f"paho collector got {len(got)} of {count} messages")
        return list(got)
    finally:
        client.disconnect()
        client.loop_stop()
