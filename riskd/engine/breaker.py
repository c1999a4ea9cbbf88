"""A circuit breaker, so a dead dependency does not cost every request its full timeout, and
a flaky one still answers every call it can.

Closed: calls go through and each outcome is counted in a sliding window (``window_s``,
in ten buckets). The circuit opens when ``failures`` calls in a row failed (a dead
dependency: it opens after a handful of calls, however healthy the window was), or when
at least ``failure_rate`` of at least ``min_calls`` calls in the window failed (a
dependency that fails more often than it answers). A dependency that misses now and
then (review: 30 % of replies late, each a lost call) stays closed: its other calls are
real answers, and each miss is bounded by the store's own timeout anyway.

Open: calls are refused (the scorer answers degraded at once) for the open time. Then
one probe call is let through (half-open): success closes it (with an empty window),
failure opens it again for the same time, and a call that ends with no verdict on the
dependency (``release``: its caller's own time ran out before it asked) gives the probe
back to the next caller. The open time is ``open_s`` at an outage's first opening and
doubles, up to ``open_max_s``, each time the circuit opens again from closed within the
same outage (a dependency that answers its probe, then fails again: back-off); a failed
probe keeps it (a dead dependency is probed every ``open_s``, so its return is seen at
once). Nothing is sticky: recovery needs no operator.

A named breaker logs an outage once: a warning when it begins (the circuit opens, with
the error: riskd's own message, else the exception's type, never its text, which may
quote data) and an info line when it is over: once the circuit has stayed closed for a
whole window since it last closed (a re-opening before that is the same outage, told
nothing: review, 11 outages and 21 lines in 20 s of a flaky Redis). The end is told by the
first call after that window, or, when none comes, by a read of ``outage`` (a scrape of
the metric). An outage seen before any call (``down``: the dependency did not answer at
start) leaves the circuit closed but is one all the same: its end is logged by the first
call that answers (review: a Redis down at start whose circuit never opened came back
unannounced), and the circuit opening meanwhile does not warn again. ``outage`` is what
the log says now (a metric reads it). ``OutageLog`` logs the same two lines for a
dependency refused without a breaker (the decision log's full queue).

>>> from riskd.domain.clock import FakeClock
>>> clock = FakeClock(0.0)
>>> b = CircuitBreaker(clock, BreakerPolicy(failures=2, open_s=1.0))
>>> b.failure(); b.failure(); b.allow()
False
>>> clock.advance(1.0); b.allow(), b.allow()
(True, False)
>>> b.success(); b.allow(), b.outage
(True, True)
>>> clock.advance(BreakerPolicy().window_s); b.success(); b.outage
False
>>> b.down(); b.outage, b.allow()
(True, True)
>>> b.answered(); b.outage
False
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

from riskd.domain.clock import Clock
from riskd.errors import RiskdError

log = logging.getLogger("riskd.engine.breaker")
UNAVAILABLE = "dependency unavailable: answering degraded until it answers again"
ANSWERS_AGAIN = "dependency answers again"
BUCKETS = 10  # the window slides by a tenth of itself


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a circuit opens, and for how long (README: the ``breaker_*`` settings).

    Attributes:
        failures: failed calls in a row that open it (a dead dependency).
        failure_rate: share of the window's calls failed that opens it (0 < rate <= 1)...
        min_calls: ...once the window holds at least this many calls.
        window_s: the window; also how long a circuit closed again must stay closed for
            its outage to be over.
        open_s: how long it stays open at an outage's first opening (and after a
            failed probe, at the open time reached).
        open_max_s: the most it stays open: each opening from closed in one outage
            doubles the open time up to this.
    """

    failures: int = 15
    failure_rate: float = 0.5
    min_calls: int = 100
    window_s: float = 5.0
    open_s: float = 1.0
    open_max_s: float = 10.0


class _Window:
    """Calls and failures in the last ``span_s``: the current bucket's counts, and a ring
    of the ``BUCKETS`` - 1 before it (not thread-safe). A success in the current bucket
    (the request path) is a comparison and an increment: ``now < end``, ``calls_now += 1``.
    """

    __slots__ = ("_past_calls", "_past_fails", "_slot", "_width", "calls_now", "end", "fails_now")

    def __init__(self, span_s: float) -> None:
        self._width = span_s / BUCKETS
        self._past_calls = [0] * BUCKETS  # by bucket number % BUCKETS; the current one's is 0
        self._past_fails = [0] * BUCKETS
        self._slot = 0  # the current bucket's number (time // width)
        self.end = -math.inf  # when the current bucket ends: the first call starts one
        self.calls_now = 0
        self.fails_now = 0

    @property
    def calls(self) -> int:
        return sum(self._past_calls) + self.calls_now

    @property
    def fails(self) -> int:
        return sum(self._past_fails) + self.fails_now

    def add(self, now: float, failed: bool) -> None:
        if now >= self.end:
            self._roll(now)
        self.calls_now += 1
        self.fails_now += failed

    def clear(self) -> None:
        self._past_calls = [0] * BUCKETS
        self._past_fails = [0] * BUCKETS
        self.calls_now = self.fails_now = 0

    def _roll(self, now: float) -> None:
        """Start the bucket ``now`` falls in: the current one joins the ring, and the
        buckets older than the window leave it."""
        slot = int(now // self._width)
        if slot - self._slot >= BUCKETS:  # the current one too is out of the window
            self.clear()
        else:
            i = self._slot % BUCKETS
            self._past_calls[i], self._past_fails[i] = self.calls_now, self.fails_now
            for s in range(self._slot + 1, slot + 1):
                self._past_calls[s % BUCKETS] = self._past_fails[s % BUCKETS] = 0
            self.calls_now = self.fails_now = 0
        self._slot = slot
        self.end = (slot + 1) * self._width


class CircuitBreaker:
    """Thread-safe; time from ``clock.monotonic()``. ``allow`` and ``success`` are on every
    request's path: with the circuit closed, ``allow`` is one attribute read."""

    def __init__(
        self, clock: Clock, policy: BreakerPolicy | None = None, *, name: str = ""
    ) -> None:
        self._clock = clock
        self._policy = policy = policy or BreakerPolicy()
        self._name = name  # the dependency, for the log; unnamed: silent
        self._lock = threading.Lock()
        self._window = _Window(policy.window_s)
        self._streak = 0  # failures in a row
        self._open_until: float | None = None  # None: closed
        self._open_for = policy.open_s  # the open time now (backs off within an outage)
        self._probing = False
        # an outage logged as begun (the circuit opened, or ``down``) and not yet as ended
        self._outage = False
        self._closed_at: float | None = None  # when its circuit last closed; None: never opened

    @property
    def outage(self) -> bool:
        """Whether an outage is on, as the log tells it: from its warning (or ``down``)
        to ``ANSWERS_AGAIN``. One attribute read while there is none; during one, a read
        a window after the circuit closed again ends it (a scrape of the metric tells it
        when no call comes)."""
        if not self._outage:
            return False
        self._settle()
        return self._outage

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one caller gets True."""
        if self._open_until is None:  # closed: no lock (a call racing an opening asks)
            return True
        with self._lock:
            if self._open_until is None:
                return True
            if self._probing or self._clock.monotonic() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        now = self._clock.monotonic()
        with self._lock:
            self._streak = 0
            window = self._window
            if self._open_until is not None:  # the probe (or a call let through before
                self._close(now)  # it opened) answered
            elif now < window.end:
                window.calls_now += 1
            else:
                window.add(now, False)
            if not self._outage:
                return
            ended = self._over(now, answered=True)
        if ended:
            self._tell_end()

    def down(self) -> None:
        """An outage seen outside any call (the dependency did not answer at start; the
        caller says so in the log): the circuit stays closed, calls go on asking, and the
        first that answers (``success``, ``answered``) logs the end."""
        with self._lock:
            self._outage = True

    def answered(self) -> None:
        """A call the breaker does not judge answered (the catch-up's, with the circuit
        closed): it ends an outage as ``success`` would, once the circuit is closed (with
        no requests, the catch-up is all that asks); nothing else changes (the failures in
        a row and the window stay)."""
        if self._outage:
            self._settle(answered=True)

    def release(self) -> None:
        """A call let through says nothing of the dependency (it never asked it): a
        half-open probe is given back, for the next caller; nothing else changes."""
        with self._lock:
            self._probing = False

    def failure(self, error: BaseException | None = None) -> None:
        now = self._clock.monotonic()
        with self._lock:
            self._streak += 1
            # an outage over, not yet told (no answer since): told before the next one
            ended = self._outage and self._over(now)
            if self._open_until is not None:  # the probe failed: open again, same time
                self._open_until = now + self._open_for
            elif self._trips(now):
                self._open(now)
            self._probing = False
            # the circuit open while no outage is told (one of ``down``'s is told already)
            opened = self._open_until is not None and not self._outage
            self._outage = self._outage or opened
        if ended:
            self._tell_end()
        if opened and self._name:
            fields = {"dependency": self._name, "error": _said(error)}
            log.warning(UNAVAILABLE, extra={"fields": fields})

    # -- under the lock ------------------------------------------------------------

    def _trips(self, now: float) -> bool:
        """Count a failure of the closed circuit: does it open it?"""
        window, policy = self._window, self._policy
        window.add(now, True)
        if self._streak >= policy.failures:
            return True
        return window.calls >= policy.min_calls and (
            window.fails >= policy.failure_rate * window.calls
        )

    def _open(self, now: float) -> None:
        """Open from closed: a re-opening within the outage doubles the open time."""
        if self._outage and self._closed_at is not None:
            self._open_for = min(self._open_for * 2, self._policy.open_max_s)
        else:
            self._open_for = self._policy.open_s
        self._open_until = now + self._open_for

    def _close(self, now: float) -> None:
        self._open_until = None
        self._probing = False
        self._window.clear()  # the failures that opened it are not held against it again
        self._closed_at = now

    def _over(self, now: float, *, answered: bool = False) -> bool:
        """Is the outage over now (ends it: the caller tells)? The circuit closed again a
        whole window ago, or never opened in it and a call ``answered``."""
        closed_at, closed = self._closed_at, self._open_until is None
        if closed_at is None:
            over = closed and answered
        else:
            over = closed and now - closed_at >= self._policy.window_s
        if over:
            self._outage = False
            self._closed_at = None
            self._open_for = self._policy.open_s
        return over

    # -- telling ---------------------------------------------------------------------

    def _settle(self, *, answered: bool = False) -> None:
        now = self._clock.monotonic()
        with self._lock:
            ended = self._outage and self._over(now, answered=answered)
        if ended:
            self._tell_end()

    def _tell_end(self) -> None:
        if self._name:
            log.info(ANSWERS_AGAIN, extra={"fields": {"dependency": self._name}})


class OutageLog:
    """A dependency's outage in the log: a warning at its first refusal (with the error, as
    ``CircuitBreaker``'s), an info line at the first success once no refusal has come for
    ``quiet_s``; nothing for the refusals and successes between (the metrics count each), so
    a queue that stays about full is one outage, not one per slot freed. A success that
    came sooner is remembered: when nothing else comes, the first read of ``outage`` once
    the quiet time is over tells the end (a scrape of the metric; review: the decision
    log's writer committed again, no request came, and the outage never ended).
    Thread-safe; ``up`` is one attribute read while there is no outage (it is on the
    request path).
    """

    def __init__(self, name: str, clock: Clock, *, quiet_s: float = 1.0) -> None:
        self._name = name
        self._clock = clock
        self._quiet = quiet_s
        self._lock = threading.Lock()
        self._down = False
        self._answered = False  # a success since the last refusal
        self._last_refusal = 0.0

    @property
    def outage(self) -> bool:
        """Whether an outage is on, as the log tells it (``CircuitBreaker.outage``)."""
        if self._down and self._answered:
            self._settle()
        return self._down

    def down(self, error: BaseException | None = None) -> None:
        with self._lock:
            first, self._down = not self._down, True
            self._answered = False
            self._last_refusal = self._clock.monotonic()
        if first:
            fields = {"dependency": self._name, "error": _said(error)}
            log.warning(UNAVAILABLE, extra={"fields": fields})

    def up(self) -> None:
        """A success: a request's, or the dependency's own (the decision log's writer
        committed: ``Scorer`` hooks it so)."""
        if not self._down:
            return
        with self._lock:
            self._answered = True
        self._settle()

    def _settle(self) -> None:
        """End the outage if a success came since the last refusal, ``quiet_s`` ago."""
        with self._lock:
            quiet = self._clock.monotonic() - self._last_refusal >= self._quiet
            ended = self._down and self._answered and quiet
            if ended:
                self._down = False
        if ended:
            log.info(ANSWERS_AGAIN, extra={"fields": {"dependency": self._name}})


def _said(error: BaseException | None) -> str:
    if error is None:
        return ""
    return str(error) if isinstance(error, RiskdError) else type(error).__name__
