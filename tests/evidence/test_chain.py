"""The hash chain: verify passes on an honest log and names the first tampered record."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import psycopg
import pytest

from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.errors import UnavailableError
from riskd.evidence import chain
from riskd.evidence.chain import DECISIONS, append_texts, chain_hash
from riskd.evidence.log import DecisionLog
from riskd.evidence.records import content_text
from riskd.evidence.schema import GENESIS_HASH, ddl
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
    conn.executescript(sql)  # one statement or several (a swap goes through a free seq)
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
        # the column lookups by order id read: a decision moved to another order
        ("UPDATE decision_log SET order_id = 'o-x' WHERE seq = 3", 3, "column order_id"),
        # the other copied columns: a lookup by time or rules version reads them as recorded
        ("UPDATE decision_log SET decided_at = 1.0 WHERE seq = 7", 7, "column decided_at"),
        ("UPDATE decision_log SET rules_version = 'v0' WHERE seq = 2", 2, "column rules_version"),
        ("DELETE FROM decision_log WHERE seq = 5", 6, "a row is missing"),
        ("UPDATE decision_log SET prev_hash = hash WHERE seq = 9", 9, "prev_hash"),
        (  # two records swapped, each whole (review: no test reordered rows)
            "UPDATE decision_log SET seq = 999999 WHERE seq = 4;"
            " UPDATE decision_log SET seq = 4 WHERE seq = 5;"
            " UPDATE decision_log SET seq = 5 WHERE seq = 999999;",
            4,
            "prev_hash does not match the previous row",
        ),
        (  # a record cut out and the rest renumbered and relinked: each hash covers the
            # previous one, so the row after the gap no longer matches its own hash
            "DELETE FROM decision_log WHERE seq = 5;"
            " UPDATE decision_log SET seq = seq - 1 WHERE seq > 5;"
            " UPDATE decision_log SET prev_hash ="
            " (SELECT hash FROM decision_log WHERE seq = 4) WHERE seq = 5;",
            5,
            "content does not match its hash",
        ),
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
    # the CLI prints the head even then: it must be a row that checked out, hash and all
    last_good = log.db.query(
        "SELECT seq, hash FROM decision_log WHERE seq < ? ORDER BY seq DESC LIMIT 1", (seq,)
    )[0]
    assert result.head["decision_log"] == (last_good[0], last_good[1])
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


@pytest.mark.parametrize("page", [chain._PAGE, 2])
def test_append_texts_skips_known_and_repeated_order_ids_and_keeps_the_chain(
    db: Database, page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a spill file's replay looks ids up a page at a time: a known one on any page is skipped
    monkeypatch.setattr(chain, "_PAGE", page)
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


def test_append_texts_refuses_a_batch_a_concurrent_writer_cut_short(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica stored an order between the lookup and the insert: the insert skips
    it (ON CONFLICT), so the rows after it would hang from a seq nobody holds. The batch is
    refused whole; the caller's retry looks the ids up again."""
    log = write_log(db, 1)
    rows = [(("o-1", 1.0, "REVIEW", "v1"), '{"order_id":"o-1"}')]
    rows.append((("o-2", 2.0, "ALLOW", "v1"), '{"order_id":"o-2"}'))
    monkeypatch.setattr(chain, "_new_ids", lambda tx, table, rows: [True] * len(rows))
    with pytest.raises(UnavailableError, match="concurrent writer"):
        db.run(lambda tx: append_texts(tx, DECISIONS, rows, unique=True))
    assert db.query("SELECT seq, order_id FROM decision_log ORDER BY seq") == [(1, "o-1")]
    assert log.verify().ok
    log.close()


# -- rows beside the chain -------------------------------------------------

FORGED = "o-forged"


def legacy_schema(db: Database) -> None:
    """The evidence tables as riskd created them before ``seq`` had NOT NULL and a CHECK:
    a database of that time keeps them (``CREATE TABLE IF NOT EXISTS``)."""
    db.executescript(re.sub(r"seq BIGINT [^,]*,", "seq BIGINT PRIMARY KEY,", ddl(db.dialect)))


def forge_decision(db: Database, seq: object) -> None:
    """Insert an ALLOW for ``FORGED`` with ``seq`` (not chained), copied from row 1."""
    content = json.loads(db.query("SELECT content FROM decision_log WHERE seq = 1")[0][0])
    content.update(order_id=FORGED, outcome="ALLOW")
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO decision_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, FORGED, content["decided_at"], "ALLOW", content["rules_version"],
             json.dumps(content), GENESIS_HASH, "f" * 64),
        )  # fmt: skip


def outside_seqs(db: Database) -> list[object]:
    """The seq values a forger could use on ``db``'s dialect (PostgreSQL's key is NOT NULL)."""
    return [0, -1] if db.dialect == "postgres" else [0, -1, None]


def test_verify_names_a_decision_beside_the_chain_and_lookups_skip_it(db: Database) -> None:
    legacy_schema(db)
    log = write_log(db, 3)
    for seq in outside_seqs(db):
        forge_decision(db, seq)
        result = log.verify()
        assert (result.ok, result.table, result.order_id) == (False, "decision_log", FORGED)
        assert result.seq == seq and "outside the chain (rows outside it: 1)" in result.problem
        assert result.head["decision_log"][0] == 3  # the chain itself walked in full
        # the daemon does not read it as the order's recorded decision
        assert log.get(FORGED) is None
        assert set(log.get_many([FORGED, "o-1"])) == {"o-1"}
        db.query(f"DELETE FROM decision_log WHERE order_id = '{FORGED}' RETURNING seq")
    assert log.verify().ok
    log.close()


def test_verify_names_an_event_or_access_entry_beside_the_chain(db: Database) -> None:
    legacy_schema(db)
    log = write_log(db, 3)
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO order_events VALUES (?, ?, ?, ?, ?, ?, ?)",
            (0, "o-1", "CHARGEBACK", 1.0, '{"order_id":"o-1"}', GENESIS_HASH, "f" * 64),
        )
    result = log.verify()
    assert (result.ok, result.table, result.seq, result.order_id) == (
        False, "order_events", 0, "o-1",
    )  # fmt: skip
    assert [e.kind for e in log.events("o-1")] == []
    assert [e.kind for e in log.events("o-2")] == [OrderEventKind.DISPUTED]
    db.query("DELETE FROM order_events WHERE seq = 0 RETURNING seq")
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO pii_access_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (-3, "o-2", 1.0, "mallory", "REVEALED", "{}", GENESIS_HASH, "f" * 64),
        )
    result = log.verify()
    assert (result.ok, result.table, result.seq, result.order_id) == (
        False, "pii_access_log", -3, "o-2",
    )  # fmt: skip
    log.close()


def test_verify_names_a_second_row_on_the_seq_that_ends_a_page(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table rebuilt without its key takes a second row on a seq; on the seq that ends
    a page of the walk (1,000, 2,000, …; 2 here) the next page never read it."""
    monkeypatch.setattr(chain, "_PAGE", 2)
    db.executescript(re.sub(r"seq BIGINT [^,]*,", "seq BIGINT,", ddl(db.dialect)))
    log = write_log(db, 4)
    assert log.verify().ok
    forge_decision(db, 2)
    result = log.verify()
    assert (result.ok, result.table, result.seq, result.order_id) == (
        False, "decision_log", 2, FORGED,
    )  # fmt: skip
    assert result.problem.startswith("seq 2 is held by more than one row, beside the chain")
    assert f"o-2, {FORGED}" in result.problem and "rows beside it: 1" in result.problem
    db.query(f"DELETE FROM decision_log WHERE order_id = '{FORGED}' RETURNING seq")
    assert log.verify().ok
    log.close()


@pytest.mark.parametrize("seq", ["abc", 2.5, b"\x01"])
def test_a_seq_that_is_not_an_integer_is_a_problem_not_a_crash(tmp_path: Path, seq: object) -> None:
    db = Database(tmp_path / "evidence.db")
    legacy_schema(db)
    log = write_log(db, 3)
    forge_decision(db, seq)  # SQLite keeps it as text, real or blob in the BIGINT column
    result = log.verify()
    assert (result.ok, result.table, result.seq, result.order_id) == (
        False, "decision_log", None, FORGED,
    )  # fmt: skip
    assert f"seq {seq!r} is not an integer" in result.problem
    log.close()


def test_new_tables_refuse_a_seq_outside_the_chain(db: Database) -> None:
    log = write_log(db, 3)
    bad: list[object] = [0, -1, None]
    if db.dialect == "sqlite":
        bad += ["abc", 2.5, b"\x01"]  # PostgreSQL's bigint refuses them by itself
    for seq in bad:
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            forge_decision(db, seq)
    assert log.verify().ok
    log.close()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('["o-3"]', "content is not a JSON object"),
        ('"o-3"', "content is not a JSON object"),
        ("3", "content is not a JSON object"),
        ("null", "content is not a JSON object"),
        # rehashed text no lookup can read: named too, not passed as a recorded decision
        ('{"order_id":"o-3",', "content is not JSON"),
    ],
)
def test_a_chained_row_whose_content_is_not_an_object_fails_verify_not_the_walk(
    db: Database, content: str, problem: str
) -> None:
    """Review: a tail rebuilt with a valid chain whose content is JSON but not an object
    made verify raise AttributeError: `riskd evidence verify` said "cannot read the
    evidence" (exit 2, as for a database that is down) instead of naming the row (exit 1),
    and never got to the heads the auditor passed with --expect."""
    log = write_log(db, 3)
    log.close()
    prev = db.query("SELECT hash FROM decision_log WHERE seq = 2")[0][0]
    with db.transaction() as tx:
        tx.execute(
            "UPDATE decision_log SET content = ?, hash = ? WHERE seq = 3",
            (content, chain_hash(prev, content)),
        )
    result = log.verify()
    assert (result.ok, result.table, result.seq, result.order_id) == (
        False,
        "decision_log",
        3,
        "o-3",
    )
    assert result.problem == problem


def test_a_kept_head_at_seq_0_is_only_the_genesis_hash(db: Database) -> None:
    log = write_log(db, 1)
    assert chain.check_anchor(db, DECISIONS, 0, GENESIS_HASH) is None
    assert chain.check_anchor(db, DECISIONS, 0, "f" * 64) == "seq 0 has only the genesis hash"
    log.close()
