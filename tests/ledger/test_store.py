"""The database itself refuses what must never happen, even if the code had a bug."""

from __future__ import annotations

import pytest

from riskd.ledger import Book, Code
from riskd.ledger import accounts as acc
from riskd.ledger.transfers import Transfer
from tests.ledger.conftest import funded


def raw(book: Book, sql: str, params: tuple[object, ...] = ()) -> None:
    with book.db.transaction() as tx:
        tx.execute(sql, params)


def test_transfers_cannot_be_updated_or_deleted(book: Book) -> None:
    funded(book, shops={"s1": 100})
    with pytest.raises(Exception, match="append-only"):
        raw(book, "UPDATE ledger_transfers SET amount = 1")
    with pytest.raises(Exception, match="append-only"):
        raw(book, "DELETE FROM ledger_transfers")
    with pytest.raises(Exception, match="append-only"):
        raw(book, "DELETE FROM ledger_requests")
    assert book.verify() == ()


def test_limited_accounts_cannot_go_negative_in_the_database(book: Book) -> None:
    funded(book, fund=100, shops={"s1": 100})
    for account in (acc.FUND, acc.deposit_account("s1")):
        with pytest.raises(Exception, match=r"(?i)check"):
            raw(book, "UPDATE ledger_accounts SET debits = credits + 1 WHERE id = ?", (account,))
    with pytest.raises(Exception, match=r"(?i)check"):
        raw(book, "UPDATE ledger_accounts SET credits = 1 WHERE id = ?", (acc.claim_account("s1"),))
    assert book.verify() == ()


def test_transfer_ids_are_unique_and_amounts_positive(book: Book) -> None:
    funded(book, shops={"s1": 100})
    t = Transfer("x#0", acc.BANK, acc.deposit_account("s1"), 5, Code.DEPOSIT, "", "x", "a")
    with book.db.transaction() as tx:
        book.store.post(tx, [t])
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), book.db.transaction() as tx:
        book.store.post(tx, [t])
    bad = Transfer("y#0", acc.BANK, acc.deposit_account("s1"), -5, Code.DEPOSIT, "", "y", "a")
    with pytest.raises(Exception, match=r"(?i)check"), book.db.transaction() as tx:
        tx.execute(
            "INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, code,"
            " ref, request_key, actor, reason, evidence, at)"
            " VALUES (?, ?, ?, ?, 1, '', 'y', 'a', '', '', 0)",
            (bad.id, bad.debit_account, bad.credit_account, bad.amount),
        )
    assert book.verify() == ()


def test_a_second_compensation_for_a_dispute_is_refused_by_the_database(book: Book) -> None:
    funded(book, shops={"s1": 0})
    book.open_dispute("o1", "d1", "s1", "order-1", 900, actor="a")
    book.compensate_buyer("c1", "d1", 100, actor="a")
    t = Transfer("z#0", acc.FUND, acc.BUYERS, 5, Code.COMPENSATION, "dispute/d1", "z", "a")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), book.db.transaction() as tx:
        book.store.post(tx, [t])
    assert book.dispute_statement("d1").paid == 100


def test_schema_creation_is_idempotent(book: Book, db_url: str) -> None:
    funded(book, shops={"s1": 100})
    again = Book.open(db_url, clock=book.clock)
    assert again.account(acc.deposit_account("s1")).balance == 100
    again.close()


def test_sqlite_runs_wal_with_full_sync(tmp_path: object) -> None:
    book = Book.open(f"sqlite:///{tmp_path}/x.db")
    assert book.store.query("PRAGMA journal_mode") == [("wal",)]
    assert book.store.query("PRAGMA synchronous") == [(2,)]  # FULL
    book.close()


def test_verify_detects_a_balance_that_differs_from_the_journal(book: Book) -> None:
    funded(book, shops={"s1": 100})
    raw(book, "UPDATE ledger_accounts SET credits = credits + 1 WHERE id = ?", (acc.FUND,))
    problems = book.verify()
    assert "platform:fund: balance differs from the replayed journal" in problems
    assert "accounts do not sum to zero" in problems
    assert "fund: balance differs from top-ups - payouts + recoveries" in problems
