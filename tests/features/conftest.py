"""Fixtures for the feature stores: each backend, on a fake clock, cleaned up after."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from features_support import REDIS_URL, SHARD_URLS, delete_prefix

from riskd.domain.clock import FakeClock
from riskd.features import FeatureStore, InProcessFeatureStore, RedisFeatureStore

StoreFactory = Callable[[FakeClock], FeatureStore]


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # a missing Redis is a failure, not a skip
    yield client
    client.close()


@pytest.fixture(params=["memory", "redis", "redis-sharded"])
def make_store(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """A factory of fresh, empty stores of one backend.

    Redis stores each get their own prefix under one namespace for this test,
    which is deleted afterwards.
    """
    made: list[FeatureStore] = []
    namespace = f"riskd-test:features:{uuid.uuid4().hex}:"

    def make(clock: FakeClock) -> FeatureStore:
        store: FeatureStore
        if request.param == "memory":
            store = InProcessFeatureStore(clock)
        else:
            prefix = f"{namespace}{len(made)}:"
            urls = SHARD_URLS if request.param == "redis-sharded" else (REDIS_URL,)
            store = RedisFeatureStore(urls, clock, prefix=prefix, timeout_s=2.0)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    if request.param != "memory":
        for url in SHARD_URLS:
            client = redis.Redis.from_url(url)
            delete_prefix(client, namespace)
            client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def store(make_store: StoreFactory, clock: FakeClock) -> FeatureStore:
    return make_store(clock)
