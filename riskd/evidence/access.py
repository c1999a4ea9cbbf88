"""Analysts' access to an order's plaintext PII, and the audit trail of every such access.

Where it sits: the service's ``EvidenceService.RevealOrderPii`` calls
``PiiAccess.reveal`` with the authenticated caller. The unit of investigation
is a recorded decision: its PII fields are decrypted from the Vault
ciphertexts in ``decision_pii`` (outside the hash chain, see ``schema``).

Every reveal of a well-formed request, granted or refused (unknown order,
forgotten buyer, unreadable ciphertext), first appends one entry to
``pii_access_log``: who, when, which order, which fields, why, and the
outcome. The table is append-only and hash-chained like the decision log
(``chain.ACCESS``; ``chain.verify`` walks it). A granted reveal returns the
plaintext only after its entry is committed: no audit entry, no plaintext.
Malformed requests (no order id, or one Score would refuse: longer than
``MAX_ORDER_ID_LEN`` or with control characters; no reason, or one that holds
personal data, ``riskd.pii.detect``; an unknown field name) are refused before
anything is read and change nothing.

Nothing here logs, or puts in an exception message, a plaintext value: errors
name the order, the field names and the outcome only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from riskd.domain.clock import Clock, SystemClock
from riskd.domain.order import MAX_ORDER_ID_LEN
from riskd.errors import (
    CryptoError,
    DatabaseBusyError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from riskd.evidence.chain import ACCESS, append_rows
from riskd.evidence.log import DecisionLog
from riskd.evidence.schema import MAX_SEQ
from riskd.pii.detect import refuse_pii
from riskd.sql import Database, Tx

PII_FIELDS: tuple[str, ...] = ("phone", "name", "id_number", "address", "device", "ip")
"""The PII fields of an order's decision that an analyst may reveal."""

MAX_REASON_CHARS = 500
MAX_PAGE = 1000
AUDIT_WAIT_S = 5.0  # longest a reveal waits for the database's writer lock for its audit entry


class Decryptor(Protocol):
    """``riskd.pii.Vault``: decrypts a field; tells whether a subject was forgotten."""

    def decrypt(self, subject_id: str, record_id: str, field: str, ciphertext: bytes) -> str: ...

    def forgotten(self, subject_id: str, ciphertext: bytes | None = None) -> bool: ...


class AccessOutcome(Enum):
    """What became of one reveal request."""

    REVEALED = "revealed"
    NOT_FOUND = "not_found"  # no recorded decision for the order
    FORGOTTEN = "forgotten"  # the buyer was crypto-shredded
    UNREADABLE = "unreadable"  # no ciphertexts stored, or they do not decrypt


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One audit entry (``seq`` and ``hash`` are its place in the chain)."""

    seq: int
    order_id: str
    at: float
    principal: str
    fields: tuple[str, ...]
    reason: str
    outcome: AccessOutcome
    hash: str


@dataclass(frozen=True, slots=True)
class RevealedPii:
    """The plaintext PII fields of one order (empty fields absent) and the audit entry."""

    order_id: str
    fields: Mapping[str, str]
    entry: AccessEntry


def check_fields(fields: Iterable[str]) -> tuple[str, ...]:
    """The requested field names, deduplicated in ``PII_FIELDS`` order; all when none.

    Raises:
        InvalidArgumentError: ``fields`` names an unknown field (by its index, never
            its text).
    """
    asked = list(fields)
    for i, name in enumerate(asked):
        if name not in PII_FIELDS:  # named by its place: the text may be anything (a phone)
            raise InvalidArgumentError(
                f"fields[{i}]", f"unknown field; expected some of {', '.join(PII_FIELDS)}"
            )
    return tuple(f for f in PII_FIELDS if not asked or f in asked)


def _check_request(order_id: str, reason: str, principal: str) -> None:
    # the id Score accepted (riskd.service.validate): an audit entry, and the NOT_FOUND
    # message, hold only an id that could name a decision
    if not order_id.strip():
        raise InvalidArgumentError("order_id", "is required")
    if len(order_id) > MAX_ORDER_ID_LEN:
        raise InvalidArgumentError("order_id", f"is longer than {MAX_ORDER_ID_LEN}")
    if not order_id.isprintable():
        raise InvalidArgumentError("order_id", "must not contain control characters")
    if not reason.strip():
        raise InvalidArgumentError("reason", "is required: say why the plaintext is needed")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidArgumentError("reason", f"must be at most {MAX_REASON_CHARS} characters")
    refuse_pii("reason", reason)  # chained into pii_access_log for good, in clear
    if not principal:
        raise InvalidArgumentError("principal", "is required")


class PiiAccess:
    """Reveals the PII of recorded decisions to analysts, recording every access.

    Args:
        log: the decision log (its database holds the audit table too, created with the
            log's tables).
        vault: decrypts the stored ciphertexts.
        clock: time of the audit entries.
        flush_timeout_s: how long a reveal waits for a just-decided order to be committed.
    """

    def __init__(
        self,
        log: DecisionLog,
        vault: Decryptor,
        *,
        clock: Clock | None = None,
        flush_timeout_s: float = 5.0,
    ) -> None:
        self._log = log
        self._db: Database = log.db
        self._vault = vault
        self._clock = clock or SystemClock()
        self._flush_timeout = flush_timeout_s

    def reveal(
        self, order_id: str, reason: str, principal: str, fields: Sequence[str] = ()
    ) -> RevealedPii:
        """Decrypt the PII fields of ``order_id``'s decision for ``principal``, audited.

        Raises:
            InvalidArgumentError: no order id (or a malformed one) or reason, or an unknown
                field (nothing recorded).
            NotFoundError: no decision for the order (the refusal is recorded).
            FailedPreconditionError: the buyer was forgotten, or the ciphertexts are
                missing or do not decrypt (the refusal is recorded).
            UnavailableError: the audit entry could not be committed (nothing revealed).
        """
        _check_request(order_id, reason, principal)
        wanted = check_fields(fields)
        record = self._log.get(order_id)

        def refuse(outcome: AccessOutcome) -> AccessEntry:
            return self._append(order_id, principal, wanted, reason, outcome)

        if record is None:
            refuse(AccessOutcome.NOT_FOUND)
            raise NotFoundError(f"order {order_id}: no recorded decision")
        if self._log.queued([order_id]):
            self._log.flush(self._flush_timeout)  # its ciphertexts are written with it
        subject = str(record.request.get("buyer", {}).get("buyer_id", ""))
        stored = self._ciphertexts(order_id)
        if not stored:
            outcome = self._why_unreadable(subject)
            refuse(outcome)
            raise FailedPreconditionError(_refusal(order_id, outcome))
        plain: dict[str, str] = {}
        for field in wanted:
            if field not in stored:
                continue  # the order had no value for it
            subject_id, ciphertext = stored[field]
            try:
                # the key store, not a cached key, says whether the buyer was forgotten
                if self._vault.forgotten(subject_id, ciphertext):
                    raise CryptoError("data key destroyed")
                plain[field] = self._vault.decrypt(subject_id, order_id, field, ciphertext)
            except CryptoError:
                outcome = self._why_unreadable(subject_id, ciphertext)
                refuse(outcome)
                raise FailedPreconditionError(_refusal(order_id, outcome)) from None
        entry = self._append(order_id, principal, tuple(plain), reason, AccessOutcome.REVEALED)
        return RevealedPii(order_id, plain, entry)

    def entries(
        self, order_id: str = "", *, after_seq: int = 0, limit: int = 100
    ) -> list[AccessEntry]:
        """Audit entries (of ``order_id``, or all), oldest first, after ``after_seq`` (none
        after the largest seq a BIGINT holds, on either database).

        Raises:
            InvalidArgumentError: ``limit`` outside 1..1000 or ``after_seq`` negative.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgumentError("page_size", f"must be between 1 and {MAX_PAGE}")
        if after_seq < 0:
            raise InvalidArgumentError("after_seq", "must not be negative")
        if after_seq >= MAX_SEQ:  # ListPiiAccess's uint64: no seq lies past a BIGINT's
            return []
        where = "seq > ?"
        params: list[object] = [after_seq]
        if order_id:
            where, params = "seq > ? AND order_id = ?", [after_seq, order_id]
        rows = self._db.query(
            f"SELECT seq, content, hash FROM pii_access_log WHERE {where} ORDER BY seq LIMIT ?",
            [*params, limit],
        )
        return [_entry(int(seq), json.loads(content), str(digest)) for seq, content, digest in rows]

    def _ciphertexts(self, order_id: str) -> dict[str, tuple[str, bytes]]:
        rows = self._db.query(
            "SELECT field, subject_id, ciphertext FROM decision_pii WHERE order_id = ?",
            (order_id,),
        )
        return {str(f): (str(s), bytes(c)) for f, s, c in rows}

    def _why_unreadable(self, subject_id: str, ciphertext: bytes | None = None) -> AccessOutcome:
        """Why an order's PII cannot be revealed: ``FORGOTTEN`` only when the data key
        generation that sealed ``ciphertext`` was shredded. A buyer forgotten once who
        ordered again has a live later generation: a ciphertext of that one that fails to
        decrypt (altered, its key unwrappable) is ``UNREADABLE``, not a false "forgotten"
        in the audit trail. Without a ciphertext (none stored for the order) any
        shredded generation of the buyer's means the forget deleted them.
        """
        forgotten = bool(subject_id) and self._vault.forgotten(subject_id, ciphertext)
        return AccessOutcome.FORGOTTEN if forgotten else AccessOutcome.UNREADABLE

    def _append(
        self,
        order_id: str,
        principal: str,
        fields: tuple[str, ...],
        reason: str,
        outcome: AccessOutcome,
    ) -> AccessEntry:
        content: dict[str, Any] = {
            "order_id": order_id,
            "at": self._clock.now(),
            "principal": principal,
            "outcome": outcome.value,
            "fields": list(fields),
            "reason": reason,
        }

        def write(tx: Tx) -> tuple[int, str]:
            append_rows(tx, ACCESS, [content])
            row = tx.execute(
                "SELECT seq, hash FROM pii_access_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            assert row is not None
            return int(row[0]), str(row[1])

        try:
            seq, digest = self._db.run(write, wait_s=AUDIT_WAIT_S)
        except DatabaseBusyError as e:
            raise UnavailableError(
                "evidence busy: another process holds the database's writer lock;"
                " nothing was revealed; retry shortly"
            ) from e
        return _entry(seq, content, digest)


def _refusal(order_id: str, outcome: AccessOutcome) -> str:
    if outcome is AccessOutcome.FORGOTTEN:
        return (
            f"order {order_id}: the buyer's personal data was forgotten (crypto-shredded); "
            "it cannot be revealed"
        )
    return f"order {order_id}: no readable encrypted personal data is stored for this order"


def _entry(seq: int, c: Mapping[str, Any], digest: str) -> AccessEntry:
    return AccessEntry(
        seq=seq,
        order_id=str(c["order_id"]),
        at=float(c["at"]),
        principal=str(c["principal"]),
        fields=tuple(str(f) for f in c["fields"]),
        reason=str(c["reason"]),
        outcome=AccessOutcome(c["outcome"]),
        hash=digest,
    )
