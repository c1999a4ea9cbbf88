"""LedgerService through a real gRPC server on port 0, on both backends."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import psycopg
import pytest

from riskd.domain.clock import FakeClock
from riskd.ledger import Book
from riskd.service import convert
from riskd.service.gen.riskd.v1 import ledger_pb2 as pb
from riskd.service.gen.riskd.v1 import ledger_pb2_grpc as pb_grpc
from riskd.service.interceptors import ErrorInterceptor
from riskd.service.ledger import add_ledger_service, timestamp
from riskd.service.metrics import Metrics
from riskd.service.slots import Slots
from riskd.sql import Database

PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"
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
    # Every RPC thread may run a ledger call (no scoring here); the cap has its own test.
    add_ledger_service(server, book, actor_of=lambda ctx: "cert:analyst-1", max_in_flight=16)
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
            order_id=f"o1-{sid}",
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


def _deposit(s: Served, sid: str, amount: int, key: bool = True, reason: str = "") -> object:
    req = pb.DepositRequest(
        idempotency_key=s.key() if key else "", shop_id=sid, amount_fen=amount, reason=reason
    )
    return s.stub.Deposit(req)


def _write_off_everything(s: Served, sid: str) -> object:
    req = pb.WriteOffClaimRequest(idempotency_key=s.key(), shop_id=sid, ref="", reason="r")
    return s.stub.WriteOffClaim(req)


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


def _open_dispute_for_nothing(s: Served, sid: str) -> object:
    req = pb.OpenDisputeRequest(
        idempotency_key=s.key(), dispute_id=f"d0-{sid}", shop_id=sid, order_id=f"o0-{sid}"
    )
    return s.stub.OpenDispute(req)


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
        (lambda s, sid: _deposit(s, sid, 10**12 + 1), INVALID, "amount: exceeds the maximum"),
        (_penalize_unknown, INVALID, "violation"),
        (lambda s, sid: _deposit(s, sid, 1, reason="a\x00b"), INVALID, "reason: must not"),
        (_write_off_everything, INVALID, "ref: must be dispute/<id> or case/<id>"),
        (_open_dispute_for_nothing, INVALID, "order_amount"),
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
            idempotency_key=s.key(), dispute_id=d, shop_id=sid, order_id=d, order_amount_fen=big
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


def test_a_retry_with_another_reason_is_already_exists_and_the_reason_is_recorded(
    served: Served,
) -> None:
    """The fingerprint covers the reason (review: OpenDispute, CompensateBuyer and
    CollectClaim could drop it on the way to the book, and a retry with another
    reason would pass for the first request)."""
    s, sid = served, shop(served)
    d = f"d-{sid}"
    calls = [
        (
            s.stub.OpenDispute,
            pb.OpenDisputeRequest(
                idempotency_key=s.key(),
                dispute_id=d,
                shop_id=sid,
                order_id=d,
                order_amount_fen=2_000,
                reason="buyer complaint",
            ),
        ),
        (
            s.stub.CompensateBuyer,
            pb.CompensateBuyerRequest(
                idempotency_key=s.key(), dispute_id=d, amount_fen=2_000, reason="not delivered"
            ),
        ),
        (
            s.stub.CollectClaim,
            pb.CollectClaimRequest(
                idempotency_key=s.key(), shop_id=sid, amount_fen=700, reason="bank transfer"
            ),
        ),
    ]
    for rpc, request in calls:
        first = rpc(request).receipt
        assert {t.reason for t in first.transfers} <= {request.reason}
        assert rpc(request).receipt.replayed
        before = len(s.book.journal())
        other = type(request)()
        other.CopyFrom(request)
        other.reason = "something else"
        got, details = code_of(lambda: rpc(other))  # noqa: B023
        assert got == grpc.StatusCode.ALREADY_EXISTS and "different request" in details
        assert len(s.book.journal()) == before


def test_an_account_statement_without_a_limit_holds_100_transfers(served: Served) -> None:
    s, sid = served, shop(served)
    for i in range(101):
        s.book.deposit(f"many-{sid}-{i}", sid, 1, actor="m")
    request = pb.GetAccountStatementRequest(account_id=f"shop:{sid}:deposit")
    page = s.stub.GetAccountStatement(request)
    assert len(page.transfers) == 100 and not page.truncated
    assert page.account.balance_fen == 101


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
    from riskd.service.callers import Identity
    from riskd.service.ledger import caller
    from riskd.service.policy import ANALYST

    assert caller(None) == "anonymous"  # type: ignore[arg-type]
    ctx = contextvars.copy_context()
    ctx.run(auth._current.set, Identity("cert:alice", frozenset({ANALYST})))
    assert ctx.run(caller, None) == "cert:alice"


def test_ledger_calls_beyond_the_cap_are_unavailable_at_once_and_replay_after() -> None:
    """Ledger calls may hold at most ``max_in_flight`` RPC threads; one more is refused
    at once (UNAVAILABLE), and its retry with the same key does the work once."""
    release = threading.Event()
    entered = threading.Barrier(3)

    class SlowBook:
        def __init__(self) -> None:
            self.calls = 0

        def register_shop(self, shop_id: str, *, merchant_id: str = "") -> bool:
            self.calls += 1
            if shop_id.startswith("slow"):
                entered.wait(5)
                release.wait(5)
            return True

    book = SlowBook()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), interceptors=[ErrorInterceptor(Metrics())]
    )
    add_ledger_service(server, book, max_in_flight=2)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.LedgerServiceStub(ch)
            slow = [
                stub.RegisterShop.future(pb.RegisterShopRequest(shop_id=f"slow{i}"), timeout=10)
                for i in range(2)
            ]
            entered.wait(5)  # both slots taken
            started = time.monotonic()
            got, details = code_of(
                lambda: stub.RegisterShop(pb.RegisterShopRequest(shop_id="s3"), timeout=5)
            )
            assert got == grpc.StatusCode.UNAVAILABLE and "ledger busy" in details
            assert time.monotonic() - started < 1
            # every ledger RPC shares the cap (this book has no other method to reach)
            for method in pb.DESCRIPTOR.services_by_name["LedgerService"].methods:
                request = getattr(pb, method.input_type.name)()
                call = getattr(stub, method.name)
                got, details = code_of(lambda: call(request, timeout=5))  # noqa: B023
                assert (got, details) == (grpc.StatusCode.UNAVAILABLE, details), method.name
                assert "ledger busy" in details, method.name
            release.set()
            assert all(f.result().created for f in slow)
            assert stub.RegisterShop(pb.RegisterShopRequest(shop_id="s3"), timeout=5).created
            assert book.calls == 3
    finally:
        release.set()
        server.stop(None).wait()


def test_a_cap_below_one_call_is_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight must be at least 1"):
        Slots(0, "ledger")


@pytest.mark.postgres
def test_a_held_ledger_lock_never_starves_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another session (a stalled replica) holds the ledger's writer lock: ledger writes
    answer UNAVAILABLE within their bound, and Score on the same server (4 RPC threads)
    still answers promptly while they wait."""
    from riskd.ledger import store
    from riskd.service.gen.riskd.v1 import scoring_pb2, scoring_pb2_grpc
    from riskd.service.server import create_server
    from tests.service.conftest import make_config
    from tests.service.test_scoring import fresh

    monkeypatch.setattr(store, "WRITE_WAIT_S", 1.0)
    url = f"{PG_BASE}?schema=ledger_starve_{uuid.uuid4().hex[:12]}"
    tokens = {"tok-op": "ops:operator,checkout"}
    running = create_server(make_config(tmp_path, database_url=url, auth={"tokens": tokens}))
    md = (("authorization", "Bearer tok-op"),)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch,
            psycopg.connect(PG_BASE, autocommit=True) as holder,
        ):
            ledger = pb_grpc.LedgerServiceStub(ch)
            scoring = scoring_pb2_grpc.ScoringServiceStub(ch)
            ledger.RegisterShop(pb.RegisterShopRequest(shop_id="s1"), metadata=md, timeout=5)

            def score() -> float:
                started = time.monotonic()
                msg = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
                scoring.Score(msg, metadata=md, timeout=2)
                return time.monotonic() - started

            score()  # warm
            lock = Database(url).scoped_lock(store.LEDGER_WRITER_LOCK)  # this schema's
            holder.execute("SELECT pg_advisory_lock(%s)", (lock,))
            started = time.monotonic()
            deposits = [
                ledger.Deposit.future(
                    pb.DepositRequest(idempotency_key=f"d{i}", shop_id="s1", amount_fen=100),
                    metadata=md,
                    timeout=10,
                )
                for i in range(6)
            ]
            time.sleep(0.2)  # the first ones are waiting for the lock
            assert score() < 0.5
            codes = [f.code() for f in deposits]
            assert codes == [grpc.StatusCode.UNAVAILABLE] * 6
            assert time.monotonic() - started < 3
            holder.execute("SELECT pg_advisory_unlock(%s)", (lock,))
            receipt = ledger.Deposit(
                pb.DepositRequest(idempotency_key="d0", shop_id="s1", amount_fen=100),
                metadata=md,
                timeout=5,
            ).receipt
            assert not receipt.replayed and receipt.transfers[0].amount_fen == 100
    finally:
        running.stop(1)
        cleanup = Database(url)
        cleanup.drop_schema()
        cleanup.close()


def test_statements_and_account_lists_page_within_the_servers_send_limit(
    tmp_path: Path,
) -> None:
    """Review: 1,500 transfers with 1,000-character reasons (or 15,000 accounts) passed
    the 4 MiB send limit: RESOURCE_EXHAUSTED, and ListAccounts could not page. Replies
    stop where they would pass the limit and say how to go on."""
    limit = 80 * 1024  # the server's max_message_bytes, small to need few rows
    book = Book(Database(f"sqlite:///{tmp_path / 'ledger.db'}"), clock=FakeClock(1.8e9))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[ErrorInterceptor(Metrics())],
        options=[("grpc.max_send_message_length", limit)],
    )
    add_ledger_service(server, book, actor_of=lambda ctx: "cert:a", max_reply_bytes=limit)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            for i in range(100):
                reason = f"{i:04d}" + "x" * 996
                stub.TopUpFund(
                    pb.TopUpFundRequest(idempotency_key=f"t{i}", amount_fen=1, reason=reason)
                )
            for i in range(400):
                stub.RegisterShop(pb.RegisterShopRequest(shop_id=f"shop-{i:04d}-" + "s" * 100))
            seen: list[int] = []
            after, pages = 0, 0
            while True:
                page = stub.GetAccountStatement(
                    pb.GetAccountStatementRequest(
                        account_id="platform:fund", after_seq=after, limit=1000
                    )
                )
                pages += 1
                seen += [int(t.reason[:4]) for t in page.transfers]
                if not page.truncated:
                    break
                after = page.transfers[-1].seq
            assert seen == list(range(100)) and pages > 1
            ids: list[str] = []
            after_id, pages = "", 0
            while True:
                listed = stub.ListAccounts(pb.ListAccountsRequest(after_id=after_id))
                pages += 1
                ids += [a.id for a in listed.accounts]
                if not listed.next_after_id:
                    break
                after_id = listed.next_after_id
            assert ids == sorted(a.id for a in book.accounts()) and pages > 1
            short = stub.ListAccounts(pb.ListAccountsRequest(limit=3))
            assert len(short.accounts) == 3 and short.next_after_id == short.accounts[-1].id
            with pytest.raises(grpc.RpcError) as e:
                stub.ListAccounts(pb.ListAccountsRequest(limit=-1))
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(None).wait()
        book.close()


def test_a_send_limit_below_the_reply_margin_still_pages_statements(tmp_path: Path) -> None:
    """``max_message_bytes`` may be any positive size: a 32 KiB limit gave list replies a
    64 KiB budget (the margin's floor), twice what the server may send."""
    limit = 32 * 1024
    book = Book(Database(f"sqlite:///{tmp_path / 'ledger.db'}"), clock=FakeClock(1.8e9))
    for i in range(60):
        book.top_up_fund(f"t{i}", 1, actor="cert:a", reason=f"{i:04d}" + "x" * 996)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[ErrorInterceptor(Metrics())],
        options=[("grpc.max_send_message_length", limit)],
    )
    add_ledger_service(server, book, max_reply_bytes=limit)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            request = pb.GetAccountStatementRequest(account_id="platform:fund", limit=1000)
            page = stub.GetAccountStatement(request)
        assert page.truncated and 1 < len(page.transfers) < 60  # a page, not one line
        assert page.ByteSize() <= limit
    finally:
        server.stop(None).wait()
        book.close()


def test_a_reply_budget_below_one_row_still_sends_one_per_page(tmp_path: Path) -> None:
    """Every page holds at least one row, or paging would never move on: a statement
    would say ``truncated`` with nothing after which to ask again, and an account list
    would end with no ``next_after_id``, silently short."""
    book = Book(Database(f"sqlite:///{tmp_path / 'ledger.db'}"), clock=FakeClock(1.8e9))
    for i in range(3):
        book.top_up_fund(f"t{i}", 1, actor="cert:a", reason=f"r{i}")
    book.register_shop("s1")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor(Metrics())]
    )
    add_ledger_service(server, book, max_reply_bytes=64)  # room for less than one row
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            request = pb.GetAccountStatementRequest(account_id="platform:fund")
            page = stub.GetAccountStatement(request)
            assert [t.reason for t in page.transfers] == ["r0"] and page.truncated
            ids: list[str] = []
            after_id = ""
            for _ in range(10):
                listed = stub.ListAccounts(pb.ListAccountsRequest(after_id=after_id))
                assert len(listed.accounts) == 1
                ids.append(listed.accounts[0].id)
                after_id = listed.next_after_id
                if not after_id:
                    break
        assert ids == sorted(a.id for a in book.accounts())
    finally:
        server.stop(None).wait()
        book.close()


@pytest.mark.parametrize(
    ("field", "text", "kind"),
    [
        ("reason", "商户电话 138 1234 5678 补缴", "a mobile phone number"),
        ("evidence", "买家身份证 11010519491231002X", "a resident ID number"),
        ("reason", "退款卡号 6222021234567890128", "a bank card number"),
        ("evidence", "mailto:zhang.san@example.com", "an e-mail address"),
        ("reason", "赔付给买家，收款人：王芳", "a person's name"),
    ],
)
def test_a_reason_or_evidence_holding_pii_is_refused_and_writes_nothing(
    served: Served, field: str, text: str, kind: str
) -> None:
    """Both are kept as written in the append-only journal, for good."""
    s, key = served, served.key()
    fund = pb.GetAccountStatementRequest(account_id="platform:fund")
    before = s.stub.GetAccountStatement(fund).account.balance_fen
    text_fields = {"reason": "top-up 2026-11", field: text}
    request = pb.TopUpFundRequest(idempotency_key=key, amount_fen=100, **text_fields)
    code, details = code_of(lambda: s.stub.TopUpFund(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"{field}: looks like it holds {kind}; free text must not carry personal data"
    assert s.stub.GetAccountStatement(fund).account.balance_fen == before
    # nothing was stored under the key: the same key with clean text is a new request
    clean = pb.TopUpFundRequest(idempotency_key=key, amount_fen=100, reason="top-up 2026-11")
    assert not s.stub.TopUpFund(clean).receipt.replayed
    assert s.stub.GetAccountStatement(fund).account.balance_fen == before + 100


def test_deposit_and_withdraw_receipts_and_statements_carry_every_field(served: Served) -> None:
    s, sid = served, shop(served)
    assert not s.stub.RegisterShop(pb.RegisterShopRequest(shop_id=sid, merchant_id="m1")).created
    key = s.key()
    r = s.stub.Deposit(
        pb.DepositRequest(idempotency_key=key, shop_id=sid, amount_fen=10_000, reason="top-up")
    ).receipt
    assert (r.idempotency_key, r.operation, r.replayed) == (key, "deposit", False)
    assert not r.HasField("frozen_until")  # only a freeze sets it
    (t,) = r.transfers
    deposit = f"shop:{sid}:deposit"
    assert (t.debit_account, t.credit_account, t.amount_fen) == ("external:bank", deposit, 10_000)
    assert (t.code, t.idempotency_key, t.actor, t.reason) == (
        pb.TRANSFER_CODE_DEPOSIT,
        key,
        "cert:analyst-1",
        "top-up",
    )
    assert t.posted_at.seconds == 1_800_000_000 and t.seq > 0
    w = s.stub.Withdraw(
        pb.WithdrawRequest(idempotency_key=s.key(), shop_id=sid, amount_fen=3_000, reason="payout")
    ).receipt
    (t,) = w.transfers
    assert (t.debit_account, t.credit_account, t.amount_fen, t.reason) == (
        deposit,
        "external:bank",
        3_000,
        "payout",
    )
    acct = s.stub.GetAccountStatement(pb.GetAccountStatementRequest(account_id=deposit)).account
    assert (acct.id, acct.kind, acct.shop_id) == (deposit, "deposit", sid)
    assert (acct.debits_fen, acct.credits_fen, acct.balance_fen) == (3_000, 10_000, 7_000)
    st = s.stub.GetShopStatement(pb.GetShopStatementRequest(shop_id=sid))
    assert (st.shop_id, st.merchant_id, st.deposit_fen, st.owed_fen) == (sid, "m1", 7_000, 0)
    assert not st.frozen and not st.HasField("frozen_until") and list(st.claims) == []


def test_claims_freeze_and_dispute_story_through_grpc(served: Served) -> None:
    """A penalty the deposit cannot cover, then a dispute: the shop owes two claims; a
    collection names one, a write-off gives part of the other up, an operator unfreezes."""
    s, sid = served, shop(served, deposit=1_000)
    case, d = f"case-{sid}", f"d-{sid}"
    p = s.stub.PenalizeShop(
        pb.PenalizeShopRequest(
            idempotency_key=s.key(),
            shop_id=sid,
            violation="content_violation_serious",
            case_id=case,
            evidence="case://7",
            reason="fake orders",
        )
    ).receipt
    assert [(t.ref, t.reason, t.evidence) for t in p.transfers] == [
        (f"case/{case}", "fake orders", "case://7")
    ] * 2
    s.stub.OpenDispute(
        pb.OpenDisputeRequest(
            idempotency_key=s.key(), dispute_id=d, shop_id=sid, order_id=d, order_amount_fen=5_000
        )
    )
    c = s.stub.CompensateBuyer(
        pb.CompensateBuyerRequest(
            idempotency_key=s.key(), dispute_id=d, amount_fen=5_000, evidence="refund/88"
        )
    ).receipt
    assert {t.evidence for t in c.transfers} == {"refund/88"}
    st = s.stub.GetShopStatement(pb.GetShopStatementRequest(shop_id=sid))
    assert st.frozen and st.frozen_until == p.frozen_until
    claims = [(c.ref, c.outstanding_fen) for c in st.claims]
    assert claims == [(f"case/{case}", 299_000), (f"dispute/{d}", 5_000)]
    assert st.owed_fen == 304_000
    s.stub.CollectClaim(  # the newer claim, named: not the oldest first
        pb.CollectClaimRequest(
            idempotency_key=s.key(), shop_id=sid, amount_fen=1_500, ref=f"dispute/{d}"
        )
    )
    w = s.stub.WriteOffClaim(
        pb.WriteOffClaimRequest(
            idempotency_key=s.key(), shop_id=sid, ref=f"case/{case}", amount_fen=99_000, reason="r"
        )
    ).receipt
    assert [t.amount_fen for t in w.transfers] == [99_000]
    dispute = s.stub.GetDisputeStatement(pb.GetDisputeStatementRequest(dispute_id=d))
    assert (dispute.shop_id, dispute.order_id, dispute.order_amount_fen) == (sid, d, 5_000)
    assert (dispute.paid_fen, dispute.collected_fen, dispute.outstanding_fen) == (
        5_000,
        1_500,
        3_500,
    )
    assert {t.ref for t in dispute.transfers} == {f"dispute/{d}"} and len(dispute.transfers) >= 3
    st = s.stub.GetShopStatement(pb.GetShopStatementRequest(shop_id=sid))
    assert [(c.ref, c.outstanding_fen) for c in st.claims] == [
        (f"case/{case}", 200_000),
        (f"dispute/{d}", 3_500),
    ]
    u = s.stub.UnfreezeShop(
        pb.UnfreezeShopRequest(idempotency_key=s.key(), shop_id=sid, reason="appeal granted")
    ).receipt
    assert (
        u.operation == "unfreeze"
        and not s.stub.GetShopStatement(pb.GetShopStatementRequest(shop_id=sid)).frozen
    )
    rows = s.book.db.query(
        "SELECT actor, reason FROM ledger_freezes WHERE shop_id = ? AND action = 'unfreeze'",
        (sid,),
    )
    assert [tuple(r) for r in rows] == [("cert:analyst-1", "appeal granted")]


def test_a_late_shipment_coupon_is_paid_once_from_the_fund(served: Served) -> None:
    s, sid = served, shop(served)
    key, order = s.key(), f"o-{sid}"
    request = pb.PayLateShipmentCouponRequest(
        idempotency_key=key, shop_id=sid, order_id=order, evidence="waybill/SF1"
    )
    r = s.stub.PayLateShipmentCoupon(request).receipt
    (t,) = r.transfers
    assert (t.code, t.amount_fen, t.debit_account, t.credit_account) == (
        pb.TRANSFER_CODE_COUPON,
        500,  # the schedule's, not the caller's
        "platform:fund",
        "external:buyers",
    )
    assert (t.ref, t.evidence, t.actor) == (f"order/{order}", "waybill/SF1", "cert:analyst-1")
    assert s.stub.PayLateShipmentCoupon(request).receipt.replayed
    again = pb.PayLateShipmentCouponRequest(idempotency_key=s.key(), shop_id=sid, order_id=order)
    got, details = code_of(lambda: s.stub.PayLateShipmentCoupon(again))
    assert got == grpc.StatusCode.ALREADY_EXISTS and "order_id" in details


def test_verify_ledger_names_what_is_broken(tmp_path: Path) -> None:
    """Review: only a sound book (no problems) was checked through gRPC."""
    path = tmp_path / "ledger.db"
    book = Book(Database(f"sqlite:///{path}"), clock=FakeClock(1.8e9))
    book.register_shop("s1")
    book.deposit("d1", "s1", 1_000, actor="m")
    conn = sqlite3.connect(path, isolation_level=None)
    try:  # as someone holding the file could: the append-only trigger out of the way
        triggers = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        for (name,) in conn.execute(f"{triggers} AND tbl_name = 'ledger_transfers'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE ledger_transfers SET amount = amount + 1")
    finally:
        conn.close()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor(Metrics())]
    )
    add_ledger_service(server, book)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            problems = pb_grpc.LedgerServiceStub(channel).VerifyLedger(pb.VerifyLedgerRequest())
        assert any("shop:s1:deposit" in p for p in problems.problems), problems
    finally:
        server.stop(None).wait()
        book.close()


def test_timestamps_keep_fractions_of_a_second() -> None:
    ts = timestamp(1_800_000_000.25)
    assert ts.seconds == 1_800_000_000 and abs(ts.nanos - 250_000_000) < 1_000  # float's step


def test_a_statement_over_4_mib_is_sent_whole_when_max_message_bytes_allows_it(
    tmp_path: Path,
) -> None:
    # an operator who raised max_message_bytes reads a long statement in one reply: the
    # server's send limit and the statement's reply budget must both follow the config
    from riskd.service.server import create_server
    from tests.service.conftest import make_config

    url = f"sqlite:///{tmp_path / 'riskd.db'}"
    book = Book(Database(url), clock=FakeClock(1.8e9))
    wide = "账" * 1000  # 1,000 characters (the most a reason or evidence holds), 3,000 bytes
    for i in range(800):
        book.top_up_fund(f"t{i}", 1, actor="cert:a", reason=f"{i:04d}{wide[4:]}", evidence=wide)
    book.close()
    limit = 16 * 1024 * 1024
    auth = {"tokens": {"tok-op": "ops:operator"}}
    running = create_server(
        make_config(tmp_path, database_url=url, max_message_bytes=limit, auth=auth)
    )
    options = [("grpc.max_receive_message_length", limit)]  # the client's own is 4 MiB
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            request = pb.GetAccountStatementRequest(account_id="platform:fund", limit=1000)
            md = (("authorization", "Bearer tok-op"),)
            page = stub.GetAccountStatement(request, metadata=md, timeout=30)
        assert page.ByteSize() > 4 * 1024 * 1024
        assert not page.truncated
        assert [int(t.reason[:4]) for t in page.transfers] == list(range(800))
    finally:
        running.stop(1)
