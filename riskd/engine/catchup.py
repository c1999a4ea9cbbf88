"""Counting, after the answer, the orders answered without their features.

An order answered degraded ``features`` (the store failed, timed out or its breaker was
open, or a batch's deadline left it unread; a ``deadline`` answer whose features were
read was counted) may be missing from its velocity windows: nothing was recorded, or
only on the shards that answered. Its retry replays the recorded answer and never
reaches the store, so without this the order would stay uncounted for good (review: an
order scored during a Redis outage was never counted, even when its retry came after
Redis was back).

The ``CatchUp`` records such orders in the background, on one thread of its own (never
on the threads that serve deadlines), at the time they were decided, with the program's
distinct queries: the distinct counts record their sightings only for the queries asked
(with none, a caught-up shop grew in orders and not in buyers, which the brushing rules
read as one buyer placing them all), and only those (review: counts and sums read at an
old time scan every event of the key since, 60 ms on a live room that took 30,000 orders
since; a distinct count is one ``ZCOUNT``). Orders are queued right after the call that
answered them, and again when a retry replays such an answer (an order already queued is
not queued twice). While the store's breaker is open the queue waits (``RETRY_S``); an
order whose call fails goes to the back and the queue waits too (one order never holds
the others back); it is dropped after ``MAX_TRIES`` failures only if the store answered
a read of its keys after each (the order is the trouble), never while the store is
away (nor while it refuses every write: read-only, out of memory); so the orders of an
outage are counted once the store answers again, retried by
their callers or not. ``close`` drains
the queue while the store answers and keeps what is left in the decision log's database
(table ``features_catch_up``: observations only, no PII), which the next start takes and
queues again (``restore``; with several processes on one database, one of them takes
each row). When that database cannot keep it (locked past ``KEEP_WAIT_S``, hung,
refusing), it goes to a spill file under the data folder instead (``spill_dir``:
``features-catch-up-*.jsonl``, written whole and owner-only by ``riskd.spillfile``, named
by process; a line is a table row), which the next start queues too, then deletes (one
process each file, held while it takes it, as long as its queue has room); one it
cannot read is logged by name and left (review: a stop on a database a CLI held locked
lost the queue, though the decision log spilled its own). A crash loses the queue.
Recording is idempotent per order and key (``riskd.features.store``): an order the store
did record, wholly or in part, is counted once; so is one kept both ways (a hung
database that committed after all) or queued from one file by two starts (a crash
before a file's delete). An order decided more than a day ago
counts in no window and is dropped; past ``max_queued`` orders waiting, new ones are
dropped (a later retry queues them again). Dropped orders stay out of their windows, so
operators are told (review: 500 of 10,500 orders of a 5-second outage left uncounted,
silently): ``dropped`` counts them by reason (``full``, ``failing``: given up after
``MAX_TRIES``; ``error``: an unexpected exception, a bug, indexing or recording it;
``lost_at_close``: left at ``close`` and neither kept in the ``keep`` database nor
written to a spill file: none configured, or each failed),
an overflow is a warning at its first order dropped and an info line with how many once
the queue is down to half its limit, each order given up or lost to an error is a
warning, and so is each ``close`` that could not keep what was left (how many).
The thread blind-indexes each queued order first (``observe``), before anything waits for
the store: what stays queued through an outage is observations (keyed hashes, amounts,
times), not the orders' PII (``holding``: the orders not observed yet). The thread pauses
after each order as long as
the order took (at least ``PACE_S``): with the in-process store recording is pure
Python, and a thread running back to back would hold the GIL from the request threads
for whole switch intervals (review: p99 of unary calls 2.4 → 13-36 ms while 500-5,000
orders drained). The catch-up's calls are not judged by the breaker (the answers' calls
judge the store), but for one: once an open breaker's cooldown is over, the catch-up
takes its half-open probe when no request has, and that call's answer closes or re-opens
it (review: with no traffic after an outage the queue waited for the first request); and
one that answers ends an outage told at start with the circuit closed
(``CircuitBreaker.down``), as a request's would.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from riskd import spillfile
from riskd.domain.clock import Clock
from riskd.domain.decision import Decision
from riskd.domain.features import WINDOWS, Agg, FeatureQuery
from riskd.domain.order import Order
from riskd.engine.breaker import CircuitBreaker
from riskd.engine.keys import Indexer, observe
from riskd.errors import RiskdError, UnavailableError
from riskd.features.store import (
    FeatureStore,
    Observation,
    OtherContentError,
    WritesRefusedError,
)
from riskd.spillfile import SpillFileError
from riskd.sql import Database, Tx

WITHIN_S = float(max(WINDOWS.values()))  # an order decided before that counts nowhere
MAX_QUEUED = 10_000  # orders waiting to be recorded at most
RETRY_S = 1.0  # the wait before trying again while the store is away
MAX_TRIES = 20  # failed calls the store answered around, before an order is given up
FULL, FAILING = "full", "failing"  # why an order was dropped uncounted (``dropped``)
# ... and: an unexpected exception (a bug) indexing or recording it; at ``close``, no
# ``keep`` database to keep it in, or keeping it failed
ERROR, LOST_AT_CLOSE = "error", "lost_at_close"
PACE_S = 200e-6  # the least pause after each order
CLOSE_WAIT_S = 2.0  # how long ``close`` waits for the order being recorded
# the longest wait to keep (or take) what was left: SQLite's lock, PostgreSQL's statements
# (review: 2 s lost the queue to a CLI holding SQLite's lock through a SIGTERM)
KEEP_WAIT_S = 10.0
_KEEP = (
    "INSERT INTO features_catch_up (order_key, decided_at, amount, keys, content)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (order_key) DO NOTHING"
)
_EXPIRED = "DELETE FROM features_catch_up WHERE decided_at <= ?"
# the newest first (they count in more windows), as many as the queue has room for
_TAKE = (
    "DELETE FROM features_catch_up WHERE order_key IN"
    " (SELECT order_key FROM features_catch_up ORDER BY decided_at DESC LIMIT ?)"
    " RETURNING order_key, decided_at, amount, keys, content"
)
_LEFT = "SELECT COUNT(*) FROM features_catch_up"
# what ``close`` could not keep in ``keep``: a spill file under ``spill_dir`` whose lines
# are the table's rows as ``_save`` writes them (one reading for both, ``_queue_kept``)
PREFIX = "features-catch-up-"
_ORDERS = "orders"

_log = logging.getLogger("riskd.engine.catchup")

# an order as answered: when it was decided, the distinct queries to record it with
_Raw = tuple[Order, float, tuple[FeatureQuery, ...], str]  # ..., its blind-indexed id
# the same order observed (blind indexes: no PII left), its blind-indexed id, failed calls
_Item = tuple[Observation, tuple[FeatureQuery, ...], str, int]


def _distinct(queries: Collection[FeatureQuery]) -> tuple[FeatureQuery, ...]:
    """The queries an order is caught up with: the distinct ones (module docstring)."""
    return tuple(q for q in queries if q.agg is Agg.DISTINCT)


def _bounded(tx: Tx) -> Tx:
    """On PostgreSQL, no statement of this transaction waits past ``KEEP_WAIT_S`` (a lock
    held elsewhere must not hold a start or a stop: review, 9.5 s each)."""
    if tx.dialect == "postgres":
        tx.execute(f"SET LOCAL statement_timeout = {int(KEEP_WAIT_S * 1000)}")
    return tx


def _take(tx: Tx, expired: float, room: int) -> tuple[list[tuple[Any, ...]], int]:
    """Up to ``room`` kept orders decided after ``expired``, deleted as they are read (each
    goes to one process; older ones are deleted), and how many stay kept."""
    _bounded(tx).execute(_EXPIRED, (expired,))
    rows = list(tx.execute(_TAKE, (room,)).fetchall())
    left = tx.execute(_LEFT).fetchone()
    return rows, int(left[0]) if left else 0


def unread(decision: Decision) -> bool:
    """Was ``decision`` made without its order's features (maybe not counted)?"""
    return "features" in decision.degraded


class CatchUp:
    """Records orders answered without their features, in the background."""

    def __init__(
        self,
        store: FeatureStore,
        indexer: Indexer,
        breaker: CircuitBreaker,
        clock: Clock,
        *,
        max_queued: int = MAX_QUEUED,
        keep: Database | None = None,
        spill_dir: Path | None = None,
    ) -> None:
        """``keep``: the database (with the evidence schema) that keeps what ``close``
        leaves queued, for ``restore``; ``spill_dir``: the folder (the data folder) where
        ``close`` writes it to a spill file when ``keep`` cannot keep it (or there is
        none); without either, it is dropped."""
        self._store = store
        self._keep = keep
        self._spill_dir = spill_dir
        self._handed_back: list[Observation] = []  # in hand when close came: kept by it
        self._in_hand: Observation | None = None  # the order whose store call is out
        self._order_failed = False  # the last failed call was the order's, not the store's
        self._indexer = indexer
        self._breaker = breaker
        self._clock = clock
        self._max_queued = max_queued
        self._orders: collections.deque[_Raw] = collections.deque()  # not yet observed
        self._items: collections.deque[_Item] = collections.deque()  # observed
        # the orders queued, by blind-indexed order id (what a kept row has: a restored
        # order and its retry are one entry)
        self._ids: set[str] = set()
        self._busy = False  # an order is being observed or recorded (off the lock)
        self._failing = False  # the last store call failed
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        # orders dropped uncounted, by reason (``dropped``); ``_overflow``: those
        # dropped for want of room in this overflow (None: none; it ends at half the limit,
        # so a queue about full is one overflow in the log, not one per slot freed)
        self._dropped: dict[str, int] = {FULL: 0, FAILING: 0, ERROR: 0, LOST_AT_CLOSE: 0}
        self._overflow: int | None = None
        # whether the store answers now, asked while its start's outage lasts (``await_store``)
        self._asking: Callable[[], bool] | None = None

    def submit(
        self, missed: Sequence[tuple[Order, float]], queries: Collection[FeatureQuery]
    ) -> None:
        """Queue each ``(order, decided_at)`` to be recorded with the distinct ones of
        ``queries`` (the program's: see the module docstring). Never blocks or raises."""
        now = self._clock.now()
        distinct = _distinct(queries)
        keyed = []
        for order, at in missed:
            try:
                keyed.append((order, at, self._indexer.index("order", order.order_id)))
            except Exception as e:  # a bug: never the order's answer, but counted and told
                self._failed(e)
                continue
        full = 0
        with self._cond:
            if self._closed.is_set():
                return
            ended = self._room_again()
            for order, at, key in keyed:
                if now - at >= WITHIN_S or key in self._ids:
                    continue
                if self._full():
                    full += 1
                    continue
                self._ids.add(key)
                self._orders.append((order, at, distinct, key))
            began = full > 0 and self._overflow is None
            if full:
                self._dropped[FULL] += full
                self._overflow = (self._overflow or 0) + full
            if self._orders:
                self._start()
        self._tell(ended, began)

    def _room_again(self) -> int | None:
        """End the overflow if the queue is down to half its limit: the orders it dropped
        (called holding ``_cond``); None if none ended."""
        ended = self._overflow
        if ended is None or self._count() > self._max_queued // 2:
            return None
        self._overflow = None
        return ended

    def _tell(self, ended: int | None, began: bool) -> None:
        """Log an overflow's end (with the orders it dropped) and a new one's start."""
        if ended is not None:
            fields = {"orders": ended, "queue_limit": self._max_queued}
            _log.info(
                "orders waiting to be counted: queue has room again; orders dropped uncounted",
                extra={"fields": fields},
            )
        if began:
            _log.warning(
                "orders waiting to be counted: queue full; orders answered without their"
                " features are dropped uncounted until it has room",
                extra={"fields": {"queue_limit": self._max_queued}},
            )

    def dropped(self) -> dict[str, int]:
        """Orders dropped uncounted so far, by reason: ``full`` (no room in the queue),
        ``failing`` (given up after ``MAX_TRIES`` calls the store answered around),
        ``error`` (an unexpected exception indexing or recording it: a bug),
        ``lost_at_close`` (left at ``close`` and neither kept in the ``keep`` database
        nor written to a spill file: none configured, or each failed)."""
        with self._cond:
            return dict(self._dropped)

    def restore(self, queries: Collection[FeatureQuery]) -> None:
        """Take what earlier processes kept at their close (``keep``, then the spill files
        under ``spill_dir``) and queue it again, to be recorded with the distinct ones of
        ``queries`` (the program's now). At start, before any call: one read of the
        database (on SQLite, at most ``KEEP_WAIT_S`` for its lock), so no thread uses the
        database unseen; never raises: a database that cannot be read keeps its rows for
        the next start, and a file that cannot be read is logged by name and left."""
        distinct = _distinct(queries)
        if self._keep is not None:
            self._load(distinct)
        if self._spill_dir is not None:
            self._load_files(self._spill_dir, distinct)

    def _load_files(self, folder: Path, queries: tuple[FeatureQuery, ...]) -> None:
        """Queue the spill files under ``folder``, oldest first, while the queue has room
        (``_load_spilled``); those left are for another process or a later start. Part
        files left by a process killed while writing one are deleted first
        (``spillfile.remove_stale_parts``)."""
        spillfile.remove_stale_parts(folder, PREFIX)
        paths = spillfile.files(folder, PREFIX)
        for i, path in enumerate(paths):
            with self._cond:
                full = self._full()
            if full:
                left = {"files": len(paths) - i, "queue_limit": self._max_queued}
                _log.warning(
                    "spill files of orders waiting to be counted left for a later start: no room",
                    extra={"fields": left},
                )
                return
            self._load_spilled(path, queries)

    def _count(self) -> int:
        """Orders queued, the one in hand included (called holding ``_cond``)."""
        return len(self._orders) + len(self._items) + int(self._busy)

    def _full(self) -> bool:
        """No room for another order (called holding ``_cond``)."""
        return self._count() >= self._max_queued

    def _start(self) -> None:
        """Start the thread if it is not running, and wake it (holding ``_cond``)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="riskd-features-catch-up", daemon=True
            )
            self._thread.start()
        self._cond.notify_all()

    def queued(self) -> int:
        """Orders waiting (and the one being observed or recorded)."""
        with self._cond:
            return self._count()

    def holding(self) -> int:
        """Orders queued as they came, PII and all, not yet observed (blind-indexed)."""
        with self._cond:
            return len(self._orders)

    def wait(self, timeout_s: float) -> bool:
        """Wait until nothing is queued (tests); False if time ran out first."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout=timeout_s)

    def _idle(self) -> bool:
        """Nothing queued and nothing in hand (called holding ``_cond``)."""
        return not (self._orders or self._items or self._busy)

    def close(self, drain_s: float = 0.0, *, keep_failed: Exception | None = None) -> None:
        """Record what ``drain_s`` allows while the store answers (its breaker closed, and
        no call failing meanwhile: review, a frozen Redis held every stop a full second),
        wait (at most ``CLOSE_WAIT_S``: the store bounds one call) for the order in hand,
        so the store can be closed after, and keep the rest, that one included unless it
        was recorded (or still out after that wait: kept as well), in ``keep`` for the
        next start (observed first: no PII is written; at most ``KEEP_WAIT_S`` for the
        database), or, when that fails (locked past it, hung, refusing), in a spill file
        under ``spill_dir``. ``keep_failed``: how ``keep`` failed the caller just now (the
        decision log's flush timed out on it): the spill file at once, with no wait for
        the database (review: a stop on a locked file took 10 s more for that wait); the
        database only when that file cannot be written."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._idle() or self._failing or self._breaker.is_open,
                timeout=drain_s,
            )
        with self._cond:
            self._closed.set()
            left = [obs for obs, *_ in self._items]
            raw = list(self._orders)
            self._orders.clear()
            self._items.clear()
            self._ids.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(CLOSE_WAIT_S)
        with self._cond:
            left += self._handed_back
            self._handed_back.clear()
            if self._in_hand is not None:  # its call still out: kept too (recording is
                left.append(self._in_hand)  # idempotent, should that call land after all)
        if self._keep is None and self._spill_dir is None:
            self._lost(len(left) + len(raw), None)
        elif left or raw:
            observed = [o for o in map(self._observed, raw) if o is not None]
            self._save(left + observed, keep_failed)

    def _observed(self, raw: _Raw) -> Observation | None:
        order, at, _, _ = raw
        try:
            return observe(order, self._indexer, at)
        except Exception as e:  # a bug: never the order
            self._failed(e)
            return None

    def _failed(self, e: Exception) -> None:
        """An order dropped for an unexpected exception (a bug): counted (``error``) and
        told, by the exception's type only (its text may quote the order)."""
        with self._cond:
            self._dropped[ERROR] += 1
        _log.warning(
            "catching up an order's features failed; the order is dropped uncounted",
            extra={"fields": {"error_type": type(e).__name__}},
        )

    def _lost(self, orders: int, e: Exception | None) -> None:
        """``orders`` left at ``close`` and not kept (no ``keep`` database nor
        ``spill_dir``, or keeping them failed, the last try with ``e``): counted
        (``lost_at_close``) and told in one line."""
        if not orders:
            return
        with self._cond:
            self._dropped[LOST_AT_CLOSE] += orders
        fields: dict[str, Any] = {"orders": orders}
        if e is not None:
            fields["error_type"] = type(e).__name__
        _log.warning(
            "orders waiting to be counted were not kept; dropped uncounted",
            extra={"fields": fields},
        )

    def _save(self, left: Sequence[Observation], failed: Exception | None = None) -> None:
        """Keep ``left`` in the ``keep`` database (an order kept already stays as it is),
        else in a spill file under ``spill_dir`` (``_spill``), else count it lost; with
        ``failed`` (the database failed the caller just now) and a folder, the file first,
        and the database only when the file cannot be written (review: a folder gone or a
        full disk lost them so, with a database that may answer: the log's flush also
        times out on a writer merely slower than it; one failing on a bug of its own is
        not passed on as ``failed``: ``Scorer.close``)."""
        rows = [
            (o.order_id, o.at, o.amount, json.dumps(dict(o.keys), sort_keys=True), o.content)
            for o in left
        ]
        first = self._spill_dir if failed is not None else None
        if first is not None and self._spill(first, rows, failed):
            return
        error = failed
        if self._keep is not None:
            try:
                self._keep.run(lambda tx: _bounded(tx).executemany(_KEEP, rows), wait_s=KEEP_WAIT_S)
            except Exception as e:
                error = e
            else:
                _log.info(
                    "orders waiting to be counted kept for the next start",
                    extra={"fields": {"orders": len(rows)}},
                )
                return
        folder = self._spill_dir if first is None else None  # not the same file twice
        if folder is None or not self._spill(folder, rows, error):
            self._lost(len(rows), error)

    def _spill(self, folder: Path, rows: Sequence[Sequence[Any]], error: Exception | None) -> bool:
        """Write ``rows`` to a spill file under ``folder`` for the next start (``keep``
        failed with ``error``, or there is none); False when it could not be written
        (logged: the caller counts the loss). A database that hung may yet commit them
        after all: then the next start queues both, one entry, recorded once."""
        try:
            path = spillfile.write(folder, PREFIX, {_ORDERS: rows})
        except OSError as e:
            fields = {"error_type": type(e).__name__, "errno": e.errno}
            _log.warning(
                "orders waiting to be counted: spill file not written", extra={"fields": fields}
            )
            return False
        told: dict[str, Any] = {"orders": len(rows), "file": path.name}
        if error is not None:
            told["error_type"] = type(error).__name__
        _log.warning(
            "orders waiting to be counted not kept in the database: spilled for the next start",
            extra={"fields": told},
        )
        return True

    def _load(self, queries: tuple[FeatureQuery, ...]) -> None:
        """Take as many kept orders as the queue has room for (rows deleted as they are
        read; those a day old deleted too) and queue them; the rest stay kept."""
        assert self._keep is not None
        with self._cond:
            room = self._max_queued - self._count()
        expired = self._clock.now() - WITHIN_S
        try:
            rows, left = self._keep.run(
                lambda tx: _take(tx, expired, max(room, 0)), wait_s=KEEP_WAIT_S
            )
        except Exception as e:  # left for the next start
            fields = {"error_type": type(e).__name__}
            _log.warning("kept orders waiting to be counted not read", extra={"fields": fields})
            return
        taken, _ = self._queue_kept(rows, queries)
        if rows:
            queued = {"orders": taken, "rows": len(rows)}
            _log.info("kept orders waiting to be counted queued again", extra={"fields": queued})
        if left:
            self._no_room(left)

    def _no_room(self, orders: int) -> None:
        """Tell of ``orders`` kept that a start left for a later one: no room to queue them."""
        room_left = {"orders": orders, "queue_limit": self._max_queued}
        _log.warning(
            "kept orders waiting to be counted left for a later start: no room",
            extra={"fields": room_left},
        )

    def _load_spilled(self, path: Path, queries: tuple[FeatureQuery, ...]) -> None:
        """Queue the orders of one spill file (``_spill``) and delete it, holding it
        (``spillfile.held``) so that no other process takes it too: one held or gone was
        taken by another (scoring workers start together; review: each queued the same
        orders, and wrote its own copy of those it had no room for). Those the queue has
        no room for go to a new file first (if that cannot be written, this one is left
        whole: what it queued now is recorded once however often queued). A file that
        cannot be read is logged by name and left for a later start."""
        try:
            with spillfile.held(path) as mine:
                if mine:
                    self._take_spilled(path, queries)
        except OSError as e:  # it cannot be opened
            self._unread(path, e)

    def _unread(self, path: Path, e: Exception) -> None:
        unread = {"file": path.name, "error_type": type(e).__name__}
        _log.warning(
            "spill file of orders waiting to be counted not read; left for a later start",
            extra={"fields": unread},
        )

    def _take_spilled(self, path: Path, queries: tuple[FeatureQuery, ...]) -> None:
        """Queue the orders of one spill file this process holds (``_load_spilled``)."""
        try:
            rows = spillfile.read(path, (_ORDERS,))[_ORDERS]
        except (OSError, SpillFileError) as e:
            self._unread(path, e)
            return
        taken, rest = self._queue_kept(rows, queries)
        fields: dict[str, Any] = {"file": path.name, "orders": taken, "rows": len(rows)}
        _log.info("spilled orders waiting to be counted queued again", extra={"fields": fields})
        try:
            if rest:
                self._no_room(len(rest))
                spillfile.write(path.parent, PREFIX, {_ORDERS: rest})
            spillfile.remove(path)
        except OSError as e:  # then this file stays whole, and its orders are queued again
            failed = {"file": path.name, "error_type": type(e).__name__}
            _log.warning(
                "spill file of orders waiting to be counted queued but not deleted",
                extra={"fields": failed},
            )

    def _queue_kept(
        self, rows: Sequence[Any], queries: tuple[FeatureQuery, ...]
    ) -> tuple[int, list[Any]]:
        """Queue the orders of ``rows`` (kept rows, or a spill file's lines: the same
        columns) that are not queued already nor a day old, until the queue is full; how
        many were queued, and the rows from the first one it had no room for."""
        now, taken, rest = self._clock.now(), 0, []
        with self._cond:
            for i, row in enumerate(rows):
                if self._closed.is_set() or self._full():
                    rest = list(rows[i:])
                    break
                try:
                    order_key, at, amount, keys, content = row
                    obs = Observation(order_key, float(at), int(amount), json.loads(keys), content)
                except (ValueError, TypeError, RiskdError):  # not a row riskd wrote
                    continue
                if now - obs.at < WITHIN_S and order_key not in self._ids:
                    self._ids.add(order_key)
                    self._items.append((obs, queries, order_key, 0))
                    taken += 1
            if taken:
                self._start()
        return taken, rest

    def _run(self) -> None:
        retry_at = 0.0  # the store away: no call before then (orders are observed meanwhile)
        while True:
            raw: _Raw | None
            item: _Item | None
            with self._cond:
                while True:
                    if self._closed.is_set():
                        return
                    # observed first: an order's PII leaves memory before anything waits
                    if self._orders:
                        raw, item = self._orders.popleft(), None
                        break
                    raw = item = None
                    wait = None if not self._items else retry_at - time.monotonic()
                    if wait is None and self._asking is not None:
                        wait = retry_at - time.monotonic()  # ask the store (``await_store``)
                    if wait is not None and wait <= 0:
                        item = self._items.popleft() if self._items else None
                        break
                    self._cond.wait(wait)
                self._busy = raw is not None or item is not None
            started = time.monotonic()
            done: bool | None = True
            if raw is not None:
                self._observe(*raw)
            elif item is not None:
                done = self._next(item)
            else:
                done = self._ask()
            if not done:
                retry_at = time.monotonic() + RETRY_S
            # pause as long as the order took
            elif self._closed.wait(max(PACE_S, time.monotonic() - started)):
                return

    def await_store(self, answers: Callable[[], bool]) -> None:
        """The store did not answer at start (its breaker was told: ``down``): while no
        order is queued, ask ``answers`` (a ping of every shard) every ``RETRY_S`` until it
        says yes, so the outage ends, in the log and the metric, with no request (review:
        a scoring workers' server process, which scores few orders, or a replica with no
        traffic, told of Redis's return never). A call that answers ends the asking too."""
        with self._cond:
            if self._closed.is_set():
                return
            self._asking = answers
            self._start()

    def _ask(self) -> bool | None:
        """Ask the store whether it answers (``await_store``): True when it did and the
        outage is over (the breaker told: its probe's success, or ``answered``), False
        when the breaker's probe was not free (or its circuit opened as it was asked),
        None when it did not answer."""
        answers = self._asking
        if answers is None or not self._breaker.outage:
            self._asking = None  # the outage is over: by a request's call or an order's
            return True
        probe = self._breaker.is_open
        if probe and not self._breaker.allow():
            return False
        try:
            up = answers()
        except Exception:  # a bug, or the store closed at shutdown: not an answer
            up = False
        if not up:
            if probe:
                self._breaker.failure()
            return None
        if probe:
            self._breaker.success()
        else:  # the circuit may have opened since: then asked again after its cooldown
            self._breaker.answered()
        if self._breaker.outage:
            return False
        self._asking = None
        return True

    def _observe(
        self, order: Order, at: float, queries: tuple[FeatureQuery, ...], key: str
    ) -> None:
        """Blind-index ``order`` (its PII no longer kept) and queue it to be recorded."""
        try:
            obs = observe(order, self._indexer, at)
        except Exception as e:  # a bug: never the order
            self._failed(e)
            obs = None
        with self._cond:
            self._busy = False
            if obs is not None and not self._closed.is_set():
                self._items.append((obs, queries, key, 0))
            else:
                if obs is not None:  # close came meanwhile: it keeps what it is handed back
                    self._handed_back.append(obs)
                self._ids.discard(key)
            self._cond.notify_all()

    def _next(self, item: _Item) -> bool | None:
        """Record the first observed order: what ``_record`` said. One that cannot be
        recorded now goes to the back: one order never holds the others back.

        A failed call spends one of the order's ``MAX_TRIES`` only when the store answers
        a read of the order's keys right after it: the store is up and the order is the
        trouble.
        Else the store is away and the orders wait for it, however long (review: an
        outage with no requests, which would have opened the breaker, used up every
        order's tries in 20 s, and they were dropped uncounted)."""
        obs, queries, order_id, tries = item
        with self._cond:
            self._in_hand = obs
        try:
            done = self._record(obs, queries)
        except Exception as e:  # a bug: the order is dropped, counted (``error``)
            self._failed(e)
            done = True
        spent = done is None and self._order_failed
        with self._cond:
            self._busy = False
            self._in_hand = None
            self._failing = done is None
            kept = done is not True and (not spent or tries + 1 < MAX_TRIES)
            if kept and not self._closed.is_set():
                self._items.append((obs, queries, order_id, tries + int(spent)))
            else:
                if kept:  # close came meanwhile: it keeps what it is handed back
                    self._handed_back.append(obs)
                self._ids.discard(order_id)
            if not kept and done is None:
                self._dropped[FAILING] += 1
                _log.warning(
                    "an order waiting to be counted was given up: the store failed its every call",
                    extra={"fields": {"tries": MAX_TRIES}},
                )
            # told before ``wait`` can see the queue idle (rare lines: under the lock)
            self._tell(self._room_again(), False)
            self._cond.notify_all()
        return done

    def _record(self, obs: Observation, queries: Collection[FeatureQuery]) -> bool | None:
        """Record one order: True when done with it, False when the store's breaker is
        open (and its probe not free), None when the call failed (it stays queued either
        way; False too when an unexpected exception, a bug, comes after ``close``: handed
        back to be kept; before it, the exception is raised: ``_next`` counts the order
        dropped). A call made as the breaker's probe tells the breaker what the store did;
        the others do not (the requests' calls judge the store: one order the store
        cannot take must not open the breaker for the requests)."""
        if self._clock.now() - obs.at >= WITHIN_S:
            return True  # counts in no window any more: dropped
        probe = self._breaker.is_open
        if probe and not self._breaker.allow():
            return False
        try:
            self._store.record_and_read(obs, queries)
        except (UnavailableError, TimeoutError) as e:
            if probe:
                self._breaker.failure(e)
            # a store that refuses every write (read-only mid-failover, out of memory) is
            # away, though it answers reads (review: a read-only Redis gave each order up
            # after 20 tries, uncounted once it took writes again)
            refused = isinstance(e, WritesRefusedError)
            self._order_failed = not probe and not refused and self._answers(obs)
            return None
        except OtherContentError:  # a retry with other content was counted meanwhile
            pass
        except Exception:  # a bug, or the store closed at shutdown: never the order
            if probe:
                self._breaker.release()
            if self._closed.is_set():
                return False  # handed back to ``close``, which keeps it (or counts it lost)
            raise
        if probe:
            self._breaker.success()
        else:  # ends an outage told at start, the circuit never opened (no requests)
            self._breaker.answered()
        return True

    def _answers(self, obs: Observation) -> bool:
        """Whether the store answers a read of the order's keys with no queries (nothing
        recorded; with shards, every shard the order's keys live on: review, a read of
        the order id's shard alone called a dead shard's orders the trouble)."""
        try:
            self._store.read(obs, ())
        except Exception:  # away, or closed at shutdown
            return False
        return True
