"""Records survive the trip through their stored JSON form (hypothesis property)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from riskd.domain.decision import Decision, Outcome, Reason
from riskd.dsl.program import Mode, RuleResult, RuleStatus
from riskd.evidence import records as records_module
from riskd.evidence.records import (
    DecisionRecord,
    canonical_json,
    content_text,
    from_content,
    to_content,
)

texts = st.text(max_size=12)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
reasons = st.builds(
    Reason, texts, texts, st.sampled_from(Outcome), floats, st.lists(texts, max_size=3).map(tuple)
)


def _results(draw: st.DrawFn) -> tuple[RuleResult, ...]:
    def full(status: RuleStatus) -> st.SearchStrategy[RuleResult]:
        return st.builds(
            RuleResult,
            texts,
            st.just(status),
            st.sampled_from([Mode.ACTIVE, Mode.SHADOW]),
            st.sampled_from(Outcome),
            floats,
            texts,
            texts,
            st.lists(texts, max_size=2).map(tuple),
        )

    def miss(mode: Mode) -> st.SearchStrategy[RuleResult]:
        return texts.map(lambda i: RuleResult(i, RuleStatus.NO_HIT, mode, Outcome.ALLOW, 0.0, ""))

    # the log's canonical order: hits, errors, misses, shadow misses
    parts = [
        draw(st.lists(full(RuleStatus.HIT), max_size=3)),
        draw(st.lists(full(RuleStatus.ERROR), max_size=3)),
        draw(st.lists(miss(Mode.ACTIVE), max_size=5)),
        draw(st.lists(miss(Mode.SHADOW), max_size=5)),
    ]
    return tuple(r for part in parts for r in part)


@st.composite
def records(draw: st.DrawFn) -> DecisionRecord:
    decision = Decision(
        order_id=draw(st.text(min_size=1, max_size=20)),
        outcome=draw(st.sampled_from(Outcome)),
        score=draw(floats),
        reasons=tuple(draw(st.lists(reasons, max_size=3))),
        rules_version=draw(texts),
        model_versions=draw(st.dictionaries(texts, texts, max_size=2)),
        degraded=tuple(draw(st.lists(st.sampled_from(["features", "shops", "evidence"])))),
        elapsed_us=draw(st.integers(0, 10**9)),
        decided_at=draw(floats),
    )
    request = draw(st.dictionaries(texts, st.one_of(texts, st.integers()), max_size=4))
    features = draw(st.dictionaries(texts, st.integers(0, 10**12), max_size=4))
    return DecisionRecord(decision, request, features, _results(draw))


@given(records())
def test_record_round_trips_through_its_stored_text(record: DecisionRecord) -> None:
    text = canonical_json(to_content(record))
    assert from_content(json.loads(text)) == record


@given(records())
def test_content_text_is_the_canonical_json_of_the_content(record: DecisionRecord) -> None:
    assert content_text(record) == canonical_json(to_content(record))


def test_the_cache_of_rule_id_lists_stays_bounded() -> None:
    """A long-running daemon meets ever new miss lists (each hit leaves one out): the texts
    cached for them must not grow without end."""
    decision = Decision("o-1", Outcome.ALLOW, 0.0, (), "v1")
    for i in range(records_module._ID_LISTS_MAX + 10):
        miss = RuleResult(f"r-{i}", RuleStatus.NO_HIT, Mode.ACTIVE, Outcome.ALLOW, 0.0, "")
        content_text(DecisionRecord(decision, rules=(miss,)))
    assert 0 < len(records_module._ID_LISTS) <= records_module._ID_LISTS_MAX
