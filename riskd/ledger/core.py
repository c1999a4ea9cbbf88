"""The one write path of the book: idempotency, drafting, posting, and the shared reads.

Every money request carries an idempotency key. In one database transaction
the book looks the key up: the same key with the same content returns the
first receipt (``replayed=True``); the same key with other content is refused
with ``AlreadyExistsError`` and nothing is written. "Content" is what the caller
sent (operation, fields, reason, evidence), not who sent it nor what the book
derived from its configuration: a retry under rotated credentials, or after a
penalty-schedule change, is still the same request and gets the first receipt
(which records the first actor and amounts). Otherwise the operation
builds a ``Draft`` from the current state (refusing with a clear error if the
request cannot be done), and the draft's transfers, records (dispute, case,
freeze) and the key's record are written and committed together. Any error
rolls everything back: a refused request writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from riskd.domain.clock import Clock
from riskd.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
)
from riskd.ledger import accounts as acc
from riskd.ledger.codes import Code
from riskd.ledger.schedule import PenaltySchedule
from riskd.ledger.store import LedgerStore, StoredRequest
from riskd.ledger.transfers import Transfer
from riskd.ledger.validate import check_actor, check_key, check_note
from riskd.sql import Database, Tx


@dataclass(frozen=True, slots=True)
class Receipt:
    """What one money request did: its transfers, and for penalties the freeze end.

    ``replayed`` is True when the key had been seen and this is the first result again.
    """

    key: str
    operation: str
    transfers: tuple[Transfer, ...]
    replayed: bool = False
    frozen_until: float = 0.0

    def total(self, code: Code) -> int:
        """Fen moved by this request's transfers of ``code``."""
        return sum(t.amount for t in self.transfers if t.code is code)


@dataclass(slots=True)
class Draft:
    """What a request will write, built by an operation from the current state."""

    postings: list[tuple[str, str, int, Code, str]] = field(default_factory=list)
    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    frozen_until: float = 0.0

    def move(self, debit: str, credit: str, amount: int, code: Code, ref: str = "") -> None:
        if amount > 0:
            self.postings.append((debit, credit, amount, code, ref))


@dataclass(frozen=True, slots=True)
class Request:
    """One money request. ``params`` are the caller's fields; ``derived`` what the book
    took from its configuration (kept only for fingerprints written before v2)."""

    key: str
    operation: str
    actor: str
    reason: str
    evidence: str
    params: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """``v2:`` and the SHA-256 of what the caller sent (no actor, nothing derived)."""
        body = {"op": self.operation, "reason": self.reason, "evidence": self.evidence}
        return "v2:" + _digest(body | self.params)

    def matches(self, stored: str) -> bool:
        """Whether ``stored`` (a request record's fingerprint) is this request's."""
        if stored.startswith("v2:"):
            return stored == self.fingerprint
        # Written before v2: the body also held the actor and the derived values.
        body = {
            "op": self.operation,
            "actor": self.actor,
            "reason": self.reason,
            "evidence": self.evidence,
        }
        return stored == _digest(body | self.params | self.derived)


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


Build = Callable[[Tx, float], Draft]


class BookCore:
    """What every group of operations shares: the store, the schedule, the clock, ``_execute``."""

    db: Database
    store: LedgerStore
    schedule: PenaltySchedule
    clock: Clock

    # -- the one write path ----------------------------------------------------------------------

    def _execute(
        self, req: Request, build: Build, check_new: Callable[[], object] | None = None
    ) -> Receipt:
        """Replay a stored request, or check a new one (its text, then ``check_new``:
        what refuses it before the writer lock) and write it with ``build``."""
        check_key(req.key)
        # Retries are the common duplicate: answer them with plain reads, no write lock.
        # A request record and its transfers commit together and never change after.
        prior = self.store.read_request(req.key)
        if prior is not None:
            return self._replay(prior, req, self.store.transfers_of)
        # a new request's text (after the lookup: a retry of one stored before a check
        # was tightened still gets its first receipt; review)
        check_actor(req.actor)
        check_note("reason", req.reason)
        check_note("evidence", req.evidence)
        if check_new is not None:
            check_new()

        def write(tx: Tx) -> Receipt:
            prior = self.store.get_request(tx, req.key)
            if prior is not None:
                return self._replay(prior, req, lambda k: self.store.transfers_of_request(tx, k))
            now = self.clock.now()
            draft = build(tx, now)
            self.store.post(tx, self._transfers(req, draft, now))
            for table, values in draft.rows:
                self.store.insert(tx, table, values)
            result = {"frozen_until": draft.frozen_until}
            stored = StoredRequest(req.key, req.operation, req.fingerprint, result)
            self.store.put_request(tx, stored, now)
            transfers = tuple(self.store.transfers_of_request(tx, req.key))
            return Receipt(req.key, req.operation, transfers, False, draft.frozen_until)

        return self.store.write(write)

    def _replay(
        self,
        prior: StoredRequest,
        req: Request,
        transfers_of: Callable[[str], list[Transfer]],
    ) -> Receipt:
        if prior.operation != req.operation or not req.matches(prior.fingerprint):
            raise AlreadyExistsError(
                f"idempotency_key: already used for a different request ({prior.operation});"
                " nothing was written, use a new key"
            )
        transfers = tuple(transfers_of(prior.key))
        frozen_until = float(prior.result.get("frozen_until", 0.0))
        return Receipt(prior.key, req.operation, transfers, True, frozen_until)

    @staticmethod
    def _transfers(req: Request, draft: Draft, now: float) -> list[Transfer]:
        return [
            Transfer(
                id=f"{req.key}#{i}",
                debit_account=debit,
                credit_account=credit,
                amount=amount,
                code=code,
                ref=ref,
                request_key=req.key,
                actor=req.actor,
                reason=req.reason,
                evidence=req.evidence,
                at=now,
            )
            for i, (debit, credit, amount, code, ref) in enumerate(draft.postings)
        ]

    # -- reads inside a write ------------------------------------------------------------------

    def _require_shop(self, tx: Tx, shop_id: str) -> None:
        if self.store.one(tx, "SELECT 1 FROM ledger_shops WHERE shop_id = ?", (shop_id,)) is None:
            raise NotFoundError("shop_id: no such shop")

    def _balance(self, tx: Tx, account_id: str) -> int:
        account = self.store.account(tx, account_id)
        if account is None:
            raise NotFoundError(f"account not found: {account_id}")
        return account.balance

    def _dispute(self, tx: Tx, dispute_id: str) -> tuple[str, int] | None:
        row = self.store.one(
            tx,
            "SELECT shop_id, order_amount FROM ledger_disputes WHERE dispute_id = ?",
            (dispute_id,),
        )
        return None if row is None else (row[0], int(row[1]))

    def _claims(self, tx: Tx, shop_id: str, ref: str) -> list[tuple[str, int]]:
        """The shop's open claims: the one of ``ref``, or all of them (oldest first) for
        "" (callers that must name one claim check ``ref`` first)."""
        claims = self.store.open_claims(tx, acc.claim_account(shop_id))
        if ref:
            claims = [c for c in claims if c[0] == ref]
            if not claims:
                raise NotFoundError("ref: no open claim with this reference for the shop")
        elif not claims:
            raise FailedPreconditionError("shop_id: shop has no open claims")
        return claims
