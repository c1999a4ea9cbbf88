"""What happened to an order after it was scored: the labels models and replay learn from."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OrderEventKind(enum.IntEnum):
    UNSPECIFIED = 0
    PAID = 1
    SHIPPED = 2
    DELIVERED = 3
    REFUNDED = 4
    DISPUTED = 5
    CHARGEBACK = 6
    CONFIRMED_FAKE = 7


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """One reported outcome of an order (``ReportOutcome``); ``at`` is epoch seconds."""

    order_id: str
    kind: OrderEventKind
    at: float
    detail: str = ""
