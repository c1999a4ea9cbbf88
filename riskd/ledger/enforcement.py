"""Penalties per the reviewed schedule, and shop freezes (set by penalties, lifted by operators)."""

from __future__ import annotations

from typing import Any

from riskd.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
)
from riskd.ledger import accounts as acc
from riskd.ledger.codes import Code
from riskd.ledger.core import BookCore, Draft, Receipt, Request
from riskd.ledger.transfers import case_ref
from riskd.ledger.validate import check_id, check_required
from riskd.sql import Tx

DAY_S = 86_400


class EnforcementOperations(BookCore):
    """Operations of ``Book`` that penalize and freeze shops."""

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
        check_required("evidence", evidence)

        def build(tx: Tx, now: float) -> Draft:
            # looked up only for a new request: a retry after the schedule dropped or
            # renamed the type still gets its first receipt (review: INVALID_ARGUMENT)
            spec = self.schedule.violation(violation)
            self._require_shop(tx, shop_id)
            if self.store.one(tx, "SELECT 1 FROM ledger_cases WHERE case_id = ?", (case_id,)):
                raise AlreadyExistsError("case_id: this violation case was already penalized")
            deposit = self._balance(tx, acc.deposit_account(shop_id))
            penalty = spec.penalty(deposit)
            covered = min(penalty, deposit)
            draft = Draft()
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
        req = Request(key, "penalize_shop", actor, reason, evidence, params)
        # a new request's type is refused before the writer lock (review: an unknown one
        # waited 5 s behind a stalled writer, then UNAVAILABLE "retry")
        return self._execute(req, build, lambda: self.schedule.violation(violation))

    def unfreeze(self, key: str, shop_id: str, *, actor: str, reason: str) -> Receipt:
        """An operator lifts a shop's freeze before it ends."""
        check_id("shop_id", shop_id)
        check_required("reason", reason)

        def build(tx: Tx, now: float) -> Draft:
            self._require_shop(tx, shop_id)
            if self.store.frozen_until(tx, shop_id) <= now:
                raise FailedPreconditionError("shop_id: shop is not frozen")
            draft = Draft()
            row = _freeze_row(shop_id, "unfreeze", 0.0, "", key, actor, reason)
            draft.rows.append(("ledger_freezes", row | {"at": now}))
            return draft

        return self._execute(
            Request(key, "unfreeze", actor, reason, "", {"shop_id": shop_id}), build
        )


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
