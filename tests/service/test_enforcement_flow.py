"""Money operations reach checkout: a shop penalized through LedgerService gets its orders blocked.

Real server (real rules/ starter set, SQLite ledger), real channel, three callers with
their own tokens: the operator registers the shop and its deposit, the analyst
penalizes it for order brushing (a 30-day freeze), the checkout gateway scores.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc

from riskd.service import convert
from riskd.service.gen.riskd.v1 import (
    ledger_pb2,
    ledger_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from riskd.service.server import create_server
from tests.service.conftest import make_config
from tests.service.test_scoring import fresh

ROOT = Path(__file__).resolve().parents[2]
TOKENS = {"tok-op": "ops:operator", "tok-analyst": "ts-1:analyst", "tok-checkout": "gw:checkout"}


def as_(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_a_penalized_shop_is_frozen_and_its_orders_are_blocked(tmp_path: Path) -> None:
    config = make_config(tmp_path, rules_dir=str(ROOT / "rules"), auth={"tokens": TOKENS})
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            ledger = ledger_pb2_grpc.LedgerServiceStub(ch)
            scoring = scoring_pb2_grpc.ScoringServiceStub(ch)
            order = fresh()

            def outcome() -> int:
                o = dataclasses.replace(fresh(), shop_id=order.shop_id)
                msg = scoring_pb2.ScoreRequest(order=convert.order_to_proto(o))
                return scoring.Score(msg, timeout=5, metadata=as_("tok-checkout")).decision.outcome

            assert outcome() != scoring_pb2.OUTCOME_BLOCK
            ledger.RegisterShop(
                ledger_pb2.RegisterShopRequest(shop_id=order.shop_id, merchant_id="m-1"),
                timeout=5,
                metadata=as_("tok-op"),
            )
            ledger.Deposit(
                ledger_pb2.DepositRequest(
                    idempotency_key="dep-1", shop_id=order.shop_id, amount_fen=2_000_000, reason="r"
                ),
                timeout=5,
                metadata=as_("tok-op"),
            )
            penalize = ledger_pb2.PenalizeShopRequest(
                idempotency_key="pen-1",
                shop_id=order.shop_id,
                violation="order_brushing",
                case_id="case-1",
                evidence="decision:o-1",
                reason="fake orders",
            )
            ledger.PenalizeShop(penalize, timeout=5, metadata=as_("tok-analyst"))

            deadline = time.monotonic() + 10  # the scorer's shop cache refreshes in seconds
            while outcome() != scoring_pb2.OUTCOME_BLOCK:
                assert time.monotonic() < deadline, "a frozen shop's orders were not blocked"
                time.sleep(0.2)
            o = dataclasses.replace(fresh(), shop_id=order.shop_id)
            msg = scoring_pb2.ScoreRequest(order=convert.order_to_proto(o))
            decision = scoring.Score(msg, timeout=5, metadata=as_("tok-checkout")).decision
            assert "frozen_shop" in [r.rule_id for r in decision.reasons]
    finally:
        running.stop(1)
