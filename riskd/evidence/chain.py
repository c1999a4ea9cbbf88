"""The hash chain over the append-only evidence tables, and its verification.

Each row's ``hash`` is ``sha256(prev_hash + "\\n" + content)`` where ``content``
is the row's canonical JSON and ``prev_hash`` the previous row's hash (the
genesis value for ``seq`` 1). Editing, inserting or deleting a row breaks the
chain at that row; ``verify_table`` walks it and names the first bad row. A row
put beside the chain instead (``seq`` NULL, zero, negative or not a whole
number, or a second row on a ``seq``: tables created before the schema's CHECK,
or rebuilt without their key, accept them) is not part of the walk but is still
a row the daemon could read, so ``verify_table`` names it too.
Truncating the tail (or replacing it, chain and all) cannot be seen from
inside the table: auditors keep the latest ``(seq, hash)`` that ``verify``
reports and check it is still there next time (``check_anchor``; the CLI is
``riskd evidence verify --expect TABLE:SEQ:HASH``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from riskd.errors import UnavailableError
from riskd.evidence.records import canonical_json
from riskd.evidence.schema import GENESIS_HASH
from riskd.sql import Database, Row, Tx

_PAGE = 1000


def chain_hash(prev_hash: str, content: str) -> str:
    """The hash of one row.

    >>> chain_hash("0" * 64, "{}")[:16]
    '5649d09ed68c1715'
    """
    return hashlib.sha256(f"{prev_hash}\n{content}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Table:
    """An append-only chained table: its name and the content fields copied into columns."""

    name: str
    columns: tuple[str, ...]  # copied from content, in insert order, after seq


DECISIONS = Table("decision_log", ("order_id", "decided_at", "outcome", "rules_version"))
EVENTS = Table("order_events", ("order_id", "kind", "at"))
ACCESS = Table("pii_access_log", ("order_id", "at", "principal", "outcome"))


def chain_head(tx: Tx, table: Table) -> tuple[int, str]:
    """The last ``(seq, hash)`` of ``table`` (``(0, GENESIS_HASH)`` when empty), read in ``tx``."""
    row = tx.execute(f"SELECT seq, hash FROM {table.name} ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


def append_rows(
    tx: Tx, table: Table, contents: Sequence[Mapping[str, Any]], *, unique: bool = False
) -> list[bool]:
    """Chain and insert ``contents`` after the current head; one flag per content, True if stored.

    With ``unique`` a content whose ``order_id`` is already in the table is
    skipped (the first decision for an order wins, also across replicas).
    """
    rows = [(tuple(c[k] for k in table.columns), canonical_json(c)) for c in contents]
    return append_texts(tx, table, rows, unique=unique)


# A row to chain: the values of ``Table.columns`` and the content's canonical JSON text.
TextRow = tuple[Sequence[Any], str]


def append_texts(
    tx: Tx, table: Table, rows: Sequence[TextRow], *, unique: bool = False
) -> list[bool]:
    """``append_rows`` for contents already serialized: one ``executemany`` for the batch.

    With ``unique`` the order ids already in the table (or earlier in ``rows``)
    are looked up first and skipped. Should another writer insert one of them
    meanwhile (PostgreSQL), the insert count comes up short and the transaction
    is rolled back (``UnavailableError``): the caller's retry skips it.

    Raises:
        UnavailableError: a concurrent writer stored one of the order ids first.
    """
    if not rows:
        return []
    seq, prev = chain_head(tx, table)
    keep = _new_ids(tx, table, rows) if unique else [True] * len(rows)
    values = []
    for (copies, text), ok in zip(rows, keep, strict=True):
        if ok:
            digest = chain_hash(prev, text)
            seq += 1
            values.append((seq, *copies, text, prev, digest))
            prev = digest
    cols = ", ".join(("seq", *table.columns, "content", "prev_hash", "hash"))
    marks = ", ".join("?" * (len(table.columns) + 4))
    conflict = " ON CONFLICT (order_id) DO NOTHING" if unique else ""
    tx.executemany(f"INSERT INTO {table.name} ({cols}) VALUES ({marks}){conflict}", values)
    if unique and tx.rowcount != len(values):
        raise UnavailableError(f"{table.name}: a concurrent writer stored an order first")
    return keep


def _new_ids(tx: Tx, table: Table, rows: Sequence[TextRow]) -> list[bool]:
    """Per row: is its order id (the first column) new to the table and to ``rows``?"""
    ids = [str(copies[0]) for copies, _ in rows]
    stored: set[str] = set()
    for start in range(0, len(ids), _PAGE):
        chunk = ids[start : start + _PAGE]
        marks = ", ".join("?" * len(chunk))
        sql = f"SELECT order_id FROM {table.name} WHERE order_id IN ({marks})"
        stored.update(str(r[0]) for r in tx.execute(sql, chunk).fetchall())
    keep = []
    for oid in ids:
        keep.append(oid not in stored)
        stored.add(oid)
    return keep


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of walking the chains.

    ``ok`` is True when every row checks out; otherwise ``table``/``seq``/
    ``order_id`` name the first bad row and ``problem`` says what is wrong
    (``seq`` is None for a row whose ``seq`` is NULL or not an integer).
    ``head`` maps each table to its last ``(seq, hash)``, for auditors to keep.
    """

    ok: bool
    checked: int
    head: Mapping[str, tuple[int, str]]
    table: str = ""
    seq: int | None = 0
    order_id: str = ""
    problem: str = ""


@dataclass(frozen=True, slots=True)
class _Bad:
    seq: int | None
    order_id: str
    problem: str


def _check_row(table: Table, row: Row, seq: int, prev: str) -> _Bad | None:
    got_seq, *copies, content, prev_hash, digest = row
    order_id = str(copies[0])
    if not isinstance(got_seq, int):  # SQLite keeps a text or real value put in a BIGINT
        return _Bad(None, order_id, f"seq {got_seq!r} is not an integer (outside the chain)")
    if got_seq != seq:
        return _Bad(got_seq, order_id, f"expected seq {seq} (a row is missing)")
    if prev_hash != prev:
        return _Bad(seq, order_id, "prev_hash does not match the previous row")
    if chain_hash(prev, content) != digest:
        return _Bad(seq, order_id, "content does not match its hash")
    try:
        parsed = json.loads(content)
    except ValueError:
        return _Bad(seq, order_id, "content is not JSON")
    if not isinstance(parsed, dict):  # hashed into the chain all the same: a rebuilt row
        return _Bad(seq, order_id, "content is not a JSON object")
    for name, value in zip(table.columns, copies, strict=True):
        if parsed.get(name) != value:
            return _Bad(seq, order_id, f"column {name} does not match the content")
    return None


def verify_table(db: Database, table: Table) -> tuple[int, tuple[int, str], _Bad | None]:
    """Walk ``table`` in ``seq`` order; returns (rows checked, head, first bad row or None)."""
    cols = ", ".join(("seq", *table.columns, "content", "prev_hash", "hash"))
    seq, prev, checked = 0, GENESIS_HASH, 0
    sql = f"SELECT {cols} FROM {table.name} WHERE seq > ? ORDER BY seq LIMIT {_PAGE}"
    while rows := db.query(sql, (seq,)):
        for row in rows:
            bad = _check_row(table, row, seq + 1, prev)
            if bad is not None:
                return checked, (seq, prev), bad
            seq, prev, checked = seq + 1, str(row[-1]), checked + 1
    return checked, (seq, prev), _outside(db, table) or _beside(db, table, seq, checked)


def _outside(db: Database, table: Table) -> _Bad | None:
    """The first row the walk cannot reach (``seq`` NULL or below 1), naming how many there are.

    The schema refuses them in tables it creates; older tables accept them, and
    the lookups by order id would read them as recorded decisions.
    """
    where = f"FROM {table.name} WHERE seq IS NULL OR seq < 1"
    rows = db.query(f"SELECT seq, {table.columns[0]} {where} ORDER BY seq LIMIT 1")
    if not rows:
        return None
    (n,) = db.query(f"SELECT COUNT(*) {where}")[0]
    got, order_id = rows[0]
    which = "seq is NULL" if got is None else f"seq {got} is below 1"
    seq = got if isinstance(got, int) else None
    return _Bad(seq, str(order_id), f"{which}, outside the chain (rows outside it: {n})")


def _beside(db: Database, table: Table, last: int, checked: int) -> _Bad | None:
    """A second row on a ``seq`` the walk passed, or None when the walk saw every row up to it.

    The walk reads pages after the last ``seq`` it checked, so a row sharing the
    ``seq`` that ends a page (1,000, 2,000, …) was never read, though the lookups by
    order id would serve it as a recorded decision (a table without its key, rebuilt
    by hand, takes one). Rows appended while the walk ran lie past ``last``.
    """
    (n,) = db.query(f"SELECT COUNT(*) FROM {table.name} WHERE seq >= 1 AND seq <= ?", (last,))[0]
    if n == checked:
        return None
    sql = (
        f"SELECT seq FROM {table.name} WHERE seq >= 1 AND seq <= ?"
        " GROUP BY seq HAVING COUNT(*) > 1 ORDER BY seq LIMIT 1"
    )
    dup = db.query(sql, (last,))
    if not dup:  # not reachable with integer seqs; kept so that a count is never ignored
        return _Bad(None, "", f"rows beside the chain: {n - checked}")
    seq = int(dup[0][0])
    ids = db.query(f"SELECT {table.columns[0]} FROM {table.name} WHERE seq = ?", (seq,))
    order_ids = ", ".join(sorted(str(r[0]) for r in ids))
    problem = f"seq {seq} is held by more than one row, beside the chain ({order_ids})"
    return _Bad(seq, str(ids[-1][0]), f"{problem}; rows beside it: {n - checked}")


TABLES: Mapping[str, Table] = {t.name: t for t in (DECISIONS, EVENTS, ACCESS)}


def check_anchor(db: Database, table: Table, seq: int, digest: str) -> str | None:
    """What is wrong with a ``(seq, hash)`` an auditor kept from an earlier verify, or None.

    A row that is gone (the tail was cut) or hashes differently (the chain was
    rebuilt from there) means the table is not the one that was verified.
    """
    if seq == 0:
        return None if digest == GENESIS_HASH else "seq 0 has only the genesis hash"
    rows = db.query(f"SELECT hash FROM {table.name} WHERE seq = ?", (seq,))
    if not rows:
        return f"row {seq} is gone (rows were deleted from the end)"
    if str(rows[0][0]) != digest:
        return f"row {seq} has another hash (the chain was rewritten)"
    return None


def verify(db: Database) -> VerifyResult:
    """Verify the decision, events and PII-access chains; report the first bad row."""
    total, heads = 0, {}
    for table in (DECISIONS, EVENTS, ACCESS):
        checked, head, bad = verify_table(db, table)
        total += checked
        heads[table.name] = head
        if bad is not None:
            return VerifyResult(False, total, heads, table.name, bad.seq, bad.order_id, bad.problem)
    return VerifyResult(True, total, heads)
