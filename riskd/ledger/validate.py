"""Checks on ledger request fields; each failure names the field and never echoes free text."""

from __future__ import annotations

import re
import unicodedata

from riskd.errors import InvalidArgumentError
from riskd.pii.detect import refuse_pii

# The most one request may move: 10^12 fen (10 billion CNY), the scoring API's order
# maximum too. Far above any real deposit, payout or order, and far below 2^63, so the
# ever-growing counters (``external:bank``'s debits) cannot approach 64 bits in any
# realistic lifetime: that takes over nine million maximal transfers.
MAX_FEN = 10**12
MAX_SEQ = 2**63 - 1  # journal positions are signed 64-bit in both databases
_REF = re.compile(r"(dispute|case)/[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=\-]{0,127}")


def check_amount(field: str, value: object) -> int:
    """A positive amount of fen, at most ``MAX_FEN`` (10^12) per request.

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
        raise InvalidArgumentError(field, f"exceeds the maximum of {MAX_FEN} fen per request")
    return value


def check_seq(field: str, value: object) -> int:
    """A journal position to read after: 0 (from the start) up to 2^63 - 1.

    >>> check_seq("after_seq", 2**63)
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: after_seq: must be between 0 and 9223372036854775807
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise InvalidArgumentError(field, f"must be between 0 and {MAX_SEQ}")
    return value


def check_claim_ref(value: object) -> str:
    """A claim's reference: ``dispute/<id>`` or ``case/<id>`` (never empty).

    >>> check_claim_ref("")
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: ref: must be dispute/<id> or case/<id>
    """
    if not isinstance(value, str) or not _REF.fullmatch(value):
        raise InvalidArgumentError("ref", "must be dispute/<id> or case/<id>")
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


# characters that change how an audit line reads (``check_text``): the bidirectional
# overrides (shown in another order than stored) and the line and paragraph separators;
# embeddings, isolates and marks stay (mixed Arabic or Hebrew and Latin text holds them)
_HIDING = frozenset("\u202d\u202e\u2028\u2029")


def check_required(field: str, value: object) -> str:
    """A text field that must not be blank; its characters are ``check_text``'s, checked
    where a new request is taken (a retry of a stored one replays: ``BookCore``)."""
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "must be a string")
    if not value.strip():
        raise InvalidArgumentError(field, "is required")
    return value


def check_text(
    field: str,
    value: object,
    *,
    required: bool = False,
    max_len: int = 1000,
    single_line: bool = False,
) -> str:
    """Free text (reason, evidence reference, actor); its value never appears in errors.

    NUL, other control characters and lone surrogates are refused: PostgreSQL
    cannot store NUL or unpaired surrogates, and control characters in an audit
    trail only hide what it says; so do the bidirectional overrides (U+202D, U+202E:
    text shown in another order than stored) and the line and paragraph separators
    (U+2028, U+2029: a second line in a one-line field), refused too (review). Free
    text may hold newlines and tabs unless ``single_line``.

    >>> check_text("reason", "a\\x00b")
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: reason: must not contain NUL or control characters
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "must be a string")
    allowed = "" if single_line else "\n\t"
    if any(
        (unicodedata.category(ch) in ("Cc", "Cs") or ch in _HIDING) and ch not in allowed
        for ch in value
        if not ch.isprintable()
    ):
        raise InvalidArgumentError(field, "must not contain NUL or control characters")
    if required and not value.strip():
        raise InvalidArgumentError(field, "is required")
    if len(value) > max_len:
        raise InvalidArgumentError(field, f"longer than {max_len} characters")
    return value


def check_note(field: str, value: object) -> str:
    """A request's ``reason`` or ``evidence``, kept as written in the append-only journal
    for good: ``check_text``'s characters and no personal data (``riskd.pii.detect``).

    >>> check_note("reason", "buyer 138-1234-5678 called")
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: reason: looks like it holds a mobile phone number; \
free text must not carry personal data
    """
    text = check_text(field, value)
    refuse_pii(field, text)
    return text


def check_actor(value: object) -> str:
    """Who a money request names as its actor (the caller's principal, ``token:<name>``):
    required, one line, at most 128 characters; checked here for each new request and by
    ``riskd.service.callers`` for each configured token name at start.

    >>> check_actor("token:" + "x" * 123)
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: actor: longer than 128 characters
    """
    return check_text("actor", value, required=True, max_len=128, single_line=True)
