"""Flights: one leader per order id at a time, followers wait for its answer."""

from __future__ import annotations

from riskd.engine.flights import Flights


def test_a_second_landing_never_removes_a_later_leaders_flight() -> None:
    """review: a call that landed its flight twice (once when it failed, once more on its
    way out) removed the flight of an abandoned follower that had led the order again
    meanwhile, so a third call led it too and the order was decided twice at once."""
    flights = Flights[int]()
    _, first = flights.join("o-1")
    flights.land("o-1", first)
    leader, again = flights.join("o-1")  # a follower of the failed call leads it again
    assert leader and again is not first
    flights.land("o-1", first)  # the failed call's late, second landing
    third_leads, joined = flights.join("o-1")
    assert not third_leads and joined is again
    flights.land("o-1", again)
    assert flights.join("o-1")[0]
