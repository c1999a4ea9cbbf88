"""What the decision log stores for one decision, and its canonical JSON form.

A ``DecisionRecord`` is built by the engine after a decision and appended to
the ``DecisionLog``. Its ``request`` is the order with every PII field already
protected (masked + blind index, see ``riskd.evidence.request``): the record
never holds plaintext PII. ``to_content``/``from_content`` give the canonical
JSON that the hash chain covers, so the same bytes are hashed on write and on
verify.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from riskd.domain.decision import Decision, Outcome, Reason
from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.dsl.program import Mode, RuleResult, RuleStatus


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A decision with everything needed to explain and replay it.

    Attributes:
        decision: the answer given to the caller.
        request: the order, PII fields masked and blind-indexed (JSON values only).
        features: velocity feature values used, by ``FeatureQuery.name``.
        rules: every rule result, shadow ones included (``Program.evaluate``'s
            tuple as it is: the request path converts nothing).
    """

    decision: Decision
    request: Mapping[str, Any] = field(default_factory=dict)
    features: Mapping[str, int] = field(default_factory=dict)
    rules: tuple[RuleResult, ...] = ()

    @property
    def order_id(self) -> str:
        return self.decision.order_id


def canonical_json(value: object) -> str:
    """The one serialization written and hashed: compact, UTF-8, keys in the order built.

    The hash covers the stored text itself (``verify`` never re-serializes),
    so key order need not be sorted, only fixed by ``to_content``.

    >>> canonical_json({"b": 1, "a": [1.5, "x"]})
    '{"b":1,"a":[1.5,"x"]}'
    """
    return _encode(value)


# One encoder for every record (json.dumps would build one per call), same settings.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _reason_content(r: Reason) -> dict[str, Any]:
    return {
        "rule_id": r.rule_id,
        "reason_code": r.reason_code,
        "action": r.action.name,
        "score": r.score,
        "explanation": list(r.explanation),
    }


def _result_content(r: RuleResult) -> dict[str, Any]:
    return {
        "rule_id": r.rule_id,
        "mode": r.mode.name,
        "action": r.action.name,
        "score": r.score,
        "reason_code": r.reason_code,
        "error": r.error,
        "explanation": list(r.explanation),
    }


def rules_content(results: Sequence[RuleResult]) -> dict[str, Any]:
    """Every rule's result, compactly: full results for hits and errors, ids for the rest.

    A rule that did not hit is logged by id and mode only (``no_hit`` /
    ``no_hit_shadow``): its action, score and reason code are not part of the
    decision, and the rule files of ``rules_version`` hold them. With 200 rules
    this keeps a record near 2 KB instead of 30.
    """
    miss, shadow, hit = RuleStatus.NO_HIT, Mode.SHADOW, RuleStatus.HIT
    misses = [r for r in results if r.status is miss]
    return {
        "hit": [_result_content(r) for r in results if r.status is hit],
        "error": [_result_content(r) for r in results if r.status is RuleStatus.ERROR],
        "no_hit": [r.rule_id for r in misses if r.mode is not shadow],
        "no_hit_shadow": [r.rule_id for r in misses if r.mode is shadow],
    }


def _split(results: Sequence[RuleResult]) -> tuple[list[Any], list[Any], list[str], list[str]]:
    """One pass: full hits, full errors, ids of active misses, ids of shadow misses."""
    miss, hit, shadow = RuleStatus.NO_HIT, RuleStatus.HIT, Mode.SHADOW
    hits: list[Any] = []
    errors: list[Any] = []
    no_hit: list[str] = []
    no_hit_shadow: list[str] = []
    for r in results:
        if r.status is miss:
            (no_hit_shadow if r.mode is shadow else no_hit).append(r.rule_id)
        elif r.status is hit:
            hits.append(_result_content(r))
        else:
            errors.append(_result_content(r))
    return hits, errors, no_hit, no_hit_shadow


_ID_LISTS: dict[tuple[str, ...], str] = {}
_ID_LISTS_MAX = 512


def _ids_text(ids: list[str]) -> str:
    """The JSON text of a list of rule ids, cached: with one program the misses of most
    decisions are the same few lists (only the rare hits and errors differ)."""
    key = tuple(ids)
    text = _ID_LISTS.get(key)
    if text is None:
        text = _encode(ids)
        if len(_ID_LISTS) >= _ID_LISTS_MAX:
            _ID_LISTS.clear()  # a new program version: the old lists are done with
        _ID_LISTS[key] = text
    return text


def content_text(record: DecisionRecord) -> str:
    """``canonical_json(to_content(record))``, the same text, built from parts.

    The rule-id lists of the misses (most of a record) come from a cache and the
    rest is encoded without building the whole content dict first.
    """
    head = _encode(_head_content(record))
    features = record.features
    hits, errors, no_hit, no_hit_shadow = _split(record.rules)
    return "".join(
        (
            head[:-1],
            ',"features":',
            _encode(features if type(features) is dict else dict(features)),
            ',"rules":{"hit":',
            _encode(hits),
            ',"error":',
            _encode(errors),
            ',"no_hit":',
            _ids_text(no_hit),
            ',"no_hit_shadow":',
            _ids_text(no_hit_shadow),
            "}}",
        )
    )


def to_content(record: DecisionRecord) -> dict[str, Any]:
    """The record as plain JSON values (the hashed content of a log row)."""
    return {
        **_head_content(record),
        "features": dict(record.features),
        "rules": rules_content(record.rules),
    }


def _head_content(record: DecisionRecord) -> dict[str, Any]:
    """The decision and the protected request: the part of the content before features."""
    d = record.decision
    return {
        "order_id": d.order_id,
        "outcome": d.outcome.name,
        "score": d.score,
        "reasons": [_reason_content(r) for r in d.reasons],
        "rules_version": d.rules_version,
        "model_versions": dict(d.model_versions),
        "degraded": list(d.degraded),
        "elapsed_us": d.elapsed_us,
        "decided_at": d.decided_at,
        "request": record.request,
    }


def _reason_from(c: Mapping[str, Any]) -> Reason:
    return Reason(
        rule_id=c["rule_id"],
        reason_code=c["reason_code"],
        action=Outcome[c["action"]],
        score=float(c["score"]),
        explanation=tuple(c["explanation"]),
    )


def _result_from(c: Mapping[str, Any], status: RuleStatus) -> RuleResult:
    return RuleResult(
        rule_id=c["rule_id"],
        status=status,
        mode=Mode[c["mode"]],
        action=Outcome[c["action"]],
        score=float(c["score"]),
        reason_code=c["reason_code"],
        error=c["error"],
        explanation=tuple(c["explanation"]),
    )


def _no_hit(rule_id: str, mode: Mode) -> RuleResult:
    # action/score/reason of a rule that did not hit live in its rule file (rules_version)
    return RuleResult(rule_id, RuleStatus.NO_HIT, mode, Outcome.ALLOW, 0.0, "")


def rules_from(c: Mapping[str, Any]) -> tuple[RuleResult, ...]:
    """Inverse of ``rules_content``: hits, errors, then the rules that did not hit."""
    return (
        *(_result_from(r, RuleStatus.HIT) for r in c["hit"]),
        *(_result_from(r, RuleStatus.ERROR) for r in c["error"]),
        *(_no_hit(i, Mode.ACTIVE) for i in c["no_hit"]),
        *(_no_hit(i, Mode.SHADOW) for i in c["no_hit_shadow"]),
    )


def from_content(c: Mapping[str, Any]) -> DecisionRecord:
    """Inverse of ``to_content``."""
    decision = Decision(
        order_id=c["order_id"],
        outcome=Outcome[c["outcome"]],
        score=float(c["score"]),
        reasons=tuple(_reason_from(r) for r in c["reasons"]),
        rules_version=c["rules_version"],
        model_versions=dict(c["model_versions"]),
        degraded=tuple(c["degraded"]),
        elapsed_us=int(c["elapsed_us"]),
        decided_at=float(c["decided_at"]),
    )
    return DecisionRecord(
        decision=decision,
        request=c["request"],
        features={k: int(v) for k, v in c["features"].items()},
        rules=rules_from(c["rules"]),
    )


def event_content(event: OrderEvent) -> dict[str, Any]:
    """An outcome report as plain JSON values (the hashed content of an event row)."""
    return {
        "order_id": event.order_id,
        "kind": event.kind.name,
        "at": event.at,
        "detail": event.detail,
    }


def event_from(c: Mapping[str, Any]) -> OrderEvent:
    """Inverse of ``event_content``."""
    return OrderEvent(
        order_id=c["order_id"],
        kind=OrderEventKind[c["kind"]],
        at=float(c["at"]),
        detail=c["detail"],
    )
