"""LedgerShopDirectory: the scorer's cached view of freezes and claims."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

import pytest

from riskd.domain.clock import FakeClock
from riskd.domain.shop import ShopState
from riskd.ledger import Book, LedgerShopDirectory
from tests.ledger.conftest import funded

DAY = 86_400
Open = Callable[..., LedgerShopDirectory]


@pytest.fixture
def open_directory(book: Book) -> Iterator[Open]:
    """Directories for a test, closed before its book: a refresh running while the
    book's database closes under it would crash the process (sqlite3)."""
    made: list[LedgerShopDirectory] = []

    def make(*args: object, **kwargs: object) -> LedgerShopDirectory:
        made.append(LedgerShopDirectory(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for directory in made:
        directory.close()


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_frozen_shop_is_visible_after_a_refresh_and_ends_on_time(
    book: Book, clock: FakeClock, open_directory: Open
) -> None:
    funded(book, shops={"s1": 1_000_000, "s2": 1_000_000})
    directory = open_directory(book, clock, ttl_s=2.0)
    assert directory.get("s1") == ShopState("s1")
    book.penalize_shop("p1", "s1", "content_violation_serious", "c1", evidence="ev", actor="a")
    assert not directory.get("s1").frozen  # cached: no SQL per order
    clock.advance(3)
    directory.get("s1")  # stale: starts a background refresh
    assert wait_for(lambda: directory.get("s1").frozen)
    state = directory.get("s1")
    assert state.penalties == 1 and state.frozen_until == clock.now() - 3 + 30 * DAY
    assert directory.get("s2") == ShopState("s2")
    clock.advance(30 * DAY - 4)
    assert directory.get("s1").frozen  # one second before its end
    clock.advance(1)  # at its end: over, as for the book's withdrawals and unfreezes
    assert not directory.get("s1").frozen  # the freeze ends on time, even between refreshes


def test_operator_unfreeze_reaches_the_directory(
    book: Book, clock: FakeClock, open_directory: Open
) -> None:
    funded(book, shops={"s1": 1_000_000})
    book.penalize_shop("p1", "s1", "counterfeit_goods", "c1", evidence="ev", actor="a")
    directory = open_directory(book, clock, ttl_s=1.0)
    assert directory.get("s1").frozen
    book.unfreeze("u1", "s1", actor="ops", reason="appeal")
    directory.refresh()
    assert not directory.get("s1").frozen


def test_a_shop_that_settled_its_claims_leaves_the_directory(
    book: Book, clock: FakeClock, open_directory: Open
) -> None:
    """A refresh replaces the snapshot: a shop no longer owing is not served its old debt."""
    funded(book, shops={"s1": 0})
    book.open_dispute("o1", "d1", "s1", "order-1", 5_000, actor="a")
    book.compensate_buyer("c1", "d1", 5_000, actor="a")
    directory = open_directory(book, clock)
    assert directory.get("s1").open_claims == 5_000
    book.collect_claim("col1", "s1", 5_000, actor="ops")
    directory.refresh()
    assert directory.get("s1") == ShopState("s1")


class Broken:
    def __init__(self) -> None:
        self.fail = False

    def shop_states(self) -> Mapping[str, ShopState]:
        if self.fail:
            raise OSError("database down")
        return {"s1": ShopState("s1", frozen=True, frozen_until=2e9)}


def test_a_failed_refresh_keeps_the_last_snapshot() -> None:
    clock = FakeClock(1e9)
    source = Broken()
    directory = LedgerShopDirectory(source, clock, ttl_s=1.0)
    source.fail = True
    clock.advance(5)
    directory.refresh()
    assert directory.get("s1").frozen
    directory.close()


def test_refreshes_reuse_one_thread_and_one_connection(
    book: Book, clock: FakeClock, open_directory: Open
) -> None:
    funded(book, shops={"s1": 1_000_000})
    directory = open_directory(book, clock, ttl_s=1.0)
    book.penalize_shop("p1", "s1", "order_brushing", "c1", evidence="ev", actor="a")
    clock.advance(2)
    assert wait_for(lambda: directory.get("s1").frozen)
    connections = len(book.db._all)
    for _ in range(5):
        clock.advance(2)
        directory.get("s1")
        time.sleep(0.05)
    assert len(book.db._all) == connections
    directory.close()
    assert not directory._worker.is_alive()


class Outage:
    """A book whose database is down while ``down``, counting the snapshots asked of it."""

    def __init__(self, book: Book) -> None:
        self.book, self.down, self.asked = book, False, 0

    def shop_states(self) -> Mapping[str, ShopState]:
        self.asked += 1
        if self.down:
            raise OSError("database down")
        return self.book.shop_states()


def test_an_outage_is_tried_once_a_ttl_and_logged_once_then_its_end(
    book: Book, clock: FakeClock, open_directory: Open, caplog: pytest.LogCaptureFixture
) -> None:
    # review: with PostgreSQL down every scored order started a refresh (a connection
    # attempt) and logged a warning with its traceback: 200 of them in 10 s at 20/s
    source = Outage(book)
    directory = open_directory(source, clock, ttl_s=2.0)
    source.down = True
    clock.advance(3)
    with caplog.at_level("INFO", logger="riskd.ledger.directory"):
        for _ in range(5):  # ten seconds of orders, 20 a second
            for _ in range(20):
                directory.get("s1")
                time.sleep(0.005)
            assert wait_for(lambda: not directory._wanted.is_set())
            clock.advance(2)
        assert 3 <= source.asked - 1 <= 6  # once per ttl, not once per order
        failed = [r for r in caplog.records if "refresh failed" in r.getMessage()]
        assert len(failed) == 1
        source.down = False
        directory.get("s1")
        assert wait_for(lambda: any("refreshed again" in r.getMessage() for r in caplog.records))
