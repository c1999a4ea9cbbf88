"""Both backends agree with a brute-force reference on random orders and time steps."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import redis
from features_support import REDIS_URL, delete_prefix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riskd.domain.clock import FakeClock
from riskd.domain.features import WINDOWS, Agg, FeatureQuery
from riskd.features import FeatureStore, InProcessFeatureStore, Observation, RedisFeatureStore
from riskd.features.store import SEEN_TTL_S, to_ms

StoreFactory = Callable[[FakeClock], FeatureStore]
KEY_NAMES = ("buyer", "device", "shop")
# A tuple: the Redis store caches its plan for immutable query sets.
QUERIES = tuple(
    FeatureQuery(agg, key, window)
    for agg in (Agg.COUNT, Agg.SUM)
    for key in KEY_NAMES
    for window in WINDOWS
) + tuple(
    FeatureQuery(Agg.DISTINCT, key, window, of=of)
    for key in KEY_NAMES
    for of in KEY_NAMES
    if of != key
    for window in WINDOWS
)


@dataclass
class Reference:
    """The definition: a list of events, counted by brute force."""

    # per recorded event: time, amount, the keys it was recorded under, all the order's keys
    events: list[tuple[int, int, dict[str, str], dict[str, str]]] = field(default_factory=list)
    # order_id -> its recorded (name, value) keys -> clock ms when each was recorded
    seen: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)

    def record_and_read(
        self, obs: Observation, now_ms: int, queries: Collection[FeatureQuery]
    ) -> dict[str, int]:
        seen = self.seen.setdefault(obs.order_id, {})
        forgotten = now_ms - SEEN_TTL_S * 1000
        new = {k: v for k, v in obs.keys.items() if seen.get((k, v), forgotten) <= forgotten}
        if new:
            seen.update((kv, now_ms) for kv in new.items())
            self.events.append((obs.at_ms, obs.amount, new, dict(obs.keys)))
        return self.read(obs, queries)

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[str, int]:
        return {q.name: self._one(obs, q) for q in queries}

    def _one(self, obs: Observation, q: FeatureQuery) -> int:
        value = obs.keys.get(q.key)
        if value is None:
            return 0
        t = obs.at_ms
        inside = [
            (amount, keys)
            for at, amount, recorded, keys in self.events
            if recorded.get(q.key) == value and t - q.seconds * 1000 < at <= t
        ]
        if q.agg is Agg.COUNT:
            return len(inside)
        if q.agg is Agg.SUM:
            return sum(amount for amount, _ in inside)
        return len({keys[q.of] for _, keys in inside if q.of in keys})


EDGES_MS = [0, 1, 999, 1000, 59_999, 60_000, 60_001, 3_599_999, 3_600_000, 86_399_999]
# Mostly steps that land events on a window's edge, some arbitrary ones.
steps = st.one_of(
    st.sampled_from([*EDGES_MS, 86_400_000, 90_000_000]),
    st.sampled_from(EDGES_MS),
    st.integers(0, 4_000_000),
)
operations = st.tuples(
    st.booleans(),  # record_and_read, or read only
    steps,
    st.integers(0, 12),  # order ids repeat: retries
    st.integers(0, 100_000),
    st.dictionaries(st.sampled_from(KEY_NAMES), st.sampled_from(["a", "a", "b", ""]), min_size=1),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # a fresh store per example
)
@given(ops=st.lists(operations, max_size=40))
def test_store_matches_brute_force_reference(
    make_store: StoreFactory,
    ops: list[tuple[bool, int, int, int, dict[str, str]]],
) -> None:
    clock = FakeClock(1_700_000_000.0)
    store = make_store(clock)
    reference = Reference()
    for record, step_ms, order, amount, keys in ops:
        clock.advance(step_ms / 1000)
        obs = Observation(f"o{order}", clock.now(), amount, keys)
        if record:
            got = store.record_and_read(obs, QUERIES)
            want = reference.record_and_read(obs, to_ms(clock.now()), QUERIES)
        else:
            got, want = store.read(obs, QUERIES), reference.read(obs, QUERIES)
        assert {q.name: v for q, v in got.items()} == want


late_operations = st.tuples(
    st.booleans(),
    steps,
    st.integers(0, 300_000),  # how late the observation is: up to 5 minutes behind the clock
    st.integers(0, 12),
    st.integers(0, 100_000),
    st.dictionaries(st.sampled_from(KEY_NAMES), st.sampled_from(["a", "a", "b", ""]), min_size=1),
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(late_operations, max_size=40))
def test_backends_agree_on_late_observations(
    ops: list[tuple[bool, int, int, int, int, dict[str, str]]],
) -> None:
    """Replicas and threads deliver observations slightly out of order: same answers."""
    clock = FakeClock(1_700_000_000.0)
    prefix = f"riskd-test:features:{uuid.uuid4().hex}:"
    memory = InProcessFeatureStore(clock)
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    try:
        for record, step_ms, late_ms, order, amount, keys in ops:
            clock.advance(step_ms / 1000)
            obs = Observation(f"o{order}", clock.now() - late_ms / 1000, amount, keys)
            if record:
                got, want = (
                    shared.record_and_read(obs, QUERIES),
                    memory.record_and_read(obs, QUERIES),
                )
            else:
                got, want = shared.read(obs, QUERIES), memory.read(obs, QUERIES)
            assert {q.name: v for q, v in got.items()} == {q.name: v for q, v in want.items()}
    finally:
        shared.close()
        client = redis.Redis.from_url(REDIS_URL)
        delete_prefix(client, prefix)
        client.close()
