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

import threading
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from operator import itemgetter
from typing import TypeVar

from riskd.domain.clock import Clock
from riskd.domain.features import Agg, FeatureQuery
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
_first = itemgetter(0)


def _take(pending: list[_K]) -> list[_K]:
    """Remove and return up to a sweep batch from the end of ``pending``."""
    batch = pending[-_SWEEP_BATCH:]
    del pending[-_SWEEP_BATCH:]
    return batch


class _Series:
    """Events of one key value: times (ms, sorted) and running totals of amounts.

    ``cum[i]`` is the total of every amount up to and including event ``i``;
    entries before ``lo`` are dead (trimmed) but kept until compaction so the
    totals stay valid. ``base`` is the total before index 0.
    """

    __slots__ = ("base", "cum", "lo", "times")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.cum: list[int] = []
        self.base = 0
        self.lo = 0

    def __len__(self) -> int:
        return len(self.times) - self.lo

    def newest(self) -> int:
        return self.times[-1]

    def add(self, t: int, amount: int) -> None:
        times, cum = self.times, self.cum
        if not times or t >= times[-1]:
            times.append(t)
            cum.append((cum[-1] if cum else self.base) + amount)
            return
        if len(self) and t <= times[-1] - RETENTION_MS:
            return  # older than anything a window can still reach
        i = bisect_right(times, t, self.lo)  # a late event: rare; shift the totals after it
        times.insert(i, t)
        cum.insert(i, self._total(i) + amount)
        for j in range(i + 1, len(cum)):
            cum[j] += amount

    def count_sum(self, lo_excl: int, hi_incl: int) -> tuple[int, int]:
        """Number and total amount of the events in ``(lo_excl, hi_incl]``."""
        a = bisect_right(self.times, lo_excl, self.lo)
        b = max(a, bisect_right(self.times, hi_incl, self.lo))
        return b - a, self._total(b) - self._total(a)

    def trim(self, horizon: int) -> None:
        """Drop the events at or before ``horizon``."""
        if not len(self) or self.times[self.lo] > horizon:
            return  # the usual case: nothing to drop
        self.lo = bisect_right(self.times, horizon, self.lo)
        if self.lo >= _COMPACT_AT and 2 * self.lo >= len(self.times):
            self.base = self.cum[self.lo - 1]
            del self.times[: self.lo], self.cum[: self.lo]
            self.lo = 0

    def _total(self, i: int) -> int:
        return self.cum[i - 1] if i else self.base


class _Distinct:
    """Latest sighting (ms) of each ``of`` value seen with one key value."""

    __slots__ = ("entries", "last", "lo")

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.entries: list[tuple[int, str]] = []  # (last, value), sorted; dead before lo
        self.lo = 0

    def __len__(self) -> int:
        return len(self.last)

    def see(self, t: int, value: str) -> None:
        old = self.last.get(value)
        if old is not None:
            if old >= t:
                return
            del self.entries[bisect_left(self.entries, (old, value), self.lo)]
        self.last[value] = t
        insort(self.entries, (t, value), self.lo)

    def count(self, lo_excl: int, hi_incl: int) -> int:
        hi = bisect_right(self.entries, hi_incl, self.lo, key=_first)
        return max(0, hi - bisect_right(self.entries, lo_excl, self.lo, key=_first))

    def trim(self, horizon: int) -> None:
        end = bisect_right(self.entries, horizon, self.lo, key=_first)
        for _, value in self.entries[self.lo : end]:
            del self.last[value]
        self.lo = end
        if self.lo >= _COMPACT_AT and 2 * self.lo >= len(self.entries):
            del self.entries[: self.lo]
            self.lo = 0


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
        self._series: dict[tuple[str, str], _Series] = {}
        self._distinct: dict[tuple[str, str, str], _Distinct] = {}
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
            return {q: self._read_one(obs, q) for q in queries}

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        with self._lock:
            return {q: self._read_one(obs, q) for q in queries}

    def close(self) -> None:
        with self._lock:
            self._series.clear()
            self._distinct.clear()
            self._seen.clear()
            self._seen_queue.clear()

    def size(self) -> StoreSize:
        with self._lock:
            return StoreSize(
                series=len(self._series),
                events=sum(len(s) for s in self._series.values()),
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
            series = self._series.get((name, value))
            if series is None:
                series = self._series[(name, value)] = _Series()
            series.add(t, obs.amount)
            series.trim(series.newest() - RETENTION_MS)
        for key, of in pairs:
            seen_with = obs.keys.get(of)
            if seen_with is None or key not in names:
                continue
            dkey = (key, of, obs.keys[key])
            distinct = self._distinct.get(dkey)
            if distinct is None:
                distinct = self._distinct[dkey] = _Distinct()
            distinct.see(t, seen_with)
            distinct.trim(t - RETENTION_MS)

    def _read_one(self, obs: Observation, q: FeatureQuery) -> int:
        value = obs.keys.get(q.key)
        if value is None:
            return 0
        hi = obs.at_ms
        lo = hi - q.seconds * 1000
        if q.agg is Agg.DISTINCT:
            distinct = self._distinct.get((q.key, q.of, value))
            return distinct.count(lo, hi) if distinct is not None else 0
        series = self._series.get((q.key, value))
        if series is None:
            return 0
        count, total = series.count_sum(lo, hi)
        return count if q.agg is Agg.COUNT else total

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
            series = self._series.get(skey)
            if series is not None:
                series.trim(horizon)
                if not series:
                    del self._series[skey]
        for dkey in distinct_keys:
            distinct = self._distinct.get(dkey)
            if distinct is not None:
                distinct.trim(horizon)
                if not distinct:
                    del self._distinct[dkey]

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
