"""CircuitBreaker: opens after failures, probes once after the cooldown, closes on success."""

from __future__ import annotations

import threading

from riskd.domain.clock import FakeClock
from riskd.engine.breaker import CircuitBreaker


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(FakeClock(0.0), failures=3, cooldown_s=1.0)
    b.failure()
    b.failure()
    b.success()  # a success in between resets the count
    b.failure()
    b.failure()
    assert b.allow() and not b.is_open
    b.failure()
    assert b.is_open and not b.allow()


def test_breaker_half_open_lets_exactly_one_probe_through() -> None:
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, failures=1, cooldown_s=1.0)
    b.failure()
    clock.advance(1.0)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(b.allow())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def test_breaker_failed_probe_reopens_for_another_cooldown() -> None:
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, failures=1, cooldown_s=1.0)
    b.failure()
    clock.advance(1.0)
    assert b.allow()
    b.failure()
    clock.advance(0.5)
    assert not b.allow()
    clock.advance(0.5)
    assert b.allow()
    b.success()
    assert not b.is_open and b.allow() and b.allow()
