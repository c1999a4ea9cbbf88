"""DecisionLog: batched background writes, reads of unflushed records, flush, backpressure."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.errors import ConfigError, InvalidArgumentError, UnavailableError
from riskd.evidence.log import DecisionLog
from riskd.sql import Database, Row, Tx

from .conftest import make_record

T = TypeVar("T")


class CountingDatabase(Database):
    """The real database, counting write transactions and optionally holding them back."""

    def __init__(self, url: str | Path) -> None:
        super().__init__(url)
        self.commits = 0
        self.gate = threading.Event()
        self.gate.set()

    def run(self, fn: Callable[[Tx], T], **kwargs: Any) -> T:
        if not self.gate.wait(10):
            raise UnavailableError("test gate closed")
        self.commits += 1
        return super().run(fn, **kwargs)


def rows(db: Database, table: str = "decision_log") -> int:
    return int(db.query(f"SELECT COUNT(*) FROM {table}")[0][0])


def test_log_get_sees_appended_record_before_and_after_flush(db: Database) -> None:
    log = DecisionLog(db)
    record = make_record("o-1")
    log.append(record)
    assert log.get("o-1") == record
    assert log.queued(["o-1"]) == {"o-1": record}
    second = make_record("o-2")
    log.append(second)  # a batch call's retry asks for all of its orders at once
    assert log.queued(["o-x", "o-1", "o-2"]) == {"o-1": record, "o-2": second}
    log.flush(10)
    assert rows(db) == 2
    assert log.queued(["o-1"]) == {}  # committed: no longer held in memory
    assert log.get("o-1") == record  # read back from SQL, equal field for field
    assert log.get("o-unknown") is None
    log.close()


def test_get_many_reads_more_ids_than_one_query_takes(db: Database) -> None:
    log = DecisionLog(db)
    ids = [f"o-{i}" for i in range(1_200)]  # three queries of up to 500 ids
    for order_id in ids:
        log.append(make_record(order_id))
    log.flush(10)
    found = log.get_many([*ids, "o-unknown"])
    assert sorted(found) == sorted(ids)
    assert found["o-1199"] == make_record("o-1199")
    log.close()


def test_log_batches_many_appends_into_few_commits(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "e.db")
    log = DecisionLog(db, max_batch=256)
    db.gate.clear()  # let appends pile up as they would behind a slow disk
    for i in range(1000):
        log.append(make_record(f"o-{i}"))
    db.gate.set()
    log.close()
    assert rows(db) == 1000
    assert db.commits <= 6  # 1000 records in batches of up to 256 (+ the one held back)
    assert log.verify().ok
    db.close()


def test_log_append_returns_without_waiting_for_the_disk(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "e.db")
    log = DecisionLog(db)
    db.gate.clear()
    started = time.perf_counter()
    for i in range(200):
        log.append(make_record(f"o-{i}"))
    assert time.perf_counter() - started < 0.5
    assert log.get("o-199") is not None and log.backlog == 200
    assert rows(db) == 0
    db.gate.set()
    log.flush(10)
    assert log.backlog == 0 and rows(db) == 200
    log.close()
    db.close()


def test_log_close_flushes_everything_appended(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    db = Database(path)
    log = DecisionLog(db, flush_interval_s=1.0)
    for i in range(300):
        log.append(make_record(f"o-{i}"))
    log.append_event(OrderEvent("o-1", OrderEventKind.PAID, 1_700_000_100.0))
    log.close()
    db.close()
    fresh = Database(path)
    assert rows(fresh) == 300 and rows(fresh, "order_events") == 1
    reopened = DecisionLog(fresh)
    assert reopened.verify().ok and reopened.verify().checked == 301
    reopened.close()
    fresh.close()


def test_log_full_queue_raises_unavailable_instead_of_blocking(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "e.db")
    log = DecisionLog(db, max_batch=4, queue_size=8, put_timeout_s=0.05)
    db.gate.clear()
    for i in range(8):
        log.append(make_record(f"o-{i}"))
    started = time.perf_counter()
    with pytest.raises(UnavailableError, match="queue is full"):
        log.append(make_record("o-8"))
    assert time.perf_counter() - started < 1.0
    assert log.get("o-8") is None
    db.gate.set()
    log.close()
    assert rows(db) == 8
    db.close()


def test_append_all_queues_all_of_its_decisions_or_none(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "e.db")
    log = DecisionLog(db, max_batch=4, queue_size=8, put_timeout_s=0.05)
    db.gate.clear()
    for i in range(6):
        log.append(make_record(f"o-{i}"))
    three = [(make_record(f"o-{i}"), None, None) for i in (6, 7, 8)]
    with pytest.raises(UnavailableError, match="queue is full"):
        log.append_all(three)  # room for two of them only
    assert log.backlog == 6 and log.queued(["o-6", "o-7", "o-8"]) == {}
    db.gate.set()
    log.flush(10)
    log.append_all(three)
    log.close()
    assert rows(db) == 9
    db.close()


def test_a_full_queue_the_writer_does_not_drain_costs_one_wait_not_one_per_append(
    tmp_path: Path,
) -> None:
    """Review: with the database down or locked, every append to the full queue waited
    ``put_timeout_s`` for room that never came: each Score call took 51 ms instead of
    0.7 (median, one process), so four RPC threads answered some 80 calls a second. Once a
    wait has found no progress, the next appends are refused at once until the writer
    commits something; then a full queue is waited on again (backpressure on a slow
    database)."""
    db = CountingDatabase(tmp_path / "e.db")
    log = DecisionLog(db, max_batch=4, queue_size=8, put_timeout_s=0.2)
    db.gate.clear()
    for i in range(8):
        log.append(make_record(f"o-{i}"))

    def refused(order_id: str) -> float:
        started = time.perf_counter()
        with pytest.raises(UnavailableError, match="queue is full"):
            log.append(make_record(order_id))
        return time.perf_counter() - started

    with pytest.raises(UnavailableError):  # a caller's deadline cut this wait short:
        log.append_all([(make_record("o-x"), None, None)], wait_s=0.01)
    assert refused("o-8") >= 0.15  # ...so it says nothing; the first whole one waits
    assert sum(refused(f"o-{i}") for i in range(9, 19)) < 0.1  # the rest: at once
    with pytest.raises(UnavailableError):
        log.append_event(OrderEvent("o-1", OrderEventKind.REFUNDED, at=2.0))
    db.gate.set()
    log.flush(10)
    db.gate.clear()
    for i in range(20, 28):
        log.append(make_record(f"o-{i}"))
    assert refused("o-28") >= 0.15  # the writer went on since: waited on again
    db.gate.set()
    log.close()
    assert rows(db) == 16
    db.close()


def test_a_full_queue_is_refused_at_once_also_to_callers_whose_deadline_is_short(
    tmp_path: Path,
) -> None:
    """Review: a scoring worker's call with a checkout's 50 ms deadline has less than
    ``put_timeout_s`` left to wait, and such a wait, cut short, marked nothing: with the
    file locked by another writer, each of those calls waited out its deadline for room
    that never came (every Score answered by the fallback policy after 35 ms). The queue
    full for ``put_timeout_s`` with nothing committed is enough, whoever waited."""
    db = Database(tmp_path / "e.db")
    log = DecisionLog(db, max_batch=4, queue_size=8, put_timeout_s=0.2)
    log.flush(10)  # the tables exist
    holder = sqlite3.connect(tmp_path / "e.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing: nothing can commit
    for i in range(8):
        log.append(make_record(f"o-{i}"))
    took = []
    for i in range(8, 18):
        started = time.perf_counter()
        with pytest.raises(UnavailableError, match="queue is full"):
            log.append_all([(make_record(f"o-{i}"), None, None)], wait_s=0.1)
        took.append(time.perf_counter() - started)
    assert took[0] >= 0.08  # the first ones wait (backpressure)...
    assert sum(took) < 0.4, took  # ...0.2 s in all, not 0.1 s each (1 s)
    holder.execute("ROLLBACK")
    holder.close()
    log.flush(10)  # the writer goes on by itself
    log.append_all([(make_record("o-18"), None, None)], wait_s=0.1)
    log.close()
    assert rows(db) == 9
    db.close()


def test_log_keeps_the_first_decision_for_an_order(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Each decision skipped is counted (``superseded``) and logged by order id: its
    caller acted on a decision the log does not keep."""
    log = DecisionLog(db)
    first = make_record("o-1")
    log.append(first)
    log.append(make_record("o-1", request={"other": True}))
    log.flush(10)
    assert log.superseded == 1
    # a second writer (another replica) appending the same order is skipped too
    other = DecisionLog(db)
    with caplog.at_level(logging.WARNING, logger="riskd.evidence.log"):
        other.append(make_record("o-1", request={"replica": 2}))
        other.append(make_record("o-2"))
        other.close()
    log.close()
    assert rows(db) == 2
    assert log.get("o-1") == first
    assert (log.superseded, other.superseded) == (1, 1)
    [entry] = [r for r in caplog.records if "recorded decision already" in r.getMessage()]
    assert entry.fields == {"orders": 1, "first": "o-1"}  # type: ignore[attr-defined]
    result = log.verify()
    assert result.ok and result.head["decision_log"][0] == 2


def test_append_all_keeps_the_first_of_two_decisions_for_one_order_in_one_call(
    db: Database,
) -> None:
    # a batch call naming an order twice: the caller acts on the first answer, so it is logged
    log = DecisionLog(db)
    first = make_record("o-1")
    log.append_all([(first, None, None), (make_record("o-1", request={"second": 1}), None, None)])
    assert log.get("o-1") == first and log.superseded == 1
    log.close()
    assert rows(db) == 1 and log.get("o-1") == first


def test_append_all_of_more_decisions_than_the_queue_holds_fits_an_empty_queue(
    db: Database,
) -> None:
    # a large batch call on an idle log is logged, not refused as if the queue were full
    log = DecisionLog(db, max_batch=2, queue_size=4)
    log.append_all([(make_record(f"o-{i}"), None, None) for i in range(6)])
    log.close()
    assert rows(db) == 6 and log.verify().ok


def test_flush_after_append_all_waits_for_every_decision_of_the_call(db: Database) -> None:
    # a reveal or a stop that flushes must find each decision of a batch call committed
    log = DecisionLog(db, max_batch=1, queue_size=64)
    log.append_all([(make_record(f"o-{i}"), None, None) for i in range(40)])
    log.flush(10)
    assert rows(db) == 40
    log.close()


def test_log_stores_events_in_their_own_chained_table(db: Database) -> None:
    log = DecisionLog(db)
    paid = OrderEvent("o-1", OrderEventKind.PAID, 1_700_000_100.0)
    fake = OrderEvent("o-1", OrderEventKind.CONFIRMED_FAKE, 1_700_000_900.5, "brushing ring")
    log.append_event(paid)
    log.append_event(fake)
    log.close()
    assert log.events("o-1") == [paid, fake]
    assert rows(db, "decision_log") == 0
    assert log.verify().ok


def test_a_retried_outcome_report_is_stored_once(db: Database) -> None:
    log = DecisionLog(db)
    refund = OrderEvent("o-1", OrderEventKind.REFUNDED, 1_700_000_100.0, "partial")
    again = OrderEvent("o-1", OrderEventKind.REFUNDED, 1_700_000_100.0, "partial (retry)")
    later = OrderEvent("o-1", OrderEventKind.REFUNDED, 1_700_000_700.0, "second refund")
    log.append_event(refund)
    log.append_event(again)  # same batch
    log.flush(10)
    log.append_event(refund)  # a later batch
    log.append_event(later)  # another refund of the same order: its own report
    log.close()
    assert log.events("o-1") == [refund, later]
    assert rows(db, "order_events") == 2
    assert log.verify().ok


def test_retries_are_told_apart_by_order_kind_and_time_across_lookup_chunks(
    db: Database,
) -> None:
    log = DecisionLog(db)
    base = 1_700_000_000.0
    first = [OrderEvent(f"o-{i % 7}", OrderEventKind.PAID, base + i) for i in range(150)]
    for event in first:
        log.append_event(event)
    log.flush(10)
    # one batch of 250: each stored report again (a retry, other detail), and beside each
    # one of another kind at the same time, and one of the same kind a moment later
    retries = [OrderEvent(e.order_id, e.kind, e.at, "retry") for e in first]
    refunds = [OrderEvent(e.order_id, OrderEventKind.REFUNDED, e.at) for e in first[:50]]
    later = [OrderEvent(e.order_id, e.kind, e.at + 0.5) for e in first[:50]]
    for event in [*retries, *refunds, *later]:
        log.append_event(event)
    log.close()
    assert rows(db, "order_events") == 250
    assert sorted(log.events("o-3"), key=lambda e: (e.at, e.kind.name)) == sorted(
        [e for e in [*first, *refunds, *later] if e.order_id == "o-3"],
        key=lambda e: (e.at, e.kind.name),
    )
    assert log.verify().ok


class EventReadsDatabase(Database):
    """The real database, counting the ``order_events`` rows its writer reads back."""

    def __init__(self, url: str | Path) -> None:
        super().__init__(url)
        self.rows_read = 0

    @contextlib.contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Tx]:
        owner = self

        class Counting(Tx):
            reading = False

            def execute(self, sql: str, params: Sequence[Any] = ()) -> Tx:
                self.reading = "FROM order_events" in sql
                return super().execute(sql, params)

            def fetchall(self) -> list[Row]:
                got = super().fetchall()
                owner.rows_read += len(got) if self.reading else 0
                return got

        with super().transaction(read_only=read_only) as tx:
            tx.__class__ = Counting
            yield tx


def test_a_report_for_an_order_reported_many_times_reads_back_only_itself(
    tmp_path: Path,
) -> None:
    # review: the writer read every stored report of the batch's orders (1 s a batch for
    # an order reported 100,000 times without `at`); a batch reads its own retries only
    db = EventReadsDatabase(tmp_path / "e.db")
    log = DecisionLog(db)
    for i in range(2_000):
        log.append_event(OrderEvent("o-hot", OrderEventKind.DISPUTED, 1_700_000_000.0 + i))
    log.flush(10)
    db.rows_read = 0
    log.append_event(OrderEvent("o-hot", OrderEventKind.DISPUTED, 1_700_000_000.0))  # retry
    log.append_event(OrderEvent("o-hot", OrderEventKind.DISPUTED, 1_700_009_000.0))
    log.close()
    assert rows(db, "order_events") == 2_001
    assert db.rows_read == 1  # the retry's stored twin, not the order's 2,000 reports
    db.close()


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (OrderEvent("", OrderEventKind.PAID, 1.0), "event.order_id"),
        (OrderEvent("o-1", OrderEventKind.UNSPECIFIED, 1.0), "event.kind"),
    ],
)
def test_log_rejects_bad_events_naming_the_field(
    tmp_path: Path, event: OrderEvent, field: str
) -> None:
    db = Database(tmp_path / "e.db")
    log = DecisionLog(db)
    with pytest.raises(InvalidArgumentError) as info:
        log.append_event(event)
    assert info.value.field == field
    log.close()
    assert rows(db, "order_events") == 0
    db.close()


def test_log_closed_rejects_appends(tmp_path: Path) -> None:
    db = Database(tmp_path / "e.db")
    log = DecisionLog(db)
    log.close()
    with pytest.raises(UnavailableError, match="closed"):
        log.append(make_record("o-1"))
    db.close()


class FailingDatabase(Database):
    """The real database, whose first ``failures`` write transactions fail (a blip)."""

    def __init__(self, url: str | Path, failures: int) -> None:
        super().__init__(url)
        self.failures = failures

    def run(self, fn: Callable[[Tx], T], **kwargs: Any) -> T:
        if self.failures > 0:
            self.failures -= 1
            raise UnavailableError("database unavailable")
        return super().run(fn, **kwargs)


def test_log_retries_a_failed_commit_and_keeps_the_batch_visible(tmp_path: Path) -> None:
    db = FailingDatabase(tmp_path / "e.db", failures=3)
    log = DecisionLog(db)
    record = make_record("o-1")
    log.append(record)
    assert log.get("o-1") == record  # still queued while the writer retries
    log.flush(10)
    assert db.failures == 0 and rows(db) == 1 and log.get("o-1") == record
    log.close()
    db.close()


def test_log_rejects_a_queue_smaller_than_a_batch(tmp_path: Path) -> None:
    db = Database(tmp_path / "e.db")
    with pytest.raises(ConfigError, match="queue_size"):
        DecisionLog(db, max_batch=10, queue_size=5)
    db.close()


@pytest.mark.postgres
def test_two_writers_on_postgres_keep_one_unbroken_chain(pg: Database) -> None:
    other = Database(pg.url)
    logs = [DecisionLog(pg, max_batch=16), DecisionLog(other, max_batch=16)]

    def write(n: int) -> None:
        for i in range(150):
            logs[n].append(make_record(f"w{n}-{i}"))

    threads = [threading.Thread(target=write, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    assert rows(pg) == 300
    result = logs[0].verify()
    assert result.ok and result.head["decision_log"][0] == 300
    other.close()
