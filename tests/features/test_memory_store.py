"""What only the in-process store promises: bounded memory, thread safety, exact sums."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from riskd.domain.clock import FakeClock
from riskd.domain.features import Agg, FeatureQuery
from riskd.features import InProcessFeatureStore, Observation, StoreSize

COUNT_1H = FeatureQuery(Agg.COUNT, "device", "1h")
SUM_1H = FeatureQuery(Agg.SUM, "device", "1h")
COUNT_24H = FeatureQuery(Agg.COUNT, "shop", "24h")
BUYERS_24H = FeatureQuery(Agg.DISTINCT, "shop", "24h", of="buyer")
QUERIES = [COUNT_1H, SUM_1H, COUNT_24H, BUYERS_24H]


def order(clock: FakeClock, i: int, **keys: str) -> Observation:
    return Observation(f"o{i}", clock.now(), i, keys)


def test_state_is_forgotten_once_every_window_has_passed() -> None:
    clock = FakeClock()
    store = InProcessFeatureStore(clock)
    for i in range(300):
        store.record_and_read(order(clock, i, device=f"d{i}", buyer=f"b{i}", shop="s"), QUERIES)
    assert store.size() == StoreSize(series=601, events=900, distinct_sets=1, orders=300)
    clock.advance(25 * 3600)
    for i in range(10):  # each recorded order sweeps a batch of keys
        store.record_and_read(order(clock, 1000 + i, device="d", shop="s"), QUERIES)
    assert store.size() == StoreSize(series=2, events=20, distinct_sets=0, orders=10)


def test_a_call_sweeps_only_a_batch_and_sweep_does_the_rest() -> None:
    clock = FakeClock()
    store = InProcessFeatureStore(clock)
    for i in range(1000):
        store.record_and_read(order(clock, i, buyer=f"b{i}"), QUERIES)
    clock.advance(26 * 3600)
    store.record_and_read(order(clock, 5000, buyer="new"), QUERIES)
    assert 1001 - 64 <= store.size().series < 1001
    store.sweep()
    assert store.size() == StoreSize(series=1, events=1, distinct_sets=0, orders=1)


def test_memory_stays_bounded_under_steady_traffic() -> None:
    clock = FakeClock()
    store = InProcessFeatureStore(clock)
    sizes = []
    for i in range(3 * 24 * 12):  # three days, an order every 5 minutes, always new buyers
        store.record_and_read(order(clock, i, buyer=f"b{i}", shop="s"), QUERIES)
        clock.advance(300)
        sizes.append(store.size())
    day = 24 * 12  # orders a day
    lag = 12  # orders a sweep takes to walk every key, in batches
    assert max(s.orders for s in sizes) <= day + 12 + 1  # 25 hours of order ids
    assert max(s.series for s in sizes) <= day + 12 + lag + 2  # the shop, 25 h of buyers
    assert max(s.events for s in sizes) <= 2 * day + 12 + lag + 2  # the shop's keep 24 h


def test_sums_stay_exact_across_compaction() -> None:
    clock = FakeClock()
    store = InProcessFeatureStore(clock)
    amounts: list[int] = []
    for i in range(500):  # one device, an order a minute: 1h keeps the last 60
        amounts.append(i * 7 % 1000)
        got = store.record_and_read(
            Observation(f"o{i}", clock.now(), amounts[-1], {"device": "d"}), QUERIES
        )
        assert (got[COUNT_1H], got[SUM_1H]) == (min(i + 1, 60), sum(amounts[-60:]))
        clock.advance(60)


def test_concurrent_orders_are_all_counted() -> None:
    clock = FakeClock()
    store = InProcessFeatureStore(clock)

    def record(i: int) -> None:
        store.record_and_read(order(clock, i, device="d", buyer=f"b{i % 50}", shop="s"), QUERIES)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(record, range(2000)))
    got = store.read(Observation("probe", clock.now(), 0, {"device": "d", "shop": "s"}), QUERIES)
    assert got == {COUNT_1H: 2000, SUM_1H: sum(range(2000)), COUNT_24H: 2000, BUYERS_24H: 50}


def test_order_older_than_the_longest_window_is_remembered_but_not_counted() -> None:
    clock = FakeClock()
    store = InProcessFeatureStore(clock)
    store.record_and_read(order(clock, 1, shop="s"), QUERIES)
    ancient = Observation("ancient", clock.now() - 2 * 86400, 5, {"shop": "s"})
    store.record_and_read(ancient, QUERIES)
    assert store.size().events == 1
    assert store.read(order(clock, 2, shop="s"), QUERIES)[COUNT_24H] == 1
