"""Immutable transfers and the replay of a journal into balances.

A transfer moves ``amount`` fen from the ``debit_account`` to the
``credit_account``. Transfers are never updated or deleted; a correction is a
new transfer. ``ref`` ties a transfer to what it is about: ``dispute/<id>``,
``case/<id>`` (a violation case) or ``order/<id>`` (a coupon).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from riskd.ledger.codes import Code


@dataclass(frozen=True, slots=True)
class Transfer:
    """One posted movement of money (fen)."""

    id: str
    debit_account: str
    credit_account: str
    amount: int
    code: Code
    ref: str
    request_key: str
    actor: str
    reason: str = ""
    evidence: str = ""
    at: float = 0.0
    seq: int = 0


def dispute_ref(dispute_id: str) -> str:
    """The ``ref`` of transfers about a dispute.

    >>> dispute_ref("d1")
    'dispute/d1'
    """
    return f"dispute/{dispute_id}"


def case_ref(case_id: str) -> str:
    """The ``ref`` of transfers about a violation case."""
    return f"case/{case_id}"


def order_ref(order_id: str) -> str:
    """The ``ref`` of transfers about one order (coupons)."""
    return f"order/{order_id}"


def replay(transfers: Iterable[Transfer]) -> dict[str, tuple[int, int]]:
    """Recompute ``account -> (debits, credits)`` from a journal, starting from empty.

    >>> t = Transfer("k#0", "a", "b", 5, Code.DEPOSIT, "", "k", "op")
    >>> replay([t, t])
    {'a': (10, 0), 'b': (0, 10)}
    """
    totals: dict[str, tuple[int, int]] = {}
    for t in transfers:
        d, c = totals.get(t.debit_account, (0, 0))
        totals[t.debit_account] = (d + t.amount, c)
        d, c = totals.get(t.credit_account, (0, 0))
        totals[t.credit_account] = (d, c + t.amount)
    return totals
