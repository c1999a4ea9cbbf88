"""A retry must send the same order, but ``client_time`` is informational: a checkout that
rebuilds its request on retry (a new client time) gets the recorded decision back, and
the decision log keeps the first call's client time (review: it was refused with
``ALREADY_EXISTS``)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from riskd.domain.clock import FakeClock, SystemClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.order import Order
from riskd.engine.breaker import BreakerPolicy
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.keys import observe
from riskd.errors import AlreadyExistsError, UnavailableError
from riskd.evidence import request
from riskd.features import FeatureStore, InProcessFeatureStore, Observation, RedisFeatureStore
from riskd.pii import BlindIndexer
from riskd.sql import Database
from tests.features.features_support import delete_prefix

from .conftest import Rig, make_order
from .test_scorer import count_buyer_orders
from .test_scorer_deadlines import SlowStore, slow_rig


def test_a_retry_with_another_client_time_replays_the_recorded_decision(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    first_order = replace(make_order("o-1"), client_time=1_790_000_000.25)
    first = rig.scorer.score(first_order)
    rebuilt = replace(first_order, client_time=1_790_000_004.5)
    assert rig.scorer.score(rebuilt) == replace(first, replayed=True)  # from the queue
    rig.log.flush(10)
    assert rig.scorer.score(rebuilt) == replace(first, replayed=True)  # from SQL
    record = rig.log.get("o-1")
    assert record is not None and record.request["client_time"] == 1_790_000_000.25
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 1
    with pytest.raises(AlreadyExistsError):  # other content still refused
        rig.scorer.score(replace(rebuilt, shop_id="s-2"))
    assert rig.log.verify().ok


def test_a_batch_may_hold_one_order_twice_with_other_client_times(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    order = make_order("o-1")
    a, b = rig.scorer.score_batch([order, replace(order, client_time=order.client_time + 3)])
    assert b == replace(a, replayed=True)


def test_same_order_ignores_only_the_client_time() -> None:
    order, protect = make_order("o-1"), request.protect_order
    same = request.same_order  # the scorer's and the scoring workers' comparison
    assert same(protect(order), protect(replace(order, client_time=9.0)))
    assert not same(protect(order), protect(replace(order, coupon_code="X")))


@pytest.fixture(params=["memory", "redis"])
def shared_store(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[FeatureStore]:
    """One feature store two replicas share (the in-process one standing in for Redis)."""
    if request.param == "memory":
        yield InProcessFeatureStore(clock)
        return
    prefix = f"riskd-test:retry-content:{uuid.uuid4().hex}:"
    store = RedisFeatureStore("redis://127.0.0.1:6379/0", clock, prefix=prefix, timeout_s=2.0)
    yield store
    store.close()
    client = redis.Redis(port=6379)
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def b_db(tmp_path: Path) -> Iterator[Database]:
    """The second replica's database (its own: the first's decision is not in it yet);
    set up before ``make_rig``, so closed after that replica's scorer and log."""
    database = Database(tmp_path / "replica-b.db")
    yield database
    database.close()


def test_other_content_on_another_replica_before_the_first_is_logged_is_refused(
    b_db: Database,
    make_rig: Callable[..., Rig],
    shared_store: FeatureStore,
    indexer: BlindIndexer,
    clock: FakeClock,
) -> None:
    """Two replicas share the feature store; the second's log has not got the first's
    decision yet (its own database stands for the commit window): a retry with changed
    content there is refused by the store's content claim before anything is counted
    (review: it was decided again, its amount and shop counted)."""
    a = make_rig(shared_store)
    b = make_rig(shared_store, database=b_db)
    order = make_order("o-1", total=60_000)
    first = a.scorer.score(order)
    assert first.degraded == ()
    changed = make_order("o-1", total=90_000, shop_id="s-2")
    with pytest.raises(AlreadyExistsError, match=r"^order\.order_id: this order id was scored"):
        b.scorer.score(changed)
    assert b.log.queued(["o-1"]) == {}  # nothing recorded there
    shop = FeatureQuery(Agg.COUNT, "shop", "1h")
    probe = observe(make_order("probe", shop_id="s-2"), indexer, clock.now())
    assert shared_store.read(probe, [shop])[shop] == 0
    assert b.scorer.breaker.is_open is False
    # the same content there is decided again (the log keeps the first to commit) and
    # counted once; a batch with the changed order names it
    again = b.scorer.score(replace(order, client_time=order.client_time + 2))
    assert again.outcome == first.outcome and not again.replayed
    assert count_buyer_orders(a, indexer, clock, "b-1") == 1
    with pytest.raises(AlreadyExistsError, match=r"^orders\[1\]\.order_id: "):
        b.scorer.score_batch([make_order("o-2"), changed])
    assert b.log.queued(["o-1"]).keys() == {"o-1"}  # the same content's decision only


def test_a_batch_entry_the_store_refuses_is_named_by_its_index(
    b_db: Database,
    make_rig: Callable[..., Rig],
    shared_store: FeatureStore,
    indexer: BlindIndexer,
    clock: FakeClock,
) -> None:
    """When the shared store's content claim (not the log) refuses a batch's entry, the
    refusal names that entry, ``orders[2]``, and the entries before it were counted (the
    store took them first: README, "Running several processes")."""
    a = make_rig(shared_store)
    a.scorer.score(make_order("o-1", total=60_000))
    b = make_rig(shared_store, database=b_db)
    changed = make_order("o-1", total=90_000, shop_id="s-2")
    batch = [make_order("o-2", buyer_id="b-2"), make_order("o-3", buyer_id="b-2"), changed]
    with pytest.raises(AlreadyExistsError, match=r"^orders\[2\]\.order_id: this order id"):
        b.scorer.score_batch(batch)
    assert count_buyer_orders(b, indexer, clock, "b-2") == 2


class FlakyStore(InProcessFeatureStore):
    """The in-process store, whose calls fail while ``failing`` (Redis down)."""

    failing = False

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        if self.failing:
            raise UnavailableError("feature store: redis ConnectionError")
        return super().record_and_read(obs, queries)


def test_a_refusal_of_other_content_is_the_store_answering_the_breaker_s_probe(
    b_db: Database, make_rig: Callable[..., Rig], clock: FakeClock
) -> None:
    """The feature store back after an outage: the half-open breaker's one probe call is a
    retry with changed content, which the store refuses. That refusal is an answer, so
    the breaker closes and the next orders are scored with their features again (it must
    not stay half-open with the probe held, every later answer degraded)."""
    store = FlakyStore(clock)
    make_rig(store).scorer.score(make_order("o-1", total=60_000))  # replica A: claims o-1
    b = make_rig(store, database=b_db, breaker=BreakerPolicy(failures=2, open_s=1.0))
    store.failing = True
    for i in range(2):
        assert b.scorer.score(make_order(f"o-down-{i}")).degraded == ("features",)
    assert b.scorer.breaker.is_open
    store.failing = False
    clock.advance(1.0)  # the cooldown is over: the next call probes the store
    with pytest.raises(AlreadyExistsError):
        b.scorer.score(make_order("o-1", total=90_000, shop_id="s-2"))
    assert not b.scorer.breaker.is_open
    assert b.scorer.score(make_order("o-2")).degraded == ()


def test_refusals_a_tight_caller_left_behind_do_not_open_the_breaker(
    b_db: Database, make_rig: Callable[..., Rig]
) -> None:
    """Callers shorter than the store's bound stop waiting and answer degraded; the calls
    they leave behind are then refused for other content (another replica claimed those
    order ids). A refusal is the store answering, not failing: it must not open the
    breaker that every other caller of a healthy store goes through."""
    store = SlowStore(SystemClock(), delay_s=0.02)
    a = make_rig(store, scorer_clock=SystemClock())
    for oid in ("o-1", "o-2"):
        assert a.scorer.score(make_order(oid)).degraded == ()  # replica A claims them
    b = slow_rig(make_rig, store, database=b_db)  # opens after two failures in a row
    for oid in ("o-1", "o-2"):
        changed = make_order(oid, total=90_000, shop_id="s-2")
        assert b.scorer.score(changed, timeout_s=0.01).degraded == ("features",)
    b.scorer._pool.shutdown(wait=True)  # the calls left behind have been refused
    assert not b.scorer.breaker.is_open
    assert b.scorer.score(make_order("o-3"), timeout_s=1.0).degraded == ()


def _on_follow(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set once a call follows another call's flight of the same order id."""
    followed = threading.Event()
    join = rig.scorer._flights.join

    def joining(order_id: str) -> tuple[bool, Any]:
        leader, flight = join(order_id)
        if not leader:
            followed.set()
        return leader, flight

    monkeypatch.setattr(rig.scorer._flights, "join", joining)
    return followed


class HeldStore(InProcessFeatureStore):
    """The in-process store; the first call for ``hold`` (a blind-indexed order id) waits
    for ``release``."""

    def __init__(self, clock: FakeClock, hold: str) -> None:
        super().__init__(clock)
        self.hold = hold
        self.entered, self.release = threading.Event(), threading.Event()

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        if obs.order_id == self.hold and not self.entered.is_set():
            self.entered.set()
            self.release.wait(5)
        return super().record_and_read(obs, queries)


def test_a_batch_entry_waiting_on_a_refused_call_is_named_by_its_index(
    b_db: Database,
    make_rig: Callable[..., Rig],
    indexer: BlindIndexer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: a batch entry that waited for another call's refused order and then led it
    itself was refused naming ``order`` rather than its ``orders[i]``."""
    store = HeldStore(clock, hold="")
    make_rig(store).scorer.score(make_order("o-1", total=60_000))  # replica A: claims
    store.hold = indexer.index("order", "o-1")
    b = make_rig(store, database=b_db)
    changed = make_order("o-1", total=90_000, shop_id="s-2")
    errors: dict[str, BaseException] = {}
    followed = threading.Event()
    join = b.scorer._flights.join

    def joining(order_id: str) -> tuple[bool, Any]:
        leader, flight = join(order_id)
        if order_id == "o-1" and not leader:
            followed.set()
        return leader, flight

    monkeypatch.setattr(b.scorer._flights, "join", joining)

    def call(name: str, orders: list[Order]) -> None:
        try:
            b.scorer.score_batch(orders)
        except AlreadyExistsError as e:
            errors[name] = e

    leader = threading.Thread(target=call, args=("leader", [changed]))
    leader.start()
    assert store.entered.wait(5)
    follower = threading.Thread(target=call, args=("follower", [make_order("o-9"), changed]))
    follower.start()
    assert followed.wait(5)
    store.release.set()
    leader.join(5)
    follower.join(5)
    # a ScoreBatch of one names its entry too (review: ``order``, as a unary Score does)
    assert str(errors["leader"]).startswith("orders[0].order_id: ")
    assert str(errors["follower"]).startswith("orders[1].order_id: "), errors["follower"]


def test_other_content_sent_while_the_first_call_decides_is_refused(
    make_rig: Callable[..., Rig],
    indexer: BlindIndexer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A concurrent retry follows the first call's flight: with other content under the
    same id it is refused, not handed the first call's decision, and nothing of it is
    counted."""
    store = HeldStore(clock, hold=indexer.index("order", "o-1"))
    rig = make_rig(store)
    followed = _on_follow(rig, monkeypatch)
    first: list[Decision] = []
    errors: list[BaseException] = []

    def retry() -> None:
        try:
            rig.scorer.score(make_order("o-1", total=90_000, shop_id="s-2"))
        except AlreadyExistsError as e:
            errors.append(e)

    leader = threading.Thread(target=lambda: first.append(rig.scorer.score(make_order("o-1"))))
    leader.start()
    assert store.entered.wait(5)
    follower = threading.Thread(target=retry)
    follower.start()
    assert followed.wait(5)
    store.release.set()
    leader.join(5)
    follower.join(5)
    assert len(first) == 1 and not first[0].degraded
    assert len(errors) == 1 and str(errors[0]).startswith("order.order_id: ")
    shop = FeatureQuery(Agg.COUNT, "shop", "1h")
    probe = observe(make_order("probe", shop_id="s-2"), indexer, clock.now())
    assert store.read(probe, [shop])[shop] == 0


def test_a_retry_that_outlives_the_first_call_gets_the_configured_fallback(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    """While the first call still decides an order, a retry whose time runs out answers by
    the configured fallback for that order (here: review everything), with the reason
    naming the scenario and tier, marked ``inflight`` and not recorded: the first call's
    decision is the one the log keeps."""
    store = HeldStore(clock, hold=indexer.index("order", "o-1"))
    rig = make_rig(store, fallback=FallbackPolicy.from_text({"default": "review"}))
    first: list[Decision] = []
    leader = threading.Thread(target=lambda: first.append(rig.scorer.score(make_order("o-1"))))
    leader.start()
    assert store.entered.wait(5)
    retry = rig.scorer.score(make_order("o-1"), timeout_s=0.05)
    store.release.set()
    leader.join(5)
    assert retry.degraded == ("inflight",) and retry.unlogged and retry.outcome is Outcome.REVIEW
    assert [(r.rule_id, r.reason_code, r.explanation) for r in retry.reasons] == [
        ("@fallback", "DEGRADED_FALLBACK", ("fallback scenario default tier 0: REVIEW",))
    ]
    assert len(first) == 1 and first[0].outcome is Outcome.ALLOW and not first[0].degraded
    rig.log.flush(10)
    record = rig.log.get("o-1")
    assert record is not None and record.decision == first[0]


def test_other_content_following_a_replayed_order_is_refused(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry of a recorded order leads its flight and replays the decision; a call with
    other content under that id, following that flight meanwhile, is refused, not handed
    the recorded decision of another cart."""
    rig = make_rig()
    first = rig.scorer.score(make_order("o-1"))
    queued = rig.log.queued
    looking, release = threading.Event(), threading.Event()

    def held_queued(order_ids: Any) -> Any:
        if threading.current_thread().name == "replay":
            looking.set()
            release.wait(5)
        return queued(order_ids)

    monkeypatch.setattr(rig.log, "queued", held_queued)
    followed = _on_follow(rig, monkeypatch)
    replays: list[Decision] = []
    leader = threading.Thread(
        target=lambda: replays.append(rig.scorer.score(make_order("o-1"))), name="replay"
    )
    leader.start()
    assert looking.wait(5)
    errors: list[BaseException] = []

    def changed() -> None:
        try:
            rig.scorer.score(make_order("o-1", total=90_000, shop_id="s-2"), timeout_s=5.0)
        except AlreadyExistsError as e:
            errors.append(e)

    follower = threading.Thread(target=changed)
    follower.start()
    assert followed.wait(5)
    release.set()
    leader.join(5)
    follower.join(5)
    assert replays == [replace(first, replayed=True)]
    assert len(errors) == 1 and str(errors[0]).startswith("order.order_id: ")
