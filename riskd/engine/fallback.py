"""What riskd answers when a dependency is down: ordered amount tiers per scenario.

Where it sits: ``Scorer`` asks the policy for an outcome when a decision is
degraded (features, shop state or the log unavailable) and combines it with
``max()`` with whatever the rules that could still run decided.

A policy maps a scenario to ordered tiers ``(max_total, outcome)``: the first
tier whose bound the order's total (fen) does not exceed wins; the last tier,
and only it, has no bound, and the bounds before it increase. The scenario of
an order is its channel's name in lower case (``short_video``, ``live_room``,
``shop_page``, ``search``, or ``unspecified`` for an order naming none); a channel with
no tiers of its own uses ``default``.
Config text is ``"50000:allow,review"`` (``riskd.config`` parses it;
``from_config`` takes the parsed tiers).

>>> policy = FallbackPolicy.from_text(
...     {"default": "50000:allow,review", "live_room": "20000:allow,review"})
>>> from riskd.domain.order import Amounts, Buyer, Channel, Order
>>> order = Order("o1", Buyer("b1"), "s1", "m1", amounts=Amounts(total=30000))
>>> policy.decide(order).outcome.name, policy.decide(order).scenario
('ALLOW', 'default')
>>> policy.decide(Order("o2", Buyer("b1"), "s1", "m1", amounts=Amounts(total=30000),
...                     channel=Channel.LIVE_ROOM)).outcome.name
'REVIEW'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

from riskd.domain.decision import Outcome
from riskd.domain.order import Order
from riskd.errors import ConfigError

DEFAULT_SCENARIO = "default"


class TierLike(Protocol):
    """A parsed config tier (``riskd.config.FallbackTier`` has this shape)."""

    @property
    def max_total(self) -> int | None: ...

    @property
    def outcome(self) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class Tier:
    """Orders whose total is at most ``max_total`` fen (any total when None) get ``outcome``."""

    max_total: int | None
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class FallbackAnswer:
    """The outcome the policy gives, and which scenario and tier gave it (for the reason)."""

    outcome: Outcome
    scenario: str
    tier: int


def scenario_of(order: Order) -> str:
    """The fallback scenario of an order: its channel's name, lower case (``unspecified``
    for an order that names none: the configuration accepts that scenario, and review
    found it never applied)."""
    return order.channel.name.lower()


class FallbackPolicy:
    """Ordered tiers per scenario; ``default`` is required.

    Raises:
        ConfigError: a scenario with no tiers, a bounded last tier, an unbounded tier
            before it, bounds that do not increase, a negative bound, or no ``default``
            scenario (the message names the key).
    """

    def __init__(self, tiers: Mapping[str, Sequence[TierLike]]) -> None:
        checked = {name: _checked(name, ts) for name, ts in tiers.items()}
        if DEFAULT_SCENARIO not in checked:
            raise ConfigError("fallback.default: a default fallback is required")
        self._tiers = checked

    @classmethod
    def from_config(cls, tiers: Mapping[str, Sequence[TierLike]]) -> FallbackPolicy:
        """From ``riskd.config.Config.fallback`` (scenario -> parsed tiers)."""
        return cls(tiers)

    @classmethod
    def from_text(cls, table: Mapping[str, str]) -> FallbackPolicy:
        """From scenario -> ``"MAX_TOTAL_FEN:outcome,...,outcome"`` text."""
        return cls({name: _parse(name, text) for name, text in table.items()})

    @classmethod
    def default(cls) -> FallbackPolicy:
        """Allow orders up to 500 CNY, review the rest."""
        return cls.from_text({DEFAULT_SCENARIO: "50000:allow,review"})

    def decide(self, order: Order) -> FallbackAnswer:
        """The fallback outcome for ``order``."""
        scenario = scenario_of(order)
        if scenario not in self._tiers:
            scenario = DEFAULT_SCENARIO
        total = order.amounts.total
        tiers = self._tiers[scenario]
        for i, tier in enumerate(tiers):
            if tier.max_total is None or total <= tier.max_total:
                return FallbackAnswer(tier.outcome, scenario, i)
        raise AssertionError("the last tier is unbounded")  # enforced by _checked


def _checked(name: str, tiers: Sequence[TierLike]) -> tuple[Tier, ...]:
    key = f"fallback.{name}"
    out = tuple(Tier(t.max_total, Outcome(t.outcome)) for t in tiers)
    if not out or out[-1].max_total is not None:
        raise ConfigError(f"{key}: the last fallback tier must have no bound")
    if any(t.max_total is not None and t.max_total < 0 for t in out):
        raise ConfigError(f"{key}: a tier bound must not be negative")
    # As riskd.config.parse_tiers: a tier after an unbounded one, or under a bound no
    # larger than the one before, would never apply.
    bounds = [t.max_total for t in out[:-1] if t.max_total is not None]
    if len(bounds) != len(out) - 1:
        raise ConfigError(f"{key}: only the last fallback tier may have no bound")
    if any(a >= b for a, b in pairwise(bounds)):
        raise ConfigError(f"{key}: fallback tier bounds must increase")
    return out


def _parse(name: str, text: str) -> list[Tier]:
    key = f"fallback.{name}"
    tiers = []
    for part in (p.strip() for p in text.split(",")):
        bound, _, word = part.rpartition(":")
        try:
            outcome = Outcome[word.strip().upper()]
        except KeyError:
            raise ConfigError(f"{key}: unknown outcome (allow, review or block)") from None
        try:
            limit = int(bound) if bound.strip() else None
        except ValueError:
            raise ConfigError(f"{key}: a tier bound must be an integer of fen") from None
        tiers.append(Tier(limit, outcome))
    return tiers
