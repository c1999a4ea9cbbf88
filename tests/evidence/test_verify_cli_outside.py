"""``riskd evidence verify`` on rows put beside the chain: named and failed (exit 1), never a
crash (exit 2), on SQLite and PostgreSQL (the ``db`` fixture of this folder's conftest).

The tables are created as riskd created them before ``seq`` had NOT NULL and a CHECK, so
the forged rows can be inserted at all (an existing database keeps its tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from riskd.cli import main
from riskd.sql import Database
from tests.evidence.conftest import PHONE, STREET
from tests.evidence.test_chain import FORGED, forge_decision, legacy_schema, write_log


def verify(capsys: pytest.CaptureFixture[str], url: str) -> tuple[int, dict[str, object]]:
    rc = main(["evidence", "verify", "--json", "--database", url])
    captured = capsys.readouterr()
    assert PHONE not in captured.out and STREET not in captured.out
    return rc, json.loads(captured.out) if captured.out else {"error": captured.err}


def test_a_decision_with_seq_zero_fails_verify_and_is_named(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy_schema(db)
    write_log(db, 3).close()
    rc, doc = verify(capsys, db.url)
    assert rc == 0 and doc["checked"] == 4
    forge_decision(db, 0)
    rc, doc = verify(capsys, db.url)
    assert rc == 1 and doc["ok"] is False
    assert doc["problems"] == [
        f"decision_log seq 0 (order {FORGED}): seq 0 is below 1, outside the chain"
        " (rows outside it: 1)"
    ]


def test_a_text_seq_fails_verify_with_exit_1_not_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(tmp_path / "riskd.db")
    legacy_schema(db)
    write_log(db, 3).close()
    with db.transaction() as tx:
        tx.execute("UPDATE decision_log SET seq = 'abc' WHERE seq = 3")
    db.close()
    rc, doc = verify(capsys, f"sqlite:///{tmp_path / 'riskd.db'}")
    assert rc == 1, doc
    assert doc["problems"] == [
        "decision_log (order o-3): seq 'abc' is not an integer (outside the chain)"
    ]
