"""LedgerService through a real gRPC server on port 0, on both backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from riskd.domain.clock import FakeClock
from riskd.ledger import Book
from riskd.service.gen.riskd.v1 import ledger_pb2 as pb
from riskd.service.gen.riskd.v1 import ledger_pb2_grpc as pb_grpc
from riskd.service.interceptors import ErrorInterceptor
from riskd.service.ledger import add_ledger_service
from riskd.service.metrics import Metrics
from riskd.sql import Database

PG_BASE = "postgresql://root@127.0.0.1:5432/test"
FUND = 2_000_000_000  # 20,000,000 CNY


class Served:
    def __init__(self, book: Book, stub: pb_grpc.LedgerServiceStub) -> None:
        self.book = book
        self.stub = stub
        self.n = 0

    def key(self) -> str:
        self.n += 1
        return f"t-{self.n}"


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One book and one server per backend for the whole module."""
    if request.param == "sqlite":
        url = f"sqlite:///{Path(tmp_path_factory.mktemp('ledger')) / 'ledger.db'}"
    else:
        url = f"{PG_BASE}?schema=ledger_grpc_{uuid.uuid4().hex[:12]}"
    book = Book(Database(url), clock=FakeClock(1_800_000_000.0))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), interceptors=[ErrorInterceptor(Metrics())]
    )
    add_ledger_service(server, book, actor_of=lambda ctx: "cert:analyst-1")
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.LedgerServiceStub(channel)
    stub.TopUpFund(pb.TopUpFundRequest(idempotency_key="fund-0", amount_fen=FUND, reason="fund"))
    yield Served(book, stub)
    channel.close()
    server.stop(None).wait()
    book.db.drop_schema()
    book.close()


def shop(s: Served, deposit: int = 0) -> str:
    shop_id = f"shop-{uuid.uuid4().hex[:8]}"
    assert s.stub.RegisterShop(pb.RegisterShopRequest(shop_id=shop_id, merchant_id="m1")).created
    if deposit:
        s.stub.Deposit(
            pb.DepositRequest(idempotency_key=s.key(), shop_id=shop_id, amount_fen=deposit)
        )
    return shop_id


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code(), e.value.details()


def test_penalty_and_statements_through_grpc(served: Served) -> None:
    s, sid = served, shop(served, deposit=10_000_000)
    r = s.stub.PenalizeShop(
        pb.PenalizeShopRequest(
            idempotency_key=s.key(),
            shop_id=sid,
            violation="content_violation_serious",
            case_id=f"case-{sid}",
            evidence="case://1",
        )
    ).receipt
    assert [t.code for t in r.transfers] == [pb.TRANSFER_CODE_PENALTY]
    assert r.transfers[0].amount_fen == 300_000 and r.transfers[0].actor == "cert:analyst-1"
    assert r.frozen_until.seconds == 1_800_000_000 + 30 * 86_400
    st = s.stub.GetShopStatement(pb.GetShopStatementRequest(shop_id=sid))
    assert (st.deposit_fen, st.frozen, st.penalties) == (9_700_000, True, 1)
    acct = s.stub.GetAccountStatement(
        pb.GetAccountStatementRequest(account_id=f"shop:{sid}:deposit")
    )
    assert acct.account.balance_fen == 9_700_000 and len(acct.transfers) == 2
    assert s.stub.VerifyLedger(pb.VerifyLedgerRequest()).problems == []


def test_dispute_story_through_grpc(served: Served) -> None:
    s, sid = served, shop(served, deposit=1_000)
    d = f"d-{sid}"
    s.stub.OpenDispute(
        pb.OpenDisputeRequest(
            idempotency_key=s.key(),
            dispute_id=d,
            shop_id=sid,
            order_id="o1",
            order_amount_fen=5_000,
        )
    )
    s.stub.CompensateBuyer(
        pb.CompensateBuyerRequest(idempotency_key=s.key(), dispute_id=d, amount_fen=5_000)
    )
    s.stub.CollectClaim(
        pb.CollectClaimRequest(idempotency_key=s.key(), shop_id=sid, amount_fen=1_500)
    )
    s.stub.WriteOffClaim(
        pb.WriteOffClaimRequest(
            idempotency_key=s.key(), shop_id=sid, ref=f"dispute/{d}", reason="gone"
        )
    )
    st = s.stub.GetDisputeStatement(pb.GetDisputeStatementRequest(dispute_id=d))
    story = (st.paid_fen, st.recovered_from_deposit_fen, st.collected_fen, st.written_off_fen)
    assert story == (5_000, 1_000, 1_500, 2_500) and st.outstanding_fen == 0


def _deposit(s: Served, sid: str, amount: int, key: bool = True) -> object:
    req = pb.DepositRequest(idempotency_key=s.key() if key else "", shop_id=sid, amount_fen=amount)
    return s.stub.Deposit(req)


def _compensate_unknown(s: Served, sid: str) -> object:
    req = pb.CompensateBuyerRequest(idempotency_key=s.key(), dispute_id="nope", amount_fen=1)
    return s.stub.CompensateBuyer(req)


def _withdraw(s: Served, sid: str) -> object:
    return s.stub.Withdraw(pb.WithdrawRequest(idempotency_key=s.key(), shop_id=sid, amount_fen=1))


def _penalize_unknown(s: Served, sid: str) -> object:
    req = pb.PenalizeShopRequest(
        idempotency_key=s.key(), shop_id=sid, violation="x", case_id="c", evidence="e"
    )
    return s.stub.PenalizeShop(req)


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda s, sid: _deposit(s, sid, 0), INVALID, "amount"),
        (lambda s, sid: _deposit(s, sid, -1), INVALID, "amount"),
        (lambda s, sid: _deposit(s, sid, 1, key=False), INVALID, "idempotency_key"),
        (lambda s, sid: _deposit(s, "nope", 1), NOT_FOUND, "shop_id"),
        (_compensate_unknown, NOT_FOUND, "dispute_id"),
        (_withdraw, grpc.StatusCode.FAILED_PRECONDITION, "deposit"),
        (lambda s, sid: _deposit(s, sid, 2**63 - 1), INVALID, "overflow"),
        (_penalize_unknown, INVALID, "violation"),
    ],
)
def test_bad_requests_get_clear_codes_and_write_nothing(
    served: Served, make: object, code: grpc.StatusCode, words: str
) -> None:
    s = served
    sid = shop(s, deposit=0)
    before = len(s.book.journal())
    got, details = code_of(lambda: make(s, sid))  # type: ignore[operator]
    assert got == code and words in details
    assert len(s.book.journal()) == before


def test_payout_the_fund_cannot_cover_is_refused(served: Served) -> None:
    s, sid = served, shop(served)
    d = f"d-{sid}"
    fund = s.stub.GetAccountStatement(
        pb.GetAccountStatementRequest(account_id="platform:fund", limit=1)
    )
    big = fund.account.balance_fen + 1
    s.stub.OpenDispute(
        pb.OpenDisputeRequest(
            idempotency_key=s.key(), dispute_id=d, shop_id=sid, order_id="o", order_amount_fen=big
        )
    )
    before = len(s.book.journal())
    got, details = code_of(
        lambda: s.stub.CompensateBuyer(
            pb.CompensateBuyerRequest(idempotency_key=s.key(), dispute_id=d, amount_fen=big)
        )
    )
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "fund" in details
    assert len(s.book.journal()) == before
    got, details = code_of(
        lambda: s.stub.CompensateBuyer(
            pb.CompensateBuyerRequest(idempotency_key=s.key(), dispute_id=d, amount_fen=big + 1)
        )
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "order" in details


def test_key_reused_with_other_content_is_already_exists(served: Served) -> None:
    s, sid = served, shop(served)
    key = s.key()
    s.stub.Deposit(pb.DepositRequest(idempotency_key=key, shop_id=sid, amount_fen=100))
    got, details = code_of(
        lambda: s.stub.Deposit(pb.DepositRequest(idempotency_key=key, shop_id=sid, amount_fen=101))
    )
    assert got == grpc.StatusCode.ALREADY_EXISTS and "different request" in details


def test_64_concurrent_identical_compensations_pay_once_50_times(served: Served) -> None:
    s, sid = served, shop(served, deposit=1_000)
    for round_ in range(50):
        d = f"d-{sid}-{round_}"
        s.stub.OpenDispute(
            pb.OpenDisputeRequest(
                idempotency_key=s.key(), dispute_id=d, shop_id=sid, order_id=d, order_amount_fen=900
            )
        )
        req = pb.CompensateBuyerRequest(idempotency_key=f"comp-{d}", dispute_id=d, amount_fen=900)
        calls = [s.stub.CompensateBuyer.future(req) for _ in range(64)]
        receipts = [c.result().receipt for c in calls]
        assert sum(not r.replayed for r in receipts) == 1
        assert len({tuple(t.id for t in r.transfers) for r in receipts}) == 1
        payouts = [t for t in s.book.store.transfers(ref=f"dispute/{d}") if t.code == 6]
        assert len(payouts) == 1 and payouts[0].amount == 900
    assert s.stub.VerifyLedger(pb.VerifyLedgerRequest()).problems == []


def test_64_concurrent_compensations_with_different_keys_pay_once(served: Served) -> None:
    s, sid = served, shop(served)
    for round_ in range(5):
        d = f"dk-{sid}-{round_}"
        s.stub.OpenDispute(
            pb.OpenDisputeRequest(
                idempotency_key=s.key(), dispute_id=d, shop_id=sid, order_id=d, order_amount_fen=900
            )
        )
        calls = [
            s.stub.CompensateBuyer.future(
                pb.CompensateBuyerRequest(
                    idempotency_key=f"ck-{d}-{i}", dispute_id=d, amount_fen=900
                )
            )
            for i in range(64)
        ]
        codes = [c.code() for c in calls]
        assert codes.count(grpc.StatusCode.OK) == 1
        assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 63
        dispute = s.stub.GetDisputeStatement(pb.GetDisputeStatementRequest(dispute_id=d))
        assert dispute.paid_fen == 900


def test_the_actor_is_the_authenticated_caller_or_anonymous() -> None:
    import contextvars

    from riskd.service import auth
    from riskd.service.ledger import caller

    assert caller(None) == "anonymous"  # type: ignore[arg-type]
    ctx = contextvars.copy_context()
    ctx.run(auth._current.set, auth.Identity("cert:alice", frozenset({auth.ANALYST})))
    assert ctx.run(caller, None) == "cert:alice"
