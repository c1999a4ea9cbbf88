"""FallbackPolicy: ordered tiers per scenario, built from config, with clear config errors."""

from __future__ import annotations

import pytest

from riskd.domain.decision import Outcome
from riskd.domain.order import Amounts, Buyer, Channel, Order
from riskd.engine.fallback import FallbackPolicy, Tier
from riskd.errors import ConfigError


def order(total: int, channel: Channel = Channel.SHORT_VIDEO) -> Order:
    return Order("o", Buyer("b"), "s", "m", amounts=Amounts(total=total), channel=channel)


POLICY = FallbackPolicy.from_text(
    {"default": "50000:allow,review", "live_room": "10000:allow,200000:review,block"}
)


@pytest.mark.parametrize(
    ("total", "channel", "outcome", "scenario"),
    [
        (50_000, Channel.SHORT_VIDEO, Outcome.ALLOW, "default"),
        (50_001, Channel.SHORT_VIDEO, Outcome.REVIEW, "default"),
        (0, Channel.UNSPECIFIED, Outcome.ALLOW, "default"),
        (10_000, Channel.LIVE_ROOM, Outcome.ALLOW, "live_room"),
        (10_001, Channel.LIVE_ROOM, Outcome.REVIEW, "live_room"),
        (200_001, Channel.LIVE_ROOM, Outcome.BLOCK, "live_room"),
    ],
)
def test_fallback_first_matching_tier_wins(
    total: int, channel: Channel, outcome: Outcome, scenario: str
) -> None:
    answer = POLICY.decide(order(total, channel))
    assert (answer.outcome, answer.scenario) == (outcome, scenario)


def test_an_unspecified_scenario_applies_to_orders_without_a_channel() -> None:
    """Review: the configuration accepts ``fallback.unspecified`` but it never applied."""
    policy = FallbackPolicy.from_text({"default": "50000:allow,review", "unspecified": "block"})
    answer = policy.decide(order(100, Channel.UNSPECIFIED))
    assert (answer.outcome, answer.scenario) == (Outcome.BLOCK, "unspecified")
    assert policy.decide(order(100)).outcome is Outcome.ALLOW


def test_fallback_from_config_takes_parsed_tiers() -> None:
    policy = FallbackPolicy.from_config(
        {"default": (Tier(100, Outcome.ALLOW), Tier(None, Outcome.BLOCK))}
    )
    assert policy.decide(order(101)).outcome is Outcome.BLOCK


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"live_room": "review"}, "fallback.default: a default fallback is required"),
        ({"default": "50000:allow"}, "fallback.default: the last fallback tier must have no bound"),
        ({"default": "-1:allow,review"}, "fallback.default: a tier bound must not be negative"),
        ({"default": "5x:allow,review"}, "fallback.default: a tier bound must be an integer"),
        ({"default": "maybe"}, "fallback.default: unknown outcome"),
        ({"default": "allow,100:block,review"}, "fallback.default: only the last fallback tier"),
        ({"default": "500:allow,500:block,review"}, "fallback.default: .* bounds must increase"),
        ({"default": "900:allow,500:block,review"}, "fallback.default: .* bounds must increase"),
    ],
)
def test_fallback_bad_config_names_the_key(table: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FallbackPolicy.from_text(table)


def test_fallback_default_policy_allows_up_to_500_cny() -> None:
    policy = FallbackPolicy.default()
    assert policy.decide(order(50_000)).outcome is Outcome.ALLOW
    assert policy.decide(order(50_001)).outcome is Outcome.REVIEW


def test_fallback_names_the_tier_that_answered() -> None:
    """The answer's reason says which tier gave it (``fallback scenario live_room tier 2``)."""
    totals = (10_000, 10_001, 200_001)
    assert [POLICY.decide(order(t, Channel.LIVE_ROOM)).tier for t in totals] == [0, 1, 2]


def test_fallback_takes_a_zero_bound_and_spaced_outcomes_as_the_config_does() -> None:
    """As ``riskd.config.parse_tiers``: a bound of 0 fen is not negative (only free orders
    are under it), and ``0: allow, review`` reads as ``0:allow,review``."""
    policy = FallbackPolicy.from_text({"default": "0: allow, review"})
    assert [policy.decide(order(t)).outcome for t in (0, 1)] == [Outcome.ALLOW, Outcome.REVIEW]


def test_fallback_a_scenario_with_no_tiers_is_a_config_error_naming_it() -> None:
    default = (Tier(None, Outcome.REVIEW),)
    with pytest.raises(ConfigError, match=r"fallback\.live_room: the last fallback tier"):
        FallbackPolicy.from_config({"default": default, "live_room": ()})
