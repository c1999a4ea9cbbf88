"""CircuitBreaker: opens after failures, probes once after the cooldown, closes on success."""

from __future__ import annotations

import logging
import threading

import pytest

from riskd.domain.clock import FakeClock
from riskd.engine.breaker import CircuitBreaker, OutageLog


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


def test_breaker_released_probe_goes_to_the_next_caller_without_reopening() -> None:
    """A probe whose caller never asked the dependency (its own time ran out) says
    nothing: the breaker stays open, no new cooldown starts, the next caller probes."""
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, failures=1, cooldown_s=1.0)
    b.failure()
    clock.advance(1.0)
    assert b.allow() and not b.allow()
    b.release()
    assert b.is_open and b.allow()  # at once: no cooldown was started again
    b.success()
    assert not b.is_open


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    outage = OutageLog("evidence_queue", clock, quiet_s=1.0)
    outage.up()  # nothing was down: nothing to say
    for _ in range(3):  # a queue about full: refusals and successes in turn, for 3 s
        outage.down(KeyError("buyer 13800000000"))  # a foreign error: its type, not its text
        clock.advance(0.5)
        outage.up()
        clock.advance(0.5)
    outage.up()  # a second with no refusal: the outage is over
    outage.up()
    outage.down()
    said = [(r.levelname, getattr(r, "fields", {}).get("error")) for r in caplog.records]
    assert said == [("WARNING", "KeyError"), ("INFO", None), ("WARNING", "")]


def test_an_outage_told_at_start_ends_in_the_log_without_the_circuit_opening(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: a dependency down at start (``down``) whose circuit never opened came back
    with no "answers again"; now its first answer ends the outage, once, and the circuit
    opening during it does not warn a second time."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, failures=2, cooldown_s=1.0, name="features")
    b.down()
    assert b.outage and b.allow() and not b.is_open  # calls still ask the dependency
    b.failure()  # one failure: the circuit stays closed
    b.success()
    b.success()
    assert not b.outage
    b.down()
    b.failure(), b.failure()  # the circuit opens during the outage told at start
    assert b.is_open and b.outage
    clock.advance(1.0)
    assert b.allow()
    b.success()
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("INFO", "dependency answers again")] * 2


def test_a_call_the_breaker_does_not_judge_ends_only_an_outage_of_a_closed_circuit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, failures=1, cooldown_s=1.0, name="features")
    b.failure()  # open: only its probe may close it
    b.answered()
    assert b.outage and b.is_open
    clock.advance(1.0)
    assert b.allow()
    b.success()
    b.down()
    b.answered()  # closed circuit, outage told at start: ended
    b.answered()
    assert not b.outage
    said = [r.levelname for r in caplog.records]
    assert said == ["WARNING", "INFO", "INFO"]
