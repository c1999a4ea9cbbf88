"""One order through a feature store: ``record_and_read`` with 10 queries, both backends.

What it measures: the cost the scorer pays per order for velocity features,
recording a new order under all 8 keys and reading 10 features (counts, sums
and distinct counts across the three windows), plus a retried order (already
recorded: reads only). The Redis backend talks to 127.0.0.1:6379, one
EVALSHA per call. Observations are built outside the timed call;
``extra_info.cpu_us_per_call`` is this process's CPU time per call (for
Redis, the client's share: the server's own time is not in it).

Run::

    .venv/bin/python -m pytest benchmarks/test_features_bench.py --benchmark-only
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from pytest_benchmark.fixture import BenchmarkFixture

from riskd.domain.clock import SystemClock
from riskd.domain.features import Agg, FeatureQuery
from riskd.features import InProcessFeatureStore, Observation, RedisFeatureStore
from riskd.features.store import FeatureStore

REDIS_URL = "redis://127.0.0.1:6379/0"
QUERY_LIST = [
    FeatureQuery(Agg.COUNT, "buyer", "1m"),
    FeatureQuery(Agg.COUNT, "device", "1h"),
    FeatureQuery(Agg.COUNT, "ip", "1h"),
    FeatureQuery(Agg.COUNT, "shop", "1m"),
    FeatureQuery(Agg.SUM, "buyer", "24h"),
    FeatureQuery(Agg.SUM, "live_room", "1h"),
    FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer"),
    FeatureQuery(Agg.DISTINCT, "address", "24h", of="device"),
    FeatureQuery(Agg.DISTINCT, "shop", "1h", of="buyer"),
    FeatureQuery(Agg.DISTINCT, "ip", "24h", of="buyer"),
]
QUERIES = frozenset(QUERY_LIST)  # as the engine passes them: the program's frozenset
POOLS = {  # how many distinct values each key takes: shops and rooms are hot keys
    "buyer": 20_000,
    "device": 15_000,
    "ip": 5_000,
    "address": 18_000,
    "phone": 20_000,
    "shop": 50,
    "live_room": 20,
    "creator": 30,
}


def _observation(clock: SystemClock, i: int, order_id: str) -> Observation:
    keys = {name: f"{name}-{(i * 7919) % pool:08x}" for name, pool in POOLS.items()}
    return Observation(order_id, clock.now(), 1_000 + i % 50_000, keys)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[FeatureStore]:
    clock = SystemClock()
    if request.param == "memory":
        yield InProcessFeatureStore(clock)
        return
    prefix = f"riskd-bench:features:{uuid.uuid4().hex}:"
    redis_store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=1.0)
    yield redis_store
    redis_store.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=5000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    client.close()


class _Orders:
    """New orders for one store, with some history recorded first so windows hold events."""

    def __init__(self, store: FeatureStore, history: int = 2_000) -> None:
        self.store, self.clock = store, SystemClock()
        self.counter, self.run = itertools.count(), uuid.uuid4().hex[:8]
        self.cpu_s, self.calls = 0.0, 0
        for _ in range(history):
            store.record_and_read(self.next_observation(), QUERIES)

    def next_observation(self) -> Observation:
        i = next(self.counter)
        return _observation(self.clock, i, f"{self.run}-{i}")

    def setup(self) -> tuple[tuple[Observation, frozenset[FeatureQuery]], dict[str, object]]:
        return (self.next_observation(), QUERIES), {}

    def record_and_read(
        self, obs: Observation, queries: frozenset[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        started = time.process_time()
        got = self.store.record_and_read(obs, queries)
        self.cpu_s += time.process_time() - started
        self.calls += 1
        return got


def test_record_and_read_new_order(benchmark: BenchmarkFixture, store: FeatureStore) -> None:
    orders = _Orders(store)
    got = benchmark.pedantic(orders.record_and_read, setup=orders.setup, rounds=3_000)
    benchmark.extra_info["cpu_us_per_call"] = round(orders.cpu_s / orders.calls * 1e6, 1)
    assert len(got) == len(QUERIES) and got[QUERY_LIST[0]] >= 1


def test_record_and_read_retried_order(benchmark: BenchmarkFixture, store: FeatureStore) -> None:
    orders = _Orders(store)
    retried = orders.next_observation()
    store.record_and_read(retried, QUERIES)
    got = benchmark.pedantic(
        orders.record_and_read, setup=lambda: ((retried, QUERIES), {}), rounds=3_000
    )
    benchmark.extra_info["cpu_us_per_call"] = round(orders.cpu_s / orders.calls * 1e6, 1)
    assert got[QUERY_LIST[0]] >= 1
