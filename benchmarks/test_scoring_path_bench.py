"""In-process scoring path: 200 rules + velocity features + the evidence log, no gRPC.

What it measures: orders per second through ``Scorer.score_batch`` (and
``Scorer.score``) with a real compiled program of 200 rules, a real feature
store (Redis at 127.0.0.1:6379, or in-process) and the real decision log on a
SQLite file (its writer thread commits in the background, as in production).
The service's ``ScoreBatch`` benchmark compares its orders/s against
``test_scoring_path_batch64[redis]`` from the same run.

Run::

    .venv/bin/python -m pytest benchmarks/test_scoring_path_bench.py --benchmark-only

Each round scores 64 new orders (fresh order ids: nothing is answered from
the idempotency cache); ``extra_info`` has orders/s and CPU µs per order.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from riskd.domain.clock import SystemClock
from riskd.domain.order import Address, Amounts, Buyer, Channel, Item, Order
from riskd.dsl.holder import ProgramHolder
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.scorer import Scorer
from riskd.evidence.log import DecisionLog
from riskd.features.memory import InProcessFeatureStore
from riskd.features.redis_store import RedisFeatureStore
from riskd.features.store import FeatureStore
from riskd.pii import BlindIndexer, Keyring
from riskd.sql import Database

BATCH = 64
RULES = 200

_KEYS = ("buyer", "device", "ip", "address", "phone", "shop", "live_room")
_WINDOWS = ("1m", "1h", "24h")
_DISTINCT = (("device", "buyer"), ("address", "device"), ("shop", "buyer"), ("ip", "buyer"))


def _when(i: int) -> str:
    """A spread of rule shapes: amounts, account age, lists, and velocity features.

    Thresholds are set so that an order hits about one rule on average, as in
    production (a rule that fires on most orders is a broken rule); every
    rule is still evaluated in full on every order.
    """
    key, window = _KEYS[i % len(_KEYS)], _WINDOWS[i % len(_WINDOWS)]
    shapes = (
        f"order.amounts.total > {55_000 + 100 * i}",
        f'orders("{key}", "{window}") > {500 + i}',
        f'amount("{key}", "{window}") > {50_000_000 + 10_000 * i}',
        'distinct("{}", "{}", "{}") > {}'.format(*_DISTINCT[i % len(_DISTINCT)], window, 40 + i),
        f"order.buyer.account_age_days < {i % 3} && order.amounts.total > {40_000 + i * 50}",
        f"order.items.exists(it, it.category in watched_{i % 4})"
        f" && order.amounts.total > {i * 100}",
    )
    return shapes[i % len(shapes)]


def write_rules(directory: Path) -> Path:
    lists = "\n".join(
        f'list watched_{n} = ["{("small_appliances", "toys")[n > 0]}", "luxury_{n}"]'
        for n in range(4)
    )
    blocks = [
        f"""rule r{i:03d} {{
  description = "generated rule {i}"
  owner       = "bench"
  scenarios   = [checkout]
  mode        = {"shadow" if i % 10 == 9 else "active"}
  action      = {("review", "block", "review")[i % 3]}
  score       = {i % 50}
  reason      = R{i:03d}
  when        = {_when(i)}
}}"""
        for i in range(RULES)
    ]
    text = 'scenario checkout = "All checkouts"\n\n' + lists + "\n\n" + "\n\n".join(blocks) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.rules").write_text(text)
    return directory


_ids = itertools.count()


def make_orders(n: int) -> list[Order]:
    """``n`` new orders from a pool of buyers, devices and shops (so counters grow)."""
    out = []
    for _ in range(n):
        k = next(_ids)
        total = 9_900 + (k * 7_919) % 50_000
        out.append(
            Order(
                order_id=f"bench-{uuid.uuid4().hex[:8]}-{k}",
                buyer=Buyer(
                    buyer_id=f"b{k % 5000}",
                    account_age_days=k % 400,
                    phone=f"139{k % 5000:08d}",
                    name="测试",
                    id_number="330106199001011234",
                    address=Address("浙江省", "杭州市", "滨江区", f"江南大道{k % 3000}号"),
                ),
                shop_id=f"s{k % 300}",
                merchant_id=f"m{k % 300}",
                items=(Item("sku", ("beauty", "small_appliances")[k % 7 == 0], total, 1),),
                amounts=Amounts(items=total, total=total),
                channel=Channel.LIVE_ROOM,
                live_room_id=f"lr{k % 100}",
                creator_id=f"c{k % 100}",
                device_id=f"dev-{k % 7000:06d}",
                ip=f"10.{k % 250}.{k % 13}.{k % 200}",
            )
        )
    return out


@pytest.fixture(params=["redis", "memory"])
def scorer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scorer]:
    clock = SystemClock()
    prefix = f"riskd:bench-{uuid.uuid4().hex[:8]}:"
    store: FeatureStore
    if request.param == "redis":
        store = RedisFeatureStore("redis://127.0.0.1:6379/0", clock, prefix=prefix)
    else:
        store = InProcessFeatureStore(clock)
    db = Database(tmp_path / "evidence.db")
    indexer = BlindIndexer(Keyring.generate())
    log = DecisionLog(db, indexer=indexer)
    holder = ProgramHolder(write_rules(tmp_path / "rules"))
    assert len(holder.current.rules) == RULES
    s = Scorer(
        holder,
        store,
        log,
        indexer,
        clock=clock,
        fallback=FallbackPolicy.default(),
        # as riskd serve wires it: Redis calls inline, bounded by the socket timeout
        feature_timeout_s=0.05 if request.param == "redis" else None,
    )
    s.score_batch(make_orders(BATCH))  # warm up connections and caches
    yield s
    s.close()
    log.close()
    store.close()
    db.close()
    if request.param == "redis":
        client = redis.Redis(port=6379)
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        client.close()


def _measure(benchmark: Any, run: Callable[[list[Order]], object]) -> None:
    cpu: list[float] = []

    def setup() -> tuple[tuple[list[Order]], dict[str, Any]]:
        return (make_orders(BATCH),), {}

    def target(orders: list[Order]) -> None:
        started = time.process_time()
        run(orders)
        cpu.append(time.process_time() - started)

    benchmark.pedantic(target, setup=setup, rounds=20, iterations=1, warmup_rounds=2)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["orders_per_s"] = round(BATCH / mean)
    benchmark.extra_info["cpu_us_per_order"] = round(sum(cpu) / len(cpu) / BATCH * 1e6, 1)
    print(  # the numbers the report quotes
        f"\n{benchmark.name}: {BATCH / mean:,.0f} orders/s, "
        f"{sum(cpu) / len(cpu) / BATCH * 1e6:.0f} CPU µs/order (includes the writer thread)"
    )


def test_scoring_path_batch64(benchmark: Any, scorer: Scorer) -> None:
    """``score_batch`` of 64 orders with a deadline (the ScoreBatch path)."""
    _measure(benchmark, lambda orders: scorer.score_batch(orders, timeout_s=1.0))


def test_scoring_path_single(benchmark: Any, scorer: Scorer) -> None:
    """``score`` one order at a time with a deadline each (the unary Score path)."""

    def each(orders: list[Order]) -> None:
        for order in orders:
            scorer.score(order, timeout_s=0.05)

    _measure(benchmark, each)
