"""``verify``: the book's invariants recomputed from its rows, for auditors.

Where it sits: ``Book.verify()`` (``VerifyLedger``, ``riskd ledger verify``) reads every
row in one read-only transaction (``LedgerStore.book_rows``) and hands them here.

The rows are taken as the database holds them, since what is audited is a book someone
may have changed behind the book's back: a row the book cannot read (an unknown transfer
code or account kind, a counter that is not a number) is a problem reported with the
rest, never an error that hides them (review: a transfer code set to 99 or the fund's
account row deleted made VerifyLedger INTERNAL and ``riskd ledger verify`` a traceback);
so is a dispute, case or freeze whose amount or time is not a number.

What is checked:

- the chart: every platform account is there with its kind, every other account is a
  registered shop's deposit or claim, every shop has both, and each account's limit in
  the database (the ``CHECK`` constraint's ``limit_kind``) is its kind's (review: a
  fund whose limit was lifted verified clean);
- balances equal the replayed journal, all nets sum to zero, limits hold;
- every transfer flows the way its code says, with a positive amount, once;
- the fund equals top-ups - payouts + recoveries;
- every dispute's story adds up (paid = recovered + collected + written off + outstanding);
- every shop's claim account is the sum of its open claims, each named ``dispute/<id>``
  or ``case/<id>`` and none negative;
- no order was compensated more than its amount;
- every row belongs to a recorded request, and every request's rows are there: each
  transfer's request is recorded and a request's transfers are ``<key>#0``, ``#1``... in
  journal order; a money request has its transfers, a dispute, case or unfreeze the
  request that opened it, and each such request its row;
- each case's amount is its penalty transfers, its freeze (when it froze the shop) is
  recorded with the same end, and every freeze is a case's (review: a freeze row
  deleted behind the book's back let the shop withdraw its deposit and verified clean,
  as did a deposit posted without a request).

It cannot see a row changed together with everything that agrees with it (an amount
and both accounts' counters): the book holds no chain of hashes to compare with a
copy kept elsewhere, as the decision log does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from riskd.ledger import accounts as acc
from riskd.ledger.accounts import Account, Kind, Limit
from riskd.ledger.codes import FLOWS, Code
from riskd.ledger.store import BookRows, to_account, to_transfer
from riskd.ledger.transfers import Transfer, case_ref, dispute_ref, replay
from riskd.sql import Row

# the operations whose requests post transfers (each at least one: amounts are positive),
# and those that write one row of a table instead (a penalty may post nothing)
_MONEY_OPERATIONS = frozenset(
    {
        "deposit",
        "withdraw",
        "top_up_fund",
        "compensate_buyer",
        "late_shipment_coupon",
        "collect_claim",
        "write_off_claim",
    }
)
_RECORDS = {"open_dispute": "dispute", "penalize_shop": "case", "unfreeze": "unfreeze"}
_SHOP_KINDS = {Kind.DEPOSIT: acc.deposit_account, Kind.CLAIM: acc.claim_account}


def verify(rows: BookRows) -> tuple[str, ...]:
    """The problems found in the book's rows (none: sound)."""
    problems: list[str] = []
    accounts = _read_accounts(rows.accounts, problems)
    journal = _read_journal(rows.transfers, problems)
    rows = replace(
        rows,
        disputes=_read(rows.disputes, "dispute", (str, str, int, str), problems),
        cases=_read(rows.cases, "case", (str, int, float, str), problems),
        freezes=_read(rows.freezes, "freeze of shop", (str, str, float, str, str), problems),
    )
    problems += _check_chart(accounts, (str(r[0]) for r in rows.shops))
    problems += _check_replay(accounts, journal)
    # the checks by kind need both sides' accounts: a transfer naming another is reported
    # by the replay ("transfers to an unknown account")
    known = [t for t in journal if t.debit_account in accounts and t.credit_account in accounts]
    problems += _check_flows(accounts, known) + _check_fund(accounts, known)
    for a in accounts.values():
        if a.kind.limit and a.balance < 0:
            problems.append(f"{a.id}: balance {a.balance} below zero")
    if sum(a.net for a in accounts.values()) != 0:
        problems.append("accounts do not sum to zero")
    problems += _check_disputes(known) + _check_claims(accounts, known)
    problems += _check_orders(rows.disputes, known)
    operations = {str(key): str(op) for key, op in rows.requests}
    problems += _check_journal_requests(operations, journal)
    problems += _check_records(operations, rows)
    problems += _check_cases(rows, journal)
    return tuple(problems)


def _read_accounts(rows: list[Row], problems: list[str]) -> dict[str, Account]:
    """The accounts the book can read; the others and limits not their kind's reported."""
    accounts: dict[str, Account] = {}
    for row in rows:
        try:
            account = to_account(row[:5])
            limit = Limit(int(row[5]))
        except (ValueError, TypeError):
            problems.append(f"{row[0]}: an account row the book cannot read (kind or counters)")
            continue
        if limit is not account.kind.limit:
            problems.append(f"{account.id}: its limit in the database is not its kind's")
        accounts[account.id] = account
    return accounts


def _read(
    rows: list[Row], what: str, types: tuple[Callable[[Any], Any], ...], problems: list[str]
) -> list[Row]:
    """The rows whose columns read as ``types`` (converted); the others reported."""
    kept = []
    for row in rows:
        try:
            kept.append(tuple(read(value) for read, value in zip(types, row, strict=True)))
        except (ValueError, TypeError):
            problems.append(f"{what} {row[0]}: a row the book cannot read")
    return kept


def _read_journal(rows: list[Row], problems: list[str]) -> list[Transfer]:
    """The transfers the book can read, in journal order; the others reported."""
    journal = []
    for row in rows:
        try:
            journal.append(to_transfer(row))
        except (ValueError, TypeError):
            problems.append(f"transfer {row[0]}: a row the book cannot read (code or amount)")
    return journal


def _check_chart(accounts: dict[str, Account], shops: Iterable[str]) -> list[str]:
    """Platform accounts with their kinds, shops' accounts with their shops, and no other."""
    problems = []
    for account_id, kind in acc.PLATFORM_ACCOUNTS.items():
        if account_id not in accounts:
            problems.append(f"{account_id}: account missing")
        elif accounts[account_id].kind is not kind or accounts[account_id].shop_id:
            problems.append(f"{account_id}: not the platform's {kind.value} account")
    registered = set(shops)
    for a in accounts.values():
        if a.id in acc.PLATFORM_ACCOUNTS:
            continue
        name = _SHOP_KINDS.get(a.kind)
        if name is None or a.shop_id not in registered or a.id != name(a.shop_id):
            problems.append(f"{a.id}: not a registered shop's deposit or claim account")
    for shop_id in sorted(registered):
        for name in _SHOP_KINDS.values():
            if name(shop_id) not in accounts:
                problems.append(f"{name(shop_id)}: account missing")
    return problems


def _check_replay(accounts: dict[str, Account], journal: list[Transfer]) -> list[str]:
    replayed = replay(journal)
    problems = []
    for a in accounts.values():
        if replayed.get(a.id, (0, 0)) != (a.debits, a.credits):
            problems.append(f"{a.id}: balance differs from the replayed journal")
    unknown = sorted(set(replayed) - set(accounts))
    problems += [f"{x}: transfers to an unknown account" for x in unknown]
    return problems


def _check_flows(accounts: dict[str, Account], journal: list[Transfer]) -> list[str]:
    problems, seen = [], set()
    for t in journal:
        debit, credit = FLOWS[t.code]
        if (accounts[t.debit_account].kind, accounts[t.credit_account].kind) != (debit, credit):
            problems.append(f"transfer {t.id}: moves money the wrong way for {t.code.name}")
        if t.amount <= 0:
            problems.append(f"transfer {t.id}: non-positive amount")
        if t.id in seen:
            problems.append(f"transfer {t.id}: posted twice")
        seen.add(t.id)
    return problems


def _check_fund(accounts: dict[str, Account], journal: list[Transfer]) -> list[str]:
    if acc.FUND not in accounts:
        return []  # reported by the chart
    by: dict[Code, int] = defaultdict(int)
    for t in journal:
        by[t.code] += t.amount
    expected = (
        by[Code.FUND_TOP_UP]
        - by[Code.COMPENSATION]
        - by[Code.COUPON]
        + by[Code.RECOVERY_FROM_DEPOSIT]
        + by[Code.RECOVERY_COLLECTED]
    )
    if accounts[acc.FUND].balance != expected:
        return ["fund: balance differs from top-ups - payouts + recoveries"]
    return []


def _check_disputes(journal: list[Transfer]) -> list[str]:
    """Every dispute's story adds up: paid = recovered + collected + written off + outstanding."""
    by: dict[str, dict[Code, int]] = defaultdict(lambda: defaultdict(int))
    for t in journal:
        if t.ref.startswith("dispute/"):
            by[t.ref][t.code] += t.amount
    problems = []
    for ref, sums in by.items():
        outstanding = sums[Code.RECOVERY_CLAIM] - sums[Code.COLLECTION] - sums[Code.WRITE_OFF]
        recovered = sums[Code.RECOVERY_FROM_DEPOSIT] + sums[Code.COLLECTION] + sums[Code.WRITE_OFF]
        if sums[Code.COMPENSATION] != recovered + outstanding:
            problems.append(f"{ref}: paid does not add up")
        if outstanding < 0:
            problems.append(f"{ref}: negative outstanding")
    return problems


def _check_claims(accounts: dict[str, Account], journal: list[Transfer]) -> list[str]:
    """Each claim account is the sum of its claim lines (by ``ref``); every line names a
    dispute or a case and none is negative (a payment or write-off beyond its claim)."""
    lines: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in journal:
        if accounts[t.debit_account].kind is acc.Kind.CLAIM:
            lines[t.debit_account][t.ref] += t.amount
        if accounts[t.credit_account].kind is acc.Kind.CLAIM:
            lines[t.credit_account][t.ref] -= t.amount
    problems = []
    for account_id, by_ref in sorted(lines.items()):
        for ref, outstanding in sorted(by_ref.items()):
            if not ref.startswith(("dispute/", "case/")):
                problems.append(f"{account_id}: a claim line without a claim reference")
            elif outstanding < 0:
                problems.append(f"{account_id}: claim {ref} is negative")
        open_lines = sum(
            o for r, o in by_ref.items() if r.startswith(("dispute/", "case/")) and o > 0
        )
        if accounts[account_id].balance != open_lines:
            problems.append(f"{account_id}: balance differs from the sum of its open claims")
    return problems


def _check_orders(disputes: list[Row], journal: list[Transfer]) -> list[str]:
    """No order was paid more than its amount, whatever the number of its disputes."""
    paid: dict[str, int] = defaultdict(int)
    for t in journal:
        if t.code is Code.COMPENSATION:
            paid[t.ref] += t.amount
    by_order: dict[str, int] = defaultdict(int)
    amount: dict[str, int] = {}
    for dispute_id, order_id, order_amount, *_ in disputes:
        by_order[str(order_id)] += paid.get(dispute_ref(str(dispute_id)), 0)
        amount[str(order_id)] = min(int(order_amount), amount.get(str(order_id), int(order_amount)))
    return [
        f"order {order}: compensated {total} fen, more than its amount"
        for order, total in sorted(by_order.items())
        if total > amount[order]
    ]


def _check_journal_requests(operations: dict[str, str], journal: list[Transfer]) -> list[str]:
    """Each transfer is one of a recorded request's, numbered from 0 in journal order;
    each money request has its transfers."""
    ids: dict[str, list[str]] = defaultdict(list)
    for t in journal:
        ids[t.request_key].append(t.id)
    problems = []
    for key, posted in ids.items():
        if key not in operations:
            problems.append(f"request {key}: transfers without its request's record")
        elif posted != [f"{key}#{i}" for i in range(len(posted))]:
            problems.append(f"request {key}: transfers missing or out of order")
    for key, operation in sorted(operations.items()):
        if operation in _MONEY_OPERATIONS and key not in ids:
            problems.append(f"request {key}: {operation} without its transfers")
    return problems


def _check_records(operations: dict[str, str], rows: BookRows) -> list[str]:
    """Disputes, cases and unfreezes each with the request that wrote it, and back."""
    written = {
        "dispute": {str(r[3]) for r in rows.disputes},
        "case": {str(r[3]) for r in rows.cases},
        "unfreeze": {str(r[4]) for r in rows.freezes if r[1] == "unfreeze"},
    }
    problems = []
    for operation, kind in _RECORDS.items():
        for key in sorted(written[kind]):
            if operations.get(key) != operation:
                problems.append(f"request {key}: a {kind} without its {operation} request")
    for key, operation in sorted(operations.items()):
        record = _RECORDS.get(operation)
        if record is not None and key not in written[record]:
            problems.append(f"request {key}: {operation} without its {record}")
    return problems


def _check_cases(rows: BookRows, journal: list[Transfer]) -> list[str]:
    """Each case's amount is its penalty transfers; a case that froze the shop has its
    freeze, with the same end, and every freeze is a case's."""
    charged: dict[str, int] = defaultdict(int)
    for t in journal:
        if t.code in (Code.PENALTY, Code.PENALTY_CLAIM):
            charged[t.ref] += t.amount
    freezes = {(str(r[3]), float(r[2])) for r in rows.freezes if r[1] == "freeze"}
    cases = {case_ref(str(r[0])): (int(r[1]), float(r[2])) for r in rows.cases}
    problems = []
    for ref, (amount, until) in sorted(cases.items()):
        if charged.pop(ref, 0) != amount:
            problems.append(f"{ref}: penalty transfers differ from the case's amount")
        if until > 0 and (ref, until) not in freezes:
            problems.append(f"{ref}: the case's freeze is missing")
    problems += [f"{ref}: penalty transfers without a case" for ref in sorted(charged)]
    for ref, until in sorted(freezes):
        if cases.get(ref, (0, 0.0))[1] != until:
            problems.append(f"{ref}: a freeze no case made")
    return problems
