"""The feature store contract: one order observed, velocity features read back.

Where it sits in the flow: ``engine.Scorer`` builds an ``Observation`` from the
order (its identities already blind-indexed by ``riskd.pii``), calls
``record_and_read`` with every ``FeatureQuery`` the rule program needs, and
hands the answer to the compiled rules. Two backends implement it and pass one
contract suite: ``InProcessFeatureStore`` (single node) and
``RedisFeatureStore`` (shared by replicas).

Semantics shared by both backends:

* Time is kept to the millisecond. A window ``W`` read for an observation at
  ``t`` covers events in ``(t - W, t]``; the order's own time ``at`` is the end
  of the window, so a replay with the same observations reads the same values.
* ``COUNT`` and ``SUM`` cover every key the order carries. ``DISTINCT`` for a
  ``(key, of)`` pair is tracked from the first ``record_and_read`` that asks
  for it (the engine always passes the whole program's queries, so a distinct
  feature added by a rule reload warms up over its window).
* ``DISTINCT`` counts the ``of`` values whose latest sighting with the key lies
  in the window (exact when observations arrive in time order), and always the
  order's own value when this call records it: an order recorded after another of the
  same pair stamped later (two calls at once) would else leave itself out (review: 148
  of a 300-order batch read 0 buyers per phone). A retry reads without that (its
  of-value may not be the one its key was recorded with).
* A ``SUM`` saturates at ``MAX_SUM`` fen (2^53 - 1, about 90 billion yuan): a window
  whose amounts add up to more reads ``MAX_SUM``. Below it every sum is exact; the Redis
  script counts in doubles, which hold every integer up to 2^53 and no further.
* Recording is idempotent per ``order_id`` and key: a key value recorded for an
  order is not recorded again for it within ``SEEN_TTL_S`` seconds. A true retry
  records nothing; a key value the order did not carry before (a client that changed
  it on retry) is recorded once too. Per key rather than per order, so that a store
  split across shards by key gives the same answers.
* An observation may carry its order's ``content`` tag (``riskd.evidence.request
  .content_tag``): the first recording of an order id claims it, and a later one with
  another tag records nothing and raises ``OtherContentError``. This is what refuses a
  retry with changed content that reaches another replica before the first decision is
  in the shared decision log. An order recorded without a tag (or by an older riskd)
  claims the first tag recorded with it later; an observation without one is not
  checked. The claim lasts as long as the order's keys are remembered (``SEEN_TTL_S``).
  A sharded store keeps it on the order id's home shard alone: a refused call's keys
  on the other shards are recorded there (key values the first content carried are
  not counted again; new ones are, as a retry's changed key always was).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from riskd.domain.features import KEYS, WINDOWS, Agg, FeatureQuery
from riskd.domain.order import MAX_ORDER_ID_LEN
from riskd.errors import AlreadyExistsError, InvalidArgumentError, UnavailableError

__all__ = [
    "CONTENT_TAG_LEN",
    "MAX_ORDER_ID_LEN",
    "MAX_SUM",
    "MAX_VALUE_LEN",
    "RETENTION_MS",
    "SEEN_TTL_S",
    "FeatureStore",
    "Observation",
    "OtherContentError",
    "distinct_pairs",
    "to_ms",
]

RETENTION_MS = max(WINDOWS.values()) * 1000  # events older than the longest window are dropped
SEEN_TTL_S = max(WINDOWS.values()) + 3600  # how long an order_id stays recorded (24h + 1h)
MAX_SUM = 2**53 - 1  # a SUM saturates here (fen): the largest exact sum in the Redis script
MAX_VALUE_LEN = 256  # blind indexes are far shorter; bounds the size of a store key
CONTENT_TAG_LEN = 7  # an order's content tag: URL-safe base64 characters (42 bits)
_TAG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class OtherContentError(AlreadyExistsError):
    """The order id was recorded for other content (another ``Observation.content``);
    nothing was recorded for this observation. The engine names the request's field."""

    def __init__(self) -> None:
        super().__init__("order_id: recorded for other order content")


class WritesRefusedError(UnavailableError):
    """The backend answers but records nothing for now, whatever the order: read-only (a
    replica, mid-failover), out of memory, its persistence failing, still loading. Not
    the order's trouble (the catch-up never gives an order up for it)."""


def to_ms(seconds: float) -> int:
    """Epoch seconds to the integer milliseconds both backends count in.

    >>> to_ms(1700000000.25)
    1700000000250
    """
    return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Observation:
    """One order as the feature stores see it.

    Args:
        order_id: the order's id; recording is idempotent on it.
        at: when riskd saw the order (epoch seconds, from the engine's clock,
            never the client's claimed time); the end of every window read.
        amount: the order total in fen (``>= 0``).
        keys: ``KEYS`` name -> opaque value that is ALREADY a keyed hash (blind
            index). Missing or empty values are not counted.
        content: the order's content tag (``CONTENT_TAG_LEN`` URL-safe base64
            characters), or empty: not checked (see the module docstring).

    Raises:
        InvalidArgumentError: naming the field, never echoing a key's value.
    """

    order_id: str
    at: float
    amount: int
    keys: Mapping[str, str] = field(default_factory=dict)
    content: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.order_id, str) or not self.order_id:
            raise InvalidArgumentError("order_id", "is required")
        if len(self.order_id) > MAX_ORDER_ID_LEN:
            raise InvalidArgumentError("order_id", f"is longer than {MAX_ORDER_ID_LEN}")
        if not self.order_id.isprintable():
            raise InvalidArgumentError("order_id", "must not contain control characters")
        if isinstance(self.at, bool) or not isinstance(self.at, int | float):
            raise InvalidArgumentError("at", "must be a number of seconds")
        if not math.isfinite(self.at) or self.at < 0:
            raise InvalidArgumentError("at", "must be finite and not negative")
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise InvalidArgumentError("amount", "must be an integer number of fen")
        if self.amount < 0:
            raise InvalidArgumentError("amount", "must not be negative")
        if self.content and (
            not isinstance(self.content, str)
            or len(self.content) != CONTENT_TAG_LEN
            or not _TAG_CHARS.issuperset(self.content)
        ):
            raise InvalidArgumentError(
                "content", f"must be {CONTENT_TAG_LEN} URL-safe base64 characters"
            )
        object.__setattr__(self, "keys", MappingProxyType(_checked_keys(self.keys)))

    @property
    def at_ms(self) -> int:
        return to_ms(self.at)


def _checked_keys(keys: Mapping[str, str]) -> dict[str, str]:
    present: dict[str, str] = {}
    for name, value in keys.items():
        if name not in KEYS:
            raise InvalidArgumentError("keys", f"unknown feature key {name!r}")
        if not isinstance(value, str):
            raise InvalidArgumentError(f"keys.{name}", "must be a string")
        if len(value) > MAX_VALUE_LEN:
            raise InvalidArgumentError(f"keys.{name}", f"is longer than {MAX_VALUE_LEN}")
        if not value.isprintable():
            raise InvalidArgumentError(f"keys.{name}", "must not contain control characters")
        if value:
            present[name] = value
    return present


def distinct_pairs(obs: Observation, queries: Collection[FeatureQuery]) -> list[tuple[str, str]]:
    """The ``(key, of)`` pairs of the DISTINCT queries whose key this order carries.

    >>> q = FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer")
    >>> distinct_pairs(Observation("o1", 1.0, 0, {"device": "d"}), [q, q])
    [('device', 'buyer')]
    """
    pairs = {(q.key, q.of) for q in queries if q.agg is Agg.DISTINCT and q.key in obs.keys}
    return sorted(pairs)


class FeatureStore(Protocol):
    """Velocity counters and distinct counts over the ``WINDOWS`` (1m, 1h, 24h)."""

    def record_and_read(
        self, obs: Observation, queries: Collection[FeatureQuery]
    ) -> dict[FeatureQuery, int]:
        """Record ``obs`` once per ``order_id`` and key, then read ``queries`` (this order
        included).

        A second call with an ``order_id`` already recorded records only the key
        values it did not record before (none, for a true retry) and reads. A query
        whose key the order lacks reads 0.

        Raises:
            WritesRefusedError: the backend answers but refuses to record any order now.
            UnavailableError: the backend is down or slow (bounded timeouts).
        """
        ...

    def read(self, obs: Observation, queries: Collection[FeatureQuery]) -> dict[FeatureQuery, int]:
        """Read ``queries`` for ``obs``'s keys and time without recording anything."""
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...
