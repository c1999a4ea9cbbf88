"""The in-process feature store: the embedded, single-node default.

Exact windows: each key value keeps its events sorted by time with prefix sums
of their amounts, so COUNT and SUM over ``(t - W, t]`` are two bisections.
Each ``(key, of, value)`` keeps the latest sighting of every ``of`` value,
sorted, for DISTINCT. Memory is bounded: a series drops events older than the
longest window behind its newest event, a distinct set drops sightings older
than the longest window behind each new one, remembered order ids (with the
keys recorded for each) leave after ``SEEN_TTL_S``, and a sweep started every
``sweep_every_s`` (injected clock) walks every key, a batch per recorded order
so no call pays for all of it, and drops the series and distinct sets that have
aged out. One lock makes every call atomic, so concurrent retries of one order
record each of its keys once.
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import TypeVar

from riskd.domain.clock import Clock
from riskd.domain.features import WINDOWS, Agg, FeatureQuery
from riskd.features.store import (
    RETENTION_MS,
    SEEN_TTL_S,
    Observation,
    distinct_pairs,
    to_ms,
)

__all__ = ["InProcessFeatureStore", "StoreSize"]

_COMPACT_AT = 64  # dead entries kept at the front before a column is compacted
# The sweep keeps an hour beyond the longest window for observations that arrive late
# (replicas' clocks, threads): until then a key's own records decide what it trims.
_SWEEP_MARGIN_MS = 3_600_000
_SWEEP_BATCH = 64  # keys swept per recorded order
_K = TypeVar("_K")


def _take(pending: list[_K]) -> list[_K]:
    """Remove and return up to a sweep batch from the end of ``pending``."""
    batch = pending[-_SWEEP_BATCH:]
    del pending[-_SWEEP_BATCH:]
    return batch


# Every key's state is kept in bytearrays, tuples of them and dicts of str and int: objects
# the garbage collector does not track (bytearrays hold no objects; the collector's own
# passes untrack such tuples and dicts, but never a tuple that holds a dict). A day of keys
# held as lists and instances would be millions of tracked objects, walked by every full
# collection while it holds the GIL: ~0.26 s at 40,000 orders of new keys on a 2-core VM,
# growing all day. Numbers are native int64 cells, read through ``memoryview.cast("q")``
# (released before a bytearray is resized) or ``_I64``.
_I64 = struct.Struct("=q")
_W = _I64.size
_SeriesState = tuple[bytearray, bytearray]


def _cells(buf: bytearray) -> memoryview:
    """``buf`` as int64 cells; release it (``with``) before resizing ``buf``."""
    return memoryview(buf).cast("q")


class _Series:
    """Events of one key value: times (ms, sorted) and running totals of amounts.

    ``times`` holds two header cells, ``base`` (the total before event 0) and ``lo``
    (events before it are dead: trimmed, kept until compaction so the totals stay valid),
    then one cell per event; ``cum[i]`` is the total of every amount up to and including
    event ``i``. Compaction restarts the totals from 0, so they stay within the amounts of
    about two days (int64: 9.2 million orders at the largest amount riskd accepts).
    Wraps a state tuple for the length of one call (see above).
    """

    __slots__ = ("cum", "times")

    def __init__(self, state: _SeriesState | None = None) -> None:
        self.times, self.cum = state or (bytearray(2 * _W), bytearray())

    @property
    def state(self) -> _SeriesState:
        return (self.times, self.cum)

    def __len__(self) -> int:
        return len(self.cum) // _W - int(_I64.unpack_from(self.times, _W)[0])

    def newest(self) -> int:
        return int(_I64.unpack_from(self.times, len(self.times) - _W)[0])

    def add(self, t: int, amount: int) -> None:
        times, cum = self.times, self.cum
        if not cum or t >= self.newest():
            last = _I64.unpack_from(cum, len(cum) - _W)[0] if cum else self._base()
            times += _I64.pack(t)
            cum += _I64.pack(last + amount)
            return
        if len(self) and t <= self.newest() - RETENTION_MS:
            return  # older than anything a window can still reach
        with _cells(times) as cells:  # a late event: rare; shift the totals after it
            i = bisect_right(cells, t, 2 + cells[1]) - 2
        total = self._total(i)
        times[_W * (2 + i) : _W * (2 + i)] = _I64.pack(t)
        cum[_W * i : _W * i] = _I64.pack(total + amount)
        with _cells(cum) as cells:
            for j in range(i + 1, len(cells)):
                cells[j] += amount

    def trim(self, horizon: int) -> None:
        """Drop the events at or before ``horizon``."""
        times = self.times
        if not _due(times, 2, horizon):
            return  # the usual case: nothing to drop
        with _cells(times) as cells:
            lo = cells[1] = bisect_right(cells, horizon, 2 + cells[1]) - 2
        if lo >= _COMPACT_AT and 2 * lo >= len(self.cum) // _W:
            base = self._total(lo)
            del times[2 * _W : _W * (2 + lo)], self.cum[: _W * lo]
            _I64.pack_into(times, 0, 0)
            _I64.pack_into(times, _W, 0)
            with _cells(self.cum) as cells:
                for j in range(len(cells)):
                    cells[j] -= base

    def _base(self) -> int:
        return int(_I64.unpack_from(self.times, 0)[0])

    def _total(self, i: int) -> int:
        return int(_I64.unpack_from(self.cum, _W * (i - 1))[0]) if i else self._base()


class _Distinct:
    """Latest sighting (ms) of each ``of`` value seen with one key value.

    ``last`` maps a value to its latest sighting; ``times`` holds those sightings sorted
    after one header cell, ``lo`` (sightings before it are dead); ``at`` maps a time to
    the values last seen then (a str, or a tuple when several share a millisecond).
    Wraps the three for the length of one call (see above; the store keeps them apart).
    """

    __slots__ = ("at", "last", "times")

    def __init__(
        self,
        times: bytearray | None = None,
        last: dict[str, int] | None = None,
        at: dict[int, str | tuple[str, ...]] | None = None,
    ) -> None:
        self.times = bytearray(_W) if times is None else times
        self.last = {} if last is None else last
        self.at = {} if at is None else at

    def __len__(self) -> int:
        return len(self.last)

    def see(self, t: int, value: str) -> None:
        old = self.last.get(value)
        times = self.times
        if old is not None:
            if old >= t:
                return
            with _cells(times) as cells:
                i = bisect_left(cells, old, 1 + cells[0])
            del times[_W * i : _W * (i + 1)]
            self._unplace(old, value)
        self.last[value] = t
        with _cells(times) as cells:
            i = bisect_right(cells, t, 1 + cells[0])
        times[_W * i : _W * i] = _I64.pack(t)
        there = self.at.get(t)
        self.at[t] = value if there is None else (*_values(there), value)

    def trim(self, horizon: int) -> None:
        at, last = self.at, self.last
        if not _due(self.times, 1, horizon):
            return
        with _cells(self.times) as cells:
            first = 1 + cells[0]
            end = bisect_right(cells, horizon, first)
            for i in range(first, end):
                there = at.pop(cells[i], None)  # a time seen twice: its values went already
                for value in _values(there) if there is not None else ():
                    del last[value]
            lo = cells[0] = end - 1
        if lo >= _COMPACT_AT and 2 * lo >= len(self.times) // _W - 1:
            del self.times[_W : _W * (1 + lo)]
            _I64.pack_into(self.times, 0, 0)

    def _unplace(self, t: int, value: str) -> None:
        there = _values(self.at[t])
        if len(there) == 1:
            del self.at[t]
        else:
            rest = tuple(v for v in there if v != value)
            self.at[t] = rest[0] if len(rest) == 1 else rest


def _due(times: bytearray, header: int, horizon: int) -> bool:
    """Whether the oldest live time is at or before ``horizon`` (``times``' cell ``header - 1``
    is ``lo``); read without a view, as most calls find nothing to trim."""
    at = _W * (header + _I64.unpack_from(times, _W * (header - 1))[0])
    return at < len(times) and bool(_I64.unpack_from(times, at)[0] <= horizon)


def _values(there: str | tuple[str, ...]) -> tuple[str, ...]:
    return (there,) if isinstance(there, str) else there


def _count_sum(times: memoryview, cum: memoryview, lo_excl: int, hi_incl: int) -> tuple[int, int]:
    """A series' number and total amount of events in ``(lo_excl, hi_incl]`` (its cells)."""
    first = 2 + times[1]
    a = bisect_right(times, lo_excl, first)
    b = max(a, bisect_right(times, hi_incl, first))
    if a == b:
        return 0, 0
    return b - a, cum[b - 3] - (cum[a - 3] if a > 2 else times[0])


def _count(times: memoryview, lo_excl: int, hi_incl: int) -> int:
    """A distinct set's number of values last seen in ``(lo_excl, hi_incl]`` (its cells)."""
    first = 1 + times[0]
    hi = bisect_right(times, hi_incl, first)
    return max(0, hi - bisect_right(times, lo_excl, first))


@dataclass(frozen=True, slots=True)
class StoreSize:
    """What an ``InProcessFeatureStore`` holds (for tests and metrics)."""

    series: int  # key values with events
    events: int  # events across all series
    distinct_sets: int  # (key, of, value) sets
    orders: int  # order ids remembered for idempotency


class InProcessFeatureStore:
    """A ``FeatureStore`` in this process's memory; see the module docstring.

    Args:
        clock: times idempotency and drives the sweep that forgets aged-out state.
        sweep_every_s: how often (clock seconds) a sweep of every key starts.
    """

    def __init__(self, clock: Clock, *, sweep_every_s: float = 60.0) -> None:
        self._clock = clock
        self._sweep_every_s = sweep_every_s
        self._next_sweep = clock.monotonic() + sweep_every_s
        self._pending_series: list[tuple[str, str]] = []  # keys the current sweep has left
        self._pending_distinct: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        # (name, value) -> _Series state; (key, of, value) -> _Distinct state
        self._series: dict[tuple[str, str], _SeriesState] = {}
        # (key, of, value) -> a _Distinct's parts, kept in three maps (a tuple holding its
        # dicts would stay tracked): sorted sightings, latest sighting by value, values by time
        self._distinct: dict[tuple[str, str, str], bytearray] = {}
        self._sightings: dict[tuple[str, str, str], dict[str, int]] = {}
        self._seen_at: dict[tuple[str, str, str], dict[int, str | tuple[str, ...]]] = {}
        # order_id -> its recorded (name, value) keys -> clock ms when each was recorded
        self._seen: dict[str, dict[tuple[str, str], int]] = {}
        self._seen_queue: deque[tuple[int, str]] = deque()  # (ms, order_id), oldest first

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        with self._lock:
            now = to_ms(self._clock.now())
            seen = self._seen.setdefault(obs.order_id, {})
            forgotten = now - SEEN_TTL_S * 1000
            new = {n for n, v in obs.keys.items() if seen.get((n, v), forgotten) <= forgotten}
            if new:
                seen.update(((name, obs.keys[name]), now) for name in new)
                self._seen_queue.append((now, obs.order_id))
                self._record(obs, new, distinct_pairs(obs, queries))
                self._maybe_sweep()
            return self._read(obs, queries)

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        with self._lock:
            return self._read(obs, queries)

    def close(self) -> None:
        with self._lock:
            self._series.clear()
            self._distinct.clear()
            self._sightings.clear()
            self._seen_at.clear()
            self._seen.clear()
            self._seen_queue.clear()

    def size(self) -> StoreSize:
        with self._lock:
            return StoreSize(
                series=len(self._series),
                events=sum(len(_Series(s)) for s in self._series.values()),
                distinct_sets=len(self._distinct),
                orders=len(self._seen),
            )

    def sweep(self) -> None:
        """Forget everything older than the longest window (or the idempotency TTL)."""
        with self._lock:
            self._sweep()

    def _record(self, obs: Observation, names: set[str], pairs: list[tuple[str, str]]) -> None:
        """Record ``obs`` under the keys ``names`` (and their distinct sets)."""
        t = obs.at_ms
        for name, value in obs.keys.items():
            if name not in names:
                continue
            state = self._series.get((name, value))
            series = _Series(state)
            if state is None:
                self._series[(name, value)] = series.state
            series.add(t, obs.amount)
            series.trim(series.newest() - RETENTION_MS)
        for key, of in pairs:
            seen_with = obs.keys.get(of)
            if seen_with is None or key not in names:
                continue
            dkey = (key, of, obs.keys[key])
            distinct = self._distinct_set(dkey, create=True)
            assert distinct is not None
            distinct.see(t, seen_with)
            distinct.trim(t - RETENTION_MS)

    def _read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        """Every query's value; each key's cells are opened once for all its queries."""
        keys, hi = obs.keys, obs.at_ms
        out: dict[FeatureQuery, int] = {}
        series: dict[str, tuple[memoryview, memoryview] | None] = {}
        distinct: dict[tuple[str, str], memoryview | None] = {}
        opened: list[memoryview] = []
        try:
            for q in queries:
                value = keys.get(q.key)
                if value is None:
                    out[q] = 0
                    continue
                lo = hi - WINDOWS[q.window] * 1000
                if q.agg is Agg.DISTINCT:
                    pair = (q.key, q.of)
                    if pair in distinct:
                        cells = distinct[pair]
                    else:
                        found = self._distinct.get((q.key, q.of, value))
                        cells = distinct[pair] = None if found is None else _cells(found)
                        if cells is not None:
                            opened.append(cells)
                    out[q] = 0 if cells is None else _count(cells, lo, hi)
                    continue
                if q.key in series:
                    views = series[q.key]
                else:
                    state = self._series.get((q.key, value))
                    views = series[q.key] = (
                        None if state is None else (_cells(state[0]), _cells(state[1]))
                    )
                    opened.extend(views or ())
                if views is None:
                    out[q] = 0
                else:
                    count, total = _count_sum(views[0], views[1], lo, hi)
                    out[q] = count if q.agg is Agg.COUNT else total
        finally:
            for view in opened:
                view.release()
        return out

    def _distinct_set(self, dkey: tuple[str, str, str], *, create: bool) -> _Distinct | None:
        times = self._distinct.get(dkey)
        if times is not None:
            return _Distinct(times, self._sightings[dkey], self._seen_at[dkey])
        if not create:
            return None
        distinct = _Distinct()
        self._distinct[dkey], self._sightings[dkey] = distinct.times, distinct.last
        self._seen_at[dkey] = distinct.at
        return distinct

    def _maybe_sweep(self) -> None:
        """Sweep a few keys per recorded order, so no call pays for a whole sweep."""
        self._forget_orders(to_ms(self._clock.now()) - SEEN_TTL_S * 1000)  # oldest first: cheap
        if not self._pending_series and not self._pending_distinct:
            if self._clock.monotonic() < self._next_sweep:
                return
            self._next_sweep = self._clock.monotonic() + self._sweep_every_s
            self._pending_series, self._pending_distinct = list(self._series), list(self._distinct)
        series, distinct = _take(self._pending_series), _take(self._pending_distinct)
        self._sweep_keys(series, distinct)

    def _sweep(self) -> None:
        self._pending_series, self._pending_distinct = [], []
        self._next_sweep = self._clock.monotonic() + self._sweep_every_s
        self._sweep_keys(list(self._series), list(self._distinct))
        self._forget_orders(to_ms(self._clock.now()) - SEEN_TTL_S * 1000)

    def _sweep_keys(
        self, series_keys: list[tuple[str, str]], distinct_keys: list[tuple[str, str, str]]
    ) -> None:
        horizon = to_ms(self._clock.now()) - RETENTION_MS - _SWEEP_MARGIN_MS
        for skey in series_keys:
            state = self._series.get(skey)
            if state is not None:
                series = _Series(state)
                series.trim(horizon)
                if not series:
                    del self._series[skey]
        for dkey in distinct_keys:
            times = self._distinct.get(dkey)
            if times is None:
                continue
            if _due(times, 1, horizon):
                _Distinct(times, self._sightings[dkey], self._seen_at[dkey]).trim(horizon)
            if not self._sightings[dkey]:
                del self._distinct[dkey], self._sightings[dkey], self._seen_at[dkey]

    def _forget_orders(self, horizon: int) -> None:
        queue = self._seen_queue
        while queue and queue[0][0] <= horizon:
            _, order_id = queue.popleft()
            seen = self._seen.get(order_id)
            if seen is None:
                continue
            for key in [k for k, at in seen.items() if at <= horizon]:
                del seen[key]
            if not seen:
                del self._seen[order_id]
