"""Hypothesis stateful test: the book against a reference model of the ledger, on both backends.

After every step: balances equal the model's; ``verify()`` finds nothing (balances
equal the replayed journal, nets sum to zero, fund = top-ups - payouts + recoveries,
every dispute adds up, limits hold); the internal accounts' sum changed only by
transfers with the outside (invariants 1, 2, 4, 5, 6); each dispute's statement (paid,
recovered, collected, written off, outstanding) and the buyers' account equal the model's.

Review: the payout path was drawn so rarely that with the fixed seed no payout ever
succeeded (disputes drawn blind, amounts beyond the order, an empty fund), and a payout
overpaying the buyer by 1 fen passed. Payouts are now drawn from the open disputes,
within their amounts, with the fund topped up first now and then; the outcomes are
hypothesis events, and ``test_the_machine_reaches_the_payout_path`` fails the suite if a
change to the strategies stops them from paying out again.
"""

from __future__ import annotations

import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from riskd.domain.clock import FakeClock
from riskd.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InsufficientFundsError,
    InvalidArgumentError,
    NotFoundError,
    RiskdError,
)
from riskd.ledger import Book, Code, Receipt
from riskd.ledger import accounts as acc
from tests.ledger.conftest import PG_BASE

SHOPS = ("s0", "s1")
DAY = 86_400
amounts = st.integers(min_value=1, max_value=400_000)
shops = st.sampled_from(SHOPS)


@dataclass
class Model:
    """What the ledger should hold, computed the simple way."""

    fund: int = 0
    deposits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SHOPS, 0))
    claims: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {} for s in SHOPS})
    frozen_until: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SHOPS, 0.0))
    disputes: dict[str, tuple[str, int]] = field(default_factory=dict)
    compensated: set[str] = field(default_factory=set)
    cases: set[str] = field(default_factory=set)
    coupons: set[str] = field(default_factory=set)
    buyers: int = 0  # everything paid out to buyers: payouts and coupons
    # per dispute: paid, recovered_from_deposit, collected, written_off (as in its statement)
    stories: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def owed(self, shop: str, ref: str = "") -> int:
        return sum(v for r, v in self.claims[shop].items() if not ref or r == ref)


Call = Callable[[str], Receipt]


class LedgerMachine(RuleBasedStateMachine):
    backend = "sqlite"
    # how payout attempts ended, over every run of this class (read by a test below)
    outcomes: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        if self.backend == "sqlite":
            url = f"sqlite:///{tempfile.mkdtemp()}/ledger.db"
        else:
            url = f"{PG_BASE}?schema=ledger_sm_{uuid.uuid4().hex[:12]}"
        self.clock = FakeClock(1_800_000_000.0)
        self.book = Book.open(url, clock=self.clock)
        self.model = Model()
        self.done: list[tuple[str, Call, Receipt]] = []
        self.n = 0
        for s in SHOPS:
            self.book.register_shop(s)

    def teardown(self) -> None:
        self.book.db.drop_schema()
        self.book.close()

    # -- helpers -------------------------------------------------------------------------

    def call(self, call: Call, expect: type[RiskdError] | None) -> Receipt | None:
        """Run ``call`` with a fresh key; check it fails as expected and writes nothing."""
        self.n += 1
        key = f"k{self.n}"
        if expect is not None:
            before = (self.book.accounts(), len(self.book.journal()))
            with pytest.raises(expect):
                call(key)
            assert (self.book.accounts(), len(self.book.journal())) == before
            return None
        receipt = call(key)
        assert not receipt.replayed
        self.done.append((key, call, receipt))
        return receipt

    def frozen(self, shop: str) -> bool:
        return self.model.frozen_until[shop] > self.clock.now()

    def outcome(self, what: str) -> None:
        """Record how a payout attempt ended: a statistic and a tally for the test below."""
        event(what)
        self.outcomes[what] += 1

    # -- rules ----------------------------------------------------------------------------

    @rule(amount=amounts)
    def top_up(self, amount: int) -> None:
        self.call(lambda k: self.book.top_up_fund(k, amount, actor="ops", reason="top"), None)
        self.model.fund += amount

    @rule(shop=shops, amount=amounts)
    def deposit(self, shop: str, amount: int) -> None:
        self.call(lambda k: self.book.deposit(k, shop, amount, actor="m"), None)
        self.model.deposits[shop] += amount

    @rule(shop=shops, amount=amounts)
    def withdraw(self, shop: str, amount: int) -> None:
        m = self.model
        expect: type[RiskdError] | None = None
        if self.frozen(shop) or m.owed(shop):
            expect = FailedPreconditionError
        elif m.deposits[shop] < amount:
            expect = InsufficientFundsError
        if self.call(lambda k: self.book.withdraw(k, shop, amount, actor="m"), expect):
            m.deposits[shop] -= amount

    @rule(
        shop=shops,
        violation=st.sampled_from(
            ["counterfeit_goods", "order_brushing", "content_violation_minor", "not_as_described"]
        ),
        case=st.integers(0, 5),
    )
    def penalize(self, shop: str, violation: str, case: int) -> None:
        m, case_id = self.model, f"c{case}"
        spec = self.book.schedule.violation(violation)
        expect = AlreadyExistsError if case_id in m.cases else None
        r = self.call(
            lambda k: self.book.penalize_shop(k, shop, violation, case_id, evidence="e", actor="a"),
            expect,
        )
        if r is None:
            return
        penalty = spec.penalty(m.deposits[shop])
        covered = min(penalty, m.deposits[shop])
        assert (r.total(Code.PENALTY), r.total(Code.PENALTY_CLAIM)) == (covered, penalty - covered)
        m.deposits[shop] -= covered
        if penalty > covered:
            m.claims[shop][f"case/{case_id}"] = penalty - covered
        if spec.freeze_days:
            until = self.clock.now() + spec.freeze_days * DAY
            m.frozen_until[shop] = max(m.frozen_until[shop], until)
        m.cases.add(case_id)

    @rule(shop=shops)
    def unfreeze(self, shop: str) -> None:
        expect = None if self.frozen(shop) else FailedPreconditionError
        if self.call(lambda k: self.book.unfreeze(k, shop, actor="ops", reason="r"), expect):
            self.model.frozen_until[shop] = 0.0

    @rule(days=st.integers(0, 40))
    def advance(self, days: int) -> None:
        self.clock.advance(days * DAY + 1)

    @rule(dispute=st.integers(0, 7), shop=shops, amount=amounts, data=st.data())
    def open_dispute(self, dispute: int, shop: str, amount: int, data: st.DataObject) -> None:
        d = f"d{dispute}"
        expect = AlreadyExistsError if d in self.model.disputes else None
        if self.call(
            lambda k: self.book.open_dispute(k, d, shop, f"o{d}", amount, actor="a"), expect
        ):
            self.model.disputes[d] = (shop, amount)
            # paying at once, as support often does, makes payouts one rule in eight, not
            # one in sixteen: the PostgreSQL run, with its few examples, needs them
            if data.draw(st.booleans(), label="pay at once"):
                self.pay(d, data)

    @precondition(lambda self: self.model.disputes)
    @rule(data=st.data())
    def compensate(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from([*sorted(self.model.disputes), "none"]), label="dispute")
        if d in self.model.disputes:
            self.pay(d, data)
            return
        call: Call = lambda k: self.book.compensate_buyer(k, d, 1, actor="a")  # noqa: E731
        self.call(call, NotFoundError)

    def pay(self, d: str, data: st.DataObject) -> None:
        """Pay dispute ``d``'s buyer an amount up to (rarely over) the order's."""
        m = self.model
        shop, order_amount = m.disputes[d]
        amount = data.draw(st.integers(1, order_amount + 1), label="amount")
        # top-ups alone leave the fund short of most payouts; keep the short case too
        if data.draw(st.booleans(), label="top up first") and m.fund < amount:
            self.top_up(amount - m.fund)
        expect: type[RiskdError] | None = None
        if amount > order_amount:
            expect = InvalidArgumentError
        elif d in m.compensated:
            expect = AlreadyExistsError
        elif m.fund < amount:
            expect = InsufficientFundsError
        r = self.call(lambda k: self.book.compensate_buyer(k, d, amount, actor="a"), expect)
        self.outcome(f"compensate: {expect.__name__ if expect else 'paid'}")
        if r is None:
            return
        recovered = min(amount, m.deposits[shop])
        assert (
            r.total(Code.COMPENSATION),
            r.total(Code.RECOVERY_FROM_DEPOSIT),
            r.total(Code.RECOVERY_CLAIM),
        ) == (amount, recovered, amount - recovered)
        m.fund += recovered - amount
        m.buyers += amount
        m.deposits[shop] -= recovered
        if amount > recovered:
            m.claims[shop][f"dispute/{d}"] = amount - recovered
            self.outcome("compensate: left a claim")
        m.stories[d].update(paid=amount, recovered_from_deposit=recovered)
        m.compensated.add(d)

    @precondition(lambda self: self.model.compensated)
    @rule(data=st.data())
    def second_payout_is_refused(self, data: st.DataObject) -> None:
        """One payout per dispute, and one dispute per order, whatever the fund holds."""
        m = self.model
        d = data.draw(st.sampled_from(sorted(m.compensated)), label="dispute")
        shop, order_amount = m.disputes[d]
        amount = data.draw(st.integers(1, order_amount), label="amount")
        if m.fund < amount:  # so that only the one-payout rule can refuse it
            self.top_up(amount - m.fund)
        self.call(lambda k: self.book.compensate_buyer(k, d, amount, actor="a"), AlreadyExistsError)
        self.outcome("second payout: refused")
        again: Call = lambda k: self.book.open_dispute(k, "again", shop, f"o{d}", amount, actor="a")  # noqa: E731
        self.call(again, AlreadyExistsError)

    @rule(shop=shops, amount=amounts, oldest=st.booleans())
    def collect(self, shop: str, amount: int, oldest: bool) -> None:
        m = self.model
        ref = "" if oldest or not m.claims[shop] else next(reversed(m.claims[shop]))
        expect: type[RiskdError] | None = None
        if not m.owed(shop):
            expect = FailedPreconditionError
        elif amount > m.owed(shop, ref):
            expect = InvalidArgumentError
        call: Call = lambda k: self.book.collect_claim(k, shop, amount, actor="ops", ref=ref)  # noqa: E731
        if self.call(call, expect) is None:
            return
        left = amount
        for r in list(m.claims[shop]):
            if ref and r != ref:
                continue
            take = min(left, m.claims[shop][r])
            left -= take
            m.claims[shop][r] -= take
            if r.startswith("dispute/"):
                m.fund += take
                m.stories[r.removeprefix("dispute/")]["collected"] += take
            if not m.claims[shop][r]:
                del m.claims[shop][r]

    @precondition(lambda self: any(self.model.claims.values()))
    @rule(data=st.data())
    def write_off(self, data: st.DataObject) -> None:
        m = self.model
        shop = data.draw(st.sampled_from([s for s in SHOPS if m.claims[s]]))
        ref = data.draw(st.sampled_from(sorted(m.claims[shop])))
        call: Call = lambda k: self.book.write_off_claim(k, shop, ref, actor="ops", reason="gone")  # noqa: E731
        r = self.call(call, None)
        assert r is not None and r.total(Code.WRITE_OFF) == m.claims[shop][ref]
        if ref.startswith("dispute/"):
            m.stories[ref.removeprefix("dispute/")]["written_off"] += m.claims[shop][ref]
        del m.claims[shop][ref]

    @rule(shop=shops, order=st.integers(0, 5))
    def coupon(self, shop: str, order: int) -> None:
        m, o = self.model, f"o{order}"
        expect: type[RiskdError] | None = None
        if o in m.coupons:
            expect = AlreadyExistsError
        elif m.fund < 500:
            expect = InsufficientFundsError
        if self.call(lambda k: self.book.pay_late_shipment_coupon(k, shop, o, actor="a"), expect):
            m.fund -= 500
            m.buyers += 500
            m.coupons.add(o)

    @precondition(lambda self: self.done)
    @rule(data=st.data())
    def retry_returns_the_first_result(self, data: st.DataObject) -> None:
        key, call, first = data.draw(st.sampled_from(self.done))
        again = call(key)
        assert again.replayed and again.transfers == first.transfers

    @precondition(lambda self: self.done)
    @rule(data=st.data())
    def key_reused_for_other_content_is_refused(self, data: st.DataObject) -> None:
        key, _, _ = data.draw(st.sampled_from(self.done))
        before = len(self.book.journal())
        with pytest.raises(AlreadyExistsError, match="idempotency_key"):
            self.book.deposit(key, "s0", 987_654_321, actor="someone-else")
        assert len(self.book.journal()) == before

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def balances_match_the_model(self) -> None:
        m = self.model
        got = {a.id: a.balance for a in self.book.accounts()}
        assert got[acc.FUND] == m.fund >= 0
        assert {a.id: a.net for a in self.book.accounts()}[acc.BUYERS] == m.buyers
        for s in SHOPS:
            assert got[acc.deposit_account(s)] == m.deposits[s] >= 0
            assert got[acc.claim_account(s)] == m.owed(s)
            st_ = self.book.shop_statement(s)
            assert {c.ref: c.outstanding for c in st_.claims} == m.claims[s]
            assert st_.frozen == self.frozen(s)

    @invariant()
    def the_book_verifies(self) -> None:
        assert self.book.verify() == ()

    @invariant()
    def internal_money_changes_only_through_the_outside(self) -> None:
        accounts = self.book.accounts()
        internal = sum(a.net for a in accounts if a.id not in acc.EXTERNAL_ACCOUNTS)
        inflow = outflow = 0
        for t in self.book.journal():
            if t.debit_account in acc.EXTERNAL_ACCOUNTS:
                inflow += t.amount
            if t.credit_account in acc.EXTERNAL_ACCOUNTS:
                outflow += t.amount
            assert not (
                t.debit_account in acc.EXTERNAL_ACCOUNTS
                and t.credit_account in acc.EXTERNAL_ACCOUNTS
            )
        assert internal == inflow - outflow

    @invariant()
    def every_dispute_adds_up(self) -> None:
        m = self.model
        for d, (shop, _) in m.disputes.items():
            s = self.book.dispute_statement(d)
            story = m.stories[d]
            assert (s.paid, s.recovered_from_deposit, s.collected, s.written_off) == (
                story["paid"],
                story["recovered_from_deposit"],
                story["collected"],
                story["written_off"],
            )
            assert s.outstanding == m.claims[shop].get(f"dispute/{d}", 0)
            assert s.paid == s.recovered_from_deposit + s.collected + s.written_off + s.outstanding


class PostgresLedgerMachine(LedgerMachine):
    backend = "postgres"


TestLedgerSQLite = LedgerMachine.TestCase
TestLedgerSQLite.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerPostgres = pytest.mark.postgres(PostgresLedgerMachine.TestCase)
TestLedgerPostgres.settings = settings(
    max_examples=8,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class CountingMachine(LedgerMachine):
    outcomes: ClassVar[Counter[str]] = Counter()


def test_the_machine_reaches_the_payout_path() -> None:
    """The machine pays out, leaves claims and refuses second payouts, in a fixed set of runs.

    Review: with the fixed seed no payout ever succeeded and every test above passed
    anyway; this fails if the strategies drift back to that."""
    run_state_machine_as_test(
        CountingMachine,
        settings=settings(
            max_examples=10,
            stateful_step_count=30,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    got = CountingMachine.outcomes
    assert got["compensate: paid"] >= 1, got
    assert got["compensate: left a claim"] >= 1, got
    assert got["second payout: refused"] >= 1, got
