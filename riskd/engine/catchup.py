"""Counting, after the answer, the orders answered without their features.

An order answered degraded ``features`` (the store failed, timed out or its breaker was
open) or ``deadline`` (a batch's deadline left it unread) may be missing from its
velocity windows: nothing was recorded, or only on the shards that answered. Its retry
replays the recorded answer and never reaches the store, so without this the order
would stay uncounted for good (review: an order scored during a Redis blip was never
counted, even when its retry came after Redis was back).

The ``CatchUp`` records such orders in the background, on one thread of its own (never
on the threads that serve deadlines), at the time they were decided, with no features
read: right after a batch that left orders unread, and again when a retry replays such
an answer. Recording is idempotent per order and key (``riskd.features.store``), so an
order the store did record, wholly or in part, is counted once. What it skips, a later
retry tries again: while the store's breaker is open, once a job meets a failure (the
rest of that job is left), orders decided more than a day ago (out of every window),
and orders past ``max_queued`` waiting (an outage's backlog is not kept in memory).
The catch-up's calls are not counted by the breaker: the answers' calls judge the store.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Sequence

from riskd.domain.clock import Clock
from riskd.domain.decision import Decision
from riskd.domain.order import Order
from riskd.engine.breaker import CircuitBreaker
from riskd.engine.keys import Indexer, observe
from riskd.errors import UnavailableError
from riskd.features.store import FeatureStore

# what a decision made without an order's features says it lacked
UNREAD = frozenset({"features", "deadline"})
WITHIN_S = 24 * 3600.0  # the longest window: an order decided before that counts nowhere
MAX_QUEUED = 10_000  # orders waiting to be recorded at most

_log = logging.getLogger("riskd.engine.catchup")


def unread(decision: Decision) -> bool:
    """Was ``decision`` made without its order's features (maybe not counted)?"""
    return not UNREAD.isdisjoint(decision.degraded)


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
    ) -> None:
        self._store = store
        self._indexer = indexer
        self._breaker = breaker
        self._clock = clock
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._queued = 0
        self._closed = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "riskd-features-catch-up")

    def submit(self, missed: Sequence[tuple[Order, float]]) -> None:
        """Record each ``(order, decided_at)`` in the background (see the module docstring
        for what is skipped). Never blocks and never raises."""
        now = self._clock.now()
        todo = [(order, at) for order, at in missed if now - at < WITHIN_S]
        if not todo or self._breaker.is_open:
            return
        with self._lock:
            if self._queued + len(todo) > self._max_queued:
                return
            self._queued += len(todo)
        try:
            self._pool.submit(self._record, todo)
        except RuntimeError:  # shut down
            self._done(len(todo))

    def wait(self, timeout_s: float) -> bool:
        """Wait until nothing is queued (tests, shutdown); False if time ran out first."""
        ended = threading.Event()
        try:
            self._pool.submit(ended.set)
        except RuntimeError:
            return True
        return ended.wait(timeout_s)

    def close(self) -> None:
        """Drop what is queued and wait for the order being recorded (one store call:
        the store bounds it), so the store can be closed after."""
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _record(self, todo: Sequence[tuple[Order, float]]) -> None:
        try:
            for order, at in todo:
                if self._breaker.is_open or self._closed.is_set():
                    return
                self._store.record_and_read(observe(order, self._indexer, at), ())
        except (UnavailableError, TimeoutError):
            return  # the store is away: a later retry tries again
        except Exception as e:  # a closed store at shutdown, or a bug: never the order
            _log.warning(
                "catching up an order's features failed",
                extra={"fields": {"error_type": type(e).__name__}},
            )
        finally:
            self._done(len(todo))

    def _done(self, n: int) -> None:
        with self._lock:
            self._queued -= n
