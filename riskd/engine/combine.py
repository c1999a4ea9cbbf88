"""Rule results → outcome, score and reasons.

Where it sits: after ``Program.evaluate`` in ``Scorer``. Only ACTIVE rules
that HIT are enforced: the outcome is the ``max()`` of their actions (ALLOW
when none hit), the score the sum of their score contributions, and each gives
one ``Reason`` with its explanation. SHADOW results and ERRORs are logged as
evidence and never change the answer. The score is not capped: it is the plain
sum, so a replay or an analyst can add it up from the reasons.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from riskd.domain.decision import Outcome, Reason
from riskd.dsl.program import Mode, RuleResult, RuleStatus


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the enforced rules decided."""

    outcome: Outcome
    score: float
    reasons: tuple[Reason, ...]


def enforced(result: RuleResult) -> bool:
    """An ACTIVE rule that HIT (shadow hits and errors are evidence only)."""
    return result.status is RuleStatus.HIT and result.mode is Mode.ACTIVE


def combine(results: Iterable[RuleResult]) -> Verdict:
    """Outcome = max of enforced actions (ALLOW if none), score = their sum, one reason each.

    >>> hit = RuleStatus.HIT
    >>> v = combine([RuleResult("a", hit, Mode.ACTIVE, Outcome.REVIEW, 10.0, "A"),
    ...              RuleResult("b", hit, Mode.SHADOW, Outcome.BLOCK, 90.0, "B")])
    >>> v.outcome.name, v.score, [r.rule_id for r in v.reasons]
    ('REVIEW', 10.0, ['a'])
    """
    hit, active = RuleStatus.HIT, Mode.ACTIVE  # inlined `enforced`: 200 results per order
    reasons = tuple(
        Reason(r.rule_id, r.reason_code, r.action, r.score, r.explanation)
        for r in results
        if r.status is hit and r.mode is active
    )
    outcome = max((r.action for r in reasons), default=Outcome.ALLOW)
    return Verdict(outcome, sum(r.score for r in reasons), reasons)
