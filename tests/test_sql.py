"""riskd.sql: lost PostgreSQL connections are replaced, and what is (and is not) retried.

The connections are really ended by the server (``pg_terminate_backend``), only those of
the test's own ``Database``: each one carries its own ``application_name``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from psycopg.errors import AdminShutdown, SerializationFailure

from riskd import sql
from riskd.errors import CommitUnknownError, DatabaseBusyError, UnavailableError
from riskd.sql import Database, Tx

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def terminate(app: str) -> int:
    """End every backend of ``application_name`` ``app``; return once they are gone."""
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        n = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name = %s",
            (app,),
        ).fetchone()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
            ).fetchone()
            if left is not None and left[0] == 0:
                break
            time.sleep(0.01)
    return int(n[0]) if n else 0


@pytest.fixture
def pg_app() -> Iterator[tuple[Database, str]]:
    """A PostgreSQL ``Database`` in its own schema, and the application name of its sessions."""
    tag = uuid.uuid4().hex[:12]
    app = f"riskd-test-sql-{tag}"
    db = Database(f"{PG_URL}?schema=sql_{tag}&application_name={app}")
    db.executescript("CREATE TABLE t (v INTEGER NOT NULL)")
    yield db, app
    db.drop_schema()
    db.close()


def count(db: Database) -> int:
    return int(db.query("SELECT COUNT(*) FROM t")[0][0])


@pytest.mark.postgres
def test_reads_and_writes_go_on_after_the_server_ends_the_connection(
    pg_app: tuple[Database, str],
) -> None:
    db, app = pg_app
    assert count(db) == 0
    assert terminate(app) == 1
    assert count(db) == 0  # the read retried on a new connection
    assert terminate(app) == 1
    db.run(lambda tx: tx.execute("INSERT INTO t VALUES (?)", (1,)))  # BEGIN failed: retried
    assert count(db) == 1
    assert terminate(app) == 1
    with db.transaction() as tx:  # a plain transaction gets a new connection too
        tx.execute("INSERT INTO t VALUES (?)", (2,))
    assert count(db) == 2


@pytest.mark.postgres
def test_a_transaction_lost_before_commit_is_run_again_once(pg_app: tuple[Database, str]) -> None:
    db, app = pg_app
    calls = 0

    def insert(tx: Tx) -> None:
        nonlocal calls
        calls += 1
        tx.execute("INSERT INTO t VALUES (?)", (calls,))
        if calls == 1:  # the server ends the session in the middle of the transaction
            terminate(app)
            tx.execute("SELECT 1")

    db.run(insert)
    assert calls == 2
    assert db.query("SELECT v FROM t") == [(2,)]  # the first attempt was rolled back


@pytest.mark.postgres
def test_a_connection_lost_at_commit_is_not_replayed(pg_app: tuple[Database, str]) -> None:
    db, app = pg_app
    calls = 0

    def insert(tx: Tx) -> None:
        nonlocal calls
        calls += 1
        tx.execute("INSERT INTO t VALUES (?)", (calls,))
        terminate(app)  # gone before the COMMIT goes out: its outcome is unknown to the client

    with pytest.raises(CommitUnknownError, match="outcome is unknown"):
        db.run(insert)
    assert calls == 1  # never replayed: a replay could apply it twice
    assert count(db) == 0  # (here the server had ended it first) and the next call works


@pytest.mark.postgres
def test_is_transient_tells_the_database_state_from_the_data(
    pg_app: tuple[Database, str],
) -> None:
    db, _ = pg_app
    with pytest.raises(psycopg.DataError) as nul:
        db.query("SELECT ?::text", ("a\x00b",))  # PostgreSQL refuses NUL in text
    with pytest.raises(psycopg.IntegrityError) as null:
        db.run(lambda tx: tx.execute("INSERT INTO t VALUES (NULL)"))
    assert not db.is_transient(nul.value) and not db.is_transient(null.value)
    assert db.is_transient(AdminShutdown("terminating connection"))
    assert db.is_transient(SerializationFailure("could not serialize"))
    assert db.is_transient(CommitUnknownError("lost"))
    assert not db.is_transient(ValueError("a bug"))


@pytest.mark.postgres
def test_a_refusal_says_the_errors_kind_and_first_line_never_the_rows_values(
    pg_app: tuple[Database, str],
) -> None:
    """Messages and logs quote ``refusal``: PostgreSQL's DETAIL line quotes the row (PII)."""
    db, _ = pg_app
    db.executescript("CREATE TABLE u (phone TEXT UNIQUE)")
    db.run(lambda tx: tx.execute("INSERT INTO u VALUES (?)", ("13800000000",)))
    with pytest.raises(psycopg.errors.UniqueViolation) as dup:
        db.run(lambda tx: tx.execute("INSERT INTO u VALUES (?)", ("13800000000",)))
    assert "13800000000" in str(dup.value)  # the driver's own text quotes it
    said = sql.refusal(dup.value)
    assert said.startswith("UniqueViolation: duplicate key value") and "13800000000" not in said


def test_is_transient_on_sqlite(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    db.executescript("CREATE TABLE t (v INTEGER CHECK (v > 0))")
    with pytest.raises(sqlite3.IntegrityError) as refused:
        db.run(lambda tx: tx.execute("INSERT INTO t VALUES (?)", (0,)))
    assert not db.is_transient(refused.value)
    assert db.is_transient(sqlite3.OperationalError("database is locked"))
    assert db.is_transient(sqlite3.OperationalError("disk I/O error"))
    assert db.query("SELECT COUNT(*) FROM t") == [(0,)]  # the refused insert left nothing
    db.close()


def test_a_transaction_the_database_keeps_refusing_for_a_moment_is_run_again_until_it_lands(
    tmp_path: Path,
) -> None:
    """Writers under contention (the ledger's, the decision log's) see the same transient
    failure several times in a row: ``run`` tries again (seven times) before giving up."""
    db = Database(tmp_path / "x.db")
    db.executescript("CREATE TABLE t (v INTEGER)")
    tries: list[int] = []

    def flaky(tx: Tx) -> None:
        tries.append(1)
        tx.execute("INSERT INTO t VALUES (?)", (len(tries),))
        if len(tries) < 8:
            raise sqlite3.OperationalError("database is locked")

    db.run(flaky)
    assert db.query("SELECT v FROM t") == [(8,)]  # the failed tries left nothing
    db.close()


def test_a_checkpoint_a_reader_held_back_says_it_did_not_complete(tmp_path: Path) -> None:
    """A forget reports whether the old pages left the write-ahead log: a reader on an older
    snapshot keeps them there, and the report must not say otherwise."""
    db = Database(tmp_path / "x.db")
    db.executescript("CREATE TABLE t (v INTEGER)")
    reader = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM t").fetchall()  # its snapshot: before the insert
    db.run(lambda tx: tx.execute("INSERT INTO t VALUES (1)"))
    assert db.checkpoint(0.05) is False
    reader.execute("COMMIT")
    reader.close()
    assert db.checkpoint(0.05) is True
    db.close()


def test_a_bounded_write_gives_up_on_a_held_sqlite_file_and_keeps_the_busy_timeout(
    tmp_path: Path,
) -> None:
    """``run(wait_s=...)`` waits for another process's writer that long in all (not the
    busy timeout once per retry), raises DatabaseBusyError with nothing written, and
    leaves the connection's own busy timeout as it was for later, unbounded writes."""
    db = Database(f"sqlite:///{tmp_path / 'busy.db'}")
    try:
        db.run(lambda tx: tx.execute("CREATE TABLE t (v INTEGER)"))
        holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(DatabaseBusyError) as busy:
            db.run(lambda tx: tx.execute("INSERT INTO t VALUES (1)"), wait_s=0.2)
        assert 0.2 <= time.monotonic() - started < 1.5
        assert isinstance(busy.value, UnavailableError)
        holder.execute("ROLLBACK")
        holder.close()
        assert db.query("PRAGMA busy_timeout") == [(30000,)]
        assert db.query("SELECT COUNT(*) FROM t") == [(0,)]
        db.run(lambda tx: tx.execute("INSERT INTO t VALUES (2)"))
        assert db.query("SELECT v FROM t") == [(2,)]
    finally:
        db.close()


@pytest.mark.postgres
def test_processes_starting_together_on_a_fresh_schema_create_it_once() -> None:
    """Review: two replicas started together on a fresh PostgreSQL schema; one exited with
    UniqueViolation (``CREATE ... IF NOT EXISTS`` run at the same moment by two sessions:
    the schema, or a table of the PII key store). Schema creation takes turns now."""
    from riskd.evidence.schema import create_schema
    from riskd.pii import SqlKeyStore

    for _ in range(3):
        url = f"{PG_URL}?schema=sql_race_{uuid.uuid4().hex[:10]}"
        barrier = threading.Barrier(8)

        def start(_: int, url: str = url, barrier: threading.Barrier = barrier) -> None:
            db = Database(url)
            try:
                barrier.wait()
                SqlKeyStore(db)
                create_schema(db)
            finally:
                db.close()

        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(start, range(8)))
        finally:
            db = Database(url)
            db.drop_schema()
            db.close()


@pytest.mark.postgres
def test_a_running_process_does_not_keep_its_schemas_creation_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon that created its tables and runs on must not hold the next start (a
    replica, a CLI) on the same schema for ``SCHEMA_WAIT_S`` and then fail it."""
    monkeypatch.setattr(sql, "SCHEMA_WAIT_S", 0.5)
    url = f"{PG_URL}?schema=sql_turn_{uuid.uuid4().hex[:10]}"
    running, starting = Database(url), Database(url)
    try:
        running.executescript("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
        starting.executescript("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
    finally:
        starting.close()
        running.drop_schema()
        running.close()


@pytest.mark.postgres
def test_schema_creation_on_one_schema_does_not_wait_for_another_schemas() -> None:
    """Review: one schema lock for the whole database: a start held behind another schema's
    slow creation (or a long transaction its CREATE INDEX waited for) waited too."""
    busy = Database(f"{PG_URL}?schema=sql_lock_{uuid.uuid4().hex[:10]}")
    free = Database(f"{PG_URL}?schema=sql_lock_{uuid.uuid4().hex[:10]}")
    try:
        busy.query("SELECT pg_advisory_lock(?)", (busy.schema_lock,))  # creating, slowly
        started = time.monotonic()
        free.executescript("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
        assert time.monotonic() - started < 1.0
        assert busy.schema_lock != free.schema_lock
    finally:
        busy.query("SELECT pg_advisory_unlock(?)", (busy.schema_lock,))
        for db in (busy, free):
            db.drop_schema()
            db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("name", ["Sql_Mixed_{}", "sql.dotted_{}"])
def test_a_schema_riskd_created_is_found_whatever_its_name(name: str) -> None:
    """Review: ``require_existing`` parsed the schema as an unquoted identifier: a mixed-case
    name riskd had created was "not there", a dotted one a traceback (InvalidName)."""
    from riskd.sql import require_existing

    url = f"{PG_URL}?schema={name.format(uuid.uuid4().hex[:8])}"
    db = Database(url)
    try:
        db.executescript("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
        require_existing(url, "--database")
    finally:
        db.drop_schema()
        db.close()


@pytest.mark.postgres
def test_concurrent_writes_are_serialized_and_the_one_that_fails_is_run_again(
    pg_app: tuple[Database, str],
) -> None:
    """Two transactions each insert a row only if the table is empty, both reading before
    either writes (write skew: under READ COMMITTED both would insert). At SERIALIZABLE one
    fails to serialize and ``run`` runs it again: one row, and neither caller sees an error."""
    db, _ = pg_app
    both_read = threading.Barrier(2)
    calls: list[int] = []

    def insert_if_empty(tx: Tx) -> None:
        calls.append(1)
        first = len(calls) <= 2
        row = tx.execute("SELECT COUNT(*) FROM t").fetchone()
        if first:
            both_read.wait(5)
        if row is not None and row[0] == 0:
            tx.execute("INSERT INTO t VALUES (?)", (1,))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: db.run(insert_if_empty), range(2)))
    assert count(db) == 1
    assert len(calls) == 3  # the one that failed to serialize ran again, and saw the row


@pytest.mark.postgres
def test_a_connection_lost_on_every_attempt_is_unavailable_and_nothing_lands(
    pg_app: tuple[Database, str],
) -> None:
    """``run`` gives up after its retries with ``UnavailableError`` (what callers map to
    UNAVAILABLE), not the driver's own error."""
    db, app = pg_app
    calls = 0

    def insert(tx: Tx) -> None:
        nonlocal calls
        calls += 1
        tx.execute("INSERT INTO t VALUES (?)", (calls,))
        terminate(app)
        tx.execute("SELECT 1")

    with pytest.raises(UnavailableError, match="connection lost"):
        db.run(insert)
    assert calls == sql._RETRIES
    assert count(db) == 0


@pytest.mark.postgres
def test_a_read_only_transaction_refuses_writes(pg_app: tuple[Database, str]) -> None:
    db, _ = pg_app
    with (
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
        db.transaction(read_only=True) as tx,
    ):
        tx.execute("INSERT INTO t VALUES (?)", (1,))
    assert count(db) == 0


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    """SQLite leaves ``REFERENCES`` unchecked unless asked per connection (the ledger's
    journal names its accounts so)."""
    db = Database(tmp_path / "x.db")
    try:
        db.executescript(
            "CREATE TABLE p (id TEXT PRIMARY KEY);"
            " CREATE TABLE c (p TEXT NOT NULL REFERENCES p (id))"
        )
        with pytest.raises(sqlite3.IntegrityError):
            db.run(lambda tx: tx.execute("INSERT INTO c VALUES (?)", ("nobody",)))
        assert db.query("SELECT COUNT(*) FROM c") == [(0,)]
    finally:
        db.close()
