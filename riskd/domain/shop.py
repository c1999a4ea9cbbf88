"""What the scorer knows about the selling shop from enforcement (the ledger's freezes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ShopState:
    """Enforcement state of a shop at scoring time.

    ``frozen_until`` is epoch seconds (0: not frozen). ``open_claims`` is
    what the merchant still owes the platform, in fen.
    """

    shop_id: str
    frozen: bool = False
    frozen_until: float = 0.0
    penalties: int = 0
    open_claims: int = 0
