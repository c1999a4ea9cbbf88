"""The book: every money operation of the merchant ledger, each one idempotent and atomic.

Where it sits: analysts and operators call these through ``LedgerService``
(gRPC) or ``riskd ledger`` (CLI); the scorer only reads freezes through
``LedgerShopDirectory``. Scoring never moves money.

Every money request carries an idempotency key. In one database transaction
the book looks the key up: the same key with the same content returns the
first receipt (``replayed=True``); the same key with other content is refused
with ``AlreadyExistsError`` and nothing is written. Otherwise it checks the
request against the current balances, posts its transfers, writes its
records (dispute, case, freeze) and the key's record, and commits. Any error
rolls everything back: a refused request writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from riskd.domain.clock import Clock, SystemClock
from riskd.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InsufficientFundsError,
    InvalidArgumentError,
    NotFoundError,
)
from riskd.ledger import accounts as acc
from riskd.ledger.accounts import Kind
from riskd.ledger.codes import Code
from riskd.ledger.schedule import PenaltySchedule, load_schedule
from riskd.ledger.statements import Statements
from riskd.ledger.store import LedgerStore, StoredRequest, run_keyed
from riskd.ledger.transfers import Transfer, case_ref, dispute_ref, order_ref
from riskd.ledger.validate import check_amount, check_id, check_key, check_text
from riskd.sql import Database, Tx

DAY_S = 86_400


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
class _Draft:
    """What a request will write, built by an operation from the current state."""

    postings: list[tuple[str, str, int, Code, str]] = field(default_factory=list)
    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    frozen_until: float = 0.0

    def move(self, debit: str, credit: str, amount: int, code: Code, ref: str = "") -> None:
        if amount > 0:
            self.postings.append((debit, credit, amount, code, ref))


@dataclass(frozen=True, slots=True)
class _Request:
    key: str
    operation: str
    actor: str
    reason: str
    evidence: str
    params: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        body = {
            "op": self.operation,
            "actor": self.actor,
            "reason": self.reason,
            "evidence": self.evidence,
            **self.params,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


Build = Callable[[Tx, float], _Draft]


class Book(Statements):
    """The merchant-money ledger over one SQL database (SQLite file or PostgreSQL).

    Args:
        db: the database; the book creates its tables if they are missing.
        schedule: the penalty schedule (default: ``rules/penalties.toml``).
        clock: where "now" comes from (freezes, timestamps).
    """

    def __init__(
        self,
        db: Database,
        *,
        schedule: PenaltySchedule | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.db = db
        self.store = LedgerStore(db)
        self.schedule = schedule if schedule is not None else load_schedule()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.store.create_schema(self.clock.now())

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> Book:
        """A book over the database at ``url`` (``sqlite:///...`` or ``postgresql://...``)."""
        return cls(Database(url), **kwargs)

    def close(self) -> None:
        self.db.close()

    # -- shops ---------------------------------------------------------------------------

    def register_shop(self, shop_id: str, *, merchant_id: str = "") -> bool:
        """Open a shop's deposit and claim accounts; True if new, False if already there.

        Raises:
            AlreadyExistsError: the shop is registered to another merchant.
        """
        check_id("shop_id", shop_id)
        if merchant_id:
            check_id("merchant_id", merchant_id)

        def write(tx: Tx) -> bool:
            row = self.store.one(
                tx, "SELECT merchant_id FROM ledger_shops WHERE shop_id = ?", (shop_id,)
            )
            if row is not None:
                if row[0] != merchant_id:
                    raise AlreadyExistsError("shop_id: shop registered to another merchant")
                return False
            now = self.clock.now()
            self.store.insert(
                tx,
                "ledger_shops",
                {"shop_id": shop_id, "merchant_id": merchant_id, "created_at": now},
            )
            self.store.create_account(tx, acc.deposit_account(shop_id), Kind.DEPOSIT, shop_id, now)
            self.store.create_account(tx, acc.claim_account(shop_id), Kind.CLAIM, shop_id, now)
            return True

        return run_keyed(self.db, f"shop/{shop_id}", write)

    # -- money in and out ------------------------------------------------------------------

    def deposit(
        self, key: str, shop_id: str, amount: int, *, actor: str, reason: str = ""
    ) -> Receipt:
        """A merchant tops up its security deposit (from outside: ``external:bank``)."""
        check_id("shop_id", shop_id)
        check_amount("amount", amount)

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            draft = _Draft()
            draft.move(acc.BANK, acc.deposit_account(shop_id), amount, Code.DEPOSIT)
            return draft

        req = _Request(key, "deposit", actor, reason, "", {"shop_id": shop_id, "amount": amount})
        return self._execute(req, build)

    def withdraw(
        self, key: str, shop_id: str, amount: int, *, actor: str, reason: str = ""
    ) -> Receipt:
        """A merchant takes deposit back; refused while frozen or owing the platform."""
        check_id("shop_id", shop_id)
        check_amount("amount", amount)

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            if self.store.frozen_until(tx, shop_id) > now:
                raise FailedPreconditionError("shop_id: shop is frozen; withdrawals are refused")
            owed = sum(o for _, o in self.store.open_claims(tx, acc.claim_account(shop_id)))
            if owed:
                raise FailedPreconditionError(f"shop_id: shop has open claims of {owed} fen")
            if self._balance(tx, acc.deposit_account(shop_id)) < amount:
                raise InsufficientFundsError("amount: exceeds the deposit")
            draft = _Draft()
            draft.move(acc.deposit_account(shop_id), acc.BANK, amount, Code.WITHDRAWAL)
            return draft

        req = _Request(key, "withdraw", actor, reason, "", {"shop_id": shop_id, "amount": amount})
        return self._execute(req, build)

    def top_up_fund(
        self, key: str, amount: int, *, actor: str, reason: str, evidence: str = ""
    ) -> Receipt:
        """An operator adds money to the compensation fund."""
        check_amount("amount", amount)
        check_text("reason", reason, required=True)

        def build(tx: Tx, now: float) -> _Draft:
            draft = _Draft()
            draft.move(acc.BANK, acc.FUND, amount, Code.FUND_TOP_UP)
            return draft

        req = _Request(key, "top_up_fund", actor, reason, evidence, {"amount": amount})
        return self._execute(req, build)

    # -- penalties and freezes ---------------------------------------------------------------

    def penalize_shop(
        self,
        key: str,
        shop_id: str,
        violation: str,
        case_id: str,
        *,
        evidence: str,
        actor: str,
        reason: str = "",
    ) -> Receipt:
        """Charge the schedule's penalty for one violation case and freeze the shop.

        The deposit pays what it can; the rest becomes a claim. One penalty per case.
        """
        check_id("shop_id", shop_id)
        check_id("case_id", case_id)
        check_text("evidence", evidence, required=True)
        spec = self.schedule.violation(violation)

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            if self.store.one(tx, "SELECT 1 FROM ledger_cases WHERE case_id = ?", (case_id,)):
                raise AlreadyExistsError("case_id: this violation case was already penalized")
            deposit = self._balance(tx, acc.deposit_account(shop_id))
            penalty = spec.penalty(deposit)
            covered = min(penalty, deposit)
            draft = _Draft()
            ref = case_ref(case_id)
            draft.move(acc.deposit_account(shop_id), acc.PENALTY_INCOME, covered, Code.PENALTY, ref)
            draft.move(
                acc.claim_account(shop_id),
                acc.PENALTY_INCOME,
                penalty - covered,
                Code.PENALTY_CLAIM,
                ref,
            )
            current = self.store.frozen_until(tx, shop_id)
            if spec.freeze_days:
                draft.frozen_until = max(current, now + spec.freeze_days * DAY_S)
                row = _freeze_row(shop_id, "freeze", draft.frozen_until, ref, key, actor, reason)
                draft.rows.append(("ledger_freezes", row | {"at": now}))
            draft.rows.append(
                (
                    "ledger_cases",
                    {
                        "case_id": case_id,
                        "shop_id": shop_id,
                        "violation": spec.name,
                        "schedule_version": self.schedule.version,
                        "amount": penalty,
                        "frozen_until": draft.frozen_until,
                        "evidence": evidence,
                        "request_key": key,
                        "actor": actor,
                        "at": now,
                    },
                )
            )
            return draft

        params = {"shop_id": shop_id, "violation": violation, "case_id": case_id}
        return self._execute(_Request(key, "penalize_shop", actor, reason, evidence, params), build)

    def unfreeze(self, key: str, shop_id: str, *, actor: str, reason: str) -> Receipt:
        """An operator lifts a shop's freeze before it ends."""
        check_id("shop_id", shop_id)
        check_text("reason", reason, required=True)

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            if self.store.frozen_until(tx, shop_id) <= now:
                raise FailedPreconditionError("shop_id: shop is not frozen")
            draft = _Draft()
            row = _freeze_row(shop_id, "unfreeze", 0.0, "", key, actor, reason)
            draft.rows.append(("ledger_freezes", row | {"at": now}))
            return draft

        return self._execute(
            _Request(key, "unfreeze", actor, reason, "", {"shop_id": shop_id}), build
        )

    # -- advance compensation ----------------------------------------------------------------

    def open_dispute(
        self,
        key: str,
        dispute_id: str,
        shop_id: str,
        order_id: str,
        order_amount: int,
        *,
        actor: str,
        reason: str = "",
    ) -> Receipt:
        """Record a buyer's dispute against a shop's order (no money moves yet)."""
        check_id("dispute_id", dispute_id)
        check_id("shop_id", shop_id)
        check_id("order_id", order_id)
        check_amount("order_amount", order_amount)

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            if self._dispute(tx, dispute_id) is not None:
                raise AlreadyExistsError("dispute_id: dispute already open")
            draft = _Draft()
            row = {
                "dispute_id": dispute_id,
                "shop_id": shop_id,
                "order_id": order_id,
                "order_amount": order_amount,
                "request_key": key,
                "actor": actor,
                "reason": reason,
                "opened_at": now,
            }
            draft.rows.append(("ledger_disputes", row))
            return draft

        params = {
            "dispute_id": dispute_id,
            "shop_id": shop_id,
            "order_id": order_id,
            "order_amount": order_amount,
        }
        return self._execute(_Request(key, "open_dispute", actor, reason, "", params), build)

    def compensate_buyer(
        self,
        key: str,
        dispute_id: str,
        amount: int,
        *,
        actor: str,
        reason: str = "",
        evidence: str = "",
    ) -> Receipt:
        """Pay the buyer from the fund now, then recover: deposit first, the rest as a claim.

        Raises:
            InsufficientFundsError: the fund cannot cover the payout (nothing is written).
            AlreadyExistsError: the dispute was already compensated (one payout per dispute).
        """
        check_id("dispute_id", dispute_id)
        check_amount("amount", amount)

        def build(tx: Tx, now: float) -> _Draft:
            dispute = self._dispute(tx, dispute_id)
            if dispute is None:
                raise NotFoundError("dispute_id: no such dispute")
            shop_id, order_amount = dispute
            if amount > order_amount:
                raise InvalidArgumentError("amount", "exceeds the disputed order's amount")
            ref = dispute_ref(dispute_id)
            if self.store.one(
                tx,
                "SELECT 1 FROM ledger_transfers WHERE ref = ? AND code = ?",
                (ref, int(Code.COMPENSATION)),
            ):
                raise AlreadyExistsError("dispute_id: already compensated (one payout per dispute)")
            if self._balance(tx, acc.FUND) < amount:
                raise InsufficientFundsError("fund: cannot cover this payout; top the fund up")
            deposit = self._balance(tx, acc.deposit_account(shop_id))
            recovered = min(amount, deposit)
            draft = _Draft()
            draft.move(acc.FUND, acc.BUYERS, amount, Code.COMPENSATION, ref)
            draft.move(
                acc.deposit_account(shop_id), acc.FUND, recovered, Code.RECOVERY_FROM_DEPOSIT, ref
            )
            draft.move(
                acc.claim_account(shop_id),
                acc.RECOVERIES_ACCRUED,
                amount - recovered,
                Code.RECOVERY_CLAIM,
                ref,
            )
            return draft

        params = {"dispute_id": dispute_id, "amount": amount}
        return self._execute(
            _Request(key, "compensate_buyer", actor, reason, evidence, params), build
        )

    def pay_late_shipment_coupon(
        self, key: str, shop_id: str, order_id: str, *, actor: str, evidence: str = ""
    ) -> Receipt:
        """Pay the buyer of a late-shipped order the schedule's coupon from the fund, once."""
        check_id("shop_id", shop_id)
        check_id("order_id", order_id)
        coupon = self.schedule.late_shipment_coupon_fen

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            ref = order_ref(order_id)
            if self.store.one(
                tx,
                "SELECT 1 FROM ledger_transfers WHERE ref = ? AND code = ?",
                (ref, int(Code.COUPON)),
            ):
                raise AlreadyExistsError("order_id: late-shipment coupon already paid")
            if self._balance(tx, acc.FUND) < coupon:
                raise InsufficientFundsError("fund: cannot cover the coupon; top the fund up")
            draft = _Draft()
            draft.move(acc.FUND, acc.BUYERS, coupon, Code.COUPON, ref)
            return draft

        params = {"shop_id": shop_id, "order_id": order_id, "coupon": coupon}
        return self._execute(
            _Request(key, "late_shipment_coupon", actor, "", evidence, params), build
        )

    # -- claims ------------------------------------------------------------------------------

    def collect_claim(
        self,
        key: str,
        shop_id: str,
        amount: int,
        *,
        actor: str,
        ref: str = "",
        reason: str = "",
    ) -> Receipt:
        """A merchant pays what it owes: one claim (``ref``) or the oldest claims first.

        Collections of dispute claims refill the fund.
        """
        check_id("shop_id", shop_id)
        check_amount("amount", amount)

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            claims = self._claims(tx, shop_id, ref)
            if amount > sum(o for _, o in claims):
                raise InvalidArgumentError("amount", "exceeds what the shop owes")
            draft, left = _Draft(), amount
            for claim_ref, outstanding in claims:
                take = min(left, outstanding)
                left -= take
                draft.move(acc.BANK, acc.claim_account(shop_id), take, Code.COLLECTION, claim_ref)
                if claim_ref.startswith("dispute/"):
                    draft.move(
                        acc.RECOVERIES_ACCRUED, acc.FUND, take, Code.RECOVERY_COLLECTED, claim_ref
                    )
            return draft

        params = {"shop_id": shop_id, "amount": amount, "ref": ref}
        return self._execute(_Request(key, "collect_claim", actor, reason, "", params), build)

    def write_off_claim(
        self, key: str, shop_id: str, ref: str, *, actor: str, reason: str, amount: int = 0
    ) -> Receipt:
        """An operator gives up (part of) one claim; ``amount`` 0 writes off all that is open."""
        check_id("shop_id", shop_id)
        check_text("reason", reason, required=True)
        if amount:
            check_amount("amount", amount)

        def build(tx: Tx, now: float) -> _Draft:
            self._require_shop(tx, shop_id)
            outstanding = sum(o for _, o in self._claims(tx, shop_id, ref))
            if amount > outstanding:
                raise InvalidArgumentError("amount", "exceeds the claim's outstanding amount")
            draft = _Draft()
            draft.move(
                acc.WRITTEN_OFF,
                acc.claim_account(shop_id),
                amount or outstanding,
                Code.WRITE_OFF,
                ref,
            )
            return draft

        params = {"shop_id": shop_id, "ref": ref, "amount": amount}
        return self._execute(_Request(key, "write_off_claim", actor, reason, "", params), build)

    # -- the one write path ----------------------------------------------------------------------

    def _execute(self, req: _Request, build: Build) -> Receipt:
        check_key(req.key)
        check_text("actor", req.actor, required=True, max_len=128)
        check_text("reason", req.reason)
        check_text("evidence", req.evidence)
        fingerprint = req.fingerprint
        # Retries are the common duplicate: answer them with plain reads, no write lock.
        # A request record and its transfers commit together and never change after.
        prior = self.store.read_request(req.key)
        if prior is not None:
            return self._replay(prior, req.operation, fingerprint, self.store.transfers_of)

        def write(tx: Tx) -> Receipt:
            prior = self.store.get_request(tx, req.key)
            if prior is not None:
                return self._replay(
                    prior,
                    req.operation,
                    fingerprint,
                    lambda k: self.store.transfers_of_request(tx, k),
                )
            now = self.clock.now()
            draft = build(tx, now)
            self.store.post(tx, self._transfers(req, draft, now))
            for table, values in draft.rows:
                self.store.insert(tx, table, values)
            result = {"frozen_until": draft.frozen_until}
            stored = StoredRequest(req.key, req.operation, fingerprint, result)
            self.store.put_request(tx, stored, now)
            transfers = tuple(self.store.transfers_of_request(tx, req.key))
            return Receipt(req.key, req.operation, transfers, False, draft.frozen_until)

        return run_keyed(self.db, req.key, write)

    def _replay(
        self,
        prior: StoredRequest,
        operation: str,
        fingerprint: str,
        transfers_of: Callable[[str], list[Transfer]],
    ) -> Receipt:
        if prior.operation != operation or prior.fingerprint != fingerprint:
            raise AlreadyExistsError(
                f"idempotency_key: already used for a different request ({prior.operation});"
                " nothing was written, use a new key"
            )
        transfers = tuple(transfers_of(prior.key))
        frozen_until = float(prior.result.get("frozen_until", 0.0))
        return Receipt(prior.key, operation, transfers, True, frozen_until)

    @staticmethod
    def _transfers(req: _Request, draft: _Draft, now: float) -> list[Transfer]:
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
        claims = self.store.open_claims(tx, acc.claim_account(shop_id))
        if ref:
            claims = [c for c in claims if c[0] == ref]
            if not claims:
                raise NotFoundError("ref: no open claim with this reference for the shop")
        elif not claims:
            raise FailedPreconditionError("shop_id: shop has no open claims")
        return claims


def _freeze_row(
    shop_id: str, action: str, until: float, ref: str, key: str, actor: str, reason: str
) -> dict[str, Any]:
    """A row of ``ledger_freezes`` (without its timestamp)."""
    return {
        "shop_id": shop_id,
        "action": action,
        "until": until,
        "ref": ref,
        "request_key": key,
        "actor": actor,
        "reason": reason,
    }
