"""Where wrapped data keys, legal holds and blind-index entries live: SQL tables via ``riskd.sql``.

Where it sits: under the ``Vault``. A row holds one subject's data key
(generation ``n``) encrypted under master key ``master_version``; shredding
sets ``wrapped`` to NULL and keeps the row as a tombstone, so a later
ciphertext under that generation fails with "shredded" instead of "unknown".
Tables are prefixed ``pii_``; the SQL is portable between SQLite and
PostgreSQL.

Legal holds: one row per (subject, reason) in ``pii_legal_hold_reasons``. The
older ``pii_legal_holds`` (one row per subject, so a second reason was dropped)
is still read and released from, so holds placed before keep their reasons; new
holds are written to the new table only (a schema change by addition: old
databases work unchanged).

One subject, several spellings: subject ids are stored as the caller gave them
(``b-77``, ``b-77 ``, full-width ``ｂ-７７``), while velocity counting treats them
as one buyer (the blind index's ``NORMALIZERS["buyer"]``). ``shred`` and the legal
holds match every stored spelling of the subject (``spellings``), so a forget
leaves none of them behind and a hold under one spelling protects them all.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from riskd.errors import FailedPreconditionError
from riskd.pii.blind import NORMALIZERS
from riskd.pii.keyring import WrappedKey
from riskd.sql import Database, Tx, driver_errors


@dataclass(frozen=True, slots=True)
class DataKeyRow:
    """One generation of a subject's data key; ``wrapped`` is None once shredded.

    ``forgotten_at`` (filled by ``latest_many`` only): when the subject's latest ``forget``
    shredded its keys (any generation), None if never.
    """

    subject_id: str
    generation: int
    wrapped: WrappedKey | None
    forgotten_at: float | None = None

    @property
    def shredded(self) -> bool:
        return self.wrapped is None


@dataclass(frozen=True, slots=True)
class ShredResult:
    """What ``shred`` destroyed; ``subjects``: the stored spellings of the subject it
    covered (``spellings``), the one asked for first."""

    data_keys_destroyed: int
    index_entries_deleted: int
    subjects: tuple[str, ...] = ()
    checkpointed: bool | None = None
    """SQLite: whether the WAL checkpoint after the deletes completed, so the file and
    its log no longer hold the deleted bytes (False: a reader held it up); None on
    PostgreSQL, or before ``Vault.forget`` ran it."""


class KeyStore(Protocol):
    """Storage of wrapped data keys (what the ``Vault`` needs)."""

    def latest(self, subject_id: str) -> DataKeyRow | None: ...
    def get(self, subject_id: str, generation: int) -> DataKeyRow | None: ...
    def create(
        self, subject_id: str, generation: int, wrapped: WrappedKey, at: float
    ) -> DataKeyRow: ...
    def latest_many(
        self, subject_ids: Collection[str], tx: Tx | None = None
    ) -> dict[str, DataKeyRow]: ...
    def create_many(
        self, keys: Sequence[tuple[str, int, WrappedKey]], at: float, tx: Tx | None = None
    ) -> dict[tuple[str, int], DataKeyRow]: ...
    def shred(self, subject_id: str, at: float) -> ShredResult: ...
    def checkpoint(self) -> bool | None: ...
    def stale(
        self, primary_version: int, limit: int, after: tuple[str, int] | None = None
    ) -> list[DataKeyRow]: ...
    def rewrap(self, row: DataKeyRow, wrapped: WrappedKey) -> bool: ...
    def count_under(self, master_version: int) -> int: ...
    def hold(self, subject_id: str, reason: str, at: float) -> None: ...
    def release(self, subject_id: str, reason: str | None = None) -> bool: ...
    def holds(self, subject_id: str) -> list[str]: ...
    def is_held(self, subject_id: str) -> bool: ...
    def add_index_entries(self, entries: Iterable[tuple[str, str, str]]) -> None: ...
    def subjects_for(self, field_type: str, digest: str) -> list[str]: ...


CHECKPOINT_WAIT_S = 5.0  # how long a forget's checkpoint waits for other connections' reads
_IN_CHUNK = 500  # subjects per ``IN (...)`` list (well under SQLite's variable limit)


class SqlKeyStore:
    """``KeyStore`` over a ``riskd.sql.Database`` (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.create_schema()

    def create_schema(self) -> None:
        blob, real = (
            ("BYTEA", "DOUBLE PRECISION") if self.db.dialect == "postgres" else ("BLOB", "REAL")
        )
        self.db.executescript(f"""
            CREATE TABLE IF NOT EXISTS pii_data_keys (
                subject_id TEXT NOT NULL, generation INTEGER NOT NULL,
                master_version INTEGER NOT NULL, wrapped {blob},
                created_at {real} NOT NULL, shredded_at {real},
                PRIMARY KEY (subject_id, generation));
            CREATE INDEX IF NOT EXISTS pii_data_keys_master ON pii_data_keys (master_version);
            CREATE TABLE IF NOT EXISTS pii_legal_holds (
                subject_id TEXT PRIMARY KEY, reason TEXT NOT NULL, placed_at {real} NOT NULL);
            CREATE TABLE IF NOT EXISTS pii_legal_hold_reasons (
                subject_id TEXT NOT NULL, reason TEXT NOT NULL, placed_at {real} NOT NULL,
                PRIMARY KEY (subject_id, reason));
            CREATE TABLE IF NOT EXISTS pii_blind_index (
                field_type TEXT NOT NULL, digest TEXT NOT NULL, subject_id TEXT NOT NULL,
                PRIMARY KEY (field_type, digest, subject_id));
            CREATE INDEX IF NOT EXISTS pii_blind_index_subject ON pii_blind_index (subject_id);
            CREATE TABLE IF NOT EXISTS pii_keyring (
                id INTEGER PRIMARY KEY CHECK (id = 1), fingerprint TEXT NOT NULL)
        """)

    # -- the keyring the data was written with --------------------------------------------

    def keyring_fingerprint(self) -> str | None:
        """The fingerprint recorded on first use (``keyring.fingerprint``); None before."""
        rows = self.db.query("SELECT fingerprint FROM pii_keyring WHERE id = 1")
        return str(rows[0][0]) if rows else None

    def record_keyring_fingerprint(self, fingerprint: str) -> str:
        """Record ``fingerprint`` unless one is; returns the stored one (a process started
        at the same time may have recorded its own first)."""

        def insert(tx: Tx) -> None:
            tx.execute(
                "INSERT INTO pii_keyring (id, fingerprint) VALUES (1, ?) ON CONFLICT DO NOTHING",
                (fingerprint,),
            )

        self.db.run(insert)
        stored = self.keyring_fingerprint()
        assert stored is not None  # inserted above or by the writer that won
        return stored

    def sample_keys(self) -> list[DataKeyRow]:
        """One live data key per master version (which keyring wrapped them, if unsure)."""
        versions = self.db.query(
            "SELECT DISTINCT master_version FROM pii_data_keys WHERE wrapped IS NOT NULL "
            "ORDER BY master_version"
        )
        out: list[DataKeyRow] = []
        for (version,) in versions:
            rows = self.db.query(
                f"SELECT {self._COLS} FROM pii_data_keys WHERE master_version = ? "
                "AND wrapped IS NOT NULL LIMIT 1",
                (version,),
            )
            out.extend(_row(r) for r in rows)
        return out

    # -- data keys ------------------------------------------------------------------------

    _COLS = "subject_id, generation, master_version, wrapped"

    def latest(self, subject_id: str) -> DataKeyRow | None:
        rows = self.db.query(
            f"SELECT {self._COLS} FROM pii_data_keys WHERE subject_id = ? "
            "ORDER BY generation DESC LIMIT 1",
            (subject_id,),
        )
        return _row(rows[0]) if rows else None

    def get(self, subject_id: str, generation: int) -> DataKeyRow | None:
        rows = self.db.query(
            f"SELECT {self._COLS} FROM pii_data_keys WHERE subject_id = ? AND generation = ?",
            (subject_id, generation),
        )
        return _row(rows[0]) if rows else None

    def create(
        self, subject_id: str, generation: int, wrapped: WrappedKey, at: float
    ) -> DataKeyRow:
        """Insert a generation unless another writer won the race; returns the stored row."""

        def insert(tx: Tx) -> None:
            tx.execute(
                "INSERT INTO pii_data_keys (subject_id, generation, master_version, wrapped, "
                "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (subject_id, generation, wrapped.version, wrapped.blob, at),
            )

        self.db.run(insert)
        row = self.get(subject_id, generation)
        assert row is not None  # inserted above or by the writer that won
        return row

    def latest_many(
        self, subject_ids: Collection[str], tx: Tx | None = None
    ) -> dict[str, DataKeyRow]:
        """The latest generation of each subject that has one (one query per 500 subjects),
        with ``forgotten_at``: when the subject was last shredded.

        Inside ``tx`` when given (a transaction of this store's database).
        """
        ids = list(dict.fromkeys(subject_ids))
        out: dict[str, DataKeyRow] = {}
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(
                "SELECT k.subject_id, k.generation, k.master_version, k.wrapped, m.forgotten_at "
                "FROM pii_data_keys k JOIN (SELECT subject_id, MAX(generation) AS generation, "
                "MAX(shredded_at) AS forgotten_at "
                f"FROM pii_data_keys WHERE subject_id IN ({marks}) GROUP BY subject_id) m "
                "ON k.subject_id = m.subject_id AND k.generation = m.generation",
                chunk,
                tx,
            )
            for r in rows:
                row = _row(r)
                out[row.subject_id] = row
        return out

    def create_many(
        self, keys: Sequence[tuple[str, int, WrappedKey]], at: float, tx: Tx | None = None
    ) -> dict[tuple[str, int], DataKeyRow]:
        """Insert several generations in ONE transaction (``tx`` when given, which then
        commits them with whatever else it writes); returns the stored rows.

        A generation another writer created first is kept as it is (its row is
        returned, not ours), exactly as with ``create``.
        """
        if not keys:
            return {}
        params = [(s, g, w.version, w.blob, at) for s, g, w in keys]

        def insert(tx: Tx) -> None:
            tx.executemany(
                "INSERT INTO pii_data_keys (subject_id, generation, master_version, wrapped, "
                "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                params,
            )

        if tx is None:
            self.db.run(insert)
        else:
            insert(tx)
        return self._get_many({(s, g) for s, g, _ in keys}, tx)

    def _read(self, sql: str, params: Sequence[Any], tx: Tx | None) -> list[tuple[Any, ...]]:
        return self.db.query(sql, params) if tx is None else tx.execute(sql, params).fetchall()

    def _get_many(
        self, wanted: set[tuple[str, int]], tx: Tx | None = None
    ) -> dict[tuple[str, int], DataKeyRow]:
        ids = sorted({s for s, _ in wanted})
        out: dict[tuple[str, int], DataKeyRow] = {}
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(
                f"SELECT {self._COLS} FROM pii_data_keys WHERE subject_id IN ({marks})", chunk, tx
            )
            for r in rows:
                row = _row(r)
                if (row.subject_id, row.generation) in wanted:
                    out[row.subject_id, row.generation] = row
        return out

    def shred(self, subject_id: str, at: float) -> ShredResult:
        """Destroy every wrapped data key of the subject and its blind-index entries,
        under each stored spelling of its id (``spellings``).

        A subject with no live key (none yet: its first order may still be queued for the
        decision log's writer; or forgotten before) gets a tombstone generation instead,
        so the forget's time is on record either way: the writer seals nothing appended
        before it, and the subject's next key is a new generation. So does each spelling,
        and the normalized one (``NORMALIZERS["buyer"]``) whether stored or not: a spelling
        with nothing stored yet (an order under ``b-77 `` still queued) is found by it
        (``Vault.prepare_in`` reads it beside each subject's own; review: such an order
        was sealed under a new key after the forget).

        Raises:
            FailedPreconditionError: the subject is under legal hold, under any spelling
                (nothing changes).
        """

        def destroy(tx: Tx) -> ShredResult:
            if _hold_reasons(tx, subject_id):
                raise FailedPreconditionError("subject is under legal hold; forgetting is refused")
            subjects = [subject_id, *_stored_spellings(tx, subject_id, _KEYED) - {subject_id}]
            normalized = NORMALIZERS["buyer"](subject_id)
            marked = [normalized] if normalized and normalized not in subjects else []
            keys = entries = 0
            for subject in subjects + marked:
                keys += _shred_keys(tx, subject, at)
                entries += tx.execute(
                    "DELETE FROM pii_blind_index WHERE subject_id = ?", (subject,)
                ).rowcount
            if entries and self.db.dialect == "sqlite":
                # Keyed by digest, its index splits everywhere and a split leaves copies of
                # the cells it moved that secure_delete never zeroes: rebuilt, its old
                # pages are freed, so zeroed (as ``forget_subject`` rebuilds the log's).
                tx.execute("REINDEX pii_blind_index")
            return ShredResult(keys, entries, tuple(subjects))

        # SQLite overwrites the freed space with zeros (``secure_delete``, set on every
        # connection by ``Database``), so the old wrapped key is not left in the file once
        # ``checkpoint`` has copied the pages there.
        return self.db.run(destroy)

    def checkpoint(self) -> bool | None:
        """After a ``shred`` (and the deletes of its forget hooks): on SQLite, move the
        overwritten pages into the file and empty the write-ahead log, which still holds
        the deleted wrapped keys, ciphertexts and digests until then (``Database.checkpoint``,
        waiting up to ``CHECKPOINT_WAIT_S`` for readers). False: a reader held it up;
        None: PostgreSQL (``VACUUM``)."""
        try:
            return self.db.checkpoint(CHECKPOINT_WAIT_S)
        except driver_errors():  # e.g. locked: what is left stays until a later checkpoint
            return False

    def stale(
        self, primary_version: int, limit: int, after: tuple[str, int] | None = None
    ) -> list[DataKeyRow]:
        """Live keys not wrapped under ``primary_version``, by (subject, generation), from
        just past ``after`` (keyset paging: a key that cannot be re-wrapped is passed by)."""
        subject, generation = after if after is not None else ("", -1)
        rows = self.db.query(
            f"SELECT {self._COLS} FROM pii_data_keys WHERE wrapped IS NOT NULL "
            "AND master_version <> ? AND (subject_id > ? OR (subject_id = ? AND generation > ?)) "
            "ORDER BY subject_id, generation LIMIT ?",
            (primary_version, subject, subject, generation, limit),
        )
        return [_row(r) for r in rows]

    def rewrap(self, row: DataKeyRow, wrapped: WrappedKey) -> bool:
        """Replace one wrapped key if it is still the one read (compare-and-set)."""
        assert row.wrapped is not None
        old = row.wrapped

        def update(tx: Tx) -> bool:
            return (
                tx.execute(
                    "UPDATE pii_data_keys SET master_version = ?, wrapped = ? "
                    "WHERE subject_id = ? AND generation = ? AND master_version = ? "
                    "AND wrapped IS NOT NULL",
                    (wrapped.version, wrapped.blob, row.subject_id, row.generation, old.version),
                ).rowcount
                == 1
            )

        return self.db.run(update)

    def count_under(self, master_version: int) -> int:
        rows = self.db.query(
            "SELECT COUNT(*) FROM pii_data_keys WHERE master_version = ? AND wrapped IS NOT NULL",
            (master_version,),
        )
        return int(rows[0][0])

    # -- legal holds ----------------------------------------------------------------------

    def hold(self, subject_id: str, reason: str, at: float) -> None:
        """Place a hold for ``reason`` (another reason is another hold; the same one again
        changes nothing)."""

        def place(tx: Tx) -> None:
            tx.execute(
                "INSERT INTO pii_legal_hold_reasons (subject_id, reason, placed_at) "
                "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (subject_id, reason, at),
            )

        self.db.run(place)

    def release(self, subject_id: str, reason: str | None = None) -> bool:
        """Lift the subject's hold for ``reason`` (placed under any spelling of its id);
        False if there was none.

        Without ``reason``: the subject's only hold.

        Raises:
            FailedPreconditionError: no ``reason`` and the subject has several holds (the
                message lists their reasons: operator text, never personal data);
                nothing changes.
        """

        def delete(tx: Tx) -> bool:
            reasons = _hold_reasons(tx, subject_id)
            if reason is None and len(reasons) > 1:
                listed = ", ".join(repr(r) for r in reasons)
                raise FailedPreconditionError(
                    f"subject is under {len(reasons)} legal holds ({listed}); "
                    "name the reason of the one to release"
                )
            target = reason if reason is not None else (reasons[0] if reasons else None)
            if target is None or target not in reasons:
                return False
            for subject in _stored_spellings(tx, subject_id, _HOLD_TABLES):
                for table in _HOLD_TABLES:
                    tx.execute(
                        f"DELETE FROM {table} WHERE subject_id = ? AND reason = ?",
                        (subject, target),
                    )
            return True

        return self.db.run(delete)

    def holds(self, subject_id: str) -> list[str]:
        """The reasons of the subject's legal holds (under any spelling of its id), sorted
        (empty: not held)."""
        return self.db.run(lambda tx: _hold_reasons(tx, subject_id), read_only=True)

    def is_held(self, subject_id: str) -> bool:
        return bool(self.holds(subject_id))

    # -- blind-index entries --------------------------------------------------------------

    def add_index_entries(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """Record ``(subject_id, field_type, digest)`` triples (empty digests skipped)."""
        rows = [(ft, d, s) for s, ft, d in entries if d]
        if not rows:
            return

        def insert(tx: Tx) -> None:
            tx.executemany(
                "INSERT INTO pii_blind_index (field_type, digest, subject_id) "
                "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )

        self.db.run(insert)

    def subjects_for(self, field_type: str, digest: str) -> list[str]:
        rows = self.db.query(
            "SELECT subject_id FROM pii_blind_index WHERE field_type = ? "
            "AND digest = ? ORDER BY subject_id",
            (field_type, digest),
        )
        return [str(r[0]) for r in rows]


_HOLD_TABLES = ("pii_legal_holds", "pii_legal_hold_reasons")
_KEYED = ("pii_data_keys", "pii_blind_index")


def _hold_reasons(tx: Tx, subject_id: str) -> list[str]:
    """The subject's hold reasons, from both hold tables (see the module docstring) and
    under every spelling of its id."""
    reasons: set[str] = set()
    for subject in _stored_spellings(tx, subject_id, _HOLD_TABLES):
        for table in _HOLD_TABLES:
            rows = tx.execute(f"SELECT reason FROM {table} WHERE subject_id = ?", (subject,))
            reasons.update(str(r[0]) for r in rows.fetchall())
    return sorted(reasons)


def _shred_keys(tx: Tx, subject_id: str, at: float) -> int:
    """Destroy the subject's live data keys (the count); none: a tombstone generation."""
    keys = tx.execute(
        "UPDATE pii_data_keys SET wrapped = NULL, shredded_at = ? "
        "WHERE subject_id = ? AND wrapped IS NOT NULL",
        (at, subject_id),
    ).rowcount
    if keys == 0:
        tx.execute(
            "INSERT INTO pii_data_keys (subject_id, generation, master_version, wrapped,"
            " created_at, shredded_at) SELECT ?, COALESCE(MAX(generation), 0) + 1, 0,"
            " NULL, ?, ? FROM pii_data_keys WHERE subject_id = ?",
            (subject_id, at, at, subject_id),
        )
    return keys


def _stored_spellings(tx: Tx, subject_id: str, tables: Iterable[str]) -> set[str]:
    return {s for table in tables for s in spellings(tx, table, subject_id)}


def spellings(tx: Tx, table: str, subject_id: str) -> list[str]:
    """The ``subject_id`` values stored in ``table`` that name the same subject as
    ``subject_id``: equal once normalized as the blind index normalizes a buyer id
    (``NORMALIZERS["buyer"]``: NFKC, surrounding whitespace dropped), so everything the
    velocity counters count as this buyer. An id that normalizes to nothing matches
    itself only.

    One scan of ``table``'s subject ids, narrowed in SQL to those that contain the
    normalized id or are not ASCII (an ASCII id normalizes to itself, stripped), then
    compared here. ``table`` is one of this package's or the decision log's tables.
    """
    normalize = NORMALIZERS["buyer"]
    key = normalize(subject_id)
    if not key:
        rows = tx.execute(
            f"SELECT DISTINCT subject_id FROM {table} WHERE subject_id = ?", (subject_id,)
        )
        return [str(r[0]) for r in rows.fetchall()]
    pattern = "%" + key.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
    rows = tx.execute(
        f"SELECT DISTINCT subject_id FROM {table} WHERE subject_id = ? "
        f"OR subject_id LIKE ? ESCAPE '!' OR {_NOT_ASCII[tx.dialect]}",
        (subject_id, pattern),
    )
    return sorted(s for (s,) in rows.fetchall() if normalize(str(s)) == key)


_NOT_ASCII = {
    "sqlite": "length(CAST(subject_id AS BLOB)) <> length(subject_id)",
    "postgres": "octet_length(subject_id) <> char_length(subject_id)",
}
"""A subject id with a character outside ASCII (NFKC may turn it into the normalized id)."""


def _row(r: tuple[Any, ...]) -> DataKeyRow:
    subject_id, generation, version, wrapped = r[:4]
    blob = None if wrapped is None else WrappedKey(int(version), bytes(wrapped))
    forgotten = None if len(r) < 5 or r[4] is None else float(r[4])
    return DataKeyRow(str(subject_id), int(generation), blob, forgotten)
