"""The controller's PUBACKs on the wire, in the order the broker sent the PUBLISHes (MQTT 5
and 3.1.1 §4.6), when the broker's queue mixes pick commands, bad readings, an oversized
message and good readings: the commands go to the command session, everything else to the main
session, and each session acks in its own arrival order. Real mosquitto, whose debug log shows
both orders."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from controller.runtime import command_client_id, command_topic
from devices.link.state import LinkState
from tests.integration.test_api_ops import ops_server
from tests.integration.test_mqtt_link import wire_order
from tests.integration.test_sensing_e2e import PahoWatcher
from tests.mosquitto import paho_publish, running_mosquitto
from tests.sites import topic, write_small_site

pytestmark = pytest.mark.timeout(90)


async def test_controller_pubacks_follow_arrival_order(tmp_path: Path) -> None:
    async with running_mosquitto(tmp_path / "mosquitto", extra_config="log_type all") as broker:
        # MQTT 3.1.1: the broker does not know our packet limit, so it sends the oversized one.
        site = write_small_site(tmp_path, mqtt_port=broker.port, client_id="fh-order", protocol=4)
        async with ops_server(site) as srv:
            rt = srv.rt
            await rt.command_link.watch.wait_for(LinkState.UP, 10)
            commands = command_topic(rt.site)
            limit = rt.link.config.max_packet_bytes

            def reading(device: str, seq: int) -> tuple[str, bytes]:
                body = {"device": device, "seq": seq, "ts": rt.clock(), "grams": 1500.0}
                return topic(device), orjson.dumps(body)

            mixed = [
                reading("s0", 0),
                (commands, b"{}"),  # a bad pick command: answered with an error, acked
                (topic("s1"), b"not json"),  # a bad reading: dead-lettered, acked
                reading("s0", 1),
                (topic("s2"), b"x" * (limit + 1)),  # skipped and acked by the link
                (commands, b"[]"),
                reading("s1", 0),
                reading("s0", 2),
            ]
            # The commands are answered, published and acked on the control loop, by their
            # own session; the main session never sees them.
            replies = PahoWatcher(broker.port, f"{commands}/result", client_id="replies")
            await replies.subscribed()
            rt.gate.hold("test")  # let them pile up at the broker: one read holds the mix
            await asyncio.to_thread(paho_publish, broker.port, mixed, protocol=4)
            rt.gate.release("test")
            srv.seq["s3"] = -1
            await srv.publish("s3", 1500.0, n=1)  # handled after everything before it
            try:
                await replies.wait_for(lambda t, b: len(replies.messages) >= 2)
            finally:
                replies.close()
            assert [b["status"] for _, b, _ in replies.messages] == [400, 400]
            assert rt.link.stats.oversize_in == 1
            assert rt.link.acks_held == 0
            assert rt.command_link.acks_held == 0
            assert rt.commands_on_main_session == 0
        log = broker.log_path.read_text()
        sent, acked = wire_order(log, "fh-order")
        cmd_sent, cmd_acked = wire_order(log, command_client_id(rt.site))
    assert command_client_id(rt.site) == "fh-order-picks"
    assert len(sent) == len(mixed) - 2 + 1
    assert acked == sent
    assert len(cmd_sent) == 2
    assert cmd_acked == cmd_sent
