"""``ScoringService`` in worker mode: each order routed to its scoring worker, or answered here.

Where it sits: the gRPC process's servicer when ``score_workers`` > 0
(``riskd.service.server``): it sends each order, or each part of a batch, to a worker of the
``WorkerPool`` (``riskd.service.pool``), reroutes it or scores it here when that worker is
down, busy or late, and keeps the workers' recent answers for retries
(``riskd.service.answers``). The design: ``riskd.service.workers``.
"""

from __future__ import annotations

import enum
import functools
import re
import select
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from riskd.domain.clock import Clock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.order import Order
from riskd.engine.flights import Flight, Flights
from riskd.engine.scorer import refuse_changed_duplicates
from riskd.errors import RiskdError
from riskd.evidence.request import protect_order
from riskd.service import convert, validate
from riskd.service.answers import RecentAnswers
from riskd.service.gen.riskd.v1 import scoring_pb2
from riskd.service.metrics import Metrics
from riskd.service.pool import WorkerPool
from riskd.service.scoring import ScorerLike, ScoringServicer
from riskd.service.workers import Answer, Worker, WorkerBusy, WorkerGone, rebuild

__all__ = ["PooledScoringServicer"]

FALLBACK_RESERVE_S = (
    0.02  # at most this (a quarter of the budget) kept for a late worker's fallback
)
RESERVE_SHARE = 0.05  # and at least this share of a long budget: a busy host's stalls
RELOOK_EVERY_S = 0.002  # a batch waiting for other calls' orders looks at them this often


class _Missing(enum.Enum):
    """Why the gRPC process answers a worker's orders itself (the fallbacks metric's label)."""

    DOWN = "down"
    BUSY = "busy"
    LATE = "late"


_DOWN, _BUSY, _LATE = _Missing.DOWN, _Missing.BUSY, _Missing.LATE


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the metrics count of a decision a worker answered."""

    outcome: Outcome
    reasons: Sequence[scoring_pb2.Reason]
    degraded: Sequence[str]
    replayed: bool


def _seen(d: scoring_pb2.Decision) -> _Seen:
    return _Seen(Outcome(d.outcome), d.reasons, d.unavailable, d.replayed)


_PART_ENTRY = re.compile(r"orders\[(\d+)\](?=[.:])")


def _renumbered(error: RiskdError, indexes: Sequence[int], size: int) -> RiskdError:
    """A worker's refusal of its part of a batch (``indexes``: the caller's index of each
    of the part's orders; ``size``: the caller's batch), naming the caller's entry: the
    part's ``orders[j]`` is the caller's ``orders[indexes[j]]``. Any other error as it is."""
    text = str(error)
    found = _PART_ENTRY.match(text)
    if found is None or size <= 1:
        return error
    j = int(found.group(1))
    if j >= len(indexes):
        return error
    where = f"orders[{indexes[j]}]"
    field = getattr(error, "field", None)
    if isinstance(field, str):
        field = where + field[found.end() :]
    return rebuild(type(error).__name__, where + text[found.end() :], field)


def _wait_until(started: float, timeout_s: float, answer_s: float = 0.0) -> float:
    """How long (monotonic) to wait for workers: the budget less time for the fallback
    (``answer_s``: the scorer's ``answer_time_s`` of a batch's orders; kept twice over,
    since the fallback here also converts each order and decision: 80-140 us an order
    measured on the 2-core VM, ~160 us with the workers busy, against the scorer's 110).
    Review: a fixed 20 ms answered a 500-order batch whose worker stalled 2-52 ms after
    its 1 s deadline. A long budget keeps at least ``RESERVE_SHARE`` of itself: the
    answer goes out on a busy host too, whose scheduling stalls the fixed reserve does
    not cover (CI: a 6-order batch at a 4 s deadline came back after it, 2 cores loaded
    by the test run; 5 % of 150 ms is under the 20 ms, so a checkout's budget is as it was).
    """
    reserve = max(FALLBACK_RESERVE_S + 2 * answer_s, RESERVE_SHARE * timeout_s)
    return started + timeout_s - min(reserve, timeout_s / 4)


class PooledScorer(ScorerLike, Protocol):
    """What the pooled servicer needs of the server process's ``Scorer``."""

    def inflight(self, order: Order, started: float, at: float | None = None) -> Decision: ...

    def refuse_if_late(self, orders: Sequence[Order], timeout_s: float) -> None: ...

    def answer_time_s(self, orders: int) -> float: ...


class QueuedLog(Protocol):
    """What the pooled servicer needs of the server process's ``DecisionLog``."""

    def queued(self, order_ids: Sequence[str]) -> Mapping[str, object]: ...


class PooledScoringServicer(ScoringServicer):
    """``ScoringService`` that hands scoring to the workers (see ``riskd.service.workers``).

    ``scorer`` is the server process's own: it scores the orders of a worker that is
    down, answers with the fallback when a worker is late, and takes ``ReportOutcome``;
    ``log`` is its decision log (if any). An order whose decision this process made and
    has not committed yet (its writer gathers a batch for a few milliseconds) is answered
    here, from that log, not by a worker that could not see it yet and would decide again.
    """

    def __init__(
        self,
        pool: WorkerPool,
        scorer: PooledScorer,
        log: QueuedLog | None,
        metrics: Metrics,
        clock: Clock,
        *,
        default_deadline_s: float,
        max_batch: int,
    ) -> None:
        super().__init__(
            scorer, metrics, clock, default_deadline_s=default_deadline_s, max_batch=max_batch
        )
        self._pool = pool
        self._pooled_scorer = scorer
        self._log = log
        self._fallbacks = {m: metrics.worker_fallbacks.labels(m.value) for m in _Missing}
        self._reroutes = metrics.worker_reroutes
        # unary calls being routed now, by order id: (request bytes, answer)
        self._flights = Flights[tuple[bytes, scoring_pb2.ScoreResponse]]()
        self._recent = RecentAnswers()  # workers' answers, for retries
        self._batching = 0  # ScoreBatch calls in this process now (their fallbacks share it)
        self._batching_lock = threading.Lock()

    def _fell_back(self, why: _Missing, orders: int) -> None:
        self._fallbacks[why].inc(orders)

    def _here(
        self, why: _Missing, request: scoring_pb2.ScoreRequest, timeout_s: float
    ) -> scoring_pb2.ScoreResponse:
        """``request`` scored by this process because its worker was ``why`` (counted
        unless the answer is a replay of a recorded decision)."""
        response = super().score_request(request, timeout_s)
        if not response.decision.replayed:
            self._fell_back(why, 1)
        return response

    def _send(
        self,
        method: str,
        payload: bytes,
        orders: int,
        index: int,
        deadline: float,
        avoid: Collection[int] = (),
        at: float | None = None,
    ) -> tuple[Worker, int | None] | _Missing:
        """Send ``orders`` orders to worker ``index``; when it is down or busy, to the
        first other worker free right now and not in ``avoid``
        (``riskd_score_worker_reroutes_total``); else why not.

        A rerouted order is scored as the gRPC process would score it, by another process
        with the same rules, stores and log (its in-flight de-duplication is that
        process's), at a worker's cost instead of the gRPC process's: the gRPC process is
        the one that limits worker mode.
        """
        try:
            worker = self._pool.get(index)
            return worker, worker.begin(method, payload, deadline, at=at)
        except WorkerBusy:
            why = _BUSY
        except WorkerGone:
            why = _DOWN
        for other in self._pool.others(index):
            if other.index in avoid:
                continue
            try:
                seq = other.begin(method, payload, deadline, wait_s=0.0, at=at)
            except WorkerGone:  # busy or broken too: the next one
                continue
            if seq is not None:  # else the deadline passed: the fallback, not a reroute
                self._reroutes.inc(orders)
            return other, seq
        return why

    def score_request(
        self,
        request: scoring_pb2.ScoreRequest,
        timeout_s: float,
        *,
        deadline: float | None = None,
    ) -> scoring_pb2.ScoreResponse:
        """One order, through this process's flight for its order id (``riskd.service.workers``,
        "Retries").

        The first call for an order id (the leader) answers it (``_route``); a
        concurrent retry waits for the leader's answer (no longer than its own budget
        less the fallback's reserve) and, for the same request, gets that answer marked
        ``replayed``. For other bytes, or when the leader failed, the waiting calls join
        the flight again (one leads: its kept answer, a replay or ``ALREADY_EXISTS`` for
        other content, or the order routed); when the leader is not done in the retry's
        time, the retry gets the fallback, degraded ``inflight`` and not recorded
        (``_inflight``).
        """
        started = time.monotonic()
        if deadline is not None:
            timeout_s = deadline - started
        payload = request.SerializeToString()
        order_bytes = request.order.SerializeToString()
        order_id = request.order.order_id
        while True:  # until this call leads the order's flight or has its answer
            leader, flight = self._flights.join(order_id)
            if leader:
                break
            led = flight.wait(max(_wait_until(started, timeout_s) - time.monotonic(), 0.0))
            if led is not None and led[0] == payload:
                response = scoring_pb2.ScoreResponse()
                response.CopyFrom(led[1])
                response.decision.replayed = True  # counted once, as the leader's
                return response
            if not flight.done.is_set():  # the leader is still at it and our time is up
                return self._inflight(request, started)
            # the leader failed or sent other bytes: join again, so that of the calls
            # that waited one leads and the others wait for it, not all route at once
        answer: tuple[bytes, scoring_pb2.ScoreResponse] | None = None
        try:
            response = self._route(request, payload, order_bytes, started, timeout_s)
            answer = (payload, response)
            return response
        finally:
            self._flights.land(order_id, flight)
            flight.finish(answer)  # None (the leader failed): each follower answers itself

    def _inflight(
        self, request: scoring_pb2.ScoreRequest, started: float
    ) -> scoring_pb2.ScoreResponse:
        """The fallback for a retry whose leader did not finish in the retry's time, not
        recorded (the leader's decision is): as the scorer answers such a retry in one
        process, so that it does not become a second decision for the order."""
        order = convert.order_from_proto(request.order)
        validate.validate_order(order)
        decision = self._pooled_scorer.inflight(order, started)
        self._metrics.observe_decisions((decision,))
        return scoring_pb2.ScoreResponse(decision=convert.decision_to_proto(decision))

    def _route(
        self,
        request: scoring_pb2.ScoreRequest,
        payload: bytes,
        order_bytes: bytes,
        started: float,
        timeout_s: float,
    ) -> scoring_pb2.ScoreResponse:
        """A worker's recent answer for this order (``RecentAnswers``: replayed, or
        ``ALREADY_EXISTS`` for other content; looked up once no other call is routing the
        order, and a leader keeps its answer before it lands), else the order scored by
        its worker, another free one, or this process (``riskd.service.workers``),
        within ``timeout_s`` from ``started``."""
        kept = self._recent.replay(request.order, order_bytes, lambda: "order")
        if kept is not None:
            return scoring_pb2.ScoreResponse(decision=kept)
        deadline = _wait_until(started, timeout_s)
        order_id = request.order.order_id
        if self._log is not None and self._log.queued((order_id,)):  # decided here: replay
            return super().score_request(request, max(started + timeout_s - time.monotonic(), 0))
        try:
            index = self._pool.worker_for(order_id)
            sent = self._send("Score", payload, 1, index, deadline)
            if isinstance(sent, _Missing):  # every worker down or busy: scored here
                left = max(started + timeout_s - time.monotonic(), 0.0)
                return self._here(sent, request, left)
            worker, seq = sent
            reply = None if seq is None else worker.finish(seq, deadline)
        except WorkerGone:  # broke mid-call: scored here, in the time that is left
            return self._here(_DOWN, request, max(started + timeout_s - time.monotonic(), 0.0))
        if reply is None:  # late: the fallback, now
            return self._here(_LATE, request, 0.0)
        body, unrecorded = reply
        response = scoring_pb2.ScoreResponse.FromString(body)
        self._metrics.observe_decisions((_seen(response.decision),))
        if order_id not in unrecorded:
            self._recent.put(((order_bytes, response.decision),), worker)
        return response

    def score_batch_request(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        timeout_s: float,
        *,
        deadline: float | None = None,
        refuse_late: bool = False,
        at: float | None = None,
    ) -> scoring_pb2.ScoreBatchResponse:
        """Each order answered as a unary call's would be, under its order id's flight
        (``riskd.service.workers``, "Retries"): the orders whose flights this call leads at once
        first (``_route_batch``); then, in the time left, those another call (unary or a
        batch) is routing, each looked up again soon after that call is done (within
        ``RELOOK_EVERY_S``), or, still out at the deadline, the fallback, degraded
        ``inflight`` and not recorded (``_answer_inflight``). A call never waits while it
        leads a flight, so two calls never wait on each other. Every part is stamped with
        the batch's one time ``at`` (default: now), as one process stamps a batch (review:
        each worker stamped its part when it took it, a millisecond or more apart, and the
        earlier part's orders never saw the later part's)."""
        started = time.monotonic()
        at = self._clock.now() if at is None else at
        if deadline is not None:
            timeout_s = deadline - started
        validate.validate_batch_size(len(request.orders), self._max_batch)
        orders = convert.orders_from_proto(request.orders)
        validate.validate_batch(orders, self._max_batch)
        refuse_changed_duplicates(orders, protect_order)  # before any worker scores its part
        if refuse_late:  # as one process refuses it
            self._pooled_scorer.refuse_if_late(orders, timeout_s - (time.monotonic() - started))
        entries: dict[str, list[int]] = {}  # order id -> its entries, in order
        for i, order in enumerate(orders):
            entries.setdefault(order.order_id, []).append(i)
        # the fallback's reserve grows with the batches deciding here at once: their late
        # parts' fallbacks share this process (review: 4 batches of 200 at 0.5 s at once on
        # 2 cores came back after the deadline half the time, one at a time never)
        with self._batching_lock:
            self._batching += 1
            at_once = self._batching
        try:
            answer_s = at_once * self._pooled_scorer.answer_time_s(len(entries))
            until = _wait_until(started, timeout_s, answer_s)
            return self._batch(request, orders, entries, started, until, at)
        finally:
            with self._batching_lock:
                self._batching -= 1

    def _batch(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        orders: Sequence[Order],
        entries: dict[str, list[int]],
        started: float,
        until: float,
        at: float,
    ) -> scoring_pb2.ScoreBatchResponse:
        """``score_batch_request``'s routing and waiting, until ``until``."""
        decisions: list[scoring_pb2.Decision | None] = [None] * len(request.orders)
        ids = list(entries)
        awaited: dict[str, Flight[tuple[bytes, scoring_pb2.ScoreResponse]]] = {}
        led: dict[str, Flight[tuple[bytes, scoring_pb2.ScoreResponse]]] = {}

        def land(order_ids: Iterable[str]) -> None:
            """Land the flights this call leads for ``order_ids`` (first, as a unary leader
            does); their followers look again: the kept answer, or a log."""
            for order_id in order_ids:
                flight = led.pop(order_id, None)
                if flight is not None:
                    self._flights.land(order_id, flight)
                    flight.finish(None)

        route_at = at
        while ids or awaited:
            led.clear()
            for order_id in ids:
                leader, flight = self._flights.join(order_id)
                (led if leader else awaited)[order_id] = flight
            try:
                if led:
                    self._route_batch(request, orders, until, decisions, set(led), land, route_at)
            finally:
                land(list(led))  # those not landed as their worker's answer came
            # an order led later (its other call failed) is decided at its own time, as one
            # process decides it again when its leader gave up (``Abandoned``)
            route_at = self._clock.now()
            if not awaited:
                break
            left = until - time.monotonic()
            next(iter(awaited.values())).wait(min(max(left, 0.0), RELOOK_EVERY_S))
            landed = {oid: flight.done.is_set() for oid, flight in awaited.items()}  # read once
            ids = [oid for oid, done in landed.items() if done]
            for order_id in ids:
                del awaited[order_id]
            if time.monotonic() >= until:  # the rest are still out: answered as retries
                for order_id in awaited:
                    self._answer_inflight(orders, entries[order_id], started, decisions, at)
                awaited.clear()
        assert all(d is not None for d in decisions), "every order has its answer"
        return scoring_pb2.ScoreBatchResponse(decisions=cast(list[scoring_pb2.Decision], decisions))

    def _answer_inflight(
        self,
        orders: Sequence[Order],
        indexes: Sequence[int],
        started: float,
        decisions: list[scoring_pb2.Decision | None],
        at: float,
    ) -> None:
        """The unrecorded ``inflight`` fallback for the entries ``indexes`` of one order id
        (the first not replayed, repeats replayed, as the scorer answers them), stamped
        with the batch's time ``at`` (review: it took the clock at the deadline)."""
        decision = self._pooled_scorer.inflight(orders[indexes[0]], started, at)
        self._metrics.observe_decisions((decision,))
        for n, i in enumerate(indexes):
            answer = convert.decision_to_proto(decision)
            answer.replayed = n > 0
            decisions[i] = answer

    def _route_batch(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        orders: Sequence[Order],
        deadline: float,
        decisions: list[scoring_pb2.Decision | None],
        ids: Collection[str],
        land: Callable[[Iterable[str]], None],
        at: float,
    ) -> None:
        """Answer, in ``decisions``, the entries of the order ids ``ids`` (whose flights
        this call leads): a worker's kept answer, this process's queued decision, else
        each worker's part routed to it (or rerouted, or scored here). The orders of a
        worker's answer are kept for retries and ``land``ed as it comes, not when the
        last part does (review: with one worker stalled, retries of the orders another
        worker had decided and recorded got the ``inflight`` fallback until the batch's
        deadline, a second outcome for them)."""
        todo = [i for i, o in enumerate(orders) if o.order_id in ids and decisions[i] is None]
        # the workers' recent answers, before anything is counted
        order_bytes = {i: request.orders[i].SerializeToString() for i in todo}
        for i in todo:
            where = functools.partial("orders[{}]".format, i)
            decisions[i] = self._recent.replay(request.orders[i], order_bytes[i], where)
        todo = [i for i in todo if decisions[i] is None]
        queued = {} if self._log is None else self._log.queued([orders[i].order_id for i in todo])
        here = [i for i in todo if orders[i].order_id in queued]
        if here:  # decided by this process, not committed yet: replayed from its log first
            left = max(deadline - time.monotonic(), 0.0)
            part = self._part_here(orders, here, left, at)
            for i, decision in zip(here, part, strict=True):
                decisions[i] = decision
        groups: dict[int, list[int]] = {}
        for i in todo:
            if orders[i].order_id not in queued:
                groups.setdefault(self._pool.worker_for(orders[i].order_id), []).append(i)
        parts = {
            w: scoring_pb2.ScoreBatchRequest(orders=[request.orders[i] for i in idx])
            for w, idx in groups.items()
        }

        def arrived(w: int, worker: Worker, answer: Answer) -> None:
            # counted and kept whatever happens to the other parts: those orders are
            # decided and recorded, and a retry must get them back
            body, unrecorded = answer
            idx = groups[w]
            part = scoring_pb2.ScoreBatchResponse.FromString(body).decisions
            self._metrics.observe_decisions([_seen(d) for d in part])
            kept = [(i, d) for i, d in zip(idx, part, strict=True) if d.order_id not in unrecorded]
            self._recent.put(((order_bytes[i], d) for i, d in kept), worker)
            for i, decision in zip(idx, part, strict=True):
                decisions[i] = decision
            land({d.order_id for _, d in kept})

        answers, refused = self._ask_all(parts, deadline, arrived, at)
        if refused is not None:  # a worker refused its part: the batch is refused
            w, error = refused
            raise _renumbered(error, groups[w], len(orders))
        for w, idx in groups.items():
            got = answers[w]
            if isinstance(got, _Missing):  # DOWN/BUSY: here in the time left; LATE: fallback
                left = 0.0 if got is _LATE else max(deadline - time.monotonic(), 0.0)
                part = self._part_here(orders, idx, left, at)
                self._fell_back(got, sum(not d.replayed for d in part))
                for i, decision in zip(idx, part, strict=True):
                    decisions[i] = decision

    def _part_here(
        self, orders: Sequence[Order], indexes: Sequence[int], left: float, at: float
    ) -> Sequence[scoring_pb2.Decision]:
        """The entries ``indexes`` of a batch (its ``orders``, converted and validated)
        scored in this process in ``left`` seconds; a refusal names the caller's entry.
        Not converted again: that was a third of a late part's fallback (review: a
        stalled worker's 500 orders answered after the deadline)."""
        try:
            return self.score_orders([orders[i] for i in indexes], left, at=at).decisions
        except RiskdError as e:
            raise _renumbered(e, indexes, len(orders)) from None

    def _ask_all(
        self,
        parts: dict[int, scoring_pb2.ScoreBatchRequest],
        deadline: float,
        arrived: Callable[[int, Worker, Answer], None],
        at: float,
    ) -> tuple[dict[int, Answer | _Missing], tuple[int, RiskdError] | None]:
        """Send every part (own workers taken in index order, each wait timed: a batch
        holding a rerouted worker waits at most ``BUSY_WAIT_S`` for another), then collect
        them as they come (``_arrivals``), each answer handed to ``arrived`` at once.

        A part whose worker is down or busy goes to a worker free right now that has no
        part of this batch (taken without waiting), as a unary ``Score`` would.
        Per worker: the answer, ``_DOWN`` (gone or broken) or ``_BUSY`` (score it here),
        or ``_LATE`` (the fallback); none for a worker that refused its part; and the
        first refusal (the other parts' answers are still collected).
        """
        sent: dict[int, tuple[Worker, int | None]] = {}
        out: dict[int, Answer | _Missing] = {}
        taken = set(parts)  # workers with a part of their own, or one rerouted to them
        for w in sorted(parts):
            payload = parts[w].SerializeToString()
            n = len(parts[w].orders)
            got = self._send("ScoreBatch", payload, n, w, deadline, taken, at)
            if isinstance(got, _Missing):
                out[w] = got
                continue
            sent[w] = got
            taken.add(got[0].index)
        first_error: tuple[int, RiskdError] | None = None
        held = {w for w, (_, seq) in sent.items() if seq is not None}
        try:
            for w in _arrivals(sent, deadline):
                worker, seq = sent[w]
                held.discard(w)
                try:
                    reply = None if seq is None else worker.finish(seq, deadline)
                except WorkerGone as e:
                    out[w] = _BUSY if isinstance(e, WorkerBusy) else _DOWN
                    continue
                except RiskdError as e:  # the other workers' calls are still collected
                    first_error = first_error or (w, e)
                    continue
                out[w] = _LATE if reply is None else reply
                if reply is not None:
                    arrived(w, worker, reply)
        finally:  # never leave a worker taken (review: one then refused every call for good)
            for w in held:
                sent[w][0].give_up()
        return out, first_error


def _arrivals(sent: Mapping[int, tuple[Worker, int | None]], deadline: float) -> Iterator[int]:
    """The parts of ``sent`` in the order their answers begin to come back (those not
    sent first; at ``deadline``, the rest in index order), so that one worker stalled
    does not hold the answers the others have given. One part: no waiting here."""
    waiting = {w for w, (_, seq) in sent.items() if seq is not None}
    yield from (w for w in sent if w not in waiting)
    while len(waiting) > 1:
        ready = [w for w in sorted(waiting) if sent[w][0].answering()]
        if not ready:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            fds = [sent[w][0].fileno() for w in waiting]
            if min(fds) < 0:
                continue  # closed since it was looked at: ``answering`` says so now
            poller = select.poll()  # not select.select: the descriptors may be above 1023
            for fd in fds:
                poller.register(fd, select.POLLIN)
            poller.poll(max(left * 1000, 1.0))  # then each is looked at again
            continue
        for w in ready:
            waiting.discard(w)
            yield w
    yield from sorted(waiting)
