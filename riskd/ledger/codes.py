"""Transfer codes: what kind of movement a transfer is (stored as an integer).

Each code always moves money the same way; ``FLOWS`` names the debit and the
credit side by account kind, and a test checks every posted transfer against it.
"""

from __future__ import annotations

import enum

from riskd.ledger.accounts import Kind


class Code(enum.IntEnum):
    """What a transfer is for. Values are stored: never renumber."""

    DEPOSIT = 1  # bank -> deposit: a merchant tops up the security deposit
    WITHDRAWAL = 2  # deposit -> bank: a merchant takes deposit back
    PENALTY = 3  # deposit -> penalty income: the part of a penalty the deposit covers
    PENALTY_CLAIM = 4  # claim -> penalty income: the part it cannot cover, now owed
    FUND_TOP_UP = 5  # bank -> fund: an operator adds money to the fund
    COMPENSATION = 6  # fund -> buyers: advance compensation for a dispute
    RECOVERY_FROM_DEPOSIT = 7  # deposit -> fund: recovering a compensation from the deposit
    RECOVERY_CLAIM = 8  # claim -> recoveries accrued: the rest of a compensation, now owed
    COLLECTION = 9  # bank -> claim: a merchant pays what it owes
    RECOVERY_COLLECTED = (
        10  # recoveries accrued -> fund: a collected dispute claim refills the fund
    )
    WRITE_OFF = 11  # written off -> claim: an operator gives a claim up
    COUPON = 12  # fund -> buyers: the late-shipment coupon


FLOWS: dict[Code, tuple[Kind, Kind]] = {
    Code.DEPOSIT: (Kind.BANK, Kind.DEPOSIT),
    Code.WITHDRAWAL: (Kind.DEPOSIT, Kind.BANK),
    Code.PENALTY: (Kind.DEPOSIT, Kind.PENALTY_INCOME),
    Code.PENALTY_CLAIM: (Kind.CLAIM, Kind.PENALTY_INCOME),
    Code.FUND_TOP_UP: (Kind.BANK, Kind.FUND),
    Code.COMPENSATION: (Kind.FUND, Kind.BUYERS),
    Code.RECOVERY_FROM_DEPOSIT: (Kind.DEPOSIT, Kind.FUND),
    Code.RECOVERY_CLAIM: (Kind.CLAIM, Kind.RECOVERIES_ACCRUED),
    Code.COLLECTION: (Kind.BANK, Kind.CLAIM),
    Code.RECOVERY_COLLECTED: (Kind.RECOVERIES_ACCRUED, Kind.FUND),
    Code.WRITE_OFF: (Kind.WRITTEN_OFF, Kind.CLAIM),
    Code.COUPON: (Kind.FUND, Kind.BUYERS),
}

# Codes that open a claim (debit a claim account).
CLAIM_OPENING: frozenset[Code] = frozenset({Code.PENALTY_CLAIM, Code.RECOVERY_CLAIM})
