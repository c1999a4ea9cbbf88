"""The decision log: every decision and every reported outcome, appended, batched, hash-chained.

Where it sits: ``engine.Scorer`` builds a ``DecisionRecord`` for each decision
and appends a call's records together (``append_all``); a background writer thread
takes whatever has queued up (up to ``max_batch`` items) and commits it in ONE
transaction, so the request path never waits on a disk flush or a network round
trip. With a
Vault whose keys live in the same database, that transaction also creates the
data keys of the batch's new buyers: keys and ciphertexts commit together.

Durability, precisely: an appended item is durable once the writer's
transaction holding it has committed (SQLite ``synchronous=FULL``, or
PostgreSQL's commit). A crash (kill -9, power loss) loses exactly the items
appended since the last commit: those still queued plus the batch being
written, never more than ``queue_size`` items, and in practice the last batch
(the writer commits continuously; ``flush_interval_s`` bounds how long it
waits to gather a batch). What survives is always a prefix of the appends (less
any item set aside, see below), in order, with a valid chain. ``flush()`` waits
for everything appended so far to be committed or set aside; ``close()``
flushes and stops the writer (graceful shutdown loses nothing). A stop whose flush
runs out of time (the database down, locked or hung) writes what is still queued to a
spill file under ``spill_dir`` (``riskd.evidence.spill``: the chained rows, PII masked
as stored); the next start appends it (``replay_spilled``) before serving, each
decision and report once however often a file is replayed.

Backpressure: when ``queue_size`` items are waiting (the database is slow or
down), ``append`` (``append_all``: room for all of its items, or none is queued) waits
up to ``put_timeout_s`` and then raises ``UnavailableError``: the caller answers
anyway and marks the decision degraded. Once the queue has been full for
``put_timeout_s`` with nothing committed, appends to it raise at once until the writer
commits something: a database that is down costs the first callers that wait, not every
request (a slow one that still commits is waited on again). A failed commit is logged
(the error's type only: rows hold PII) and retried with backoff while the failure is
the database's (down, connection lost, locks: ``Database.is_transient``); its items
stay queued and visible to ``get``. A connection lost during COMMIT leaves the outcome
unknown: before writing the batch again the writer looks for the chain heads it wrote,
so a batch that did commit is never appended twice. A batch that fails on its data
(a value the database refuses, a constraint: the driver's error; or a value no driver
can encode) is written again one item at a time, in order: the good items commit and
the chain stays valid, and an item that can never be written is set aside, logged by
order id and error type and counted in ``rejected``, so it cannot stop the writer. Nor
can a bug of the writer's own: an exception that escapes a batch's commit, or any other
one while writing it (never taken for a refusal of its data), is logged (its type and
frames, never its text), counted in ``restarts``, and the writer takes the batch up
again where it stopped after a pause (0.1 s, doubling to 5 s while it keeps failing
so): what committed is not written again, what did not is. Each commit calls the
``add_commit_hook`` hooks (the scorer ends an outage of the full queue so, when no
request comes to tell it); one that raises is the hook's bug, not the writer's: the
commit stands (``hook_failures``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from riskd.domain.events import OrderEvent
from riskd.domain.order import Order
from riskd.errors import (
    CommitUnknownError,
    ConfigError,
    InvalidArgumentError,
    RiskdError,
    UnavailableError,
)
from riskd.evidence import spill
from riskd.evidence.chain import (
    DECISIONS,
    EVENTS,
    Table,
    TextRow,
    VerifyResult,
    append_rows,
    append_texts,
    chain_head,
    verify,
)
from riskd.evidence.records import (
    DecisionRecord,
    content_text,
    event_content,
    event_from,
    from_content,
)
from riskd.evidence.request import (
    Encryptor,
    Indexer,
    blind_indexes,
    pii_fields,
    protect_order,
)
from riskd.evidence.schema import create_schema
from riskd.pii.keystore import spellings
from riskd.pii.vault import PreparedKeys
from riskd.sql import Database, Tx, driver_errors


@dataclass(frozen=True, slots=True)
class _Item:
    """One queued append: a decision (with its plaintext order for the Vault and the
    blind indexes, and digests already computed) or an event."""

    record: DecisionRecord | None = None
    order: Order | None = None
    event: OrderEvent | None = None
    digests: Mapping[str, str] | None = None
    appended_at: float = 0.0  # wall clock at ``append``: before or after a buyer's forget


@dataclass(slots=True)
class _Held:
    """The batch the writer holds and how far its commit got. It outlives an exception
    that escapes the commit (``DecisionLog._run``): the restart writes ``todo`` (after
    looking for ``unsure``'s heads) and accounts for ``finished``, so what committed is
    never written again and what did not is never dropped."""

    todo: list[_Item]  # neither committed nor set aside yet, in order
    alone: bool = False  # the batch failed on its data: one item per transaction
    unsure: _Heads | None = None  # what a commit of unknown outcome would have written
    finished: list[_Item] = dataclasses.field(default_factory=list)  # done, still accounted

    def move(self, n: int) -> None:
        """The first ``n`` items of ``todo`` are committed or set aside."""
        self.finished.extend(self.todo[:n])
        self.todo = self.todo[n:]


@dataclass(frozen=True, slots=True)
class _Written:
    """A committed write, for what follows it (``DecisionLog._wrote``)."""

    records: list[_Item]
    prepared: list[PreparedKeys]  # the batch's data keys, read or created in its transaction
    unsealed: list[str]  # decisions stored without their PII ciphertexts (no usable key)
    superseded: list[str]  # decisions not stored: their order had one recorded already
    error: str  # why a data key was missing, if one was


# One decision to append: its record, the plaintext order (Vault, blind indexes), digests.
Entry = tuple[DecisionRecord, Order | None, Mapping[str, str] | None]

_IN_CHUNK = 500
STUCK_WAIT_S = 2.0  # close's flush after one that timed out (two of the writer's retries)
# A flush this long that committed nothing: the database hangs (answers TCP, never replies:
# no error is ever seen) rather than being slow; close waits only STUCK_WAIT_S after it.
STALLED_S = 10.0
# A flush of STALLED_S or more that timed out this long ago or less was the same stop's
# (the scorer's close, then the catch-up's CLOSE_MAX_S - CLOSE_FLUSH_S, then the closers):
# close waits only STUCK_WAIT_S after it even when the database still commits a little.
# Older (an outage's, hours ago), it shortens no later stop.
STOP_SPAN_S = 60.0
# On SQLite, how long one try of the writer waits for another connection's write lock
# (then it tries again): a stop finds it between tries, so the file is never closed
# under it (review: closing a connection waiting for the lock blocked the stop ~28 s).
WRITE_WAIT_S = 1.0
WRITER_EXIT_S = 2.0  # how long a stop that spills waits for the writer to leave its try
_EVENT_CHUNK = 100  # reports looked up per query (three parameters each)
# The writer's pause after an exception escaped it (a bug), doubling up to RESTART_MAX_S
# while the same batch keeps failing so: a bug that recurs costs a retry every 5 s, not a core.
RESTART_FIRST_S = 0.1
RESTART_MAX_S = 5.0
# Lookups read rows of the chain only: a row beside it (seq NULL or below 1, which tables
# created before the schema's CHECK accept) is not a recorded decision; verify names it.
_CHAINED = " AND seq >= 1"
# What a write put at the end of each chain it appended to: (table, seq, hash).
_Heads = tuple[tuple[Table, int, str], ...]

_log = logging.getLogger("riskd.evidence.log")


class DecisionLog:
    """Append-only decision and outcome log over a ``riskd.sql.Database``.

    Args:
        db: the database; the caller owns and closes it.
        vault: when given, the PII fields of appended orders are also stored
            encrypted (``decision_pii``), by the writer thread.
        indexer: when given, the blind indexes of those fields are stored
            (``decision_blind_index``), by the writer thread.
        max_batch: most items committed in one transaction.
        queue_size: most items waiting for a commit (the crash-loss bound).
        flush_interval_s: how long the writer waits to gather a batch.
        put_timeout_s: how long ``append`` waits for room in a full queue.
        create_tables: create the evidence tables if missing (``create_schema``); False
            when the caller has just done so (``riskd serve`` does, before its keyring
            exists: one DDL turn per start, not one per user of the tables).
        spill_dir: where ``close`` writes what a flush that ran out of time left queued
            (``riskd serve``: the data folder); None: it is lost, logged with its count.
    """

    def __init__(
        self,
        db: Database,
        *,
        vault: Encryptor | None = None,
        indexer: Indexer | None = None,
        max_batch: int = 512,
        queue_size: int = 8192,
        flush_interval_s: float = 0.005,
        put_timeout_s: float = 0.05,
        create_tables: bool = True,
        spill_dir: Path | None = None,
    ) -> None:
        if max_batch < 1 or queue_size < max_batch:
            raise ConfigError("evidence.queue_size: must be at least max_batch (>= 1)")
        self.db = db
        self._vault = vault
        self._indexer = indexer
        self._max_batch = max_batch
        self._queue_size = queue_size
        self._interval = flush_interval_s
        self._put_timeout = put_timeout_s
        self._spill_dir = spill_dir
        if create_tables:
            create_schema(db)
        if vault is not None:
            vault.add_forget_hook(self._forget)
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._pending: dict[str, DecisionRecord] = {}  # queued or being written
        self._inflight = 0  # items taken by the writer, not yet committed
        self._batch: list[_Item] = []  # the writer's batch (its last _inflight: uncommitted)
        self._abandoned = False  # spilled by close: the writer tries nothing more
        self._written = 0  # items committed since start (flush waits on this)
        self._stuck_at = -1  # _written when a flush last timed out (close waits no more)
        self._stuck_for = 0.0  # how long that flush waited
        self._stuck_when = -math.inf  # when it timed out (monotonic)
        # (_written, monotonic time) when an append first found the queue full since the
        # writer's last commit: put_timeout_s after it, appends no longer wait for room
        self._full_at: tuple[int, float] = (-1, 0.0)
        self._appended = 0
        self._urgent = 0  # flush() waits for everything appended up to here
        self._closed = False
        self._error: str = ""
        self._rejected = 0  # items set aside: the database refused them
        self._unsealed = 0  # decisions stored without PII ciphertexts (no usable data key)
        self._superseded = 0  # decisions not stored: their order had one recorded already
        self._restarts = 0  # exceptions that escaped the writer (bugs): it went on each time
        self._bug: tuple[str, str] | None = None  # the last one logged (type, where), this batch
        self._failing_on_bug = False  # the last failed try was a bug's (not the database's)
        self._hook_failures = 0  # exceptions from commit hooks: the commits stood
        self._hook_bugs: set[tuple[str, str]] = set()  # those logged (type, where), since start
        self._commit_hooks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="evidence-writer", daemon=True)
        self._thread.start()

    # -- the request path --------------------------------------------------

    def protect(self, order: Order) -> dict[str, Any]:
        """The order as the chained record stores it: PII masked, never plaintext."""
        return protect_order(order)

    def append(
        self,
        record: DecisionRecord,
        *,
        order: Order | None = None,
        digests: Mapping[str, str] | None = None,
    ) -> None:
        """Queue a decision for the writer; returns at once unless the queue is full.

        ``order`` (plaintext) is used only to encrypt its PII fields with the
        Vault and to blind-index them, in the writer thread; it is never stored
        in clear. ``digests`` (field type -> blind index of this order's value,
        e.g. the engine's feature keys) are reused. A second append for an
        order already queued is ignored (the first one wins; counted in ``superseded``).

        Raises:
            UnavailableError: the queue stayed full for ``put_timeout_s``, or the log is closed.
        """
        self.append_all(((record, order, digests),))

    def append_all(self, entries: Iterable[Entry], *, wait_s: float | None = None) -> None:
        """``append`` for several decisions at once (``(record, order, digests)``), all or
        none: it waits until the queue has room for every one of them, at most
        ``put_timeout_s`` and, when given, ``wait_s`` (a caller's deadline), so either
        all are queued or, raising, none.

        Raises:
            UnavailableError: the queue had no room for them in time, or the log is closed.
        """
        keep = self._vault is not None or self._indexer is not None
        with self._cond:
            fresh: dict[str, Entry] = {}
            for entry in entries:
                order_id = entry[0].order_id
                if order_id in self._pending or order_id in fresh:
                    self._superseded += 1
                    continue
                fresh[order_id] = entry
            if not fresh:
                return
            self._room(len(fresh), wait_s)
            now = time.time()  # before or after a buyer's forget (see _forgotten_before)
            self._pending.update((oid, record) for oid, (record, _, _) in fresh.items())
            self._enqueue(
                _Item(record=r, order=o if keep else None, digests=d, appended_at=now)
                for r, o, d in fresh.values()
            )

    def append_event(self, event: OrderEvent) -> None:
        """Queue a reported outcome (its own append-only, chained table)."""
        if not event.order_id:
            raise InvalidArgumentError("event.order_id", "is required")
        if event.kind.value == 0:
            raise InvalidArgumentError("event.kind", "must be set")
        with self._cond:
            self._room(1, None)
            self._enqueue((_Item(event=event),))

    def _room(self, n: int, wait_s: float | None) -> None:
        """Wait (holding the lock) until ``n`` more items fit the queue (any number fits an
        empty one), at most ``put_timeout_s`` and ``wait_s``, and no later than
        ``put_timeout_s`` after an append first found the queue full since the writer's
        last commit: past that the database is down or locked, and each append is
        refused at once. Review: every request waited ``put_timeout_s`` for room that
        never came; then each scoring worker call whose deadline left less than that
        (a checkout's 50 ms) still waited all of it, as a wait cut short proved nothing,
        and every Score got the fallback policy after 35 ms."""
        wait = self._put_timeout if wait_s is None else min(self._put_timeout, max(wait_s, 0.0))
        deadline = time.monotonic() + wait
        need = min(n, self._queue_size)
        while len(self._queue) + self._inflight + need > self._queue_size and not self._closed:
            now = time.monotonic()
            if self._full_at[0] != self._written:  # the first to find it full since a commit
                self._full_at = (self._written, now)
            left = min(deadline, self._full_at[1] + self._put_timeout) - now
            if left <= 0:
                raise UnavailableError("decision log queue is full")
            self._cond.wait(left)
        if self._closed:
            raise UnavailableError("decision log is closed")

    def _enqueue(self, items: Iterable[_Item]) -> None:
        """Queue ``items`` (the lock held, room made by ``_room``)."""
        before = len(self._queue)
        self._queue.extend(items)
        after = len(self._queue)
        self._appended += after - before
        if before == 0 or before < self._max_batch <= after:
            # wake the writer only when it has something new to do: the first items
            # (it sleeps on an empty queue) or a full batch (it stops gathering); in
            # between it gathers for flush_interval_s, and a wake-up per append would
            # cost every request a context switch and a GIL hand-off
            self._cond.notify_all()

    def get(self, order_id: str) -> DecisionRecord | None:
        """The recorded decision for ``order_id`` (queued or committed), or None."""
        with self._cond:
            record = self._pending.get(order_id)
        if record is not None:
            return record
        sql = f"SELECT content FROM decision_log WHERE order_id = ?{_CHAINED}"
        rows = self.db.query(sql, (order_id,))
        if not rows:
            # committed between the two looks: the row is there now
            with self._cond:
                record = self._pending.get(order_id)
            return record
        return from_content(json.loads(rows[0][0]))

    def queued(self, order_ids: Sequence[str]) -> dict[str, DecisionRecord]:
        """The decisions among ``order_ids`` appended but not yet committed (memory only)."""
        with self._cond:
            return {oid: r for oid in order_ids if (r := self._pending.get(oid)) is not None}

    def get_many(self, order_ids: Sequence[str]) -> dict[str, DecisionRecord]:
        """The recorded decisions among ``order_ids`` (one query per 500 ids), by order id."""
        found: dict[str, DecisionRecord] = {}
        with self._cond:
            for oid in order_ids:
                if (record := self._pending.get(oid)) is not None:
                    found[oid] = record
        rest = [oid for oid in dict.fromkeys(order_ids) if oid not in found]
        for start in range(0, len(rest), _IN_CHUNK):
            chunk = rest[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT content FROM decision_log WHERE order_id IN ({marks}){_CHAINED}"
            for (content,) in self.db.query(sql, chunk):
                record = from_content(json.loads(content))
                found[record.order_id] = record
        with self._cond:  # committed between the two looks: the row is there now
            for oid in rest:
                if oid not in found and (record := self._pending.get(oid)) is not None:
                    found[oid] = record
        return found

    def events(self, order_id: str) -> list[OrderEvent]:
        """Committed outcome reports for ``order_id``, oldest first."""
        rows = self.db.query(
            f"SELECT content FROM order_events WHERE order_id = ?{_CHAINED} ORDER BY seq",
            (order_id,),
        )
        return [event_from(json.loads(r[0])) for r in rows]

    def verify(self) -> VerifyResult:
        """Walk both hash chains (committed rows) and report the first bad record."""
        return verify(self.db)

    @property
    def committed(self) -> int:
        """Items committed since start (it only grows: each commit is the database
        answering the writer)."""
        return self._written

    @property
    def backlog(self) -> int:
        """Items appended and not yet committed (what a crash now would lose)."""
        with self._cond:
            return len(self._queue) + self._inflight

    @property
    def rejected(self) -> int:
        """Items set aside since start because the database refused them (each one logged)."""
        with self._cond:
            return self._rejected

    @property
    def unsealed(self) -> int:
        """Decisions stored since start with masked PII only: the Vault had no usable data
        key for them (e.g. wrapped under a retired master key), so no analyst can reveal
        their PII. Each batch with any is logged (order ids and error type, no PII)."""
        with self._cond:
            return self._unsealed

    @property
    def superseded(self) -> int:
        """Decisions not stored since start because their order already had a recorded
        decision (the log keeps the first): another process decided it too (a replica, a
        scoring worker, the gRPC process's fallback for a stalled worker), or this one
        could not read the log and scored a retry again. The caller that got such a
        decision acted on one the log does not keep; each batch with any is logged
        (order ids only)."""
        with self._cond:
            return self._superseded

    @property
    def restarts(self) -> int:
        """Exceptions that escaped the writer thread since start (a bug, not the database's
        failures): each time it went on with the batch it held, after a pause (0.1 s,
        doubling to 5 s while the batch keeps failing so); the first of a run is logged
        with its type and frames."""
        with self._cond:
            return self._restarts

    @property
    def failing_on_a_bug(self) -> bool:
        """Whether the writer is waiting out a bug of its own: its last try failed on one (an
        exception escaping it: it restarts) rather than on the database (its failures and
        refusals), and no try has begun since. A flush timed out then says nothing of the
        database, which may answer every other caller (the scorer's stop keeps its
        catch-up there). A try begun clears it (review: a writer that hit a bug, then hung
        in a database that stopped answering, still said "a bug", and a stop waited 10 s
        more for that database before the catch-up's spill file)."""
        with self._cond:
            return self._failing_on_bug

    @property
    def hook_failures(self) -> int:
        """Exceptions that commit hooks raised since start (their bugs): the commit had
        landed and stood, the writer went on at once, the other hooks ran; each kind
        (type and place) is logged the first time, with its frames."""
        with self._cond:
            return self._hook_failures

    def add_commit_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the writer thread after each commit (the scorer ends an
        outage of the queue so when no request comes to tell it). It must be quick; an
        exception from it is the hook's (``hook_failures``), never the commit's."""
        self._commit_hooks.append(hook)

    def _forget(self, subject_id: str) -> None:
        """Vault forget hook: ``forget_subject`` (the chained, masked rows stay)."""
        forget_subject(self.db, subject_id)

    # -- flush and close ---------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything appended before this call is committed (or set aside).

        Raises:
            UnavailableError: not committed within ``timeout_s`` (the database is down).
        """
        with self._cond:
            target = self._appended
            self._urgent = target  # the writer commits what it has instead of gathering more
            self._cond.notify_all()
            ok = self._cond.wait_for(lambda: self._written >= target, timeout_s)
            if not ok:
                self._stuck_at = self._written
                self._stuck_for = math.inf if timeout_s is None else timeout_s
                self._stuck_when = time.monotonic()
                raise UnavailableError(f"decision log flush timed out ({self._error})")

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Flush, then stop the writer, within ``timeout_s`` in all. Idempotent; the
        database stays open. After a flush that timed out with nothing committed since,
        while the writer's last commit failed or after ``STALLED_S`` of it (a database
        that hangs sets no error), only ``STUCK_WAIT_S`` more (the writer's next tries;
        review: the scorer's close flushed for 30 s, then this for 30 s more and a 30 s
        join of a writer stuck in BEGIN, with the database down or hung). So too within
        ``STOP_SPAN_S`` of a flush of ``STALLED_S`` or more that timed out, even with
        commits since (review: a database slow but still committing made the stop flush
        30 s twice, ~65 s, and a scoring worker was killed at 49 s with its queue). So a
        stop flushes for about as long as its first flush (README: up to 30 s), and a
        database slower than that (a lock held past it) keeps what is queued out of the
        log; one slow only past a shorter flush (a reveal's), or past a long one that
        timed out before ``STOP_SPAN_S`` (an outage's, hours ago), gets the whole
        ``timeout_s``. Then the writer is stopped first (``_stop_writer``: ``WRITER_EXIT_S``
        more at most), and what was not committed is written to a spill file under
        ``spill_dir`` for the next start (``_spill``: then close returns), or, without one
        or when it cannot be written, logged with its count (lost: README "What a crash
        can lose").

        Raises:
            UnavailableError: the flush ran out of time and what was queued is lost.
        """
        with self._cond:
            if self._closed:
                return
            long_ago = time.monotonic() - self._stuck_when
            stuck = self._stuck_at == self._written and (
                self._error or self._stuck_for >= STALLED_S
            )
            slow = self._stuck_for >= STALLED_S and long_ago <= STOP_SPAN_S
            if (stuck or slow) and timeout_s is not None:
                timeout_s = min(timeout_s, STUCK_WAIT_S)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            self.flush(timeout_s)
        except UnavailableError:
            # the writer leaves the database first: the caller closes it next (review: a
            # SQLite connection closed under a writer whose lock had just come free
            # crashed the process, and one closed while it waited blocked the stop 28 s)
            items = self._stop_writer()
            if self._spill_dir is not None and self._spill(self._spill_dir, items):
                return
            _log.error(
                "decision log closed with items not committed: lost",
                extra={"fields": {"items": len(items), "error": self._error or "no answer"}},
            )
            raise
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _stop_writer(self) -> list[_Item]:
        """Stop the writer after a flush that ran out of time: it tries nothing more, and
        gets ``WRITER_EXIT_S`` to leave the try it is in (on PostgreSQL its statement is
        cancelled; on SQLite a try waits ``WRITE_WAIT_S`` for the lock at most). Returns
        what is still uncommitted, the writer's batch first, and empties the queue."""
        with self._cond:
            self._abandoned = self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + WRITER_EXIT_S
        if self._thread.ident is not None:
            self.db.cancel(self._thread.ident, WRITER_EXIT_S / 2)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            items = self._batch[len(self._batch) - self._inflight :] + list(self._queue)
            self._queue.clear()
        return items

    def _spill(self, folder: Path, items: Sequence[_Item]) -> bool:
        """Write ``items`` to a spill file under ``folder``; False when it could not be
        written (logged: the caller logs the loss). A writer still in a hung database's
        statement may yet commit its batch before the process ends: the replay then
        finds those decisions logged already and skips them."""
        rows = [_row(i.record) for i in items if i.record is not None]
        events = [event_content(i.event) for i in items if i.event is not None]
        try:
            path = spill.write(folder, rows, events)
        except OSError as e:
            _log.error(
                "decision log spill failed",
                extra={"fields": {"error": type(e).__name__, "errno": e.errno}},
            )
            return False
        _log.error(
            "decision log closed with items not committed: spilled for the next start",
            extra={
                "fields": {
                    "decisions": len(rows),
                    "events": len(events),
                    "file": path.name,
                    "error": self._error or "no answer",
                }
            },
        )
        return True

    def replay_spilled(self, folder: Path) -> int:
        """Append what earlier stops spilled under ``folder`` (``_spill``), oldest file
        first, each file in one transaction, then delete the file; call before serving.

        Decisions whose order is logged already (a writer that committed after all, or
        a file replayed before but not deleted: a crash between the two) and reports
        stored already are skipped, so each is logged once. A file that cannot be read,
        or written while the database refuses, is logged by name and left for a later
        start. Part files left by a process killed while writing one are deleted
        (``spill.remove_stale_parts``). Returns the number of decisions and reports
        appended.
        """
        spill.remove_stale_parts(folder)
        total = 0
        for path in spill.files(folder):
            try:
                rows, contents = spill.read(path)
                events = [event_from(c) for c in contents]
                decisions, reports = self.db.run(partial(_replay, rows, events), wait_s=10.0)
            except Exception as e:  # the file's, or the database's (down, locked, refusing a
                # row): kept for a later start, which a spill must never prevent
                _log.error(
                    "decision log spill file not replayed; left for a later start",
                    extra={"fields": {"file": path.name, "error": type(e).__name__}},
                )
                continue
            spill.remove(path)
            total += decisions + reports
            _log.warning(
                "decision log spill replayed (decisions with masked PII only)",
                extra={
                    "fields": {
                        "file": path.name,
                        "decisions": decisions,
                        "events": reports,
                        "skipped": len(rows) + len(events) - decisions - reports,
                    }
                },
            )
        return total

    # -- the writer thread -------------------------------------------------

    def _run(self) -> None:
        """The writer thread: take a batch, commit it, until the log is closed.

        An exception that escapes a batch's commit (a bug: the database's own failures are
        ``_commit``'s) does not end the thread: ``_restart`` logs and counts it, waits, and
        the batch is taken up where its commit stopped (``_Held``). Review: the thread
        died, the queue filled, and every answer went out unlogged, with nothing said.
        """
        held: _Held | None = None
        restarts = 0  # of the batch held
        while True:
            try:
                if held is None:
                    batch = self._take()
                    if batch is None:
                        return
                    held = _Held(batch)
                self._commit(held)
            except Exception as e:
                pause = min(RESTART_FIRST_S * 2**restarts, RESTART_MAX_S)
                if not self._restart(e, pause):
                    return
                restarts += 1
                continue
            held = None
            if restarts:
                with self._cond:
                    self._bug = None
                fields = {"restarts": restarts}
                _log.info(
                    "decision log writer going again after a restart", extra={"fields": fields}
                )
                restarts = 0

    def _restart(self, e: Exception, pause: float) -> bool:
        """Log an exception that escaped the writer (its type and frames, never its text:
        it may quote a row's PII), the first of a run of the same only; count it
        (``restarts``); wait ``pause`` (``close`` cuts it short). False: closed."""
        error, frames = type(e).__name__, _frames(e)
        with self._cond:
            self._restarts += 1
            self._error = error  # flush's and close's messages name it
            self._failing_on_bug = True
            first, self._bug = self._bug != (error, frames[-1]), (error, frames[-1])
        if first:
            fields = {"error": error, "where": frames[-1], "frames": frames, "retry_in_s": pause}
            _log.error("decision log writer failed; restarting it", extra={"fields": fields})
        with self._cond:
            return not self._cond.wait_for(lambda: self._closed, pause)

    def _call_hooks(self) -> None:
        """Call the commit hooks after a commit. One that raises does not escape: the
        batch has committed (review: taken for the writer's bug, it was counted as a
        restart, paused the writer after each commit and skipped the hooks after it).
        Counted in ``hook_failures``; logged (type and frames, never the text: it may
        quote PII) once per kind since start, as no pause bounds how often it recurs."""
        for hook in self._commit_hooks:
            try:
                hook()
            except Exception as e:
                error, frames = type(e).__name__, _frames(e)
                with self._cond:
                    self._hook_failures += 1
                    first = (error, frames[-1]) not in self._hook_bugs
                    self._hook_bugs.add((error, frames[-1]))
                if first:
                    fields = {"error": error, "where": frames[-1], "frames": frames}
                    _log.error(
                        "decision log commit hook failed; the commit stands",
                        extra={"fields": fields},
                    )

    def _take(self) -> list[_Item] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if not self._queue or self._abandoned:  # spilled: the queue is close's now
                return None
            if not self._gathered():
                # gather a batch; appenders and flush() notify, so this returns as soon as
                # the batch is full or someone waits for it
                self._cond.wait_for(self._gathered, self._interval)
            n = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            self._inflight = n
            self._batch = batch
            return batch

    def _gathered(self) -> bool:
        full = len(self._queue) >= self._max_batch
        return full or self._closed or self._written < self._urgent

    def _commit(self, held: _Held) -> None:
        """Commit ``held.todo`` in order; returns when every item is committed or set aside
        (or the log was closed while the database stayed down). ``held`` records each
        step as it is made, so that after an exception escaping from here the writer's
        restart neither writes a committed item again nor drops one that was not."""
        self._finish(held)  # committed before the restart, not yet out of the queue
        delay = 0.01
        failures = 0
        while held.todo and not self._abandoned:
            chunk = held.todo[:1] if held.alone else held.todo
            heads: list[tuple[Table, int, str]] = []
            written: _Written | None = None
            if self._failing_on_bug:  # a try begins: whatever it meets, no bug of the last
                with self._cond:
                    self._failing_on_bug = False
            try:
                if held.unsure is None or not self._landed(held.unsure):
                    held.unsure = None
                    written = self._write(chunk, heads)
            except Exception as e:
                if self._abandoned:  # spilled by close: the database closes under it
                    return
                if isinstance(e, CommitUnknownError):
                    held.unsure = tuple(heads)
                transient = self.db.is_transient(e)
                if not transient and (held.unsure is not None or not _refused(e)):
                    raise  # not the database refusing the items' data: a bug (_run's)
                failures += 1
                _log.warning(
                    "decision log commit failed",
                    extra={
                        "fields": {
                            "error": type(e).__name__,
                            "items": len(chunk),
                            "transient": transient,
                            "retry_in_s": delay if transient else 0.0,
                        }
                    },
                )
                if not transient and len(chunk) > 1:
                    held.alone = True  # find the item the database refuses; keep the order
                    continue
                if not transient:
                    self._reject(chunk[0], e)
                    held.move(1)
                    self._finish(held)
                    continue
                with self._cond:
                    self._error = type(e).__name__
                    self._failing_on_bug = False
                    if self._closed:
                        return
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            held.unsure = None
            held.move(len(chunk))
            if written is not None:  # before the flush waiting on these items returns
                self._wrote(written)
            self._finish(held)
            delay = 0.01
            self._call_hooks()
        if failures and not self._abandoned:
            _log.info(
                "decision log writer going again after failed commits",
                extra={"fields": {"failures": failures}},
            )

    def _finish(self, held: _Held) -> None:
        """The items ``held`` has committed or set aside leave the queue's accounting."""
        if held.finished:
            self._done(held.finished)
            held.finished = []

    def _done(self, items: list[_Item]) -> None:
        """``items`` are committed (or set aside): they leave the queue's accounting."""
        with self._cond:
            for item in items:
                if item.record is not None:
                    self._pending.pop(item.record.order_id, None)
            self._inflight -= len(items)
            self._written += len(items)
            self._error = ""
            self._failing_on_bug = False
            self._cond.notify_all()

    def _reject(self, item: _Item, e: Exception) -> None:
        """Set aside an item the database refuses on its own: log it (order id and error
        type, never its content: it may hold PII) and count it; the rest go on."""
        if item.record is not None:
            kind, order_id = "decision", item.record.order_id
        else:
            kind, order_id = "event", item.event.order_id if item.event is not None else ""
        _log.error(
            "decision log item refused by the database; set aside",
            extra={"fields": {"kind": kind, "order_id": order_id, "error": type(e).__name__}},
        )
        with self._cond:
            self._rejected += 1

    def _landed(self, heads: _Heads) -> bool:
        """Whether a write whose commit outcome is unknown did commit: its chain heads are there."""
        for table, seq, digest in heads:
            rows = self.db.query(
                f"SELECT 1 FROM {table.name} WHERE seq = ? AND hash = ?", (seq, digest)
            )
            if not rows:
                return False
        return True

    def _write(self, batch: list[_Item], heads: list[tuple[Table, int, str]]) -> _Written:
        """Write ``batch`` in one transaction; ``heads`` gets the chain heads it wrote.
        What is left to do once it has committed is ``_wrote``'s (review: a failure there
        was taken for the batch's, and the committed batch written again, one by one)."""
        records = [i for i in batch if i.record is not None]
        events = [i.event for i in batch if i.event is not None]
        rows = [_row(i.record) for i in records if i.record is not None]
        vault = self._vault
        # New buyers' data keys go in the batch's own transaction when the keystore shares
        # this database (as `riskd serve` wires it): one commit per batch, not two.
        shared = vault is not None and vault.keeps_keys_in(self.db)
        secrets = [] if shared else list(self._encrypt(records))
        digests = list(self._digests(records))
        prepared: list[PreparedKeys] = []
        unsealed: list[str] = []  # stored without their PII ciphertexts (no usable key)
        superseded: list[str] = []  # not stored: the order had a recorded decision already

        def write(tx: Tx) -> None:
            pii_rows = secrets
            forgotten: set[str] = set()  # appended before their buyer's forget: masks only
            if vault is not None and shared:
                keys = self._prepare_in(vault, tx, records)
                prepared[:] = [] if keys is None else [keys]
                if keys is not None:
                    forgotten = _forgotten_before(records, keys)
                sealable = [i for i in records if i.record and i.record.order_id not in forgotten]
                pii_rows = [] if keys is None else list(self._encrypt(sealable, keys))
            stored = append_texts(tx, DECISIONS, rows, unique=True)
            fresh = _new_events(tx, events) if events else []
            if fresh:
                append_rows(tx, EVENTS, [event_content(e) for e in fresh])
            kept: set[str] = set()
            superseded.clear()  # a retried transaction starts over
            for i, ok in zip(records, stored, strict=True):
                if i.record is None:
                    continue
                if ok:
                    kept.add(i.record.order_id)
                else:
                    superseded.append(i.record.order_id)
            pii = [s for s in pii_rows if s[0] in kept]
            done = {s[0] for s in pii} | forgotten
            unsealed[:] = [oid for oid in kept if oid not in done]
            if pii:
                tx.executemany(
                    "INSERT INTO decision_pii (order_id, field, subject_id, ciphertext)"
                    " VALUES (?, ?, ?, ?)",
                    pii,
                )
            indexes = [d for d in digests if d[0] in kept and d[0] not in forgotten]
            if indexes:
                tx.executemany(
                    "INSERT INTO decision_blind_index (order_id, field, subject_id, digest)"
                    " VALUES (?, ?, ?, ?)",
                    indexes,
                )
            # where the chains end now: should the COMMIT's outcome be unknown (connection
            # lost), finding these rows tells that it did commit
            written = [t for t, n in ((DECISIONS, len(kept)), (EVENTS, len(fresh))) if n]
            heads[:] = [(t, *chain_head(tx, t)) for t in written]

        self.db.run(write, wait_s=WRITE_WAIT_S)
        return _Written(records, prepared, unsealed, superseded, self._error)

    def _wrote(self, written: _Written) -> None:
        """What follows a commit: cache its new data keys, count and log the decisions it
        superseded and those stored without their ciphertexts."""
        vault, superseded, unsealed = self._vault, written.superseded, written.unsealed
        if superseded:
            with self._cond:
                self._superseded += len(superseded)
            _log.warning(
                "decisions not logged: their orders had a recorded decision already",
                extra={"fields": {"orders": len(superseded), "first": superseded[0]}},
            )
        if vault is not None and written.prepared:  # committed: their keys may be cached now
            vault.adopt(written.prepared[0])
        if vault is not None and unsealed:  # rare: only then see which carried PII at all
            orders = {i.order.order_id: i.order for i in written.records if i.order is not None}
            unsealed = [oid for oid in unsealed if oid in orders and pii_fields(orders[oid])]
        if vault is not None and unsealed:
            with self._cond:
                self._unsealed += len(unsealed)
            fields = {"orders": len(unsealed), "first": unsealed[0], "error": written.error}
            _log.warning(
                "decisions logged without their encrypted PII (masked forms only)",
                extra={"fields": fields},
            )

    def _prepare_in(self, vault: Encryptor, tx: Tx, items: Iterable[_Item]) -> PreparedKeys | None:
        """The batch's data keys, read and created in the batch's transaction (None: none)."""
        try:
            return vault.prepare_in(tx, (i.order.buyer.buyer_id for i in items if i.order))
        except RiskdError as e:  # no keys: the masked forms are logged, never the plaintext
            self._error = type(e).__name__
            return None

    def _encrypt(
        self, items: Iterable[_Item], keys: PreparedKeys | None = None
    ) -> Iterable[tuple[str, str, str, bytes]]:
        vault = self._vault
        if vault is None:
            return
        items = [i for i in items if i.order is not None and i.record is not None]
        if keys is None:
            try:  # every data key of the batch in one read and one transaction
                vault.prepare(i.order.buyer.buyer_id for i in items if i.order is not None)
            except RiskdError as e:  # each record's own key lookup below decides
                self._error = type(e).__name__
        for item in items:
            if item.order is None or item.record is None:
                continue
            order_id, subject = item.order.order_id, item.order.buyer.buyer_id
            try:
                secrets = vault.encrypt_fields(subject, order_id, pii_fields(item.order), keys)
            except RiskdError as e:  # the masked form is still logged; never the plaintext
                self._error = type(e).__name__
                continue
            for field, secret in secrets.items():
                yield (order_id, field, subject, secret)

    def _digests(self, items: Iterable[_Item]) -> Iterable[tuple[str, str, str, str]]:
        if self._indexer is None:
            return
        for item in items:
            if item.order is None:
                continue
            order_id, subject = item.order.order_id, item.order.buyer.buyer_id
            for field, digest in blind_indexes(item.order, self._indexer, item.digests).items():
                yield (order_id, field, subject, digest)


def _refused(e: Exception) -> bool:
    """Whether ``e`` (not transient) is a write's data refused: the driver's own errors,
    and a value no driver can take (text that cannot be encoded, an integer past 64
    bits: sqlite3 raises these itself, as the blind index's encoding does), which would
    otherwise hold the writer for good on one item. Any other exception, raised before
    the COMMIT or in the transaction alike, is a bug (review: a TypeError preparing a
    batch was taken for a refusal, and the items it recurred on were set aside, lost)."""
    return isinstance(e, (*driver_errors(), UnicodeError, OverflowError))


def _frames(e: BaseException) -> list[str]:
    """Where ``e`` was raised, outermost frame first, as ``module:function:line``: no
    source text and no values (an exception's message may quote a row's PII)."""
    return [
        f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_name}:{line}"
        for frame, line in traceback.walk_tb(e.__traceback__)
    ]


def _forgotten_before(items: Iterable[_Item], keys: PreparedKeys) -> set[str]:
    """The orders appended before their buyer's latest ``forget`` (read in the batch's
    transaction by ``prepare_in``): a forget that ran while they waited in the queue
    covers them, so neither their ciphertexts nor their blind indexes are stored (the
    chained, masked record is). Wall clocks: the append's and the forget's."""
    out: set[str] = set()
    for item in items:
        if item.order is None or item.record is None:
            continue
        at = keys.forgotten_at(item.order.buyer.buyer_id)
        if at is not None and item.appended_at <= at:
            out.add(item.record.order_id)
    return out


def _new_events(tx: Tx, events: Sequence[OrderEvent]) -> list[OrderEvent]:
    """``events`` less those already stored or earlier in the list: the same order, kind
    and time is a retried report, acknowledged again and stored once.

    Only the batch's own (order, kind, time) triples are looked up (index
    ``order_events_report``): reading every report of their orders made a batch holding
    one for an order reported 100,000 times cost ~1 s of the writer (review).
    """
    keys = sorted({(e.order_id, e.kind.name, float(e.at)) for e in events})
    seen: set[tuple[str, str, float]] = set()
    for start in range(0, len(keys), _EVENT_CHUNK):
        chunk = keys[start : start + _EVENT_CHUNK]
        match = " OR ".join(["(order_id = ? AND kind = ? AND at = ?)"] * len(chunk))
        sql = f"SELECT order_id, kind, at FROM order_events WHERE {match}"
        params = [v for key in chunk for v in key]
        seen.update((str(o), str(k), float(a)) for o, k, a in tx.execute(sql, params).fetchall())
    fresh = []
    for event in events:
        key = (event.order_id, event.kind.name, float(event.at))
        if key not in seen:
            seen.add(key)
            fresh.append(event)
    return fresh


def _replay(rows: Sequence[TextRow], events: Sequence[OrderEvent], tx: Tx) -> tuple[int, int]:
    """Append a spill file's decisions (those whose order is not logged yet) and reports
    (those not stored yet) in one transaction; returns how many of each were appended."""
    stored = append_texts(tx, DECISIONS, rows, unique=True)
    fresh = _new_events(tx, events) if events else []
    if fresh:
        append_rows(tx, EVENTS, [event_content(e) for e in fresh])
    return sum(stored), len(fresh)


def _row(record: DecisionRecord) -> TextRow:
    """A decision's chained row: the copied columns and its canonical content text."""
    d = record.decision
    return (d.order_id, d.decided_at, d.outcome.name, d.rules_version), content_text(record)


def encrypted_fields(db: Database, order_id: str) -> Mapping[str, bytes]:
    """The Vault ciphertexts stored for ``order_id``'s PII fields (for the case view)."""
    rows = db.query("SELECT field, ciphertext FROM decision_pii WHERE order_id = ?", (order_id,))
    return {str(f): bytes(c) for f, c in rows}


def blind_index_entries(db: Database, order_id: str) -> Mapping[str, str]:
    """The blind indexes stored for ``order_id``'s PII fields, by field."""
    rows = db.query(
        "SELECT field, digest FROM decision_blind_index WHERE order_id = ?", (order_id,)
    )
    return {str(f): str(d) for f, d in rows}


def orders_with(db: Database, field: str, digest: str) -> list[str]:
    """The orders whose ``field`` has blind index ``digest`` (e.g. every order of one phone)."""
    rows = db.query(
        "SELECT order_id FROM decision_blind_index WHERE field = ? AND digest = ?"
        " ORDER BY order_id",
        (field, digest),
    )
    return [str(r[0]) for r in rows]


def forget_subject(db: Database, subject_id: str) -> int:
    """Delete a forgotten buyer's evidence beside the chain: the Vault ciphertexts and the
    blind indexes of their orders' PII. The chained records (masks only) stay, and verify.

    Rows under every spelling of the buyer id that velocity counting takes for the same
    buyer (``b-77 ``, ``ｂ-７７`` for ``b-77``: ``riskd.pii.keystore.spellings``) go too.

    ``riskd pii forget`` calls it from its own process (as the ``Vault`` forget hook,
    after the legal-hold check and the key shredding); ``DecisionLog`` registers it too.
    Creates the evidence tables if missing. Returns the number of rows deleted.
    """
    _require_subject(subject_id)
    create_schema(db)  # on SQLite, the freed space is zeroed: ``Database`` sets secure_delete

    def delete(tx: Tx) -> int:
        deleted = dict.fromkeys(("decision_pii", "decision_blind_index"), 0)
        for table in deleted:
            for subject in spellings(tx, table, subject_id):
                deleted[table] += tx.execute(
                    f"DELETE FROM {table} WHERE subject_id = ?", (subject,)
                ).rowcount
        if deleted["decision_blind_index"] and db.dialect == "sqlite":
            # A page split leaves copies of the cells it moved in the gap of the page they
            # left, which secure_delete never zeroes: the digest index, keyed by random
            # digests, splits everywhere (1 forget in 3 left a digest in the file). A
            # rebuild writes it afresh and frees, so zeroes, every old page of it.
            tx.execute("REINDEX decision_blind_index_digest")
        return sum(deleted.values())

    return db.run(delete)


def _require_subject(subject_id: str) -> None:
    if not subject_id:
        raise InvalidArgumentError("subject_id", "must not be empty")
