"""The caller's deadline: a tight one is not the store's failure; a batch answers inside it.

A caller whose budget is shorter than the feature store's own bound (the Redis socket
timeout) waits on a pool thread and may stop waiting before the store answers: that is
its own time running out, not a failure of the store, so it must not open the breaker
every other caller goes through (review: three such callers gave everyone degraded
answers from a healthy Redis). The call it leaves behind tells the breaker what the
store really did. And a batch whose rules take longer than its deadline allows answers
in time: the orders it had no time to decide get the fallback, recorded as any other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import pytest

from riskd.domain.clock import Clock, FakeClock, SystemClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.features import FeatureQuery
from riskd.engine.breaker import BreakerPolicy
from riskd.errors import DeadlineExceededError, UnavailableError
from riskd.features.memory import InProcessFeatureStore
from riskd.features.store import Observation
from riskd.pii import BlindIndexer
from riskd.service.metrics import Metrics

from .conftest import Rig, make_order
from .test_scorer import count_buyer_orders

BOUND_S = 0.05  # the store's own bound of one call (its socket timeout)


class SlowStore:
    """An in-process store behind a network: each call takes ``delay_s``, then answers
    (or raises ``UnavailableError`` when ``failing``); it declares no inline shortcut."""

    def __init__(self, clock: Clock, delay_s: float) -> None:
        self.inner = InProcessFeatureStore(clock)
        self.delay_s = delay_s
        self.failing = False
        self.calls = 0

    def take_time(self) -> None:
        time.sleep(self.delay_s)

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        self.calls += 1
        self.take_time()
        if self.failing:
            raise UnavailableError("feature store: redis TimeoutError")
        return self.inner.record_and_read(obs, queries)

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        return self.inner.read(obs, queries)

    def close(self) -> None:
        self.inner.close()


def slow_rig(
    make_rig: Callable[..., Rig], store: SlowStore, open_s: float = 1.0, **kwargs: Any
) -> Rig:
    return make_rig(
        store,
        scorer_clock=SystemClock(),
        feature_timeout_s=BOUND_S,
        breaker=BreakerPolicy(failures=2, open_s=open_s),
        **kwargs,
    )


def settle(s: float = 0.1) -> None:
    """Let the calls left behind by callers that stopped waiting return."""
    time.sleep(s)


def test_callers_out_of_their_own_time_do_not_open_the_breaker(
    make_rig: Callable[..., Rig],
) -> None:
    store = SlowStore(SystemClock(), delay_s=0.02)  # healthy, well inside its bound
    rig = slow_rig(make_rig, store)
    for i in range(5):  # each waits 10 ms at most (on a pool thread: under the bound)
        tight = rig.scorer.score(make_order(f"tight-{i}"), timeout_s=0.01)
        assert tight.degraded == ("features",)  # no time for the store: its own answer
    settle()
    assert not rig.scorer.breaker.is_open
    patient = rig.scorer.score(make_order("patient"), timeout_s=1.0)
    assert patient.degraded == ()


def test_tight_callers_still_open_the_breaker_of_a_failing_store(
    make_rig: Callable[..., Rig],
) -> None:
    """The calls they left behind fail, and say so: the store is down for everyone."""
    store = SlowStore(SystemClock(), delay_s=0.02)
    store.failing = True
    rig = slow_rig(make_rig, store, open_s=5.0)
    for i in range(2):
        rig.scorer.score(make_order(f"tight-{i}"), timeout_s=0.01)
    settle()
    assert rig.scorer.breaker.is_open
    asked = store.calls
    patient = rig.scorer.score(make_order("patient"), timeout_s=1.0)
    assert patient.degraded == ("features",)
    assert store.calls == asked  # skipped: the breaker is open (a time bound flaked)


def test_a_tight_caller_holding_the_probe_lets_the_store_close_the_breaker(
    make_rig: Callable[..., Rig],
) -> None:
    """Half-open, the probe goes to a caller that stops waiting first: the store's answer
    to that probe closes the breaker, where the caller's timeout used to re-open it."""
    store = SlowStore(SystemClock(), delay_s=0.02)
    store.failing = True
    rig = slow_rig(make_rig, store, open_s=0.05)
    for i in range(2):
        rig.scorer.score(make_order(f"down-{i}"), timeout_s=1.0)  # inline: fails in 20 ms
    assert rig.scorer.breaker.is_open
    store.failing = False  # the store is back
    settle()  # past the cooldown
    tight = rig.scorer.score(make_order("probe"), timeout_s=0.01)
    assert tight.degraded == ("features",)
    settle()
    assert not rig.scorer.breaker.is_open
    assert rig.scorer.score(make_order("after"), timeout_s=1.0).degraded == ()


def test_a_caller_that_never_reached_the_store_gives_the_probe_back(
    make_rig: Callable[..., Rig],
) -> None:
    """The probe's job never ran (the pool was busy until its caller gave up): no verdict,
    so the next caller probes; the breaker neither closes nor stays stuck half-open."""
    store = SlowStore(SystemClock(), delay_s=0.02)
    store.failing = True
    rig = slow_rig(make_rig, store, open_s=0.05, workers=1)
    for i in range(2):
        rig.scorer.score(make_order(f"down-{i}"), timeout_s=1.0)
    store.failing, store.delay_s = False, 0.0
    settle()
    busy = rig.scorer._pool.submit(time.sleep, 0.05)  # the only pool thread, taken
    assert rig.scorer.score(make_order("probe"), timeout_s=0.01).degraded == ("features",)
    busy.result()
    settle()
    assert rig.scorer.breaker.is_open  # nothing was learnt of the store
    assert rig.scorer.score(make_order("next"), timeout_s=1.0).degraded == ()
    assert not rig.scorer.breaker.is_open


class SteppingStore(SlowStore):
    """An in-process store behind a network whose every call takes ``step_s`` on a fake
    clock, inside the store's own bound: slow, never failing, and no wall time spent."""

    def __init__(self, clock: FakeClock, step_s: float) -> None:
        super().__init__(clock, step_s)
        self.clock = clock

    def take_time(self) -> None:
        self.clock.advance(self.delay_s)


def test_inline_feature_calls_of_a_batch_start_only_while_one_more_fits_the_deadline(
    make_rig: Callable[..., Rig], clock: FakeClock
) -> None:
    """Calls bounded by the store (``feature_timeout_s``) run inline, and a batch starts
    the next one only while a whole call still fits the feature budget: five calls of
    45 ms under a 200 ms deadline read four orders, and the fifth is answered by the
    fallback inside the deadline instead of a call that ends past it."""
    store = SteppingStore(clock, step_s=0.045)
    rig = make_rig(store, feature_timeout_s=BOUND_S)
    orders = [make_order(f"o-{i}", buyer_id=f"b-{i}") for i in range(5)]
    decisions = rig.scorer.score_batch(orders, timeout_s=0.2)
    assert [d.degraded for d in decisions] == [()] * 4 + [("features",)]
    assert max(d.elapsed_us for d in decisions) <= 200_000
    assert not rig.scorer._pool._threads  # inline: no worker thread was started


def test_a_batch_keeps_the_features_that_arrived_before_its_caller_stopped_waiting(
    make_rig: Callable[..., Rig],
) -> None:
    """A batch whose feature calls run on a worker thread (a budget under the store's
    bound) and outlast the budget: the orders whose features arrived in time are decided
    with them, only the rest get the fallback."""
    store = SlowStore(SystemClock(), delay_s=0.1)  # three calls: 0.3 s, budget ~0.24 s
    rig = make_rig(store, scorer_clock=SystemClock(), feature_timeout_s=1.0)
    orders = [make_order(f"o-{i}", buyer_id=f"b-{i}") for i in range(3)]
    decisions = rig.scorer.score_batch(orders, timeout_s=0.25)
    assert decisions[0].degraded == ()  # read 0.1 s into the call
    assert "features" in decisions[-1].degraded  # its read would end past the deadline


def test_a_batch_answers_orders_it_has_no_time_to_decide_by_the_fallback(
    make_rig: Callable[..., Rig],
    indexer: BlindIndexer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rules that take 10 ms an order, ten orders, a 50 ms deadline: the first orders are
    decided, the rest get the fallback by the deadline, degraded ``deadline``, recorded
    (features and all: the store counted them) and replayed to a retry."""
    rig = make_rig()
    decide = rig.scorer._decide

    def slow(order: Any, features: Any, ctx: Any, request: Any = None) -> Any:
        clock.advance(0.01)
        return decide(order, features, ctx, request)

    monkeypatch.setattr(rig.scorer, "_decide", slow)
    orders = [make_order(f"o-{i}", total=20_000 * (i + 1)) for i in range(10)]
    started = clock.monotonic()
    decisions = rig.scorer.score_batch(orders, timeout_s=0.05)
    assert clock.monotonic() - started <= 0.05
    late = [d for d in decisions if d.degraded]
    assert 0 < len(late) < 10 and decisions[-len(late) :] == late  # the last ones
    for order, d in zip(orders[-len(late) :], late, strict=True):
        assert d.degraded == ("deadline",)
        assert [r.rule_id for r in d.reasons] == ["@fallback"]
        assert d.outcome is (Outcome.ALLOW if order.amounts.total <= 50_000 else Outcome.REVIEW)
    rig.log.flush(10)
    record = rig.log.get(orders[-1].order_id)
    assert record is not None and record.decision == late[-1] and record.rules == ()
    assert record.features  # read and counted before time ran out
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 10
    monkeypatch.setattr(rig.scorer, "_decide", decide)
    retry = rig.scorer.score_batch(orders, timeout_s=0.05)
    assert all(d.replayed for d in retry)
    assert [d.degraded for d in retry] == [d.degraded for d in decisions]
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 10


def test_a_batch_after_a_slow_order_decides_no_order_that_would_end_past_its_deadline(
    make_rig: Callable[..., Rig], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next order is decided only if the time left covers the longer of the mean so
    far and the last order's time: after a fast order and a slow one (1 ms, then 30 ms:
    the mean, 15.5 ms, would fit the 50 ms), the third gets the fallback in time rather
    than 30 ms of rules that end past the deadline."""
    rig = make_rig()
    decide = rig.scorer._decide
    costs = [0.001, 0.03, 0.03, 0.03]

    def timed_decide(order: Any, features: Any, ctx: Any, request: Any = None) -> Any:
        clock.advance(costs.pop(0))
        return decide(order, features, ctx, request)

    monkeypatch.setattr(rig.scorer, "_decide", timed_decide)
    orders = [make_order(f"o-{i}", buyer_id=f"b-{i}") for i in range(4)]
    started = clock.monotonic()
    decisions = rig.scorer.score_batch(orders, timeout_s=0.05)
    assert clock.monotonic() - started <= 0.05
    assert [d.degraded for d in decisions] == [(), (), ("deadline",), ("deadline",)]


def test_a_batch_with_no_time_to_answer_is_refused_unless_a_fallback_is_asked_for(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    """Review: a deadline shorter than answering every order by the fallback took that
    long anyway (500 orders, 50 ms: 57-138 ms): the caller was gone, every order
    recorded. A caller's batch (``refuse_late``) is refused before anything is counted;
    the fallback with no time at all (scoring workers' gRPC process) is still answered."""
    rig = make_rig()
    orders = [make_order(f"o-{i}") for i in range(300)]
    tight = rig.scorer.answer_time_s(300) * 0.9
    with pytest.raises(DeadlineExceededError):
        rig.scorer.score_batch(orders, timeout_s=tight, refuse_late=True)
    rig.log.flush(10)
    assert rig.log.get_many([o.order_id for o in orders]) == {}
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 0
    assert rig.scorer.answer_time_s(1) == 0  # a single order is always decided
    # review: a budget a few us below zero (the request's conversion ate it) refused it
    assert len(rig.scorer.score_batch(orders[:1], timeout_s=-1e-6, refuse_late=True)) == 1
    # an id repeated is answered once: two copies of one order are a single order
    twice = [make_order("o-twice")] * 2
    assert len(rig.scorer.score_batch(twice, timeout_s=0.0, refuse_late=True)) == 2
    fallback = rig.scorer.score_batch(orders[1:], timeout_s=0.0)  # what workers ask for
    assert all("deadline" in d.degraded for d in fallback[1:])


def test_the_reserve_for_the_rules_takes_at_most_half_of_a_short_deadline(
    make_rig: Callable[..., Rig],
) -> None:
    """``eval_reserve_s`` is kept back from the feature calls for the rules and the log,
    but never more than half the budget: a caller whose deadline is shorter than the
    reserve still gets an answer with its features, not a needless fallback."""
    rig = make_rig(eval_reserve_s=0.02)
    decision = rig.scorer.score(make_order("o-1", total=60_000), timeout_s=0.015)
    assert decision.degraded == ()
    assert [r.rule_id for r in decision.reasons] == ["big_order"]
    batch = rig.scorer.score_batch([make_order("o-2"), make_order("o-3")], timeout_s=0.03)
    assert [d.degraded for d in batch] == [(), ()]
    assert not rig.scorer._pool._threads  # the in-process store is called inline


def test_a_single_order_is_decided_as_before(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """One order costs no clock read more, and is decided even when its features came
    back at the deadline (the service's reply margin covers one decision), as before."""
    rig = make_rig()
    read = rig.scorer._read_features

    def late_read(*args: Any) -> Any:
        got = read(*args)
        clock.advance(0.05)  # the store answered as the call's 50 ms ran out
        return got

    monkeypatch.setattr(rig.scorer, "_read_features", late_read)
    decision = rig.scorer.score(make_order("o-1", total=60_000), timeout_s=0.05)
    assert decision.degraded == ()
    assert [r.rule_id for r in decision.reasons] == ["big_order"]


def test_a_retry_that_outlives_its_wait_is_not_a_second_decision_in_the_metrics(
    make_rig: Callable[..., Rig],
) -> None:
    """The first call stalls in its feature read; a concurrent retry's time runs out
    first: it answers ``inflight`` (not recorded), and ``riskd_decisions_total`` counts
    the order once, by the first call's decision."""
    store = SlowStore(SystemClock(), delay_s=0.15)
    rig = slow_rig(make_rig, store)
    order = make_order("o-stall")
    out: list[Decision] = []
    first = threading.Thread(
        target=lambda: out.extend(rig.scorer.score_batch([order], timeout_s=2.0))
    )
    first.start()
    time.sleep(0.03)  # the first call leads the order's flight by now
    retry = rig.scorer.score(order, timeout_s=0.03)
    first.join(5)
    assert retry.degraded == ("inflight",) and retry.unlogged and not out[0].degraded
    metrics = Metrics()
    metrics.observe_decisions(out)
    metrics.observe_decisions([retry])
    assert metrics.value("riskd_decisions_total", {"outcome": "allow"}) == 1


class ThreadNamingStore(SlowStore):
    """A ``SlowStore`` that notes which thread made each call."""

    def __init__(self, clock: SystemClock, delay_s: float) -> None:
        super().__init__(clock, delay_s)
        self.threads: list[str] = []

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        self.threads.append(threading.current_thread().name)
        return super().record_and_read(obs, queries)


def test_a_call_left_behind_stops_at_the_order_in_hand(make_rig: Callable[..., Rig]) -> None:
    """A batch whose caller stopped waiting tells the call left behind to stop: it asks
    the slow store for no order after the one in hand (each would hold a feature thread
    for another socket timeout; the catch-up counts the rest on its own thread)."""
    store = ThreadNamingStore(SystemClock(), delay_s=BOUND_S)
    rig = slow_rig(make_rig, store)
    orders = [make_order(f"o-{i}") for i in range(5)]
    decisions = rig.scorer.score_batch(orders, timeout_s=0.03)
    assert all("features" in d.degraded for d in decisions)
    rig.scorer._pool.shutdown(wait=True)  # the call left behind has returned
    assert sum(name.startswith("riskd-features_") for name in store.threads) == 1
