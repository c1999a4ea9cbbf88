"""The read side of the book: balances, account histories, shop and dispute stories, checks.

``verify()`` recomputes the book's invariants from its rows (``riskd.ledger.audit``);
the CLI's ``riskd ledger verify``, ``VerifyLedger`` and the tests use it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from riskd.domain.clock import Clock
from riskd.domain.shop import ShopState
from riskd.errors import InvalidArgumentError, NotFoundError
from riskd.ledger import accounts as acc
from riskd.ledger import audit
from riskd.ledger.accounts import Account
from riskd.ledger.codes import Code
from riskd.ledger.store import LedgerStore
from riskd.ledger.transfers import Transfer, dispute_ref
from riskd.ledger.validate import MAX_SEQ, check_id, check_seq, check_text
from riskd.sql import Tx


@dataclass(frozen=True, slots=True)
class AccountStatement:
    """An account's totals and a page of its transfers (journal order)."""

    account: Account
    transfers: tuple[Transfer, ...]


@dataclass(frozen=True, slots=True)
class ClaimLine:
    """One open claim on a shop: ``ref`` is ``dispute/<id>`` or ``case/<id>``."""

    ref: str
    outstanding: int


@dataclass(frozen=True, slots=True)
class ShopStatement:
    shop_id: str
    merchant_id: str
    deposit: int
    owed: int
    claims: tuple[ClaimLine, ...]
    frozen_until: float
    frozen: bool
    penalties: int


@dataclass(frozen=True, slots=True)
class DisputeStatement:
    """The full story of one dispute; ``paid == recovered_from_deposit + collected +
    written_off + outstanding`` always holds."""

    dispute_id: str
    shop_id: str
    order_id: str
    order_amount: int
    paid: int
    recovered_from_deposit: int
    collected: int
    written_off: int
    outstanding: int
    transfers: tuple[Transfer, ...]


class Statements:
    """Read methods of ``Book`` (mixed in); they never write."""

    store: LedgerStore
    clock: Clock

    def account(self, account_id: str) -> Account:
        """One account and its totals."""
        _check_account_id(account_id)
        account = self.store.get_account(account_id)
        if account is None:
            raise NotFoundError("account_id: no such account")
        return account

    def accounts(self) -> list[Account]:
        """Every account with its totals, by id."""
        return self.store.accounts()

    def account_statement(
        self, account_id: str, *, after_seq: int = 0, limit: int = 100
    ) -> AccountStatement:
        """An account's balance and up to ``limit`` of its transfers after ``after_seq``,
        read at one moment (the page never holds a transfer the totals leave out)."""
        check_seq("after_seq", after_seq)
        if not 0 < limit <= 10_000:
            raise InvalidArgumentError("limit", "must be between 1 and 10000")
        _check_account_id(account_id)

        def read(tx: Tx) -> AccountStatement:
            account = self._account_in(tx, account_id)
            page = self.store.transfers_in(
                tx, account_id=account_id, after_seq=after_seq, limit=limit
            )
            return AccountStatement(account, tuple(page))

        return self.store.read(read)

    def journal(self, *, after_seq: int = 0, limit: int = 0) -> list[Transfer]:
        """Every transfer in the order it was posted (``limit`` 0: all)."""
        check_seq("after_seq", after_seq)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_SEQ:
            raise InvalidArgumentError("limit", f"must be between 0 (all) and {MAX_SEQ}")
        return self.store.transfers(after_seq=after_seq, limit=limit)

    def shop_statement(self, shop_id: str) -> ShopStatement:
        """A shop's deposit, what it owes and its claim lines, freeze and penalties, all
        read at one moment (``owed`` is always the sum of ``claims``)."""
        check_id("shop_id", shop_id)
        now = self.clock.now()

        def read(tx: Tx) -> ShopStatement:
            rows = self.store.rows(
                tx, "SELECT merchant_id FROM ledger_shops WHERE shop_id = ?", (shop_id,)
            )
            if not rows:
                raise NotFoundError("shop_id: no such shop")
            claims = self._claim_lines(tx, shop_id)
            until = self._frozen_until(tx, shop_id)
            penalties = self.store.rows(
                tx, "SELECT COUNT(*) FROM ledger_cases WHERE shop_id = ?", (shop_id,)
            )
            return ShopStatement(
                shop_id=shop_id,
                merchant_id=rows[0][0],
                deposit=self._account_in(tx, acc.deposit_account(shop_id)).balance,
                owed=self._account_in(tx, acc.claim_account(shop_id)).balance,
                claims=claims,
                frozen_until=until,
                frozen=until > now,
                penalties=int(penalties[0][0]),
            )

        return self.store.read(read)

    def _account_in(self, tx: Tx, account_id: str) -> Account:
        account = self.store.account(tx, account_id)
        if account is None:
            raise NotFoundError("account_id: no such account")
        return account

    def _claim_lines(self, tx: Tx, shop_id: str) -> tuple[ClaimLine, ...]:
        totals: dict[str, int] = defaultdict(int)
        claim = acc.claim_account(shop_id)
        for t in self.store.transfers_in(tx, account_id=claim):
            totals[t.ref] += t.amount if t.debit_account == claim else -t.amount
        return tuple(ClaimLine(ref, out) for ref, out in totals.items() if out > 0)

    def _frozen_until(self, tx: Tx, shop_id: str) -> float:
        rows = self.store.rows(
            tx,
            "SELECT action, until FROM ledger_freezes WHERE shop_id = ? ORDER BY seq",
            (shop_id,),
        )
        until = 0.0
        for action, end in rows:
            until = 0.0 if action == "unfreeze" else max(until, float(end))
        return until

    def dispute_statement(self, dispute_id: str) -> DisputeStatement:
        """Paid, recovered from the deposit, collected, written off and outstanding, in fen."""
        check_id("dispute_id", dispute_id)
        rows = self.store.query(
            "SELECT shop_id, order_id, order_amount FROM ledger_disputes WHERE dispute_id = ?",
            (dispute_id,),
        )
        if not rows:
            raise NotFoundError("dispute_id: no such dispute")
        transfers = tuple(self.store.transfers(ref=dispute_ref(dispute_id)))
        by: dict[Code, int] = defaultdict(int)
        for t in transfers:
            by[t.code] += t.amount
        outstanding = by[Code.RECOVERY_CLAIM] - by[Code.COLLECTION] - by[Code.WRITE_OFF]
        shop_id, order_id, order_amount = rows[0]
        return DisputeStatement(
            dispute_id=dispute_id,
            shop_id=shop_id,
            order_id=order_id,
            order_amount=int(order_amount),
            paid=by[Code.COMPENSATION],
            recovered_from_deposit=by[Code.RECOVERY_FROM_DEPOSIT],
            collected=by[Code.COLLECTION],
            written_off=by[Code.WRITE_OFF],
            outstanding=outstanding,
            transfers=transfers,
        )

    def shop_states(self) -> dict[str, ShopState]:
        """Enforcement state of every shop that has a freeze, a penalty or a claim (for scoring).

        Three aggregate queries over the whole book; ``LedgerShopDirectory`` calls
        this every few seconds, never per order.
        """
        now = self.clock.now()
        frozen = self.store.query(
            "SELECT f.shop_id, MAX(f.until) FROM ledger_freezes f"
            " WHERE f.action = 'freeze' AND f.until > ? AND f.seq >"
            " (SELECT COALESCE(MAX(u.seq), 0) FROM ledger_freezes u"
            "  WHERE u.shop_id = f.shop_id AND u.action = 'unfreeze')"
            " GROUP BY f.shop_id",
            (now,),
        )
        penalties = self.store.query("SELECT shop_id, COUNT(*) FROM ledger_cases GROUP BY shop_id")
        owed = self.store.query(
            "SELECT shop_id, debits - credits FROM ledger_accounts"
            " WHERE kind = 'claim' AND debits > credits"
        )
        until = {s: float(u) for s, u in frozen}
        counts = {s: int(n) for s, n in penalties}
        claims = {s: int(o) for s, o in owed}
        return {
            shop: ShopState(
                shop_id=shop,
                frozen=until.get(shop, 0.0) > now,
                frozen_until=until.get(shop, 0.0),
                penalties=counts.get(shop, 0),
                open_claims=claims.get(shop, 0),
            )
            for shop in set(until) | set(counts) | set(claims)
        }

    def verify(self) -> tuple[str, ...]:
        """Check the book's invariants from scratch; returns the problems found (none:
        sound). What is checked: ``riskd.ledger.audit``."""
        return audit.verify(self.store.book_rows())


def _check_account_id(account_id: str) -> None:
    check_text("account_id", account_id, required=True, max_len=300, single_line=True)
