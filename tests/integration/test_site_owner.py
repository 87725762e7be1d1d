"""One owner per site (fault case M9, docs/architecture.md "One owner per site"), against a real
mosquitto.

A second ``floorhand run`` for a site that a running controller owns must refuse to start
(clear message, exit code EXIT_REFUSED) without disturbing the first one, not even once: the
first's MQTT connection count must not change and it keeps ingesting. Whatever the second has
in common with the first: the journal, only the MQTT client id (another journal, as on another
host), or the API port. Once the owner is gone (killed, its host dead, or only a stale claim
left) a new instance starts.

The controllers are forked from the session's fork server (tests/fork_server.py): each is the
same ``floorhand run`` in its own process, signalled by PID, without re-importing the
controller; what these tests check starts at the site's claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from pathlib import Path

import orjson
import pytest

from controller.__main__ import EXIT_REFUSED
from controller.owner import OwnerProbe, SiteOwned, SiteOwnership
from devices.link.mqtt import MqttLink, MqttLinkConfig, MqttMessage
from tests.controller_proc import ControllerProcess
from tests.fork_server import ForkedController, ForkServer
from tests.integration.test_mosquitto_config import USERS, start_broker
from tests.mosquitto import MosquittoBroker, free_port, paho_publish
from tests.sites import grams, topic, write_small_site

pytestmark = pytest.mark.timeout(90)


class Scale:
    """Readings of scale s0, seq increasing over the whole test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seq = 0

    async def publish(self) -> int:
        self.seq += 1
        body = {"device": "s0", "seq": self.seq, "ts": time.time(), "grams": grams(5)}
        await asyncio.to_thread(paho_publish, self.port, [(topic("s0"), orjson.dumps(body))])
        return self.seq


async def mqtt_connects(ctl: ControllerProcess) -> int:
    health = await ctl.get("/api/v1/health")
    connects: int = health["mqtt"]["connects"]
    return connects


async def owner_and_scale(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    forks: ForkServer,
    keepalive_s: float = 5.0,
) -> tuple[ControllerProcess, Scale, Path]:
    """The running owner, ingesting, and its site file."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, keepalive_s=keepalive_s)
    owner = ForkedController(site, tmp_path, forks)
    controllers.append(owner)
    await owner.start()
    scale = Scale(mosquitto.port)
    await owner.wait_applied({"s0": await scale.publish()})
    return owner, scale, site


def second(
    site: Path,
    folder: Path,
    controllers: list[ControllerProcess],
    forks: ForkServer,
    *,
    own_journal: bool,
    api_port: int | None = None,
) -> ControllerProcess:
    folder.mkdir()
    env = {"FLOORHAND_JOURNAL": str(folder / "journal.sqlite")} if own_journal else {}
    ctl = ForkedController(site, folder, forks, env=env)
    if api_port is not None:
        ctl.api_port = api_port
    controllers.append(ctl)
    return ctl


async def assert_refused(ctl: ControllerProcess, why: str) -> None:
    await ctl.spawn()
    code = await ctl.wait_exit(30.0)
    text = ctl.log_text()
    assert code == EXIT_REFUSED, f"exit {code}\n{ctl.tail(40)}"
    assert why in text, ctl.tail(40)
    # Refused before touching the broker with the site's session.
    assert "mqtt up" not in text, ctl.tail(40)
    # A refusal is an operator's message, not a crash.
    assert "Traceback" not in text, ctl.tail(40)


async def assert_undisturbed(owner: ControllerProcess, scale: Scale, connects: int) -> None:
    """The owner still runs on its first connection and still ingests."""
    assert owner.proc is not None
    assert owner.proc.returncode is None, owner.tail()
    await owner.wait_applied({"s0": await scale.publish()})
    assert await mqtt_connects(owner) == connects, owner.tail()
    assert "mqtt down" not in owner.log_text(), owner.tail()


async def test_m9_a_second_instance_with_the_same_journal_refuses(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    controller_forks: ForkServer,
) -> None:
    owner, scale, site = await owner_and_scale(mosquitto, tmp_path, controllers, controller_forks)
    connects = await mqtt_connects(owner)
    await assert_refused(
        second(site, tmp_path / "b", controllers, controller_forks, own_journal=False),
        "is in use by another",
    )
    await assert_undisturbed(owner, scale, connects)


async def test_m9_a_second_instance_with_another_journal_refuses(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    controller_forks: ForkServer,
) -> None:
    """Same site file, another journal: what a second host would do. Before the fix the
    second took the broker session over and the first exited."""
    owner, scale, site = await owner_and_scale(mosquitto, tmp_path, controllers, controller_forks)
    connects = await mqtt_connects(owner)
    await assert_refused(
        second(site, tmp_path / "b", controllers, controller_forks, own_journal=True),
        "is owned by a running",
    )
    await assert_undisturbed(owner, scale, connects)


async def test_m9_a_second_instance_on_a_busy_api_port_refuses(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    controller_forks: ForkServer,
) -> None:
    """Before the fix the second connected to the broker before it failed to bind, and
    evicted the first once."""
    owner, scale, site = await owner_and_scale(mosquitto, tmp_path, controllers, controller_forks)
    connects = await mqtt_connects(owner)
    ctl = second(
        site,
        tmp_path / "b",
        controllers,
        controller_forks,
        own_journal=True,
        api_port=owner.api_port,
    )
    await assert_refused(ctl, "is in use")
    await assert_undisturbed(owner, scale, connects)


async def test_m9_a_new_instance_starts_after_the_owner_was_killed(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    controller_forks: ForkServer,
) -> None:
    """kill -9: the kernel closes the owner's socket, the broker publishes its will (the
    empty retained claim) at once, and a new instance on another journal starts."""
    owner, scale, site = await owner_and_scale(mosquitto, tmp_path, controllers, controller_forks)
    await owner.kill()
    ctl = second(site, tmp_path / "b", controllers, controller_forks, own_journal=True)
    await ctl.start()
    await ctl.wait_applied({"s0": await scale.publish()})
    assert "stale" not in ctl.log_text()


async def test_m9_a_clean_stop_clears_the_claim(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    controller_forks: ForkServer,
) -> None:
    """SIGTERM: the owner deletes its claim before it leaves (its will does not fire on a
    clean disconnect), so the next instance finds no claim and does not wait."""
    owner, scale, site = await owner_and_scale(mosquitto, tmp_path, controllers, controller_forks)
    assert await owner.stop() == 0
    ctl = second(site, tmp_path / "b", controllers, controller_forks, own_journal=True)
    await ctl.start()
    assert "claimed by" not in ctl.log_text(), ctl.tail()
    await ctl.wait_applied({"s0": await scale.publish()})


async def test_m9_a_new_instance_starts_once_the_dead_hosts_will_fires(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    controller_forks: ForkServer,
) -> None:
    """The owner's host dies (SIGSTOP: the socket stays open, nothing answers). The new
    instance finds a claim, asks the owner, gets no answer, and starts once the broker gave
    up on the owner (keepalive) and published its will."""
    # keepalive 4 s: mosquitto gives up on the owner 6–12 s after its last packet, after
    # the new instance (forked: under 2 s to start) found the claim and asked, within its 13 s wait.
    owner, scale, site = await owner_and_scale(
        mosquitto, tmp_path, controllers, controller_forks, keepalive_s=4
    )
    assert owner.proc is not None
    owner.signal(signal.SIGSTOP)
    try:
        ctl = second(site, tmp_path / "b", controllers, controller_forks, own_journal=True)
        await ctl.start()
        text = ctl.log_text()
        assert "waiting for its answer" in text, ctl.tail()
        assert "owner gone" in text, ctl.tail()
        await ctl.wait_applied({"s0": await scale.publish()})
    finally:
        await owner.kill()


async def test_m9_a_stale_claim_does_not_block_the_site(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    controller_forks: ForkServer,
) -> None:
    """A claim nobody answers (left by an owner that stopped while the broker was down, so
    neither its clean release nor its will reached the broker): the new instance waits
    3 × the claim's keepalive + 1 s for an answer, logs the stale claim and starts."""
    site = write_small_site(tmp_path, mqtt_port=mosquitto.port, keepalive_s=1)
    claim = {
        "instance": "0" * 32,
        "host": "gone-host",
        "pid": 4242,
        "client_id": "floorhand-test",
        "journal": "/nowhere/journal.sqlite",
        "api": "127.0.0.1:1",
        "since": time.time() - 3600,
        "keepalive_s": 1.0,
    }
    await asyncio.to_thread(
        paho_publish, mosquitto.port, [("fh/t/owner", orjson.dumps(claim))], retain=True
    )
    ctl = ForkedController(site, tmp_path, controller_forks)
    controllers.append(ctl)
    await ctl.start()
    assert "stale owner claim" in ctl.log_text(), ctl.tail()
    assert "gone-host" in ctl.log_text()


async def test_m9_the_shipped_acl_lets_the_controller_claim_and_probe() -> None:
    """Against the shipped mosquitto.conf and ACL, as user floorhand-controller: the owner
    connects with its will on the claim topic (mosquitto checks will topics against the
    ACL), publishes its claim and answers a probe; the probe reads the claim and sees the
    answer; after the owner's release the probe finds no owner."""
    root = Path(tempfile.mkdtemp(prefix="fh-mosquitto-"))  # readable by user mosquitto
    broker = await asyncio.to_thread(start_broker, root)
    try:
        base = MqttLinkConfig(
            port=broker.port,
            client_id="floorhand-demo",
            username="floorhand-controller",
            password=USERS["floorhand-controller"],
            keepalive_s=5,
        )
        ownership = SiteOwnership(
            prefix="floorhand",
            site_id="demo",
            client_id=base.client_id,
            journal="journal.sqlite",
            api="127.0.0.1:8080",
            keepalive_s=5,
        )

        def on_messages(msgs: list[MqttMessage]) -> None:
            ownership.on_probes([m for m in msgs if m.topic == ownership.probe_topic])

        owner = MqttLink(ownership.link_config(base), on_messages, name="owner")
        ownership.attach(owner)
        probe = OwnerProbe(
            base,
            site_id="demo",
            claim_topic=ownership.claim_topic,
            probe_topic=ownership.probe_topic,
        )
        runner = asyncio.create_task(owner.run())
        try:
            await owner.wait_up(10)
            assert await owner.drain_publishes(5)  # the claim is stored
            with pytest.raises(SiteOwned) as refused:
                await probe.check()
            assert refused.value.claim.instance == ownership.claim.instance
            await ownership.release(5)
            assert await probe.check() is None
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_m9_with_the_broker_down_at_start_the_session_waits_for_the_probe(
    tmp_path: Path, controllers: list[ControllerProcess], controller_forks: ForkServer
) -> None:
    """The broker is down when the controller starts: the API answers, the probe keeps
    trying (one log line, not one per attempt), and the session connects once the broker is
    up and the probe found no owner."""
    port = free_port()
    site = write_small_site(tmp_path, mqtt_port=port)
    ctl = ForkedController(site, tmp_path, controller_forks)
    controllers.append(ctl)
    await ctl.start(wait_ready=False)
    await ctl.wait_log("cannot ask the broker who owns site t yet")
    await asyncio.sleep(6.0)  # an outage longer than one connect time-out (5 s), not a wait
    broker = MosquittoBroker(tmp_path / "mosquitto", port=port)
    await broker.start()
    try:
        await ctl.wait_ready()
        text = ctl.log_text()
        assert text.count("owner-probe cannot connect") == 1, ctl.tail()
        assert text.count("cannot ask the broker") == 1, ctl.tail()
        assert "mqtt up" in text
        assert await ctl.stop() == 0
    finally:
        await broker.close()
