"""A retry must send the same order, but ``client_time`` is informational: a checkout that
rebuilds its request on retry (a new client time) gets the recorded decision back, and
the decision log keeps the first call's client time (review: it was refused with
``ALREADY_EXISTS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from riskd.domain.clock import FakeClock
from riskd.errors import AlreadyExistsError
from riskd.evidence import request
from riskd.pii import BlindIndexer

from .conftest import Rig, make_order
from .test_scorer import count_buyer_orders


def test_a_retry_with_another_client_time_replays_the_recorded_decision(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    first_order = replace(make_order("o-1"), client_time=1_790_000_000.25)
    first = rig.scorer.score(first_order)
    rebuilt = replace(first_order, client_time=1_790_000_004.5)
    assert rig.scorer.score(rebuilt) == replace(first, replayed=True)  # from the queue
    rig.log.flush(10)
    assert rig.scorer.score(rebuilt) == replace(first, replayed=True)  # from SQL
    record = rig.log.get("o-1")
    assert record is not None and record.request["client_time"] == 1_790_000_000.25
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 1
    with pytest.raises(AlreadyExistsError):  # other content still refused
        rig.scorer.score(replace(rebuilt, shop_id="s-2"))
    assert rig.log.verify().ok


def test_a_batch_may_hold_one_order_twice_with_other_client_times(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    order = make_order("o-1")
    a, b = rig.scorer.score_batch([order, replace(order, client_time=order.client_time + 3)])
    assert b == replace(a, replayed=True)


def test_same_order_ignores_only_the_client_time() -> None:
    order, protect = make_order("o-1"), request.protect_order
    same = request.same_order  # the scorer's and the scoring workers' comparison
    assert same(protect(order), protect(replace(order, client_time=9.0)))
    assert not same(protect(order), protect(replace(order, coupon_code="X")))
