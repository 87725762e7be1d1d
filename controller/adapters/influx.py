"""InfluxDB sinks for the historian, and the line-protocol formatter they share.

* ``format_line`` is a specialised line-protocol formatter, byte-equal to influxdb-client's
  ``Point(...).to_line_protocol()`` with an integer millisecond time (a hypothesis property
  test holds it to that). ``LineEncoder`` caches each series' escaped prefix, so a reading costs
  one dict lookup and a few string joins instead of Point's ~7 µs.
* ``InfluxV2Sink`` writes through influxdb-client's v2 write API (InfluxDB 2.x, 3.x, 1.8+,
  VictoriaMetrics) and queries with Flux. The client is synchronous (its async flavour needs
  aiohttp): every call runs on the sink's own single worker thread, never on the event loop.
* ``InfluxV1Sink`` speaks the 1.x HTTP API with httpx: ``/write?db=&rp=&precision=ms`` and
  InfluxQL on ``/query``. ``precision=ms`` is always sent: without it a 1.x server reads the
  timestamps as nanoseconds and stores the points in 1970 with a 204.

Every sink translates its client's errors into ``SinkUnavailable`` (retryable) and
``SinkRejected`` (HTTP 400/413/422: a bad point or a field type conflict). No httpx, urllib3 or
influxdb-client exception leaves this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from controller.ports import (
    FieldValue,
    HistoryPoint,
    HistoryQuery,
    ShelfHistoryRaw,
    SinkRejected,
    SinkUnavailable,
)

# The escaping tables of influxdb-client's Point (the reference for byte equality).
_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans(
    {",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"}
)
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})

REJECT_STATUSES = frozenset({400, 413, 422})
"""HTTP statuses that mean "this batch holds something the server will never take"."""

GZIP_LEVEL = 1
"""Fast compression: level 1 shrinks line protocol ~8× at a fraction of level 9's CPU."""

_THREAD_GZIP_BYTES = 64 * 1024
"""Bodies above this are compressed on a worker thread (zlib releases the GIL)."""


# -- line protocol ------------------------------------------------------------------------------
def escape_tag_value(value: str) -> str:
    out = value.translate(_ESCAPE_KEY)
    if out.endswith("\\"):
        out += " "
    return out


def format_tags(tags: Iterable[tuple[str, str]]) -> str:
    """``,k=v,k=v`` sorted by key, empty keys or values left out (as Point does)."""
    parts = []
    for key, value in sorted(tags):
        k = key.translate(_ESCAPE_KEY)
        v = escape_tag_value(value)
        if k and v:
            parts.append(f"{k}={v}")
    return "," + ",".join(parts) if parts else ""


def format_fields(fields: Iterable[tuple[str, FieldValue | None]]) -> str:
    """``k=v,...`` sorted by key; ``None`` and non-finite floats left out (as Point does)."""
    parts = []
    for key, value in sorted(fields, key=lambda kv: kv[0]):
        if value is None:
            continue
        k = key.translate(_ESCAPE_KEY)
        if isinstance(value, float):
            if not math.isfinite(value):
                continue
            s = str(value)
            if s.endswith(".0"):
                s = s[:-2]
            parts.append(f"{k}={s}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{k}={value}i")
        elif isinstance(value, bool):
            parts.append(f"{k}={'true' if value else 'false'}")
        elif isinstance(value, str):
            parts.append(f'{k}="{value.translate(_ESCAPE_STRING)}"')
        else:
            raise ValueError(f"field {key!r}: unsupported type {type(value).__name__}")
    return ",".join(parts)


def format_line(
    measurement: str,
    tags: Mapping[str, str] | Iterable[tuple[str, str]],
    fields: Mapping[str, FieldValue | None] | Iterable[tuple[str, FieldValue | None]],
    ts_ms: int,
) -> str:
    """One line of line protocol with a millisecond timestamp; ``""`` when no field is left
    (Point's behaviour: such a point is not written)."""
    tag_items = tags.items() if isinstance(tags, Mapping) else tags
    field_items = fields.items() if isinstance(fields, Mapping) else fields
    f = format_fields(field_items)
    if not f:
        return ""
    return f"{measurement.translate(_ESCAPE_MEASUREMENT)}{format_tags(tag_items)} {f} {ts_ms}"


class LineEncoder:
    """Formats HistoryPoints, caching the escaped ``measurement,tags `` prefix per series."""

    def __init__(self, max_series: int = 100_000) -> None:
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._keys: dict[str, str] = {}
        self._max_series = max_series

    def fields(self, fields: tuple[tuple[str, FieldValue], ...]) -> str:
        """``format_fields`` for a HistoryPoint's fields (sorted, unique keys by contract),
        with escaped keys cached and exact-type dispatch."""
        parts = []
        keys = self._keys
        for key, value in fields:
            k = keys.get(key)
            if k is None:
                if len(keys) > 10_000:
                    keys.clear()
                k = keys[key] = key.translate(_ESCAPE_KEY)
            t = type(value)
            if t is float:
                if value - value != 0:  # type: ignore[operator]  # NaN or ±inf: left out
                    continue
                s = repr(value)
                if s[-2:] == ".0":
                    s = s[:-2]
                parts.append(f"{k}={s}")
            elif t is int:
                parts.append(f"{k}={value}i")
            elif t is str:
                parts.append(f'{k}="{value.translate(_ESCAPE_STRING)}"')  # type: ignore[union-attr]
            else:
                f = format_fields(((key, value),))
                if f:
                    parts.append(f)
        return ",".join(parts)

    def line(self, p: HistoryPoint) -> str:
        key = (p.measurement, p.tags)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = f"{p.measurement.translate(_ESCAPE_MEASUREMENT)}{format_tags(p.tags)} "
            if len(self._prefixes) >= self._max_series:
                self._prefixes.clear()
            self._prefixes[key] = prefix
        f = self.fields(p.fields)
        if not f:
            return ""
        return f"{prefix}{f} {p.ts_ms}"

    def encode(self, points: Iterable[HistoryPoint]) -> bytes:
        """Newline-separated lines (points without a field are skipped)."""
        line = self.line
        return "\n".join([s for s in (line(p) for p in points) if s]).encode()

    async def encode_async(self, points: Sequence[HistoryPoint], chunk: int = 1_000) -> bytes:
        """``encode`` in slices, yielding to the event loop between them (~2 ms each)."""
        if len(points) <= chunk:
            return self.encode(points)
        line = self.line
        lines: list[str] = []
        for start in range(0, len(points), chunk):
            if start:
                await asyncio.sleep(0)
            lines.extend(s for s in (line(p) for p in points[start : start + chunk]) if s)
        return "\n".join(lines).encode()


async def _compress(body: bytes) -> bytes:
    if len(body) > _THREAD_GZIP_BYTES:
        return await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL)
    return gzip.compress(body, GZIP_LEVEL)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _raise_for_status(status: int, text: str, retry_after: str | None, what: str) -> None:
    if 200 <= status < 300:
        return
    detail = f"{what}: HTTP {status}: {text.strip()[:500]}"
    if status in REJECT_STATUSES:
        raise SinkRejected(detail, status=status)
    raise SinkUnavailable(detail, retry_after_s=_retry_after(retry_after))


def _quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quote_str(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- InfluxDB 1.x -------------------------------------------------------------------------------
class InfluxV1Sink:
    """InfluxDB 1.x: ``POST /write?db=&rp=&precision=ms`` (gzip), InfluxQL ``/query``."""

    backend = "influxdb1"

    def __init__(
        self,
        url: str,
        db: str,
        rp: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout_s: float = 10.0,
        use_gzip: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.db = db
        self.rp = rp
        self.use_gzip = use_gzip
        headers = {"User-Agent": "floorhand-historian"}
        if token:
            headers["Authorization"] = f"Token {token}"
        auth = httpx.BasicAuth(username, password or "") if username else None
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s),
            headers=headers,
            auth=auth,
            trust_env=False,
        )
        self._encoder = LineEncoder()

    async def write(self, points: Sequence[HistoryPoint]) -> None:
        body = await self._encoder.encode_async(points)
        if not body:
            return
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.use_gzip:
            body = await _compress(body)
            headers["Content-Encoding"] = "gzip"
        params = {"db": self.db, "precision": "ms"}
        if self.rp:
            params["rp"] = self.rp
        try:
            r = await self._client.post("/write", params=params, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise SinkUnavailable(f"influxdb1 write timed out: {exc!r}") from None
        except httpx.HTTPError as exc:
            raise SinkUnavailable(f"influxdb1 unreachable: {exc!r}") from None
        _raise_for_status(r.status_code, r.text, r.headers.get("Retry-After"), "influxdb1 write")

    async def influxql(self, statements: str) -> list[dict[str, Any]]:
        """Run InfluxQL (``;``-separated) with ms epochs; the ``results`` list."""
        try:
            r = await self._client.post(
                "/query", data={"db": self.db, "q": statements, "epoch": "ms"}
            )
        except httpx.HTTPError as exc:
            raise SinkUnavailable(f"influxdb1 query failed: {exc!r}") from None
        _raise_for_status(r.status_code, r.text, r.headers.get("Retry-After"), "influxdb1 query")
        try:
            results: list[dict[str, Any]] = r.json()["results"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SinkUnavailable(f"influxdb1 query: unreadable answer: {exc!r}") from None
        for res in results:
            if "error" in res:
                raise SinkUnavailable(f"influxdb1 query: {res['error']}")
        return results

    def _from(self, measurement: str) -> str:
        if self.rp:
            return f"{_quote_ident(self.db)}.{_quote_ident(self.rp)}.{_quote_ident(measurement)}"
        return _quote_ident(measurement)

    def influxql_for(self, q: HistoryQuery) -> str:
        """The three statements answering a history query (weight, units, units before)."""
        tag, value = ("shelf", q.shelf) if q.shelf is not None else ("sku", q.sku)
        assert value is not None
        where = f"{_quote_ident(tag)} = {_quote_str(value)}"
        rng = f"time >= {q.from_ms}ms AND time < {q.to_ms}ms"
        every = f"time({q.every_ms}ms)"
        return ";".join(
            [
                'SELECT mean("weight_g"), min("weight_g"), max("weight_g"), count("weight_g") '
                f"FROM {self._from('weight')} WHERE {where} AND {rng} "
                f'GROUP BY {every}, "shelf" fill(none)',
                f'SELECT last("units") FROM {self._from("stock")} WHERE {where} AND {rng} '
                f'GROUP BY {every}, "shelf" fill(none)',
                f'SELECT last("units") FROM {self._from("stock")} WHERE {where} '
                f'AND time < {q.from_ms}ms GROUP BY "shelf"',
            ]
        )

    async def query(self, q: HistoryQuery) -> list[ShelfHistoryRaw]:
        results = await self.influxql(self.influxql_for(q))
        try:
            return parse_influxql_history(results)
        except _UNREADABLE as exc:
            raise SinkRejected(f"influxdb1 query: unreadable answer: {exc!r}") from None

    async def ping(self) -> bool:
        try:
            r = await self._client.get("/ping")
        except httpx.HTTPError:
            return False
        return r.status_code == 204

    async def aclose(self) -> None:
        await self._client.aclose()


def parse_influxql_history(results: list[dict[str, Any]]) -> list[ShelfHistoryRaw]:
    """Fold the three InfluxQL results of ``InfluxV1Sink.influxql_for`` into per-shelf data."""
    weight: dict[str, list[tuple[int, float, float, float, int]]] = {}
    units: dict[str, list[tuple[int, int]]] = {}
    before: dict[str, int] = {}

    def series(i: int) -> list[dict[str, Any]]:
        if i >= len(results):
            return []
        out: list[dict[str, Any]] = results[i].get("series") or []
        return out

    for s in series(0):
        shelf = str((s.get("tags") or {}).get("shelf", ""))
        rows = weight.setdefault(shelf, [])
        for t, mean, lo, hi, n in s.get("values") or []:
            if n:
                rows.append((int(t), float(mean), float(lo), float(hi), int(n)))
    for s in series(1):
        shelf = str((s.get("tags") or {}).get("shelf", ""))
        urows = units.setdefault(shelf, [])
        for t, last in s.get("values") or []:
            if last is not None:
                urows.append((int(t), int(last)))
    for s in series(2):
        shelf = str((s.get("tags") or {}).get("shelf", ""))
        for _t, last in s.get("values") or []:
            if last is not None:
                before[shelf] = int(last)
    shelves = sorted(set(weight) | set(units) | set(before))
    return [
        ShelfHistoryRaw(
            shelf=s,
            weight=sorted(weight.get(s, [])),
            units=sorted(units.get(s, [])),
            units_before=before.get(s),
        )
        for s in shelves
    ]


# -- InfluxDB v2 API ----------------------------------------------------------------------------
FLUX_HISTORY = """
data = from(bucket: params.bucket)
  |> range(start: params.start, stop: params.stop)
  |> filter(fn: (r) => r._measurement == "weight" and r._field == "weight_g" and {cond})
  |> group(columns: ["shelf"])
data |> aggregateWindow(every: params.every, fn: mean, createEmpty: false, timeSrc: "_start")
  |> yield(name: "mean")
data |> aggregateWindow(every: params.every, fn: min, createEmpty: false, timeSrc: "_start")
  |> yield(name: "min")
data |> aggregateWindow(every: params.every, fn: max, createEmpty: false, timeSrc: "_start")
  |> yield(name: "max")
data |> aggregateWindow(every: params.every, fn: count, createEmpty: false, timeSrc: "_start")
  |> yield(name: "count")
from(bucket: params.bucket)
  |> range(start: params.start, stop: params.stop)
  |> filter(fn: (r) => r._measurement == "stock" and r._field == "units" and {cond})
  |> group(columns: ["shelf"])
  |> aggregateWindow(every: params.every, fn: last, createEmpty: false, timeSrc: "_start")
  |> yield(name: "units")
from(bucket: params.bucket)
  |> range(start: 0, stop: params.start)
  |> filter(fn: (r) => r._measurement == "stock" and r._field == "units" and {cond})
  |> group(columns: ["shelf"])
  |> last()
  |> yield(name: "before")
"""


def flux_for(q: HistoryQuery, bucket: str) -> tuple[str, dict[str, Any]]:
    """The Flux program and its ``params`` (values are passed as parameters, not spliced)."""
    tag = "shelf" if q.shelf is not None else "sku"
    value = q.shelf if q.shelf is not None else q.sku
    params: dict[str, Any] = {
        "bucket": bucket,
        "value": value,
        "start": datetime.fromtimestamp(q.from_ms / 1000, UTC),
        "stop": datetime.fromtimestamp(q.to_ms / 1000, UTC),
        "every": timedelta(milliseconds=q.every_ms),
    }
    return FLUX_HISTORY.replace("{cond}", f"r.{tag} == params.value"), params


def parse_flux_history(records: Iterable[Mapping[str, Any]]) -> list[ShelfHistoryRaw]:
    """Fold Flux records (``result``, ``shelf``, ``_time``, ``_value``) into per-shelf data."""
    agg: dict[str, dict[int, dict[str, float]]] = {}
    units: dict[str, list[tuple[int, int]]] = {}
    before: dict[str, int] = {}
    for rec in records:
        result = rec.get("result")
        shelf = str(rec.get("shelf", ""))
        value = rec.get("_value")
        t = rec.get("_time")
        if value is None or not isinstance(t, datetime):
            continue
        t_ms = round(t.timestamp() * 1000)
        if result in ("mean", "min", "max", "count"):
            agg.setdefault(shelf, {}).setdefault(t_ms, {})[str(result)] = float(value)
        elif result == "units":
            units.setdefault(shelf, []).append((t_ms, int(value)))
        elif result == "before":
            before[shelf] = int(value)
    weight: dict[str, list[tuple[int, float, float, float, int]]] = {}
    for shelf, buckets in agg.items():
        rows = weight.setdefault(shelf, [])
        for t_ms, a in sorted(buckets.items()):
            if a.get("count") and "mean" in a:
                rows.append(
                    (
                        t_ms,
                        a["mean"],
                        a.get("min", a["mean"]),
                        a.get("max", a["mean"]),
                        int(a["count"]),
                    )
                )
    shelves = sorted(set(weight) | set(units) | set(before))
    return [
        ShelfHistoryRaw(s, weight.get(s, []), sorted(units.get(s, [])), before.get(s))
        for s in shelves
    ]


class InfluxV2Sink:
    """influxdb-client's v2 write API (synchronous client on one worker thread) and Flux."""

    backend = "influxdb2"

    def __init__(
        self,
        url: str,
        org: str,
        bucket: str,
        token: str | None,
        *,
        timeout_s: float = 10.0,
        use_gzip: bool = True,
    ) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.url = url.rstrip("/")
        self.org = org
        self.bucket = bucket
        # retries=False: the historian owns retrying (capped backoff, same bytes every time).
        self._client = InfluxDBClient(
            url=self.url,
            token=token or "",
            org=org,
            timeout=int(timeout_s * 1000),
            enable_gzip=use_gzip,
            retries=False,
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influx-v2")
        self._encoder = LineEncoder()

    async def write(self, points: Sequence[HistoryPoint]) -> None:
        body = await self._encoder.encode_async(points)
        if not body:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write_sync, body)

    def _write_sync(self, body: bytes) -> None:
        try:
            # Explicit millisecond precision, always (the lines carry ms timestamps).
            self._write_api.write(
                bucket=self.bucket,
                org=self.org,
                record=body,
                write_precision="ms",  # type: ignore[arg-type]  # WritePrecision.MS is "ms"
            )
        except Exception as exc:
            raise _translate_v2(exc, "influxdb2 write") from None

    async def query(self, q: HistoryQuery) -> list[ShelfHistoryRaw]:
        flux, params = flux_for(q, self.bucket)
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(self._executor, self._query_sync, flux, params)
        try:
            return parse_flux_history(records)
        except _UNREADABLE as exc:
            raise SinkRejected(f"influxdb2 query: unreadable answer: {exc!r}") from None

    def _query_sync(self, flux: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            tables = self._client.query_api().query(flux, org=self.org, params=params)
        except Exception as exc:
            error = _translate_v2(exc, "influxdb2 query")
            status = getattr(exc, "status", None)
            if isinstance(error, SinkRejected) or status in (404, 405):
                # The server is there but has no Flux query endpoint (VictoriaMetrics answers
                # 400, InfluxDB 1.x 404): a configuration error, not an outage.
                raise SinkRejected(
                    f"{error}; {self.url} does not answer Flux queries (/api/v2/query): history "
                    'queries with backend = "influxdb2" need an InfluxDB 2 server (InfluxDB 1.x: '
                    'backend = "influxdb1"; VictoriaMetrics stores the writes of either but '
                    "answers neither query language)",
                    status=int(status) if isinstance(status, int) else None,
                ) from None
            raise error from None
        out: list[dict[str, Any]] = []
        for table in tables:
            for rec in table.records:
                out.append(dict(rec.values))
        return out

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        self._write_api.close()  # type: ignore[no-untyped-call]
        self._client.close()  # type: ignore[no-untyped-call]


_UNREADABLE = (KeyError, IndexError, TypeError, ValueError, AttributeError)
"""What parsing a query answer of an unexpected shape raises."""


def _translate_v2(exc: Exception, what: str) -> Exception:
    """influxdb-client / urllib3 errors → SinkRejected or SinkUnavailable."""
    from influxdb_client.rest import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
        text = str(body or exc.reason or "")
        headers: Any = exc.headers or {}
        retry_after = headers.get("Retry-After") if hasattr(headers, "get") else None
        try:
            _raise_for_status(status, text, retry_after, what)
        except (SinkRejected, SinkUnavailable) as translated:
            return translated
        return SinkUnavailable(f"{what}: HTTP {status}")
    return SinkUnavailable(f"{what}: {type(exc).__name__}: {exc}")
