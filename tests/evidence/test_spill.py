"""A stop whose flush runs out of time spills the queue (``riskd.evidence.spill``), and the
next start appends it to the log: in order, the chain intact, each item once, no PII."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from riskd import spillfile
from riskd.domain.decision import Outcome
from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.evidence import log as log_module
from riskd.evidence import spill
from riskd.evidence.chain import TextRow
from riskd.evidence.log import DecisionLog
from riskd.pii import BlindIndexer, Keyring
from riskd.sql import Database

from .conftest import (
    DEVICE,
    ID_NUMBER,
    IP,
    NAME,
    PG_URL,
    PHONE,
    STREET,
    make_order,
    make_record,
    pg_database,
)

PII = (PHONE, NAME, ID_NUMBER, STREET, DEVICE, IP)


def stored_ids(db: Database) -> list[str]:
    return [str(r[0]) for r in db.query("SELECT order_id FROM decision_log ORDER BY seq")]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection, about to hold the database's write lock."""
    Database(tmp_path / "e.db").close()
    conn = sqlite3.connect(tmp_path / "e.db", isolation_level=None)
    yield conn
    conn.close()


def _locked(
    tmp_path: Path, holder: sqlite3.Connection, **kwargs: Any
) -> tuple[Database, DecisionLog]:
    """A log on ``tmp_path``'s database whose tables exist and whose write lock ``holder``
    holds now: its writer commits nothing until ``holder`` rolls back."""
    db = Database(tmp_path / "e.db")
    DecisionLog(db).close()  # the tables, before the lock
    holder.execute("BEGIN IMMEDIATE")
    return db, DecisionLog(db, create_tables=False, **kwargs)


def _spilled(tmp_path: Path, holder: sqlite3.Connection, n: int) -> Path:
    """``n`` orders (with PII) and a report appended while ``holder`` held the write lock,
    then a stop: the flush runs out of time, and the queue goes to a spill file."""
    db = Database(tmp_path / "e.db")
    DecisionLog(db).close()  # the tables, before the lock
    holder.execute("BEGIN IMMEDIATE")
    indexer = BlindIndexer(Keyring.generate())
    log = DecisionLog(db, indexer=indexer, spill_dir=tmp_path, create_tables=False)
    for i in range(n):
        order = make_order(f"o-{i}")
        log.append(make_record(f"o-{i}", request=log.protect(order)), order=order)
    log.append_event(OrderEvent("o-1", OrderEventKind.PAID, 1_700_000_100.0))
    log.close(1.0)  # no error: nothing is lost
    db.close()
    holder.execute("ROLLBACK")
    (path,) = spill.files(tmp_path)
    return path


def test_a_spill_file_reads_back_every_row_and_report_in_order(tmp_path: Path) -> None:
    rows = [(("o-1", 1, None), '{"a": 1}'), (("o-2", 2.5, "x"), '{"b": "\u98ce\u63a7"}')]
    events = [{"order_id": "o-1", "kind": "paid"}, {"order_id": "o-2", "kind": "refunded"}]
    path = spill.write(tmp_path, rows, events)
    assert spill.files(tmp_path) == [path]
    assert spill.read(path) == (rows, events)


@pytest.mark.parametrize(
    ("decisions", "events"),
    [
        ([{"d": "o-1", "c": "{}"}], []),  # columns that are no row
        ([{"d": ["o-1"], "c": 5}], []),  # content that is no text
        ([{"c": "{}"}], []),
        ([["o-1", "{}"]], []),
        ([], [{"e": 5}]),
        ([], [{"kind": "paid"}]),
    ],
)
def test_a_whole_spill_file_whose_lines_are_not_the_logs_is_refused(
    tmp_path: Path, decisions: list[object], events: list[object]
) -> None:
    """Counted right, but not what ``write`` puts there (another kind's, or edited): the
    start logs it and leaves it, rather than appending what is no decision."""
    path = spillfile.write(tmp_path, spill.PREFIX, {"decisions": decisions, "events": events})
    with pytest.raises(spill.SpillFileError):
        spill.read(path)


def test_a_stop_on_a_locked_database_spills_the_queue_and_the_next_start_logs_it_once(
    tmp_path: Path, holder: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="riskd.evidence.log")
    path = _spilled(tmp_path, holder, 5)
    assert path.stat().st_mode & 0o777 == 0o600
    data = path.read_bytes()
    for value in PII:
        assert value.encode() not in data
    db = Database(tmp_path / "e.db")
    assert stored_ids(db) == []
    copy = shutil.copy(path, tmp_path / "copy")  # as if a crash came before the delete

    log = DecisionLog(db, spill_dir=tmp_path)
    assert log.replay_spilled(tmp_path) == 6
    assert spill.files(tmp_path) == []
    shutil.move(copy, path)
    assert log.replay_spilled(tmp_path) == 0  # replayed twice: nothing twice
    assert spill.files(tmp_path) == []  # and gone, not left to fail every later start
    assert stored_ids(db) == [f"o-{i}" for i in range(5)]
    assert len(log.events("o-1")) == 1
    assert log.verify().ok and log.verify().checked == 6
    record = log.get("o-3")
    assert record is not None and record.request["buyer"]["phone"] == {"masked": "139****5678"}
    log.close()
    db.close()
    text = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    assert "spilled for the next start" in text
    for value in (*PII, "b-1"):
        assert value not in text


def test_a_stop_spills_what_waited_behind_the_writers_batch_too(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    # the writer holds two; the four queued behind them are as much the caller's evidence
    db, log = _locked(tmp_path, holder, max_batch=2, queue_size=16, spill_dir=tmp_path)
    for i in range(5):
        log.append(make_record(f"o-{i}"))
    log.append_event(OrderEvent("o-1", OrderEventKind.PAID, 1_700_000_100.0))
    log.close(1.0)
    holder.execute("ROLLBACK")
    replayed = DecisionLog(db, spill_dir=tmp_path)
    assert replayed.replay_spilled(tmp_path) == 6
    assert stored_ids(db) == [f"o-{i}" for i in range(5)] and len(replayed.events("o-1")) == 1
    replayed.close()
    db.close()


def test_a_second_close_after_a_spill_neither_waits_nor_spills_again(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    # a stop closes the log from more than one closer: the spill is written once, at once
    db, log = _locked(tmp_path, holder, spill_dir=tmp_path)
    log.append(make_record("o-1"))
    log.close(1.0)
    started = time.monotonic()
    log.close(1.0)
    assert time.monotonic() - started < 0.5
    assert len(spill.files(tmp_path)) == 1
    holder.execute("ROLLBACK")
    db.close()


def test_spill_files_are_replayed_oldest_first(tmp_path: Path) -> None:
    # the chain's order is the decisions' order, and an order in two files keeps its first
    db = Database(tmp_path / "e.db")
    log = DecisionLog(db, spill_dir=tmp_path)

    def row(order_id: str, outcome: Outcome) -> TextRow:
        record = make_record(order_id)
        record = dataclasses.replace(
            record, decision=dataclasses.replace(record.decision, outcome=outcome)
        )
        return log_module._row(record)

    spill.write(tmp_path, [row("o-1", Outcome.REVIEW), row("o-2", Outcome.REVIEW)], [])
    time.sleep(0.01)  # the names order the files by time
    spill.write(tmp_path, [row("o-3", Outcome.ALLOW), row("o-1", Outcome.BLOCK)], [])
    assert log.replay_spilled(tmp_path) == 3
    assert stored_ids(db) == ["o-1", "o-2", "o-3"]
    record = log.get("o-1")
    assert record is not None and record.decision.outcome is Outcome.REVIEW
    assert log.verify().ok
    log.close()
    db.close()


def test_a_spill_file_cut_short_is_left_for_a_later_start_and_logged(
    tmp_path: Path, holder: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    path = _spilled(tmp_path, holder, 3)
    path.write_bytes(path.read_bytes()[:-10])
    db = Database(tmp_path / "e.db")
    log = DecisionLog(db, spill_dir=tmp_path)
    assert log.replay_spilled(tmp_path) == 0
    assert stored_ids(db) == [] and spill.files(tmp_path) == [path]
    (entry,) = [r for r in caplog.records if "not replayed" in r.getMessage()]
    assert entry.fields["file"] == path.name  # type: ignore[attr-defined]
    log.close()
    db.close()


def test_a_start_removes_a_part_file_left_by_a_process_killed_while_spilling(
    tmp_path: Path,
) -> None:
    """Its pid is this process's (a container's daemon after a restart), and this process
    writes no spill now: nobody can finish it."""
    part = tmp_path / f".{spill.PREFIX}{0:020d}-{os.getpid()}.jsonl.part"
    part.write_text('{"riskd_spill": 1, "decisions": 3, "events": 0}\n', "utf-8")
    db = Database(tmp_path / "e.db")
    log = DecisionLog(db, spill_dir=tmp_path)
    assert log.replay_spilled(tmp_path) == 0
    assert not part.exists()
    log.close()
    db.close()


def test_without_a_spill_folder_a_stop_still_reports_the_loss(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    db, log = _locked(tmp_path, holder)
    log.append(make_record("o-1"))
    with pytest.raises(Exception, match="timed out"):
        log.close(0.5)
    holder.execute("ROLLBACK")
    assert spill.files(tmp_path) == []
    db.close()


@pytest.mark.postgres
def test_a_stop_on_a_locked_postgres_table_cancels_the_writer_and_spills(
    tmp_path: Path,
) -> None:
    # review: the stop closed the database under the writer still waiting for the lock
    # (its error logged after "stopped"); now its statement is cancelled first
    db = pg_database()
    log = DecisionLog(db, spill_dir=tmp_path)
    log.flush(10)
    holder = psycopg.connect(PG_URL)
    try:
        holder.execute(f'LOCK TABLE "{db.url.rsplit("=", 1)[1]}".decision_log')
        for i in range(3):
            log.append(make_record(f"o-{i}"))
        log.close(1.0)
        alive = [t for t in threading.enumerate() if t.name == "evidence-writer" and t.is_alive()]
    finally:
        holder.rollback()
        holder.close()
    try:
        assert alive == []
        assert stored_ids(db) == []
        again = DecisionLog(db, spill_dir=tmp_path)
        assert again.replay_spilled(tmp_path) == 3
        assert stored_ids(db) == ["o-0", "o-1", "o-2"] and again.verify().ok
        again.close()
    finally:
        db.drop_schema()
        db.close()


def test_a_spill_that_cannot_be_written_is_reported_lost_with_its_count(
    tmp_path: Path, holder: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    db, log = _locked(tmp_path, holder, spill_dir=tmp_path / "gone")
    for i in range(3):
        log.append(make_record(f"o-{i}"))
    with pytest.raises(Exception, match="timed out"):
        log.close(0.5)
    holder.execute("ROLLBACK")
    (lost,) = [r for r in caplog.records if r.getMessage().endswith(": lost")]
    assert lost.fields["items"] == 3  # type: ignore[attr-defined]
    assert stored_ids(db) == []  # the writer was stopped: it commits nothing after
    db.close()
