"""Fixtures: a real book on each backend (a SQLite file, a PostgreSQL schema of its own)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from riskd.domain.clock import FakeClock
from riskd.ledger import Book
from riskd.sql import Database

PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

DatabaseFactory = Callable[[], Database]


def new_url(backend: str, tmp_path: Path) -> str:
    """A fresh, empty database URL for ``backend``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'ledger-{uuid.uuid4().hex[:8]}.db'}"
    return f"{PG_BASE}?schema=ledger_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    url = new_url(backend, tmp_path)
    yield url
    cleanup = Database(url)
    cleanup.drop_schema()
    cleanup.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def book(db_url: str, clock: FakeClock) -> Iterator[Book]:
    b = Book.open(db_url, clock=clock)
    yield b
    b.close()


def funded(book: Book, *, fund: int = 2_000_000_000, shops: dict[str, int] | None = None) -> Book:
    """Top the fund up and register shops with the given deposits (fen)."""
    book.top_up_fund("setup-fund", fund, actor="ops", reason="initial 20M CNY fund")
    for shop, deposit in (shops or {}).items():
        book.register_shop(shop, merchant_id=f"m-{shop}")
        if deposit:
            book.deposit(f"setup-dep-{shop}", shop, deposit, actor="merchant")
    return book
