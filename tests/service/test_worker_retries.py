"""Worker mode's retries, unit level: ``PooledScoringServicer`` over a fake worker pool.

The worker can hold its answer back and then turn busy (as one that stalls right after
answering, its decision not committed yet); the gRPC process's scorer records what it
would decide itself. Real workers are exercised in ``test_workers.py``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from riskd.domain.clock import SystemClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.order import Order
from riskd.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidArgumentError,
    UnavailableError,
)
from riskd.service import answers, convert, router, workers
from riskd.service.gen.riskd.v1 import scoring_pb2
from riskd.service.metrics import Metrics
from tests.service.test_scoring import fresh


class FakeWorker:
    """Answers ``answer``; ``gate`` holds the answer back; ``busy`` refuses later calls."""

    def __init__(self) -> None:
        self.index = 0
        self.answer = b""
        self.unrecorded: tuple[str, ...] = ()  # order ids its log did not take
        self.holding = False
        self.takes_s = 0.0
        self.fail: Exception | None = None  # raised once, by the next answer
        self.gate = threading.Event()
        self.gate.set()
        self.sent = threading.Event()
        self.busy = False
        self.alive = True
        self.calls: list[bytes] = []

    def begin(self, method: str, payload: bytes, deadline: float, **_: object) -> int:
        if not self.alive:
            raise workers.WorkerGone
        if self.busy or self.holding:  # one call at a time, as a real worker
            raise workers.WorkerBusy
        self.holding = True
        self.calls.append(payload)
        self.sent.set()
        return len(self.calls)

    def finish(self, seq: int, deadline: float) -> tuple[bytes, frozenset[str]] | None:
        try:
            self.gate.wait(5)
            time.sleep(self.takes_s)
            if self.fail is not None:
                fail, self.fail = self.fail, None
                raise fail
            return self.answer, frozenset(self.unrecorded)
        finally:
            self.holding = False


class FakePool:
    def __init__(self) -> None:
        self.w = FakeWorker()

    def worker_for(self, order_id: str) -> int:
        return 0

    def get(self, index: int) -> FakeWorker:
        return self.w

    def others(self, index: int) -> list[FakeWorker]:
        return []


class HereScorer:
    """The gRPC process's own scorer: what it decides, a second decision of the order; it
    refuses the ids in ``refuse`` (ALREADY_EXISTS) and answers a batch's repeated id as a
    replay, as the real one does."""

    def __init__(self) -> None:
        self.scored: list[str] = []
        self.refuse: set[str] = set()
        self.batch_at: float | None = None  # the ``at`` of the last batch, of an inflight
        self.inflight_at: float | None = None
        self.budgets: list[float | None] = []  # each call's ``timeout_s``

    def score(self, order: Order, *, timeout_s: float | None = None) -> Decision:
        return self.score_batch((order,), timeout_s=timeout_s)[0]

    def score_batch(
        self,
        orders: Any,
        *,
        timeout_s: float | None = None,
        refuse_late: bool = False,
        at: float | None = None,
    ) -> list[Decision]:
        self.batch_at = at
        self.budgets.append(timeout_s)
        for i, o in enumerate(orders):  # its entry, as the real one names it
            if o.order_id in self.refuse:
                raise AlreadyExistsError(f"orders[{i}].order_id: scored for other content")
        out: dict[str, Decision] = {}
        for o in orders:
            if o.order_id not in out:
                self.scored.append(o.order_id)
                d = Decision(o.order_id, Outcome.REVIEW, 0.0, (), "v1", degraded=("features",))
                out[o.order_id] = d
        firsts = {o.order_id: i for i, o in reversed(list(enumerate(orders)))}
        return [
            out[o.order_id] if firsts[o.order_id] == i else _replayed(out[o.order_id])
            for i, o in enumerate(orders)
        ]

    answer_per_order_s = 0.0

    def refuse_if_late(self, orders: Any, timeout_s: float) -> None:
        if timeout_s < self.answer_time_s(len(orders)):
            raise DeadlineExceededError("no time to answer")

    def answer_time_s(self, orders: int) -> float:
        return orders * self.answer_per_order_s

    def report_outcome(self, event: object) -> None:
        raise AssertionError("not here")

    def inflight(self, order: Order, started: float, at: float | None = None) -> Decision:
        self.inflight_at = at
        return Decision(order.order_id, Outcome.REVIEW, 0.0, (), "v1", degraded=("inflight",))


def _replayed(d: Decision) -> Decision:
    return dataclasses.replace(d, replayed=True)


def _servicer() -> tuple[router.PooledScoringServicer, FakePool, HereScorer]:
    pool, here = FakePool(), HereScorer()
    servicer = router.PooledScoringServicer(
        pool,  # type: ignore[arg-type]
        here,
        None,
        Metrics(),
        SystemClock(),
        default_deadline_s=5.0,
        max_batch=100,
    )
    return servicer, pool, here


def _answer(order_id: str, degraded: tuple[str, ...] = ()) -> bytes:
    d = Decision(order_id, Outcome.ALLOW, 0.0, (), "v1", degraded=degraded, decided_at=1.0)
    return scoring_pb2.ScoreResponse(decision=convert.decision_to_proto(d)).SerializeToString()


def _request(order: Order) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(order=convert.order_to_proto(order))


def test_a_batchs_inflight_answer_carries_the_batchs_time() -> None:
    # review: the batch's entries were stamped with its one time, but an entry answered
    # ``inflight`` (its order still out with another call) took the clock at the deadline
    servicer, pool, here = _servicer()
    a, b = fresh(), fresh()
    pool.w.answer = _answer(a.order_id)
    pool.w.gate.clear()  # a's own call holds the worker
    first = threading.Thread(target=servicer.score_request, args=(_request(a), 2.0))
    first.start()
    try:
        assert pool.w.sent.wait(2)
        batch = scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in (a, b)])
        answers = servicer.score_batch_request(batch, 0.3).decisions
    finally:
        pool.w.gate.set()
        first.join(5)
    assert list(answers[0].unavailable) == ["inflight"]  # a: still out with its first call
    assert here.scored == [b.order_id]  # b: the worker busy, scored here at the batch's time
    assert here.batch_at is not None and here.inflight_at == here.batch_at


def test_the_fallback_reserve_grows_with_the_batches_deciding_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # review: 4 batches of 200 at 0.5 s at once (2 cores) came back after their deadline
    # 62 of 129 times: each kept back time for its own fallback, all of them sharing the
    # gRPC process
    servicer, pool, here = _servicer()
    here.answer_per_order_s = 0.001
    reserved: list[float] = []
    real = router._wait_until

    def spy(started: float, timeout_s: float, answer_s: float = 0.0) -> float:
        reserved.append(answer_s)
        return real(started, timeout_s, answer_s)

    monkeypatch.setattr(router, "_wait_until", spy)
    a, b, c, d = fresh(), fresh(), fresh(), fresh()
    answers = [
        convert.decision_to_proto(Decision(o.order_id, Outcome.ALLOW, 0.0, (), "v1"))
        for o in (a, b)
    ]
    pool.w.answer = scoring_pb2.ScoreBatchResponse(decisions=answers).SerializeToString()
    pool.w.gate.clear()  # the first batch waits for its worker
    first = threading.Thread(target=servicer.score_batch_request, args=(_batch(a, b), 2.0))
    first.start()
    try:
        assert pool.w.sent.wait(2)
        servicer.score_batch_request(_batch(c, d), 1.0)  # its worker busy: scored here
    finally:
        pool.w.gate.set()
        first.join(5)
    servicer.score_batch_request(_batch(fresh(), fresh()), 1.0)  # alone again
    assert reserved == pytest.approx([0.002, 0.004, 0.002])


def _batch(*orders: Order) -> scoring_pb2.ScoreBatchRequest:
    return scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in orders])


@pytest.mark.parametrize("recorded", [True, False])
def test_an_answer_is_kept_when_the_workers_log_took_it(recorded: bool) -> None:
    """A decision the worker's log did not take (its queue full: a retry is scored
    again, by a worker that may record it, as one process does) and a recorded one whose
    log look-up failed (kept: replayed while the worker is busy)."""
    servicer, pool, here = _servicer()
    order = fresh()
    mark = "evidence" if recorded else "evidence_queue"
    pool.w.answer = _answer(order.order_id, degraded=(mark,))
    pool.w.unrecorded = () if recorded else (order.order_id,)
    first = servicer.score_request(_request(order), 1.0).decision
    pool.w.busy = True
    retry = servicer.score_request(_request(order), 1.0).decision
    assert not first.replayed
    assert retry.replayed is recorded
    assert here.scored == ([] if recorded else [order.order_id])


def test_a_dead_workers_answer_is_not_replayed() -> None:
    """The worker answered, then died before its log committed the decision (killed as
    hung, or crashed): a retry is not answered from memory with a decision nobody
    records; it is decided again here (in production after a look-up of the log)."""
    servicer, pool, here = _servicer()
    order = fresh()
    pool.w.answer = _answer(order.order_id)
    first = servicer.score_request(_request(order), 1.0).decision
    pool.w.alive = False
    retry = servicer.score_request(_request(order), 1.0).decision
    assert not first.replayed and not retry.replayed
    assert here.scored == [order.order_id]


def _behind_a_leader(order: Order, retry: Order) -> tuple[Any, HereScorer]:
    """The first call for ``order`` waits for the worker; ``retry`` joins it; the worker
    answers and stalls right after (busy). The retry's outcome, the gRPC process's scorer."""
    servicer, pool, here = _servicer()
    pool.w.answer = _answer(order.order_id)
    pool.w.gate.clear()
    out: dict[str, Any] = {}

    def follow() -> None:
        try:
            out["retry"] = servicer.score_request(_request(retry), 2.0)
        except Exception as e:
            out["retry"] = e

    leader = threading.Thread(target=servicer.score_request, args=(_request(order), 2.0))
    leader.start()
    assert pool.w.sent.wait(2)
    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.1)  # the retry waits on the first call's flight
    pool.w.busy = True
    pool.w.gate.set()
    leader.join(5)
    follower.join(5)
    return out["retry"], here


def test_a_concurrent_retry_with_other_bytes_for_the_same_order_is_replayed() -> None:
    """Another IP in the same masked form: the same order, so the first call's answer,
    not a second decision while the worker is busy."""
    order = fresh(ip="10.0.0.1")
    retry, here = _behind_a_leader(order, dataclasses.replace(order, ip="10.0.0.2"))
    assert retry.decision.replayed and retry.decision.decided_at == 1.0
    assert here.scored == []


def test_a_concurrent_retry_with_another_client_time_is_replayed() -> None:
    """``client_time`` is informational: a checkout that rebuilds its request on retry
    gets the first call's answer (it was refused ALREADY_EXISTS in worker mode)."""
    order = fresh()
    retry, here = _behind_a_leader(
        order, dataclasses.replace(order, client_time=order.client_time + 1)
    )
    assert retry.decision.replayed and retry.decision.decided_at == 1.0
    assert here.scored == []


def test_a_concurrent_retry_with_other_content_is_refused() -> None:
    order = fresh()
    changed = dataclasses.replace(order, shop_id=order.shop_id + "-other")
    retry, here = _behind_a_leader(order, changed)
    assert isinstance(retry, AlreadyExistsError)
    assert retry.status == grpc.StatusCode.ALREADY_EXISTS.name
    assert here.scored == []


def test_calls_waiting_for_a_leader_that_failed_do_not_all_route_at_once() -> None:
    """The first call fails (the worker's error); the two retries that waited for it join
    the flight again: one routes, the other gets its answer, nothing is decided twice."""
    servicer, pool, here = _servicer()
    order = fresh()
    pool.w.answer = _answer(order.order_id)
    pool.w.gate.clear()
    pool.w.fail = UnavailableError("the worker's store is down")
    pool.w.takes_s = 0.1  # the next call holds the worker a while
    out: list[Any] = [None, None, None]

    def call(i: int) -> None:
        try:
            out[i] = servicer.score_request(_request(order), 2.0).decision
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    threads[0].start()
    assert pool.w.sent.wait(2)
    threads[1].start()
    threads[2].start()
    time.sleep(0.1)  # both wait on the first call's flight
    pool.w.gate.set()
    for t in threads:
        t.join(5)
    assert isinstance(out[0], UnavailableError)
    assert here.scored == [] and len(pool.w.calls) == 2
    assert sorted(d.replayed for d in out[1:]) == [False, True]
    assert out[1].decided_at == out[2].decided_at


def test_kept_answers_are_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Orders are kept by their bytes, so a few huge ones cannot hold gigabytes."""
    monkeypatch.setattr(answers, "RECENT_MAX_BYTES", 10_000)
    kept = answers.RecentAnswers()
    decisions = [scoring_pb2.Decision(order_id=f"o-{i}") for i in range(5)]
    kept.put(((b"x" * 4_000, d) for d in decisions), FakeWorker())
    assert [oid for oid in kept._kept] == ["o-3", "o-4"]
    assert kept._bytes == 8_000


class _Time:
    """``time`` for ``riskd.service.answers``: a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_a_kept_answer_is_replayed_as_a_marked_copy_until_its_keep_time_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Time()
    monkeypatch.setattr(answers, "time", clock)
    kept = answers.RecentAnswers()
    order = convert.order_to_proto(fresh())
    data = order.SerializeToString()
    decision = scoring_pb2.Decision(order_id=order.order_id, decided_at=1.0)
    kept.put([(data, decision)], FakeWorker())
    clock.now += answers.RECENT_KEEP_S - 0.1
    replayed = kept.replay(order, data, lambda: "order")
    assert replayed is not None and replayed.replayed and replayed.decided_at == 1.0
    assert not decision.replayed  # the answer kept is not changed by its replays
    clock.now += 0.1  # its keep time is over: the decision log answers a retry now
    assert kept.replay(order, data, lambda: "order") is None
    kept.put([(b"", scoring_pb2.Decision(order_id="o-later"))], FakeWorker())
    assert list(kept._kept) == ["o-later"]  # the next answers kept let it go


def test_a_retry_of_a_kept_answer_with_other_bytes_that_is_bad_is_invalid_argument() -> None:
    """As a worker would say: the field that is wrong, not "scored for other content"."""
    kept = answers.RecentAnswers()
    order = convert.order_to_proto(fresh())
    data = order.SerializeToString()
    kept.put([(data, scoring_pb2.Decision(order_id=order.order_id))], FakeWorker())
    bad = scoring_pb2.ScoreRequest(order=order).order
    bad.amounts.total += 1
    with pytest.raises(InvalidArgumentError) as e:
        kept.replay(bad, bad.SerializeToString(), lambda: "orders[3]")
    assert e.value.field == "orders[3].amounts.total"


def test_kept_answers_are_bounded_by_count_and_an_answer_kept_again_is_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(answers, "RECENT_MAX", 2)
    kept = answers.RecentAnswers()
    worker = FakeWorker()
    a, b, c = (scoring_pb2.Decision(order_id=f"o-{x}") for x in "abc")
    kept.put([(b"x" * 10, a), (b"y" * 20, b)], worker)
    kept.put([(b"z" * 30, a)], worker)  # a again: now the newest, counted once
    assert list(kept._kept) == ["o-b", "o-a"] and kept._bytes == 50
    kept.put([(b"w" * 40, c)], worker)  # over the count: the oldest goes
    assert list(kept._kept) == ["o-a", "o-c"] and kept._bytes == 70


class BatchWorker:
    """Answers each batch part ALLOW (a repeated id: replayed), and a unary call ALLOW;
    ``busy``; ``error``; ``gate`` holds answers back (``sent``: a call came)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = False
        self.alive = True
        self.error: Exception | None = None
        self.fail_next: Exception | None = None  # raised by the next answer only
        self.unrecorded: set[str] = set()  # order ids its log did not take
        self.calls: list[bytes] = []
        self.methods: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.sent = threading.Event()

    def begin(self, method: str, payload: bytes, deadline: float, **_: object) -> int | None:
        if not self.alive:
            raise workers.WorkerGone
        if self.busy:
            raise workers.WorkerBusy
        if deadline <= time.monotonic():  # as a real worker: not taken, nothing sent
            return None
        self.calls.append(payload)
        self.methods.append(method)
        self.sent.set()
        return len(self.calls)

    def answering(self) -> bool:
        return True  # collected in index order, each answer waiting on its ``gate``

    def finish(self, seq: int, deadline: float) -> tuple[bytes, frozenset[str]] | None:
        self.gate.wait(5)
        if self.error is not None:
            raise self.error
        if self.fail_next is not None:
            fail, self.fail_next = self.fail_next, None
            raise fail
        if self.methods[seq - 1] == "Score":
            order_id = scoring_pb2.ScoreRequest.FromString(self.calls[seq - 1]).order.order_id
            return _answer(order_id), frozenset()
        seen: set[str] = set()
        out = []
        for o in scoring_pb2.ScoreBatchRequest.FromString(self.calls[seq - 1]).orders:
            d = Decision(o.order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
            out.append(convert.decision_to_proto(d))
            out[-1].replayed = o.order_id in seen
            seen.add(o.order_id)
        body = scoring_pb2.ScoreBatchResponse(decisions=out).SerializeToString()
        return body, frozenset(self.unrecorded)


class TwoWorkers:
    """Worker 0, and worker 1 for the ids in ``to_1``."""

    def __init__(self) -> None:
        self.ws = [BatchWorker(0), BatchWorker(1)]
        self.to_1: set[str] = set()

    def worker_for(self, order_id: str) -> int:
        return 1 if order_id in self.to_1 else 0

    def get(self, index: int) -> BatchWorker:
        return self.ws[index]

    def others(self, index: int) -> list[BatchWorker]:
        return []


def _batch_servicer() -> tuple[router.PooledScoringServicer, TwoWorkers, HereScorer, Metrics]:
    pool, here, metrics = TwoWorkers(), HereScorer(), Metrics()
    servicer = router.PooledScoringServicer(
        pool,  # type: ignore[arg-type]
        here,
        None,
        metrics,
        SystemClock(),
        default_deadline_s=5.0,
        max_batch=100,
    )
    return servicer, pool, here, metrics


def _batch(*orders: Order) -> scoring_pb2.ScoreBatchRequest:
    return scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in orders])


def _decided(metrics: Metrics) -> float:
    return sum(metrics.value("riskd_decisions_total", {"outcome": o}) for o in ("allow", "review"))


@pytest.mark.parametrize("refused_by", ["worker", "here"])
def test_a_refused_batch_counts_and_keeps_what_a_worker_decided(refused_by: str) -> None:
    """Worker 0 decided and recorded ``a``; ``b``'s part is refused (by worker 1, or by
    this process scoring it for a busy worker 1): the call is refused, yet ``a`` is
    counted once and kept, so a retry while worker 0 is busy gets it back."""
    servicer, pool, here, metrics = _batch_servicer()
    a, b = fresh(), fresh()
    pool.to_1.add(b.order_id)
    if refused_by == "worker":
        pool.ws[1].error = AlreadyExistsError("orders[0].order_id: scored for other content")
    else:
        pool.ws[1].busy = True
        here.refuse.add(b.order_id)
    with pytest.raises(AlreadyExistsError) as e:
        servicer.score_batch_request(_batch(a, b), 1.0)
    assert str(e.value).startswith("orders[1].order_id: ")  # the caller's entry, not the part's
    assert _decided(metrics) == 1
    pool.ws[0].busy = True
    retry = servicer.score_batch_request(_batch(a), 1.0).decisions
    assert retry[0].replayed and here.scored == []
    assert _decided(metrics) == 1


def test_a_batch_its_deadline_cannot_answer_is_refused_before_a_worker_is_asked() -> None:
    """As one process refuses it: a caller's batch (``refuse_late``) whose time does not
    cover answering its orders is refused before any worker or this process scores."""
    servicer, pool, here, metrics = _batch_servicer()
    here.answer_per_order_s = 0.01
    orders = [fresh() for _ in range(20)]  # 0.2 s to answer
    with pytest.raises(DeadlineExceededError):
        servicer.score_batch_request(_batch(*orders), 0.1, refuse_late=True)
    assert pool.ws[0].calls == [] and here.scored == [] and _decided(metrics) == 0
    assert len(servicer.score_batch_request(_batch(*orders), 0.1).decisions) == 20  # asked
    assert len(servicer.score_batch_request(_batch(*orders), 1.0, refuse_late=True).decisions) == 20


def test_a_batch_answer_is_kept_while_the_worker_that_gave_it_lives() -> None:
    """Worker 0 was down, so worker 1 (free) took its part; a retry while worker 1 lives
    is replayed, once it died the retry is decided again (worker 0 back, here busy)."""
    servicer, pool, here, _ = _batch_servicer()
    pool.others = lambda index: [pool.ws[1 - index]]  # type: ignore[method-assign]
    a = fresh()
    pool.ws[0].alive = False
    first = servicer.score_batch_request(_batch(a), 1.0).decisions
    assert len(pool.ws[1].calls) == 1 and not first[0].replayed
    pool.ws[0].alive, pool.ws[0].busy = True, True
    assert servicer.score_batch_request(_batch(a), 1.0).decisions[0].replayed
    pool.ws[1].alive = False
    again = servicer.score_batch_request(_batch(a), 1.0).decisions
    assert not again[0].replayed and here.scored == [a.order_id]


def test_the_worker_fallbacks_metric_counts_no_replay() -> None:
    """A busy worker's part ``[a, a]`` scored here: one order decided, one replay."""
    servicer, pool, _, metrics = _batch_servicer()
    a = fresh()
    pool.ws[0].busy = True
    got = servicer.score_batch_request(_batch(a, a), 1.0).decisions
    assert [d.replayed for d in got] == [False, True]
    assert metrics.value("riskd_score_worker_fallbacks_total", {"reason": "busy"}) == 1


def test_a_workers_invalid_argument_for_its_part_names_the_callers_field() -> None:
    """Worker 1's part is ``[b, c]``; its refusal of its ``orders[1]`` is the caller's
    ``orders[2]``, in the field and the message alike (said once)."""
    servicer, pool, _, _ = _batch_servicer()
    a, b, c = fresh(), fresh(), fresh()
    pool.to_1 |= {b.order_id, c.order_id}
    pool.ws[1].error = InvalidArgumentError("orders[1].amounts.total", "must not be negative")
    with pytest.raises(InvalidArgumentError) as e:
        servicer.score_batch_request(_batch(a, b, c), 1.0)
    assert e.value.field == "orders[2].amounts.total"
    assert str(e.value) == "orders[2].amounts.total: must not be negative"


def test_a_batch_two_workers_refuse_is_refused_with_the_first_entrys_refusal() -> None:
    servicer, pool, _, _ = _batch_servicer()
    a, b = fresh(), fresh()
    pool.to_1.add(b.order_id)
    pool.ws[0].error = AlreadyExistsError("orders[0].order_id: scored for other content")
    pool.ws[1].error = InvalidArgumentError("orders[0].amounts.total", "must not be negative")
    with pytest.raises(AlreadyExistsError) as e:
        servicer.score_batch_request(_batch(a, b), 1.0)
    assert str(e.value).startswith("orders[0].order_id: ")


def test_a_batch_answer_the_workers_log_did_not_take_is_not_kept() -> None:
    """As for a unary call: ``a``'s decision is not in worker 0's log (its queue full),
    so a retry while worker 0 is busy is scored again; ``b``'s is replayed."""
    servicer, pool, here, _ = _batch_servicer()
    a, b = fresh(), fresh()
    pool.ws[0].unrecorded = {a.order_id}
    servicer.score_batch_request(_batch(a, b), 1.0)
    pool.ws[0].busy = True
    retry = servicer.score_batch_request(_batch(a, b), 1.0).decisions
    assert [d.replayed for d in retry] == [False, True]
    assert here.scored == [a.order_id]


@pytest.mark.parametrize(
    ("count", "down", "calls", "scored_here", "reroutes"),
    [
        (2, {0}, [0, 1], "a", 0),  # worker 1 has a part of its own: a is scored here
        (3, {0, 1}, [0, 0, 1], "b", 1),  # worker 2 took a's part: b is scored here
    ],
)
def test_a_down_workers_part_goes_only_to_a_worker_with_no_part_of_the_batch(
    count: int, down: set[int], calls: list[int], scored_here: str, reroutes: int
) -> None:
    servicer, pool, here, metrics = _batch_servicer()
    pool.ws += [BatchWorker(i) for i in range(2, count)]
    pool.others = lambda index: [w for w in pool.ws if w.index != index]  # type: ignore[method-assign]
    a, b = fresh(), fresh()
    pool.to_1.add(b.order_id)
    for i in down:
        pool.ws[i].alive = False
    got = servicer.score_batch_request(_batch(a, b), 1.0).decisions
    assert [d.order_id for d in got] == [a.order_id, b.order_id]
    assert [len(w.calls) for w in pool.ws] == calls
    assert here.scored == [{"a": a, "b": b}[scored_here].order_id]
    assert metrics.value("riskd_score_worker_reroutes_total") == reroutes
    assert metrics.value("riskd_score_worker_fallbacks_total", {"reason": "down"}) == 1


@pytest.mark.parametrize("why", ["down", "busy"])
def test_orders_no_worker_can_take_are_scored_here_in_the_time_left(why: str) -> None:
    """Their worker down or busy and no other free: this process scores the orders, a
    unary call's and a batch's part, with what is left of the caller's budget (a full
    decision), not with none as for a late worker's fallback (degraded ``features``)."""
    servicer, pool, here, metrics = _batch_servicer()
    if why == "down":
        pool.ws[0].alive = False
    else:
        pool.ws[0].busy = True
    servicer.score_request(_request(fresh()), 1.0)
    servicer.score_batch_request(_batch(fresh(), fresh()), 1.0)
    assert len(here.budgets) == 2, here.budgets
    assert all(b is not None and 0.5 < b <= 1.0 for b in here.budgets), here.budgets
    assert metrics.value("riskd_score_worker_fallbacks_total", {"reason": why}) == 3


def test_a_unary_fallback_that_replays_a_decision_is_not_counted_as_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servicer, pool, here, metrics = _batch_servicer()
    pool.ws[0].alive = False
    monkeypatch.setattr(here, "score", lambda o, **_: _replayed(here.score_batch((o,))[0]))
    assert servicer.score_request(_request(fresh()), 1.0).decision.replayed
    assert metrics.value("riskd_score_worker_fallbacks_total", {"reason": "down"}) == 0


def test_an_order_out_of_time_when_its_worker_is_down_is_the_late_fallback_not_a_reroute() -> None:
    servicer, pool, here, metrics = _batch_servicer()
    pool.others = lambda index: [pool.ws[1 - index]]  # type: ignore[method-assign]
    pool.ws[0].alive = False
    order = fresh()
    assert not servicer.score_request(_request(order), 0.0).decision.replayed
    assert pool.ws[1].calls == [] and here.scored == [order.order_id]
    assert metrics.value("riskd_score_worker_reroutes_total") == 0
    assert metrics.value("riskd_score_worker_fallbacks_total", {"reason": "late"}) == 1


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn()`` on a thread; its result (or exception) in ``out["got"]`` once joined."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["got"] = fn()
        except Exception as e:
            out["got"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _held_unary(
    order: Order, timeout_s: float
) -> tuple[router.PooledScoringServicer, FakePool, HereScorer, threading.Thread, dict[str, Any]]:
    """A unary call for ``order`` on a thread, its worker holding the answer back
    (``pool.w.gate``): the servicer, pool, this process's scorer, the thread, its result."""
    servicer, pool, here = _servicer()
    pool.w.answer = _answer(order.order_id)
    pool.w.gate.clear()
    thread, out = _in_thread(lambda: servicer.score_request(_request(order), timeout_s))
    assert pool.w.sent.wait(2)
    return servicer, pool, here, thread, out


def test_a_batch_waits_for_the_unary_call_routing_its_order() -> None:
    """A batch entry for an order a unary call is routing (its worker holds the answer):
    the batch waits for that call and replays its answer, not a second decision here."""
    order = fresh()
    servicer, pool, here, unary, first = _held_unary(order, 2.0)
    batch, retry = _in_thread(lambda: servicer.score_batch_request(_batch(order), 2.0))
    time.sleep(0.1)  # the batch waits on the unary call's flight
    pool.w.gate.set()
    unary.join(5)
    batch.join(5)
    [decision] = retry["got"].decisions
    assert decision.replayed and decision.decided_at == first["got"].decision.decided_at
    assert len(pool.w.calls) == 1 and here.scored == []


def test_a_unary_retry_waits_for_the_batch_routing_its_order() -> None:
    """The other way round: a unary retry while a batch's part for its order is out."""
    servicer, pool, here, _ = _batch_servicer()
    a, b = fresh(), fresh()
    pool.ws[0].gate.clear()
    batch, first = _in_thread(lambda: servicer.score_batch_request(_batch(a, b), 2.0))
    assert pool.ws[0].sent.wait(2)
    unary, retry = _in_thread(lambda: servicer.score_request(_request(b), 2.0))
    time.sleep(0.1)  # the retry waits on the batch's flight for b
    pool.ws[0].gate.set()
    batch.join(5)
    unary.join(5)
    assert retry["got"].decision.replayed
    assert retry["got"].decision.decided_at == first["got"].decisions[1].decided_at
    assert pool.ws[0].methods == ["ScoreBatch"] and here.scored == []


def test_a_retry_behind_a_leader_is_answered_inside_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A unary retry waits for its leader no longer than its budget less the fallback's
    reserve (a quarter of the second here): its ``inflight`` answer goes out inside the
    deadline, not at it (the caller then gets DEADLINE_EXCEEDED, no answer)."""
    monkeypatch.setattr(router, "RESERVE_SHARE", 0.25)
    order = fresh()
    servicer, pool, _, leader, _ = _held_unary(order, 5.0)
    try:
        started = time.monotonic()
        retry = servicer.score_request(_request(order), 1.0).decision
        took = time.monotonic() - started
    finally:
        pool.w.gate.set()
        leader.join(5)
    assert tuple(retry.unavailable) == ("inflight",)
    assert took < 0.9, took  # waited 0.75 s: its budget less the reserve


def test_a_batch_entry_still_routed_at_its_deadline_gets_the_unrecorded_fallback() -> None:
    """The unary call routing ``a`` outlasts the batch's time: ``a`` is answered
    ``inflight`` (not recorded; the first call's decision is), ``b`` is scored as usual."""
    a, b = fresh(), fresh()
    servicer, pool, here, unary, _ = _held_unary(a, 5.0)
    got = servicer.score_batch_request(_batch(a, b, a), 0.3).decisions
    pool.w.gate.set()
    unary.join(5)
    assert [tuple(d.unavailable) for d in got] == [("inflight",), ("features",), ("inflight",)]
    assert [d.replayed for d in got] == [False, False, True]
    assert here.scored == [b.order_id]  # the worker was busy with a's first call


def test_two_batches_sharing_orders_decide_each_once() -> None:
    """``[a, b]`` and ``[b, a]`` at once: one leads both flights, the other waits for
    them (leading none meanwhile) and replays."""
    servicer, pool, here, _ = _batch_servicer()
    a, b = fresh(), fresh()
    pool.ws[0].gate.clear()
    one, _ = _in_thread(lambda: servicer.score_batch_request(_batch(a, b), 2.0))
    assert pool.ws[0].sent.wait(2)
    two, second = _in_thread(lambda: servicer.score_batch_request(_batch(b, a), 2.0))
    time.sleep(0.1)
    pool.ws[0].gate.set()
    one.join(5)
    two.join(5)
    assert [d.replayed for d in second["got"].decisions] == [True, True]
    assert len(pool.ws[0].calls) == 1 and here.scored == []


def test_a_batch_routes_the_orders_it_leads_before_it_waits_for_another_calls() -> None:
    """A unary call routes ``a`` on a stalled worker 0; a batch ``[a, b, c]`` (b and c
    are worker 1's) has them decided by worker 1 at once, then waits for ``a`` in the
    time left: ``a`` gets the unrecorded ``inflight`` fallback, nothing is scored here."""
    servicer, pool, here, metrics = _batch_servicer()
    a, b, c = fresh(), fresh(), fresh()
    pool.to_1 |= {b.order_id, c.order_id}
    pool.ws[0].gate.clear()
    unary, _ = _in_thread(lambda: servicer.score_request(_request(a), 5.0))
    assert pool.ws[0].sent.wait(2)
    got = servicer.score_batch_request(_batch(a, b, c), 0.3).decisions
    pool.ws[0].gate.set()
    unary.join(5)
    assert [tuple(d.unavailable) for d in got] == [("inflight",), (), ()]
    assert [d.decided_at for d in got[1:]] == [1.0, 1.0]  # worker 1's answers
    assert pool.ws[1].methods == ["ScoreBatch"] and here.scored == []
    inflight = {"unavailable": "inflight"}  # counted as an inflight answer, not a decision
    assert metrics.value("riskd_degraded_decisions_total", inflight) == 1


def test_a_batch_routes_an_order_soon_after_the_call_routing_it_failed() -> None:
    """``x``'s and ``y``'s first calls are out (y's worker stalls); x's fails after 30 ms,
    keeping nothing. The batch ``[x, y]`` routes x as soon as its flight lands (worker
    0 answers it), not only once y's is done too, at the deadline (the late fallback)."""
    servicer, pool, here, _ = _batch_servicer()
    x, y = fresh(), fresh()
    pool.to_1.add(y.order_id)
    pool.ws[0].gate.clear()
    pool.ws[1].gate.clear()
    pool.ws[0].fail_next = UnavailableError("worker 0 could not score it")
    first_y, _ = _in_thread(lambda: servicer.score_request(_request(y), 5.0))
    first_x, failed = _in_thread(lambda: servicer.score_request(_request(x), 5.0))
    assert pool.ws[0].sent.wait(2) and pool.ws[1].sent.wait(2)
    batch, out = _in_thread(lambda: servicer.score_batch_request(_batch(x, y), 0.3))
    time.sleep(0.03)
    pool.ws[0].gate.set()  # x's first call fails now
    batch.join(5)
    pool.ws[1].gate.set()
    first_x.join(5)
    first_y.join(5)
    assert isinstance(failed["got"], UnavailableError)
    got = out["got"].decisions
    assert tuple(got[0].unavailable) == () and got[0].decided_at == 1.0  # worker 0's
    assert tuple(got[1].unavailable) == ("inflight",)
    assert pool.ws[0].methods == ["Score", "ScoreBatch"] and here.scored == []


class _LandsBetweenReads(threading.Event):
    """A flight's ``done`` whose first read after a timed-out wait lets its leader land
    (``release``) but reports what it read before: the landing falls between a batch's
    looking at the flight and acting on it."""

    def __init__(self, release: Callable[[], object]) -> None:
        super().__init__()
        self.release, self.armed, self.timed_out = release, True, False

    def wait(self, timeout: float | None = None) -> bool:
        ok = super().wait(timeout)
        self.timed_out = not ok
        return ok

    def is_set(self) -> bool:
        value = super().is_set()
        if self.armed and self.timed_out and not value:
            self.armed = False
            self.release()
            super().wait(5)  # landed now
        return value


def test_a_flight_landing_while_a_batch_looks_still_gets_its_entry_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """review: a landing between two reads of ``done`` left the entry unanswered (the
    batch failed with INTERNAL); each flight is read once per look now."""
    a = fresh()
    servicer, pool, here, first, _ = _held_unary(a, 3.0)
    join = servicer._flights.join

    def racy(order_id: str) -> Any:
        leader, flight = join(order_id)
        if not leader and not isinstance(flight.done, _LandsBetweenReads):
            flight.done = _LandsBetweenReads(pool.w.gate.set)
        return leader, flight

    monkeypatch.setattr(servicer._flights, "join", racy)
    got = servicer.score_batch_request(_batch(a), 0.5).decisions
    first.join(5)
    assert got[0].replayed and here.scored == []
