"""Rule results → outcome, score and reasons; rule results → evidence records.

Where it sits: after ``Program.evaluate`` in ``Scorer``. Only ACTIVE rules
that HIT are enforced: the outcome is the ``max()`` of their actions (ALLOW
when none hit), the score the sum of their score contributions, and each gives
one ``Reason`` with its explanation. SHADOW results and ERRORs are logged as
evidence and never change the answer. The score is not capped: it is the plain
sum, so a replay or an analyst can add it up from the reasons.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from riskd.domain.decision import Outcome, Reason
from riskd.evidence.records import RuleRecord


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class ResultLike(Protocol):
    """``riskd.dsl.RuleResult``: one rule's verdict on one order."""

    @property
    def rule_id(self) -> str: ...
    @property
    def status(self) -> _Named: ...
    @property
    def mode(self) -> _Named: ...
    @property
    def action(self) -> Outcome: ...
    @property
    def score(self) -> float: ...
    @property
    def reason_code(self) -> str: ...
    @property
    def error(self) -> str: ...
    @property
    def explanation(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the enforced rules decided."""

    outcome: Outcome
    score: float
    reasons: tuple[Reason, ...]


def enforced(result: ResultLike) -> bool:
    """An ACTIVE rule that HIT (shadow hits and errors are evidence only)."""
    return result.status.name == "HIT" and result.mode.name == "ACTIVE"


def combine(results: Iterable[ResultLike]) -> Verdict:
    """Outcome = max of enforced actions (ALLOW if none), score = their sum, one reason each.

    >>> from types import SimpleNamespace as R
    >>> hit, active = R(name="HIT"), R(name="ACTIVE")
    >>> v = combine([R(rule_id="a", status=hit, mode=active, action=Outcome.REVIEW, score=10.0,
    ...                reason_code="A", explanation=()),
    ...              R(rule_id="b", status=hit, mode=R(name="SHADOW"), action=Outcome.BLOCK,
    ...                score=90.0, reason_code="B", explanation=())])
    >>> v.outcome.name, v.score, [r.rule_id for r in v.reasons]
    ('REVIEW', 10.0, ['a'])
    """
    reasons = tuple(
        Reason(r.rule_id, r.reason_code, Outcome(r.action), float(r.score), tuple(r.explanation))
        for r in results
        if enforced(r)
    )
    outcome = max((r.action for r in reasons), default=Outcome.ALLOW)
    return Verdict(outcome, sum(r.score for r in reasons), reasons)


def rule_records(results: Sequence[ResultLike]) -> tuple[RuleRecord, ...]:
    """Every result, shadow and errors included, as evidence."""
    return tuple(
        RuleRecord(
            rule_id=r.rule_id,
            status=r.status.name,
            mode=r.mode.name,
            action=Outcome(r.action),
            score=float(r.score),
            reason_code=r.reason_code,
            error=r.error,
            explanation=tuple(r.explanation),
        )
        for r in results
    )
