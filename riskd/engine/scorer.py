"""The Scorer: orders in, ``Decision``s out, each recorded as evidence.

Where it sits: ``service`` converts a request to an ``Order`` and calls
``score`` (or ``score_batch``); for each order the scorer

1. joins the order id's flight (singleflight: concurrent retries in this
   process wait for the first caller's answer) and, as its leader, looks the
   order up in the decision log (which also sees decisions not yet flushed):
   a known order gets its recorded decision back, marked ``replayed``, and
   an order id recorded for other content (its protected form, PII masked,
   differs, ``client_time`` aside: ``same_order``) is refused with
   ``AlreadyExistsError`` before anything is counted;
2. blind-indexes the order's identities into an ``Observation`` (``keys``);
3. records it and reads every velocity feature the program needs from the
   feature store, bounded by the caller's deadline and guarded by a circuit
   breaker;
4. runs the current compiled ``Program`` on the order, its features and its
   shop's enforcement state, and combines the results (``combine``);
5. when a dependency was unavailable, marks the decision ``degraded`` with
   what was missing (``features``, ``shops``, ``rules``, ``evidence``; or
   ``deadline``: the call's deadline left no time to run the rules) and,
   when an input of the decision was missing (all but ``evidence``), takes the
   ``max()`` of the rules that could still run and the ``FallbackPolicy``;
6. once the call's orders are decided, appends each decision, the feature
   values and every rule result (shadow ones included) to the ``DecisionLog``,
   whose writer thread commits it, and only then lands the flights, so a retry
   always finds it. A scoring worker (``record_late`` off) appends a call's
   decisions all or none, by the call's deadline (the gRPC process answers a
   call it had no answer for by then itself, and records that).

Idempotency across replicas: the decision log (shared PostgreSQL) answers
retries that reach another replica, and the feature store's own per-order
idempotency counts an order once whoever records it. The log answers only once
a decision is committed (``evidence_flush_ms`` and a commit: ~5-10 ms after the
answer): a retry reaching another replica before that is decided again, both
answer, and the log keeps whichever commits first (the other counted in
``DecisionLog.superseded``). Other content in that window is refused by the
feature store: each observation carries its order's ``content_tag`` and the
store's per-order marker keeps the first one recorded (README, "Running several
processes"); where the store did not record the first call (it answered degraded
``features``) only the log can tell, once committed.

Deadlines: the feature calls get the budget less ``eval_reserve_s`` per order (kept
for the rules and the log; at most half the budget) and less the time to answer a
batch's other orders undecided, each order observed (blind indexes) as the calls
reach it.
A batch that cannot be answered in its time at all is refused (``refuse_late``). When the
store bounds each call itself
(``feature_timeout_s``: the Redis socket timeout) and that bound fits in what
is left of the budget, the call runs inline on the request thread: no thread
hop, no GIL hand-off, and a hung Redis still costs at most one socket timeout
before the order is answered degraded (orders of a batch are not started once
the budget left is under that bound). Otherwise (a deadline shorter than the
socket timeout, or a store with no bound) the calls run on a worker thread and
the scorer waits at most the budget, so a hung Redis cannot hold the answer
past the deadline. The in-process store never blocks on I/O and is called inline
(a batch's orders, while the budget lasts). The decision-log lookup of a
PostgreSQL log is bounded the same way (by half the budget; a SQLite file is read
inline); appends never wait on the database. The orders are then decided in turn
(the first always) while the deadline leaves time for one more and for answering
the rest; those left get the fallback undecided, degraded ``deadline``, recorded
like any other.

A circuit breaker (one for the feature store, one for the log lookup; its
``BreakerPolicy``) opens after a run of failures in a row or a failure rate
over a sliding window, skips that dependency while open, then lets one call
probe it: recovery needs no restart and no operator, a dead Redis does not cost
every request its full timeout meanwhile, and a flaky one still gives every
answer it can. A failure is what the store raised, or a wait past its own
bound; a caller's budget shorter than that bound running out is not one: the
call it left behind tells the breaker what the store did once it returns (a
store with no bound is judged by the wait).

``score_batch`` amortizes the per-call work over the batch: one program
snapshot, one deadline, one decision-log lookup (``IN`` query) and one hand-off
to the worker thread for all feature calls. The feature store still takes one
round trip per order (each order must see the ones before it in its windows;
one Lua call per order gives that for free). If the deadline ends mid-batch,
the orders whose features did not arrive get the degraded fallback answer, and
so do the orders it leaves no time to decide (``deadline``).
``elapsed_us`` of a batched decision counts from the start of the call.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from riskd.domain.clock import Clock
from riskd.domain.decision import Decision, Reason
from riskd.domain.events import OrderEvent
from riskd.domain.features import FeatureQuery
from riskd.domain.order import Order
from riskd.domain.shop import ShopState
from riskd.dsl.program import Program, RuleResult, RuleStatus
from riskd.engine.breaker import BreakerPolicy, CircuitBreaker, OutageLog
from riskd.engine.catchup import CLOSE_WAIT_S, KEEP_WAIT_S, CatchUp, unread
from riskd.engine.combine import combine
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.flights import Abandoned, Flight, Flights
from riskd.engine.keys import Indexer, observe
from riskd.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidArgumentError,
    RiskdError,
    UnavailableError,
)
from riskd.evidence.log import DecisionLog
from riskd.evidence.records import DecisionRecord
from riskd.evidence.request import same_order
from riskd.features.memory import InProcessFeatureStore
from riskd.features.store import MAX_ORDER_ID_LEN, FeatureStore, Observation, OtherContentError

FALLBACK_RULE_ID = "@fallback"
# degraded marker of a retry's answer while its order's first call still decides it: the
# fallback, not recorded, and not a decision of its own (the first call's is the one)
INFLIGHT = "inflight"
# degraded markers of the decision log: ``EVIDENCE``, it could not be read (a recorded
# decision may have been missed; this one is still logged); ``EVIDENCE_QUEUE``, its queue
# was full: this answer is not logged (review: both were "evidence", the second added
# again, so neither callers nor riskd_degraded_decisions_total told the lost ones apart)
EVIDENCE, EVIDENCE_QUEUE = "evidence", "evidence_queue"
# the dependencies whose outages the log tells (``Scorer.unavailable``)
DEPENDENCIES = ("features", EVIDENCE, EVIDENCE_QUEUE)
# on close, the catch-up's queue is drained this long at most while the store answers
CLOSE_DRAIN_S = 1.0
CLOSE_FLUSH_S = 30.0  # on close, the decision log is flushed this long at most
# the longest ``close`` takes: the flush, then the catch-up's drain, its wait for the order
# in hand and for the database to keep the rest (past that, a spill file, written at once)
CLOSE_MAX_S = CLOSE_FLUSH_S + CLOSE_DRAIN_S + CLOSE_WAIT_S + KEEP_WAIT_S
RULE_ERROR_LOG_EVERY_S = 60.0  # a rule that errors is logged at most this often (per rule id)

_log = logging.getLogger("riskd.engine.scorer")
# what the decision is made from (``deadline``: the rules had no time to run)
_INPUTS = frozenset({"features", "shops", "rules", "deadline"})
# A batch's orders are decided while the time left covers, besides one more decision
# (the mean so far) and ``eval_reserve_s`` (a collection, an order slower than the mean),
# the rest's answers: each order's append to the log (APPEND_S) and, for each order not
# decided, its fallback record (LATE_S). Measured on the 2-core dev machine in batches
# of 200-500 with the shipped rules: 6-12 us per append (up to 35 us while the log's
# writer thread commits), 29-60 us per fallback record.
APPEND_S = 40e-6
LATE_S = 70e-6

Features = dict[FeatureQuery, int]


class RulesLike(Protocol):
    """``riskd.dsl.holder.ProgramHolder``: the program in force now (hot-reloaded)."""

    @property
    def current(self) -> Program: ...


class ShopDirectory(Protocol):
    """Shop enforcement state, cached (``riskd.ledger.LedgerShopDirectory``)."""

    def get(self, shop_id: str) -> ShopState: ...


class Scorer:
    """Rules + features + shop state → ``Decision``, recorded in the decision log.

    Args:
        rules: holder of the current compiled program.
        features: the velocity feature store (in-process or Redis).
        log: the decision log (evidence); it encrypts PII if it has a Vault.
        indexer: blind indexer for the order's identities.
        shops: enforcement state per shop; without one every shop is in good standing.
        clock: time for ``decided_at``, windows and deadlines.
        fallback: what to answer when a dependency is unavailable.
        eval_reserve_s: part of a deadline kept back for the rules and the log, per order
            (at most half the budget).
        breaker: when the feature store's and the log lookup's circuit breakers open,
            and for how long (default ``BreakerPolicy()``).
        workers: threads that run deadline-bounded feature calls.
        feature_timeout_s: the longest one feature store call can take (its socket
            timeout); calls run inline while the budget left covers it.
        record_late: False in a scoring worker: a call whose decisions are not appended
            to the log by its deadline (decided late, or the log's queue full until then)
            records none of them and raises ``DeadlineExceededError`` (the gRPC process
            has answered that call with the fallback, and records that).
        spill_dir: the data folder: where the catch-up's ``close`` writes what the log's
            database could not keep, for the next start (``CatchUp``); without one,
            those orders are dropped.
    """

    def __init__(
        self,
        rules: RulesLike,
        features: FeatureStore,
        log: DecisionLog,
        indexer: Indexer,
        *,
        shops: ShopDirectory | None = None,
        clock: Clock,
        fallback: FallbackPolicy,
        eval_reserve_s: float = 0.002,
        breaker: BreakerPolicy | None = None,
        workers: int = 16,
        feature_timeout_s: float | None = None,
        record_late: bool = True,
        spill_dir: Path | None = None,
    ) -> None:
        self._rules = rules
        self._record_late = record_late
        self._features = features
        self._inline = isinstance(features, InProcessFeatureStore)
        self._call_bound = feature_timeout_s
        self._log = log
        self._indexer = indexer
        self._shops = shops
        self._clock = clock
        self._fallback = fallback
        self._reserve = eval_reserve_s
        policy = breaker or BreakerPolicy()
        self.breaker = CircuitBreaker(clock, policy, name="features")
        self._remote_log = log.db.dialect != "sqlite"  # a local file is never slow to read
        self.log_breaker = CircuitBreaker(clock, policy, name="evidence")
        self._open_s = policy.open_s
        # the log's ``committed`` when its lookups last failed, and when a lookup was last
        # refused by its open circuit (``_log_answered``)
        self._commits_at_failure = 0
        self._lookup_refused_at = -float("inf")
        # appends refused (the queue full, or the log closed), in the log once per outage
        self.log_room = OutageLog("evidence_queue", clock, quiet_s=policy.open_s)
        # the writer's commits end that outage too: with no request, nothing else would
        log.add_commit_hook(self.log_room.up)
        self._flights = Flights[Decision]()
        self._rule_error_logged: dict[str, float] = {}  # rule id -> when last logged
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "riskd-features")
        # the remote log's lookups have threads of their own: feature calls left on a hung
        # Redis hold theirs until its socket timeout, and lookups queued behind them timed
        # out, blaming (and opening the breaker of) a healthy database
        self._lookups = concurrent.futures.ThreadPoolExecutor(workers, "riskd-log-lookup")
        # orders answered without their features, counted afterwards (``catchup``); what an
        # earlier process left queued at its close is taken from the log's database (and
        # the spill files of those whose database could not keep it)
        self.catch_up = CatchUp(
            features, indexer, self.breaker, clock, keep=log.db, spill_dir=spill_dir
        )
        self.catch_up.restore(rules.current.feature_queries)

    # -- public API ----------------------------------------------------------

    def score(self, order: Order, *, timeout_s: float | None = None) -> Decision:
        """The decision for ``order`` (the recorded one if it was scored before).

        Raises:
            InvalidArgumentError: no order id, or a negative total (nothing is counted).
        """
        _check(order, "order")
        return self._run((order,), timeout_s, unary=True)[0]

    def score_batch(
        self,
        orders: Sequence[Order],
        *,
        timeout_s: float | None = None,
        refuse_late: bool = False,
        at: float | None = None,
    ) -> list[Decision]:
        """Decisions for ``orders``, in order, under one deadline and one program version.
        Errors name an order as ``orders[i]`` (a batch of one too, as a caller's
        ``ScoreBatch`` sent it; ``score`` names it ``order``). Every order is stamped
        ``at`` (clock seconds; default now): a scoring worker is given its batch's time,
        so that the parts of one batch carry one time, as in one process.

        An order id that appears twice gets the same decision twice (the second one
        marked ``replayed``); so does an order scored before. With ``refuse_late`` (a
        caller's ``ScoreBatch``), a batch whose ``timeout_s`` does not cover even
        answering its orders by the fallback (``answer_time_s``) is refused first: its
        caller would be gone before the answer (a fallback with no time at all, as the
        scoring workers' gRPC process asks for one, is answered however late).

        Raises:
            DeadlineExceededError: ``refuse_late`` and no time to answer: nothing is
                scored, counted or recorded.
            InvalidArgumentError: for the first bad order, before any order is counted.
            AlreadyExistsError: an order id was scored (before, or earlier in this
                batch) for other order content; before any order is counted, except
                when that other content is being scored right now by another call, or
                was by another replica whose decision is not in the shared log yet (the
                feature store's content claim refuses it: the orders of this batch
                before it are counted then).
        """
        for i, order in enumerate(orders):
            _check(order, f"orders[{i}]")
        if refuse_late and timeout_s is not None:
            self.refuse_if_late(orders, timeout_s)
        return self._run(orders, timeout_s, at=at)

    def _run(
        self,
        orders: Sequence[Order],
        timeout_s: float | None,
        *,
        unary: bool = False,
        at: float | None = None,
    ) -> list[Decision]:
        """Score ``orders`` (checked) under one deadline from now, stamped ``at``."""
        started = self._clock.monotonic()
        deadline = None if timeout_s is None else started + max(0.0, timeout_s)
        return _Batch(self, orders, deadline, started, unary=unary, at=at).run()

    def refuse_if_late(self, orders: Sequence[Order], timeout_s: float) -> None:
        """Refuse a batch that ``timeout_s`` cannot answer: under ``answer_time_s`` of its
        distinct orders (a single order never: it is always decided).

        Raises:
            DeadlineExceededError: no time to answer; nothing was scored.
        """
        if len(orders) <= 1:
            return
        if max(timeout_s, 0.0) < self.answer_time_s(len({o.order_id for o in orders})):
            raise DeadlineExceededError(
                "the call's deadline leaves no time to answer its orders; nothing was scored"
            )

    def answer_time_s(self, orders: int) -> float:
        """The least time a batch of ``orders`` (distinct ids) takes to answer, every order
        but the first (always decided) by the fallback undecided: a fallback record and
        an append per order (``LATE_S``, ``APPEND_S``). 0 for a single order."""
        return 0.0 if orders <= 1 else orders * (LATE_S + APPEND_S)

    def features_down(self, answers: Callable[[], bool]) -> None:
        """The feature store did not answer at start (the caller logged it): an outage,
        whose end is logged and metered as any other's, by the first call that answers,
        or by ``answers`` (a ping of every shard), asked in the background every second
        while no request comes (``CircuitBreaker.down``, ``CatchUp.await_store``)."""
        self.breaker.down()
        self.catch_up.await_store(answers)

    def unavailable(self) -> tuple[str, ...]:
        """The ``DEPENDENCIES`` in an outage now, as the log tells them: from the warning
        (or ``redis does not answer at start``) to ``dependency answers again``."""
        self._log_answered()
        on = (self.breaker.outage, self.log_breaker.outage, self.log_room.outage)
        return tuple(name for name, down in zip(DEPENDENCIES, on, strict=True) if down)

    def _log_answered(self) -> None:
        """With no request asking the log's lookups for a whole ``open_s``, their open
        circuit takes the log's writer having committed since they last failed (the same
        database answered) as its probe's answer, and closes; the outage then ends a
        window later, at a scrape, as any other. Nothing is asked of the database here
        (review: an idle replica kept telling a PostgreSQL outage, gauge 1 twenty seconds
        after its return and no "answers again", until a request came)."""
        if not self.log_breaker.is_open or self._log.committed <= self._commits_at_failure:
            return
        if self._clock.monotonic() - self._lookup_refused_at < self._open_s:
            return  # requests come: one of them probes
        if self.log_breaker.allow():
            self.log_breaker.success()

    def report_outcome(self, event: OrderEvent) -> None:
        """Append what happened to an order later (a label) to the evidence log."""
        self._log.append_event(event)

    def close(self, timeout_s: float = CLOSE_FLUSH_S) -> None:
        """Stop the feature workers, flush the evidence log (it stays open), then count
        what the catch-up can in ``CLOSE_DRAIN_S`` and keep the rest in the log's database
        for the next start (the decisions first: review, a held database kept them
        waiting behind the catch-up's rows). A flush that timed out on the database sends
        the catch-up to its spill file at once; one that timed out on the log writer's own
        bug does not (review: the database answered, yet a shared PostgreSQL's rows went
        to one host's data folder), so the catch-up keeps to the database as always."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._lookups.shutdown(wait=False, cancel_futures=True)
        failed: Exception | None = None
        try:
            self._log.flush(timeout_s)
        except Exception as e:  # its timeout: the database, mostly, and then the catch-up
            failed = None if self._log.failing_on_a_bug else e  # spills first
            raise
        finally:  # a flush that timed out must not leave the catch-up using the store
            self.catch_up.close(drain_s=CLOSE_DRAIN_S, keep_failed=failed)

    # -- pieces the batch uses -------------------------------------------------

    def _left(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - self._clock.monotonic())

    def _recorded(
        self, order_ids: Sequence[str], budget: float | None
    ) -> tuple[dict[str, DecisionRecord], bool]:
        """Logged decisions by order id; the flag is False when the log could not say.

        Decisions still queued in this process are always found; the SQL lookup
        of the rest is bounded by half the budget when the log is remote, and
        skipped while its breaker is open (store idempotency still holds).
        """
        found = self._log.queued(order_ids)
        rest = [oid for oid in order_ids if oid not in found]
        if not rest:
            return found, True
        if self._remote_log and budget is not None and budget <= 0:
            return found, False  # no time to ask: not a failure of the log (no breaker)
        if not self.log_breaker.allow():
            self._lookup_refused_at = self._clock.monotonic()
            return found, False
        try:
            if budget is None or not self._remote_log:
                records = self._log.get_many(rest)
            else:
                job = self._lookups.submit(self._log.get_many, rest)
                records = job.result(timeout=budget / 2)
        except Exception as e:  # down or slow: score anyway, the store counts each order once
            self._commits_at_failure = self._log.committed
            self.log_breaker.failure(e)
            return found, False
        self.log_breaker.success()
        found.update(records)
        return found, True

    def _read_features(
        self,
        observations: Iterable[Observation],
        n: int,
        queries: Collection[FeatureQuery],
        deadline: float | None,
    ) -> list[Features | None]:
        """Record each of the ``n`` orders and read its features; None for those the store
        did not answer (``observations`` may be made as they are reached).

        A wait on a pool thread that runs out is the caller's own budget running out
        (a budget that covers the store's bound runs inline), not a failure of the
        store: the call left behind tells the breaker what the store did once it
        returns (``_judge``). A store that declares no bound is judged by the wait.
        """
        now, budget = 0.0, None
        if deadline is not None:
            now = self._clock.monotonic()
            left = deadline - now
            budget = left - min(self._reserve * n, max(left, 0.0) / 2)  # the rules, the log
        if not n or (budget is not None and budget <= 0) or not self.breaker.allow():
            return [None] * n
        got: list[Features] = []
        stop = threading.Event()
        bound = self._call_bound
        try:
            if budget is None:
                _record_all(self._features, observations, queries, got, stop)
            elif self._inline:  # never blocks on I/O: a call starts while the budget lasts
                self._record_inline(observations, queries, got, now + budget)
            elif bound is not None and budget >= bound:
                self._record_inline(observations, queries, got, now + budget - bound)
            elif not self._wait(observations, queries, got, stop, budget):
                return _padded(got, n)  # judged once the call left behind returns
        except OtherContentError:  # the store answered: another replica's content claims it
            stop.set()
            self.breaker.success()
            raise
        except (UnavailableError, TimeoutError) as e:
            stop.set()
            self.breaker.failure(e)
        except BaseException as e:
            stop.set()
            self.breaker.failure(e)
            raise
        else:
            self.breaker.success()
        return _padded(got, n)

    def _wait(
        self,
        observations: Iterable[Observation],
        queries: Collection[FeatureQuery],
        out: list[Features],
        stop: threading.Event,
        budget: float,
    ) -> bool:
        """Record and read on a pool thread, waiting at most ``budget``: False when the
        budget ran out first (the job is told to stop, and ``_judge``d when it ends).

        Raises:
            TimeoutError: the budget ran out and the store declares no bound, so the
                wait is all that is known of it (a hung store opens the breaker).
        """
        job = self._pool.submit(_record_all, self._features, observations, queries, out, stop)
        try:
            job.result(timeout=budget)
        except TimeoutError:
            stop.set()
            if self._call_bound is None:
                raise
            job.cancel()  # not started yet: it never will be
            job.add_done_callback(lambda done: self._judge(done, out))
            return False
        return True

    def _judge(self, job: concurrent.futures.Future[None], out: Sequence[Features]) -> None:
        """Tell the breaker what the store did for a job its caller stopped waiting for
        (on the pool thread, as the job ends): the call in progress then failed or
        answered; a job stopped before it asked the store gives a probe back."""
        if job.cancelled():
            self.breaker.release()
            return
        error = job.exception()
        if isinstance(error, OtherContentError) or (error is None and out):
            self.breaker.success()  # answered (a refusal of other content is an answer)
        elif error is not None:
            self.breaker.failure(error)
        else:
            self.breaker.release()

    def _record_inline(
        self,
        observations: Iterable[Observation],
        queries: Collection[FeatureQuery],
        out: list[Features],
        last_start: float,
    ) -> None:
        """Record and read on this thread; start a call only until ``last_start``
        (monotonic): the feature calls' deadline less one call's bound, as a call
        returns (or times out) within its bound. The first call is always made.
        """
        record = self._features.record_and_read
        for obs in observations:
            if out and self._clock.monotonic() > last_start:
                return
            out.append(record(obs, queries))

    def _shop(self, shop_id: str, missing: list[str]) -> ShopState:
        if self._shops is None:
            return ShopState(shop_id)
        try:
            return self._shops.get(shop_id)
        except RiskdError:
            missing.append("shops")
            return ShopState(shop_id)

    def _decide(
        self,
        order: Order,
        features: Features | None,
        ctx: _Context,
        request: dict[str, Any] | None = None,
    ) -> DecisionRecord:
        """Evaluate, combine and fall back if degraded: the decision, as its log record
        (``request``: the order's protected form, when the observation made it already)."""
        missing: list[str] = list(ctx.missing)
        shop = self._shop(order.shop_id, missing)
        if features is None:
            missing.append("features")
        try:
            results = _evaluate(ctx.program, order, shop, features or {}, ctx.now)
        except Exception as exc:  # a bug in the program, not one rule: answer by the fallback
            # the type only: an exception's text may quote the order's data
            fields = {"error_type": type(exc).__name__, "rules_version": ctx.program.version}
            _log.error("rule program failed; answered by the fallback", extra={"fields": fields})
            missing.append("rules")
            results = ()
        decision = self._decision(order, ctx, results, missing)
        return DecisionRecord(
            decision=decision,
            request=self._log.protect(order) if request is None else request,
            features=_named(features) if features else {},
            rules=results,
        )

    def _late(
        self,
        order: Order,
        features: Features | None,
        ctx: _Context,
        request: dict[str, Any] | None = None,
    ) -> DecisionRecord:
        """For an order the call's deadline left no time to decide: the fallback, degraded
        ``deadline`` (and ``features`` when they were not read), with no rule results,
        recorded as any decision (its features, read, were counted; a retry replays it)."""
        missing = list(ctx.missing)
        if features is None:
            missing.append("features")
        missing.append("deadline")
        return DecisionRecord(
            decision=self._decision(order, ctx, (), missing),
            request=self._log.protect(order) if request is None else request,
            features=_named(features) if features else {},
            rules=(),
        )

    def _append(
        self, decided: Sequence[tuple[Order, Observation | None, DecisionRecord]], ctx: _Context
    ) -> list[Decision]:
        """Append the records to the log; the decisions as answered (``unlogged`` when
        the log's queue stayed full: answered anyway, a retry re-scores but never
        re-counts; one wait per call, not one per order).

        In one process each record is appended in turn (the queue takes what fits). In a
        scoring worker (``record_late`` off) they are appended all or none, by the deadline.

        Raises:
            DeadlineExceededError: ``record_late`` is off and the deadline came before
                the records were appended (none are).
        """
        if self._record_late:
            out: list[Decision] = []
            for order, obs, record in decided:
                try:
                    if ctx.log_full:
                        raise UnavailableError("decision log queue is full")
                    self._log.append(record, order=order, digests=_keys(obs))
                except UnavailableError as e:
                    if not ctx.log_full:
                        self.log_room.down(e)
                    ctx.log_full = True
                    out.append(_unlogged(record.decision))
                    continue
                self.log_room.up()
                out.append(record.decision)
            return out
        until = ctx.deadline
        wait_s = None if until is None else until - self._clock.monotonic()
        if wait_s is not None and wait_s <= 0:
            raise DeadlineExceededError("decided after the call's deadline; nothing recorded")
        try:
            if ctx.log_full:
                raise UnavailableError("decision log queue is full")
            self._log.append_all(((r, o, _keys(obs)) for o, obs, r in decided), wait_s=wait_s)
        except UnavailableError as e:
            if not ctx.log_full:
                self.log_room.down(e)
            if until is not None and self._clock.monotonic() >= until:
                raise DeadlineExceededError(
                    "the decision log had no room before the call's deadline; nothing recorded"
                ) from None
            ctx.log_full = True
            return [_unlogged(r.decision) for _, _, r in decided]
        self.log_room.up()
        return [r.decision for _, _, r in decided]

    def _decision(
        self, order: Order, ctx: _Context, results: Sequence[RuleResult], missing: list[str]
    ) -> Decision:
        verdict = combine(results)
        outcome, reasons = verdict.outcome, verdict.reasons
        error = RuleStatus.ERROR  # bound once: an Enum member lookup per result is ~60 ns
        errors = tuple([r.rule_id for r in results if r.status is error])
        if errors:
            self._log_rule_errors(results, ctx.program.version)
        if any(m in _INPUTS for m in missing):  # the log alone missing leaves the answer whole
            fallback = self._fallback_reason(order)
            outcome = max(outcome, fallback.action)
            reasons = (*reasons, fallback)
        return Decision(
            order_id=order.order_id,
            outcome=outcome,
            score=verdict.score,
            reasons=reasons,
            rules_version=ctx.program.version,
            model_versions={},
            degraded=tuple(missing),
            elapsed_us=int((self._clock.monotonic() - ctx.started) * 1e6),
            decided_at=ctx.now,
            rule_errors=errors,
        )

    def _log_rule_errors(self, results: Sequence[RuleResult], version: str) -> None:
        """Log each rule that errored, at most once per ``RULE_ERROR_LOG_EVERY_S`` per rule.

        A rule that errors on every order never enforces; the decision log has each
        error, this says it where operators look (``riskd_rule_errors_total`` counts).
        The message is the rule's error, which never quotes a value (see ``riskd.dsl``).
        """
        now = self._clock.monotonic()
        for r in results:
            if r.status is not RuleStatus.ERROR:
                continue
            last = self._rule_error_logged.get(r.rule_id)
            if last is not None and now - last < RULE_ERROR_LOG_EVERY_S:
                continue
            self._rule_error_logged[r.rule_id] = now
            fields = {"rule_id": r.rule_id, "rules_version": version, "error": r.error}
            _log.warning("rule failed on an order", extra={"fields": fields})

    def _fallback_reason(self, order: Order) -> Reason:
        answer = self._fallback.decide(order)
        line = f"fallback scenario {answer.scenario} tier {answer.tier}: {answer.outcome.name}"
        return Reason(FALLBACK_RULE_ID, "DEGRADED_FALLBACK", answer.outcome, 0.0, (line,))

    def _unrecorded(self, order: Order, ctx: _Context) -> Decision:
        """For a follower whose leader overran the deadline: the fallback answer, not logged."""
        return self._inflight(order, ctx.program.version, ctx.started, ctx.now)

    def inflight(self, order: Order, started: float, at: float | None = None) -> Decision:
        """The answer for a retry of ``order`` whose first call (another process's, in
        worker mode) is still deciding it when the retry's time is up: the fallback,
        degraded ``inflight`` and not logged (that first call's decision is the one
        recorded). ``started``: when the retry's call began (monotonic); ``at``: its
        time (clock seconds; a batch's one time, as ``score_batch``'s; default now)."""
        now = self._clock.now() if at is None else at
        return self._inflight(order, self._rules.current.version, started, now)

    def _inflight(self, order: Order, version: str, started: float, now: float) -> Decision:
        reason = self._fallback_reason(order)
        return Decision(
            order.order_id,
            reason.action,
            0.0,
            (reason,),
            version,
            {},
            (INFLIGHT,),
            int((self._clock.monotonic() - started) * 1e6),
            now,
            unlogged=True,
        )


class _Context:
    """What every order of one call shares."""

    __slots__ = ("deadline", "log_full", "missing", "now", "program", "started")

    def __init__(self, program: Program, deadline: float | None, started: float, now: float):
        self.program = program
        self.deadline = deadline
        self.started = started
        self.now = now
        self.missing: tuple[str, ...] = ()
        self.log_full = False  # the decision log refused an append in this call


class _Batch:
    """One ``score_batch`` call: lead or follow each order's flight, decide the led ones."""

    def __init__(
        self,
        scorer: Scorer,
        orders: Sequence[Order],
        deadline: float | None,
        started: float,
        *,
        unary: bool = False,
        at: float | None = None,
    ) -> None:
        self.s = scorer
        self.orders = orders
        self.unary = unary  # ``score``'s: its order is named ``order``, not ``orders[0]``
        now = scorer._clock.now() if at is None else at
        self.ctx = _Context(scorer._rules.current, deadline, started, now)
        self.out: list[Decision | None] = [None] * len(orders)
        self.first: dict[str, int] = {}  # order id -> index of its first occurrence
        self.led: list[tuple[int, Flight[Decision]]] = []
        self.followed: list[tuple[int, Flight[Decision]]] = []
        # order index -> its protected form, made with its observation (the content tag)
        # and reused for its record
        self.requests: dict[int, dict[str, Any]] = {}

    def run(self) -> list[Decision]:
        refuse_changed_duplicates(self.orders, self.s._log.protect)  # before any flight
        for i, order in enumerate(self.orders):
            if order.order_id in self.first:
                continue
            self.first[order.order_id] = i
            leader, flight = self.s._flights.join(order.order_id)
            (self.led if leader else self.followed).append((i, flight))
        try:
            self._lead()
        except BaseException as e:
            # followers of the orders not decided get the same error, but not a refusal
            # of another order's content: theirs may be fine, so they score it themselves
            passed_on = Abandoned() if isinstance(e, AlreadyExistsError) else e
            for i, flight in self.led:
                # landed first: an abandoned follower that leads again must find no flight
                self.s._flights.land(self.orders[i].order_id, flight)
                if not flight.done.is_set():
                    flight.finish(None, passed_on)
            raise
        finally:
            for i, flight in self.led:
                self.s._flights.land(self.orders[i].order_id, flight)
        for i, flight in self.followed:
            try:
                decision = flight.wait(self.s._left(self.ctx.deadline))
            except Abandoned:  # its leader was refused for another order: lead it here
                again = _Batch(self.s, (self.orders[i],), self.ctx.deadline, self.ctx.started)
                try:
                    self.out[i] = again.run()[0]
                except AlreadyExistsError:  # named as this call's entry, not ``order``
                    raise self._other_content(i) from None
                continue
            if decision is None:
                self.out[i] = self.s._unrecorded(self.orders[i], self.ctx)
                continue
            if flight.request is not None:
                self._same(i, flight.request)
            self.out[i] = decision if decision.replayed else replace(decision, replayed=True)
        return [self._answer(i, o) for i, o in enumerate(self.orders)]

    def _answer(self, i: int, order: Order) -> Decision:
        decision = self.out[i]
        if decision is None:  # a later entry of an order id: its first entry's answer
            first = self.out[self.first[order.order_id]]
            assert first is not None
            return first if first.replayed else replace(first, replayed=True)
        return decision

    def _same(self, i: int, request: Mapping[str, Any]) -> None:
        """Refuse order ``i`` if ``request`` (what its id was scored for) is other content."""
        if not same_order(self.s._log.protect(self.orders[i]), request):
            raise self._other_content(i)

    def _other_content(self, i: int) -> AlreadyExistsError:
        return scored_for_other_content("order" if self.unary else f"orders[{i}]")

    def _lead(self) -> None:
        ids = [self.orders[i].order_id for i, _ in self.led]
        known, log_ok = self.s._recorded(ids, self.s._left(self.ctx.deadline))
        self.ctx.missing = () if log_ok else (EVIDENCE,)
        todo: list[tuple[int, Flight[Decision]]] = []
        replays: list[tuple[int, Flight[Decision], DecisionRecord]] = []
        for i, flight in self.led:
            record = known.get(self.orders[i].order_id)
            if record is None:
                todo.append((i, flight))
            else:
                self._same(i, record.request)  # every one checked before any is answered
                replays.append((i, flight, record))
        for i, flight, record in replays:
            self.out[i] = replace(record.decision, replayed=True)
            flight.finish(self.out[i], request=record.request)
        # answered without its features the first time: maybe never counted (``catchup``)
        missed = [
            (self.orders[i], r.decision.decided_at) for i, _, r in replays if unread(r.decision)
        ]
        # the orders are observed (blind indexes) as the feature calls reach them, and read
        # while what is left still answers every one of them undecided (a single order's,
        # the reserve covers): an order read is counted in its windows, decided or not
        deadline, n = self.ctx.deadline, len(todo)
        until = None if deadline is None else deadline - (n - 1) * (LATE_S + APPEND_S)
        made: list[Observation] = []
        try:
            features = self.s._read_features(
                self._observing(todo, made), n, self.ctx.program.feature_queries, until
            )
        except OtherContentError:  # the store refused the last order observed (others before
            # it in this batch are counted: README, "Running several processes")
            raise self._other_content(todo[len(made) - 1][0]) from None
        # a job left behind may still add to ``made``: what it has now
        observed: list[Observation | None] = [*made[:n]]
        observed += [None] * (n - len(observed))
        decided: list[tuple[int, Flight[Decision], Observation | None, DecisionRecord]] = []
        try:
            self._decide_all(todo, observed, features, decided)
        except BaseException:
            # what was decided before the failure is kept (in a worker past its deadline
            # nothing is, and the failure itself is what the caller and the log see)
            with contextlib.suppress(DeadlineExceededError):
                self._record(decided)
            raise
        self._record(decided)
        missed += [
            (self.orders[i], record.decision.decided_at)
            for i, _, _, record in decided
            if unread(record.decision)
        ]
        if missed:
            self.s.catch_up.submit(missed, self.ctx.program.feature_queries)

    def _observing(
        self, todo: Sequence[tuple[int, Flight[Decision]]], made: list[Observation]
    ) -> Iterator[Observation]:
        """Each order's observation (blind indexes: 50-100 us an order) as the feature calls
        reach it, kept in ``made``: one the deadline leaves unread is never made (review:
        made first, 500 orders' took a 150 ms batch's whole feature window, none read)."""
        indexer, now, protect = self.s._indexer, self.ctx.now, self.s._log.protect
        for i, _ in todo:
            request = self.requests[i] = protect(self.orders[i])
            obs = observe(self.orders[i], indexer, now, request)
            made.append(obs)
            yield obs

    def _decide_all(
        self,
        todo: Sequence[tuple[int, Flight[Decision]]],
        observations: Sequence[Observation | None],
        features: Sequence[Features | None],
        decided: list[tuple[int, Flight[Decision], Observation | None, DecisionRecord]],
    ) -> None:
        """Decide the orders in turn, into ``decided``: the first always (a single order as
        before: no clock read), each next one while the deadline leaves time for it (as
        long as the mean so far or the last one, whichever is longer: an order decided
        later sees more of the batch in its windows, hits more rules and costs more to
        explain; and a reserve) and to answer and append the rest; the orders after
        that get the fallback undecided (``Scorer._late``). One clock read per order
        decided."""
        s, ctx, orders = self.s, self.ctx, self.orders
        n, late = len(todo), False
        timed = ctx.deadline is not None and n > 1
        begun = last = s._clock.monotonic() if timed else 0.0
        # the appends of all n orders come after the loop; a late answer costs LATE_S more
        stop_at = 0.0 if ctx.deadline is None else ctx.deadline - s._reserve - n * APPEND_S
        rows = zip(todo, observations, features, strict=True)
        for k, ((i, flight), obs, values) in enumerate(rows):
            if k and timed and not late:
                now = s._clock.monotonic()
                step = max((now - begun) / k, now - last)
                late, last = now + step + (n - k) * LATE_S > stop_at, now
            request = self.requests.get(i)
            record = (s._late if late else s._decide)(orders[i], values, ctx, request)
            decided.append((i, flight, obs, record))

    def _record(
        self, decided: Sequence[tuple[int, Flight[Decision], Observation | None, DecisionRecord]]
    ) -> None:
        """Append the decisions (``Scorer._append``: in a scoring worker all or none) and
        answer their flights."""
        if not decided:
            return
        answers = self.s._append([(self.orders[i], obs, r) for i, _, obs, r in decided], self.ctx)
        for (i, flight, _, record), decision in zip(decided, answers, strict=True):
            self.out[i] = decision
            flight.finish(decision, request=record.request)


def _unlogged(decision: Decision) -> Decision:
    """``decision`` as answered when the log did not take it."""
    return replace(decision, degraded=(*decision.degraded, EVIDENCE_QUEUE), unlogged=True)


def scored_for_other_content(where: str) -> AlreadyExistsError:
    """The refusal of a retry whose order (``where``: ``order``, ``orders[i]``) has the id of
    one scored for other content (its protected form differs: ``same_order``)."""
    return AlreadyExistsError(
        f"{where}.order_id: this order id was scored for other order content;"
        " a retry must send the same order"
    )


def refuse_changed_duplicates(orders: Sequence[Order], protect: Callable[[Order], Any]) -> None:
    """Raise ``AlreadyExistsError`` if an order id appears twice in ``orders`` with other
    content (``protect``: the decision log's form of an order, PII masked, compared by
    ``same_order`` when the two orders are not equal outright). The scoring workers'
    server process calls it before it splits a batch."""
    first: dict[str, int] = {}
    for i, order in enumerate(orders):
        j = first.setdefault(order.order_id, i)
        if j != i and order != orders[j] and not same_order(protect(order), protect(orders[j])):
            raise AlreadyExistsError(
                f"orders[{i}].order_id: this order id is earlier in the batch with other"
                " order content; a retry must send the same order"
            )


def _keys(obs: Observation | None) -> Mapping[str, str] | None:
    """An observation's blind indexes, for the log to reuse (None: not observed in time)."""
    return None if obs is None else obs.keys


def _padded(got: Sequence[Features], n: int) -> list[Features | None]:
    """The first ``n`` answers (a job left behind may still add to ``got``), None after."""
    answered: list[Features | None] = list(got[:n])
    return answered + [None] * (n - len(answered))


def _record_all(
    store: FeatureStore,
    observations: Iterable[Observation],
    queries: Collection[FeatureQuery],
    out: list[Features],
    stop: threading.Event,
) -> None:
    """Record and read each observation in turn, until done or told to stop (deadline)."""
    for obs in observations:
        if stop.is_set():
            return
        out.append(store.record_and_read(obs, queries))


def _evaluate(
    program: Program, order: Order, shop: ShopState, features: Features, now: float
) -> tuple[RuleResult, ...]:
    """Every rule's result, hits explained.

    Most orders hit no rule: run untraced, then trace only the rules that hit
    (the program is deterministic, so the traced run agrees with the first).
    """
    results = program.evaluate(order, shop, features, now)
    hit = RuleStatus.HIT
    if [r for r in results if r.status is hit]:
        return program.explain(order, shop, features, now, results)
    return results


_NAMES: dict[FeatureQuery, str] = {}  # every query is one of a few hundred: never pruned


def _named(features: Features) -> dict[str, int]:
    """Feature values by ``FeatureQuery.name`` (each name built once per query, not per order)."""
    names = _NAMES
    try:
        return {names[q]: v for q, v in features.items()}
    except KeyError:
        for q in features:
            names.setdefault(q, q.name)
        return {names[q]: v for q, v in features.items()}


def _check(order: Order, where: str) -> None:
    """What the scorer itself relies on (the service validates the rest first)."""
    if not order.order_id:
        raise InvalidArgumentError(f"{where}.order_id", "is required")
    if len(order.order_id) > MAX_ORDER_ID_LEN:
        raise InvalidArgumentError(f"{where}.order_id", f"is longer than {MAX_ORDER_ID_LEN}")
    if not order.order_id.isprintable():
        raise InvalidArgumentError(f"{where}.order_id", "must not contain control characters")
    if order.amounts.total < 0:
        raise InvalidArgumentError(f"{where}.amounts.total", "must not be negative")
