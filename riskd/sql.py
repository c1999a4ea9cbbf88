"""One small SQL access layer for SQLite (embedded default) and PostgreSQL (replicas).

Stores (ledger, evidence, PII keys) write portable SQL with ``?`` placeholders;
``Database`` rewrites them for PostgreSQL. Each thread gets its own connection.
SQLite runs in WAL mode with ``synchronous=FULL`` and takes the write lock at
``BEGIN IMMEDIATE``, so there is one writer at a time; PostgreSQL runs its
transactions at SERIALIZABLE and ``transaction()`` retries serialization
failures. This module imports nothing from riskd but ``errors``.

URLs: ``sqlite:///path/to/file.db`` (or a bare path), ``postgresql://host/db``;
``?schema=NAME`` on a PostgreSQL URL sets the search_path (tests use it to
keep each run in its own schema).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from riskd.errors import UnavailableError

T = TypeVar("T")
Dialect = Literal["sqlite", "postgres"]
Row = tuple[Any, ...]

_PLACEHOLDER = re.compile(r"\?")
_RETRIES = 8


class Tx:
    """A cursor inside one transaction, with ``?`` placeholders on both dialects."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cur = cursor
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Tx:
        if self.dialect == "postgres":
            sql = _PLACEHOLDER.sub("%s", sql)
        self._cur.execute(sql, tuple(params))
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.dialect == "postgres":
            sql = _PLACEHOLDER.sub("%s", sql)
        self._cur.executemany(sql, [tuple(r) for r in rows])

    def fetchone(self) -> Row | None:
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[Row]:
        return [tuple(r) for r in self._cur.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)


class Database:
    """A SQLite file or a PostgreSQL database, one connection per thread.

    >>> import tempfile, os
    >>> db = Database(os.path.join(tempfile.mkdtemp(), "x.db"))
    >>> with db.transaction() as tx:
    ...     _ = tx.execute("CREATE TABLE t (v INTEGER)").execute("INSERT INTO t VALUES (?)", (7,))
    >>> db.query("SELECT v FROM t")
    [(7,)]
    >>> db.close()
    """

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        parts = urlsplit(self.url)
        self.dialect: Dialect = "postgres" if parts.scheme.startswith("postgres") else "sqlite"
        self._schema = ""
        if self.dialect == "postgres":
            self._schema = parse_qs(parts.query).get("schema", [""])[0]
            query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("schema="))
            self._dsn = urlunsplit(parts._replace(query=query))
        else:
            self._path = parts.path if parts.scheme == "sqlite" else self.url
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self.dialect == "sqlite":
            conn = sqlite3.connect(
                self._path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        else:
            import psycopg

            try:
                conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as e:
                raise UnavailableError("database unavailable") from e
            if self._schema:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                conn.execute(f'SET search_path TO "{self._schema}"')
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction: commits on success, rolls back on any exception."""
        conn = self._connect()
        cur = conn.cursor()
        if self.dialect == "sqlite":
            cur.execute("BEGIN IMMEDIATE")
        else:
            cur.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        try:
            yield Tx(cur, self.dialect)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def run(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a transaction, retrying it on serialization failures and deadlocks."""
        for attempt in range(_RETRIES):
            try:
                with self.transaction() as tx:
                    return fn(tx)
            except Exception as e:  # retry only the transient kinds
                if not self._is_transient(e) or attempt == _RETRIES - 1:
                    raise
                time.sleep(0.002 * (2**attempt))
        raise AssertionError("unreachable")

    def _is_transient(self, e: Exception) -> bool:
        if self.dialect == "sqlite":
            return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)
        import psycopg.errors

        return isinstance(e, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """A read outside any explicit transaction."""
        conn = self._connect()
        cur = conn.cursor()
        Tx(cur, self.dialect).execute(sql, params)
        return [tuple(r) for r in cur.fetchall()]

    def executescript(self, ddl: str) -> None:
        """Run several ``;``-separated statements (schema creation)."""
        with self.transaction() as tx:
            for stmt in (s.strip() for s in ddl.split(";")):
                if stmt:
                    tx.execute(stmt)

    def drop_schema(self) -> None:
        """PostgreSQL only: drop this database's ``?schema=`` and everything in it (tests)."""
        if self.dialect == "postgres" and self._schema:
            self._connect().execute(f'DROP SCHEMA IF EXISTS "{self._schema}" CASCADE')

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(Exception):  # already closed or broken: nothing to release
                c.close()
        self._local = threading.local()
