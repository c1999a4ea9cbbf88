"""Every command that opens the daemon's database names where a bad URL came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskd.cli import main as cli_main


@pytest.mark.parametrize(
    ("command", "status"),
    [(["ledger", "verify"], 2), (["evidence", "verify"], 2), (["pii", "rotate"], 1)],
)
def test_a_bad_database_url_parameter_names_where_the_url_came_from(
    command: list[str],
    status: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: ``connect_timeout (in the URL ...)`` did not say which setting held the URL;
    the error names ``--database`` or ``database_url`` first, never the URL's password."""
    bad = "postgresql://riskd:s3cret@127.0.0.1:5432/test?connect_timeout=abc"
    monkeypatch.chdir(tmp_path)
    keyring = tmp_path / "keyring.json"
    extra = ["--keyring", str(keyring)] if command[0] == "pii" else []
    assert cli_main([*command, *extra, "--database", bad]) == status
    err = capsys.readouterr().err
    assert "--database: connect_timeout (in the URL" in err and "s3cret" not in err
    monkeypatch.setenv("RISKD_DATABASE_URL", bad.replace("?", "?schema=x&"))
    assert cli_main([*command, *extra]) == status
    err = capsys.readouterr().err
    assert "database_url: connect_timeout (in the URL" in err and "s3cret" not in err
