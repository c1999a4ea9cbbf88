"""Money is an integer number of fen (1 CNY = 100 fen); never a float."""

from __future__ import annotations

from typing import NewType

Fen = NewType("Fen", int)

FEN_PER_CNY = 100


def cny(amount: int) -> Fen:
    """Whole yuan to fen.

    >>> cny(500)
    50000
    """
    return Fen(amount * FEN_PER_CNY)


def format_fen(amount: int) -> str:
    """Fen as a ``CNY 12.34`` string for people.

    >>> format_fen(-1234)
    '-CNY 12.34'
    """
    sign = "-" if amount < 0 else ""
    yuan, fen = divmod(abs(amount), FEN_PER_CNY)
    return f"{sign}CNY {yuan}.{fen:02d}"
