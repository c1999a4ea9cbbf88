"""Advance compensation (pay first, recover later), coupons, and the claims left behind."""

from __future__ import annotations

from riskd.errors import (
    AlreadyExistsError,
    InsufficientFundsError,
    InvalidArgumentError,
    NotFoundError,
)
from riskd.ledger import accounts as acc
from riskd.ledger.codes import Code
from riskd.ledger.core import BookCore, Draft, Receipt, Request
from riskd.ledger.transfers import dispute_ref, order_ref
from riskd.ledger.validate import check_amount, check_claim_ref, check_id, check_required
from riskd.sql import Tx


class CompensationOperations(BookCore):
    """Operations of ``Book`` on disputes, the fund's payouts and merchants' claims."""

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
        """Record a buyer's dispute against a shop's order (no money moves yet).

        One dispute per order, so an order is compensated at most once (a unique
        index on ``ledger_disputes.order_id`` is the second line). The ledger knows
        no orders, so it cannot check that the order is the shop's: the caller's.

        Raises:
            AlreadyExistsError: the dispute id, or a dispute for this order, exists.
        """
        check_id("dispute_id", dispute_id)
        check_id("shop_id", shop_id)
        check_id("order_id", order_id)
        check_amount("order_amount", order_amount)

        def build(tx: Tx, now: float) -> Draft:
            self._require_shop(tx, shop_id)
            if self._dispute(tx, dispute_id) is not None:
                raise AlreadyExistsError("dispute_id: dispute already open")
            if self.store.one(tx, "SELECT 1 FROM ledger_disputes WHERE order_id = ?", (order_id,)):
                raise AlreadyExistsError("order_id: a dispute for this order already exists")
            draft = Draft()
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
        return self._execute(Request(key, "open_dispute", actor, reason, "", params), build)

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
            AlreadyExistsError: the dispute, or its order under another dispute (possible
                only in a database from before one dispute per order), was compensated.
        """
        check_id("dispute_id", dispute_id)
        check_amount("amount", amount)

        def build(tx: Tx, now: float) -> Draft:
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
            if self.store.one(
                tx,
                "SELECT 1 FROM ledger_disputes d JOIN ledger_transfers t"
                " ON t.ref = 'dispute/' || d.dispute_id AND t.code = ?"
                " WHERE d.order_id = (SELECT order_id FROM ledger_disputes WHERE dispute_id = ?)",
                (int(Code.COMPENSATION), dispute_id),
            ):
                raise AlreadyExistsError("order_id: order already compensated (one per order)")
            if self._balance(tx, acc.FUND) < amount:
                raise InsufficientFundsError("fund: cannot cover this payout; top the fund up")
            deposit = self._balance(tx, acc.deposit_account(shop_id))
            recovered = min(amount, deposit)
            draft = Draft()
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
            Request(key, "compensate_buyer", actor, reason, evidence, params), build
        )

    def pay_late_shipment_coupon(
        self, key: str, shop_id: str, order_id: str, *, actor: str, evidence: str = ""
    ) -> Receipt:
        """Pay the buyer of a late-shipped order the schedule's coupon from the fund, once.

        The coupon's amount comes from the schedule, not the caller: a retry after a
        schedule change replays the first receipt (with the amount then paid).
        """
        check_id("shop_id", shop_id)
        check_id("order_id", order_id)
        coupon = self.schedule.late_shipment_coupon_fen

        def build(tx: Tx, now: float) -> Draft:
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
            draft = Draft()
            draft.move(acc.FUND, acc.BUYERS, coupon, Code.COUPON, ref)
            return draft

        params = {"shop_id": shop_id, "order_id": order_id}
        req = Request(key, "late_shipment_coupon", actor, "", evidence, params, {"coupon": coupon})
        return self._execute(req, build)

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
        if ref:
            check_claim_ref(ref)

        def build(tx: Tx, now: float) -> Draft:
            self._require_shop(tx, shop_id)
            claims = self._claims(tx, shop_id, ref)
            if amount > sum(o for _, o in claims):
                raise InvalidArgumentError("amount", "exceeds what the shop owes")
            draft, left = Draft(), amount
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
        return self._execute(Request(key, "collect_claim", actor, reason, "", params), build)

    def write_off_claim(
        self, key: str, shop_id: str, ref: str, *, actor: str, reason: str, amount: int = 0
    ) -> Receipt:
        """An operator gives up (part of) one claim; ``amount`` 0 writes off all that is open.

        ``ref`` must name the claim (``dispute/<id>`` or ``case/<id>``): a write-off
        is posted against that claim's line, never against the shop's claims at large.
        """
        check_id("shop_id", shop_id)
        check_claim_ref(ref)
        check_required("reason", reason)
        if amount:
            check_amount("amount", amount)

        def build(tx: Tx, now: float) -> Draft:
            self._require_shop(tx, shop_id)
            outstanding = sum(o for _, o in self._claims(tx, shop_id, ref))
            if amount > outstanding:
                raise InvalidArgumentError("amount", "exceeds the claim's outstanding amount")
            draft = Draft()
            draft.move(
                acc.WRITTEN_OFF,
                acc.claim_account(shop_id),
                amount or outstanding,
                Code.WRITE_OFF,
                ref,
            )
            return draft

        params = {"shop_id": shop_id, "ref": ref, "amount": amount}
        return self._execute(Request(key, "write_off_claim", actor, reason, "", params), build)
