"""One owner per site: a retained claim on the broker, cleared by the owner's will.

The owner publishes its `OwnerClaim` retained on ``<prefix>/<site>/owner`` each time its
MQTT session comes up; its will is an empty retained message on the same topic, so the broker
deletes the claim when the owner's connection dies (at once when its process dies, after
1.5–3 × keepalive when its host or network does). A clean stop deletes the claim itself.

Before a new instance connects with the site's client id (which would take the session and
its queued readings over from a running owner), `OwnerProbe.check` connects with another,
clean-session client id, reads the retained claim, and if there is one asks the owner on
``<prefix>/<site>/owner/probe``; a live owner answers by publishing its claim again. See
docs/architecture.md ("One owner per site") for the decisions and timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from devices.errors import DeviceError, DeviceUnavailable
from devices.link.backoff import Backoff
from devices.link.mqtt import MqttLink, MqttLinkConfig, MqttMessage
from devices.link.state import LinkState

log = logging.getLogger("floorhand.owner")

WILL_WAIT_KEEPALIVES = 3.0
"""How many of the owner's keepalive periods to wait for its answer or its will. MQTT lets a
broker drop a silent client after 1.5 × keepalive; mosquitto 2.0.11 checks keepalives in
coarse buckets and was measured to take up to 3 × (4.9 s at keepalive 2 s, 12 s at 4 s)."""

ANSWER_MARGIN_S = 1.0
"""Added to that wait."""


def claim_topic(prefix: str, site_id: str) -> str:
    """Where the owner's retained claim lives."""
    return f"{prefix}/{site_id}/owner"


def probe_topic(prefix: str, site_id: str) -> str:
    """Where a starting instance asks the owner whether it is alive."""
    return f"{prefix}/{site_id}/owner/probe"


@dataclass(frozen=True, slots=True)
class OwnerClaim:
    """Who runs the site: enough for an operator to find that controller."""

    instance: str
    host: str
    pid: int
    client_id: str
    journal: str
    api: str
    since: float
    keepalive_s: float
    answer_to: str | None = None
    """The probe nonce this publication answers (None when published on connect)."""

    @classmethod
    def mine(cls, *, client_id: str, journal: str, api: str, keepalive_s: float) -> OwnerClaim:
        """The claim of this process (a new instance id per process)."""
        return cls(
            instance=secrets.token_hex(16),
            host=socket.gethostname(),
            pid=os.getpid(),
            client_id=client_id,
            journal=journal,
            api=api,
            since=time.time(),
            keepalive_s=keepalive_s,
        )

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def parse(cls, payload: bytes, default_keepalive_s: float) -> OwnerClaim | None:
        """None for an empty payload (no owner). A payload that is not a claim of this
        shape still counts as a claim (of an unknown owner): the site is not taken lightly."""
        if not payload:
            return None
        try:
            body = orjson.loads(payload)
            keepalive_s = float(body["keepalive_s"])
            if not 0 < keepalive_s <= 65_535:
                raise ValueError(keepalive_s)
            return cls(
                instance=str(body["instance"]),
                host=str(body["host"]),
                pid=int(body["pid"]),
                client_id=str(body["client_id"]),
                journal=str(body["journal"]),
                api=str(body["api"]),
                since=float(body["since"]),
                keepalive_s=keepalive_s,
                answer_to=None if body.get("answer_to") is None else str(body["answer_to"]),
            )
        except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            return cls("?", "an unknown host", 0, "?", "?", "?", 0.0, default_keepalive_s)

    def answering(self, nonce: str) -> OwnerClaim:
        return dataclasses.replace(self, answer_to=nonce)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return (
            f"pid {self.pid} on {self.host} (client id {self.client_id}, journal "
            f"{self.journal}, API {self.api}, since {since})"
        )


class SiteOwned(Exception):
    """A live controller owns the site: this instance must not start."""

    def __init__(self, site_id: str, claim: OwnerClaim) -> None:
        self.claim = claim
        super().__init__(
            f"site {site_id} is owned by a running controller: {claim.describe()} (taking "
            "its MQTT session would take its queued readings over); stop that controller first"
        )


def refusal(exc: BaseException) -> BaseException | None:
    """The reason another controller owns the site (its journal or its live claim), if that
    is why the runtime stopped: an operator's message, not a crash."""
    from controller.adapters.journal import JournalLocked

    if isinstance(exc, (JournalLocked, SiteOwned)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = refusal(inner)
            if found is not None:
                return found
    return None


class OwnerProbe:
    """Asks the broker, with a throw-away clean-session client, whether a live controller
    owns the site. Credentials, TLS and protocol are those of the site's own link."""

    def __init__(
        self,
        site_link: MqttLinkConfig,
        *,
        site_id: str,
        claim_topic: str,
        probe_topic: str,
    ) -> None:
        self._base = site_link
        self.site_id = site_id
        self.claim_topic = claim_topic
        self.probe_topic = probe_topic

    async def check(self, on_unreachable: Callable[[], None] | None = None) -> OwnerClaim | None:
        """Return None when nobody owns the site, or the stale claim found (nobody answered
        for it); raise `SiteOwned` when a live owner answered. While the broker cannot be
        reached the probe's link keeps retrying (logged once) and ``on_unreachable()`` is
        called once. `DeviceUnavailable`/`TimeoutError`: the probe was cut short (connection
        lost, broker too slow): ask again. The link's fatal errors (`AuthError`,
        `DeviceConfigError`) pass through."""
        nonce = secrets.token_hex(8)
        inbox: asyncio.Queue[MqttMessage | None] = asyncio.Queue()  # None: connection lost
        config = dataclasses.replace(
            self._base,
            client_id=f"{self._base.client_id}-probe-{nonce[:8]}",
            clean_start=True,
            session_expiry_s=0,
            subscriptions=((self.claim_topic, 0), (self.probe_topic, 0)),
            will=None,
        )

        def on_messages(msgs: list[MqttMessage]) -> None:
            for msg in msgs:
                inbox.put_nowait(msg)

        link = MqttLink(config, on_messages, name="owner-probe", logger=log)
        ever_up = False

        def on_state(old: LinkState, new: LinkState) -> None:
            nonlocal ever_up, on_unreachable
            if new is LinkState.UP:
                ever_up = True
            elif new is LinkState.DOWN and ever_up:
                inbox.put_nowait(None)
            elif new is LinkState.DOWN and on_unreachable is not None:
                on_unreachable()
                on_unreachable = None

        link.watch.add_listener(on_state)
        runner = asyncio.create_task(link.run(), name="owner-probe")
        try:
            await self._connected(link, runner)
            request = {"nonce": nonce, "host": socket.gethostname(), "pid": os.getpid()}
            link.publish(self.probe_topic, orjson.dumps(request), qos=1)
            claim = await self._retained_claim(inbox, nonce)
            if claim is None:
                return None
            return await self._answer_or_gone(inbox, claim)
        finally:
            runner.cancel()  # the link leaves politely (DISCONNECT) when cancelled
            with contextlib.suppress(asyncio.CancelledError, DeviceError, OSError):
                await runner

    @staticmethod
    async def _connected(link: MqttLink, runner: asyncio.Task[None]) -> None:
        """Until the probe's link is up (it retries by itself); its fatal errors raise."""
        up = asyncio.ensure_future(link.watch.wait_for(LinkState.UP, math.inf))
        try:
            await asyncio.wait({runner, up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
        if runner.done():
            runner.result()  # a fatal refusal (bad credentials...) is raised here
            raise DeviceUnavailable("owner probe: the link stopped")

    async def _retained_claim(
        self, inbox: asyncio.Queue[MqttMessage | None], nonce: str
    ) -> OwnerClaim | None:
        """The retained claim, if any. The broker sends retained messages right after the
        SUBACK, before it handles our next PUBLISH: the echo of our own probe request marks
        the end of what was retained."""
        claim: OwnerClaim | None = None
        async with asyncio.timeout(self._base.connect_timeout_s):
            while True:
                msg = _received(await inbox.get())
                if msg.topic == self.claim_topic:
                    claim = OwnerClaim.parse(msg.payload, self._base.keepalive_s)
                elif msg.topic == self.probe_topic and probe_nonce(msg.payload) == nonce:
                    return claim

    async def _answer_or_gone(
        self, inbox: asyncio.Queue[MqttMessage | None], claim: OwnerClaim
    ) -> OwnerClaim | None:
        """A live owner answers at once. An owner whose process or host died loses its
        connection once the broker notices the silence (keepalive), and then the broker
        publishes its will (the empty claim). Silence for longer: the claim is stale (its
        owner stopped while the broker was unreachable, or the broker lost the will)."""
        wait_s = WILL_WAIT_KEEPALIVES * claim.keepalive_s + ANSWER_MARGIN_S
        log.info(
            "site %s claimed by %s; asked it whether it is alive, waiting for its answer "
            "(or its will) up to %.1f s",
            self.site_id,
            claim.describe(),
            wait_s,
        )
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    msg = _received(await inbox.get())
                    if msg.topic != self.claim_topic:
                        continue
                    live = OwnerClaim.parse(msg.payload, self._base.keepalive_s)
                    if live is None:
                        log.info("site %s: owner gone (its claim was cleared)", self.site_id)
                        return None
                    # Published after we subscribed: the owner is alive (an answer to us
                    # or to another probe, or a re-claim after its reconnect).
                    raise SiteOwned(self.site_id, live)
        except TimeoutError:
            log.warning(
                "site %s: stale owner claim of %s: no answer and no will within %.1f s; "
                "taking the site over",
                self.site_id,
                claim.describe(),
                wait_s,
            )
            return claim


def _received(msg: MqttMessage | None) -> MqttMessage:
    if msg is None:
        raise DeviceUnavailable("owner probe: connection lost, asking again")
    return msg


def probe_backoff(max_s: float) -> Backoff:
    """Between owner probes cut short by the broker: 0.1 s doubling to ``max_s`` (the MQTT
    link's ``backoff_max_s``), no jitter."""
    return Backoff(min(0.1, max_s), max_s, jitter=0.0)


def probe_nonce(payload: bytes) -> str | None:
    """The nonce of a probe request (None for anything else)."""
    try:
        body: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    nonce = body.get("nonce") if isinstance(body, dict) else None
    return nonce if isinstance(nonce, str) and 0 < len(nonce) <= 64 else None


class SiteOwnership:
    """The owner's side: its claim published on every connect of its session, answers to
    probes, the release on a clean stop, and the check that comes before the session's
    first connect (`check_before_connecting`)."""

    def __init__(
        self,
        *,
        prefix: str,
        site_id: str,
        client_id: str,
        journal: str,
        api: str,
        keepalive_s: float,
    ) -> None:
        self.site_id = site_id
        self.claim_topic = claim_topic(prefix, site_id)
        self.probe_topic = probe_topic(prefix, site_id)
        self.claim = OwnerClaim.mine(
            client_id=client_id, journal=journal, api=api, keepalive_s=keepalive_s
        )
        self.checked = asyncio.Event()
        """Set once the first check is over: answered, or the broker could not be asked."""
        self.stale_claim: OwnerClaim | None = None
        self._link: MqttLink | None = None
        self._released = False

    def link_config(self, config: MqttLinkConfig) -> MqttLinkConfig:
        """The session's link config with the will (an empty retained claim: deletes the
        claim when the connection dies) and the probe subscription (QoS 0: a probe is only
        worth answering while it waits)."""
        return dataclasses.replace(
            config,
            will=(self.claim_topic, b"", 1, True),
            subscriptions=(*config.subscriptions, (self.probe_topic, 0)),
        )

    def attach(self, link: MqttLink) -> None:
        """Publish the claim each time ``link`` (the session) comes up."""
        self._link = link
        link.watch.add_listener(self._on_state)

    def _on_state(self, old: LinkState, new: LinkState) -> None:
        if new is LinkState.UP and not self._released:
            self._publish(self.claim)

    def on_probes(self, msgs: list[MqttMessage]) -> None:
        """Answer probe requests: publish the claim again, naming the request's nonce."""
        for msg in msgs:
            nonce = probe_nonce(msg.payload)
            if nonce is not None:
                self._publish(self.claim.answering(nonce))

    def _publish(self, claim: OwnerClaim) -> None:
        assert self._link is not None
        try:
            self._link.publish(self.claim_topic, claim.to_json(), qos=1, retain=True)
        except DeviceError as exc:  # queue full while down: the next connect claims again
            log.warning("could not publish the owner claim: %s", exc)

    async def check_before_connecting(self, probe: OwnerProbe, backoff_max_s: float) -> None:
        """Return once no live controller owns the site; raise `SiteOwned` if one does.
        The session must not connect before the answer: while the broker cannot be reached
        the probe keeps trying; ``checked`` is set once the broker answered, or once it
        turned out unreachable."""

        def unreachable() -> None:
            log.warning(
                "cannot ask the broker who owns site %s yet: the MQTT session waits for the answer",
                self.site_id,
            )
            self.checked.set()

        backoff = probe_backoff(backoff_max_s)
        while True:
            try:
                self.stale_claim = await probe.check(on_unreachable=unreachable)
            except (DeviceUnavailable, OSError, TimeoutError) as exc:
                log.warning("site %s: owner probe cut short (%s), asking again", self.site_id, exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            self.checked.set()
            return

    async def release(self, timeout_s: float) -> None:
        """Delete the claim (clean stop), waiting at most ``timeout_s`` for the broker."""
        self._released = True  # a reconnect during the stop must not claim again
        link = self._link
        if link is None or link.state is not LinkState.UP:
            return  # the claim stays until our will or a probe's wait clears it
        try:
            link.publish(self.claim_topic, b"", qos=1, retain=True)
        except DeviceError as exc:
            log.warning("could not clear the owner claim: %s", exc)
            return
        if not await link.drain_publishes(timeout_s):
            log.warning("owner claim not confirmed cleared within %.1f s", timeout_s)
