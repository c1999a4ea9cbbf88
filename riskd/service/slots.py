"""Call slots: at most ``limit`` calls of one service run at once; one more is refused at once.

Services that wait on a database lock (``LedgerService`` on the ledger's writer lock,
``EvidenceService`` on the audit trail's) share the server's RPC threads with scoring.
The server adds threads for each beyond ``workers`` (``Config.rpc_threads``) and the
service holds no more than that many: a call beyond them is answered ``UNAVAILABLE``
at once (retry shortly) rather than queued on a thread, so a stalled database (another
process holding the SQLite file's lock, a hung replica) never takes the threads the
checkout's ``Score`` needs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from riskd.errors import UnavailableError

Method = TypeVar("Method", bound=Callable[..., Any])


class Slots:
    """``limit`` slots for calls of ``service`` (named in the refusal)."""

    def __init__(self, limit: int, service: str) -> None:
        if limit < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._free = threading.BoundedSemaphore(limit)
        self._service = service

    @contextmanager
    def held(self) -> Iterator[None]:
        """One slot for the duration; ``UnavailableError`` at once when none is free."""
        if not self._free.acquire(blocking=False):
            what = self._service
            raise UnavailableError(f"{what} busy: too many {what} calls at once; retry shortly")
        try:
            yield
        finally:
            self._free.release()


def bounded(method: Method) -> Method:
    """Run a servicer method only in one of the servicer's ``slots`` (a ``Slots``)."""

    @functools.wraps(method)
    def call(self: Any, request: Any, context: Any) -> Any:
        with self.slots.held():
            return method(self, request, context)

    return call  # type: ignore[return-value]
