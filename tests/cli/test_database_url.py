"""Every command that opens the daemon's database names where a bad URL came from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from riskd.cli import main as cli_main


@pytest.fixture(
    params=[(["ledger", "verify"], 2), (["evidence", "verify"], 2), (["pii", "rotate"], 1)]
)
def run(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., int]:
    """Each command that opens the daemon's database, with the exit status of its errors:
    ``run(*args)`` is 0 on success, else whether it failed as that command does."""
    command, status = request.param
    monkeypatch.chdir(tmp_path)
    extra = ["--keyring", str(tmp_path / "keyring.json")] if command[0] == "pii" else []

    def call(*args: str) -> int:
        rc = cli_main([*command, *extra, *args])
        return -1 if rc == status else rc

    return call


def test_a_bad_database_url_parameter_names_where_the_url_came_from(
    run: Callable[..., int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: ``connect_timeout (in the URL ...)`` did not say which setting held the URL;
    the error names ``--database`` or ``database_url`` first, never the URL's password."""
    bad = "postgresql://riskd:s3cret@127.0.0.1:5432/test?connect_timeout=abc"
    assert run("--database", bad) == -1
    err = capsys.readouterr().err
    assert "--database: connect_timeout (in the URL" in err and "s3cret" not in err
    monkeypatch.setenv("RISKD_DATABASE_URL", bad.replace("?", "?schema=x&"))
    assert run() == -1
    err = capsys.readouterr().err
    assert "database_url: connect_timeout (in the URL" in err and "s3cret" not in err


def test_an_unreadable_or_unreachable_database_url_is_named_without_a_traceback(
    run: Callable[..., int], capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: ``postgresql://u:pw@[::1/test`` ended ``riskd ledger verify`` and ``riskd pii
    rotate`` with a traceback; an unreachable server said only "database unavailable"."""
    assert run("--database", "postgresql://u:s3cret@[::1/test") == -1
    err = capsys.readouterr().err
    assert "--database: not a PostgreSQL URL libpq can read" in err, err
    assert "s3cret" not in err and "Traceback" not in err
    assert run("--database", "postgresql://u:s3cret@127.0.0.1:1/test?connect_timeout=2") == -1
    err = capsys.readouterr().err
    assert "--database: database unavailable (OperationalError)" in err, err
    assert "s3cret" not in err


def test_a_sqlite_file_named_postgres_is_a_sqlite_file(
    run: Callable[..., int], capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: ``--database postgres.db`` (a SQLite path) was taken for a PostgreSQL URL."""
    assert run("--database", "postgres.db") == -1
    assert "--database: no database at postgres.db" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["sqlite://riskd.db", "mysql://u:s3cret@db/riskd"])
def test_a_url_that_names_no_file_is_refused_as_a_url_not_a_missing_file(
    run: Callable[..., int], capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """Review: ``sqlite://riskd.db`` (two slashes: a host, no path) said "no database at "
    with nothing after it, and another scheme was looked up as a file of that name."""
    assert run("--database", url) == -1
    err = capsys.readouterr().err
    assert "--database: expected sqlite:///PATH, postgresql://... or a file path" in err, err
    assert "s3cret" not in err and "no database at" not in err


def test_a_database_path_the_file_system_refuses_is_named_in_one_line(
    run: Callable[..., int], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Review: the file system refusing to look the path up (a folder the auditor may not
    enter, as the daemon makes its own 0700; a name too long) ended ``riskd evidence verify``
    and ``riskd pii`` with a traceback, and ``evidence verify``'s exit 1 said the chain was
    broken; ``riskd ledger`` said "error: PermissionError", neither path nor reason."""
    too_long = tmp_path / ("d" * 300) / "riskd.db"
    assert run("--database", str(too_long)) == -1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--database: cannot look up {too_long}: File name too long" in err, err
