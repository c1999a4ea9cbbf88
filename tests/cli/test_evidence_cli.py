"""``riskd evidence verify``: an auditor walks the chains and checks the heads they kept."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import pytest

from riskd.cli import main
from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.evidence.log import DecisionLog
from riskd.evidence.schema import MAX_SEQ
from riskd.sql import Database
from tests.evidence.conftest import PHONE, STREET, make_record
from tests.pg_roles import ADMIN, select_only_url


@pytest.fixture
def url(tmp_path: Path) -> str:
    db = Database(tmp_path / "riskd.db")
    log = DecisionLog(db)
    for i in range(1, 11):
        log.append(make_record(f"o-{i}"))
    log.append_event(OrderEvent("o-2", OrderEventKind.DISPUTED, 1_700_000_500.0))
    log.close()
    db.close()
    return f"sqlite:///{tmp_path / 'riskd.db'}"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    rc = main(["evidence", "verify", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def tamper(url: str, sql: str) -> None:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        conn.execute(sql)


def test_an_honest_log_verifies_and_prints_heads_to_keep(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc = run(capsys, "--database", url)
    assert rc == 0 and doc["ok"] is True and doc["checked"] == 11
    heads = doc["heads"]
    assert isinstance(heads, dict)
    assert heads["decision_log"].startswith("decision_log:10:")
    # the kept heads check out against the same log
    rc, doc = run(capsys, "--database", url, *(f"--expect={h}" for h in heads.values()))
    assert rc == 0 and doc["problems"] == []


def test_cutting_the_tail_is_caught_by_a_kept_head(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, doc = run(capsys, "--database", url)
    kept = doc["heads"]["decision_log"]  # type: ignore[index]
    tamper(url, "DELETE FROM decision_log WHERE seq >= 9")
    rc, doc = run(capsys, "--database", url)
    assert rc == 0  # a shorter chain is still a valid chain on its own...
    rc, doc = run(capsys, "--database", url, "--expect", kept)
    assert rc == 1 and doc["ok"] is False  # ...but not the one the auditor saw
    assert doc["problems"] == ["decision_log row 10 is gone (rows were deleted from the end)"]


def test_an_edited_row_fails_and_is_named(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    tamper(url, "UPDATE decision_log SET outcome = 'ALLOW' WHERE seq = 6")
    rc = main(["evidence", "verify", "--database", url])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED" in out and "decision_log seq 6 (order o-6): column outcome" in out
    assert PHONE not in out and STREET not in out


@pytest.mark.parametrize(
    "bad",
    [
        "decisions:1:x",
        "decision_log:1:" + "g" * 64,
        "decision_log:\u0663:" + "a" * 64,
        "decisions:1:" + "a" * 64,  # an unknown table with a well-formed hash
        "decision_log:1:" + "a" * 63,  # a head cut short when copied: not "rewritten" (1)
    ],
)
def test_bad_expect_is_refused_with_exit_2(
    url: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evidence", "verify", "--database", url, "--expect", bad]) == 2
    assert "TABLE:SEQ:HASH" in capsys.readouterr().err


def test_a_kept_head_in_capitals_is_the_same_head(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, doc = run(capsys, "--database", url)
    table, seq, digest = doc["heads"]["decision_log"].split(":")  # type: ignore[index]
    rc, doc = run(capsys, "--database", url, "--expect", f"{table}:{seq}:{digest.upper()}")
    assert rc == 0 and doc["problems"] == []


def test_a_rebuilt_tail_is_caught_by_a_kept_head(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, doc = run(capsys, "--database", url)
    kept = doc["heads"]["decision_log"]  # type: ignore[index]
    tamper(url, "DELETE FROM decision_log WHERE seq >= 9")
    db = Database(url.removeprefix("sqlite:///"))
    log = DecisionLog(db)  # the tail written again, with a valid chain
    for order_id in ("o-9", "o-10-forged"):
        log.append(make_record(order_id))
    log.close()
    db.close()
    assert run(capsys, "--database", url)[0] == 0
    rc, doc = run(capsys, "--database", url, "--expect", kept)
    assert rc == 1
    assert doc["problems"] == ["decision_log row 10 has another hash (the chain was rewritten)"]


def test_a_missing_database_or_one_without_evidence_is_exit_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.db"
    assert main(["evidence", "verify", "--database", f"sqlite:///{missing}"]) == 2
    assert "no database at" in capsys.readouterr().err and not missing.exists()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert main(["evidence", "verify", "--database", f"sqlite:///{empty}"]) == 2
    assert "cannot read the evidence" in capsys.readouterr().err


def test_the_configuration_comes_from_riskd_config_as_for_serve(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "riskd.toml"
    config.write_text(f'database_url = "{url}"\n')
    monkeypatch.setenv("RISKD_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)  # the embedded default (./var) would be empty here
    rc, doc = run(capsys)
    assert rc == 0 and doc["checked"] == 11


@pytest.mark.postgres
def test_a_postgres_schema_that_is_not_there_is_exit_2_and_not_created(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import psycopg

    schema = f"evidence_missing_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}"
    assert main(["evidence", "verify", "--database", url]) == 2
    assert f"no schema '{schema}'" in capsys.readouterr().err
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test") as conn:
        row = conn.execute("SELECT to_regnamespace(%s) IS NULL", (schema,)).fetchone()
    assert row == (True,)


def test_a_four_slash_sqlite_url_names_the_absolute_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # sqlite:////abs/path (SQLAlchemy's absolute form) is the file /abs/path, named so
    missing = tmp_path / "none.db"
    assert main(["evidence", "verify", "--database", f"sqlite:///{missing}"]) == 2
    assert f"no database at {missing} " in capsys.readouterr().err


@pytest.mark.postgres
def test_a_read_only_auditor_verifies_a_postgres_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Review: every connection ran ``CREATE SCHEMA IF NOT EXISTS``, which needs CREATE on
    the database: a role with USAGE and SELECT on the schema could not verify it."""
    schema = f"evidence_ro_{uuid.uuid4().hex[:8]}"
    db = Database(f"{ADMIN}?schema={schema}")
    log = DecisionLog(db)
    for i in range(1, 4):
        log.append(make_record(f"o-{i}"))
    log.close()
    db.close()
    with select_only_url(schema) as url:
        rc, doc = run(capsys, "--database", url)
        assert rc == 0 and doc["checked"] == 3


@pytest.mark.parametrize("seq", [str(2**63), "9" * 19])
def test_a_kept_head_past_the_largest_seq_is_refused_as_input(
    url: str, capsys: pytest.CaptureFixture[str], seq: str
) -> None:
    """Review: a seq of 19 digits above 2**63 - 1 passed the check, then SQLite refused to
    bind it: "cannot read the evidence (OverflowError)", as if the database were at fault."""
    assert (
        main(
            ["evidence", "verify", "--database", url, "--expect", f"decision_log:{seq}:{'a' * 64}"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--expect" in err and "SEQ" in err and "OverflowError" not in err


def test_a_kept_head_at_the_largest_seq_is_checked_not_refused(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc = run(capsys, "--database", url, "--expect", f"decision_log:{MAX_SEQ}:{'a' * 64}")
    assert rc == 1
    assert doc["problems"] == [
        f"decision_log row {MAX_SEQ} is gone (rows were deleted from the end)"
    ]


def test_the_text_report_prints_the_heads_to_keep(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An auditor reading the text report keeps the heads it prints: the same as --json's."""
    _, doc = run(capsys, "--database", url)
    assert main(["evidence", "verify", "--database", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ok: 11 rows checked"
    assert lines[1] == "heads (keep them; pass them back with --expect next time):"
    heads = doc["heads"]
    assert isinstance(heads, dict)
    assert lines[2:] == [f"  {h}" for h in heads.values()]


def refused_in_one_line(capsys: pytest.CaptureFixture[str], refusal: str) -> None:
    out, err = capsys.readouterr()
    prefix = "riskd evidence verify: error: cannot read the evidence: the database refused"
    assert out == "" and err == f"{prefix} ({refusal})\n"


def test_a_file_that_is_not_a_database_is_exit_2_named_in_one_line_and_left_as_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: the database's refusal was said by its kind alone (``DatabaseError``), as
    ``riskd ledger`` and ``riskd pii`` say it: kind and first line."""
    garbage = tmp_path / "riskd.db"
    garbage.write_bytes(bytes(range(256)) * 32)
    assert main(["evidence", "verify", "--database", f"sqlite:///{garbage}"]) == 2
    refused_in_one_line(capsys, "DatabaseError: file is not a database")
    assert garbage.read_bytes() == bytes(range(256)) * 32


def test_a_database_another_connection_holds_locked_is_exit_2_named_in_one_line(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("riskd.sql.BUSY_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")  # another process, mid-write, keeping readers out
    try:
        assert main(["evidence", "verify", "--json", "--database", url]) == 2
        refused_in_one_line(capsys, "OperationalError: database is locked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    rc, doc = run(capsys, "--database", url)
    assert rc == 0 and doc["checked"] == 11  # nothing was changed


@pytest.mark.postgres
def test_a_role_without_select_on_the_evidence_is_exit_2_named_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema = f"evidence_noselect_{uuid.uuid4().hex[:8]}"
    made = Database(f"{ADMIN}?schema={schema}")
    made.query("SELECT 1")  # the schema, with no table yet
    made.close()
    with select_only_url(schema) as url:  # granted SELECT on no table: there were none
        db = Database(f"{ADMIN}?schema={schema}")
        log = DecisionLog(db)
        log.append(make_record("o-1"))
        log.close()
        db.close()
        assert main(["evidence", "verify", "--database", url]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and url not in err
        assert "the database refused (InsufficientPrivilege: permission denied for table " in err


def test_a_bug_during_the_walk_is_exit_2_named_by_its_kind_alone(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug's text can quote a row; exit 1 would say the chain is broken."""

    def bug(db: Database) -> None:
        raise TypeError(f"buyer {PHONE} is not subscriptable")

    monkeypatch.setattr("riskd.cli.evidence.verify", bug)
    assert main(["evidence", "verify", "--database", url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "riskd evidence verify: error: cannot read the evidence: TypeError\n"


def test_a_bug_while_opening_the_database_is_exit_2_named_by_its_kind_alone(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: only a bug during the walk was exit 2; one while finding or opening the
    database ended in a traceback quoting its text, and exit 1, "the chain is broken"."""

    def bug(*args: object) -> None:
        raise TypeError(f"buyer {PHONE} is not subscriptable")

    monkeypatch.setattr("riskd.cli.evidence.Database", bug)
    assert main(["evidence", "verify", "--database", url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "riskd evidence verify: error: TypeError\n"
