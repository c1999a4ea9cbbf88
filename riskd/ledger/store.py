"""The ledger's SQL store: schema and the primitive reads and writes, inside one transaction.

One interface over ``riskd.sql.Database`` for both SQLite and PostgreSQL; only
the DDL differs. The database enforces what must never break even if the code
had a bug: transfer ids are unique, amounts positive, balances within their
account's limit (CHECK constraints), at most one compensation per dispute and
one coupon per order (partial unique indexes), one dispute per order (a unique
index, where an older database's rows allow it), and transfers, requests,
disputes, cases and freezes cannot be updated or deleted (triggers). Only the
``debits``/``credits`` counters of ``ledger_accounts`` change, in the same
transaction as the transfers that move them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from riskd.errors import (
    DatabaseBusyError,
    InsufficientFundsError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from riskd.ledger.accounts import PLATFORM_ACCOUNTS, Account, Kind, Limit
from riskd.ledger.codes import Code
from riskd.ledger.transfers import Transfer
from riskd.sql import Database, Row, Tx, advisory_lock

T = TypeVar("T")
LEDGER_WRITER_LOCK = 0x7269736B_6C656467  # "riskledg": the ledger's one-writer advisory lock
WRITE_WAIT_S = 5.0  # how long a ledger write waits for its turn before it is UNAVAILABLE
MAX_FEN = 2**63 - 1
IMMUTABLE_TABLES = (
    "ledger_transfers",
    "ledger_requests",
    "ledger_shops",
    "ledger_disputes",
    "ledger_cases",
    "ledger_freezes",
)

_COMMON = [
    """CREATE TABLE IF NOT EXISTS ledger_accounts (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        shop_id TEXT NOT NULL,
        limit_kind INTEGER NOT NULL,
        debits BIGINT NOT NULL DEFAULT 0,
        credits BIGINT NOT NULL DEFAULT 0,
        created_at {real} NOT NULL,
        CHECK (debits >= 0 AND credits >= 0),
        CHECK (limit_kind <> 1 OR debits <= credits),
        CHECK (limit_kind <> 2 OR credits <= debits))""",
    """CREATE TABLE IF NOT EXISTS ledger_transfers (
        seq {serial},
        id TEXT NOT NULL UNIQUE,
        debit_account TEXT NOT NULL REFERENCES ledger_accounts (id),
        credit_account TEXT NOT NULL REFERENCES ledger_accounts (id),
        amount BIGINT NOT NULL CHECK (amount > 0),
        code INTEGER NOT NULL,
        ref TEXT NOT NULL,
        request_key TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        evidence TEXT NOT NULL,
        at {real} NOT NULL,
        CHECK (debit_account <> credit_account))""",
    "CREATE INDEX IF NOT EXISTS ledger_transfers_debit ON ledger_transfers (debit_account, seq)",
    "CREATE INDEX IF NOT EXISTS ledger_transfers_credit ON ledger_transfers (credit_account, seq)",
    "CREATE INDEX IF NOT EXISTS ledger_transfers_ref ON ledger_transfers (ref, seq)",
    "CREATE INDEX IF NOT EXISTS ledger_transfers_request ON ledger_transfers (request_key)",
    f"""CREATE UNIQUE INDEX IF NOT EXISTS ledger_one_compensation
        ON ledger_transfers (ref) WHERE code = {int(Code.COMPENSATION)}""",
    f"""CREATE UNIQUE INDEX IF NOT EXISTS ledger_one_coupon
        ON ledger_transfers (ref) WHERE code = {int(Code.COUPON)}""",
    """CREATE TABLE IF NOT EXISTS ledger_requests (
        key TEXT PRIMARY KEY,
        operation TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        result TEXT NOT NULL,
        at {real} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_shops (
        shop_id TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL,
        created_at {real} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_disputes (
        dispute_id TEXT PRIMARY KEY,
        shop_id TEXT NOT NULL REFERENCES ledger_shops (shop_id),
        order_id TEXT NOT NULL,
        order_amount BIGINT NOT NULL CHECK (order_amount > 0),
        request_key TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        opened_at {real} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_cases (
        case_id TEXT PRIMARY KEY,
        shop_id TEXT NOT NULL REFERENCES ledger_shops (shop_id),
        violation TEXT NOT NULL,
        schedule_version TEXT NOT NULL,
        amount BIGINT NOT NULL CHECK (amount >= 0),
        frozen_until {real} NOT NULL,
        evidence TEXT NOT NULL,
        request_key TEXT NOT NULL,
        actor TEXT NOT NULL,
        at {real} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_freezes (
        seq {serial},
        shop_id TEXT NOT NULL REFERENCES ledger_shops (shop_id),
        action TEXT NOT NULL CHECK (action IN ('freeze', 'unfreeze')),
        until {real} NOT NULL,
        ref TEXT NOT NULL,
        request_key TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        at {real} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ledger_freezes_shop ON ledger_freezes (shop_id, seq)",
]

# One dispute per order, so an order is compensated at most once. Created by
# ``create_schema`` only where no order already has two disputes (a database from
# before this rule): there the book refuses a second payout per order instead.
ONE_DISPUTE_PER_ORDER = (
    "CREATE UNIQUE INDEX IF NOT EXISTS ledger_one_dispute_per_order ON ledger_disputes (order_id)"
)

_SQLITE_IMMUTABLE = """CREATE TRIGGER IF NOT EXISTS {table}_no_{op} BEFORE {op} ON {table}
    BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"""

_PG_FUNCTION = """CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '%% is append-only', TG_TABLE_NAME; END $$"""
_PG_IMMUTABLE = """CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE
    ON {table} FOR EACH ROW EXECUTE FUNCTION ledger_append_only()"""


def ddl(dialect: str) -> list[str]:
    """The schema statements for ``dialect`` ("sqlite" or "postgres"), in order."""
    if dialect == "sqlite":
        types = {"real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}
        stmts = [s.format(**types) for s in _COMMON]
        for table in IMMUTABLE_TABLES:
            stmts += [_SQLITE_IMMUTABLE.format(table=table, op=op) for op in ("UPDATE", "DELETE")]
        return stmts
    types = {
        "real": "DOUBLE PRECISION",
        "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    }
    stmts = [s.format(**types) for s in _COMMON] + [_PG_FUNCTION]
    return stmts + [_PG_IMMUTABLE.format(table=t) for t in IMMUTABLE_TABLES]


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """The idempotency record of one money request."""

    key: str
    operation: str
    fingerprint: str
    result: dict[str, Any]


_TRANSFER_COLUMNS = (
    "id, debit_account, credit_account, amount, code, ref, request_key, actor, reason, evidence, "
    "at, seq"
)
_ACCOUNT_COLUMNS = "id, kind, debits, credits, shop_id"


@dataclass(frozen=True, slots=True)
class BookRows:
    """Every row ``verify`` reads, as the database holds them (``to_account``,
    ``to_transfer`` read them; a tampered value may refuse to be read)."""

    accounts: list[Row]  # id, kind, debits, credits, shop_id, limit_kind
    transfers: list[Row]  # the columns of ``to_transfer``, in journal order
    shops: list[Row]  # shop_id
    disputes: list[Row]  # dispute_id, order_id, order_amount, request_key
    requests: list[Row]  # key, operation
    cases: list[Row]  # case_id, amount, frozen_until, request_key
    freezes: list[Row]  # shop_id, action, until, ref, request_key (journal order)


def to_transfer(row: Row) -> Transfer:
    """A transfer from its row (``ValueError``/``TypeError`` for one the book cannot read)."""
    return Transfer(
        id=row[0],
        debit_account=row[1],
        credit_account=row[2],
        amount=int(row[3]),
        code=Code(int(row[4])),
        ref=row[5],
        request_key=row[6],
        actor=row[7],
        reason=row[8],
        evidence=row[9],
        at=float(row[10]),
        seq=int(row[11]),
    )


def to_account(row: Row) -> Account:
    """An account from its row (``ValueError``/``TypeError`` for one the book cannot read)."""
    return Account(row[0], Kind(row[1]), int(row[2]), int(row[3]), row[4])


@dataclass(slots=True)
class _Counters:
    """An account's counters while a request is being posted."""

    debits: int
    credits: int
    limit: Limit


def _apply(
    counters: dict[str, _Counters], account_id: str, *, debit: int = 0, credit: int = 0
) -> None:
    c = counters[account_id]
    c.debits += debit
    c.credits += credit
    if c.debits > MAX_FEN or c.credits > MAX_FEN:
        raise InvalidArgumentError("amount", f"would overflow 64 bits on account {account_id}")
    if c.limit is Limit.DEBITS_MUST_NOT_EXCEED_CREDITS and c.debits > c.credits:
        raise InsufficientFundsError(f"{account_id} cannot cover {debit} fen")
    if c.limit is Limit.CREDITS_MUST_NOT_EXCEED_DEBITS and c.credits > c.debits:
        raise InsufficientFundsError(f"{account_id} owes less than {credit} fen")


class LedgerStore:
    """SQL reads and writes of the ledger; writers take a ``Tx`` from ``Database.run``."""

    def __init__(self, db: Database, *, write_wait_s: float | None = None) -> None:
        self.db = db
        self.write_wait_s = WRITE_WAIT_S if write_wait_s is None else write_wait_s
        self._writer = threading.Lock()

    def write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` as the ledger's one writer, in one transaction.

        Writers queue instead of racing: in this process on a lock (SQLite's
        busy handler would otherwise sleep in growing steps and stretch the
        tail latency), across processes on the database itself. SQLite's
        ``BEGIN IMMEDIATE`` admits one writer at a time. On PostgreSQL every
        ledger write first takes a session advisory lock, shared by all
        replicas on the database, *before* its transaction starts, so writers
        never fail serialization on the fund's row and a duplicate request's
        snapshot sees the first one's idempotency record (a lock taken inside a
        SERIALIZABLE transaction would come after its snapshot). Ledger traffic
        is analyst and operator work: one writer at a time is plenty and makes
        every check-then-post race-free; the transaction stays SERIALIZABLE as
        a second line. A unique-key race or serialization failure that still
        happens is retried; the retry reads the winner's committed rows.

        The wait for the turn is bounded by ``write_wait_s`` (both locks together;
        on SQLite, this process's lock and the file's writer lock): a writer stuck
        elsewhere (a stalled replica or CLI holding the advisory lock or the SQLite
        file) makes later writes answer UNAVAILABLE instead of holding their
        threads forever. Nothing was written then; retry with the same key.

        Raises:
            UnavailableError: no turn within ``write_wait_s``, or the database
                stayed too contended to commit.
        """
        deadline = time.monotonic() + self.write_wait_s
        if not self._writer.acquire(timeout=self.write_wait_s):
            raise UnavailableError("ledger busy: no write turn in time; retry with the same key")
        try:
            if self.db.dialect != "postgres":
                try:  # BEGIN IMMEDIATE waits for another process's writer until the deadline
                    return _retry(self.db, fn, deadline)
                except DatabaseBusyError as e:
                    raise UnavailableError(
                        "ledger busy: another process holds the database's writer lock;"
                        " retry with the same key"
                    ) from e
            if not advisory_lock(self.db, self.writer_lock, deadline):
                raise UnavailableError(
                    "ledger busy: another writer holds the ledger lock; retry with the same key"
                )
            try:
                return _retry(self.db, fn)
            finally:
                self.db.query("SELECT pg_advisory_unlock(?)", (self.writer_lock,))
        finally:
            self._writer.release()

    @property
    def writer_lock(self) -> int:
        """The PostgreSQL advisory lock this book's writers take turns on: one per
        ``?schema=`` (review: one for the whole database held a book's writes behind
        another schema's stalled writer, as ``Database.schema_lock`` once did)."""
        return self.db.scoped_lock(LEDGER_WRITER_LOCK)

    def create_schema(self, now: float) -> None:
        """Create the tables (idempotent) and the platform accounts.

        On PostgreSQL, processes starting together take turns on a session advisory
        lock taken *before* the transaction begins (taken inside, it would come after
        the SERIALIZABLE snapshot, and the second process would fail serialization on
        the first one's rows); ``Database.run`` retries what still conflicts with a
        running writer.

        Raises:
            UnavailableError: another process held the schema lock for ``SCHEMA_WAIT_S``
                (``riskd.sql``).
        """

        def create(tx: Tx) -> None:
            for stmt in ddl(tx.dialect):
                tx.execute(stmt)
            duplicate = tx.execute(
                "SELECT 1 FROM ledger_disputes GROUP BY order_id HAVING COUNT(*) > 1 LIMIT 1"
            ).fetchone()
            if duplicate is None:
                tx.execute(ONE_DISPUTE_PER_ORDER)
            for account_id, kind in PLATFORM_ACCOUNTS.items():
                self.create_account(tx, account_id, kind, "", now)

        with self.db.schema_turn("ledger schema"):
            self.db.run(create)

    # -- writes ---------------------------------------------------------------------------

    def create_account(self, tx: Tx, account_id: str, kind: Kind, shop_id: str, now: float) -> None:
        tx.execute(
            "INSERT INTO ledger_accounts (id, kind, shop_id, limit_kind, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (account_id, kind.value, shop_id, int(kind.limit), now),
        )

    def post(self, tx: Tx, transfers: Sequence[Transfer]) -> None:
        """Post transfers in order, checking every limit after each; raises before writing.

        The accounts involved are read once, the new counters computed and checked
        here (clear errors; the CHECK constraints stay as the last line), then
        written with one UPDATE per account and one batch of INSERTs.

        Raises:
            InsufficientFundsError: a debit would take a limited account below zero.
            InvalidArgumentError: a counter would overflow 64 bits (field ``amount``).
            NotFoundError: a transfer names an account that does not exist.
        """
        if not transfers:
            return
        counters = self._counters(
            tx, {a for t in transfers for a in (t.debit_account, t.credit_account)}
        )
        for t in transfers:
            _apply(counters, t.debit_account, debit=t.amount)
            _apply(counters, t.credit_account, credit=t.amount)
        tx.executemany(
            "UPDATE ledger_accounts SET debits = ?, credits = ? WHERE id = ?",
            [(c.debits, c.credits, a) for a, c in sorted(counters.items())],
        )
        tx.executemany(
            "INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, code,"
            " ref, request_key, actor, reason, evidence, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    t.id,
                    t.debit_account,
                    t.credit_account,
                    t.amount,
                    int(t.code),
                    t.ref,
                    t.request_key,
                    t.actor,
                    t.reason,
                    t.evidence,
                    t.at,
                )
                for t in transfers
            ],
        )

    def _counters(self, tx: Tx, account_ids: set[str]) -> dict[str, _Counters]:
        ids = sorted(account_ids)
        marks = ", ".join("?" for _ in ids)
        rows = tx.execute(
            f"SELECT id, debits, credits, limit_kind FROM ledger_accounts WHERE id IN ({marks})",
            ids,
        ).fetchall()
        counters = {r[0]: _Counters(int(r[1]), int(r[2]), Limit(int(r[3]))) for r in rows}
        for missing in sorted(account_ids - set(counters)):
            raise NotFoundError(f"account not found: {missing}")
        return counters

    def put_request(self, tx: Tx, req: StoredRequest, now: float) -> None:
        tx.execute(
            "INSERT INTO ledger_requests (key, operation, fingerprint, result, at)"
            " VALUES (?, ?, ?, ?, ?)",
            (req.key, req.operation, req.fingerprint, json.dumps(req.result, sort_keys=True), now),
        )

    def insert(self, tx: Tx, table: str, values: dict[str, Any]) -> None:
        """Insert one row into one of the ledger's append-only tables."""
        if table not in IMMUTABLE_TABLES:
            raise ValueError(f"not a ledger table: {table}")
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        tx.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(values.values()))

    # -- reads (inside a transaction) ------------------------------------------------------

    def get_request(self, tx: Tx, key: str) -> StoredRequest | None:
        row = tx.execute(
            "SELECT key, operation, fingerprint, result FROM ledger_requests WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return StoredRequest(row[0], row[1], row[2], json.loads(row[3]))

    def account(self, tx: Tx, account_id: str) -> Account | None:
        row = tx.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM ledger_accounts WHERE id = ?", (account_id,)
        ).fetchone()
        return None if row is None else to_account(row)

    def one(self, tx: Tx, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return tx.execute(sql, params).fetchone()

    def transfers_of_request(self, tx: Tx, key: str) -> list[Transfer]:
        rows = tx.execute(
            f"SELECT {_TRANSFER_COLUMNS} FROM ledger_transfers WHERE request_key = ? ORDER BY seq",
            (key,),
        ).fetchall()
        return [to_transfer(r) for r in rows]

    def open_claims(self, tx: Tx, claim_account_id: str) -> list[tuple[str, int]]:
        """``(ref, outstanding)`` of a shop's open claims, oldest first."""
        rows = tx.execute(
            "SELECT ref, MIN(seq),"
            " SUM(CASE WHEN debit_account = ? THEN amount ELSE 0 END)"
            " - SUM(CASE WHEN credit_account = ? THEN amount ELSE 0 END)"
            " FROM ledger_transfers WHERE debit_account = ? OR credit_account = ?"
            " GROUP BY ref ORDER BY MIN(seq)",
            (claim_account_id,) * 4,
        ).fetchall()
        return [(r[0], int(r[2])) for r in rows if int(r[2]) > 0]

    def frozen_until(self, tx: Tx, shop_id: str) -> float:
        """The latest freeze end after the shop's last operator unfreeze (0: never frozen)."""
        row = tx.execute(
            "SELECT MAX(until) FROM ledger_freezes"
            " WHERE shop_id = ? AND action = 'freeze' AND seq >"
            " (SELECT COALESCE(MAX(seq), 0) FROM ledger_freezes"
            "  WHERE shop_id = ? AND action = 'unfreeze')",
            (shop_id, shop_id),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0

    # -- reads (outside a transaction) ------------------------------------------------------

    def read_request(self, key: str) -> StoredRequest | None:
        """The idempotency record of ``key``, read outside any transaction."""
        rows = self.db.query(
            "SELECT key, operation, fingerprint, result FROM ledger_requests WHERE key = ?", (key,)
        )
        return (
            StoredRequest(rows[0][0], rows[0][1], rows[0][2], json.loads(rows[0][3]))
            if rows
            else None
        )

    def transfers_of(self, key: str) -> list[Transfer]:
        """The transfers one request posted, read outside any transaction."""
        rows = self.db.query(
            f"SELECT {_TRANSFER_COLUMNS} FROM ledger_transfers WHERE request_key = ? ORDER BY seq",
            (key,),
        )
        return [to_transfer(r) for r in rows]

    def get_account(self, account_id: str) -> Account | None:
        rows = self.db.query(
            f"SELECT {_ACCOUNT_COLUMNS} FROM ledger_accounts WHERE id = ?", (account_id,)
        )
        return to_account(rows[0]) if rows else None

    def accounts(self) -> list[Account]:
        rows = self.db.query(f"SELECT {_ACCOUNT_COLUMNS} FROM ledger_accounts ORDER BY id")
        return [to_account(r) for r in rows]

    def book_rows(self) -> BookRows:
        """The whole book as stored, read in one read-only transaction (a consistent view
        that neither waits for a writer nor holds the writers up), for ``verify``."""

        def read(tx: Tx) -> BookRows:
            return BookRows(
                accounts=tx.execute(
                    f"SELECT {_ACCOUNT_COLUMNS}, limit_kind FROM ledger_accounts ORDER BY id"
                ).fetchall(),
                transfers=tx.execute(
                    f"SELECT {_TRANSFER_COLUMNS} FROM ledger_transfers ORDER BY seq"
                ).fetchall(),
                shops=tx.execute("SELECT shop_id FROM ledger_shops ORDER BY shop_id").fetchall(),
                disputes=tx.execute(
                    "SELECT dispute_id, order_id, order_amount, request_key FROM ledger_disputes"
                ).fetchall(),
                requests=tx.execute("SELECT key, operation FROM ledger_requests").fetchall(),
                cases=tx.execute(
                    "SELECT case_id, amount, frozen_until, request_key FROM ledger_cases"
                ).fetchall(),
                freezes=tx.execute(
                    "SELECT shop_id, action, until, ref, request_key FROM ledger_freezes"
                    " ORDER BY seq"
                ).fetchall(),
            )

        return self.db.run(read, read_only=True)

    def transfers(
        self, *, account_id: str = "", ref: str = "", after_seq: int = 0, limit: int = 0
    ) -> list[Transfer]:
        """Transfers in journal order, optionally of one account or one ``ref``."""
        sql, params = _transfers_sql(account_id, ref, after_seq, limit)
        return [to_transfer(r) for r in self.db.query(sql, params)]

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return self.db.query(sql, list(params))

    # -- reads of one moment (a read-only transaction) -------------------------------------

    def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one read-only transaction: every read in it sees the book at one
        moment (review: a statement read its totals and its lines in separate queries, so
        under live writes 1 in 25 to 1 in 5 disagreed with itself), without waiting for a
        writer or holding one up."""
        return self.db.run(fn, read_only=True)

    def transfers_in(
        self, tx: Tx, *, account_id: str = "", ref: str = "", after_seq: int = 0, limit: int = 0
    ) -> list[Transfer]:
        """``transfers`` inside ``tx``."""
        sql, params = _transfers_sql(account_id, ref, after_seq, limit)
        return [to_transfer(r) for r in tx.execute(sql, params).fetchall()]

    def rows(self, tx: Tx, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return tx.execute(sql, params).fetchall()


def _transfers_sql(account_id: str, ref: str, after_seq: int, limit: int) -> tuple[str, list[Any]]:
    where: list[str] = ["seq > ?"]
    params: list[Any] = [after_seq]
    if account_id:
        where.append("(debit_account = ? OR credit_account = ?)")
        params += [account_id, account_id]
    if ref:
        where.append("ref = ?")
        params.append(ref)
    sql = f"SELECT {_TRANSFER_COLUMNS} FROM ledger_transfers WHERE {' AND '.join(where)}"
    sql += " ORDER BY seq" + (f" LIMIT {int(limit)}" if limit > 0 else "")
    return sql, params


_RETRYABLE_SQLSTATES = frozenset({"23505", "40001", "40P01"})  # unique, serialization, deadlock
_ATTEMPTS = 6


def _retry(db: Database, fn: Callable[[Tx], T], wait_until: float | None = None) -> T:
    for attempt in range(_ATTEMPTS):
        try:
            wait_s = None if wait_until is None else wait_until - time.monotonic()
            return db.run(fn, wait_s=wait_s)
        except Exception as e:
            if getattr(e, "sqlstate", None) not in _RETRYABLE_SQLSTATES:
                raise
            if attempt == _ATTEMPTS - 1:
                raise UnavailableError("ledger database too busy; retry with the same key") from e
            time.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")
