"""The Scorer: one order in, one ``Decision`` out, recorded as evidence.

Where it sits: ``service`` converts a request to an ``Order`` and calls
``score``; the scorer

1. returns the recorded decision if this order was scored before (the
   decision log, which also sees decisions not yet flushed) or is being scored
   right now (singleflight: concurrent retries wait for the first);
2. blind-indexes the order's identities into an ``Observation`` (``keys``);
3. records it and reads every velocity feature the program needs, in one
   call to the feature store, bounded by the caller's deadline and guarded by
   a circuit breaker;
4. runs the current compiled ``Program`` on the order, its features and its
   shop's enforcement state, and combines the results (``combine``);
5. when a dependency was unavailable, marks the decision ``degraded`` with
   what was missing and takes the ``max()`` of the rules that could still run
   and the ``FallbackPolicy``;
6. appends the decision with the feature values and every rule result (shadow
   ones included) to the ``DecisionLog``, whose background writer commits it.

Idempotency: in this process through (1); across replicas the decision log
(shared PostgreSQL) and the feature store's own per-order idempotency (an
order is counted once per order id, whoever records it) keep velocity windows
exact. Two replicas scoring the same new order at the same instant may each
answer; the log keeps the first.

Deadlines: with ``timeout_s`` the feature call runs on a small thread pool and
the scorer waits at most the budget less ``eval_reserve_s`` (kept for the
rules and the log), so a hung Redis cannot hold the answer past the deadline.
Without ``timeout_s`` the call runs inline and the store's own socket timeouts
bound it. After ``breaker_failures`` failures in a row the breaker skips the
feature store for ``breaker_cooldown_s``, then probes it again: recovery needs
no restart and no operator.

``score_batch`` shares one deadline and one program snapshot across the batch
and makes one feature round trip per order (a pipelined multi-order call
would save round trips on Redis, but each order must see the ones before it in
its windows, which one Lua call per order gives for free).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from riskd.domain.clock import Clock
from riskd.domain.decision import Decision, Outcome, Reason
from riskd.domain.events import OrderEvent
from riskd.domain.features import FeatureQuery
from riskd.domain.order import Order
from riskd.domain.shop import ShopState
from riskd.engine.breaker import CircuitBreaker
from riskd.engine.combine import ResultLike, combine, rule_records
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.flights import Flights
from riskd.engine.keys import Indexer, observe
from riskd.errors import InvalidArgumentError, RiskdError, UnavailableError
from riskd.evidence.log import DecisionLog
from riskd.evidence.records import DecisionRecord
from riskd.features.store import FeatureStore, Observation

FALLBACK_RULE_ID = "@fallback"


class ProgramLike(Protocol):
    """``riskd.dsl.Program``: the compiled rules."""

    @property
    def version(self) -> str: ...
    @property
    def feature_queries(self) -> frozenset[FeatureQuery]: ...

    def evaluate(
        self,
        order: Order,
        shop: ShopState,
        features: Mapping[FeatureQuery, int],
        now: float,
        *,
        explain: bool = False,
    ) -> Sequence[ResultLike]: ...


class RulesLike(Protocol):
    """``riskd.dsl.ProgramHolder``: the program in force now (hot-reloaded)."""

    @property
    def current(self) -> ProgramLike: ...


class ShopDirectory(Protocol):
    """Shop enforcement state, cached (``riskd.ledger.LedgerShopDirectory``)."""

    def get(self, shop_id: str) -> ShopState: ...


class Scorer:
    """Rules + features + shop state → ``Decision``, recorded in the decision log.

    Args:
        rules: holder of the current compiled program.
        features: the velocity feature store (in-process or Redis).
        log: the decision log (evidence).
        indexer: blind indexer for the order's identities.
        shops: enforcement state per shop; without one every shop is in good standing.
        clock: time for ``decided_at``, windows and deadlines.
        fallback: what to answer when a dependency is unavailable.
        eval_reserve_s: part of a deadline kept back for the rules and the log.
        breaker_failures, breaker_cooldown_s: the feature store's circuit breaker.
        workers: threads that run deadline-bounded feature calls.
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
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 1.0,
        workers: int = 16,
    ) -> None:
        self._rules = rules
        self._features = features
        self._log = log
        self._indexer = indexer
        self._shops = shops
        self._clock = clock
        self._fallback = fallback
        self._reserve = eval_reserve_s
        self.breaker = CircuitBreaker(
            clock, failures=breaker_failures, cooldown_s=breaker_cooldown_s
        )
        self._flights = Flights()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "riskd-features")

    # -- public API ----------------------------------------------------------

    def score(self, order: Order, *, timeout_s: float | None = None) -> Decision:
        """The decision for ``order`` (the recorded one if it was scored before).

        Raises:
            InvalidArgumentError: the order cannot be observed (e.g. a negative total).
        """
        return self._score_once(order, self._deadline(timeout_s), self._rules.current)

    def score_batch(
        self, orders: Sequence[Order], *, timeout_s: float | None = None
    ) -> list[Decision]:
        """Decisions for ``orders``, in order, under one deadline and one program version."""
        deadline, program = self._deadline(timeout_s), self._rules.current
        return [self._score_once(o, deadline, program) for o in orders]

    def report_outcome(self, event: OrderEvent) -> None:
        """Append what happened to an order later (a label) to the evidence log."""
        self._log.append_event(event)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the feature workers and flush the evidence log (the log stays open)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._log.flush(timeout_s)

    # -- idempotency ---------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float | None:
        return None if timeout_s is None else self._clock.monotonic() + max(0.0, timeout_s)

    def _left(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - self._clock.monotonic())

    def _recorded(self, order_id: str) -> tuple[Decision | None, bool]:
        """The logged decision for ``order_id``; the flag is False when the log could not say."""
        try:
            record = self._log.get(order_id)
        except Exception:  # the log's database is down: score anyway, store idempotency holds
            return None, False
        return (None if record is None else record.decision), True

    def _score_once(self, order: Order, deadline: float | None, program: ProgramLike) -> Decision:
        _check(order)
        known, log_ok = self._recorded(order.order_id)
        if known is not None:
            return known
        leader, flight = self._flights.join(order.order_id)
        if not leader:
            decision = flight.wait(self._left(deadline))
            return decision if decision is not None else self._unrecorded(order, program)
        try:
            known, log_ok = self._recorded(order.order_id)  # finished just before we joined
            decision = known or self._decide_and_log(order, deadline, program, log_ok)
            flight.finish(decision)
            return decision
        except BaseException as e:
            flight.finish(None, e)
            raise
        finally:
            self._flights.land(order.order_id)

    def _unrecorded(self, order: Order, program: ProgramLike) -> Decision:
        """A follower whose leader overran the deadline: the fallback answer, not recorded."""
        answer = self._fallback.decide(order)
        reason = self._fallback_reason(answer.outcome, answer.scenario, answer.tier)
        return Decision(
            order.order_id,
            answer.outcome,
            0.0,
            (reason,),
            program.version,
            {},
            ("inflight",),
            0,
            self._clock.now(),
        )

    # -- one decision --------------------------------------------------------

    def _decide_and_log(
        self, order: Order, deadline: float | None, program: ProgramLike, log_ok: bool
    ) -> Decision:
        started, now = self._clock.monotonic(), self._clock.now()
        missing: list[str] = [] if log_ok else ["evidence"]
        shop = self._shop(order.shop_id, missing)
        obs = observe(order, self._indexer, now)
        features = self._read_features(obs, program.feature_queries, deadline)
        if features is None:
            missing.append("features")
        results = self._evaluate(program, order, shop, features or {}, now, missing)
        decision = self._decision(order, program, results, missing, now)
        record = DecisionRecord(
            decision=decision,
            request=self._log.protect(order),
            features={q.name: v for q, v in (features or {}).items()},
            rules=rule_records(results),
        )
        elapsed = int((self._clock.monotonic() - started) * 1e6)
        record = replace(record, decision=replace(decision, elapsed_us=elapsed))
        try:
            self._log.append(record, order=order)
        except UnavailableError:  # answered anyway; a retry re-scores but never re-counts
            return replace(record.decision, degraded=(*record.decision.degraded, "evidence"))
        return record.decision

    def _shop(self, shop_id: str, missing: list[str]) -> ShopState:
        if self._shops is None:
            return ShopState(shop_id)
        try:
            return self._shops.get(shop_id)
        except RiskdError:
            missing.append("shops")
            return ShopState(shop_id)

    def _evaluate(
        self,
        program: ProgramLike,
        order: Order,
        shop: ShopState,
        features: Mapping[FeatureQuery, int],
        now: float,
        missing: list[str],
    ) -> Sequence[ResultLike]:
        try:
            return program.evaluate(order, shop, features, now, explain=True)
        except Exception:  # a bug in the program, not one rule: still answer, by the fallback
            missing.append("rules")
            return ()

    def _decision(
        self,
        order: Order,
        program: ProgramLike,
        results: Sequence[ResultLike],
        missing: list[str],
        now: float,
    ) -> Decision:
        verdict = combine(results)
        outcome, reasons = verdict.outcome, verdict.reasons
        if missing:
            answer = self._fallback.decide(order)
            outcome = max(outcome, answer.outcome)
            reasons = (
                *reasons,
                self._fallback_reason(answer.outcome, answer.scenario, answer.tier),
            )
        return Decision(
            order_id=order.order_id,
            outcome=outcome,
            score=verdict.score,
            reasons=reasons,
            rules_version=program.version,
            model_versions={},
            degraded=tuple(missing),
            decided_at=now,
        )

    @staticmethod
    def _fallback_reason(outcome: Outcome, scenario: str, tier: int) -> Reason:
        return Reason(
            FALLBACK_RULE_ID,
            "DEGRADED_FALLBACK",
            outcome,
            0.0,
            (f"fallback scenario {scenario} tier {tier}: {outcome.name}",),
        )

    # -- features, bounded ---------------------------------------------------

    def _read_features(
        self, obs: Observation, queries: Collection[FeatureQuery], deadline: float | None
    ) -> dict[FeatureQuery, int] | None:
        """Record the order and read its features; None when the store is unavailable."""
        budget = self._left(deadline)
        if budget is not None:
            budget -= min(self._reserve, budget / 2)
            if budget <= 0:
                return None
        if not self.breaker.allow():
            return None
        try:
            values = self._call_store(obs, queries, budget)
        except (UnavailableError, TimeoutError):
            self.breaker.failure()
            return None
        except BaseException:
            self.breaker.failure()
            raise
        self.breaker.success()
        return values

    def _call_store(
        self, obs: Observation, queries: Collection[FeatureQuery], budget: float | None
    ) -> dict[FeatureQuery, int]:
        if budget is None:
            return self._features.record_and_read(obs, queries)
        future = self._pool.submit(self._features.record_and_read, obs, queries)
        try:
            return future.result(timeout=budget)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("feature store timed out") from None


def _check(order: Order) -> None:
    """What the scorer itself relies on (the service validates the rest first)."""
    if not order.order_id:
        raise InvalidArgumentError("order.order_id", "is required")
    if order.amounts.total < 0:
        raise InvalidArgumentError("order.amounts.total", "must not be negative")
