"""Checks on ledger request fields; each failure names the field and never echoes free text."""

from __future__ import annotations

import re

from riskd.errors import InvalidArgumentError

MAX_FEN = 2**63 - 1
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=\-]{0,127}")


def check_amount(field: str, value: object) -> int:
    """A positive amount of fen that fits in a signed 64-bit integer.

    >>> check_amount("amount", 500)
    500
    >>> check_amount("amount", 0)
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: amount: must be a positive number of fen
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(field, "must be an integer number of fen")
    if value <= 0:
        raise InvalidArgumentError(field, "must be a positive number of fen")
    if value > MAX_FEN:
        raise InvalidArgumentError(field, "overflows 64 bits")
    return value


def check_id(field: str, value: object) -> str:
    """An identifier: 1-128 letters, digits, ``.``, ``_`` or ``-``, starting alphanumeric."""
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(field, "is required")
    if not _ID.fullmatch(value):
        raise InvalidArgumentError(field, "must be 1-128 of [A-Za-z0-9._-], starting alphanumeric")
    return value


def check_key(value: object) -> str:
    """An idempotency key: 1-128 characters of ``[A-Za-z0-9._:/@+=-]`` (UUIDs fit)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError("idempotency_key", "is required on every money request")
    if not _KEY.fullmatch(value):
        raise InvalidArgumentError(
            "idempotency_key", "must be 1-128 of [A-Za-z0-9._:/@+=-], starting alphanumeric"
        )
    return value


def check_text(field: str, value: object, *, required: bool = False, max_len: int = 1000) -> str:
    """Free text (reason, evidence reference, actor); its value never appears in errors."""
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "must be a string")
    if required and not value.strip():
        raise InvalidArgumentError(field, "is required")
    if len(value) > max_len:
        raise InvalidArgumentError(field, f"longer than {max_len} characters")
    return value
