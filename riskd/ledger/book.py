"""The book: every money operation of the merchant ledger, each one idempotent and atomic.

Where it sits: analysts and operators call these through ``LedgerService``
(gRPC) or ``riskd ledger`` (CLI); the scorer only reads freezes through
``LedgerShopDirectory``. Scoring never moves money.

``Book`` gathers the operation groups (``merchants``, ``enforcement``,
``compensation``), the reads (``statements``) and the one write path
(``core``) over one SQL database.
"""

from __future__ import annotations

from typing import Any

from riskd.domain.clock import Clock, SystemClock
from riskd.ledger.compensation import CompensationOperations
from riskd.ledger.core import Receipt
from riskd.ledger.enforcement import EnforcementOperations
from riskd.ledger.merchants import MerchantOperations
from riskd.ledger.schedule import PenaltySchedule, load_schedule
from riskd.ledger.statements import Statements
from riskd.ledger.store import LedgerStore
from riskd.sql import Database

__all__ = ["Book", "Receipt"]


class Book(MerchantOperations, EnforcementOperations, CompensationOperations, Statements):
    """The merchant-money ledger over one SQL database (SQLite file or PostgreSQL).

    Args:
        db: the database; the book creates its tables if they are missing.
        schedule: the penalty schedule (default: the shipped ``penalties.toml``).
        clock: where "now" comes from (freezes, timestamps).
        read_only: create nothing: for reading a book the daemon made (review: the
            read-only CLI commands created or repaired the schema in a write
            transaction: a SELECT-only auditor's ``verify`` failed, SQLite's waited for
            the writer lock, PostgreSQL's deadlocked against live writes).
    """

    def __init__(
        self,
        db: Database,
        *,
        schedule: PenaltySchedule | None = None,
        clock: Clock | None = None,
        read_only: bool = False,
    ) -> None:
        self.db = db
        self.store = LedgerStore(db)
        self.schedule = schedule if schedule is not None else load_schedule()
        self.clock: Clock = clock if clock is not None else SystemClock()
        if not read_only:
            self.store.create_schema(self.clock.now())

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> Book:
        """A book over the database at ``url`` (``sqlite:///...`` or ``postgresql://...``)."""
        return cls(Database(url), **kwargs)

    def close(self) -> None:
        self.db.close()
