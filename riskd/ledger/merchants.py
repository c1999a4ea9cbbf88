"""Shops and plain money movements: registration, deposits, withdrawals, fund top-ups."""

from __future__ import annotations

from riskd.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InsufficientFundsError,
)
from riskd.ledger import accounts as acc
from riskd.ledger.accounts import Kind
from riskd.ledger.codes import Code
from riskd.ledger.core import BookCore, Draft, Receipt, Request
from riskd.ledger.validate import check_amount, check_id, check_required
from riskd.sql import Tx


class MerchantOperations(BookCore):
    """Operations of ``Book`` on shops' deposits and the fund."""

    # -- shops ---------------------------------------------------------------------------

    def register_shop(self, shop_id: str, *, merchant_id: str = "") -> bool:
        """Open a shop's deposit and claim accounts; True if new, False if already there.

        Raises:
            AlreadyExistsError: the shop is registered under another merchant id (or
                none), which the message names.
        """
        check_id("shop_id", shop_id)
        if merchant_id:
            check_id("merchant_id", merchant_id)

        def write(tx: Tx) -> bool:
            row = self.store.one(
                tx, "SELECT merchant_id FROM ledger_shops WHERE shop_id = ?", (shop_id,)
            )
            if row is not None:
                if row[0] != merchant_id:  # the ids are the platform's, not a person's
                    held = f"merchant {row[0]!r}" if row[0] else "no merchant"
                    raise AlreadyExistsError(f"shop_id: shop registered under {held}")
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

        return self.store.write(write)

    # -- money in and out ------------------------------------------------------------------

    def deposit(
        self, key: str, shop_id: str, amount: int, *, actor: str, reason: str = ""
    ) -> Receipt:
        """A merchant tops up its security deposit (from outside: ``external:bank``)."""
        check_id("shop_id", shop_id)
        check_amount("amount", amount)

        def build(tx: Tx, now: float) -> Draft:
            self._require_shop(tx, shop_id)
            draft = Draft()
            draft.move(acc.BANK, acc.deposit_account(shop_id), amount, Code.DEPOSIT)
            return draft

        req = Request(key, "deposit", actor, reason, "", {"shop_id": shop_id, "amount": amount})
        return self._execute(req, build)

    def withdraw(
        self, key: str, shop_id: str, amount: int, *, actor: str, reason: str = ""
    ) -> Receipt:
        """A merchant takes deposit back; refused while frozen or owing the platform."""
        check_id("shop_id", shop_id)
        check_amount("amount", amount)

        def build(tx: Tx, now: float) -> Draft:
            self._require_shop(tx, shop_id)
            if self.store.frozen_until(tx, shop_id) > now:
                raise FailedPreconditionError("shop_id: shop is frozen; withdrawals are refused")
            owed = sum(o for _, o in self.store.open_claims(tx, acc.claim_account(shop_id)))
            if owed:
                raise FailedPreconditionError(f"shop_id: shop has open claims of {owed} fen")
            if self._balance(tx, acc.deposit_account(shop_id)) < amount:
                raise InsufficientFundsError("amount: exceeds the deposit")
            draft = Draft()
            draft.move(acc.deposit_account(shop_id), acc.BANK, amount, Code.WITHDRAWAL)
            return draft

        req = Request(key, "withdraw", actor, reason, "", {"shop_id": shop_id, "amount": amount})
        return self._execute(req, build)

    def top_up_fund(
        self, key: str, amount: int, *, actor: str, reason: str, evidence: str = ""
    ) -> Receipt:
        """An operator adds money to the compensation fund."""
        check_amount("amount", amount)
        check_required("reason", reason)

        def build(tx: Tx, now: float) -> Draft:
            draft = Draft()
            draft.move(acc.BANK, acc.FUND, amount, Code.FUND_TOP_UP)
            return draft

        req = Request(key, "top_up_fund", actor, reason, evidence, {"amount": amount})
        return self._execute(req, build)
