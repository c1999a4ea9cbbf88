"""Names of the velocity features rules may ask for, shared by the DSL and the feature stores.

A rule writes ``orders("device", "1h")``; the DSL checker turns that into a
``FeatureQuery`` at compile time, the program lists every query it needs, the
engine asks the feature store for all of them in one round trip, and the
compiled rule reads the answer from the snapshot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Agg(enum.Enum):
    COUNT = "count"  # orders seen for the key in the window (this one included)
    SUM = "sum"  # sum of order totals in fen
    DISTINCT = "distinct"  # distinct values of `of` seen with the key in the window


# The identities an order carries that counters can be keyed by. PII ones
# (phone, address, device, ip) are counted by their blind index, never plaintext.
KEYS: tuple[str, ...] = (
    "buyer",
    "device",
    "ip",
    "address",
    "phone",
    "shop",
    "live_room",
    "creator",
)

# Window name -> seconds.
WINDOWS: dict[str, int] = {"1m": 60, "1h": 3600, "24h": 86400}


@dataclass(frozen=True, slots=True)
class FeatureQuery:
    """One velocity feature, e.g. distinct buyers per device in the last hour.

    >>> FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer").name
    'distinct_buyer_per_device_1h'
    """

    agg: Agg
    key: str
    window: str
    of: str = ""
    # Queries are dict keys on every velocity lookup: hash once, not through Enum.__hash__.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[FeatureQuery], tuple[Agg, str, str, str]]:
        # str hashes differ between processes: rebuild (and rehash) on unpickling.
        return (FeatureQuery, (self.agg, self.key, self.window, self.of))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.agg.value, self.key, self.window, self.of)))
        if self.key not in KEYS:
            raise ValueError(f"unknown feature key {self.key!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"unknown window {self.window!r}")
        if (self.agg is Agg.DISTINCT) != bool(self.of):
            raise ValueError("`of` is required for distinct counts and only for them")
        if self.of and self.of not in KEYS:
            raise ValueError(f"unknown feature key {self.of!r}")

    @property
    def seconds(self) -> int:
        return WINDOWS[self.window]

    @property
    def name(self) -> str:
        if self.agg is Agg.DISTINCT:
            return f"distinct_{self.of}_per_{self.key}_{self.window}"
        return f"{self.agg.value}_per_{self.key}_{self.window}"
