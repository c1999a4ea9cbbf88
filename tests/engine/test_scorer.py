"""Scorer on real rule text: combining results, shadow rules, rule errors, idempotency, batches."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from riskd.domain.clock import FakeClock, SystemClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.shop import ShopState
from riskd.dsl.holder import ProgramHolder
from riskd.engine.breaker import BreakerPolicy
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.flights import Flights
from riskd.engine.keys import observe
from riskd.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidArgumentError,
    UnavailableError,
)
from riskd.features.memory import InProcessFeatureStore
from riskd.features.store import MAX_ORDER_ID_LEN
from riskd.ledger import Book, LedgerShopDirectory
from riskd.pii import BlindIndexer
from riskd.service.metrics import Metrics
from riskd.sql import Database

from .conftest import Rig, make_order

BUYER_1H = FeatureQuery(Agg.COUNT, "buyer", "1h")


def count_buyer_orders(rig: Rig, indexer: BlindIndexer, clock: FakeClock, buyer_id: str) -> int:
    obs = observe(make_order("probe", buyer_id=buyer_id), indexer, clock.now())
    return rig.features.read(obs, [BUYER_1H])[BUYER_1H]


def statuses(rig: Rig, order_id: str) -> dict[str, tuple[str, str]]:
    record = rig.log.get(order_id)
    assert record is not None
    return {r.rule_id: (r.status.name, r.mode.name) for r in record.rules}


def test_scorer_combines_active_hits_and_records_every_result(
    make_rig: Callable[..., Rig], holder: ProgramHolder
) -> None:
    rig = make_rig()
    decision = rig.scorer.score(make_order("o-1", total=60_000, age_days=2))
    assert decision.outcome is Outcome.REVIEW  # big_order; the shadow BLOCK is not enforced
    assert decision.score == 20.0
    assert [(r.rule_id, r.reason_code) for r in decision.reasons] == [("big_order", "BIG_ORDER")]
    assert any("50000" in line for line in decision.reasons[0].explanation)
    assert decision.rules_version == holder.current.version
    assert dict(decision.model_versions) == {} and decision.degraded == ()
    assert statuses(rig, "o-1") == {
        "big_order": ("HIT", "ACTIVE"),
        "buyer_burst": ("NO_HIT", "ACTIVE"),
        "shared_device": ("NO_HIT", "ACTIVE"),
        "new_account_shadow": ("HIT", "SHADOW"),
        "frozen_shop": ("NO_HIT", "ACTIVE"),
        "discount_ratio": ("ERROR", "ACTIVE"),  # the broken rule fails alone
    }
    record = rig.log.get("o-1")
    assert record is not None
    assert dict(record.features) == {"count_per_buyer_1h": 1, "distinct_buyer_per_device_1h": 1}
    assert record.request["buyer"]["phone"]["masked"] == "139****4321"


def test_scorer_small_order_is_allowed_with_no_reasons(make_rig: Callable[..., Rig]) -> None:
    decision = make_rig().scorer.score(make_order("o-1"))
    assert (decision.outcome, decision.score, decision.reasons) == (Outcome.ALLOW, 0.0, ())


def test_scorer_velocity_rule_blocks_the_fourth_order_within_the_hour(
    make_rig: Callable[..., Rig], clock: FakeClock
) -> None:
    rig = make_rig()
    outcomes = []
    for i in range(5):
        outcomes.append(rig.scorer.score(make_order(f"o-{i}")).outcome)
        clock.advance(60)
    assert outcomes == [Outcome.ALLOW] * 3 + [Outcome.BLOCK] * 2
    clock.advance(3600)
    assert rig.scorer.score(make_order("o-late")).outcome is Outcome.ALLOW


def test_scorer_retry_returns_the_recorded_decision_and_counts_once(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    first = rig.scorer.score(make_order("o-1"))
    assert not first.replayed
    clock.advance(5)
    replay = replace(first, replayed=True)
    assert rig.scorer.score(make_order("o-1")) == replay  # unflushed: from the log's queue
    rig.log.flush(10)
    assert rig.scorer.score(make_order("o-1")) == replay  # flushed: from SQL
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 1


def test_orders_a_deadline_left_unread_are_counted_after_the_answer_and_once(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    """Review: an order a batch's deadline left unread (answered degraded) was never
    counted in its windows, and its retry only replayed the answer."""
    rig = make_rig()
    orders = [make_order(f"o-{i}") for i in range(3)]
    answered = rig.scorer.score_batch(orders, timeout_s=0.0)
    assert all(d.degraded for d in answered)
    assert rig.scorer.catch_up.wait(5)
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 3
    # the distinct counts too (review: recorded with no queries, a caught-up shop grew in
    # orders and not in buyers or devices, which brushing rules read as one buyer)
    buyers = FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer")
    others = [make_order(f"p-{i}", buyer_id=f"b-{i + 2}") for i in range(3)]
    rig.scorer.score_batch(others, timeout_s=0.0)
    assert rig.scorer.catch_up.wait(5)
    probe = observe(make_order("probe"), indexer, clock.now())
    assert rig.features.read(probe, [buyers]) == {buyers: 4}  # b-1 and b-2..b-4
    clock.advance(5)
    again = rig.scorer.score_batch(orders, timeout_s=1.0)
    assert all(d.replayed for d in again)
    assert rig.scorer.catch_up.wait(5)
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 3
    # counted when they were decided: out of the 1-minute window a minute later
    one_minute = FeatureQuery(Agg.COUNT, "buyer", "1m")
    clock.advance(56)
    obs = observe(make_order("probe"), indexer, clock.now())
    assert rig.features.read(obs, [one_minute, BUYER_1H]) == {one_minute: 0, BUYER_1H: 3}


def test_scorer_refuses_an_order_id_recorded_for_other_content(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    first = rig.scorer.score(make_order("o-1", total=2_500))
    # a cart that changed under the same id must not get the small order's answer
    with pytest.raises(AlreadyExistsError, match=r"order\.order_id: .*other order content"):
        rig.scorer.score(make_order("o-1", total=20_000_000))
    rig.log.flush(10)
    with pytest.raises(AlreadyExistsError):  # from SQL too
        rig.scorer.score(make_order("o-1", total=20_000_000, age_days=1))
    # a batch holding such an order is refused before any of its orders is counted
    with pytest.raises(AlreadyExistsError, match=r"orders\[1\]\.order_id"):
        rig.scorer.score_batch([make_order("o-2"), make_order("o-1", total=9_999)])
    assert rig.log.get("o-2") is None
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 1
    assert rig.scorer.score(make_order("o-1", total=2_500)) == replace(first, replayed=True)


def test_scorer_refuses_one_order_id_twice_in_a_batch_with_other_content(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    batch = [make_order("o-1"), make_order("o-2"), make_order("o-1", shop_id="s-9")]
    with pytest.raises(AlreadyExistsError, match=r"orders\[2\]\.order_id"):
        rig.scorer.score_batch(batch)
    assert rig.log.get("o-1") is None and rig.log.get("o-2") is None
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 0
    # the refused batch left nothing in flight: its orders are scored normally after it
    assert not rig.scorer.score(make_order("o-2"), timeout_s=1.0).degraded
    assert rig.log.get("o-2") is not None


@pytest.mark.parametrize("land_delay", [0.0, 0.05])
def test_a_refusal_for_one_order_is_not_passed_to_callers_of_another(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch, land_delay: float
) -> None:
    """Call A leads o-2 and o-1 (o-1 recorded for other content: A is refused); call B,
    following A's flight of o-2 meanwhile, gets o-2 scored, not A's refusal (also when A
    is descheduled while it gives its flights up: B must not spin on a finished one)."""
    land = Flights.land

    def late_land(flights: Flights, order_id: str, flight: Any) -> None:
        if threading.current_thread().name == "A":
            time.sleep(land_delay)
        land(flights, order_id, flight)

    monkeypatch.setattr(Flights, "land", late_land)
    rig = make_rig()
    rig.scorer.score(make_order("o-1", total=2_500))
    queued = rig.log.queued
    a_looks_up = threading.Event()

    def slow_queued(order_ids: Sequence[str]) -> Any:
        if "o-1" in order_ids:  # A's lookup: let B join o-2's flight first
            a_looks_up.set()
            time.sleep(0.3)
        return queued(order_ids)

    monkeypatch.setattr(rig.log, "queued", slow_queued)
    errors: list[BaseException] = []

    def call_a() -> None:
        try:
            rig.scorer.score_batch([make_order("o-2"), make_order("o-1", total=9_999)])
        except AlreadyExistsError as e:
            errors.append(e)

    a = threading.Thread(target=call_a, name="A")
    a.start()
    assert a_looks_up.wait(5)
    decision = rig.scorer.score(make_order("o-2"), timeout_s=5.0)
    a.join()
    assert len(errors) == 1 and "orders[1]" in str(errors[0])
    assert decision.order_id == "o-2" and not decision.degraded and not decision.replayed
    assert rig.log.get("o-2") is not None


def test_a_full_decision_log_costs_a_batch_one_wait_not_one_per_order(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig()
    calls: list[str] = []

    def full(record: Any, **_: Any) -> None:
        calls.append(record.order_id)
        time.sleep(0.05)  # the log's put timeout, then it gives up
        raise UnavailableError("decision log queue is full")

    monkeypatch.setattr(rig.log, "append", full)
    decisions = rig.scorer.score_batch([make_order(f"o-{i}") for i in range(20)], timeout_s=0.5)
    assert all(d.degraded == ("evidence_queue",) for d in decisions)
    assert all(d.unlogged for d in decisions)  # not in the log, and never will be
    assert calls == ["o-0"]


@contextlib.contextmanager
def _writer_held(db: Database) -> Iterator[None]:
    """Another connection holds the database: the log's writer holds its first item and
    commits nothing, so the queue fills."""
    holder = sqlite3.connect(db.url, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


def test_one_process_logs_what_fits_a_nearly_full_queue(
    make_rig: Callable[..., Rig], db: Database
) -> None:
    """Room for 3 of a batch's 5 decisions: in one process those 3 are logged (nobody else
    records these orders), the other 2 answered unlogged."""
    rig = make_rig(log_options={"queue_size": 4, "max_batch": 1, "put_timeout_s": 0.05})
    with _writer_held(db):
        rig.scorer.score(make_order("o-held"), timeout_s=1.0)
        decisions = rig.scorer.score_batch([make_order(f"o-{i}") for i in range(5)], timeout_s=1.0)
    assert [d.unlogged for d in decisions] == [False, False, False, True, True]
    rig.log.flush(10)
    assert [rig.log.get(f"o-{i}") is not None for i in range(5)] == [True] * 3 + [False] * 2


def test_a_full_decision_log_is_logged_once_and_its_end_too(
    make_rig: Callable[..., Rig], db: Database, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Operators see unrecorded answers in the log, not only in the metric: one warning
    when the queue first refuses, one line when records go in again after a quiet second."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    rig = make_rig(log_options={"queue_size": 2, "max_batch": 1, "put_timeout_s": 0.02})
    with _writer_held(db):
        rig.scorer.score(make_order("o-held"), timeout_s=1.0)
        decisions = rig.scorer.score_batch([make_order(f"o-{i}") for i in range(5)], timeout_s=1.0)
        decisions.append(rig.scorer.score(make_order("o-5"), timeout_s=1.0))
    assert [d.unlogged for d in decisions] == [False] + [True] * 5
    said = [r for r in caplog.records if r.name == "riskd.engine.breaker"]
    lines = [(r.levelname, r.getMessage(), r.fields) for r in said]  # type: ignore[attr-defined]
    assert lines == [
        (
            "WARNING",
            "dependency unavailable: answering degraded until it answers again",
            {"dependency": "evidence_queue", "error": "decision log queue is full"},
        )
    ]
    rig.log.flush(10)
    assert not rig.scorer.score(make_order("o-6"), timeout_s=1.0).unlogged
    said = [r for r in caplog.records if r.name == "riskd.engine.breaker"]
    assert len(said) == 1  # room again, but the queue refused less than a second ago
    clock.advance(1.0)
    assert not rig.scorer.score(make_order("o-7"), timeout_s=1.0).unlogged
    said = [r for r in caplog.records if r.name == "riskd.engine.breaker"]
    assert [(r.levelname, r.getMessage()) for r in said[1:]] == [
        ("INFO", "dependency answers again")
    ]


@pytest.mark.parametrize("held_past_quiet", [False, True], ids=["told-by-a-read", "by-the-commit"])
def test_a_full_queue_s_outage_ends_once_the_writer_commits_with_no_request(
    make_rig: Callable[..., Rig],
    db: Database,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    held_past_quiet: bool,
) -> None:
    """Review: the end of an ``evidence_queue`` outage was told only by the next append
    that found room: with no request after the writer caught up, the log never said
    "answers again" and ``riskd_dependency_unavailable`` stayed 1. Now the writer's commit
    tells it, or, when the queue refused less than a quiet second before, the first read
    of the outage (a scrape, a worker's report) once that second is over."""
    caplog.set_level(logging.INFO, logger="riskd.engine.breaker")
    rig = make_rig(log_options={"queue_size": 2, "max_batch": 1, "put_timeout_s": 0.02})
    with _writer_held(db):
        rig.scorer.score(make_order("o-held"), timeout_s=1.0)
        decisions = rig.scorer.score_batch([make_order(f"o-{i}") for i in range(3)], timeout_s=1.0)
        assert any(d.unlogged for d in decisions)
        assert rig.scorer.unavailable() == ("evidence_queue",)
        if held_past_quiet:
            clock.advance(1.0)  # the database stays held past the quiet second
    rig.log.flush(10)  # the writer commits what was queued; no request comes
    told = [r for r in caplog.records if r.name == "riskd.engine.breaker"]
    ended = [r.getMessage() for r in told if r.levelno == logging.INFO]
    if held_past_quiet:
        assert ended == ["dependency answers again"]  # told by the commit itself
    else:
        assert ended == [] and rig.scorer.unavailable() == ("evidence_queue",)
        clock.advance(1.0)
    assert rig.scorer.unavailable() == ()
    told = [r for r in caplog.records if r.name == "riskd.engine.breaker"]
    assert [(r.levelname, r.getMessage()) for r in told] == [
        ("WARNING", "dependency unavailable: answering degraded until it answers again"),
        ("INFO", "dependency answers again"),
    ]


def test_a_decision_appended_after_a_failed_look_up_is_logged(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    """``evidence`` marks it as for a refused one, but ``unlogged`` tells them apart
    (scoring workers report the unlogged ones: a retry must be scored again)."""
    db = FlakyDatabase(tmp_path / "flaky.db")
    rig = make_rig(database=db)
    db.fail_reads = True
    decision = rig.scorer.score(make_order("o-1"))
    assert decision.degraded == ("evidence",) and not decision.unlogged
    assert rig.log.queued(["o-1"])
    rig.scorer.close()
    rig.log.close()
    db.close()


def test_scorer_32_concurrent_retries_record_one_decision_and_count_once(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    order = make_order("o-race", total=60_000)
    barrier = threading.Barrier(32)
    decisions: list[Decision] = []
    lock = threading.Lock()

    def retry() -> None:
        barrier.wait()
        d = rig.scorer.score(order, timeout_s=5.0)
        with lock:
            decisions.append(d)

    threads = [threading.Thread(target=retry) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(decisions) == 32
    assert all(
        replace(d, replayed=False) == replace(decisions[0], replayed=False) for d in decisions
    )
    assert sum(not d.replayed for d in decisions) == 1  # the leader's; the rest replay it
    rig.log.flush(10)
    assert rig.db.query("SELECT COUNT(*) FROM decision_log")[0][0] == 1
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 1


def test_scorer_after_restart_returns_the_decision_from_the_log(
    make_rig: Callable[..., Rig], db: Database
) -> None:
    first_rig = make_rig()
    first = first_rig.scorer.score(make_order("o-1", total=70_000))
    first_rig.scorer.close()
    # a new process: same database and feature store, fresh scorer and log
    second = make_rig(first_rig.features).scorer.score(make_order("o-1", total=70_000))
    assert second == replace(first, replayed=True)


def test_scorer_batch_scores_in_order_and_answers_duplicates_alike(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    orders = [make_order(f"o-{i}", total=10_000 * (i + 1)) for i in range(6)]
    decisions = rig.scorer.score_batch([*orders, orders[0]], timeout_s=5.0)
    assert [d.order_id for d in decisions] == [*(o.order_id for o in orders), "o-0"]
    assert decisions[-1] == replace(decisions[0], replayed=True)
    assert [d.outcome for d in decisions[:6]] == [
        Outcome.ALLOW,
        Outcome.ALLOW,
        Outcome.ALLOW,
        Outcome.BLOCK,  # the 4th order of b-1 this hour
        Outcome.BLOCK,
        Outcome.BLOCK,
    ]
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 6


def test_scorer_blocks_orders_of_a_shop_the_ledger_froze(
    make_rig: Callable[..., Rig], clock: FakeClock, tmp_path: Path
) -> None:
    book = Book(Database(tmp_path / "ledger.db"), clock=clock)
    book.register_shop("s-bad", merchant_id="m-9")
    book.penalize_shop(
        "k-1", "s-bad", "order_brushing", "case-1", evidence="case file", actor="analyst"
    )
    shops = LedgerShopDirectory(book, clock)
    rig = make_rig(shops=shops)
    decision = rig.scorer.score(make_order("o-1", shop_id="s-bad"))
    assert decision.outcome is Outcome.BLOCK
    assert [r.rule_id for r in decision.reasons] == ["frozen_shop"]
    assert rig.scorer.score(make_order("o-2", shop_id="s-good")).outcome is Outcome.ALLOW
    shops.close()  # before the book: its refresher queries the book's database
    book.close()


def test_scorer_rejects_a_negative_total_and_counts_nothing(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    rig = make_rig()
    with pytest.raises(InvalidArgumentError) as info:
        rig.scorer.score(make_order("o-bad", total=-1))
    assert info.value.field == "order.amounts.total"
    assert rig.log.get("o-bad") is None
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 0


def test_scorer_report_outcome_appends_the_event(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.scorer.score(make_order("o-1"))
    event = OrderEvent("o-1", OrderEventKind.CHARGEBACK, 1_790_000_500.0, "bank notice")
    rig.scorer.report_outcome(event)
    rig.scorer.close()
    assert rig.log.events("o-1") == [event]
    assert rig.log.verify().ok


def test_scorer_follows_a_rule_reload(
    make_rig: Callable[..., Rig], holder: ProgramHolder, rules_dir: Path
) -> None:
    rig = make_rig()
    before = holder.current.version
    text = (rules_dir / "checkout.rules").read_text()
    (rules_dir / "checkout.rules").write_text(text.replace("> 50000", "> 10000"))
    assert holder.reload().ok
    decision = rig.scorer.score(make_order("o-1", total=20_000))
    assert decision.outcome is Outcome.REVIEW and decision.rules_version != before


class FlakyDatabase(Database):
    """The real SQLite database, whose reads can be made to fail (the log's DB is down)."""

    fail_reads = False

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.fail_reads:
            raise UnavailableError("database unavailable")
        return super().query(sql, params)


def test_scorer_answers_when_the_log_cannot_be_read(
    make_rig: Callable[..., Rig], tmp_path: Path, indexer: BlindIndexer, clock: FakeClock
) -> None:
    db = FlakyDatabase(tmp_path / "flaky.db")
    rig = make_rig(database=db)
    db.fail_reads = True
    decision = rig.scorer.score(make_order("o-1", total=60_000))
    # the rules and features were all there: the answer is theirs, flagged for the lookup
    assert decision.degraded == ("evidence",)
    assert decision.outcome is Outcome.REVIEW
    assert [r.rule_id for r in decision.reasons] == ["big_order"]
    rig.log.flush(10)
    db.fail_reads = False
    assert rig.scorer.score(make_order("o-1", total=60_000)) == replace(decision, replayed=True)
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 1
    rig.scorer.close()
    rig.log.close()
    db.close()


def test_an_answer_the_full_log_drops_is_told_apart_from_one_it_could_not_read(
    make_rig: Callable[..., Rig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review (PostgreSQL down): the answers the log will write once the database is back
    and the ones its full queue dropped were both marked ``evidence``, the dropped ones
    twice; the metric counted 8,192 + 2 x 1,808 and no number said 1,808 were lost."""
    db = FlakyDatabase(tmp_path / "flaky.db")
    rig = make_rig(database=db)
    db.fail_reads = True
    kept = rig.scorer.score(make_order("o-1"))
    assert kept.degraded == ("evidence",) and not kept.unlogged

    def full(record: Any, **_: Any) -> None:
        raise UnavailableError("decision log queue is full")

    monkeypatch.setattr(rig.log, "append", full)
    lost = rig.scorer.score(make_order("o-2"))
    assert lost.degraded == ("evidence", "evidence_queue") and lost.unlogged
    metrics = Metrics()
    metrics.observe_decisions([kept, lost])
    assert metrics.value("riskd_degraded_decisions_total", {"unavailable": "evidence"}) == 2
    assert metrics.value("riskd_degraded_decisions_total", {"unavailable": "evidence_queue"}) == 1
    rig.scorer.close()
    db.close()


def test_a_zero_budget_skips_a_remote_log_without_opening_its_breaker(
    make_rig: Callable[..., Rig],
) -> None:
    """A call with no time left (worker mode's late fallback) cannot ask a remote log:
    that is no failure of the log, so such calls never open its breaker and a later
    retry of a committed order is still replayed from it."""
    rig = make_rig()
    rig.scorer._remote_log = True  # as with PostgreSQL
    first = rig.scorer.score(make_order("o-1"), timeout_s=1.0)
    rig.log.flush(10)
    for i in range(5):
        late = rig.scorer.score(make_order(f"o-late-{i}"), timeout_s=0.0)
        assert "evidence" in late.degraded
    assert not rig.scorer.log_breaker.is_open
    assert rig.scorer.score(make_order("o-1"), timeout_s=1.0) == replace(first, replayed=True)


class StallingStore(InProcessFeatureStore):
    """Counts the order, then stalls ``stall_s`` on the scorer's clock (a worker stopped
    mid-scoring: swapped out, a long collection)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.fake_clock = clock
        self.stall_s = 0.0
        self.stalls: list[float] = []  # the next calls' stalls, before ``stall_s`` again

    def record_and_read(self, obs: Any, queries: Any) -> Any:
        out = super().record_and_read(obs, queries)
        self.fake_clock.advance(self.stalls.pop(0) if self.stalls else self.stall_s)
        return out


@pytest.mark.parametrize("record_late", [True, False])
def test_a_worker_records_no_decision_made_after_its_deadline(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock, record_late: bool
) -> None:
    """In a scoring worker (``record_late=False``) a call decided after its deadline
    records none of its orders and says so: the gRPC process has answered it with the
    fallback and records that, so the log must not get a second decision nobody acted
    on. Each order is still counted once. In one process the late decision is the only
    one, and is recorded."""
    store = StallingStore(clock)
    rig = make_rig(store, record_late=record_late)
    # the three feature reads start inside the call's 0.3 s, the last ends past it
    store.stalls = [0.0, 0.0, 0.35]
    orders = [make_order(f"o-{i}", buyer_id="b-stall") for i in range(3)]
    if record_late:
        assert len(rig.scorer.score_batch(orders, timeout_s=0.3)) == 3
    else:
        with pytest.raises(DeadlineExceededError):
            rig.scorer.score_batch(orders, timeout_s=0.3)  # the third read ends past it
    rig.log.flush(10)
    assert all((rig.log.get(o.order_id) is not None) is record_late for o in orders)
    assert count_buyer_orders(rig, indexer, clock, "b-stall") == 3
    retry = rig.scorer.score_batch(orders, timeout_s=0.3)  # decided (or replayed) and kept
    assert all(d.replayed is record_late for d in retry)
    rig.log.flush(10)
    assert all(rig.log.get(o.order_id) is not None for o in orders)
    assert count_buyer_orders(rig, indexer, clock, "b-stall") == 3


def test_a_worker_records_nothing_when_the_log_has_no_room_before_its_deadline(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, db: Database
) -> None:
    """Decided in time, but the log's queue stays full (its writer held by another
    process's lock): the worker's scorer waits for room no longer than the deadline and
    appends nothing after it (``DeadlineExceededError``), not one put timeout more."""
    rig = make_rig(
        scorer_clock=SystemClock(),
        record_late=False,
        log_options={"queue_size": 2, "max_batch": 1, "put_timeout_s": 2.0},
    )
    with _writer_held(db):
        rig.scorer.score(make_order("o-fill-1"), timeout_s=1.0)  # the writer's, held
        rig.scorer.score(make_order("o-fill-2"), timeout_s=1.0)  # queued: the queue is full
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            rig.scorer.score(make_order("o-late", buyer_id="b-late"), timeout_s=0.2)
        assert time.monotonic() - started < 1.0  # the deadline, not the 2 s put timeout
    rig.log.flush(10)
    assert rig.log.get("o-late") is None and rig.log.get("o-fill-2") is not None
    now = FakeClock(time.time())  # the scorer counted on the system clock
    assert count_buyer_orders(rig, indexer, now, "b-late") == 1
    retry = rig.scorer.score(make_order("o-late", buyer_id="b-late"), timeout_s=1.0)
    assert not retry.replayed and not retry.unlogged
    rig.log.flush(10)
    assert rig.log.get("o-late") is not None
    assert count_buyer_orders(rig, indexer, now, "b-late") == 1


def test_orders_decided_before_a_failure_in_the_batch_are_recorded(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug deciding the third order (here: the shop directory raising something that
    is no RiskdError) fails the call, yet the two decided before it are recorded, as when
    each order was appended on its own: a retry gets them back."""
    rig = make_rig()
    decide = rig.scorer._decide
    calls: list[str] = []

    def flaky(order: Any, features: Any, ctx: Any, request: Any = None) -> Any:
        calls.append(order.order_id)
        if len(calls) == 3:
            raise RuntimeError("shop directory bug")
        return decide(order, features, ctx, request)

    monkeypatch.setattr(rig.scorer, "_decide", flaky)
    orders = [make_order(f"o-{i}") for i in range(4)]
    with pytest.raises(RuntimeError):
        rig.scorer.score_batch(orders, timeout_s=1.0)
    monkeypatch.setattr(rig.scorer, "_decide", decide)
    retry = rig.scorer.score_batch(orders, timeout_s=1.0)
    assert [d.replayed for d in retry] == [True, True, False, False]


NIGHT_RULE = """
rule night_order {
  description = "Placed at night, client time (fails near year 9999 in that time zone)"
  owner       = "risk-ops"
  scenarios   = [live_room_checkout]
  mode        = shadow
  action      = review
  score       = 1
  reason      = NIGHT_ORDER
  when        = timestamp(int(order.client_time)).getHours("Asia/Shanghai") < 6
      || order.amounts.total > 50
}
"""


def test_scorer_keeps_every_result_when_a_hit_fails_only_while_explained(
    make_rig: Callable[..., Rig], holder: ProgramHolder, rules_dir: Path
) -> None:
    """A client_time near year 9999 must not turn every rule's result into the fallback."""
    path = rules_dir / "checkout.rules"
    path.write_text(path.read_text(encoding="utf-8") + NIGHT_RULE, encoding="utf-8")
    assert holder.reload().ok
    rig = make_rig()
    order = replace(make_order("o-1", total=60_000), client_time=253_402_300_000.0)
    decision = rig.scorer.score(order)
    assert decision.degraded == ()
    assert [r.rule_id for r in decision.reasons] == ["big_order"]
    assert statuses(rig, "o-1")["night_order"] == ("HIT", "SHADOW")


def test_scorer_logs_a_program_failure_without_personal_data(
    make_rig: Callable[..., Rig], holder: ProgramHolder, caplog: pytest.LogCaptureFixture
) -> None:
    # a scoring time beyond year 9999: the program cannot even build its variables
    rig = make_rig(scorer_clock=FakeClock(1e13))
    with caplog.at_level(logging.ERROR, logger="riskd.engine.scorer"):
        decision = rig.scorer.score(make_order("o-1", total=60_000))
    assert "rules" in decision.degraded
    [record] = [r for r in caplog.records if r.name == "riskd.engine.scorer"]
    assert record.getMessage() == "rule program failed; answered by the fallback"
    fields = record.fields  # type: ignore[attr-defined]
    assert fields == {"error_type": "EvalError", "rules_version": holder.current.version}


def test_scorer_counts_and_logs_rule_errors_once_per_decision(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig()
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="riskd.engine.scorer"):
        first = rig.scorer.score(make_order("o-1"))
        second = rig.scorer.score(make_order("o-2"))
        retry = rig.scorer.score(make_order("o-1"))
    assert first.rule_errors == ("discount_ratio",) and retry.replayed
    metrics.observe_decisions([first, second, retry])  # the replayed one was counted before
    assert metrics.value("riskd_rule_errors_total", {"rule_id": "discount_ratio"}) == 2
    assert metrics.value("riskd_rule_errors_total", {"rule_id": "big_order"}) == 0
    logged = [r for r in caplog.records if r.getMessage() == "rule failed on an order"]
    assert len(logged) == 1  # once a minute per rule, not once per order
    assert logged[0].fields["rule_id"] == "discount_ratio"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("order_id", "message"),
    [
        ("", "is required"),
        ("o" * (MAX_ORDER_ID_LEN + 1), f"is longer than {MAX_ORDER_ID_LEN}"),
        ("o-\n1", "must not contain control characters"),
    ],
)
def test_scorer_refuses_an_unusable_order_id_and_counts_nothing(
    make_rig: Callable[..., Rig],
    indexer: BlindIndexer,
    clock: FakeClock,
    order_id: str,
    message: str,
) -> None:
    """The scorer's own check, whoever calls it: an id the stores cannot key is refused
    before any order of the call is counted or recorded."""
    rig = make_rig()
    with pytest.raises(InvalidArgumentError, match=message) as info:
        rig.scorer.score_batch([make_order("o-ok"), make_order(order_id)])
    assert info.value.field == "orders[1].order_id"
    assert rig.log.get("o-ok") is None
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 0


def test_scorer_scores_the_longest_order_id_and_a_free_order(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    """The scorer's own check refuses only past its limits: an id of exactly
    ``MAX_ORDER_ID_LEN`` characters and a total of 0 fen (an order the coupons paid in
    full) are orders like any other, decided, counted, recorded and replayed."""
    rig = make_rig()
    longest = make_order("o" * MAX_ORDER_ID_LEN)
    free = make_order("o-free", total=0)
    assert not rig.scorer.score(longest).degraded
    decisions = rig.scorer.score_batch([free, longest])
    assert [(d.outcome, d.replayed) for d in decisions] == [
        (Outcome.ALLOW, False),
        (Outcome.ALLOW, True),
    ]
    rig.log.flush(10)
    assert rig.log.get(longest.order_id) is not None and rig.log.get("o-free") is not None
    assert count_buyer_orders(rig, indexer, clock, "b-1") == 2


def test_a_degraded_answer_never_lowers_what_the_rules_that_ran_decided(
    make_rig: Callable[..., Rig],
) -> None:
    """The fallback is combined by ``max()`` with the rules that could still run: a lenient
    fallback does not turn big_order's REVIEW into an ALLOW while features are missing."""
    rig = make_rig(fallback=FallbackPolicy.from_text({"default": "allow"}))
    decision = rig.scorer.score(make_order("o-1", total=60_000), timeout_s=0.0)
    assert decision.degraded == ("features",)
    assert decision.outcome is Outcome.REVIEW
    assert [r.rule_id for r in decision.reasons] == ["big_order", "@fallback"]
    # the score is still the rules' own sum, as an analyst adds it up from the reasons
    assert decision.score == sum(r.score for r in decision.reasons) == 20.0


class DownShopDirectory:
    """A shop directory whose database is unavailable."""

    def get(self, shop_id: str) -> ShopState:
        raise UnavailableError("shop directory unavailable")


def test_an_unavailable_shop_directory_answers_degraded_by_the_fallback(
    make_rig: Callable[..., Rig],
) -> None:
    """Without the shop's enforcement state the answer is marked ``shops`` and takes the
    configured fallback (live_room: review above 100 CNY), not a plain ALLOW."""
    fallback = FallbackPolicy.from_text(
        {"default": "50000:allow,review", "live_room": "10000:allow,review"}
    )
    rig = make_rig(shops=DownShopDirectory(), fallback=fallback)
    decision = rig.scorer.score(make_order("o-1", total=40_000), timeout_s=1.0)
    assert decision.degraded == ("shops",)
    assert decision.outcome is Outcome.REVIEW
    assert [r.rule_id for r in decision.reasons] == ["@fallback"]


def test_the_log_lookups_recover_by_themselves_once_the_database_answers(
    make_rig: Callable[..., Rig], tmp_path: Path, clock: FakeClock
) -> None:
    """Failed lookups open the log's breaker; once the database answers and ``open_s`` has
    passed, the probe closes it and every later lookup goes through again."""
    db = FlakyDatabase(tmp_path / "flaky.db")
    rig = make_rig(database=db, breaker=BreakerPolicy(failures=2, open_s=1.0))
    db.fail_reads = True
    for i in range(3):
        assert rig.scorer.score(make_order(f"o-{i}")).degraded == ("evidence",)
    assert rig.scorer.log_breaker.is_open
    db.fail_reads = False
    clock.advance(1.0)
    for i in range(3, 6):
        assert rig.scorer.score(make_order(f"o-{i}")).degraded == (), i
    assert not rig.scorer.log_breaker.is_open
    rig.scorer.close()
    rig.log.close()
    db.close()


def test_a_replica_replaying_an_answer_made_without_features_counts_its_order(
    make_rig: Callable[..., Rig], indexer: BlindIndexer, clock: FakeClock
) -> None:
    """An answer degraded ``features`` that another replica replays from the shared log is
    queued for counting there too: the process that answered may have lost its queue (a
    crash; here its feature store is not the one B counts in)."""
    a = make_rig()
    first = a.scorer.score(make_order("o-1"), timeout_s=0.0)
    assert first.degraded == ("features",)
    a.log.flush(10)
    b = make_rig()  # the same database, a feature store of its own
    assert b.scorer.score(make_order("o-1"), timeout_s=1.0) == replace(first, replayed=True)
    assert b.scorer.catch_up.wait(5)
    assert count_buyer_orders(b, indexer, clock, "b-1") == 1


def test_a_batch_is_stamped_with_the_time_it_is_given(
    make_rig: Callable[..., Rig], clock: FakeClock
) -> None:
    """A scoring worker passes its batch's time (``at``): every part of a batch carries it."""
    at = clock.now() - 2.5
    orders = [make_order("o-1"), make_order("o-2")]
    decisions = make_rig().scorer.score_batch(orders, timeout_s=1.0, at=at)
    assert [d.decided_at for d in decisions] == [at, at]


def test_a_worker_s_full_decision_log_is_told_as_an_outage(
    make_rig: Callable[..., Rig], db: Database
) -> None:
    """In a scoring worker too, an answer the full log could not take is an
    ``evidence_queue`` outage (log line, ``riskd_dependency_unavailable``), not only
    an ``unlogged`` answer."""
    rig = make_rig(
        record_late=False, log_options={"queue_size": 2, "max_batch": 1, "put_timeout_s": 0.02}
    )
    with _writer_held(db):
        rig.scorer.score(make_order("o-fill-1"), timeout_s=1.0)  # the writer's, held
        rig.scorer.score(make_order("o-fill-2"), timeout_s=1.0)  # queued: the queue is full
        decision = rig.scorer.score(make_order("o-full"), timeout_s=0.05)
        assert decision.unlogged and "evidence_queue" in decision.degraded
        assert rig.scorer.unavailable() == ("evidence_queue",)


def test_an_idle_replica_keeps_the_log_s_circuit_open_until_the_writer_commits_again(
    make_rig: Callable[..., Rig], tmp_path: Path, clock: FakeClock
) -> None:
    """With no request, the log lookups' open circuit closes on the writer's commits, but
    only on commits made since the lookups failed: while the database still takes
    nothing, a scrape keeps telling the outage (commits from before it prove nothing)."""
    db = FlakyDatabase(tmp_path / "flaky.db")
    rig = make_rig(database=db, breaker=BreakerPolicy(failures=2, open_s=1.0))
    rig.scorer.score(make_order("o-0"))
    rig.log.flush(10)  # a commit before the outage
    with _writer_held(db):
        db.fail_reads = True
        for i in range(2):
            assert rig.scorer.score(make_order(f"o-{i + 1}")).degraded == ("evidence",)
        clock.advance(1.0)  # a whole open_s with no request
        assert rig.scorer.unavailable() == ("evidence",)
        assert rig.scorer.log_breaker.is_open
        db.fail_reads = False
    rig.log.flush(10)  # the database is back: the writer commits what was queued
    rig.scorer.unavailable()
    assert not rig.scorer.log_breaker.is_open
    rig.scorer.close()
    rig.log.close()
    db.close()


def test_an_inflight_answer_is_stamped_with_the_time_it_is_given(
    make_rig: Callable[..., Rig], clock: FakeClock
) -> None:
    """The gRPC process of scoring workers answers a retry whose first call is still out
    with ``inflight`` at its call's time (``at``), as a batch's parts are stamped."""
    at = clock.now() - 2.5
    rig = make_rig()
    answer = rig.scorer.inflight(make_order("o-1"), clock.monotonic(), at=at)
    assert (answer.decided_at, answer.degraded, answer.unlogged) == (at, ("inflight",), True)
    assert rig.scorer.inflight(make_order("o-1"), clock.monotonic()).decided_at == clock.now()
