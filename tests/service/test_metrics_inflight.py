"""A retry answered ``inflight`` (its order's first call still deciding it) is no decision
of its own: ``riskd_decisions_total`` counts the order once, by the first call's decision
(review: the retry's fallback was counted as a second decision)."""

from __future__ import annotations

from riskd.domain.decision import Decision, Outcome, Reason
from riskd.service.metrics import Metrics

FALLBACK = Reason("@fallback", "DEGRADED_FALLBACK", Outcome.ALLOW, 0.0, ("fallback …",))


def total(m: Metrics) -> float:
    return sum(m.value("riskd_decisions_total", {"outcome": o}) for o in ("allow", "review"))


def test_an_inflight_answer_is_not_counted_as_a_decision() -> None:
    m = Metrics()
    first = Decision("o-1", Outcome.ALLOW, 0.0, (FALLBACK,), "v1", degraded=("features",))
    retry = Decision("o-1", Outcome.ALLOW, 0.0, (FALLBACK,), "v1", degraded=("inflight",))
    m.observe_decisions([first])
    m.observe_decisions([retry])
    assert total(m) == 1
    # the fallback is no rule (review: it was counted as a rule hit)
    assert m.value("riskd_rule_hits_total", {"rule_id": "@fallback"}) == 0
    assert m.value("riskd_degraded_decisions_total", {"unavailable": "features"}) == 1
    # the retry's answer shows only as what it is: a fallback while the order was in flight
    assert m.value("riskd_degraded_decisions_total", {"unavailable": "inflight"}) == 1
