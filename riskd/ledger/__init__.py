"""Merchant money: security deposits, penalties, freezes and the compensation fund.

A double-entry ledger in the TigerBeetle style: accounts with integer fen
counters, immutable transfers with client-derived ids and codes, idempotent
requests, corrections as new transfers. ``Book`` is the API; ``LedgerStore``
its SQL (SQLite or PostgreSQL through ``riskd.sql``); ``LedgerShopDirectory``
the scorer's cached view of freezes. Nothing here imports scoring code.
"""

from riskd.ledger.accounts import Account, Kind
from riskd.ledger.book import Book, Receipt
from riskd.ledger.codes import Code
from riskd.ledger.directory import LedgerShopDirectory
from riskd.ledger.schedule import PenaltySchedule, Violation, load_schedule
from riskd.ledger.statements import (
    AccountStatement,
    ClaimLine,
    DisputeStatement,
    ShopStatement,
)
from riskd.ledger.transfers import Transfer

__all__ = [
    "Account",
    "AccountStatement",
    "Book",
    "ClaimLine",
    "Code",
    "DisputeStatement",
    "Kind",
    "LedgerShopDirectory",
    "PenaltySchedule",
    "Receipt",
    "ShopStatement",
    "Transfer",
    "Violation",
    "load_schedule",
]
