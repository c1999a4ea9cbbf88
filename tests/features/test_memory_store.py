"""What only the in-process store promises: bounded memory, thread safety, exact sums."""

from __future__ import annotations

import gc
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


def test_windows_stay_exact_as_old_events_and_sightings_are_compacted_away() -> None:
    """Four days, an order every 20 minutes: each day's oldest events and sightings leave
    the 24 h window one by one and are compacted away; counts, sums and distinct counts
    match a brute-force count throughout (buyers new for two days, then repeating)."""
    clock = FakeClock()
    store = InProcessFeatureStore(clock)
    sum_24h = FeatureQuery(Agg.SUM, "shop", "24h")
    queries = [COUNT_24H, sum_24h, BUYERS_24H]
    seen: list[tuple[float, int, str]] = []
    for i in range(4 * 72):
        buyer = f"b{i}" if i < 144 else f"r{i % 50}"
        amount = i * 7919 % 100_000
        seen.append((clock.now(), amount, buyer))
        got = store.record_and_read(
            Observation(f"o{i}", clock.now(), amount, {"shop": "s", "buyer": buyer}), queries
        )
        inside = [e for e in seen if clock.now() - 86_400 < e[0]]
        assert got[COUNT_24H] == len(inside), i
        assert got[sum_24h] == sum(amount for _, amount, _ in inside), i
        assert got[BUYERS_24H] == len({b for _, _, b in inside}), i
        clock.advance(1200)


def test_recorded_state_leaves_nothing_for_the_garbage_collector() -> None:
    """A day of keys must not become millions of objects that every full collection walks
    while holding the GIL (pauses of hundreds of ms on the request path)."""
    clock = FakeClock()
    store = InProcessFeatureStore(clock)
    keys = [f"k{i}" for i in range(3000)]
    gc.collect()
    before = len(gc.get_objects())
    for i, key in enumerate(keys):
        store.record_and_read(order(clock, i, device=key, buyer=key, shop=key), QUERIES)
        clock.advance(1)
    for i in range(100):  # one shop, many buyers in the same millisecond
        store.record_and_read(order(clock, 10_000 + i, buyer=f"b{i}", shop="hot"), QUERIES)
    gc.collect()
    gc.collect()
    assert store.size().series == 3 * len(keys) + 100 + 1
    hot = store.read(order(clock, 0, shop="hot"), QUERIES)
    assert hot[BUYERS_24H] == 100 and hot[COUNT_24H] == 100
    assert len(gc.get_objects()) - before < 0.05 * len(keys)


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
