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
record each of its keys once. The state is laid out so that the garbage collector
does not walk it (see below): its full collections stop every thread.
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Collection
from dataclasses import dataclass

from riskd.domain.clock import Clock
from riskd.domain.features import WINDOWS, Agg, FeatureQuery
from riskd.features.store import (
    MAX_SUM,
    RETENTION_MS,
    SEEN_TTL_S,
    Observation,
    OtherContentError,
    distinct_pairs,
    to_ms,
)

__all__ = ["InProcessFeatureStore", "StoreSize"]

_COMPACT_AT = 64  # dead entries kept at the front before a column is compacted
# The sweep keeps an hour beyond the longest window for observations that arrive late
# (replicas' clocks, threads): until then a key's own records decide what it trims.
_SWEEP_MARGIN_MS = 3_600_000
_SWEEP_BATCH = 64  # keys swept per recorded order
_CONTENT = "!"  # an order's claimed content tag, kept among its recorded keys (no KEYS name)


# Every key's state is kept in bytearrays in flat dicts keyed by str, holding str, int or
# bytearrays: objects the garbage collector never tracks (a dict is tracked only once it
# holds a tracked object: a tuple until the collector looks at it, or any dict). Held as
# lists and instances, a day of keys was millions of tracked objects that every full
# collection walked while holding the GIL (``benchmarks/load/store_gc.py``: 61-74 ms at
# 10,000 orders of new keys on a 2-core VM, growing with the day; under 1 ms now). The
# order ids remembered for idempotency are kept the same way. Numbers are native int64
# cells, read through ``memoryview.cast("q")`` (released before a bytearray is resized)
# or ``_I64``.
_I64 = struct.Struct("=q")
_W = _I64.size


def _cells(buf: bytearray) -> memoryview:
    """``buf`` as int64 cells; release it (``with``) before resizing ``buf``."""
    return memoryview(buf).cast("q")


class _Series:
    """Events of one key value: times (ms, sorted) and running totals of amounts.

    ``times`` holds two header cells, ``base`` (the total before event 0) and ``lo``
    (events before it are dead: trimmed, kept until compaction so the totals stay valid),
    then one cell per event; ``cum[i]`` is the total of every amount up to and including
    event ``i``. Compaction restarts the totals from 0, so they stay within the amounts of
    about two days (int64: 9.2 million orders at the largest amount riskd accepts; an
    amount past ``MAX_SUM`` is kept as ``MAX_SUM``, so 1,024 of those).
    Wraps the store's two bytearrays for the length of one call (see above).
    """

    __slots__ = ("cum", "times")

    def __init__(self, times: bytearray, cum: bytearray) -> None:
        self.times, self.cum = times, cum

    def __len__(self) -> int:
        return len(self.cum) // _W - int(_I64.unpack_from(self.times, _W)[0])

    def newest(self) -> int:
        return int(_I64.unpack_from(self.times, len(self.times) - _W)[0])

    def add(self, t: int, amount: int) -> None:
        # a window holding an amount past MAX_SUM reads MAX_SUM whatever it is, so it is
        # kept as MAX_SUM (review: 2^63 overflowed the int64 totals and broke the key)
        amount = min(amount, MAX_SUM)
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

    ``times`` holds the latest sightings sorted after one header cell, ``lo`` (sightings
    before it are dead). In the store's flat maps, under this set's ``prefix``: ``last``
    maps a value to its latest sighting, ``at`` a time (decimal) to the first value last
    seen then and ``more`` to the others (``_pack``ed; rare: several in one millisecond).
    Wraps them for one call.
    """

    __slots__ = ("at", "last", "more", "prefix", "times")

    def __init__(
        self,
        times: bytearray,
        prefix: str,
        last: dict[str, int],
        at: dict[str, str],
        more: dict[str, str],
    ) -> None:
        self.times, self.prefix, self.last, self.at, self.more = times, prefix, last, at, more

    def __len__(self) -> int:
        return len(self.times) // _W - 1 - int(_I64.unpack_from(self.times, 0)[0])

    def see(self, t: int, value: str) -> None:
        times = self.times
        if len(self) and t <= _newest(times) - RETENTION_MS:
            return  # older than anything a window can still reach (as ``_Series.add``)
        key = self.prefix + value
        old = self.last.get(key)
        if old is not None:
            if old >= t:
                return
            with _cells(times) as cells:
                i = bisect_left(cells, old, 1 + cells[0])
            del times[_W * i : _W * (i + 1)]
            self._unplace(old, value)
        self.last[key] = t
        with _cells(times) as cells:
            i = bisect_right(cells, t, 1 + cells[0])
        times[_W * i : _W * i] = _I64.pack(t)
        at = self.prefix + str(t)
        if at in self.at:
            self.more[at] = self.more.get(at, "") + _pack(value)
        else:
            self.at[at] = value

    def trim(self, horizon: int) -> None:
        at, last, prefix = self.at, self.last, self.prefix
        if not _due(self.times, 1, horizon):
            return
        with _cells(self.times) as cells:
            first = 1 + cells[0]
            end = bisect_right(cells, horizon, first)
            for i in range(first, end):
                when = prefix + str(cells[i])
                value = at.pop(when, None)
                if value is None:
                    continue  # a time seen twice: its values went the first time
                del last[prefix + value]
                for other in _unpack(self.more.pop(when, "")):
                    del last[prefix + other]
            lo = cells[0] = end - 1
        if lo >= _COMPACT_AT and 2 * lo >= len(self.times) // _W - 1:
            del self.times[_W : _W * (1 + lo)]
            _I64.pack_into(self.times, 0, 0)

    def _unplace(self, t: int, value: str) -> None:
        at = self.prefix + str(t)
        others = _unpack(self.more.pop(at, ""))
        if self.at[at] == value:
            if not others:
                del self.at[at]
                return
            self.at[at] = others.pop(0)
        else:
            others.remove(value)
        if others:
            self.more[at] = _pack(*others)


def _newest(times: bytearray) -> int:
    """A distinct set's latest sighting (its last cell: when it holds live ones)."""
    return int(_I64.unpack_from(times, len(times) - _W)[0])


def _series_key(name: str, value: str) -> str:
    return f"{name}\x00{value}"  # names hold no NUL: the first one ends the name


def _set_key(key: str, of: str, value: str) -> str:
    # the value's length makes the key end where the value does: a prefix for flat maps
    return f"{key}\x00{of}\x00{len(value)}\x00{value}"


def _oldest(times: bytearray, header: int) -> int | None:
    """The oldest live time (``times``' cell ``header - 1`` is ``lo``), None when there is
    none; read without a view, as most calls find nothing to trim."""
    at = _W * (header + _I64.unpack_from(times, _W * (header - 1))[0])
    return int(_I64.unpack_from(times, at)[0]) if at < len(times) else None


def _due(times: bytearray, header: int, horizon: int) -> bool:
    """Whether ``times`` holds live times at or before ``horizon``."""
    oldest = _oldest(times, header)
    return oldest is not None and oldest <= horizon


def _keeps(times: bytearray, header: int, horizon: int) -> bool:
    """For the sweep: nothing to do (live times, none at or before ``horizon``)."""
    oldest = _oldest(times, header)
    return oldest is not None and oldest > horizon


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


def _batch(keys: tuple[str, ...], done: int) -> tuple[str, ...]:
    """The next sweep batch of ``keys`` when ``done`` are swept (from the newest keys back)."""
    end = max(len(keys) - done, 0)
    return keys[max(end - _SWEEP_BATCH, 0) : end]


_COUNT, _SUM, _DISTINCT = 0, 1, 2  # a series query reads (count, sum)[kind]
_KIND = {Agg.COUNT: _COUNT, Agg.SUM: _SUM, Agg.DISTINCT: _DISTINCT}
_Query = tuple[FeatureQuery, str, str, int, int]  # the query, key, of, window (ms), kind


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
        # the keys the current sweep has still to visit (tuples of str: never tracked) and
        # how far it has come through them
        self._pending: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._swept = 0
        self._lock = threading.Lock()
        # flat maps, str keys (see above): a series' times and totals by _series_key, a
        # distinct set's sightings by _set_key; under a set's key, its values' latest
        # sightings (key + value) and the values last seen at a time (key + decimal time:
        # the first in _at, any others packed in _more)
        self._times: dict[str, bytearray] = {}
        self._cums: dict[str, bytearray] = {}
        self._distinct: dict[str, bytearray] = {}
        self._last: dict[str, int] = {}
        self._at: dict[str, str] = {}
        self._more: dict[str, str] = {}
        # order ids remembered for idempotency, flat as well: per order id, the keys it
        # recorded and when (_pack'ed: name, value, clock ms, ...); and a queue in
        # recording order, sequence number -> its clock ms and its order id
        self._orders: dict[str, str] = {}
        self._queue_ms: dict[int, int] = {}
        self._queue: dict[int, str] = {}
        self._head = self._tail = 0  # the queue's oldest sequence number and the next one
        self._plans: tuple[object, tuple[_Query, ...]] = (None, ())

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        with self._lock:
            now = to_ms(self._clock.now())
            forgotten = now - SEEN_TTL_S * 1000
            order_id = obs.order_id
            seen = _recorded(self._orders.get(order_id))
            claim = False
            if obs.content:
                claimed = [v for (n, v), ms in seen.items() if n == _CONTENT and ms > forgotten]
                if claimed and claimed[0] != obs.content:
                    raise OtherContentError()
                claim = not claimed
            new = {n for n, v in obs.keys.items() if seen.get((n, v), forgotten) <= forgotten}
            later: list[tuple[str, str]] = []
            if new or claim:
                seen.update(((name, obs.keys[name]), now) for name in new)
                if claim:
                    seen[(_CONTENT, obs.content)] = now
                self._orders[order_id] = _pack_recorded(seen)
                self._queue_ms[self._tail], self._queue[self._tail] = now, order_id
                self._tail += 1
                if new:
                    later = self._record(obs, new, distinct_pairs(obs, queries))
                self._maybe_sweep()
            return self._read(obs, queries, later)

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        with self._lock:
            return self._read(obs, queries)

    def close(self) -> None:
        with self._lock:
            for state in (
                *(self._times, self._cums, self._distinct, self._last, self._at, self._more),
                *(self._orders, self._queue_ms, self._queue),
            ):
                state.clear()
            self._head = self._tail = 0

    def size(self) -> StoreSize:
        with self._lock:
            return StoreSize(
                series=len(self._times),
                events=sum(len(_Series(t, self._cums[k])) for k, t in self._times.items()),
                distinct_sets=len(self._distinct),
                orders=len(self._orders),
            )

    def sweep(self) -> None:
        """Forget everything older than the longest window (or the idempotency TTL)."""
        with self._lock:
            self._sweep()

    def _record(
        self, obs: Observation, names: set[str], pairs: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """Record ``obs`` under the keys ``names`` (and their distinct sets). Returns the
        distinct pairs whose set holds the order's own of-value last seen after the order
        (another order's sighting, recorded first though stamped later), which a read at
        its time would leave out (the store's docstring). A retry records no pair, so it
        reads without it: its of-value may not be the one its key was recorded with
        (review: a retry with another buyer counted that buyer)."""
        t = obs.at_ms
        later = []
        for name, value in obs.keys.items():
            if name not in names:
                continue
            skey = _series_key(name, value)
            times = self._times.get(skey)
            if times is None:
                times = self._times[skey] = bytearray(2 * _W)
                self._cums[skey] = bytearray()
            series = _Series(times, self._cums[skey])
            series.add(t, obs.amount)
            series.trim(series.newest() - RETENTION_MS)
        for key, of in pairs:
            seen_with = obs.keys.get(of)
            if seen_with is None or key not in names:
                continue
            dkey = _set_key(key, of, obs.keys[key])
            times = self._distinct.get(dkey)
            if times is None:
                times = self._distinct[dkey] = bytearray(_W)
            distinct = _Distinct(times, dkey, self._last, self._at, self._more)
            distinct.see(t, seen_with)
            distinct.trim(t - RETENTION_MS)
            last = self._last.get(dkey + seen_with)  # the usual case: t (or not recorded)
            # and t within reach of the set's newest sighting (else it reads 0: see ``see``)
            if last is not None and last > t and t > _newest(times) - RETENTION_MS:
                later.append((key, of))
        return later

    def _read(
        self,
        obs: Observation,
        queries: Collection[FeatureQuery],
        later: Collection[tuple[str, str]] = (),
    ) -> dict[FeatureQuery, int]:
        """Every query's value; each key's cells are opened once for all its queries. The
        distinct pairs ``later`` count the order's own of-value, whose latest sighting is
        after it (the store's docstring)."""
        keys, hi = obs.keys, obs.at_ms
        out: dict[FeatureQuery, int] = {}
        series: dict[str, tuple[memoryview, memoryview] | None] = {}
        distinct: dict[tuple[str, str], memoryview | None] = {}
        opened: list[memoryview] = []
        try:
            for q, key, of, span, kind in self._plan(queries):
                value = keys.get(key)
                if value is None:
                    out[q] = 0
                    continue
                if kind == _DISTINCT:
                    pair = (key, of)
                    if pair in distinct:
                        cells = distinct[pair]
                    else:
                        found = self._distinct.get(_set_key(key, of, value))
                        cells = distinct[pair] = None if found is None else _cells(found)
                        if cells is not None:
                            opened.append(cells)
                    out[q] = 0 if cells is None else _count(cells, hi - span, hi)
                    out[q] += int(pair in later)
                    continue
                if key in series:
                    views = series[key]
                else:
                    skey = _series_key(key, value)
                    times = self._times.get(skey)
                    views = series[key] = (
                        None if times is None else (_cells(times), _cells(self._cums[skey]))
                    )
                    opened.extend(views or ())
                if views is None:
                    out[q] = 0
                else:  # sums saturate at MAX_SUM, as in the Redis store (counts never do)
                    out[q] = min(_count_sum(views[0], views[1], hi - span, hi)[kind], MAX_SUM)
        finally:
            for view in opened:
                view.release()
        return out

    def _plan(self, queries: Collection[FeatureQuery]) -> tuple[_Query, ...]:
        """The queries as the reads use them; kept for an immutable query set."""
        cached_for, plan = self._plans  # one read: another thread may swap in a new pair
        if cached_for is queries:
            return plan
        plan = tuple((q, q.key, q.of, WINDOWS[q.window] * 1000, _KIND[q.agg]) for q in queries)
        if isinstance(queries, frozenset | tuple):
            self._plans = (queries, plan)
        return plan

    def _maybe_sweep(self) -> None:
        """Sweep a few keys per recorded order, so no call pays for a whole sweep."""
        self._forget_orders(to_ms(self._clock.now()) - SEEN_TTL_S * 1000)  # oldest first: cheap
        series, distinct = self._pending
        if self._swept >= max(len(series), len(distinct)):
            if self._clock.monotonic() < self._next_sweep:
                return
            self._next_sweep = self._clock.monotonic() + self._sweep_every_s
            series, distinct = self._pending = (tuple(self._times), tuple(self._distinct))
            self._swept = 0
        done, self._swept = self._swept, self._swept + _SWEEP_BATCH
        self._sweep_keys(_batch(series, done), _batch(distinct, done))

    def _sweep(self) -> None:
        self._pending, self._swept = ((), ()), 0
        self._next_sweep = self._clock.monotonic() + self._sweep_every_s
        self._sweep_keys(tuple(self._times), tuple(self._distinct))
        self._forget_orders(to_ms(self._clock.now()) - SEEN_TTL_S * 1000)

    def _sweep_keys(self, series_keys: tuple[str, ...], distinct_keys: tuple[str, ...]) -> None:
        horizon = to_ms(self._clock.now()) - RETENTION_MS - _SWEEP_MARGIN_MS
        for skey in series_keys:
            times = self._times.get(skey)
            if times is None or _keeps(times, 2, horizon):
                continue  # the usual case
            series = _Series(times, self._cums[skey])
            series.trim(horizon)
            if not series:
                del self._times[skey], self._cums[skey]
        for dkey in distinct_keys:
            times = self._distinct.get(dkey)
            if times is None or _keeps(times, 1, horizon):
                continue
            distinct = _Distinct(times, dkey, self._last, self._at, self._more)
            distinct.trim(horizon)
            if not distinct:
                del self._distinct[dkey]

    def _forget_orders(self, horizon: int) -> None:
        """Forget the keys recorded at or before ``horizon``, oldest first."""
        while self._head < self._tail and self._queue_ms[self._head] <= horizon:
            del self._queue_ms[self._head]
            order_id = self._queue.pop(self._head)
            self._head += 1
            packed = self._orders.get(order_id)
            if packed is None:
                continue
            kept = {key: at for key, at in _recorded(packed).items() if at > horizon}
            if kept:
                self._orders[order_id] = _pack_recorded(kept)
            else:
                del self._orders[order_id]


def _recorded(packed: str | None) -> dict[tuple[str, str], int]:
    """An order's recorded keys, (name, value) -> clock ms, from ``_pack_recorded``."""
    if packed is None:
        return {}
    parts = _unpack(packed)
    return {(parts[i], parts[i + 1]): int(parts[i + 2]) for i in range(0, len(parts), 3)}


def _pack_recorded(recorded: dict[tuple[str, str], int]) -> str:
    return _pack(
        *(text for (name, value), at in recorded.items() for text in (name, value, str(at)))
    )


def _pack(*texts: str) -> str:
    """Strings in one (each length-prefixed): ``_unpack`` gives them back."""
    return "".join(f"{len(t)}\x00{t}" for t in texts)


def _unpack(packed: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(packed):
        j = packed.index("\x00", i)
        end = j + 1 + int(packed[i:j])
        out.append(packed[j + 1 : end])
        i = end
    return out
