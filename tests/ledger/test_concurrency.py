"""Concurrent requests on one book (16 threads, each with its own connection), both backends."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from riskd.domain.clock import FakeClock
from riskd.errors import AlreadyExistsError, InsufficientFundsError, RiskdError
from riskd.ledger import Book, Code
from riskd.ledger import accounts as acc
from riskd.ledger.store import StoredRequest
from tests.ledger.conftest import funded, new_url

THREADS = 16


def outcomes(calls: list[Callable[[], object]]) -> list[str]:
    """Run the calls on 16 threads; each result is "ok" or the error's class name."""

    def one(call: Callable[[], object]) -> str:
        try:
            call()
        except RiskdError as e:
            return type(e).__name__
        return "ok"

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, calls))


def test_concurrent_payouts_never_take_the_fund_below_zero(book: Book) -> None:
    funded(book, fund=10 * 1_000, shops={"s1": 0})
    for i in range(32):
        book.open_dispute(f"o{i}", f"d{i}", "s1", f"order{i}", 1_000, actor="a")
    results = outcomes(
        [(lambda i=i: book.compensate_buyer(f"c{i}", f"d{i}", 1_000, actor="a")) for i in range(32)]
    )
    assert results.count("ok") == 10
    assert results.count(InsufficientFundsError.__name__) == 22
    assert book.account(acc.FUND).balance == 0
    assert book.verify() == ()


def test_concurrent_withdrawals_never_overdraw_the_deposit(book: Book) -> None:
    funded(book, shops={"s1": 10_000})
    results = outcomes(
        [(lambda i=i: book.withdraw(f"w{i}", "s1", 1_000, actor="m")) for i in range(32)]
    )
    assert results.count("ok") == 10
    assert book.account(acc.deposit_account("s1")).balance == 0
    assert book.verify() == ()


def test_one_penalty_per_case_under_concurrent_duplicates(book: Book) -> None:
    funded(book, shops={"s1": 10_000_000})
    results = outcomes(
        [
            (
                lambda i=i: book.penalize_shop(
                    f"p{i}", "s1", "order_brushing", "case-1", evidence="ev", actor="a"
                )
            )
            for i in range(32)
        ]
    )
    assert results.count("ok") == 1
    assert results.count(AlreadyExistsError.__name__) == 31
    assert len([t for t in book.journal() if t.code is Code.PENALTY]) == 1


def test_concurrent_identical_requests_post_once(book: Book) -> None:
    funded(book, shops={"s1": 0})
    book.open_dispute("o1", "d1", "s1", "order1", 1_000, actor="a")
    results = outcomes(
        [(lambda: book.compensate_buyer("same", "d1", 700, actor="a")) for _ in range(32)]
    )
    assert results == ["ok"] * 32
    assert book.dispute_statement("d1").paid == 700
    assert len([t for t in book.journal() if t.code is Code.COMPENSATION]) == 1


@pytest.mark.parametrize("amount", [700, 900])
def test_a_key_committed_after_the_lookup_is_judged_in_the_transaction(
    book: Book, monkeypatch: pytest.MonkeyPatch, amount: int
) -> None:
    """The race the test above needs, made to happen every run: a request with the same
    key commits 700 (on another thread, its own connection) after this call's lock-free
    lookup found nothing. The check inside the write transaction must answer the same
    request as a replay, not post the payout again (the test above caught a removed
    check on SQLite only sometimes), and refuse another amount: a caller handed the
    other request's receipt would believe its own amount was paid."""
    funded(book, shops={"s1": 0})
    book.open_dispute("o1", "d1", "s1", "order1", 1_000, actor="a")
    read_request = book.store.read_request
    raced: list[bool] = []

    def lookup_then_lose_the_race(key: str) -> StoredRequest | None:
        prior = read_request(key)
        if not raced:
            raced.append(True)
            with ThreadPoolExecutor(1) as other:
                first = other.submit(book.compensate_buyer, "same", "d1", 700, actor="a")
                assert first.result().replayed is False
        return prior

    monkeypatch.setattr(book.store, "read_request", lookup_then_lose_the_race)
    if amount == 700:
        assert book.compensate_buyer("same", "d1", amount, actor="a").replayed is True
    else:
        with pytest.raises(AlreadyExistsError, match="idempotency_key: already used"):
            book.compensate_buyer("same", "d1", amount, actor="a")
    assert raced
    assert book.dispute_statement("d1").paid == 700
    assert book.account(acc.FUND).balance == 2_000_000_000 - 700
    assert len([t for t in book.journal() if t.code is Code.COMPENSATION]) == 1
    assert book.verify() == ()


def test_mixed_concurrent_traffic_keeps_every_invariant(book: Book) -> None:
    shops = {f"s{i}": 50_000 for i in range(4)}
    funded(book, fund=200_000, shops=shops)
    for i in range(40):
        book.open_dispute(f"o{i}", f"d{i}", f"s{i % 4}", f"order{i}", 30_000, actor="a")
    calls: list[Callable[[], object]] = []
    for i in range(40):
        s = f"s{i % 4}"
        calls += [
            lambda i=i: book.compensate_buyer(f"c{i}", f"d{i}", 20_000, actor="a"),
            lambda i=i, s=s: book.deposit(f"dep{i}", s, 5_000, actor="m"),
            lambda i=i, s=s: book.collect_claim(f"col{i}", s, 3_000, actor="ops"),
            lambda i=i, s=s: book.pay_late_shipment_coupon(f"cp{i}", s, f"order{i}", actor="a"),
        ]

    def verify_now() -> None:
        assert book.verify() == ()  # a consistent view even while others write

    calls[::16] = [verify_now] * len(calls[::16])
    results = outcomes(calls)
    assert "UnavailableError" not in results
    assert book.verify() == ()
    for i in range(40):
        d = book.dispute_statement(f"d{i}")
        assert d.paid in (0, 20_000)


def write_during_read(book: Book, table: str, write: Callable[[], object]) -> None:
    """Run ``write`` (through another connection) just before this thread's connection
    first reads ``table`` from now on: a writer committing in the middle of a statement."""
    conn = book.db._connect()
    done = False

    def trace(sql: str) -> None:
        nonlocal done
        if not done and sql.lstrip().upper().startswith("SELECT") and table in sql:
            done = True
            with ThreadPoolExecutor(1) as other:  # its own thread: its own connection
                other.submit(write).result()

    conn.set_trace_callback(trace)


def test_a_statement_is_read_at_one_moment_though_a_write_lands_in_between(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Review: a statement read its totals and its lines in separate queries; a payout
    committed in between gave a shop statement whose owed was not the sum of its claims,
    and an account statement whose page held a transfer its totals left out."""
    book = funded(Book.open(new_url("sqlite", tmp_path), clock=clock), shops={"s1": 0})
    try:
        for i in range(2):
            book.open_dispute(f"o{i}", f"d{i}", "s1", f"order{i}", 1_000, actor="a")
        pay = [
            lambda i=i: book.compensate_buyer(f"c{i}", f"d{i}", 1_000, actor="a") for i in (0, 1)
        ]
        write_during_read(book, "ledger_accounts", pay[0])
        shop = book.shop_statement("s1")
        assert shop.owed == sum(c.outstanding for c in shop.claims)
        write_during_read(book, "ledger_transfers", pay[1])
        s = book.account_statement(acc.claim_account("s1"), limit=10_000)
        assert s.account.debits == sum(t.amount for t in s.transfers)
        assert book.shop_statement("s1").owed == 2_000  # both payouts landed
    finally:
        book.close()


def test_statements_agree_with_themselves_under_live_writes(book: Book) -> None:
    funded(book, shops={"s1": 0})
    claim = acc.claim_account("s1")
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            book.open_dispute(f"o{i}", f"d{i}", "s1", f"order{i}", 1_000, actor="a")
            book.compensate_buyer(f"c{i}", f"d{i}", 1_000, actor="a")
            book.collect_claim(f"k{i}", "s1", 1_000, actor="ops")

    disagreeing = 0
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(write)
        try:
            for _ in range(150):
                shop = book.shop_statement("s1")
                disagreeing += shop.owed != sum(c.outstanding for c in shop.claims)
                s = book.account_statement(claim, limit=10_000)
                paged = sum(
                    t.amount if t.debit_account == claim else -t.amount for t in s.transfers
                )
                disagreeing += s.account.balance != paged
        finally:
            stop.set()
        writing.result()
    assert disagreeing == 0
