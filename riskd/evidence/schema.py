"""The decision log's tables, one DDL for SQLite and PostgreSQL.

``decision_log`` and ``order_events`` are append-only and hash-chained: ``seq``
is the position in the chain (1, 2, 3, ... with no gaps, checked >= 1, assigned by the
writer inside its transaction, so a concurrent writer on PostgreSQL conflicts
and retries instead of forking the chain), ``content`` the canonical JSON the
hash covers, ``hash = sha256(prev_hash + "\\n" + content)``. The other columns
are copies of content fields for queries; ``verify`` checks they agree.

``decision_pii`` holds the Vault ciphertexts of an order's PII fields. It is
outside the chain on purpose: forgetting a buyer (crypto-shredding their data
key, or deleting these rows) must not break the auditors' verification.
``decision_blind_index`` holds the blind indexes of those fields, for the same
reason: ``riskd pii forget`` deletes a buyer's rows of both tables
(``log.forget_subject``), and the chained records keep only masks.

``pii_access_log`` is the audit trail of analysts' reveals of an order's PII
(who, when, which order, which fields, why, and whether it was refused):
append-only and hash-chained like ``decision_log``. It never holds PII.
"""

from __future__ import annotations

from riskd.sql import Database

_DDL = """
CREATE TABLE IF NOT EXISTS decision_log (
    seq {seq},
    order_id TEXT NOT NULL UNIQUE,
    decided_at DOUBLE PRECISION NOT NULL,
    outcome TEXT NOT NULL,
    rules_version TEXT NOT NULL,
    content TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decision_log_decided_at ON decision_log (decided_at);
CREATE TABLE IF NOT EXISTS order_events (
    seq {seq},
    order_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    content TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
-- a retried report is found by its order, kind and time (databases made before this
-- index keep order_events_order_id beside it: its prefix serves the same lookups)
CREATE INDEX IF NOT EXISTS order_events_report ON order_events (order_id, kind, at);
CREATE TABLE IF NOT EXISTS decision_pii (
    order_id TEXT NOT NULL,
    field TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    ciphertext {blob} NOT NULL,
    PRIMARY KEY (order_id, field)
);
CREATE INDEX IF NOT EXISTS decision_pii_subject ON decision_pii (subject_id);
CREATE TABLE IF NOT EXISTS decision_blind_index (
    order_id TEXT NOT NULL,
    field TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (order_id, field)
);
CREATE INDEX IF NOT EXISTS decision_blind_index_subject ON decision_blind_index (subject_id);
CREATE INDEX IF NOT EXISTS decision_blind_index_digest ON decision_blind_index (field, digest);
CREATE TABLE IF NOT EXISTS pii_access_log (
    seq {seq},
    order_id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    principal TEXT NOT NULL,
    outcome TEXT NOT NULL,
    content TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pii_access_log_order_id ON pii_access_log (order_id);
CREATE TABLE IF NOT EXISTS features_catch_up (
    order_key TEXT NOT NULL PRIMARY KEY,
    decided_at DOUBLE PRECISION NOT NULL,
    amount BIGINT NOT NULL,
    keys TEXT NOT NULL,
    content TEXT NOT NULL
)
"""
# features_catch_up is not evidence: orders answered without their features that were
# still waiting to be counted when a process stopped (riskd.engine.catchup), as the
# feature store sees them (keyed hashes, amount, time; never PII), taken by the next
# start. A row is at most a day old to be of use, like the velocity state in Redis.

# A chained table's position: 1, 2, 3, ... A row outside that (NULL, 0, negative) would be
# skipped by the walk yet found by the lookups by order id. The second test is for SQLite,
# which keeps a text or real value put in an INTEGER column: it is equal to its own
# CAST only when it is an integer (always, on PostgreSQL's bigint).
_SEQ = "BIGINT NOT NULL PRIMARY KEY CHECK (seq >= 1 AND seq = CAST(seq AS BIGINT))"

GENESIS_HASH = "0" * 64
MAX_SEQ = 2**63 - 1  # the largest seq a BIGINT holds (SQLite cannot bind a larger int)


def ddl(dialect: str) -> str:
    """The schema for ``"sqlite"`` or ``"postgres"`` (they differ only in the blob type).

    Tables that exist already are kept as they are (``CREATE TABLE IF NOT EXISTS``):
    those created before ``seq`` had its NOT NULL and CHECK accept rows outside the
    chain, which ``chain.verify`` reports.
    """
    return _DDL.format(blob="BYTEA" if dialect == "postgres" else "BLOB", seq=_SEQ)


def create_schema(db: Database) -> None:
    """Create the evidence tables if they do not exist (idempotent)."""
    db.executescript(ddl(db.dialect))
