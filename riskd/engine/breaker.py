"""A small circuit breaker, so a dead dependency does not cost every request its full timeout.

Closed: calls go through; ``failures`` failures in a row open it. Open: calls
are refused (the scorer answers degraded at once) for ``cooldown_s``. Then
one probe call is let through (half-open): success closes it, failure opens it
for another cooldown. Nothing is sticky: the first successful probe after the
dependency returns restores normal service.

>>> from riskd.domain.clock import FakeClock
>>> clock = FakeClock(0.0)
>>> b = CircuitBreaker(clock, failures=2, cooldown_s=1.0)
>>> b.failure(); b.failure(); b.allow()
False
>>> clock.advance(1.0); b.allow(), b.allow()
(True, False)
>>> b.success(); b.allow()
True
"""

from __future__ import annotations

import threading

from riskd.domain.clock import Clock


class CircuitBreaker:
    """Thread-safe; time from ``clock.monotonic()``."""

    def __init__(self, clock: Clock, *, failures: int = 3, cooldown_s: float = 1.0) -> None:
        self._clock = clock
        self._threshold = max(1, failures)
        self._cooldown = cooldown_s
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until: float | None = None  # None: closed
        self._probing = False

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
            self._failures = 0
            self._open_until = None
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self._threshold:
                self._open_until = self._clock.monotonic() + self._cooldown
            self._probing = False
