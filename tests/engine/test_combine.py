"""combine: outcome = max of enforced actions, score = their sum; shadow and errors never count."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from riskd.domain.decision import Outcome
from riskd.dsl.program import Mode, RuleResult, RuleStatus
from riskd.engine.combine import combine, enforced

results = st.builds(
    RuleResult,
    rule_id=st.text("abcxyz_", min_size=1, max_size=8),
    status=st.sampled_from(RuleStatus),
    mode=st.sampled_from([Mode.ACTIVE, Mode.SHADOW]),
    action=st.sampled_from(Outcome),
    score=st.integers(0, 100).map(float),
    reason_code=st.text("ABC_", max_size=6),
    error=st.just(""),
    explanation=st.lists(st.text(max_size=10), max_size=2).map(tuple),
)


@given(st.lists(results, max_size=30))
def test_combine_enforces_only_active_hits(rs: list[RuleResult]) -> None:
    hits = [r for r in rs if r.status is RuleStatus.HIT and r.mode is Mode.ACTIVE]
    assert [r for r in rs if enforced(r)] == hits
    verdict = combine(rs)
    assert verdict.outcome == max((r.action for r in hits), default=Outcome.ALLOW)
    assert verdict.score == sum(r.score for r in hits)
    assert [(r.rule_id, r.explanation) for r in verdict.reasons] == [
        (r.rule_id, r.explanation) for r in hits
    ]


@given(st.lists(results, max_size=30))
def test_combine_ignores_shadow_and_errors(rs: list[RuleResult]) -> None:
    kept = [r for r in rs if r.mode is Mode.ACTIVE and r.status is not RuleStatus.ERROR]
    assert combine(rs) == combine(kept)
