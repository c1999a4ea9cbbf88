"""``LedgerShopDirectory``: the scorer's cached view of shop enforcement (freezes, claims).

The engine's ``ShopDirectory`` protocol is ``.get(shop_id) -> ShopState``. The
scorer calls it once per order, so it must never wait on SQL: the directory
serves a snapshot of every enforced shop, loaded with a few aggregate queries,
and refreshes it in a background thread when it is older than ``ttl_s``.
Whether a shop is frozen is decided at ``get`` time from ``frozen_until`` and
the clock, so a freeze ends on time even between refreshes. A failed refresh
keeps the last snapshot (the scorer keeps blocking frozen shops); the next is tried
``ttl_s`` after it, and an outage is logged once, then its end (review: with the
database down every order started a refresh, a new connection attempt and a
warning with its traceback).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

from riskd.domain.clock import Clock
from riskd.domain.shop import ShopState

log = logging.getLogger("riskd.ledger.directory")


class ShopStateSource(Protocol):
    """Where snapshots come from (``Book.shop_states``)."""

    def shop_states(self) -> Mapping[str, ShopState]: ...


class LedgerShopDirectory:
    """Cached ``ShopState`` per shop, refreshed at most every ``ttl_s`` seconds.

    Args:
        book: the ledger (anything with ``shop_states()``).
        clock: decides staleness and whether a freeze has ended.
        ttl_s: the most a snapshot is served before a refresh starts.
    """

    def __init__(self, book: ShopStateSource, clock: Clock, *, ttl_s: float = 2.0) -> None:
        self._book = book
        self._clock = clock
        self._ttl_s = ttl_s
        self._snapshot: Mapping[str, ShopState] = {}
        self._tried_at = float("-inf")  # the last refresh started, loaded or not
        self._failing = False
        self._wanted = threading.Event()
        self._closed = False
        self.refresh()
        # One long-lived refresher: each thread holds its own database connection.
        self._worker = threading.Thread(target=self._run, name="ledger-shop-directory", daemon=True)
        self._worker.start()

    def get(self, shop_id: str) -> ShopState:
        """The shop's enforcement state from the snapshot (no SQL on this path)."""
        if self._clock.monotonic() - self._tried_at >= self._ttl_s:
            self._wanted.set()  # stale: the refresher loads a new one; serve this one meanwhile
        state = self._snapshot.get(shop_id)
        if state is None:
            return ShopState(shop_id=shop_id)
        frozen = state.frozen_until > self._clock.now()
        return state if frozen == state.frozen else replace(state, frozen=frozen)

    def refresh(self) -> None:
        """Load a new snapshot now (blocking); errors keep the old one and are logged."""
        self._tried_at = self._clock.monotonic()
        try:
            snapshot = dict(self._book.shop_states())
        except Exception:  # a broken database must not break scoring: keep the last view
            if not self._failing:
                self._failing = True
                log.warning(
                    "shop directory refresh failed; serving the last snapshot", exc_info=True
                )
        else:
            self._snapshot = snapshot
            if self._failing:
                self._failing = False
                log.info("shop directory refreshed again")

    def close(self) -> None:
        """Stop the refresher thread."""
        self._closed = True
        self._wanted.set()
        self._worker.join(timeout=1)  # a refresh held by a hung database is left to end

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed:
                return
            self._wanted.clear()
            self.refresh()
