"""A small circuit breaker, so a dead dependency does not cost every request its full timeout.

Closed: calls go through; ``failures`` failures in a row open it. Open: calls
are refused (the scorer answers degraded at once) for ``cooldown_s``. Then
one probe call is let through (half-open): success closes it, failure opens it
for another cooldown, and a call that ends with no verdict on the dependency
(``release``: its caller's own time ran out before it asked) gives the probe
back to the next caller. Nothing is sticky: the first successful probe after the
dependency returns restores normal service. A named breaker logs when it opens (a
warning with the error: riskd's own message, else the exception's type, never
its text, which may quote data) and when it closes again, once each per outage.
An outage seen before any call (``down``: the dependency did not answer at start)
leaves the circuit closed but is one all the same: its end is logged by the first
call that answers (review: a Redis down at start whose circuit never opened came
back unannounced), and the circuit opening meanwhile does not warn again.
``outage`` is what the log says now (a metric reads it).
``OutageLog`` logs the same two lines for a dependency refused without a breaker
(the decision log's full queue).

>>> from riskd.domain.clock import FakeClock
>>> clock = FakeClock(0.0)
>>> b = CircuitBreaker(clock, failures=2, cooldown_s=1.0)
>>> b.failure(); b.failure(); b.allow()
False
>>> clock.advance(1.0); b.allow(), b.allow()
(True, False)
>>> b.success(); b.allow()
True
>>> b.down(); b.outage, b.allow()
(True, True)
>>> b.answered(); b.outage
False
"""

from __future__ import annotations

import logging
import threading

from riskd.domain.clock import Clock
from riskd.errors import RiskdError

log = logging.getLogger("riskd.engine.breaker")
UNAVAILABLE = "dependency unavailable: answering degraded until it answers again"
ANSWERS_AGAIN = "dependency answers again"


class CircuitBreaker:
    """Thread-safe; time from ``clock.monotonic()``."""

    def __init__(
        self, clock: Clock, *, failures: int = 3, cooldown_s: float = 1.0, name: str = ""
    ) -> None:
        self._clock = clock
        self._name = name  # the dependency, for the log; unnamed: silent
        self._threshold = max(1, failures)
        self._cooldown = cooldown_s
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until: float | None = None  # None: closed
        self._probing = False
        # an outage logged as begun (the circuit opened, or ``down``) and not yet as ended
        self._outage = False

    @property
    def outage(self) -> bool:
        """Whether an outage is on, as the log tells it: from its warning (or ``down``)
        to ``ANSWERS_AGAIN``. One attribute read."""
        return self._outage

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one caller gets True."""
        with self._lock:
            if self._open_until is None:
                return True
            if self._probing or self._clock.monotonic() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        with self._lock:
            ended, self._outage = self._outage, False
            self._failures = 0
            self._open_until = None
            self._probing = False
        if ended and self._name:
            log.info(ANSWERS_AGAIN, extra={"fields": {"dependency": self._name}})

    def down(self) -> None:
        """An outage seen outside any call (the dependency did not answer at start; the
        caller says so in the log): the circuit stays closed, calls go on asking, and the
        first that answers (``success``, ``answered``) logs the end."""
        with self._lock:
            self._outage = True

    def answered(self) -> None:
        """A call the breaker does not judge answered (the catch-up's, with the circuit
        closed): it ends an outage of ``down``'s, as ``success`` would (with no requests,
        the catch-up is all that asks); nothing else changes (the failures in a row stay)."""
        if not self._outage:
            return
        with self._lock:
            ended = self._outage and self._open_until is None
            if ended:
                self._outage = False
        if ended and self._name:
            log.info(ANSWERS_AGAIN, extra={"fields": {"dependency": self._name}})

    def release(self) -> None:
        """A call let through says nothing of the dependency (it never asked it): a
        half-open probe is given back, for the next caller; nothing else changes."""
        with self._lock:
            self._probing = False

    def failure(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self._threshold:
                self._open_until = self._clock.monotonic() + self._cooldown
            self._probing = False
            # the circuit open while no outage is told (one of ``down``'s is told already)
            opened = self._open_until is not None and not self._outage
            self._outage = self._outage or opened
        if opened and self._name:
            fields = {"dependency": self._name, "error": _said(error)}
            log.warning(UNAVAILABLE, extra={"fields": fields})


class OutageLog:
    """A dependency's outage in the log: a warning at its first refusal (with the error, as
    ``CircuitBreaker``'s), an info line at the first success once no refusal has come for
    ``quiet_s``; nothing for the refusals and successes between (the metrics count each), so
    a queue that stays about full is one outage, not one per slot freed. Thread-safe; ``up``
    is one attribute read while there is no outage (it is on the request path).
    """

    def __init__(self, name: str, clock: Clock, *, quiet_s: float = 1.0) -> None:
        self._name = name
        self._clock = clock
        self._quiet = quiet_s
        self._lock = threading.Lock()
        self._down = False
        self._last_refusal = 0.0

    @property
    def outage(self) -> bool:
        """Whether an outage is on, as the log tells it (``CircuitBreaker.outage``)."""
        return self._down

    def down(self, error: BaseException | None = None) -> None:
        with self._lock:
            first, self._down = not self._down, True
            self._last_refusal = self._clock.monotonic()
        if first:
            fields = {"dependency": self._name, "error": _said(error)}
            log.warning(UNAVAILABLE, extra={"fields": fields})

    def up(self) -> None:
        if not self._down:
            return
        with self._lock:
            ended = self._down and self._clock.monotonic() - self._last_refusal >= self._quiet
            if ended:
                self._down = False
        if ended:
            log.info(ANSWERS_AGAIN, extra={"fields": {"dependency": self._name}})


def _said(error: BaseException | None) -> str:
    if error is None:
        return ""
    return str(error) if isinstance(error, RiskdError) else type(error).__name__
