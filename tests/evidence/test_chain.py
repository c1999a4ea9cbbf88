"""The hash chain: verify passes on an honest log and names the first tampered record."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.evidence.chain import DECISIONS, append_texts, chain_hash
from riskd.evidence.log import DecisionLog
from riskd.evidence.records import content_text
from riskd.evidence.schema import GENESIS_HASH
from riskd.sql import Database

from .conftest import make_record


def write_log(db: Database, n: int = 10) -> DecisionLog:
    log = DecisionLog(db)
    for i in range(1, n + 1):
        log.append(make_record(f"o-{i}"))
    log.append_event(OrderEvent("o-2", OrderEventKind.DISPUTED, 1_700_000_500.0))
    log.flush(10)
    return log


def test_chain_links_each_record_to_the_previous_one(db: Database) -> None:
    log = write_log(db, 3)
    stored = db.query("SELECT seq, content, prev_hash, hash FROM decision_log ORDER BY seq")
    prev = GENESIS_HASH
    for _seq, content, prev_hash, digest in stored:
        assert prev_hash == prev and digest == chain_hash(prev, content)
        prev = digest
    result = log.verify()
    assert result.ok and result.checked == 4
    assert result.head["decision_log"] == (3, prev)
    log.close()


@pytest.fixture
def sqlite_log(tmp_path: Path) -> tuple[DecisionLog, Path]:
    path = tmp_path / "evidence.db"
    log = write_log(Database(path))
    log.close()
    return log, path


def tamper(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("sql", "seq", "problem"),
    [
        (
            "UPDATE decision_log SET content = replace(content, '\"REVIEW\"', '\"ALLOW\"')"
            " WHERE seq = 4",
            4,
            "content does not match its hash",
        ),
        ("UPDATE decision_log SET outcome = 'ALLOW' WHERE seq = 6", 6, "column outcome"),
        ("DELETE FROM decision_log WHERE seq = 5", 6, "a row is missing"),
        ("UPDATE decision_log SET prev_hash = hash WHERE seq = 9", 9, "prev_hash"),
    ],
)
def test_verify_reports_the_first_tampered_record_in_the_sqlite_file(
    sqlite_log: tuple[DecisionLog, Path], sql: str, seq: int, problem: str
) -> None:
    log, path = sqlite_log
    assert log.verify().ok
    tamper(path, sql)
    result = log.verify()
    assert not result.ok
    assert (result.table, result.seq) == ("decision_log", seq)
    assert problem in result.problem
    log.db.close()


def test_verify_reports_a_tampered_event(sqlite_log: tuple[DecisionLog, Path]) -> None:
    log, path = sqlite_log
    tamper(path, "UPDATE order_events SET content = replace(content, 'DISPUTED', 'PAID')")
    result = log.verify()
    assert (result.ok, result.table, result.seq, result.order_id) == (
        False,
        "order_events",
        1,
        "o-2",
    )
    log.db.close()


def test_verify_on_postgres_detects_an_edit(pg: Database) -> None:
    log = write_log(pg, 4)
    log.close()
    assert log.verify().ok
    pg.query("UPDATE decision_log SET content = content || ' ' WHERE seq = 2 RETURNING seq")
    result = log.verify()
    assert (result.ok, result.seq, result.order_id) == (False, 2, "o-2")


def test_append_texts_skips_known_and_repeated_order_ids_and_keeps_the_chain(
    db: Database,
) -> None:
    log = DecisionLog(db)
    log.append(make_record("o-1"))
    log.close()

    def row(order_id: str) -> tuple[tuple[object, ...], str]:
        record = make_record(order_id)
        d = record.decision
        copies = (order_id, d.decided_at, d.outcome.name, d.rules_version)
        return copies, content_text(record)

    rows = [row("o-2"), row("o-1"), row("o-3"), row("o-2")]
    stored = db.run(lambda tx: append_texts(tx, DECISIONS, rows, unique=True))
    assert stored == [True, False, True, False]
    got = db.query("SELECT seq, order_id FROM decision_log ORDER BY seq")
    assert got == [(1, "o-1"), (2, "o-2"), (3, "o-3")]
    assert log.verify().ok
