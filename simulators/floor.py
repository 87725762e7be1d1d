"""A simulated floor: a WMS issuing pick requests, and the pickers who carry them out.

* The **WMS** publishes a pick request every ``order_interval_s`` (simulated seconds) on the
  controller's MQTT command topic ``<prefix>/<site>/cmd/picks`` — one to three lines of SKUs
  that have stock on the simulated shelves, for a random pack station — and reads the replies
  on ``…/result``.
* The **pickers** subscribe to the pick instructions ``<prefix>/<site>/picks/<zone>`` the
  controller publishes for every task and, after a short walk (``picker_delay_s``), take the
  units from the shelf of the simulated scales (`WarehouseScales.pick`). The scale then
  reports the lower weight, which is what confirms the pick in the controller. A picker who
  finds fewer units than asked takes what is there (the controller reports a SHORT pick).

Only the payloads of docs/picking.md are used; nothing here imports the controller.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from simulators.shelf_scale import WarehouseScales
from simulators.site import Site

__all__ = ["FloorStats", "FloorSystem", "load_pack_stations"]

log = logging.getLogger("simulators.floor")


def load_pack_stations(path: str | Path) -> list[str]:
    """The ``[[pack_stations]]`` ids of a site file (empty when it has none)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    stations = data.get("pack_stations", [])
    if not isinstance(stations, list):
        return []
    return [str(s["id"]) for s in stations if isinstance(s, dict) and "id" in s]


@dataclass
class FloorStats:
    orders_sent: int = 0
    replies: Counter[int] = field(default_factory=Counter)
    instructions: int = 0
    units_picked: int = 0
    short_picks: int = 0

    def summary(self) -> str:
        replies = ", ".join(f"{k}: {v}" for k, v in sorted(self.replies.items())) or "none"
        return (
            f"orders sent {self.orders_sent} (replies {replies}), pick instructions "
            f"{self.instructions}, units picked {self.units_picked}, short {self.short_picks}"
        )


class FloorSystem:
    def __init__(
        self,
        site: Site,
        scales: WarehouseScales,
        url: str,
        username: str | None,
        password: str | None,
        *,
        pack_stations: Sequence[str],
        order_interval_s: float = 8.0,
        picker_delay_s: tuple[float, float] = (1.0, 4.0),
        speed: float = 1.0,
        seed: int | None = None,
        channel: str = "demo-wms",
        client_id: str = "sim-floor",
    ) -> None:
        if not pack_stations:
            raise ValueError("no pack stations: the site has no [[pack_stations]]")
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"bad MQTT URL {url!r}")
        self.site = site
        self.scales = scales
        self.pack_stations = tuple(pack_stations)
        self.order_interval_s = order_interval_s
        self.picker_delay_s = picker_delay_s
        self.speed = speed
        self.channel = channel
        self.stats = FloorStats()
        self._prefix = f"{site.topic_prefix}/{site.id}"
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._tie = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._order_no = 0
        self._host, self._port = parts.hostname, parts.port or 1883
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    # -- life cycle -----------------------------------------------------------------------
    def start(self, connect_timeout_s: float = 10.0) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(connect_timeout_s):
            self._client.loop_stop()
            raise RuntimeError(f"floor simulator: no connection to {self._host}:{self._port}")
        self._schedule(self._first_order_delay(), self._send_order)
        self._thread = threading.Thread(target=self._run, name="sim-floor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._client.disconnect()
        self._client.loop_stop()

    # -- MQTT -----------------------------------------------------------------------------
    def _on_connect(self, c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("floor simulator: connection refused: %s", reason)
            return
        c.subscribe(f"{self._prefix}/picks/+", qos=1)
        c.subscribe(f"{self._prefix}/cmd/picks/result", qos=1)
        self._connected.set()

    def _on_message(self, c: Any, userdata: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if msg.topic.endswith("/cmd/picks/result"):
            status = body.get("status")
            if isinstance(status, int):
                with self._lock:
                    self.stats.replies[status] += 1
                if status >= 400:
                    log.info("pick request %s refused (%s): %s", body.get("order_id"), status,
                             body.get("detail"))  # fmt: skip
            return
        shelf, qty = body.get("shelf"), body.get("qty")
        if isinstance(shelf, str) and isinstance(qty, int) and qty > 0:
            with self._lock:
                self.stats.instructions += 1
            delay = self._rng.uniform(*self.picker_delay_s)
            self._schedule(delay, lambda: self._pick(shelf, qty))

    # -- behaviour ------------------------------------------------------------------------
    def _pick(self, shelf: str, qty: int) -> None:
        try:
            got = self.scales.pick(shelf, qty)
        except KeyError:
            return
        with self._lock:
            self.stats.units_picked += got
            if got < qty:
                self.stats.short_picks += 1

    def _send_order(self) -> None:
        lines = self._choose_lines()
        if lines:
            self._order_no += 1
            body = {
                "order_id": f"DEMO-{int(time.time())}-{self._order_no}",
                "channel": self.channel,
                "lines": [{"sku": sku, "qty": qty} for sku, qty in lines],
                "pack_station": self._rng.choice(self.pack_stations),
            }
            self._client.publish(f"{self._prefix}/cmd/picks", json.dumps(body).encode(), qos=1)
            with self._lock:
                self.stats.orders_sent += 1
        self._schedule(self.order_interval_s * self._rng.uniform(0.5, 1.5), self._send_order)

    def _choose_lines(self) -> list[tuple[str, int]]:
        """One to three SKUs that have a few units on their shelves."""
        stock: Counter[str] = Counter()
        for shelf in self.site.shelves:
            stock[shelf.sku] += self.scales.true_count(shelf.id)
        candidates = [sku for sku, n in stock.items() if n >= 4]
        if not candidates:
            return []
        chosen = self._rng.sample(candidates, k=min(len(candidates), self._rng.randint(1, 3)))
        return [(sku, self._rng.randint(1, min(3, stock[sku] // 2))) for sku in chosen]

    def _first_order_delay(self) -> float:
        return min(5.0, self.order_interval_s)

    # -- scheduler (simulated seconds / speed) --------------------------------------------
    def _schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._lock:
            due = time.monotonic() + delay_s / self.speed
            heapq.heappush(self._heap, (due, next(self._tie), action))
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    timeout = self._heap[0][0] - now if self._heap else None
                    self._wake.wait(timeout)
                if self._stopping:
                    return
                _, _, action = heapq.heappop(self._heap)
            try:
                action()
            except Exception:
                log.exception("floor simulator action failed")
