"""Per-caller counters the interceptor keeps: rate-limit buckets, stream slots, refusal logs.

Where it sits: ``AuthInterceptor`` (``riskd.service.auth``) holds one of each, shared by
every call: ``TokenBuckets`` (rate limits), ``StreamSlots`` (streams open at once; the
servicers' own call slots are ``riskd.service.slots``), and ``UnloggedRefusals`` and
``ExhaustedRefusals``, which keep its log of refused calls to a bounded rate. Each is
thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from riskd.domain.clock import Clock
from riskd.service.callers import RateLimit

# the interceptor's logger: every line about refused calls comes from riskd.service.auth
log = logging.getLogger("riskd.service.auth")


class TokenBuckets:
    """One token bucket per caller; thread-safe; bounded number of callers remembered."""

    def __init__(self, clock: Clock, *, max_callers: int = 10_000) -> None:
        self._clock = clock
        self._max = max_callers
        self._buckets: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def take(self, caller: str, limit: RateLimit, cost: int = 1) -> bool:
        """Spend ``cost`` tokens of ``caller``'s bucket; False (nothing spent) when it holds
        fewer. A cost above ``limit.burst`` could never be paid: callers cap it."""
        with self._lock:
            bucket = self._refill(caller, limit)
            if bucket[0] < cost:
                return False
            bucket[0] -= cost
            return True

    def holds(self, caller: str, limit: RateLimit, cost: int = 1) -> bool:
        """Whether ``caller``'s bucket holds ``cost`` tokens now (nothing spent)."""
        with self._lock:
            return self._refill(caller, limit)[0] >= cost

    def _refill(self, caller: str, limit: RateLimit) -> list[float]:
        now = self._clock.monotonic()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._prune()
            bucket = self._buckets[caller] = [float(limit.burst), now]
        bucket[0] = min(float(limit.burst), bucket[0] + (now - bucket[1]) * limit.rate)
        bucket[1] = now
        return bucket

    def _prune(self) -> None:
        # Forget the least recently seen half; a forgotten caller starts with a full bucket,
        # which is what an idle caller would have anyway.
        oldest = sorted(self._buckets, key=lambda c: self._buckets[c][1])
        for caller in oldest[: len(oldest) // 2 + 1]:
            del self._buckets[caller]


class StreamSlots:
    """Streaming calls open at once: at most ``per_peer`` from one peer host, and at most
    ``holding`` in total of those that hold an RPC thread while open (reflection; a health
    ``Watch`` does not), so streams never take every RPC thread from unary calls."""

    def __init__(self, *, holding: int, per_peer: int) -> None:
        self._max_holding = holding
        self._per_peer = per_peer
        self._holding = 0
        self._peers: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, peer: str, *, holds_thread: bool) -> Callable[[], None] | None:
        """A slot for one stream (call the result once it ends), or None when full."""
        with self._lock:
            if self._peers.get(peer, 0) >= self._per_peer:
                return None
            if holds_thread and self._holding >= self._max_holding:
                return None
            self._peers[peer] = self._peers.get(peer, 0) + 1
            self._holding += holds_thread
        closed = threading.Event()

        def close() -> None:
            with self._lock:
                if closed.is_set():
                    return
                closed.set()
                self._holding -= holds_thread
                self._peers[peer] -= 1
                if not self._peers[peer]:
                    del self._peers[peer]

        return close


class UnloggedRefusals:
    """Calls refused by a peer's empty refusal bucket, counted per peer host instead of
    logged one by one (1,000 guesses were 1,000 log lines: review); the peer's next logged
    refusal carries the count. At most ``max_peers`` counts are kept: past that the oldest
    is logged on its own line."""

    def __init__(self, *, max_peers: int = 10_000) -> None:
        self._max = max_peers
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count_one(self, peer: str) -> None:
        evicted = None
        with self._lock:
            if peer not in self._counts and len(self._counts) >= self._max:
                oldest = next(iter(self._counts))
                evicted = oldest, self._counts.pop(oldest)
            self._counts[peer] = self._counts.get(peer, 0) + 1
        if evicted is not None:
            fields = {"principal": evicted[0], "unlogged_refusals": evicted[1]}
            log.warning("calls refused, not logged one by one", extra={"fields": fields})

    def take(self, peer: str) -> int:
        """The count for ``peer`` since its last logged refusal (now zero)."""
        with self._lock:
            return self._counts.pop(peer, 0)


class ExhaustedRefusals:
    """Calls refused because their caller spent its own quota (``RESOURCE_EXHAUSTED``:
    its rate limit, its stream slots), logged at most once per ``interval_s`` per caller:
    ``due_one`` says whether this one is logged, and with how many unlogged since the
    caller's last line. At most ``max_callers`` are remembered: past that the one logged
    longest ago is forgotten (its count, if any, logged on its own line)."""

    def __init__(self, clock: Clock, *, interval_s: float = 1.0, max_callers: int = 10_000) -> None:
        self._clock = clock
        self._interval = interval_s
        self._max = max_callers
        self._callers: dict[str, tuple[float, int]] = {}  # caller → (last line, unlogged)
        self._lock = threading.Lock()

    def due_one(self, caller: str) -> int | None:
        """None: this refusal is counted, not logged; else log it, with this many unlogged
        refusals of ``caller`` since its last line."""
        now, evicted = self._clock.monotonic(), None
        with self._lock:
            last = self._callers.get(caller)
            if last is not None and now - last[0] < self._interval:
                self._callers[caller] = last[0], last[1] + 1
                return None
            if last is None and len(self._callers) >= self._max:
                oldest = next(iter(self._callers))  # in the order of their last lines
                evicted = oldest, self._callers.pop(oldest)[1]
            self._callers.pop(caller, None)
            self._callers[caller] = now, 0
        if evicted is not None and evicted[1]:
            fields = {"principal": evicted[0], "unlogged_refusals": evicted[1]}
            log.warning("calls refused, not logged one by one", extra={"fields": fields})
        return 0 if last is None else last[1]
