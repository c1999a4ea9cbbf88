"""CircuitBreaker: opens on failures in a row or a failure rate, probes once when its open
time is over, closes on success; an outage is told once, however often it re-opens."""

from __future__ import annotations

import logging
import random
import threading

import pytest

from riskd.domain.clock import FakeClock
from riskd.engine.breaker import BreakerPolicy, CircuitBreaker, OutageLog

WINDOW_S = BreakerPolicy().window_s


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(FakeClock(0.0), BreakerPolicy(failures=3, open_s=1.0))
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
    b = CircuitBreaker(clock, BreakerPolicy(failures=1, open_s=1.0))
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
    b = CircuitBreaker(clock, BreakerPolicy(failures=1, open_s=1.0))
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
    b = CircuitBreaker(clock, BreakerPolicy(failures=1, open_s=1.0))
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


def test_an_outage_answered_within_the_quiet_time_ends_at_the_first_read_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The decision log's writer commits (``up``) and nothing else comes: the metric's
    next read past the quiet time tells the end; a refusal since forgets that success."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    outage = OutageLog("evidence_queue", clock, quiet_s=1.0)
    outage.down()
    clock.advance(0.5)
    outage.up()  # room again, half a second after the refusal: still the same outage
    assert outage.outage
    clock.advance(0.5)
    assert not outage.outage  # read a second after the refusal: over, told once
    outage.down()
    clock.advance(0.5)
    outage.up()
    outage.down()  # refused again: the success before it does not end this one
    clock.advance(1.0)
    assert outage.outage
    said = [r.levelname for r in caplog.records]
    assert said == ["WARNING", "INFO", "WARNING"]


def test_an_outage_told_at_start_ends_in_the_log_without_the_circuit_opening(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: a dependency down at start (``down``) whose circuit never opened came back
    with no "answers again"; now its first answer ends the outage, once, and the circuit
    opening during it does not warn a second time."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=2, open_s=1.0), name="features")
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
    clock.advance(WINDOW_S)  # closed a whole window since: over
    b.success()
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("INFO", "dependency answers again")] * 2


def test_a_call_the_breaker_does_not_judge_ends_only_an_outage_of_a_closed_circuit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=1, open_s=1.0), name="features")
    b.failure()  # open: only its probe may close it
    b.answered()
    assert b.outage and b.is_open
    clock.advance(1.0)
    assert b.allow()
    b.success()
    clock.advance(WINDOW_S)
    b.answered()  # closed a whole window: the outage is over
    assert not b.outage
    b.down()
    b.answered()  # closed circuit, outage told at start: ended
    b.answered()
    assert not b.outage
    said = [r.levelname for r in caplog.records]
    assert said == ["WARNING", "INFO", "INFO"]


def _calls(b: CircuitBreaker, clock: FakeClock, pattern: str, every_s: float = 0.01) -> int:
    """Make one call per character (``x`` fails, ``.`` answers) ``every_s`` apart, each
    only if the breaker allows it: the calls refused (answered degraded at once)."""
    refused = 0
    for c in pattern:
        if not b.allow():
            refused += 1
        elif c == "x":
            b.failure(TimeoutError())
        else:
            b.success()
        clock.advance(every_s)
    return refused


def test_a_dependency_that_misses_now_and_then_keeps_its_circuit_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: 30 % of Redis's replies late (each call lost), the rest in time, opened the
    circuit 11 times in 20 s (3 failures in a row are common at 100 calls a second) and
    answered 86 % of the orders degraded; the calls that would have been answered are
    answered now, and nothing is logged."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, name="features")
    rng = random.Random(7)
    pattern = "".join("x" if rng.random() < 0.3 else "." for _ in range(2000))  # 20 s
    assert "xxxx" in pattern  # runs that opened the old circuit
    assert _calls(b, clock, pattern) == 0
    assert not b.outage and caplog.records == []


def test_a_dead_dependency_opens_the_circuit_after_a_few_calls_however_healthy_before() -> None:
    clock = FakeClock(0.0)
    policy = BreakerPolicy()
    b = CircuitBreaker(clock, policy)
    _calls(b, clock, "." * 500)  # a window full of answers
    assert _calls(b, clock, "x" * policy.failures) == 0
    assert b.is_open and not b.allow()  # the next calls are answered at once


def test_a_dependency_failing_most_calls_opens_the_circuit_by_its_failure_rate() -> None:
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=10, failure_rate=0.5, min_calls=20))
    assert _calls(b, clock, "x.x" * 6) == 0  # 12 of 18: too few calls to judge
    assert not b.is_open
    _calls(b, clock, ".x")  # 13 of 20
    assert b.is_open
    # a window's old calls expire: the same rate spread over more than a window does not
    clock.advance(10.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=10, min_calls=20, window_s=1.0))
    assert _calls(b, clock, "xx." * 40, every_s=0.2) == 0
    assert not b.is_open


def test_reopenings_back_off_and_are_one_outage_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dependency that answers its probe, then fails again: the circuit opens for 1, 2,
    4 s...; one warning, and one "answers again" once it stayed closed a whole window."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    policy = BreakerPolicy(failures=3, open_s=1.0, open_max_s=4.0, window_s=5.0)
    b = CircuitBreaker(clock, policy, name="features")
    open_for = []
    for _ in range(4):
        _calls(b, clock, "xxx")
        opened = clock.monotonic()
        while not b.allow():
            clock.advance(0.01)
        open_for.append(round(clock.monotonic() - opened))
        b.success()  # the probe answers
    assert open_for == [1, 2, 4, 4]
    assert b.outage  # closed less than a window ago
    _calls(b, clock, "." * 499)  # 4.99 s
    assert b.outage
    _calls(b, clock, "..")
    assert not b.outage
    _calls(b, clock, "xxx")  # a new outage: told, and open for open_s again
    clock.advance(1.0)
    assert b.allow()
    said = [r.levelname for r in caplog.records]
    assert said == ["WARNING", "INFO", "WARNING"]


def test_a_failed_probe_keeps_the_open_time() -> None:
    """A dead dependency is probed every ``open_s``: its return is seen at once."""
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=1, open_s=1.0))
    b.failure()
    for _ in range(5):
        clock.advance(1.0)
        assert b.allow()
        b.failure()
    clock.advance(1.0)
    assert b.allow()


def test_an_outage_over_with_no_call_since_is_told_by_a_read_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No request after the probe closed the circuit: a scrape of the metric (``outage``)
    tells the end, a window later; a failure after it tells it before the next warning."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=1, window_s=5.0), name="features")
    b.failure()
    clock.advance(1.0)
    assert b.allow()
    b.success()
    clock.advance(5.0)
    assert not b.outage
    b.failure()
    clock.advance(1.0)
    assert b.allow()
    b.success()
    clock.advance(60.0)
    b.failure()  # no read of it since it closed: the end is told first
    said = [r.levelname for r in caplog.records]
    assert said == ["WARNING", "INFO", "WARNING", "INFO", "WARNING"]


def test_a_window_failing_at_exactly_the_failure_rate_opens_the_circuit() -> None:
    """ "At least ``failure_rate``": 10 failures of 20 calls open it at 0.5."""
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=10, failure_rate=0.5, min_calls=20))
    _calls(b, clock, ".x" * 9 + ".")  # 19 calls, 9 failed: too few to judge
    assert not b.is_open
    _calls(b, clock, "x")  # 20 calls, 10 failed
    assert b.is_open


def test_a_failed_probe_after_a_reopening_keeps_the_backed_off_open_time() -> None:
    """A probe that fails opens the circuit again for the open time reached (2 s after one
    re-opening), not ``open_s``: the back-off is not undone by the dependency failing."""
    clock = FakeClock(0.0)
    b = CircuitBreaker(clock, BreakerPolicy(failures=1, open_s=1.0, open_max_s=8.0))
    b.failure()  # open for 1 s
    clock.advance(1.0)
    assert b.allow()
    b.success()  # the probe answers: closed
    b.failure()  # open again within the outage: 2 s
    clock.advance(2.0)
    assert b.allow()
    b.failure()  # the probe fails: open for 2 s again
    clock.advance(1.0)
    assert not b.allow()
    clock.advance(1.0)
    assert b.allow()


def test_a_circuit_closed_by_its_probe_starts_with_an_empty_window() -> None:
    """The calls that opened it by its failure rate are not held against it again: one
    failure right after the probe answered does not open it again."""
    clock = FakeClock(0.0)
    b = CircuitBreaker(
        clock, BreakerPolicy(failures=10, failure_rate=0.5, min_calls=20, open_s=1.0)
    )
    _calls(b, clock, "x." * 9 + "xx")  # 20 calls, 11 failed
    assert b.is_open
    clock.advance(1.0)
    assert b.allow()
    b.success()
    b.failure()
    assert not b.is_open


def test_calls_of_a_bucket_that_left_the_window_count_no_more() -> None:
    """The window slides a bucket at a time; a bucket's calls leave it a window later even
    when no call fell in the buckets between."""
    clock = FakeClock(0.0)
    policy = BreakerPolicy(failures=100, failure_rate=0.5, min_calls=20, window_s=1.0)
    b = CircuitBreaker(clock, policy)
    _calls(b, clock, "x" * 15, every_s=0.001)  # the window's first bucket
    clock.advance(0.95 - clock.monotonic())
    b.success()  # its last bucket
    clock.advance(0.1)  # the first bucket has left the window
    _calls(b, clock, "xxxx", every_s=0.001)
    assert not b.is_open  # 5 calls in the window: too few to judge


def test_failures_spread_over_the_window_open_the_circuit_by_its_failure_rate() -> None:
    """A dependency failing two calls in three at a steady pace: the failures of every
    bucket in the window count, not only the current bucket's."""
    clock = FakeClock(0.0)
    policy = BreakerPolicy(failures=100, failure_rate=0.5, min_calls=20, window_s=1.0)
    b = CircuitBreaker(clock, policy)
    _calls(b, clock, "xx." * 7, every_s=0.04)  # 21 calls over 0.84 s, 14 failed
    assert b.is_open
