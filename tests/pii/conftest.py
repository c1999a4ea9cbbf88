"""Fixtures for the PII tests: a keyring, and a key store on real SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from riskd.pii.keyring import Keyring
from riskd.pii.keystore import SqlKeyStore
from riskd.sql import Database

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'pii.db'}")
    else:
        database = Database(f"{PG_URL}?schema=pii_{uuid.uuid4().hex[:12]}")
    yield database
    database.drop_schema()
    database.close()


@pytest.fixture
def store(db: Database) -> SqlKeyStore:
    return SqlKeyStore(db)
