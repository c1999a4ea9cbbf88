"""Fixtures for the evidence tests: real SQLite files and a real PostgreSQL schema per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from riskd.domain.decision import Decision, Outcome, Reason
from riskd.domain.order import Address, Amounts, Buyer, Channel, Order
from riskd.dsl.program import Mode, RuleResult, RuleStatus
from riskd.errors import CommitUnknownError
from riskd.evidence.records import DecisionRecord
from riskd.sql import Database, Tx

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"

# PII values the tests grep for in the stored bytes.
PHONE = "13912345678"
NAME = "王小明"
ID_NUMBER = "11010119900307123X"
STREET = "文三路477号华星科技大厦"
DEVICE = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
IP = "203.0.113.77"


def pg_database() -> Database:
    return Database(f"{PG_URL}?schema=evidence_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "evidence.db") if request.param == "sqlite" else pg_database()
    yield database
    database.drop_schema()
    database.close()


def make_order(order_id: str, *, total: int = 12_900) -> Order:
    return Order(
        order_id=order_id,
        buyer=Buyer(
            buyer_id="b-1",
            account_age_days=3,
            phone=PHONE,
            name=NAME,
            id_number=ID_NUMBER,
            address=Address("浙江省", "杭州市", "西湖区", STREET),
        ),
        shop_id="s-1",
        merchant_id="m-1",
        amounts=Amounts(items=total, total=total),
        channel=Channel.LIVE_ROOM,
        live_room_id="lr-9",
        device_id=DEVICE,
        ip=IP,
    )


def make_record(order_id: str, *, request: dict[str, object] | None = None) -> DecisionRecord:
    reason = Reason("big_order", "AMOUNT_HIGH", Outcome.REVIEW, 20.0, ("total > 50000: true",))
    decision = Decision(
        order_id=order_id,
        outcome=Outcome.REVIEW,
        score=20.0,
        reasons=(reason,),
        rules_version="v-abc",
        model_versions={},
        degraded=(),
        elapsed_us=123,
        decided_at=1_700_000_000.25,
    )
    hit, miss, error = RuleStatus.HIT, RuleStatus.NO_HIT, RuleStatus.ERROR
    rules = (
        # in the log's canonical order (hits, errors, misses, shadow misses), so a record
        # read back from SQL equals the one appended
        RuleResult("big_order", hit, Mode.ACTIVE, Outcome.REVIEW, 20.0, "AMOUNT_HIGH", "", ("x",)),
        RuleResult("candidate", hit, Mode.SHADOW, Outcome.BLOCK, 90.0, "CAND", "", ("y",)),
        RuleResult("broken", error, Mode.ACTIVE, Outcome.BLOCK, 1.0, "B", "division by zero"),
        RuleResult("quiet", miss, Mode.ACTIVE, Outcome.ALLOW, 0.0, ""),
        RuleResult("new_device", miss, Mode.SHADOW, Outcome.ALLOW, 0.0, ""),
    )
    return DecisionRecord(
        decision=decision,
        request=request if request is not None else {"order_id": order_id},
        features={"count_per_buyer_1h": 3, "sum_per_buyer_24h": 90_000},
        rules=rules,
    )


def lose_commit_answer(
    db: Database, monkeypatch: pytest.MonkeyPatch, *, committed: bool = True
) -> list[bool]:
    """The next transaction on ``db`` commits (or, not ``committed``, rolls back) and its
    COMMIT's answer is lost (only that is simulated: the transaction is real). Returns a
    list that empties once the loss has happened."""
    real = db.transaction
    lose = [True]

    @contextmanager
    def lost_ack(**kwargs: Any) -> Iterator[Tx]:
        with real(**kwargs) as tx:
            yield tx
            if lose and not committed:
                lose.clear()
                raise CommitUnknownError("lost during COMMIT")  # rolled back
        if lose and committed:
            lose.clear()
            raise CommitUnknownError("lost during COMMIT")  # after the commit

    monkeypatch.setattr(db, "transaction", lost_ack)
    return lose


def refuse_o2(db: Database) -> None:
    """SQLite refuses order ``o-2`` in ``decision_log`` from now on (the tables exist)."""
    trigger = (
        "CREATE TRIGGER refuse_o2 BEFORE INSERT ON decision_log WHEN NEW.order_id = 'o-2'"
        " BEGIN SELECT RAISE(ABORT, 'order refused'); END"
    )
    db.run(lambda tx: tx.execute(trigger))


@pytest.fixture
def pg() -> Iterator[Database]:
    database = pg_database()
    yield database
    database.drop_schema()
    database.close()
