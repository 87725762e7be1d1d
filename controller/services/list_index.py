"""Pages of a long list (SKUs, shelves, scales, alert targets) by zone, state and text, in
O(the page), from indexes built once.

A ``ListIndex`` holds keys in a fixed order (the site's) and, per key, the zones it belongs to
and its search text: both never change while the controller runs, so each zone's keys and each
text query's matches are sorted position lists. A **facet** is a live value per key (a SKU's
stock state, a shelf's status, an alert's state): an *indexed* facet keeps, per value and per
zone, the sorted positions of the keys that have it, built on first use from the live state and
then moved by ``update(keys)``, which the read model calls from the bus for every key an event
touched. A *live* facet (a scale's staleness, a matter of the clock) is evaluated when asked.

``select`` answers one page: the positions after the cursor's key, at most ``limit`` of them,
and the size of the whole filtered set. With one filter (a zone, an indexed facet, or both) the
page is a slice of one sorted list: O(limit). Every further filter (text plus a state, two
facets, a live facet) is checked per candidate of the narrowest list, so such a page and its
count cost O(that list) (a text query's matches are computed once, O(keys), then cached).

The cursor is the last key of a page, so it is stable while items change state between pages:
a key never shows twice, and a key that kept its state is never skipped.

Threads: ``update`` runs on the event loop (bus listener); ``select`` may run in a worker
thread. Bucket lists are only changed by single list operations (``insert``, ``del``) and read
by ``bisect`` and slices, each atomic under the GIL, so a concurrent read sees each bucket
before or after a move, never a broken list. While the first build runs (in a worker thread,
O(keys)), ``update`` parks its keys in a set that the build re-reads when it ends, so no event
is lost and the event loop never waits for the build.
"""

from __future__ import annotations

import base64
import binascii
import threading
from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

TEXT_CACHE_SIZE = 64
"""Distinct (text, zone) queries whose matches are kept (dropped all at once beyond it)."""

_CURSOR_PREFIX = "c1."

_K = TypeVar("_K")

_POSITIONS = "i"
"""The array type code of a sorted position list: 4 bytes a position, not a pointer and an int
object (~40 bytes) as in a list."""


def _positions() -> array[int]:
    return array(_POSITIONS)


def _compact(lists: dict[_K, list[int]]) -> dict[_K, array[int]]:
    return {k: array(_POSITIONS, positions) for k, positions in lists.items()}


_INTS: list[int] = []
_INTS_LOCK = threading.Lock()


def _ints(n: int) -> list[int]:
    """0 .. n-1 as int objects shared by every index (each key's position in ``_pos``; an int
    past 256 is a 32-byte object, once per index and key without this)."""
    if len(_INTS) < n:
        with _INTS_LOCK:
            _INTS.extend(range(len(_INTS), n))
    return _INTS


class BadCursor(ValueError):
    """A cursor that is not one this index gave out (garbled, or naming an unknown key)."""


def encode_cursor(key: str) -> str:
    """The opaque cursor after ``key``: ``c1.`` and the key in unpadded base64url."""
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The key ``encode_cursor`` put in ``cursor``; ``BadCursor`` when it is none of ours."""
    if not cursor.startswith(_CURSOR_PREFIX):
        raise BadCursor("not a cursor of this API")
    body = cursor[len(_CURSOR_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("not a cursor of this API") from None


@dataclass(frozen=True, slots=True)
class Selection:
    """One page: the keys, the size of the whole filtered set, and the cursor key of the next
    page (None: this is the last page)."""

    keys: list[str]
    total: int
    next_after: str | None


class ListIndex:
    """Keys in a fixed order with their zones, search text and facets (module docstring).

    ``facets`` are indexed (``update`` keeps them current); ``live`` facets are evaluated per
    candidate when a filter names them. Each function maps a key to its value now."""

    def __init__(
        self,
        keys: Sequence[str],
        zones: Callable[[], Sequence[Collection[str]]],
        text: Callable[[], Sequence[str]],
        *,
        facets: Mapping[str, Callable[[str], str]] | None = None,
        live: Mapping[str, Callable[[str], str]] | None = None,
    ) -> None:
        """``zones()`` and ``text()`` give each key's zones and search text, in ``keys``' order;
        they are called on first use, so building the index costs nothing at start-up."""
        self._keys = tuple(keys)
        self._all: Sequence[int] = range(len(self._keys))
        self._zones_of = zones
        self._text_of = text
        self._pos: dict[str, int] = {}
        self._zones: tuple[frozenset[str], ...] = ()
        self._zone_pos: dict[str, array[int]] = {}
        self._text: tuple[str, ...] | None = None
        self._static = False
        self._facets = dict(facets or {})
        self._live = dict(live or {})
        self._values: dict[str, list[str]] = {}
        self._buckets: dict[str, dict[tuple[str | None, str], array[int]]] = {}
        self._built = False
        self._building = False
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._static_lock = threading.Lock()
        self._matches: dict[tuple[str, str | None], list[int]] = {}

    def _ensure_static(self) -> None:
        if self._static:
            return
        with self._static_lock:
            if self._static:
                return
            # Most keys share their zones with many others: one frozenset per distinct set.
            distinct: dict[frozenset[str], frozenset[str]] = {}
            zones = tuple(distinct.setdefault(zs, zs) for zs in map(frozenset, self._zones_of()))
            zone_pos: dict[str, list[int]] = {}
            for pos, zs in enumerate(zones):
                for z in zs:
                    zone_pos.setdefault(z, []).append(pos)
            self._zones, self._zone_pos = zones, _compact(zone_pos)
            self._pos = dict(zip(self._keys, _ints(len(self._keys)), strict=False))
            self._static = True

    def _texts(self) -> tuple[str, ...]:
        if self._text is None:
            self._text = tuple(t.casefold() for t in self._text_of())
        return self._text

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        self._ensure_static()
        return key in self._pos

    @property
    def listening(self) -> bool:
        """Whether ``update`` does anything: the facets are built or being built."""
        return self._built or self._building

    @property
    def built(self) -> bool:
        """Whether the indexed facets have been built (on the first filter that names one)."""
        return self._built

    def zone_keys(self, zone: str) -> list[str]:
        """The keys of ``zone`` in order (empty for an unknown zone)."""
        self._ensure_static()
        return [self._keys[p] for p in self._zone_pos.get(zone, ())]

    # -- facets ------------------------------------------------------------------------------
    def _ensure_built(self) -> None:
        if self._built:
            return
        self._ensure_static()
        with self._lock:
            if self._built:
                return
            self._building = True
            for name, fn in self._facets.items():
                values = [fn(k) for k in self._keys]
                buckets: dict[tuple[str | None, str], list[int]] = {}
                for pos, value in enumerate(values):
                    buckets.setdefault((None, value), []).append(pos)
                    for z in self._zones[pos]:
                        buckets.setdefault((z, value), []).append(pos)
                self._values[name] = values
                self._buckets[name] = _compact(buckets)
            self._built = True
            self._building = False
            self._apply(self._drain_pending())

    def _drain_pending(self) -> list[str]:
        keys = []
        while self._pending:
            try:
                keys.append(self._pending.pop())
            except KeyError:  # drained by the other thread meanwhile
                break
        return keys

    def rebuild(self) -> None:
        """Forget the indexed facets; the next filter rebuilds them from the live state (for a
        change that published no event, such as a restore from the journal)."""
        with self._lock:
            self._built = False
            self._values = {}
            self._buckets = {}

    def update(self, keys: Iterable[str]) -> None:
        """Re-read the indexed facets of ``keys`` (unknown keys are ignored) and move each
        whose value changed. Nothing to do before the first build; during it (in another
        thread) the keys wait in a set the build drains when it ends, so the caller (the bus
        listener on the event loop) never waits for a build."""
        if not self._facets:
            return
        if not self._built:
            if not self._building:
                return
            self._pending.update(keys)
            if not self._built:
                return  # the build drains them
            keys = self._drain_pending()  # it ended meanwhile, maybe before draining these
        with self._lock:
            if self._built:
                self._apply(keys)

    def _apply(self, keys: Iterable[str]) -> None:
        for key in keys:
            pos = self._pos.get(key)
            if pos is None:
                continue
            for name, fn in self._facets.items():
                values = self._values[name]
                old, new = values[pos], fn(key)
                if old == new:
                    continue
                buckets = self._buckets[name]
                for z in (None, *self._zones[pos]):
                    bucket = buckets[(z, old)]
                    i = bisect_left(bucket, pos)
                    if i < len(bucket) and bucket[i] == pos:
                        del bucket[i]
                    insort(buckets.setdefault((z, new), _positions()), pos)
                values[pos] = new

    def counts(self, facet: str, zone: str | None = None) -> dict[str, int]:
        """How many keys (of ``zone``) have each value of the indexed ``facet`` now, sorted by
        value, values no key has left out: O(values × zones), not O(keys)."""
        self._ensure_built()
        return {
            value: len(bucket)
            for (z, value), bucket in sorted(
                self._buckets[facet].items(), key=lambda item: item[0][1]
            )
            if z == zone and bucket
        }

    # -- pages -------------------------------------------------------------------------------
    def _text_matches(self, q: str, zone: str | None) -> list[int]:
        needle = q.casefold()
        found = self._matches.get((needle, zone))
        if found is None:
            base: Sequence[int] = self._all if zone is None else self._zone_pos.get(zone, ())
            text = self._texts()
            found = [p for p in base if needle in text[p]]
            if len(self._matches) >= TEXT_CACHE_SIZE:
                self._matches.clear()
            self._matches[(needle, zone)] = found
        return found

    def select(
        self,
        *,
        zone: str | None = None,
        q: str | None = None,
        filters: Mapping[str, str] | None = None,
        after: str | None = None,
        limit: int,
    ) -> Selection:
        """The page after the key ``after`` (None: the first page) of the keys in ``zone``
        (None: all), whose text contains ``q`` (case-insensitive), and whose facets have the
        values of ``filters``. ``BadCursor`` when ``after`` is not a key of this index;
        ``KeyError`` for a filter that names no facet."""
        self._ensure_static()
        start = -1
        if after is not None:
            pos = self._pos.get(after)
            if pos is None:
                raise BadCursor("the cursor names nothing in this list")
            start = pos
        indexed: list[tuple[str, str]] = []
        checks: list[Callable[[int], bool]] = []
        for name, value in (filters or {}).items():
            if name in self._facets:
                indexed.append((name, value))
            elif name in self._live:
                checks.append(self._live_check(self._live[name], value))
            else:
                raise KeyError(name)
        if indexed:
            self._ensure_built()
        base: Sequence[int]
        if q is not None:
            base = self._text_matches(q, zone)
        elif indexed:
            name, value = indexed.pop(0)
            base = self._buckets[name].get((zone, value), ())
        elif zone is not None:
            base = self._zone_pos.get(zone, ())
        else:
            base = self._all
        checks[:0] = [self._indexed_check(name, value) for name, value in indexed]
        if not checks:
            total = len(base)
            i = bisect_right(base, start)
            page = list(base[i : i + limit])
            more = i + limit < total
        else:
            page, total, more = self._scan(base, start, limit, checks)
        keys = [self._keys[p] for p in page]
        return Selection(keys, total, keys[-1] if more and keys else None)

    def _indexed_check(self, name: str, value: str) -> Callable[[int], bool]:
        values = self._values[name]
        return lambda pos: values[pos] == value

    def _live_check(self, fn: Callable[[str], str], value: str) -> Callable[[int], bool]:
        keys = self._keys
        return lambda pos: fn(keys[pos]) == value

    @staticmethod
    def _scan(
        base: Sequence[int], start: int, limit: int, checks: list[Callable[[int], bool]]
    ) -> tuple[list[int], int, bool]:
        page: list[int] = []
        total = 0
        more = False
        for pos in base:
            if all(check(pos) for check in checks):
                total += 1
                if pos > start:
                    if len(page) < limit:
                        page.append(pos)
                    else:
                        more = True
        return page, total, more
