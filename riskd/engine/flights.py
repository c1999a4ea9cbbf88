"""Singleflight per order id: concurrent retries of one order wait for the first one's answer.

Where it sits: ``Scorer.score`` joins the flight for the order id; the leader
scores and records the decision, followers get the leader's decision (or its
exception). With the decision log lookup before the flight, a retry in this
process never scores an order twice. In worker mode the gRPC process keeps
flights of its own (of serialized answers) in front of the workers
(``riskd.service.router``), so a retry never meets its order in another worker.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Abandoned(Exception):
    """A follower's answer when its leader gave up without deciding (the leader's call was
    refused for another order's content): the follower scores the order itself."""


@dataclass(slots=True)
class Flight(Generic[T]):
    """One order being scored; ``done`` is set when ``decision`` or ``error`` is.

    ``request`` is the protected order the decision was made for (the decision
    log's form), so a follower can tell whether it asked about the same order.
    """

    done: threading.Event = field(default_factory=threading.Event)
    decision: T | None = None
    error: BaseException | None = None
    request: Mapping[str, Any] | None = None

    def finish(
        self,
        decision: T | None,
        error: BaseException | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        self.decision, self.error, self.request = decision, error, request
        self.done.set()

    def wait(self, timeout_s: float | None) -> T | None:
        """The leader's decision; None if it did not finish in time; re-raises its error."""
        if not self.done.wait(timeout_s):
            return None
        if self.error is not None:
            raise self.error
        return self.decision


class Flights(Generic[T]):
    """The orders being scored right now in this process (``T``: what a flight answers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight[T]] = {}

    def join(self, order_id: str) -> tuple[bool, Flight[T]]:
        """``(True, flight)`` for the leader (who must ``land``), ``(False, flight)`` otherwise."""
        with self._lock:
            flight = self._flights.get(order_id)
            if flight is not None:
                return False, flight
            flight = self._flights[order_id] = Flight()
            return True, flight

    def land(self, order_id: str, flight: Flight[T]) -> None:
        """The leader of ``flight`` is done (its decision is in the log by now). Only that
        flight is removed: landing twice never removes the flight of a call that has led
        the order again since."""
        with self._lock:
            if self._flights.get(order_id) is flight:
                del self._flights[order_id]
