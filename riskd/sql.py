"""One small SQL access layer for SQLite (embedded default) and PostgreSQL (replicas).

Stores (ledger, evidence, PII keys) write portable SQL with ``?`` placeholders;
``Database`` rewrites them for PostgreSQL. Each thread gets its own connection.
SQLite runs in WAL mode with ``synchronous=FULL`` and takes the write lock at
``BEGIN IMMEDIATE``, so there is one writer at a time; PostgreSQL runs its
transactions at SERIALIZABLE and ``run()`` retries serialization
failures. This module imports nothing from riskd but ``errors``.

Lost connections (a PostgreSQL restart or failover, an idle timeout,
``pg_terminate_backend``): a thread's cached connection that psycopg has seen
closed or broken is dropped and a new one opened on its next use (psycopg only
learns of a loss when it uses the connection: a ``BEGIN`` or read that finds it
gone is sent again once on a new one). ``run()`` retries a transaction whose
connection was lost before its COMMIT was sent (the server rolled it back). A
connection lost *during* COMMIT leaves the outcome unknown: that raises
``CommitUnknownError`` and is never replayed here, since a replay could apply
it twice; the caller checks what landed (the decision log) or retries under
its idempotency key (the ledger answers with the first receipt). Session state
does not survive a new connection: the ledger's advisory lock is gone with the
old one (its SERIALIZABLE transactions and unique keys still hold). A peer that
vanishes without closing the connection (a partition) is found by TCP keepalives
and ``tcp_user_timeout`` (``KEEPALIVE_IDLE_S`` and its neighbours), in seconds.

URLs: ``sqlite:///path/to/file.db`` (or a bare path), ``postgresql://host/db``;
``?schema=NAME`` on a PostgreSQL URL sets the search_path (tests use it to
keep each run in its own schema).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from riskd.errors import CommitUnknownError, ConfigError, DatabaseBusyError, UnavailableError

T = TypeVar("T")
Dialect = Literal["sqlite", "postgres"]
Row = tuple[Any, ...]

_PLACEHOLDER = re.compile(r"\?")
_RETRIES = 8
BUSY_TIMEOUT_S = 30.0  # SQLite: how long a statement waits for another connection's lock
SCHEMA_LOCK = 7421001  # PostgreSQL advisory lock: one process at a time creates tables
SCHEMA_WAIT_S = 60.0  # how long a starting process waits for another one's schema creation
# PostgreSQL connections' TCP settings (libpq parameters; a URL's own values win). Without
# them a connection whose peer vanished mid-call (a network partition, a failover that
# took the old primary's host away) blocks its thread for the kernel's ~15 minutes of
# retransmissions, or for ever while it waits for an answer: the decision log's writer
# would stop. TCP_USER_TIMEOUT_MS ends a call whose data the peer never acknowledges
# (measured: 10.5 s); keepalive probes find a silent peer while a call waits for its
# answer (15 s: the first probe goes out after KEEPALIVE_IDLE_S, and Linux gives up at
# the next one once the user timeout has passed, before KEEPALIVE_COUNT probes, measured
# with a link taken down under the connection). Either fails the call with OperationalError,
# which run() and the writer retry on a new connection. A live server's kernel answers
# both however long a statement runs, so they never cut a long transaction (no
# statement_timeout is set). A peer whose kernel answers but whose server never replies
# (a stalled proxy in between) is not caught: that would take a bound on each call.
CONNECT_TIMEOUT_S = 5
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 10_000
# SQLSTATE classes of PostgreSQL failures that come from a statement's data, not the
# server's state (connection, serialization, resources, privileges, a missing table, a
# read-only standby: all of those may pass): data exception, integrity constraint.
_DATA_CLASSES = frozenset({"22", "23"})


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


def require_existing(url: str, key: str = "database") -> None:
    """Refuse a database that is not there yet: operator and auditor commands work on the
    daemon's database and must never create an empty one (a SQLite file, or the schema of
    a ``?schema=`` PostgreSQL URL) and then report on it. ``key``: where the URL came from
    (``database_url``, ``--database``), named first in each error.

    Raises:
        ConfigError: naming the missing file or schema, a SQLite path the file system
            will not look up (its reason), a parameter of the URL whose value the client
            refuses, or a URL of another form (``sqlite://x``, another
            scheme); never the URL: it may hold a password.
        UnavailableError: the PostgreSQL server cannot be reached or refused the connection.
    """
    dialect, target, schema = _parse_url(url)
    if dialect == "sqlite":
        if "://" in url and not url.startswith("sqlite:///"):  # sqlite://x has a host, no path
            raise ConfigError(f"{key}: expected sqlite:///PATH, postgresql://... or a file path")
        try:
            there = Path(target).is_file()
        except OSError as e:  # a folder this user may not enter (the daemon's is 0700)
            why = e.strerror or type(e).__name__
            raise ConfigError(f"{key}: cannot look up {target}: {why}") from None
        if not there:
            raise ConfigError(f"{key}: no database at {target} (start riskd serve once first)")
        return
    try:
        with _pg_connect(target) as conn:  # the database itself: fails if it is not there
            if not schema:
                return
            # by name as created (quoted: ``Database``), not parsed as an identifier
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (schema,)
            ).fetchone()
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not row or not row[0]:
        raise ConfigError(f"{key}: no schema {schema!r} in the database")


def check_postgres_url(url: str, key: str) -> None:
    """Refuse a PostgreSQL URL libpq cannot read (an unknown or misspelt parameter, an
    unclosed ``[``), as the first connection would, before anything starts.

    Raises:
        ConfigError: naming ``key`` and the error's kind only (libpq's messages can quote
            the URL, password and all).
    """
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(_parse_url(url)[1])
    except (ValueError, Error) as e:
        raise ConfigError(
            f"{key}: not a PostgreSQL URL libpq can read ({type(e).__name__})"
        ) from None


# libpq's and psycopg's words for a parameter whose value they refuse, tried in turn, and
# the parameter each names: its group 1, or the name given ('invalid integer value "x" for
# connection option "keepalives_idle"', 'invalid sslmode value: "x"', 'invalid
# "ssl_max_protocol_version" value', 'invalid port number', psycopg's 'bad value for
# connect_timeout', the server's 'invalid value for parameter "TimeZone"' or
# 'unrecognized configuration parameter "x"' of an ``options=-c ...``)
_BAD_VALUE: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(pattern), name)
    for pattern, name in (
        (r'for connection option "(\w+)"', None),
        (r'invalid value for parameter "(\w+)"', None),
        (r'unrecognized configuration parameter "(\w+)"', None),
        (r'invalid "(\w+)" value', None),
        (r"invalid (\w+) (?:value|method|number)", None),
        (r"bad value for (\w+)", None),
        (r"could not match \d+ (port) numbers", None),
        (r"could not match \d+ host names (?:to|with) \d+ (hostaddr) values", None),
        (r"could not parse network address", "hostaddr"),
        (r"invalid SSL protocol version range", "ssl_min_protocol_version"),
    )
)


def _bad_value(said: str) -> str | None:
    """The parameter a client or server error message says has a bad value, if any."""
    for pattern, name in _BAD_VALUE:
        found = pattern.search(said)
        if found is not None:
            return name or found.group(1)
    return None


def _pg_connect(dsn: str, **kwargs: Any) -> Any:
    """``psycopg.connect`` with riskd's timeouts (``_pg_options``).

    Raises:
        ConfigError: a parameter of the URL has a value the client refuses (naming the
            parameter, never its value: the URL may hold a password), or psycopg cannot
            use the URL at all (its error's kind only).
        UnavailableError: the server cannot be reached or refused the connection.
    """
    import psycopg

    try:
        return psycopg.connect(dsn, **kwargs, **_pg_options(dsn))
    except (psycopg.OperationalError, psycopg.ProgrammingError) as e:
        name = _bad_value(str(e))
        if name is not None:  # libpq reads the PG* environment variables too
            raise ConfigError(
                f"{name} (in the URL or a PG* environment variable) has a value PostgreSQL refuses"
            ) from None
        if isinstance(e, psycopg.ProgrammingError):
            raise ConfigError(
                f"not a PostgreSQL URL the client can use ({type(e).__name__})"
            ) from None
        raise UnavailableError("database unavailable") from e


def _pg_options(dsn: str) -> dict[str, Any]:
    """The connect timeout and TCP keepalive settings for ``dsn``, less those it sets itself."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(dsn)
    options = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
    }
    return {k: v for k, v in options.items() if k not in given}


def is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (by its scheme alone: no parsing).

    >>> [is_postgres(u) for u in ("postgresql://db/riskd", "sqlite:///x.db", "postgres.db")]
    [True, False, False]
    """
    scheme, colon, _ = url.partition(":")
    return bool(colon) and scheme.lower().startswith("postgres")


def _parse_url(url: str) -> tuple[Dialect, str, str]:
    """(dialect, SQLite path or PostgreSQL DSN without ``schema=``, schema or "")."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        path = parts.path if parts.scheme == "sqlite" else url
        # sqlite:////abs/path (SQLAlchemy's absolute form) names /abs/path, printed so
        return "sqlite", "/" + path.lstrip("/") if path.startswith("//") else path, ""
    schema = parse_qs(parts.query).get("schema", [""])[0]
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("schema="))
    return "postgres", urlunsplit(parts._replace(query=query)), schema


def _create_private(path: Path) -> None:
    """A new SQLite file is created owner-only (0600) whatever the umask: it holds masked
    PII, blind indexes and money. SQLite gives its -wal and -shm files the same mode.
    An existing file keeps the mode its operator gave it."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))


def _create_pg_schema(conn: Any, schema: str) -> None:
    """Create the schema on an autocommit connection unless it is there: a role without
    CREATE on the database (a read-only auditor's) may use one that exists (review:
    ``CREATE SCHEMA IF NOT EXISTS`` needs that privilege even then). Another session
    creating it at the same moment makes it fail with a unique violation: it exists then."""
    import psycopg.errors

    found = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (schema,)
    ).fetchone()
    if found and found[0]:
        return
    with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema):
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


def refusal(e: Exception) -> str:
    """What a database driver's error says, for a message: its kind and first line (it
    names a table or a privilege, never the URL)."""
    first = str(e).strip().splitlines()[:1]
    return f"{type(e).__name__}: {first[0]}" if first else type(e).__name__


def driver_errors() -> tuple[type[Exception], ...]:
    """The database drivers' own error classes (SQLite's, psycopg's): what a statement the
    database refuses raises (a role without a privilege, a read-only database)."""
    import psycopg

    return (sqlite3.Error, psycopg.Error)


def advisory_lock(db: Database, lock: int, deadline: float) -> bool:
    """Take PostgreSQL session advisory ``lock`` on this thread's connection by
    ``deadline`` (``time.monotonic()``); False if another session kept it."""
    pause = 0.002
    while True:
        if db.query("SELECT pg_try_advisory_lock(?)", (lock,))[0][0]:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


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
        self.dialect, target, self._schema = _parse_url(self.url)
        if self.dialect == "postgres":
            self._dsn = target
        else:
            self._path = target
            Path(self._path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._path != ":memory:":
                _create_private(Path(self._path))
        self._local = threading.local()
        self._all: list[Any] = []
        self._owners: dict[int, Any] = {}  # thread id -> its connection (``cancel``)
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not self._lost(conn):
            return conn
        if conn is not None:  # the server or the network ended it: never reuse it
            self._discard(conn)
        if self.dialect == "sqlite":
            conn = sqlite3.connect(
                self._path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # Freed space is zeroed on every connection, not as the build's default says
            # (off in SQLite's own builds): writes made without it (the decision log's
            # writer) leave copies of rows in pages' free space that a forget's deletes,
            # with it on, never zero (review: a forgotten buyer's ciphertexts and digests).
            conn.execute("PRAGMA secure_delete=ON")
        else:
            conn = _pg_connect(self._dsn, autocommit=True)
            if self._schema:
                _create_pg_schema(conn, self._schema)
                conn.execute(f'SET search_path TO "{self._schema}"')
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
            self._owners[threading.get_ident()] = conn
        return conn

    def _lost(self, conn: Any) -> bool:
        """Whether ``conn`` is a PostgreSQL connection psycopg has seen closed or broken."""
        return self.dialect == "postgres" and bool(conn.closed or conn.broken)

    def _lost_here(self, e: BaseException) -> bool:
        """Whether ``e`` is a connection error that left this thread's connection lost."""
        if self.dialect != "postgres":
            return False
        import psycopg

        conn = getattr(self._local, "conn", None)
        return isinstance(e, psycopg.OperationalError) and conn is not None and self._lost(conn)

    def _discard(self, conn: Any) -> None:
        """Forget this thread's ``conn`` and close it (nothing to release if it is broken)."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._all = [c for c in self._all if c is not conn]
            self._owners = {t: c for t, c in self._owners.items() if c is not conn}
        with contextlib.suppress(Exception):
            conn.close()

    @contextmanager
    def _busy_until(self, wait_until: float | None) -> Iterator[None]:
        """On SQLite, this thread's statements wait for another connection's lock until
        ``wait_until`` (monotonic) instead of ``BUSY_TIMEOUT_S``, for the duration."""
        if wait_until is None or self.dialect != "sqlite":
            yield
            return
        conn = self._connect()
        left_ms = max(int((wait_until - time.monotonic()) * 1000), 1)
        conn.execute(f"PRAGMA busy_timeout = {left_ms}")
        try:
            yield
        finally:
            # a connection the failed transaction discarded is closed: nothing to restore
            with contextlib.suppress(sqlite3.ProgrammingError):
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")

    @contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Tx]:
        """One write transaction: commits on success, rolls back on any exception.

        ``read_only``: a consistent view that takes no writer lock instead (SQLite: a
        deferred ``BEGIN``, whose snapshot under WAL is taken at its first read;
        PostgreSQL: ``REPEATABLE READ READ ONLY``), so a long read neither waits for
        another process's writer nor holds up the writers.

        Raises:
            CommitUnknownError: the connection was lost during COMMIT (it may have committed).
        """
        if self.dialect == "sqlite":
            begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"
        elif read_only:
            begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        else:
            begin = "BEGIN ISOLATION LEVEL SERIALIZABLE"
        conn = self._connect()
        cur = conn.cursor()
        try:
            cur.execute(begin)
        except Exception as e:  # an idle connection the server ended: nothing began yet
            if not self._lost_here(e):
                raise
            conn = self._connect()
            cur = conn.cursor()
            cur.execute(begin)
        try:
            yield Tx(cur, self.dialect)
        except BaseException:
            if not self._lost(conn):  # a lost session was rolled back by the server
                try:
                    cur.execute("ROLLBACK")
                except Exception:  # lost meanwhile, or in an unknown state: never reuse it
                    self._discard(conn)
            raise
        try:
            cur.execute("COMMIT")
        except Exception as e:
            if self._lost(conn):
                raise CommitUnknownError(
                    "database connection lost during COMMIT: the outcome is unknown"
                ) from e
            raise

    def run(
        self, fn: Callable[[Tx], T], *, wait_s: float | None = None, read_only: bool = False
    ) -> T:
        """Run ``fn`` in a transaction, retrying it on serialization failures, deadlocks and
        connections lost before COMMIT (on a new connection). ``read_only``: in a read-only
        transaction (``transaction``), for a consistent view of several tables.

        ``wait_s`` bounds, on SQLite, the whole call's wait for the file's writer lock
        (another process's transaction: a CLI, a stalled replica); without it each
        attempt waits up to ``BUSY_TIMEOUT_S``, which suits background writers, not a
        caller with a deadline.

        Raises:
            CommitUnknownError: the connection was lost during COMMIT; not retried here.
            UnavailableError: the database is down, the connection kept getting lost, or
                (``wait_s``) the SQLite file stayed locked by another writer that long;
                nothing was written.
        """
        wait_until = None if wait_s is None else time.monotonic() + wait_s
        for attempt in range(_RETRIES):
            try:
                with self._busy_until(wait_until), self.transaction(read_only=read_only) as tx:
                    return fn(tx)
            except CommitUnknownError:
                raise
            except Exception as e:  # retry only the transient kinds
                waited = wait_until is not None and time.monotonic() >= wait_until
                if waited and self.dialect == "sqlite" and self._is_transient(e):
                    raise DatabaseBusyError(
                        "database busy: another writer holds the database's lock"
                    ) from e
                lost = self._lost_here(e)
                if lost and attempt == _RETRIES - 1:
                    raise UnavailableError("database connection lost") from e
                if not (lost or self._is_transient(e)) or attempt == _RETRIES - 1:
                    raise
                time.sleep(0.002 * (2**attempt))
        raise AssertionError("unreachable")

    def _is_transient(self, e: Exception) -> bool:
        if self.dialect == "sqlite":
            return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)
        import psycopg.errors

        return isinstance(e, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected)

    def is_transient(self, e: BaseException) -> bool:
        """Whether a failure is the database's state, not the statement's data: the same work
        may succeed later (down or unreachable, connection lost, commit outcome unknown,
        serialization, deadlock, locks, resources, a read-only standby after a failover,
        and also a missing privilege or table, which an operator can restore).

        A writer that retries in the background (the decision log) retries these; only a
        failure of the data (PostgreSQL classes 22 data exception and 23 integrity
        constraint, a value the client refuses to send) recurs whatever is fixed, so that
        item alone is set aside: never lose decisions to a revoked GRANT.
        """
        if isinstance(e, UnavailableError):
            return True
        if self.dialect == "sqlite":
            # locked, busy, disk I/O, disk full, read-only, missing table; row contents
            # fail as IntegrityError, DataError or InterfaceError instead
            return isinstance(e, sqlite3.OperationalError)
        import psycopg

        if not isinstance(e, psycopg.Error):
            return False
        state = e.sqlstate or ""
        if not state:  # raised by the client: connection lost or closed, or a bad value
            return isinstance(e, psycopg.OperationalError)
        return state[:2] not in _DATA_CLASSES

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """A read outside any explicit transaction; retried once if the connection was lost.

        Raises:
            UnavailableError: the database is down, or the connection was lost again.
        """
        for attempt in range(2):
            conn = self._connect()
            cur = conn.cursor()
            try:
                Tx(cur, self.dialect).execute(sql, params)
                return [tuple(r) for r in cur.fetchall()]
            except Exception as e:
                if not self._lost_here(e):
                    raise
                if attempt == 1:
                    raise UnavailableError("database connection lost") from e
        raise AssertionError("unreachable")

    def executescript(self, ddl: str) -> None:
        """Run several ``;``-separated statements (schema creation). On PostgreSQL,
        processes starting together take turns (``SCHEMA_LOCK``, taken before the
        transaction): two sessions running ``CREATE ... IF NOT EXISTS`` at once fail one of
        them (review: of two replicas started together on a fresh schema, one exited).

        Raises:
            UnavailableError: another process held the schema lock for ``SCHEMA_WAIT_S``.
        """

        def script(tx: Tx) -> None:
            for stmt in (s.strip() for s in ddl.split(";")):
                if stmt:
                    tx.execute(stmt)

        with self.schema_turn():
            if self.dialect == "postgres":
                self.run(script)
            else:
                with self.transaction() as tx:
                    script(tx)

    @contextmanager
    def schema_turn(self, what: str = "database schema") -> Iterator[None]:
        """On PostgreSQL, hold this schema's creation lock (``schema_lock``, a session
        advisory lock taken before any transaction begins, so it comes before the
        transaction's snapshot) while creating tables; nothing to hold on SQLite.

        Raises:
            UnavailableError: another process held it for ``SCHEMA_WAIT_S`` (``what``
                names the tables in the message).
        """
        if self.dialect != "postgres":
            yield
            return
        if not advisory_lock(self, self.schema_lock, time.monotonic() + SCHEMA_WAIT_S):
            raise UnavailableError(f"{what}: another process is still creating it")
        try:
            yield
        finally:
            self.query("SELECT pg_advisory_unlock(?)", (self.schema_lock,))

    @property
    def schema_lock(self) -> int:
        """The advisory lock processes creating this database's tables take turns on: one
        per ``?schema=`` (review: one for the whole database held starts and CLIs on
        other schemas behind a slow one)."""
        if not self._schema:
            return SCHEMA_LOCK
        return (SCHEMA_LOCK << 32) | zlib.crc32(self._schema.encode())

    def scoped_lock(self, lock: int) -> int:
        """Advisory ``lock`` (64 bits) for this database's ``?schema=`` alone: its high
        half and the schema name's CRC-32; ``lock`` itself without a schema."""
        if not self._schema:
            return lock
        return ((lock >> 32) << 32) | zlib.crc32(self._schema.encode())

    def checkpoint(self, wait_s: float) -> bool | None:
        """SQLite: copy the write-ahead log into the database file and truncate the log
        (``wal_checkpoint(TRUNCATE)``), so pages overwritten since (``secure_delete``)
        replace their old images in the file and the log keeps none.

        Waits up to ``wait_s`` for other connections' transactions; False when one was
        still reading an older snapshot, or writing, by then (the file and the log keep
        the old pages until a later checkpoint completes). None on PostgreSQL, whose old
        row versions only ``VACUUM`` removes.
        """
        if self.dialect != "sqlite":
            return None
        with self._busy_until(time.monotonic() + wait_s):
            rows = self.query("PRAGMA wal_checkpoint(TRUNCATE)")
        return bool(rows) and rows[0][0] == 0

    def drop_schema(self) -> None:
        """PostgreSQL only: drop this database's ``?schema=`` and everything in it (tests)."""
        if self.dialect == "postgres" and self._schema:
            self._connect().execute(f'DROP SCHEMA IF EXISTS "{self._schema}" CASCADE')

    def cancel(self, thread_id: int, timeout_s: float) -> None:
        """PostgreSQL: cancel the statement that thread ``thread_id`` runs on its connection,
        if any (its transaction fails and rolls back), waiting at most ``timeout_s`` for
        the server to take the request (a hung one never does). For a stop, so that the
        connection is not closed under a thread still waiting on a lock. SQLite: nothing
        (a thread waits for its lock ``BUSY_TIMEOUT_S``, or ``run``'s ``wait_s``)."""
        if self.dialect != "postgres":
            return
        with self._lock:
            conn = self._owners.get(thread_id)
        if conn is not None:
            with contextlib.suppress(Exception):  # closed, broken, or no answer in time
                conn.cancel_safe(timeout=timeout_s)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
            self._owners = {}
        for c in conns:
            with contextlib.suppress(Exception):  # already closed or broken: nothing to release
                c.close()
        self._local = threading.local()
