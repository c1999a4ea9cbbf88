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


def test_a_retired_rule_counted_after_the_swap_brings_no_series_back() -> None:
    """Review: in worker mode a worker still on the old program (up to ~1.5 s) and its
    snapshots counted retired rule ids after the swap dropped them: their series came back
    after every renaming reload and stayed until the next one."""
    m = Metrics()
    old = Reason("old_rule", "OLD", Outcome.REVIEW, 10.0, ("…",))
    new = Reason("new_rule", "NEW", Outcome.REVIEW, 10.0, ("…",))
    m.observe_decisions([Decision("o-1", Outcome.REVIEW, 10.0, (old,), "v1")])
    m.absorb_worker(None, {"rule_errors": {"old_rule": 1.0}, "superseded": 0})
    assert m.value("riskd_rule_hits_total", {"rule_id": "old_rule"}) == 1
    m.forget_rules(["new_rule"])  # the reload swapped in a program without old_rule
    late = Decision("o-2", Outcome.REVIEW, 20.0, (old,), "v1", rule_errors=("old_rule",))
    m.observe_decisions([late, Decision("o-3", Outcome.REVIEW, 10.0, (new,), "v2")])
    before = {"rule_errors": {"old_rule": 1.0}, "superseded": 0}
    m.absorb_worker(before, {"rule_errors": {"old_rule": 3.0, "new_rule": 1.0}, "superseded": 0})
    scrape = m.text().decode()
    assert 'rule_id="old_rule"' not in scrape
    assert m.value("riskd_rule_hits_total", {"rule_id": "new_rule"}) == 1
    assert m.value("riskd_rule_errors_total", {"rule_id": "new_rule"}) == 1
    assert total(m) == 3  # the late decision is still a decision
    m.forget_rules(["new_rule", "old_rule"])  # a later reload brings the rule back
    m.observe_decisions([Decision("o-4", Outcome.REVIEW, 10.0, (old,), "v3")])
    assert m.value("riskd_rule_hits_total", {"rule_id": "old_rule"}) == 1


def test_an_answer_missing_two_inputs_counts_under_each_and_its_rule_errors() -> None:
    """README: an answer missing two counts under each ``unavailable``; a decision's rule
    errors count by rule id (before any reload: every rule id it carries)."""
    m = Metrics()
    hit = Reason("big_amount", "BIG", Outcome.REVIEW, 10.0, ("…",))
    both = Decision(
        "o-1", Outcome.REVIEW, 10.0, (hit, FALLBACK), "v1", degraded=("features", "shops")
    )
    erred = Decision("o-2", Outcome.BLOCK, 90.0, (), "v1", rule_errors=("ratio", "ratio"))
    m.observe_decisions([both, erred])
    degraded = {u: m.value("riskd_degraded_decisions_total", {"unavailable": u}) for u in
                ("features", "shops")}  # fmt: skip
    assert degraded == {"features": 1, "shops": 1}
    assert m.value("riskd_decisions_total", {"outcome": "review"}) == 1
    assert m.value("riskd_decisions_total", {"outcome": "block"}) == 1
    assert m.value("riskd_rule_hits_total", {"rule_id": "big_amount"}) == 1
    assert m.value("riskd_rule_errors_total", {"rule_id": "ratio"}) == 2
