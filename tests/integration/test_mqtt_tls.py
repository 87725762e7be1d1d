"""MqttLink over TLS and mutual TLS against real mosquitto, with a CA made at test time; the
TLS context comes from the site file through the runtime's `build_ssl_context`."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.config import load_site
from controller.runtime import build_ssl_context
from devices.link.state import LinkState
from tests.integration.test_mqtt_link import (
    Collector,
    entered,
    make_link,
    numbered,
    publish,
    running,
)
from tests.mosquitto import MosquittoBroker, free_port, running_mosquitto
from tests.sites import write_small_site
from tests.tls import Pki, make_test_pki

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


class TlsBroker:
    """mosquitto with its plain listener (for the paho publisher) and one TLS listener."""

    def __init__(self, broker: MosquittoBroker, tls_port: int) -> None:
        self.broker = broker
        self.port = broker.port
        self.tls_port = tls_port


@pytest.fixture
async def tls_broker(tmp_path: Path, pki: Pki) -> AsyncIterator[TlsBroker]:
    tls_port = free_port()
    async with running_mosquitto(
        tmp_path / "mosquitto", extra_config=pki.mosquitto_listener(tls_port)
    ) as broker:
        yield TlsBroker(broker, tls_port)


@pytest.fixture
async def mtls_broker(tmp_path: Path, pki: Pki) -> AsyncIterator[TlsBroker]:
    tls_port = free_port()
    listener = pki.mosquitto_listener(tls_port, require_client_cert=True)
    async with running_mosquitto(tmp_path / "mosquitto", extra_config=listener) as broker:
        yield TlsBroker(broker, tls_port)


def site_tls_context(tmp_path: Path, port: int, tls_lines: list[str]) -> ssl.SSLContext:
    """The context `Runtime` would build from a site file with these ``[mqtt.tls]`` keys."""
    (tmp_path / "site").mkdir(exist_ok=True)
    path = write_small_site(tmp_path / "site", mqtt_port=port)
    with path.open("a") as f:
        f.write("\n[mqtt.tls]\n" + "\n".join(tls_lines) + "\n")
    ctx = build_ssl_context(load_site(path))
    assert ctx is not None
    return ctx


async def test_server_tls_receive_ack_and_redelivery(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path
) -> None:
    ctx = site_tls_context(
        tmp_path, tls_broker.tls_port, ["enabled = true", f'ca_file = "{pki.ca_cert}"']
    )
    first = Collector(should_ack=lambda m: int(m.payload) < 5)
    link = make_link(tls_broker.tls_port, first, client_id="tls", ssl_context=ctx)
    async with running(link):
        await link.wait_up(5)
        await publish(tls_broker.port, numbered(10))
        await first.wait_until(lambda ms: len(ms) >= 10)
    assert link.stats.acks_sent == 5

    second = Collector()
    relink = make_link(tls_broker.tls_port, second, client_id="tls", ssl_context=ctx)
    async with running(relink):
        await relink.wait_up(5)
        assert relink.session_present
        await second.wait_until(lambda ms: len(ms) >= 5)
        await publish(tls_broker.port, [("shelf/end", b"end")])
        await second.wait_for_payload(b"end")
    assert sorted(second.payloads()) == sorted([str(i).encode() for i in range(5, 10)] + [b"end"])


async def test_mutual_tls_needs_the_client_certificate(
    mtls_broker: TlsBroker, pki: Pki, tmp_path: Path
) -> None:
    ctx = site_tls_context(
        tmp_path,
        mtls_broker.tls_port,
        [
            "enabled = true",
            f'ca_file = "{pki.ca_cert}"',
            f'cert_file = "{pki.client_cert}"',
            f'key_file = "{pki.client_key}"',
        ],
    )
    collector = Collector()
    link = make_link(mtls_broker.tls_port, collector, client_id="mtls", ssl_context=ctx)
    async with running(link):
        await link.wait_up(5)
        await publish(mtls_broker.port, [("shelf/m", b"m")])
        await collector.wait_for_payload(b"m")

    # The same CA but no client certificate: the broker refuses the handshake.
    bare = ssl.create_default_context(cafile=str(pki.ca_cert))
    anonymous = make_link(
        mtls_broker.tls_port, Collector(), client_id="mtls-anon", ssl_context=bare
    )
    refused = entered(anonymous, LinkState.DOWN, 1)
    async with running(anonymous):
        await asyncio.wait_for(refused.wait(), 10)
    assert anonymous.stats.connects == 0
    # Either the broker's TLS alert was read, or only its reset: both name the settings.
    assert "TLS handshake failed" in anonymous.last_error, anonymous.last_error
    assert "cert_file" in anonymous.last_error, anonymous.last_error


async def test_a_broker_certificate_from_another_ca_is_refused_with_a_clear_error(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = site_tls_context(
        tmp_path, tls_broker.tls_port, ["enabled = true", f'ca_file = "{pki.other_ca_cert}"']
    )
    link = make_link(tls_broker.tls_port, Collector(), client_id="wrong-ca", ssl_context=ctx)
    third = entered(link, LinkState.DOWN, 3)
    with caplog.at_level(logging.INFO):
        async with running(link):
            await asyncio.wait_for(third.wait(), 10)
    assert link.stats.connects == 0
    assert "certificate verify failed" in link.last_error, link.last_error
    assert "ca_file" in link.last_error, link.last_error
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]  # once, not per retry
    assert "certificate verify failed" in errors[0].getMessage()
    assert "ca_file" in errors[0].getMessage()
