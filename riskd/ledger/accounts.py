"""Accounts of the merchant-money ledger: who holds what, in integer fen.

Every account keeps two counters, ``debits`` and ``credits`` (TigerBeetle's
``debits_posted``/``credits_posted``); a transfer adds its amount to the
debits of one account and the credits of another, so the sum of
``credits - debits`` over all accounts is always zero. An account's
``balance`` reads in its normal direction (credit-normal accounts hold money,
debit-normal accounts are money owed or lost). Limits are enforced in code and
again by CHECK constraints in the database.

The chart of accounts::

    external:bank             debit   money that came in from outside (merchants, operators)
    external:buyers           credit  money paid out to buyers (compensation, coupons)
    platform:fund             credit  the quality-guarantee fund; never negative
    platform:penalty_income   credit  penalties charged (deducted or claimed)
    platform:recoveries_accrued credit  fund recoveries claimed from merchants, not collected
                                        (written-off claims stay here: see written_off)
    platform:written_off      debit   claims the platform gave up on
    shop:<id>:deposit         credit  a merchant's security deposit; never negative
    shop:<id>:claim           debit   what a merchant owes the platform; never below zero
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

BANK = "external:bank"
BUYERS = "external:buyers"
FUND = "platform:fund"
PENALTY_INCOME = "platform:penalty_income"
RECOVERIES_ACCRUED = "platform:recoveries_accrued"
WRITTEN_OFF = "platform:written_off"

EXTERNAL_ACCOUNTS: frozenset[str] = frozenset({BANK, BUYERS})


class Limit(enum.IntEnum):
    """Which way an account may not go (stored in the database's CHECK constraint)."""

    NONE = 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2


class Kind(enum.Enum):
    """The role of an account; decides its normal side and its limit."""

    BANK = "bank"
    BUYERS = "buyers"
    FUND = "fund"
    PENALTY_INCOME = "penalty_income"
    RECOVERIES_ACCRUED = "recoveries_accrued"
    WRITTEN_OFF = "written_off"
    DEPOSIT = "deposit"
    CLAIM = "claim"

    @property
    def limit(self) -> Limit:
        if self in (Kind.FUND, Kind.DEPOSIT):
            return Limit.DEBITS_MUST_NOT_EXCEED_CREDITS
        if self is Kind.CLAIM:
            return Limit.CREDITS_MUST_NOT_EXCEED_DEBITS
        return Limit.NONE

    @property
    def debit_normal(self) -> bool:
        return self in (Kind.BANK, Kind.WRITTEN_OFF, Kind.CLAIM)


PLATFORM_ACCOUNTS: dict[str, Kind] = {
    BANK: Kind.BANK,
    BUYERS: Kind.BUYERS,
    FUND: Kind.FUND,
    PENALTY_INCOME: Kind.PENALTY_INCOME,
    RECOVERIES_ACCRUED: Kind.RECOVERIES_ACCRUED,
    WRITTEN_OFF: Kind.WRITTEN_OFF,
}


def deposit_account(shop_id: str) -> str:
    """The id of a shop's security-deposit account.

    >>> deposit_account("s1")
    'shop:s1:deposit'
    """
    return f"shop:{shop_id}:deposit"


def claim_account(shop_id: str) -> str:
    """The id of the account holding what a shop owes the platform."""
    return f"shop:{shop_id}:claim"


@dataclass(frozen=True, slots=True)
class Account:
    """One account and its posted totals (fen)."""

    id: str
    kind: Kind
    debits: int = 0
    credits: int = 0
    shop_id: str = ""

    @property
    def balance(self) -> int:
        """The balance in the account's normal direction.

        >>> Account("shop:s:deposit", Kind.DEPOSIT, debits=30, credits=100).balance
        70
        >>> Account("shop:s:claim", Kind.CLAIM, debits=50, credits=20).balance
        30
        """
        if self.kind.debit_normal:
            return self.debits - self.credits
        return self.credits - self.debits

    @property
    def net(self) -> int:
        """``credits - debits``: these sum to zero over every account of the book."""
        return self.credits - self.debits
