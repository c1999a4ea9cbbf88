"""Fixtures for the feature stores: each backend, on a fake clock, cleaned up after."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from features_support import REDIS_URL, delete_prefix

from riskd.domain.clock import FakeClock
from riskd.features import FeatureStore, InProcessFeatureStore, RedisFeatureStore

StoreFactory = Callable[[FakeClock], FeatureStore]


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # a missing Redis is a failure, not a skip
    yield client
    client.close()


@pytest.fixture(params=["memory", "redis"])
def make_store(
    request: pytest.FixtureRequest,
) -> Iterator[StoreFactory]:
    """A factory of fresh, empty stores of one backend; Redis ones get a unique prefix."""
    made: list[FeatureStore] = []
    prefixes: list[str] = []

    def make(clock: FakeClock) -> FeatureStore:
        store: FeatureStore
        if request.param == "memory":
            store = InProcessFeatureStore(clock)
        else:
            prefix = f"riskd-test:features:{uuid.uuid4().hex}:"
            prefixes.append(prefix)
            store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    if prefixes:
        client = redis.Redis.from_url(REDIS_URL)
        for prefix in prefixes:
            delete_prefix(client, prefix)
        client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def store(make_store: StoreFactory, clock: FakeClock) -> FeatureStore:
    return make_store(clock)
