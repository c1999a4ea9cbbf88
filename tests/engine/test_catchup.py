"""The catch-up's queue: limits, orders too old to count, a failing order, closing.

A real in-process store behind a wrapper that fails (or stalls) the calls of chosen
orders, a real breaker, a fake clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from riskd import spillfile
from riskd.domain.clock import FakeClock
from riskd.domain.features import Agg, FeatureQuery
from riskd.engine import catchup
from riskd.engine.breaker import BreakerPolicy, CircuitBreaker
from riskd.engine.catchup import CatchUp
from riskd.engine.keys import observe
from riskd.errors import UnavailableError
from riskd.evidence.schema import create_schema
from riskd.features.memory import InProcessFeatureStore
from riskd.features.redis_store import RedisFeatureStore
from riskd.features.store import Observation
from riskd.pii import BlindIndexer
from riskd.sql import Database
from tests.features.features_support import REDIS_URL, delete_prefix
from tests.own_redis import OwnRedis

from .conftest import DEVICE, IP, PHONE, STREET, Rig, make_order

BUYER_1H = FeatureQuery(Agg.COUNT, "buyer", "1h")
QUERIES = (BUYER_1H, FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer"))


class Store(InProcessFeatureStore):
    """The in-process store, failing the calls of ``failing`` order ids (blind-indexed)
    and holding those of ``stalled`` until ``release`` is set."""

    def __init__(self, clock: FakeClock, indexer: BlindIndexer) -> None:
        super().__init__(clock)
        self.indexer = indexer
        self.failing: set[str] = set()
        self.stalled: set[str] = set()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[str] = []
        self.asked: list[Collection[FeatureQuery]] = []
        self.down = False  # every call fails, reads too: the store is away

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        name = next(o for o in ("bad", "slow", "a", "b", "c", "d", "e") if self._is(obs, o))
        self.calls.append(name)
        self.asked.append(queries)
        if name in self.stalled:
            self.entered.set()
            self.release.wait(5)
        if name in self.failing or self.down:
            raise UnavailableError("feature store: redis TimeoutError")
        return super().record_and_read(obs, queries)

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        if self.down:
            raise UnavailableError("feature store: redis ConnectionError")
        return super().read(obs, queries)

    def _is(self, obs: Observation, order_id: str) -> bool:
        return obs.order_id == self.indexer.index("order", order_id)


@pytest.fixture
def store(clock: FakeClock, indexer: BlindIndexer) -> Store:
    return Store(clock, indexer)


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(clock, BreakerPolicy(failures=1, open_s=1.0), name="features")


@pytest.fixture
def up(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock
) -> Iterator[CatchUp]:
    made = CatchUp(store, indexer, breaker, clock, max_queued=3)
    yield made
    made.close()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing store is tried again after 1 ms rather than a second."""
    monkeypatch.setattr(catchup, "RETRY_S", 0.001)


def counted(store: Store, indexer: BlindIndexer, clock: FakeClock) -> int:
    probe = observe(make_order("probe"), indexer, clock.now())
    return store.read(probe, [BUYER_1H])[BUYER_1H]


def test_orders_past_the_limit_are_dropped_and_queued_again_by_a_retry(
    up: CatchUp, store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock
) -> None:
    breaker.failure(UnavailableError("down"))  # the store is away: the queue waits
    orders = [make_order(o) for o in "abcde"]
    up.submit([(o, clock.now()) for o in orders], QUERIES)
    assert up.queued() == 3
    # what waits is blind-indexed at once: no order's PII is kept through the outage
    assert holding_ends(up, 5) and up.queued() == 3
    breaker.success()
    assert up.wait(5)
    assert counted(store, indexer, clock) == 3
    up.submit([(o, clock.now()) for o in orders[3:]], QUERIES)  # their retries
    assert up.wait(5)
    assert counted(store, indexer, clock) == 5
    assert set(store.calls) == set("abcde")
    # only the distinct queries are asked: counts read at an old time scan the key
    assert {tuple(q) for q in store.asked} == {QUERIES[1:]}


def test_orders_dropped_for_want_of_room_are_counted_and_told_once_per_overflow(
    up: CatchUp,
    store: Store,
    breaker: CircuitBreaker,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: a 5-second Redis outage at 2,100 orders/s answered 10,500 orders degraded;
    500 found the queue full and stayed out of their windows for good, with no log line
    and no metric. Now they are counted (``dropped``) and the overflow is told: a warning
    at its first order dropped, and how many once the queue is down to half its limit."""
    caplog.set_level(logging.INFO, logger="riskd.engine.catchup")
    breaker.failure(UnavailableError("down"))  # the store is away: the queue waits
    up.submit([(make_order(o), clock.now()) for o in "abcd"], QUERIES)
    up.submit([(make_order(o), clock.now()) for o in "ead"], QUERIES)  # a: queued already
    assert up.queued() == 3 and up.dropped() == {
        "full": 3,
        "failing": 0,
        "error": 0,
        "lost_at_close": 0,
    }
    breaker.success()
    assert up.wait(5)
    said = [
        (r.levelname, r.getMessage(), getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == "riskd.engine.catchup"
    ]
    assert [(level, fields) for level, _, fields in said] == [
        ("WARNING", {"queue_limit": 3}),
        ("INFO", {"orders": 3, "queue_limit": 3}),
    ]
    assert "dropped uncounted" in said[0][1] and "room again" in said[1][1]


def test_an_overflow_is_told_over_once_the_queue_is_down_to_half_its_limit(
    up: CatchUp,
    store: Store,
    breaker: CircuitBreaker,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Operators read the overflow's end as "orders are counted again": it is told at half
    the limit (here 1 of 3), not only once the queue is empty."""
    caplog.set_level(logging.INFO, logger="riskd.engine.catchup")
    store.stalled.add("slow")
    breaker.failure(UnavailableError("down"))
    up.submit([(make_order(o), clock.now()) for o in ("a", "b", "slow", "d")], QUERIES)
    breaker.success()
    assert store.entered.wait(5)  # a and b counted; "slow" (1 order) is in hand
    said = [r.levelname for r in caplog.records if r.name == "riskd.engine.catchup"]
    store.release.set()
    assert said == ["WARNING", "INFO"]


def kept_while_away(up: CatchUp, breaker: CircuitBreaker, clock: FakeClock, ids: str) -> None:
    """Orders ``ids`` (one letter each) answered while the store was away, then ``up``
    closed: kept in its database (its evidence schema created first)."""
    assert up._keep is not None
    create_schema(up._keep)
    breaker.failure(UnavailableError("down"))
    up.submit([(make_order(o), clock.now()) for o in ids], QUERIES)
    assert holding_ends(up, 5)
    up.close()


def holding_ends(up: CatchUp, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while up.holding() and time.monotonic() < deadline:
        time.sleep(0.005)
    return up.holding() == 0


def test_an_order_queued_while_the_store_is_away_is_blind_indexed_at_once(
    up: CatchUp, breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """Review: one queued while the thread waited to retry the store (a second) kept its
    PII that long."""
    breaker.failure(UnavailableError("down"))
    up.submit([(make_order("a"), clock.now())], QUERIES)
    assert holding_ends(up, 5)
    time.sleep(0.05)  # the thread now waits to try the store again
    up.submit([(make_order("b"), clock.now())], QUERIES)
    assert holding_ends(up, catchup.RETRY_S / 2)
    assert up.queued() == 2


def test_an_order_decided_a_day_ago_counts_nowhere_and_is_not_queued(
    up: CatchUp, store: Store, clock: FakeClock
) -> None:
    up.submit([(make_order("a"), clock.now() - 86_400)], QUERIES)
    assert up.queued() == 0 and store.calls == []


def test_a_failing_order_goes_to_the_back_and_is_given_up_after_max_tries(
    up: CatchUp,
    store: Store,
    indexer: BlindIndexer,
    clock: FakeClock,
    quick_retries: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.failing.add("bad")
    up.submit([(make_order(o), clock.now()) for o in ("bad", "a", "b")], QUERIES)
    assert up.wait(5)
    assert store.calls[:4] == ["bad", "a", "b", "bad"]  # a and b did not wait behind it
    assert store.calls.count("bad") == catchup.MAX_TRIES
    assert counted(store, indexer, clock) == 2
    assert up.dropped() == {
        "full": 0,
        "failing": 1,
        "error": 0,
        "lost_at_close": 0,
    }  # told (review: it went silently)
    [record] = [r for r in caplog.records if r.name == "riskd.engine.catchup"]
    assert record.levelname == "WARNING" and "given up" in record.getMessage()


def test_a_given_up_order_is_queued_again_by_its_retry(
    up: CatchUp, store: Store, indexer: BlindIndexer, clock: FakeClock, quick_retries: None
) -> None:
    """An order given up is no longer queued: its retry, answered degraded again once the
    trouble is over, queues it again and it is counted."""
    store.failing.add("bad")
    up.submit([(make_order("bad"), clock.now())], QUERIES)
    assert up.wait(5) and up.dropped()[catchup.FAILING] == 1
    store.failing.clear()
    up.submit([(make_order("bad"), clock.now())], QUERIES)  # its retry
    assert up.wait(5) and counted(store, indexer, clock) == 1


def test_close_waits_for_the_order_being_recorded_and_then_takes_none(
    up: CatchUp, store: Store, indexer: BlindIndexer, clock: FakeClock
) -> None:
    store.stalled.add("slow")
    up.submit([(make_order("slow"), clock.now()), (make_order("a"), clock.now())], QUERIES)
    assert store.entered.wait(5)
    threading.Timer(0.2, store.release.set).start()
    started = time.monotonic()
    up.close()
    assert time.monotonic() - started >= 0.15  # the call in flight ended first
    assert counted(store, indexer, clock) == 1  # "slow"; "a" was dropped
    up.submit([(make_order("b"), clock.now())], QUERIES)
    assert up.queued() == 0 and "b" not in store.calls


def test_close_counts_what_it_can_while_the_store_answers(
    up: CatchUp,
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
) -> None:
    """Review: a restart (SIGTERM) dropped the queue even with the store answering."""
    up.submit([(make_order(o), clock.now()) for o in "abc"], QUERIES)
    up.close(drain_s=5)
    assert counted(store, indexer, clock) == 3


@pytest.mark.parametrize("away", ["breaker open", "calls failing"])
def test_close_does_not_wait_for_a_store_that_is_away(
    up: CatchUp, store: Store, breaker: CircuitBreaker, clock: FakeClock, away: str
) -> None:
    """Review (calls failing): a frozen or dead Redis, its breaker still closed, held
    every stop the whole drain time although nothing could be counted."""
    if away == "breaker open":
        breaker.failure(UnavailableError("down"))
    else:
        store.failing.update("abc")
    up.submit([(make_order(o), clock.now()) for o in "abc"], QUERIES)
    started = time.monotonic()
    up.close(drain_s=5)
    assert time.monotonic() - started < 1 and up.queued() == 0


def test_close_does_not_wait_when_the_store_was_failing_already(
    up: CatchUp, store: Store, clock: FakeClock
) -> None:
    """Review: with the thread waiting to try a failing store again when the stop came,
    the drain waited for that next try (up to a second)."""
    store.failing.update("abc")
    up.submit([(make_order(o), clock.now()) for o in "abc"], QUERIES)
    deadline = time.monotonic() + 5
    while not store.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # the thread now waits before its next try
    started = time.monotonic()
    up.close(drain_s=5)
    assert time.monotonic() - started < 0.5


def test_new_orders_do_not_hurry_the_next_try_of_a_failing_store(
    up: CatchUp, store: Store, clock: FakeClock
) -> None:
    """Review: each order arriving while the store failed cut the wait short, so the
    store was called once per arrival instead of once per ``RETRY_S``."""
    store.failing.update("abcde")
    up.submit([(make_order("a"), clock.now())], QUERIES)
    for o in "bcd":
        time.sleep(0.05)
        up.submit([(make_order(o), clock.now())], QUERIES)
    assert holding_ends(up, 1)  # the new orders were observed meanwhile
    assert store.calls == ["a"]


def test_the_cap_counts_the_order_in_flight(up: CatchUp, store: Store, clock: FakeClock) -> None:
    store.stalled.add("slow")
    up.submit([(make_order("slow"), clock.now())], QUERIES)
    assert store.entered.wait(5)
    up.submit([(make_order(o), clock.now()) for o in "abc"], QUERIES)
    assert up.queued() == 3  # max_queued: "slow" and two of the others
    store.release.set()


def test_an_order_whose_id_another_content_claimed_is_dropped_quietly(
    up: CatchUp,
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Answered without its features here, while a retry with other content reached another
    replica and was counted there: the catch-up must not count this content as well, nor
    call the store's refusal a failure (review: logged as a failed catch-up)."""
    breaker.failure(UnavailableError("down"))
    first = make_order("a")
    up.submit([(first, clock.now())], QUERIES)
    other = make_order("a", buyer_id="b-other")  # the retry another replica counted
    store.record_and_read(observe(other, indexer, clock.now()), QUERIES)
    breaker.success()
    with caplog.at_level("DEBUG", logger="riskd.engine.catchup"):
        assert up.wait(5)
    assert up.queued() == 0 and store.calls.count("a") == 2
    assert counted(store, indexer, clock) == 0  # buyer b-1 not counted for order a
    assert not [r for r in caplog.records if r.name == "riskd.engine.catchup"]


def test_with_no_requests_after_an_outage_the_catch_up_probes_the_store_itself(
    up: CatchUp, store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """Review: the queue waited for a request to probe the breaker, so with no traffic after
    an outage nothing was counted. Once the cooldown is over the catch-up's call is the
    probe: the store answers, the breaker closes, the queue drains."""
    breaker.failure(UnavailableError("down"))
    store.failing.add("a")
    up.submit([(make_order("a"), clock.now())], QUERIES)
    assert not up.wait(0.3) and store.calls == []  # cooling down: not even tried
    clock.advance(1.0)
    deadline = time.monotonic() + 5
    while not up._failing and time.monotonic() < deadline:  # the call done, failure told
        time.sleep(0.01)
    assert store.calls == ["a"] and breaker.is_open  # the probe failed: open again
    store.failing.clear()
    clock.advance(1.0)
    assert up.wait(5)
    assert counted(store, indexer, clock) == 1 and not breaker.is_open


def test_what_close_leaves_is_kept_without_pii_and_the_next_start_counts_it(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, db: Database
) -> None:
    """Review: a restart during a Redis outage dropped the queue, so those orders were
    never counted. ``close`` keeps what is left (observations: keyed hashes, no PII) in
    the log's database and the next start takes it (once) and counts it."""
    create_schema(db)
    first = CatchUp(store, indexer, breaker, clock, keep=db)
    breaker.failure(UnavailableError("down"))
    first.submit([(make_order(o), clock.now()) for o in "ab"], QUERIES)
    assert holding_ends(first, 5)
    first.close(drain_s=0.1)  # the store is away: nothing drains
    rows = db.query("SELECT order_key, keys, content FROM features_catch_up")
    assert len(rows) == 2
    text = repr(rows)
    assert all(v not in text for v in (PHONE, DEVICE, IP, STREET, "b-1", '"a"', "s-1"))
    breaker.success()
    again = CatchUp(store, indexer, breaker, clock, keep=db)
    again.restore(QUERIES)
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(0,)]  # taken once
    assert again.wait(5)
    assert counted(store, indexer, clock) == 2
    third = CatchUp(store, indexer, breaker, clock, keep=db)
    third.restore(QUERIES)
    assert third.queued() == 0
    again.close()
    third.close()


def test_kept_orders_a_day_old_at_the_next_start_are_dropped(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, db: Database
) -> None:
    kept_while_away(CatchUp(store, indexer, breaker, clock, keep=db), breaker, clock, "a")
    clock.advance(catchup.WITHIN_S)
    breaker.success()
    again = CatchUp(store, indexer, breaker, clock, keep=db)
    again.restore(QUERIES)
    assert again.queued() == 0 and store.calls == []
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(0,)]
    again.close()


def test_kept_orders_a_day_old_take_no_room_and_are_deleted_at_a_full_start(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Orders that count nowhere any more are deleted even by a start with no room for
    them: they neither linger in the table nor are told as left for a later start."""
    kept_while_away(CatchUp(store, indexer, breaker, clock, keep=db), breaker, clock, "a")
    clock.advance(catchup.WITHIN_S)
    kept_while_away(CatchUp(store, indexer, breaker, clock, keep=db), breaker, clock, "bc")
    breaker.success()
    again = CatchUp(store, indexer, breaker, clock, keep=db, max_queued=2)
    with caplog.at_level("INFO", logger="riskd.engine.catchup"):
        again.restore(QUERIES)
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(0,)]
    assert not any("left for a later start" in r.getMessage() for r in caplog.records)
    assert again.wait(5) and counted(store, indexer, clock) == 2
    again.close()


def test_with_the_store_away_and_no_requests_orders_wait_however_many_tries_pass(
    up: CatchUp,
    store: Store,
    indexer: BlindIndexer,
    clock: FakeClock,
    quick_retries: None,
) -> None:
    """Review: a restart during an outage, no requests (the breaker stays closed): every
    failed call spent one of the order's tries and the orders were dropped uncounted in
    20 s. A failure the store does not answer around (a call with no keys) spends none."""
    store.down = True
    up.submit([(make_order(o), clock.now()) for o in "ab"], QUERIES)
    deadline = time.monotonic() + 5
    while len(store.calls) < 3 * catchup.MAX_TRIES and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(store.calls) >= 3 * catchup.MAX_TRIES and up.queued() == 2
    store.down = False
    assert up.wait(5)
    assert counted(store, indexer, clock) == 2


def test_an_order_that_waited_out_an_outage_still_gets_all_its_tries_once_the_store_is_back(
    up: CatchUp, store: Store, clock: FakeClock, quick_retries: None
) -> None:
    """The calls failed while the store was away spend none of the order's tries: once it
    answers again, an order that fails on its own is still tried ``MAX_TRIES`` times."""
    store.down = True
    store.failing.add("bad")
    up.submit([(make_order("bad"), clock.now())], QUERIES)
    deadline = time.monotonic() + 5
    while len(store.calls) < 2 * catchup.MAX_TRIES and time.monotonic() < deadline:
        time.sleep(0.005)
    before = len(store.calls)
    store.down = False  # a call under way as it comes back may spend one try
    assert up.wait(5) and up.dropped()[catchup.FAILING] == 1
    assert len(store.calls) - before >= catchup.MAX_TRIES - 1


def test_the_order_in_hand_at_close_is_kept_when_its_call_fails(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, db: Database
) -> None:
    """Review: the order being recorded when close came was neither recorded nor kept."""
    create_schema(db)
    up = CatchUp(store, indexer, breaker, clock, keep=db)
    store.stalled.add("slow")
    store.failing.add("slow")
    up.submit([(make_order("slow"), clock.now())], QUERIES)
    assert store.entered.wait(5)
    threading.Timer(0.2, store.release.set).start()
    up.close()
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(1,)]


def test_orders_not_yet_observed_at_close_are_kept_too(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, db: Database
) -> None:
    """Orders queued while the thread is held in a store call are not observed yet when
    the stop comes: they are kept (observed then, no PII), not lost."""
    create_schema(db)
    up = CatchUp(store, indexer, breaker, clock, keep=db)
    store.stalled.add("slow")
    up.submit([(make_order("slow"), clock.now())], QUERIES)
    assert store.entered.wait(5)
    up.submit([(make_order(o), clock.now()) for o in "ab"], QUERIES)
    assert up.holding() == 2
    threading.Timer(0.2, store.release.set).start()
    up.close()
    rows = db.query("SELECT order_key, keys, content FROM features_catch_up")
    assert len(rows) == 2 and PHONE not in repr(rows)  # "slow" was recorded
    assert sum(up.dropped().values()) == 0


def test_a_start_takes_only_what_its_queue_has_room_for_and_leaves_the_rest(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: the rows past the queue's limit were deleted and lost (two workers kept
    10,000 each; the gRPC process took 20,000 and queued 10,000)."""
    kept_while_away(CatchUp(store, indexer, breaker, clock, keep=db), breaker, clock, "abcde")
    breaker.success()
    again = CatchUp(store, indexer, breaker, clock, keep=db, max_queued=3)
    with caplog.at_level("INFO", logger="riskd.engine.catchup"):
        again.restore(QUERIES)
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(2,)]
    assert again.wait(5) and counted(store, indexer, clock) == 3
    assert any("left for a later start" in r.getMessage() for r in caplog.records)
    later = CatchUp(store, indexer, breaker, clock, keep=db, max_queued=3)
    later.restore(QUERIES)
    assert later.wait(5) and counted(store, indexer, clock) == 5
    again.close()
    later.close()


def test_a_close_whose_flush_fails_still_stops_and_keeps_the_catch_up(
    make_rig: Callable[..., Rig], db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: with the decision log flushed first, a flush that timed out (database held)
    left the catch-up running on the store being closed, and nothing kept."""
    rig = make_rig(breaker=BreakerPolicy(failures=1))
    rig.scorer.breaker.failure(UnavailableError("down"))
    assert rig.scorer.score(make_order("a")).degraded == ("features",)

    def timed_out(timeout_s: float) -> None:
        raise UnavailableError("decision log flush timed out")

    monkeypatch.setattr(rig.log, "flush", timed_out)
    with pytest.raises(UnavailableError):
        rig.scorer.close()
    thread = rig.scorer.catch_up._thread
    assert thread is None or not thread.is_alive()
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(1,)]


def test_a_stop_whose_log_writer_fails_on_a_bug_keeps_the_catch_up_in_the_database(
    make_rig: Callable[..., Rig], db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a decision log flush that timed out because the writer kept failing on a
    bug of its own (the database answering) was taken for the database failing, so the
    catch-up went to a spill file in this host's data folder rather than the database
    (a shared PostgreSQL) that every other replica's next start reads."""
    rig = make_rig(breaker=BreakerPolicy(failures=1), spill_dir=tmp_path)
    rig.scorer.breaker.failure(UnavailableError("down"))

    def bug(*args: object) -> None:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(rig.log, "_write", bug)
    assert rig.scorer.score(make_order("a")).degraded == ("features",)
    assert eventually(lambda: rig.log.restarts > 0)
    with pytest.raises(UnavailableError):
        rig.scorer.close(timeout_s=0.3)
    assert rig.log.failing_on_a_bug
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(1,)]
    assert spilled(tmp_path) == []
    assert sum(rig.scorer.catch_up.dropped().values()) == 0
    monkeypatch.undo()  # the bug mended: the writer's next restart commits the decision
    assert eventually(lambda: rig.log.backlog == 0, 10)
    assert not rig.log.failing_on_a_bug


def test_a_stop_whose_log_writer_fails_on_the_database_spills_the_catch_up_at_once(
    make_rig: Callable[..., Rig], db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side: the log's writer failing on the database itself (held locked by
    another connection), the catch-up goes to its spill file at once, with no wait of
    its own for the same lock (``KEEP_WAIT_S``, 5 s here)."""
    monkeypatch.setattr(catchup, "KEEP_WAIT_S", 5.0)
    rig = make_rig(breaker=BreakerPolicy(failures=1), spill_dir=tmp_path)
    rig.scorer.breaker.failure(UnavailableError("down"))
    holder = sqlite3.connect(tmp_path / "evidence.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        assert rig.scorer.score(make_order("a")).degraded == ("features",)
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            rig.scorer.close(timeout_s=0.3)
        assert time.monotonic() - started < 4.0
        assert not rig.log.failing_on_a_bug
        assert len(spilled(tmp_path)) == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(0,)]


@pytest.mark.redis
def test_orders_whose_keys_live_on_a_shard_that_is_away_wait_for_it(
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    quick_retries: None,
) -> None:
    """Review: whether the store answers was asked of the order id's shard alone, so with
    one shard away (and no requests to open the breaker) its orders were taken for the
    trouble and dropped after 20 quick tries."""
    prefix = f"riskd-test:catchup-shards:{uuid.uuid4().hex}:"
    store = RedisFeatureStore(
        ["redis://127.0.0.1:6379/0", "redis://127.0.0.1:1/0"], clock, prefix=prefix, timeout_s=0.2
    )
    up = CatchUp(store, indexer, breaker, clock)
    try:
        # an order whose own shard (its blind-indexed id's) is the one that answers, and
        # with a key on the one away (the keys' shards follow this test's random keyring:
        # all eight on the first, 1 in 256, the order would just be counted)
        order = next(
            o
            for o in (make_order(f"o-{i}", buyer_id=f"b-{i}") for i in range(1000))
            if zlib.crc32(indexer.index("order", o.order_id).encode()) % 2 == 0
            and any(
                zlib.crc32(f"{name}:{value}".encode()) % 2 == 1
                for name, value in observe(o, indexer, clock.now()).keys.items()
            )
        )
        up.submit([(order, clock.now())], QUERIES)
        time.sleep(0.5)  # ~100 tries' worth of failures with the old check
        assert up.queued() == 1
    finally:
        up.close()
        store.close()
        with redis.Redis(port=6379) as client:
            delete_prefix(client, prefix)


def test_a_redis_that_refuses_writes_gives_no_order_up_and_counts_it_once_it_takes_them(
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    quick_retries: None,
    tmp_path: Path,
) -> None:
    """Review: a Redis that answers reads but refuses every write (a replica, as in a
    failover not finished yet; also out of memory, failing snapshots) was taken for the
    order's trouble: with no requests (the breaker closed) a queued order was given up
    after 20 tries (24 s for one order) and stayed uncounted once Redis took writes."""
    for name in ("master", "replica"):  # a replica's sync writes snapshots there
        (tmp_path / name).mkdir()
    master = OwnRedis(tmp_path / "master")
    master.start()
    replica = OwnRedis(tmp_path / "replica", replica_of=master.port)
    replica.start()
    store = RedisFeatureStore(replica.url, clock, prefix="riskd-test:catchup:", timeout_s=0.2)
    up = CatchUp(store, indexer, breaker, clock)
    admin = redis.Redis(port=replica.port)
    try:
        up.submit([(make_order("o-1"), clock.now())], QUERIES)
        deadline = time.monotonic() + 10
        # each try a refused record and a read answered: 30 tries, past MAX_TRIES
        while _script_calls(admin) < 3 * catchup.MAX_TRIES and time.monotonic() < deadline:
            assert up.dropped()[catchup.FAILING] == 0, "given up while Redis refused writes"
            time.sleep(0.01)
        assert up.queued() == 1 and sum(up.dropped().values()) == 0
        admin.execute_command("REPLICAOF", "NO", "ONE")  # the failover is over
        assert up.wait(5)
        probe = observe(make_order("probe"), indexer, clock.now())
        assert store.read(probe, [BUYER_1H]) == {BUYER_1H: 1}
    finally:
        up.close()
        store.close()
        admin.close()
        replica.kill()
        master.kill()


def _script_calls(admin: redis.Redis) -> int:
    """EVALSHA calls the redis-server has run (refused ones included)."""
    stats = admin.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) + int(stats.get("rejected_calls", 0))


def test_a_restored_order_and_its_retry_are_one_entry(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, db: Database
) -> None:
    """Review: restored orders were queued by their blind-indexed id and retries by their
    plain id, so a retry of a restored order sat in the queue twice (the backlog metric
    and the limit counted it twice; recorded once)."""
    kept_while_away(CatchUp(store, indexer, breaker, clock, keep=db), breaker, clock, "a")
    again = CatchUp(store, indexer, breaker, clock, keep=db)
    again.restore(QUERIES)
    again.submit([(make_order("a"), clock.now())], QUERIES)  # its retry, replayed degraded
    assert again.queued() == 1
    breaker.success()
    assert again.wait(5) and counted(store, indexer, clock) == 1
    again.close()


def test_the_order_whose_call_outlasts_closes_wait_is_kept(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: the order whose store call was still out when close stopped waiting for it
    was neither recorded nor kept."""
    monkeypatch.setattr(catchup, "CLOSE_WAIT_S", 0.2)
    create_schema(db)
    up = CatchUp(store, indexer, breaker, clock, keep=db)
    store.stalled.add("slow")
    up.submit([(make_order("slow"), clock.now())], QUERIES)
    assert store.entered.wait(5)
    try:
        up.close()
        assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(1,)]
    finally:
        store.release.set()


class _Ping:
    """A store's ping for ``CatchUp.await_store``: False until ``answers`` is set; each
    ask recorded in ``asked`` (whether it was answered)."""

    def __init__(self) -> None:
        self.answers = threading.Event()
        self.asked: list[bool] = []

    def __call__(self) -> bool:
        self.asked.append(self.answers.is_set())
        return self.answers.is_set()


def test_an_outage_told_at_start_is_ended_by_asking_the_store_with_nothing_queued(
    up: CatchUp, breaker: CircuitBreaker, clock: FakeClock, quick_retries: None
) -> None:
    """With no order to count and no request, the catch-up asks the store itself until it
    answers; it takes the breaker's probe once the circuit has opened meanwhile."""
    ping = _Ping()
    answers, asked = ping.answers, ping.asked
    breaker.down()
    up.await_store(ping)
    assert eventually(lambda: len(asked) >= 3)
    assert breaker.outage and not breaker.is_open and up.queued() == 0
    breaker.failure(UnavailableError("down"))  # a request's call opened the circuit
    answers.set()
    time.sleep(0.05)
    assert breaker.is_open  # its cooldown not over: the probe is not free, nothing asked
    clock.advance(1.0)
    assert eventually(lambda: not breaker.is_open)  # its probe answered
    assert breaker.outage  # told over once the circuit stayed closed a whole window
    clock.advance(BreakerPolicy().window_s)
    assert eventually(lambda: not breaker.outage)
    n = len(asked)
    time.sleep(0.05)
    assert len(asked) == n  # nothing asked once the outage is over


def test_an_outage_told_at_start_ends_when_the_store_answers_with_its_circuit_closed(
    up: CatchUp, breaker: CircuitBreaker, clock: FakeClock, quick_retries: None
) -> None:
    """A replica with no traffic: the store's answer to the catch-up's ping alone ends the
    outage in the log and the metric, and the asking stops."""
    asked: list[int] = []

    def ping() -> bool:
        asked.append(1)
        return len(asked) > 2  # back at the third ask

    breaker.down()
    up.await_store(ping)
    assert eventually(lambda: not breaker.outage) and not breaker.is_open
    time.sleep(0.05)
    assert len(asked) == 3


def test_a_catch_up_probe_the_store_did_not_answer_gives_the_next_probe_its_turn(
    up: CatchUp, breaker: CircuitBreaker, clock: FakeClock, quick_retries: None
) -> None:
    """Its failed probe is told to the breaker: a probe never given back would refuse every
    call for good, and the daemon would never recover without a restart."""
    ping = _Ping()
    answers, asked = ping.answers, ping.asked
    breaker.down()
    breaker.failure(UnavailableError("down"))  # open
    up.await_store(ping)
    clock.advance(1.0)
    assert eventually(lambda: len(asked) >= 1)  # the probe: not answered
    answers.set()

    def closed() -> bool:
        clock.advance(1.0)  # each cooldown over: a probe is free again
        return not breaker.is_open

    assert eventually(closed) and breaker.allow()


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def catch_up_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, object]]]:
    return [
        (r.levelname, r.getMessage(), getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == "riskd.engine.catchup"
    ]


def test_an_order_whose_id_cannot_be_indexed_is_counted_dropped_and_told(
    up: CatchUp,
    store: Store,
    indexer: BlindIndexer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: ``submit`` skipped an order whose id the indexer raised on (a bug) with no
    log line and no metric, its comment saying ``_observe`` logged it: it never reached
    ``_observe``. Now it is counted (``error``) and told once, by the exception's type."""
    caplog.set_level(logging.INFO, logger="riskd.engine.catchup")
    index = BlindIndexer.index

    def buggy(self: BlindIndexer, field_type: str, value: str) -> str:
        if value == "x-13987654321":
            raise ValueError(f"cannot index {value}")  # the text quotes the order
        return index(self, field_type, value)

    monkeypatch.setattr(BlindIndexer, "index", buggy)  # slots: the class's method
    up.submit([(make_order(o), clock.now()) for o in ("x-13987654321", "a")], QUERIES)
    assert up.wait(5)
    assert counted(store, indexer, clock) == 1  # "a": the others are not held back
    assert up.dropped().get(catchup.ERROR) == 1
    [(level, message, fields)] = catch_up_lines(caplog)
    assert level == "WARNING" and "dropped uncounted" in message
    assert fields == {"error_type": "ValueError"}
    assert PHONE not in caplog.text and "x-1" not in caplog.text


def test_an_order_whose_call_raises_a_bug_is_counted_dropped_and_told(
    up: CatchUp,
    store: Store,
    indexer: BlindIndexer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: an unexpected exception recording an order (a bug in the store) dropped it
    uncounted with a warning only; ``riskd_features_catch_up_dropped_total`` stayed 0."""
    record_and_read = store.record_and_read

    def buggy(obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        if store._is(obs, "bad"):
            raise KeyError(PHONE)  # the text quotes the order
        return record_and_read(obs, queries)

    monkeypatch.setattr(store, "record_and_read", buggy)
    up.submit([(make_order(o), clock.now()) for o in ("bad", "a", "b")], QUERIES)
    assert up.wait(5)
    assert counted(store, indexer, clock) == 2
    assert up.dropped().get(catchup.ERROR) == 1 and up.dropped()[catchup.FAILING] == 0
    [(level, message, fields)] = catch_up_lines(caplog)
    assert level == "WARNING" and "dropped uncounted" in message
    assert fields == {"error_type": "KeyError"} and PHONE not in caplog.text


def test_orders_left_at_close_with_no_database_to_keep_them_are_counted_lost(
    up: CatchUp, breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: a close with no ``keep`` database dropped its queue with neither a log line
    nor a metric (2 orders answered during an outage, never counted, never told)."""
    breaker.failure(UnavailableError("down"))  # the store is away: nothing drains
    up.submit([(make_order(o), clock.now()) for o in "ab"], QUERIES)
    assert holding_ends(up, 5)
    up.close()
    assert up.dropped().get(catchup.LOST_AT_CLOSE) == 2
    [(level, message, fields)] = catch_up_lines(caplog)
    assert level == "WARNING" and "not kept" in message and fields == {"orders": 2}


def test_orders_not_yet_observed_at_a_close_with_nowhere_to_keep_them_are_counted_lost(
    up: CatchUp, store: Store, clock: FakeClock
) -> None:
    """Orders queued while the thread is held in a store call are lost at close like the
    others: the metric counts them (no order leaves the queue uncounted and untold)."""
    store.stalled.add("slow")
    up.submit([(make_order("slow"), clock.now())], QUERIES)
    assert store.entered.wait(5)
    up.submit([(make_order(o), clock.now()) for o in "ab"], QUERIES)
    assert up.holding() == 2
    threading.Timer(0.2, store.release.set).start()
    up.close()
    assert up.dropped()[catchup.LOST_AT_CLOSE] == 2  # "slow" was recorded


def test_orders_a_close_could_not_keep_are_counted_lost(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real SQLite file without the evidence schema: keeping the queue fails. Review:
    logged, never counted in ``riskd_features_catch_up_dropped_total``."""
    up = CatchUp(store, indexer, breaker, clock, keep=db)
    breaker.failure(UnavailableError("down"))
    up.submit([(make_order(o), clock.now()) for o in "abc"], QUERIES)
    assert holding_ends(up, 5)
    up.close()
    assert up.dropped().get(catchup.LOST_AT_CLOSE) == 3
    [(level, message, fields)] = catch_up_lines(caplog)
    assert level == "WARNING" and "not kept" in message
    assert fields["orders"] == 3 and "error_type" in fields


def test_the_order_in_hand_is_kept_when_its_call_raises_as_close_comes(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: a call in hand at close that raised something other than the store's
    errors (the store torn down under it) was taken as done: the order was neither kept
    nor counted anywhere."""
    create_schema(db)
    up = CatchUp(store, indexer, breaker, clock, keep=db)
    entered, release = threading.Event(), threading.Event()

    def torn_down(obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        entered.set()
        release.wait(5)
        raise RuntimeError("store closed")

    monkeypatch.setattr(store, "record_and_read", torn_down)
    up.submit([(make_order("a"), clock.now())], QUERIES)
    assert entered.wait(5)
    threading.Timer(0.1, release.set).start()
    up.close()
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(1,)]
    assert sum(up.dropped().values()) == 0


@pytest.fixture
def locked(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[sqlite3.Connection]:
    """The log's database (its evidence schema made) held by another connection under an
    exclusive lock until the test rolls it back; keeping waits 0.2 s for it, not 10."""
    monkeypatch.setattr(catchup, "KEEP_WAIT_S", 0.2)
    create_schema(db)
    holder = sqlite3.connect(tmp_path / "evidence.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    yield holder
    if holder.in_transaction:
        holder.execute("ROLLBACK")
    holder.close()


def left_at_close(
    up: CatchUp,
    breaker: CircuitBreaker,
    clock: FakeClock,
    ids: str,
    keep_failed: Exception | None = None,
) -> None:
    """Orders ``ids`` (one letter each) answered while the store was away, then ``up``
    closed (``kept_while_away`` with no schema made)."""
    breaker.failure(UnavailableError("down"))
    up.submit([(make_order(o), clock.now()) for o in ids], QUERIES)
    assert holding_ends(up, 5)
    up.close(keep_failed=keep_failed)


def spilled(folder: Path) -> list[Path]:
    return spillfile.files(folder, catchup.PREFIX)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def any_store(request: pytest.FixtureRequest, store: Store, clock: FakeClock) -> Iterator[Any]:
    """The in-process store, or the shared Redis under a key prefix of its own."""
    if request.param == "memory":
        yield store
        return
    prefix = f"riskd-test:catchup-spill:{uuid.uuid4().hex}:"
    made = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=1.0)
    yield made
    made.close()
    with redis.Redis(port=6379) as client:
        delete_prefix(client, prefix)


def test_a_close_on_a_locked_database_spills_and_the_next_start_counts_it(
    any_store: Any,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    tmp_path: Path,
    locked: sqlite3.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: a stop on a database held locked past ``KEEP_WAIT_S`` (a CLI's
    transaction, a backup) dropped the queue, counted ``lost_at_close``. Now it goes to
    a spill file under the data folder (observations only, owner-only), which the next
    start queues, counts and deletes."""
    caplog.set_level(logging.INFO, logger="riskd.engine.catchup")
    first = CatchUp(any_store, indexer, breaker, clock, keep=db, spill_dir=tmp_path)
    left_at_close(first, breaker, clock, "ab")
    assert sum(first.dropped().values()) == 0
    (path,) = spilled(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text("utf-8") + caplog.text + repr(catch_up_lines(caplog))
    assert all(v not in text for v in (PHONE, DEVICE, IP, STREET, "b-1", '"a"', "s-1"))
    [(level, message, fields)] = catch_up_lines(caplog)
    assert level == "WARNING" and "spilled for the next start" in message
    assert fields == {"orders": 2, "file": path.name, "error_type": "DatabaseBusyError"}
    locked.execute("ROLLBACK")
    breaker.success()
    again = CatchUp(any_store, indexer, breaker, clock, keep=db, spill_dir=tmp_path)
    again.restore(QUERIES)
    assert spilled(tmp_path) == []
    assert again.wait(5)
    assert counted(any_store, indexer, clock) == 2
    again.close()


def test_a_close_after_the_log_failed_on_the_database_spills_without_waiting_for_it(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    tmp_path: Path,
    locked: sqlite3.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review (a real stop, one process, Redis away, the SQLite file held locked): the
    decision log's flush timed out on the database after 30 s, then the catch-up waited
    ``KEEP_WAIT_S`` (10 s) more for the same lock before its spill file: 44 s to exit.
    Told how the database failed the log, it writes the file at once."""
    monkeypatch.setattr(catchup, "KEEP_WAIT_S", 5.0)  # the lock is held past any wait
    caplog.set_level(logging.INFO, logger="riskd.engine.catchup")
    up = CatchUp(store, indexer, breaker, clock, keep=db, spill_dir=tmp_path)
    started = time.monotonic()
    left_at_close(up, breaker, clock, "ab", UnavailableError("decision log flush timed out"))
    assert time.monotonic() - started < 4.0  # no wait for the lock (5 s)
    (path,) = spilled(tmp_path)
    assert sum(up.dropped().values()) == 0
    [(level, message, fields)] = catch_up_lines(caplog)
    assert level == "WARNING" and "spilled for the next start" in message
    assert fields == {"orders": 2, "file": path.name, "error_type": "UnavailableError"}


def test_a_close_after_the_log_failed_whose_spill_fails_keeps_in_the_database(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    tmp_path: Path,
) -> None:
    """Review: told that the decision log's flush failed (its timeout: the database, or
    a writer restarting on a bug, or one too slow), a close whose spill file could not
    be written (a full disk, a folder gone) counted the orders ``lost_at_close`` without
    trying the database, which kept them before and may answer still."""
    create_schema(db)
    up = CatchUp(store, indexer, breaker, clock, keep=db, spill_dir=tmp_path / "gone")
    left_at_close(up, breaker, clock, "ab", UnavailableError("decision log flush timed out"))
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(2,)]
    assert sum(up.dropped().values()) == 0


def test_an_order_kept_both_in_the_database_and_a_spill_file_is_counted_once(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    tmp_path: Path,
) -> None:
    """A database that hung at the stop may commit the rows after all, beside the file
    written meanwhile; and a file queued by one start may be queued by another (a crash
    before its delete, or two processes at once). Each order is one entry and counted
    once."""
    kept_while_away(CatchUp(store, indexer, breaker, clock, keep=db), breaker, clock, "ab")
    rows = db.query("SELECT order_key, decided_at, amount, keys, content FROM features_catch_up")
    # the file the hung database's close wrote (``_spill``: a line is a kept row)
    path = spillfile.write(tmp_path, catchup.PREFIX, {"orders": [list(r) for r in rows]})
    copy = path.read_bytes()
    again = CatchUp(store, indexer, breaker, clock, keep=db, spill_dir=tmp_path)
    again.restore(QUERIES)  # the breaker is still open: nothing recorded yet
    assert again.queued() == 2 and spilled(tmp_path) == []
    breaker.success()
    assert again.wait(5) and counted(store, indexer, clock) == 2
    path.write_bytes(copy)
    later = CatchUp(store, indexer, breaker, clock, keep=db, spill_dir=tmp_path)
    later.restore(QUERIES)
    assert later.wait(5) and counted(store, indexer, clock) == 2
    again.close()
    later.close()


def test_a_spill_file_that_cannot_be_read_is_left_and_logged_by_name(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file cut short (a copy, a disk that failed) is not half queued: it stays for an
    operator (or a later start), named in a warning; the files beside it are taken."""
    left_at_close(CatchUp(store, indexer, breaker, clock, spill_dir=tmp_path), breaker, clock, "a")
    (whole,) = spilled(tmp_path)
    garbled = tmp_path / f"{catchup.PREFIX}{0:020d}-1.jsonl"
    garbled.write_bytes(whole.read_bytes()[:-10])
    caplog.clear()
    breaker.success()
    again = CatchUp(store, indexer, breaker, clock, spill_dir=tmp_path)
    again.restore(QUERIES)
    assert spilled(tmp_path) == [garbled]
    assert again.wait(5) and counted(store, indexer, clock) == 1
    unread = [f for level, m, f in catch_up_lines(caplog) if "not read" in m and level == "WARNING"]
    assert unread == [{"file": garbled.name, "error_type": "SpillFileError"}]
    again.close()


def test_a_start_removes_a_part_file_left_by_a_process_killed_while_spilling(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, tmp_path: Path
) -> None:
    """Its pid is this process's (a container's daemon after a restart), and this process
    writes no spill now: nobody can finish it. The whole file beside it is taken."""
    left_at_close(CatchUp(store, indexer, breaker, clock, spill_dir=tmp_path), breaker, clock, "a")
    part = tmp_path / f".{catchup.PREFIX}{0:020d}-{os.getpid()}.jsonl.part"
    part.write_text('{"riskd_spill": 1, "orders": 9}\n', "utf-8")
    breaker.success()
    again = CatchUp(store, indexer, breaker, clock, spill_dir=tmp_path)
    again.restore(QUERIES)
    assert list(tmp_path.iterdir()) == []
    assert again.wait(5) and counted(store, indexer, clock) == 1
    again.close()


@pytest.mark.parametrize("folder", [None, "gone"])
def test_orders_neither_kept_nor_spilled_at_close_are_counted_lost(
    folder: str | None,
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    db: Database,
    tmp_path: Path,
    locked: sqlite3.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no data folder (or one the file cannot be written to), a close on a locked
    database counts what it could not keep ``lost_at_close``, as before spill files."""
    spill_dir = None if folder is None else tmp_path / folder
    up = CatchUp(store, indexer, breaker, clock, keep=db, spill_dir=spill_dir)
    left_at_close(up, breaker, clock, "abc")
    assert up.dropped()[catchup.LOST_AT_CLOSE] == 3
    assert spilled(tmp_path) == [] and not (tmp_path / "gone").exists()
    (level, message, fields) = catch_up_lines(caplog)[-1]
    assert level == "WARNING" and "not kept" in message and fields["orders"] == 3


def test_processes_starting_together_each_take_their_own_spill_files(
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: scoring workers start together, and each one read every file: with more
    orders spilled than one queue holds, each queued the same orders (one queue's worth
    in all, however many processes) and wrote its own copy of the rest, so the files
    grew with each start. Now a file goes to one process, as a kept row does: each
    order is queued by one process or left in one file."""
    breaker.failure(UnavailableError("down"))  # nothing drains: the queues stay as taken
    for f in "xyz":  # three stops' files, 3 orders each
        rows = [
            (o.order_id, o.at, o.amount, json.dumps(dict(o.keys), sort_keys=True), o.content)
            for o in (observe(make_order(f"{f}{i}"), indexer, clock.now()) for i in range(3))
        ]
        spillfile.write(tmp_path, catchup.PREFIX, {"orders": rows})
    ups = [
        CatchUp(Store(clock, indexer), indexer, breaker, clock, max_queued=4, spill_dir=tmp_path)
        for _ in range(3)
    ]
    meet = threading.Barrier(len(ups))
    read = spillfile.read

    def together(path: Path, sections: Collection[str]) -> dict[str, list[Any]]:
        with contextlib.suppress(threading.BrokenBarrierError):  # the others read no file
            meet.wait(0.5)
        return read(path, tuple(sections))

    monkeypatch.setattr(catchup.spillfile, "read", together)
    starts = [threading.Thread(target=up.restore, args=(QUERIES,)) for up in ups]
    for t in starts:
        t.start()
    for t in starts:
        t.join(10)
    monkeypatch.undo()
    queued = [obs.order_id for up in ups for obs, *_ in up._items]
    on_disk = [
        row[0] for path in spilled(tmp_path) for row in spillfile.read(path, ("orders",))["orders"]
    ]
    assert len(queued + on_disk) == len(set(queued + on_disk)) == 9  # each order once
    assert len(queued) >= 4  # at least one queue filled
    for up in ups:
        up._spill_dir = None  # the test's folder is not kept to
        up.close()


def test_an_order_counted_ends_an_outage_told_at_start(
    up: CatchUp, store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """The store did not answer at start (``down``), its circuit never opened and no request
    came: the catch-up's call that answers ends the outage, as a request's would."""
    breaker.down()
    up.submit([(make_order("a"), clock.now())], QUERIES)
    assert up.wait(5) and counted(store, indexer, clock) == 1
    assert not breaker.outage and not breaker.is_open


def test_a_probe_whose_call_raises_a_bug_is_given_back(
    up: CatchUp,
    store: Store,
    breaker: CircuitBreaker,
    clock: FakeClock,
    quick_retries: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catch-up took the half-open probe and the store raised something unexpected (a
    bug: the order is counted ``error``): the probe is given back for the next caller, or
    the circuit would stay open for good and every request be answered degraded."""
    record_and_read = store.record_and_read

    def buggy(obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        if store._is(obs, "bad"):
            raise KeyError("a bug")
        return record_and_read(obs, queries)

    monkeypatch.setattr(store, "record_and_read", buggy)
    breaker.failure(UnavailableError("down"))
    up.submit([(make_order("bad"), clock.now())], QUERIES)
    assert holding_ends(up, 5)
    clock.advance(1.0)  # the cooldown is over: the catch-up's call is the probe
    assert up.wait(5) and up.dropped()[catchup.ERROR] == 1
    assert breaker.allow()  # the probe is free for the next caller
    breaker.success()
    assert not breaker.is_open


def test_an_order_kept_by_two_closes_is_kept_once_and_nothing_is_lost(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, db: Database
) -> None:
    """Two replicas on one database both queued an order (its retry reached the other):
    the second close keeps the rest of its queue beside the row kept first."""
    kept_while_away(CatchUp(store, indexer, breaker, clock, keep=db), breaker, clock, "a")
    second = CatchUp(store, indexer, breaker, clock, keep=db)
    second.submit([(make_order(o), clock.now()) for o in "ab"], QUERIES)
    assert holding_ends(second, 5)
    second.close()
    assert sum(second.dropped().values()) == 0
    assert db.query("SELECT COUNT(*) FROM features_catch_up") == [(2,)]


def test_a_spill_file_larger_than_the_queue_leaves_the_rest_in_a_new_file(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, tmp_path: Path
) -> None:
    """A start queues what its queue has room for and writes the rest to a new file, which
    a later start takes: no order of the file is lost."""
    left_at_close(
        CatchUp(store, indexer, breaker, clock, spill_dir=tmp_path), breaker, clock, "abcde"
    )
    again = CatchUp(store, indexer, breaker, clock, max_queued=3, spill_dir=tmp_path)
    again.restore(QUERIES)  # the breaker is still open: nothing recorded yet
    assert again.queued() == 3
    (rest,) = spilled(tmp_path)
    assert len(spillfile.read(rest, ("orders",))["orders"]) == 2
    breaker.success()
    assert again.wait(5)
    later = CatchUp(store, indexer, breaker, clock, spill_dir=tmp_path)
    later.restore(QUERIES)
    assert later.wait(5) and counted(store, indexer, clock) == 5
    assert spilled(tmp_path) == []
    again.close()
    later.close()


def test_a_start_with_room_for_fewer_than_were_kept_takes_the_newest(
    store: Store, indexer: BlindIndexer, breaker: CircuitBreaker, clock: FakeClock, db: Database
) -> None:
    """The newest kept orders count in more windows (the 1-minute and 1-hour ones too)."""
    create_schema(db)
    first = CatchUp(store, indexer, breaker, clock, keep=db)
    breaker.failure(UnavailableError("down"))
    first.submit([(make_order("a"), clock.now() - 7200), (make_order("b"), clock.now())], QUERIES)
    assert holding_ends(first, 5)
    first.close()
    again = CatchUp(store, indexer, breaker, clock, keep=db, max_queued=1)
    again.restore(QUERIES)
    assert db.query("SELECT order_key FROM features_catch_up") == [(indexer.index("order", "a"),)]
    again.close()


@pytest.mark.postgres
def test_a_start_on_a_postgresql_table_held_locked_waits_only_keep_wait_s(
    store: Store,
    indexer: BlindIndexer,
    breaker: CircuitBreaker,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review (SQLite): a lock held elsewhere held a start. On PostgreSQL too the kept rows'
    statements wait at most ``KEEP_WAIT_S`` (``statement_timeout``); the rows stay kept."""
    import psycopg

    monkeypatch.setattr(catchup, "KEEP_WAIT_S", 0.3)
    schema = f"catchup_{uuid.uuid4().hex[:12]}"
    pg = Database(f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}")
    create_schema(pg)
    holder = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test")
    up = CatchUp(store, indexer, breaker, clock, keep=pg)
    done = threading.Event()

    def start() -> None:
        up.restore(QUERIES)
        done.set()

    try:
        holder.execute(f'LOCK TABLE "{schema}".features_catch_up IN ACCESS EXCLUSIVE MODE')
        threading.Thread(target=start, daemon=True).start()
        assert done.wait(5)  # not for as long as the lock is held
    finally:
        holder.rollback()
        holder.close()
        done.wait(5)
        up.close()
        pg.drop_schema()
        pg.close()
