"""The feature store only ever sees blind indexes of an order's identities, never plaintext."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import redis

from riskd.domain.clock import FakeClock
from riskd.domain.features import KEYS
from riskd.domain.order import Address, Amounts, Buyer
from riskd.engine.keys import observation_keys, observe
from riskd.features.redis_store import RedisFeatureStore
from riskd.pii import BlindIndexer
from riskd.pii.blind import join_address
from tests.features.features_support import delete_prefix

from .conftest import DEVICE, IP, PHONE, STREET, Rig, make_order

PLAINTEXTS = (PHONE, DEVICE, IP, STREET, "b-1", "s-1", "lr-1", "c-1", "order-7f3a")


def test_keys_are_the_blind_index_of_every_identity(indexer: BlindIndexer) -> None:
    order = make_order("o-1")
    keys = observation_keys(order, indexer)
    assert set(keys) == set(KEYS)  # this order carries every key
    assert keys["phone"] == indexer.index("phone", PHONE)
    assert keys["device"] == indexer.index("device", DEVICE.lower())  # normalized first
    plain = {
        "buyer": "b-1",
        "device": DEVICE,
        "ip": IP,
        "address": join_address("浙江省", "杭州市", "滨江区", STREET),
        "phone": PHONE,
        "shop": "s-1",
        "live_room": "lr-1",
        "creator": "c-1",
    }
    assert keys == {name: indexer.index(name, value) for name, value in plain.items()}
    assert not any(p in v for v in keys.values() for p in PLAINTEXTS)


def test_keys_leave_out_missing_values_and_a_bare_city(indexer: BlindIndexer) -> None:
    order = make_order("o-1")
    bare = Buyer("b-2", address=Address("浙江省", "杭州市", "滨江区", ""))
    order = type(order)(order_id="o-2", buyer=bare, shop_id="s-1", merchant_id="m-1")
    assert set(observation_keys(order, indexer)) == {"buyer", "shop"}
    obs = observe(order, indexer, 1_790_000_000.0)
    assert (obs.amount, obs.at) == (0, 1_790_000_000.0)
    # the stores sum what the buyer pays: the total, not the items' price before discounts
    paid = Amounts(items=12_900, discount=900, coupon=500, shipping=600, total=12_100)
    assert observe(replace(order, amounts=paid), indexer, 1_790_000_000.0).amount == 12_100
    # the stores remember orders by a keyed hash of their id, exact (not normalized)
    assert obs.order_id == indexer.index("order", "o-2") != indexer.index("order", "O-2")
    assert "o-2" not in obs.order_id


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, redis.Redis]]:
    prefix = f"riskd:test-engine-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis(port=6379)
    yield prefix, client
    delete_prefix(client, prefix)
    client.close()


@pytest.mark.redis
def test_redis_holds_no_plaintext_identity(
    make_rig: Callable[..., Rig], clock: FakeClock, shared_redis: tuple[str, redis.Redis]
) -> None:
    prefix, client = shared_redis
    store = RedisFeatureStore("redis://127.0.0.1:6379/0", clock, prefix=prefix)
    rig = make_rig(store)
    for i in range(3):
        assert rig.scorer.score(make_order(f"order-7f3a{i}")).degraded == ()
    dumped = b""
    keys = list(client.scan_iter(match=prefix + "*", count=10_000))
    assert keys
    for key in keys:
        dumped += key + (client.dump(key) or b"")
    for value in PLAINTEXTS:
        assert value.encode() not in dumped
    store.close()


def test_blank_identities_are_left_out_and_the_order_id_is_kept_exact(
    indexer: BlindIndexer,
) -> None:
    """A blank device or IP would lump every such order under one key; the stores' order
    id is the keyed hash of the id as sent (``O-7`` and ``o-7`` are two orders)."""
    order = replace(make_order("O-7"), device_id="   ", ip=" ")
    assert not {"device", "ip"} & set(observation_keys(order, indexer))
    # nor one that normalizes to nothing (separators only): no key of "" either
    dashes = replace(order, device_id="--:--", buyer=replace(order.buyer, phone="( - )"))
    assert not {"device", "phone"} & set(observation_keys(dashes, indexer))
    obs = observe(order, indexer, 1_790_000_000.0)
    assert obs.order_id == indexer.index("order", "O-7") != indexer.index("order", "o-7")
