"""``riskd ledger``: statements and operator actions against a real SQLite ledger."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from riskd.cli import ledger as ledger_cli
from riskd.domain.money import format_fen
from riskd.ledger import Book
from tests.pg_roles import ADMIN, select_only_url


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="riskd")
    ledger_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ledger", *argv])
    rc: int = args.func(args)
    return rc


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    book = Book.open(url)
    book.register_shop("s1")
    book.deposit("d1", "s1", 1_000, actor="m")
    book.open_dispute("o1", "d1", "s1", "order-1", 5_000, actor="a")
    book.close()
    return url


def test_top_up_then_statements(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    top_up = ["fund-top-up", "500000", "--key", "t1", "--reason", "initial", "--database", url]
    assert run(top_up) == 0
    assert run(top_up) == 0  # a retry with the same key changes nothing
    assert run(["statement", "platform:fund", "--json", "--database", url]) == 0
    out = capsys.readouterr().out
    statement = json.loads(out[out.index('{\n  "account"') :])
    assert (statement["account"]["kind"], statement["account"]["balance"]) == ("fund", 500_000)
    assert [t["actor"] for t in statement["transfers"]] == [f"cli:{ledger_cli.getpass.getuser()}"]
    assert run(["shop", "s1", "--database", url]) == 0
    assert "deposit: 1000 fen (CNY 10.00)" in capsys.readouterr().out


@pytest.mark.parametrize("error", [KeyError, OSError])  # OSError from Python 3.13 on
def test_a_user_id_with_no_name_acts_as_its_number(
    url: str,
    error: type[Exception],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: ``docker run --user 12345`` (no passwd entry) failed every ``riskd``
    command, ``serve`` and ``health`` too, while the parser built ``--actor``'s default."""

    def nameless() -> str:
        raise error("getpwuid(): uid not found: 12345")

    monkeypatch.setattr(ledger_cli.getpass, "getuser", nameless)
    top_up = ["fund-top-up", "500000", "--key", "t1", "--reason", "initial", "--database", url]
    assert run(top_up) == 0
    assert run(["statement", "platform:fund", "--json", "--database", url]) == 0
    out = capsys.readouterr().out
    statement = json.loads(out[out.index('{\n  "account"') :])
    assert [t["actor"] for t in statement["transfers"]] == [f"cli:uid:{os.getuid()}"]


@pytest.mark.parametrize(
    ("amount", "written_off"),
    [([], 4_000), (["--amount", "1500"], 1_500)],  # default: all that is open
)
def test_write_off_and_dispute_story(
    url: str, amount: list[str], written_off: int, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["fund-top-up", "500000", "--key", "t1", "--reason", "r", "--database", url])
    book = Book.open(url)
    book.compensate_buyer("c1", "d1", 5_000, actor="a")
    book.close()
    wo = ["write-off", "s1", "dispute/d1", "--key", "w1", "--reason", "gone", *amount]
    assert run([*wo, "--database", url]) == 0
    capsys.readouterr()
    assert run(["dispute", "d1", "--json", "--database", url]) == 0
    story = json.loads(capsys.readouterr().out)
    assert (story["paid"], story["recovered_from_deposit"], story["written_off"]) == (
        5_000,
        1_000,
        written_off,
    )
    assert story["outstanding"] == 4_000 - written_off
    assert run(["dispute", "d1", "--database", url]) == 0
    shown = capsys.readouterr().out.splitlines()  # every sum as money, not a bare number
    assert {"paid: 5000 fen (CNY 50.00)", "order_amount: 5000 fen (CNY 50.00)"} <= set(shown)
    assert f"written_off: {written_off} fen ({format_fen(written_off)})" in shown
    assert run(["verify", "--database", url]) == 0
    assert "every ledger invariant holds" in capsys.readouterr().out


def test_verify_of_a_broken_book_is_exit_1_naming_the_problem(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 is the broken invariant (review: only a sound book, exit 0, was checked)."""
    path = url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path, isolation_level=None)
    try:  # as someone holding the file could: the append-only trigger out of the way
        triggers = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        for (name,) in conn.execute(f"{triggers} AND tbl_name = 'ledger_transfers'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE ledger_transfers SET amount = amount + 1 WHERE code = 1")
    finally:
        conn.close()
    assert run(["verify", "--database", url]) == 1
    out = capsys.readouterr().out
    assert "every ledger invariant holds" not in out
    assert "shop:s1:deposit" in out, out
    assert run(["verify", "--json", "--database", url]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert problems and all(isinstance(p, str) for p in problems)
    assert any("shop:s1:deposit" in p for p in problems), problems


def test_errors_exit_2_and_name_the_problem(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["unfreeze", "s1", "--key", "u1", "--reason", "r", "--database", url]) == 2
    assert "not frozen" in capsys.readouterr().err
    assert run(["fund-top-up", "0", "--key", "t", "--reason", "r", "--database", url]) == 2
    assert "amount" in capsys.readouterr().err
    assert run(["shop", "nope", "--database", url]) == 2


def test_a_key_reused_with_another_amount_exits_2_and_moves_nothing(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # a retry typed with a wrong amount must neither top up again nor pass for done
    assert run(["fund-top-up", "500", "--key", "t1", "--reason", "r", "--database", url]) == 0
    capsys.readouterr()
    assert run(["fund-top-up", "600", "--key", "t1", "--reason", "r", "--database", url]) == 2
    assert "idempotency_key: already used for a different request" in capsys.readouterr().err
    assert run(["statement", "platform:fund", "--json", "--database", url]) == 0
    statement = json.loads(capsys.readouterr().out)
    assert statement["account"]["balance"] == 500 and len(statement["transfers"]) == 1


def test_a_journal_position_beyond_64_bits_is_an_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["statement", "platform:fund", "--after", str(2**64), "--database", url]) == 2
    assert "error: after_seq: must be between 0 and" in capsys.readouterr().err


def test_the_configuration_comes_from_riskd_config_as_for_serve(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "riskd.toml"
    config.write_text(f'database_url = "{url}"\n')
    monkeypatch.setenv("RISKD_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)  # the embedded default (./var) would be an empty ledger
    assert run(["shop", "s1"]) == 0
    assert "deposit: 1000 fen (CNY 10.00)" in capsys.readouterr().out
    assert not (tmp_path / "var").exists()


def test_verify_of_a_database_that_is_not_there_is_exit_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"
    assert run(["verify", "--database", f"sqlite:///{missing}"]) == 2
    assert "no database at" in capsys.readouterr().err and not missing.exists()


@pytest.mark.parametrize(
    ("method", "command"),
    [
        ("verify", ["verify"]),
        ("top_up_fund", ["fund-top-up", "500", "--key", "t1", "--reason", "r"]),
    ],
)
def test_a_bug_is_exit_2_named_by_its_kind_never_a_broken_ledger(
    url: str,
    method: str,
    command: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: anything neither riskd's error nor the driver's (a bug) ended in a
    traceback and exit 1, which from ``verify`` means a broken invariant."""

    def bug(*args: object, **kwargs: object) -> None:
        raise TypeError("buyer 13812345678 is not subscriptable")

    monkeypatch.setattr(Book, method, bug)
    assert run([*command, "--database", url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: TypeError\n"


@pytest.mark.parametrize("command", [["verify"], ["accounts"], ["shop", "s1"]])
def test_reading_commands_do_not_wait_for_a_writer(
    url: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: the read-only commands created or repaired the schema in a write
    transaction: with the daemon writing, ``verify`` waited 9.8 s for the writer lock."""
    writer = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process mid-write
    try:
        with ThreadPoolExecutor(1) as pool:  # a command that waits fails in 2 s, not hangs
            call = pool.submit(run, [*command, "--database", url])
            try:
                assert call.result(timeout=2.0) == 0
            finally:
                writer.execute("ROLLBACK")  # lets a waiting command end
    finally:
        writer.close()


@pytest.mark.postgres
def test_a_select_only_auditor_verifies_and_lists_the_postgres_ledger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Review: ``verify`` as a role with USAGE and SELECT only ended in a traceback
    (``CREATE TABLE IF NOT EXISTS ledger_accounts``: InsufficientPrivilege) and exit 1,
    which means a broken invariant."""
    schema = f"ledger_ro_{uuid.uuid4().hex[:8]}"
    book = Book.open(f"{ADMIN}?schema={schema}")
    book.register_shop("s1")
    book.deposit("d1", "s1", 1_000, actor="m")
    book.close()
    with select_only_url(schema) as url:
        assert run(["verify", "--database", url]) == 0
        assert run(["accounts", "--database", url]) == 0
        assert "shop:s1:deposit" in capsys.readouterr().out
        # a write it has no right to is refused by name, exit 2, no traceback
        top_up = ["fund-top-up", "5", "--key", "t1", "--reason", "r", "--database", url]
        assert run(top_up) == 2
        assert "the database refused (InsufficientPrivilege" in capsys.readouterr().err


def test_a_reason_holding_pii_exits_2_naming_it_and_writes_nothing(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    top_up = ["fund-top-up", "500", "--key", "t1", "--reason", "买家 13812345678 来电"]
    assert run([*top_up, "--database", url]) == 2
    err = capsys.readouterr().err
    assert "reason: looks like it holds a mobile phone number" in err
    assert "13812345678" not in err
    assert run(["statement", "platform:fund", "--json", "--database", url]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index('{\n  "account"') :])["transfers"] == []


def test_a_statement_starts_at_the_first_transfer_and_pages_with_after_and_limit(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def reasons(account: str, *paging: str) -> list[str]:
        assert run(["statement", account, "--json", *paging, "--database", url]) == 0
        return [t["reason"] for t in json.loads(capsys.readouterr().out)["transfers"]]

    for i in range(3):
        top_up = ["fund-top-up", "100", "--key", f"t{i}", "--reason", f"r{i}", "--database", url]
        assert run(top_up) == 0
    capsys.readouterr()
    assert len(reasons("shop:s1:deposit")) == 1  # the fixture's deposit: journal position 1
    assert reasons("platform:fund") == ["r0", "r1", "r2"]
    assert run(["statement", "platform:fund", "--json", "--limit", "1", "--database", url]) == 0
    first = json.loads(capsys.readouterr().out)["transfers"]
    assert [t["reason"] for t in first] == ["r0"]
    assert reasons("platform:fund", "--after", str(first[0]["seq"]), "--limit", "1") == ["r1"]


def test_a_money_command_records_the_actor_reason_and_evidence_given(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    top_up = ["fund-top-up", "500", "--key", "t1", "--reason", "fund for 2026-11"]
    evidence = ["--evidence", "approval/OA-778", "--actor", "ops:alice"]
    assert run([*top_up, *evidence, "--database", url]) == 0
    capsys.readouterr()
    assert run(["statement", "platform:fund", "--json", "--database", url]) == 0
    (transfer,) = json.loads(capsys.readouterr().out)["transfers"]
    assert (transfer["actor"], transfer["reason"], transfer["evidence"]) == (
        "ops:alice",
        "fund for 2026-11",
        "approval/OA-778",
    )
    assert (transfer["code"], transfer["request_key"]) == ("FUND_TOP_UP", "t1")  # by name


def test_unfreeze_lifts_a_freeze_and_records_who_and_why(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    book = Book.open(url)
    book.penalize_shop("p1", "s1", "content_violation_serious", "c1", evidence="e", actor="a")
    book.close()
    assert run(["shop", "s1", "--json", "--database", url]) == 0
    assert json.loads(capsys.readouterr().out)["frozen"] is True
    unfreeze = ["unfreeze", "s1", "--key", "u1", "--reason", "appeal granted"]
    assert run([*unfreeze, "--actor", "ops:bob", "--database", url]) == 0
    capsys.readouterr()
    assert run(["shop", "s1", "--json", "--database", url]) == 0
    assert json.loads(capsys.readouterr().out)["frozen"] is False
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        rows = conn.execute(
            "SELECT actor, reason FROM ledger_freezes WHERE action = 'unfreeze'"
        ).fetchall()
    assert rows == [("ops:bob", "appeal granted")]


@pytest.mark.parametrize(
    ("command", "check", "shown"),
    [
        (["register-shop", "s9", "--merchant", "m9"], ["shop", "s9"], "merchant_id: m9"),
        (
            ["fund-top-up", "500", "--key", "t1", "--reason", "r"],
            ["statement", "platform:fund"],
            "  balance: 500 fen (CNY 5.00)",  # the account's, as money
        ),
    ],
)
def test_a_writing_command_sets_the_ledger_up_in_a_database_without_one(
    tmp_path: Path,
    command: list[str],
    check: list[str],
    shown: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The daemon's database (it exists) before anything made the ledger's tables: a
    writing command makes them; a reading one refuses, it does not (see above)."""
    url = f"sqlite:///{tmp_path / 'riskd.db'}"
    sqlite3.connect(tmp_path / "riskd.db").close()
    assert run([*command, "--database", url]) == 0
    capsys.readouterr()
    assert run([*check, "--database", url]) == 0
    assert shown in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("fen", "text"),
    [(1_005, "CNY 10.05"), (0, "CNY 0.00"), (-1_234, "-CNY 12.34"), (-5, "-CNY 0.05")],
)
def test_amounts_are_shown_in_yuan_with_two_digits_of_fen(fen: int, text: str) -> None:
    """What statements print beside the fen (``amount: -5 fen (-CNY 0.05)``)."""
    assert format_fen(fen) == text
