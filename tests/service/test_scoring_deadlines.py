"""ScoreBatch keeps back time for its reply by the size of the batch, and gives the scorer
what is left of the caller's deadline once the request is converted (review: 2 ms for
any batch, and the conversion of hundreds of orders not counted: the client got
``DEADLINE_EXCEEDED`` while the server recorded every decision)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from riskd.domain.clock import Clock, FakeClock, SystemClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.order import Order
from riskd.errors import DeadlineExceededError
from riskd.service import convert
from riskd.service.gen.riskd.v1 import scoring_pb2
from riskd.service.metrics import Metrics
from riskd.service.scoring import REPLY_MARGIN_PER_DECISION_S, ScoringServicer
from tests.service.sample import full_order

MIN_COST_PER_DECISION_S = 10e-6  # converting a decision with no reason, measured


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


class BudgetScorer:
    """Answers every order at once and keeps the budget it was given."""

    def __init__(self) -> None:
        self.budgets: list[float | None] = []
        self.refused_late: list[bool] = []  # each batch's refuse_late

    def score(self, order: Order, *, timeout_s: float | None = None) -> Decision:
        return self.score_batch((order,), timeout_s=timeout_s)[0]

    def score_batch(
        self,
        orders: Sequence[Order],
        *,
        timeout_s: float | None = None,
        refuse_late: bool = False,
        at: float | None = None,
    ) -> list[Decision]:
        self.budgets.append(timeout_s)
        self.refused_late.append(refuse_late)
        return [Decision(o.order_id, Outcome.ALLOW, 0.0, (), "v1") for o in orders]


def servicer(scorer: BudgetScorer, clock: Clock | None = None) -> ScoringServicer:
    return ScoringServicer(
        scorer,  # type: ignore[arg-type]
        Metrics(),
        clock or SystemClock(),
        default_deadline_s=0.2,
        max_batch=500,
    )


def batch_request(n: int) -> scoring_pb2.ScoreBatchRequest:
    base = full_order()
    orders = [dataclasses.replace(base, order_id=f"o-{i}") for i in range(n)]
    return scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in orders])


def test_a_batch_keeps_back_time_for_each_decision_of_its_reply() -> None:
    scorer = BudgetScorer()
    reply = servicer(scorer).ScoreBatch(batch_request(300), _Context(0.3))  # type: ignore[arg-type]
    assert len(reply.decisions) == 300
    (budget,) = scorer.budgets
    assert budget is not None
    # less than the deadline less 2 ms for the reply (and less the request's conversion)
    assert budget < 0.3 - 0.002 - 299 * MIN_COST_PER_DECISION_S


class SteppingClock(FakeClock):
    """A monotonic clock that moves ``step`` seconds on each read (the request's conversion)."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step

    def monotonic(self) -> float:
        now = super().monotonic()
        self.advance(self.step)
        return now


def test_a_batch_gives_the_scorer_what_is_left_once_its_request_is_converted() -> None:
    """The time spent between the call's arrival and the scorer (one clock step here) is
    taken from the scorer's budget, and a batch that cannot be answered in time is
    refused rather than answered late (``refuse_late``)."""
    scorer = BudgetScorer()
    servicer(scorer, SteppingClock(0.05)).ScoreBatch(batch_request(3), _Context(0.3))  # type: ignore[arg-type]
    assert scorer.budgets == [pytest.approx(0.3 - 0.002 - 2 * REPLY_MARGIN_PER_DECISION_S - 0.05)]
    assert scorer.refused_late == [True]


def test_a_unary_score_keeps_its_margin() -> None:
    scorer = BudgetScorer()
    request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(full_order()))
    servicer(scorer).Score(request, _Context(0.3))  # type: ignore[arg-type]
    assert scorer.budgets == [pytest.approx(0.298)]


def test_a_batch_whose_reply_alone_needs_more_than_its_deadline_scores_nothing() -> None:
    scorer = BudgetScorer()
    with pytest.raises(DeadlineExceededError):
        servicer(scorer).ScoreBatch(batch_request(500), _Context(0.005))  # type: ignore[arg-type]
    assert scorer.budgets == []


@pytest.mark.parametrize("remaining", [None, 1e10])  # grpcio: a far-off time for no deadline
def test_a_call_without_a_deadline_keeps_the_replys_fixed_margin_from_the_default(
    remaining: float | None,
) -> None:
    """``deadline_ms`` bounds the answer of a call that sets no deadline (review: it was
    given to the scorer whole, and such answers took the default and then the reply); a
    batch's per-decision margin is not taken from it (second review: full batches at a
    90 ms default were then refused, where a caller with no deadline can wait)."""
    scorer = BudgetScorer()
    request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(full_order()))
    servicer(scorer).Score(request, _Context(remaining))  # type: ignore[arg-type]
    assert scorer.budgets == [pytest.approx(0.198)]
    # a batch's budget (before its orders are converted, which the scorer is not given)
    budget = servicer(scorer)._timeout(_Context(remaining), decisions=500)  # type: ignore[arg-type]
    assert budget == pytest.approx(0.198)


def test_a_default_shorter_than_twice_the_margin_gives_the_scorer_half_of_it() -> None:
    """A tiny ``deadline_ms`` is not eaten whole by the reply's margin."""
    scorer = BudgetScorer()
    tiny = ScoringServicer(
        scorer,  # type: ignore[arg-type]
        Metrics(),
        SystemClock(),
        default_deadline_s=0.003,
        max_batch=500,
    )
    request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(full_order()))
    tiny.Score(request, _Context(None))  # type: ignore[arg-type]
    assert scorer.budgets == [pytest.approx(0.0015)]
