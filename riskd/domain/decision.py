"""The answer riskd gives for one order."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Outcome(enum.IntEnum):
    """Ordered: combine several with ``max()``."""

    ALLOW = 1
    REVIEW = 2
    BLOCK = 3


@dataclass(frozen=True, slots=True)
class Reason:
    """One enforced rule that hit, and why."""

    rule_id: str
    reason_code: str
    action: Outcome
    score: float
    explanation: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    order_id: str
    outcome: Outcome
    score: float
    reasons: tuple[Reason, ...]
    rules_version: str
    model_versions: Mapping[str, str] = field(default_factory=dict)
    degraded: tuple[str, ...] = ()
    elapsed_us: int = 0
    decided_at: float = 0.0
    # the decision recorded for an earlier call with this order id (never stored)
    replayed: bool = False
    # ids of the rules whose result was an ERROR, for the metrics (never stored or sent)
    rule_errors: tuple[str, ...] = field(default=(), compare=False)
    # an answer the decision log neither holds nor will hold (its queue was full, or a
    # retry's fallback while another call decides the order): never stored or sent
    unlogged: bool = field(default=False, compare=False)
