"""Other MQTT brokers for the broker matrix (tests/integration/test_mqtt_broker_matrix.py).

aedes (Node.js) is installed with the machine's npm into a cache folder on first use, pinned,
and started as a child process on 127.0.0.1. rumqttd (Rust) comes in the PyPI package
``iotcore`` (its wheel bundles rumqttd 0.20.0, per the SBOM in its dist-info), installed with
pip into a cached virtualenv of its own on first use, pinned, and started as a child process
(``python -m iotcore --config``) with a TOML config written at test time that binds every
listener to 127.0.0.1 (its default is 0.0.0.0). Only the processes started here are ever
signalled, by PID.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.cached_venv import cache_dir, ensure_venv, install

AEDES_VERSION = "1.2.0"
IOTCORE_VERSION = "0.4.0"  # ships rumqttd 0.20.0
READY = "aedes ready"

# An ES module next to its node_modules, so `import 'aedes'` resolves from the cache folder.
_LAUNCHER = """\
import net from 'node:net'
import { Aedes } from 'aedes'

const port = Number(process.argv[2])
const aedes = await Aedes.createBroker()  // in-memory persistence: sessions, QoS 1 queues
const server = net.createServer(aedes.handle)
server.listen(port, '127.0.0.1', () => console.log('%s'))
process.on('SIGTERM', () => server.close(() => aedes.close(() => process.exit(0))))
"""


def ensure_aedes(timeout_s: float = 300.0) -> tuple[Path, float]:
    """The folder holding aedes ``AEDES_VERSION`` and its launcher, installed with npm on first
    use and cached across runs. Returns it and the seconds spent installing (0.0 when cached).
    Raises RuntimeError (with npm's output) when node/npm are missing or the install fails."""
    folder = cache_dir() / f"aedes-{AEDES_VERSION}"
    stamp = folder / ".floorhand-installed"
    if stamp.exists():
        return folder, 0.0
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise RuntimeError("node and npm are not installed (Debian packages nodejs, npm)")
    folder.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing it right now
        if stamp.exists():
            return folder, 0.0
        started = time.monotonic()
        (folder / "package.json").write_text('{"private": true, "type": "module"}\n')
        npm_install = [npm, "install", "--no-audit", "--no-fund", "--silent"]
        install([*npm_install, f"aedes@{AEDES_VERSION}"], timeout_s, cwd=folder)
        (folder / "broker.mjs").write_text(_LAUNCHER % READY)
        stamp.write_text(f"aedes@{AEDES_VERSION}\n")
        return folder, time.monotonic() - started


async def stop(proc: asyncio.subprocess.Process, timeout_s: float = 5.0) -> None:
    """SIGTERM the process started here (by its PID), SIGKILL if it outlives ``timeout_s``."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def running_aedes(folder: Path, port: int, timeout_s: float = 20.0) -> AsyncIterator[int]:
    """Run the aedes launcher of ``folder`` on 127.0.0.1:``port``; yields its PID."""
    node = shutil.which("node") or "node"
    proc = await asyncio.create_subprocess_exec(
        node,
        str(folder / "broker.mjs"),
        str(port),
        cwd=folder,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"aedes exited with {await proc.wait()} before ready")
                if line.decode(errors="replace").strip() == READY:
                    break
        yield proc.pid
    finally:
        await stop(proc)


def ensure_iotcore(timeout_s: float = 300.0) -> tuple[Path, float]:
    """The Python of a virtualenv holding iotcore ``IOTCORE_VERSION`` (rumqttd), installed with
    pip from the package index on first use and cached across runs (a wheel only: it holds the
    compiled broker). Returns it and the seconds this call spent installing (0.0 when cached).
    Raises RuntimeError with pip's output when the install fails (e.g. no wheel for this Python
    or platform)."""
    venv, took_s = ensure_venv("iotcore", IOTCORE_VERSION, timeout_s, ("--only-binary", ":all:"))
    return venv / "bin" / "python", took_s


_RUMQTTD_LISTENER = """\
[{v}.1]
name = "{v}-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[{v}.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = {max_inflight}
"""


def rumqttd_config(v4_port: int, v5_port: int, max_inflight: int = 1000) -> str:
    """A rumqttd 0.20 TOML config: an MQTT 3.1.1 (``v4``) and an MQTT 5 (``v5``) listener,
    both on 127.0.0.1. ``max_inflight`` bounds the QoS 1 messages rumqttd has out
    unacknowledged per connection (its default is 100)."""
    router = (
        "id = 0\n\n[router]\nid = 0\nmax_connections = 100\nmax_outgoing_packet_count = 200\n"
        "max_segment_size = 104857600\nmax_segment_count = 10\n\n"
    )
    listeners = (
        _RUMQTTD_LISTENER.format(v=v, port=port, max_inflight=max_inflight)
        for v, port in (("v4", v4_port), ("v5", v5_port))
    )
    return router + "\n".join(listeners)


@dataclass(frozen=True)
class Rumqttd:
    pid: int
    v4_port: int  # MQTT 3.1.1 listener
    v5_port: int  # MQTT 5 listener


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nobody listens on right now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))  # all bound at once: no port twice
        return [int(sock.getsockname()[1]) for sock in socks]


def write_rumqttd_config(folder: Path, v4_port: int, v5_port: int) -> Path:
    """Write ``rumqttd_config`` to ``folder/rumqttd.toml`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "rumqttd.toml"
    config.write_text(rumqttd_config(v4_port, v5_port))
    return config


@contextlib.asynccontextmanager
async def running_rumqttd(
    python: Path, folder: Path, v4_port: int, v5_port: int, timeout_s: float = 20.0
) -> AsyncIterator[Rumqttd]:
    """Run rumqttd (``python -m iotcore --config``) with a config written into ``folder``;
    ready once rumqttd logged both listeners; yields its PID and ports."""
    config = await asyncio.to_thread(write_rumqttd_config, folder, v4_port, v5_port)
    wanted = {f'listen_addr="127.0.0.1:{port}"'.encode() for port in (v4_port, v5_port)}
    proc = await asyncio.create_subprocess_exec(
        str(python),
        "-m",
        "iotcore",
        "--config",
        str(config),
        "--log-level",
        "INFO",  # the "Listening for remote connections" lines are INFO
        cwd=folder,  # not the repo: no directory named iotcore may shadow the package
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    listening = asyncio.Event()
    last_lines: collections.deque[bytes] = collections.deque(maxlen=40)

    async def drain() -> None:
        # rumqttd logs every packet; keep reading so it never blocks on a full pipe.
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            last_lines.append(line)
            if b"Listening for remote connections" in line:
                wanted.difference_update({w for w in wanted if w in line})
                if not wanted:
                    listening.set()

    drainer = asyncio.create_task(drain(), name="rumqttd.stderr")
    ready = asyncio.create_task(listening.wait(), name="rumqttd.ready")
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.wait({ready, drainer}, return_when=asyncio.FIRST_COMPLETED)
        if not listening.is_set():
            raise RuntimeError(
                f"rumqttd exited with {await proc.wait()} before listening:\n"
                + b"".join(last_lines).decode(errors="replace")
            )
        yield Rumqttd(proc.pid, v4_port, v5_port)
    finally:
        ready.cancel()
        await stop(proc)
        await drainer  # ends at the end of its stderr
